// The seed README's example in C++: the Hessian of a two-input model with
// respect to its parameter matrices, in full, for a subset, and for a loss.
//
//   f(x, y) = hstack(tr(AᵀA) x, tr(BᵀB) y)      A, B: 2×2 parameters
//
// Each output entry is tr(AᵀA)·x_ij = x_ij Σ A_kl² (or the same in B), so its
// Hessian is 2 x_ij I on one parameter's block and zero elsewhere.
#include <algorithm>
#include <cmath>
#include <iostream>

#include <hesse/hesse.hpp>

#include "mimo_model.hpp"

using hesse::Tensor;

bool exactly_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return false;
  for (std::size_t i = 0; i < a.numel(); ++i)
    if (a.data()[i] != b.data()[i]) return false;
  return true;
}

// Equal up to rounding: max |a - b| <= 1e-12 max |b|.
bool close(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return false;
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.numel(); ++i) {
    diff = std::max(diff, std::abs(a.data()[i] - b.data()[i]));
    scale = std::max(scale, std::abs(b.data()[i]));
  }
  return diff <= 1e-12 * scale;
}

int main() {
  hesse::manual_seed(0);
  MimoModel model;
  const Tensor x = Tensor{{1, 2}, {3, 4}};
  const Tensor y = -x;

  // 1. The full model Hessian: output [2, 4], n = 8 parameters (A then B) -> [2, 4, 8, 8].
  const Tensor h = hesse::model_hessian_matrix(model, {x, y});
  std::cout << "model_hessian_matrix: shape " << hesse::to_string(h.shape()) << "\n";
  std::cout << "each output entry's Hessian is c * I4 on one block (entry [i, j] below is c):\n";
  for (std::size_t i = 0; i < 2; ++i) {
    for (std::size_t j = 0; j < 4; ++j) {
      const std::size_t k = j < 2 ? 0 : 4;  // first row of A's block, or of B's
      std::cout << "  " << h.data()[((i * 4 + j) * 8 + k) * 8 + k] << (j < 2 ? " (A)" : " (B)");
    }
    std::cout << "\n";
  }
  std::cout << "H[0, 0] in full:\n" << hesse::reshape(hesse::slice(hesse::reshape(h, {8, 8, 8}), 0, 0, 1), {8, 8})
            << "\n";
  const bool exact = exactly_equal(h, seed_readme_hessian(x));
  std::cout << "equals the seed README's blocks 2, 4, -2, -4 / 6, 8, -6, -8 times I4 exactly: "
            << (exact ? "yes" : "NO") << "\n\n";

  // 2. Only A's block: [2, 4, 4, 4]; the dict form keys blocks by name pairs.
  hesse::HessianOptions only_a;
  only_a.params = {"A"};
  const Tensor ha = hesse::model_hessian_matrix(model, {x, y}, only_a);
  const bool reduced = exactly_equal(ha, hesse::slice(hesse::slice(h, 2, 0, 4), 3, 0, 4));
  std::cout << "params = {A}: shape " << hesse::to_string(ha.shape())
            << ", equals the full Hessian's A block exactly: " << (reduced ? "yes" : "NO") << "\n";
  const hesse::HessianDict blocks = hesse::model_hessian_dict(model, {x, y});
  const bool uncoupled = hesse::sum(hesse::abs(blocks("A", "B"))).item() == 0;
  std::cout << "dict block (A, B): shape " << hesse::to_string(blocks("A", "B").shape())
            << ", all zero: " << (uncoupled ? "yes" : "NO") << "\n\n";

  // 3. The Hessian of an MSE (sum) loss against a random target: [8, 8].
  const Tensor target = hesse::randn({2, 4});
  const hesse::nn::MSELoss mse_sum(hesse::nn::Reduction::sum);
  const Tensor hl = hesse::loss_hessian_matrix(model, mse_sum, {x, y}, target);
  std::cout << "loss_hessian_matrix (MSE, sum):\n" << hl << "\n";
  std::cout << "loss sharpness: " << hesse::loss_sharpness(model, mse_sum, {x, y}, target) << "\n";

  // By hand: entry e of A's half is f_e = s u_e with s = tr(AᵀA) = a·a (a = A flattened) and u = x,
  // so ∇f_e = 2 u_e a and ∇²f_e = 2 u_e I4, and H = 2 Σ_e (∇f_e ∇f_eᵀ + (f_e - t_e) ∇²f_e) has
  // A's block 8 (u·u) a aᵀ + 4 (s u·u - t·u) I4, t the target's columns 0, 1. B's block is alike
  // (u = y, columns 2, 3); no entry depends on both, so the A-B blocks are zero.
  const auto block = [](const Tensor& p, const Tensor& u, const Tensor& t) {
    const Tensor a = hesse::flatten(p.detach());
    const double uu = hesse::sum(u * u).item(), s = hesse::dot(a, a).item(), tu = hesse::sum(t * u).item();
    return 8 * uu * hesse::outer(a, a) + 4 * (s * uu - tu) * hesse::eye(4);
  };
  const Tensor zero = hesse::zeros({4, 4});
  const Tensor by_hand = hesse::concatenate(
      {hesse::hstack({block(model.A, x, hesse::slice(target, 1, 0, 2)), zero}),
       hesse::hstack({zero, block(model.B, y, hesse::slice(target, 1, 2, 4))})});
  // Not bit for bit: hesse adds the same terms in another order, so the last bits may differ.
  const bool loss_ok = close(hl, by_hand);
  std::cout << "equals 8 (u.u) a a^T + 4 (s u.u - t.u) I4 on each block, to 1e-12 relative: "
            << (loss_ok ? "yes" : "NO") << "\n";
  hesse::save_npy("mimo_model_hessian.npy", h);  // numpy: np.load("mimo_model_hessian.npy").shape == (2, 4, 8, 8)
  return exact && ha.shape() == hesse::Shape{2, 4, 4, 4} && reduced && uncoupled && loss_ok ? 0 : 1;
}

