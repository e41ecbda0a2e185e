// The seed README's example in C++: the Hessian of a two-input model with
// respect to its parameter matrices, in full, for a subset, and for a loss.
//
//   f(x, y) = hstack(tr(AᵀA) x, tr(BᵀB) y)      A, B: 2×2 parameters
//
// Each output entry is tr(AᵀA)·x_ij = x_ij Σ A_kl² (or the same in B), so its
// Hessian is 2 x_ij I on one parameter's block and zero elsewhere.
#include <cmath>
#include <iostream>

#include <hesse/hesse.hpp>

#include "mimo_model.hpp"

using hesse::Tensor;

// The seed README's expected Hessian: blocks c·I₄ with c = 2·x_ij (±).
Tensor expected_hessian(const Tensor& x) {
  Tensor h = hesse::zeros({2, 4, 8, 8});
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

bool exactly_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return false;
  for (std::size_t i = 0; i < a.numel(); ++i)
    if (a.data()[i] != b.data()[i]) return false;
  return true;
}

int main() {
  hesse::manual_seed(0);
  MimoModel model;
  const Tensor x = Tensor{{1, 2}, {3, 4}};
  const Tensor y = -x;

  // 1. The full model Hessian: output [2, 4], n = 8 parameters -> [2, 4, 8, 8].
  const Tensor h = hesse::model_hessian_matrix(model, {x, y});
  std::cout << "model_hessian_matrix: shape " << hesse::to_string(h.shape()) << "\n";
  std::cout << "H[0, 0] (output entry x_00 = 1):\n" << hesse::slice(hesse::slice(h, 0, 0, 1), 1, 0, 1) << "\n";
  const bool exact = exactly_equal(h, expected_hessian(x));
  std::cout << "equals the seed README's blocks 2, 4, -2, -4 / 6, 8, -6, -8 times I4 exactly: "
            << (exact ? "yes" : "NO") << "\n\n";

  // 2. Only A's block: [2, 4, 4, 4].
  hesse::HessianOptions only_a;
  only_a.params = {"A"};
  const Tensor ha = hesse::model_hessian_matrix(model, {x, y}, only_a);
  std::cout << "params = {A}: shape " << hesse::to_string(ha.shape()) << "\n\n";

  // 3. The Hessian of an MSE (sum) loss against a random target: [8, 8].
  const Tensor target = hesse::randn({2, 4});
  auto mse_sum = [](const Tensor& out, const Tensor& t) { return hesse::sum(hesse::square(out - t)); };
  const Tensor hl = hesse::loss_hessian_matrix(model, mse_sum, {x, y}, target);
  std::cout << "loss_hessian_matrix (MSE, sum):\n" << hl << "\n";
  std::cout << "loss sharpness: " << hesse::loss_sharpness(model, mse_sum, {x, y}, target) << "\n";
  return exact && ha.shape() == hesse::Shape{2, 4, 4, 4} ? 0 : 1;
}
