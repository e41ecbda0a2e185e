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
