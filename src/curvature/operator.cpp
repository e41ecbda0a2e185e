// LinearOperator: a block-apply function with its size and a product counter.
#include "hesse/curvature.hpp"
#include "../detail.hpp"

namespace hesse {

struct LinearOperator::State {
  std::size_t n;
  BlockApply apply;
  std::string name;
  std::size_t products = 0;
};

LinearOperator::LinearOperator(std::size_t n, BlockApply apply, std::string name)
    : state_(std::make_shared<State>(State{n, std::move(apply), std::move(name)})) {
  if (!state_->apply) throw ValueError(detail::message("LinearOperator", "'", state_->name, "' has no apply function"));
}

std::size_t LinearOperator::size() const { return state_ ? state_->n : 0; }

const std::string& LinearOperator::name() const {
  static const std::string none = "undefined operator";
  return state_ ? state_->name : none;
}

std::size_t LinearOperator::products() const { return state_ ? state_->products : 0; }

Tensor LinearOperator::operator()(const Tensor& v) const {
  if (!state_) throw ValueError("hesse::LinearOperator: applying an undefined operator");
  const std::size_t n = state_->n;
  if (!v.defined() || v.ndim() == 0 || v.ndim() > 2 || v.shape().back() != n || (v.ndim() == 2 && v.shape()[0] == 0))
    throw ShapeError(detail::message("LinearOperator", "'", state_->name, "' of size ", n, " applies to [", n,
                                     "] or [k, ", n, "], got ", v.defined() ? to_string(v.shape()) : "undefined"));
  const bool single = v.ndim() == 1;
  const Tensor block = single ? reshape(v, Shape{1, n}) : v;
  Tensor out;
  {
    NoGradGuard no_record;  // products are values, never part of a user's graph
    out = state_->apply(block);
  }
  if (!out.defined() || out.shape() != block.shape())
    throw ShapeError(detail::message("LinearOperator", "'", state_->name, "' returned ",
                                     out.defined() ? to_string(out.shape()) : "undefined", " for a block of shape ",
                                     to_string(block.shape())));
  state_->products += block.shape()[0];
  return single ? reshape(out, Shape{n}) : out;
}

LinearOperator matrix_operator(const Tensor& matrix) {
  if (!matrix.defined() || matrix.ndim() != 2 || matrix.shape()[0] != matrix.shape()[1])
    throw ShapeError(detail::message("matrix_operator", "needs a square matrix [n, n], got ",
                                     matrix.defined() ? to_string(matrix.shape()) : "undefined"));
  const Tensor a = matrix.detach();
  // rows of V times A (symmetric, so V Aᵀ = V A): one GEMM per block
  return LinearOperator(a.shape()[0], [a](const Tensor& block) { return matmul(block, a); }, "matrix");
}

Tensor to_dense(const LinearOperator& op, std::size_t block) {
  const std::size_t n = op.size();
  if (block == 0) throw ValueError("hesse::to_dense: block must be positive");
  Tensor out = zeros({n, n});
  for (std::size_t r0 = 0; r0 < n; r0 += block) {
    const std::size_t k = std::min(block, n - r0);
    Tensor seeds = zeros({k, n});
    for (std::size_t i = 0; i < k; ++i) seeds.mutable_data()[i * n + r0 + i] = 1.0;
    const Tensor rows = op(seeds);
    std::copy(rows.data(), rows.data() + k * n, out.mutable_data() + r0 * n);
  }
  return out;
}

}  // namespace hesse