// Expected output:
//   model_hessian_matrix: shape [2, 4, 8, 8]
//   each output entry's Hessian is c * I4 on one block (entry [i, j] below is c):
//     2 (A)  4 (A)  -2 (B)  -4 (B)
//     6 (A)  8 (A)  -6 (B)  -8 (B)
//   H[0, 0] in full:
//   tensor([[2, 0, 0, 0, 0, 0, 0, 0],
//           [0, 2, 0, 0, 0, 0, 0, 0],
//           [0, 0, 2, 0, 0, 0, 0, 0],
//           [0, 0, 0, 2, 0, 0, 0, 0],
//           [0, 0, 0, 0, 0, 0, 0, 0],
//           [0, 0, 0, 0, 0, 0, 0, 0],
//           [0, 0, 0, 0, 0, 0, 0, 0],
//           [0, 0, 0, 0, 0, 0, 0, 0]])
//   equals the seed README's blocks 2, 4, -2, -4 / 6, 8, -6, -8 times I4 exactly: yes
//   
//   params = {A}: shape [2, 4, 4, 4], equals the full Hessian's A block exactly: yes
//   dict block (A, B): shape [2, 4, 2, 2, 2, 2], all zero: yes
//   
//   loss_hessian_matrix (MSE, sum):
//   tensor([[ 652.575, -16.6479, -26.8116,  45.1244,        0,        0,        0,        0],
//           [-16.6479,  761.255,  179.045, -301.337,        0,        0,        0,        0],
//           [-26.8116,  179.045,  938.436, -485.306,        0,        0,        0,        0],
//           [ 45.1244, -301.337, -485.306,  1466.86,        0,        0,        0,        0],
//           [       0,        0,        0,        0,  478.748,  17.6921,  -32.392,  84.8008],
//           [       0,        0,        0,        0,  17.6921,  500.846, -58.4185,  152.937],
//           [       0,        0,        0,        0,  -32.392, -58.4185,  575.895, -280.008],
//           [       0,        0,        0,        0,  84.8008,  152.937, -280.008,  1201.99]])
//   loss sharpness: 1868.88
//   equals 8 (u.u) a a^T + 4 (s u.u - t.u) I4 on each block, to 1e-12 relative: yes
//   (and mimo_model_hessian.npy in the current folder)
