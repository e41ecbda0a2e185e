#pragma once
// MimoModel from the seed README, shared by the example, the tests and the
// benchmark:  f(x, y) = hstack(tr(AᵀA) x, tr(BᵀB) y)  with A, B: 2×2 parameters.
#include <hesse/hesse.hpp>

// A custom model: two registered parameter matrices, a trace and an hstack.
struct MimoModel : hesse::nn::Module {
  hesse::Tensor A, B;
  explicit MimoModel(hesse::Generator& gen = hesse::default_generator()) {
    A = register_parameter("A", hesse::randn({2, 2}, gen));
    B = register_parameter("B", hesse::randn({2, 2}, gen));
  }
  hesse::Tensor forward(const std::vector<hesse::Tensor>& in) override {
    if (in.size() != 2) throw hesse::ValueError("MimoModel: takes two inputs (x, y), got " + std::to_string(in.size()));
    const hesse::Tensor& x = in[0];
    const hesse::Tensor& y = in[1];
    return hesse::hstack({hesse::trace(hesse::matmul(hesse::transpose(A), A)) * x,
                          hesse::trace(hesse::matmul(hesse::transpose(B), B)) * y});
  }
};

/// The seed README's model Hessian for inputs (x, -x): output entry [i, j] has
/// c·I₄ on A's block (j < 2, c = 2 x_ij) or on B's block (j >= 2, c = -2 x_i,j-2).
inline hesse::Tensor seed_readme_hessian(const hesse::Tensor& x) {
  hesse::Tensor h = hesse::zeros({2, 4, 8, 8});
  for (std::size_t i = 0; i < 2; ++i)
    for (std::size_t j = 0; j < 4; ++j) {
      const bool on_a = j < 2;
      const double c = on_a ? 2 * x.data()[i * 2 + j] : -2 * x.data()[i * 2 + (j - 2)];
      for (std::size_t d = 0; d < 4; ++d) {
        const std::size_t k = (on_a ? 0 : 4) + d;
        h.mutable_data()[((i * 4 + j) * 8 + k) * 8 + k] = c;
      }
    }
  return h;
}
