#pragma once
// Every differentiable op (layer 3 of DESIGN.md). Forward and backward of each
// family live side by side in src/ops/<family>.cpp. Axes may be negative
// (counted from the end). Elementwise binary ops broadcast like NumPy.
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "hesse/autograd.hpp"
#include "hesse/tensor.hpp"

namespace hesse {

// ---- elementwise, binary (broadcasting) ----  src/ops/elementwise.cpp
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);

Tensor operator+(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& a, const Tensor& b);
Tensor operator*(const Tensor& a, const Tensor& b);
Tensor operator/(const Tensor& a, const Tensor& b);
Tensor operator+(const Tensor& a, double s);
Tensor operator+(double s, const Tensor& a);
Tensor operator-(const Tensor& a, double s);
Tensor operator-(double s, const Tensor& a);
Tensor operator*(const Tensor& a, double s);
Tensor operator*(double s, const Tensor& a);
Tensor operator/(const Tensor& a, double s);
Tensor operator/(double s, const Tensor& a);
Tensor operator-(const Tensor& a);

// ---- elementwise, unary ----  src/ops/elementwise.cpp
Tensor neg(const Tensor& x);
/// x^p for a scalar exponent p.
Tensor pow(const Tensor& x, double p);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor abs(const Tensor& x);
Tensor square(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor relu(const Tensor& x);
/// log(1 + e^x), computed stably.
Tensor softplus(const Tensor& x);
/// x Φ(x) with the exact normal CDF Φ (PyTorch's approximate='none').
Tensor gelu(const Tensor& x);
Tensor erf(const Tensor& x);
Tensor sin(const Tensor& x);
Tensor cos(const Tensor& x);

// ---- reductions ----  src/ops/reduction.cpp
Tensor sum(const Tensor& x);
Tensor sum(const Tensor& x, const std::vector<int>& axes, bool keepdim = false);
Tensor mean(const Tensor& x);
Tensor mean(const Tensor& x, const std::vector<int>& axes, bool keepdim = false);
/// log Σ exp(x) over one axis, stable for large entries.
Tensor logsumexp(const Tensor& x, int axis, bool keepdim = false);
/// Largest entry along an axis (the gradient goes to the first maximum).
Tensor max(const Tensor& x, int axis, bool keepdim = false);
/// Index of the first maximum along an axis (not differentiable).
Tensor argmax(const Tensor& x, int axis, bool keepdim = false);
/// Sums broadcast dimensions away so that x takes `shape` (the adjoint of expand).
Tensor sum_to(const Tensor& x, const Shape& shape);

// ---- linear algebra ----  src/ops/linalg.cpp
/// NumPy matmul: 1-D operands are promoted, leading dimensions broadcast.
/// An operand that is a temporary transpose(X) is read from X (no copy in the
/// graph), so matmul(transpose(A), B) costs what PyTorch's A.T @ B does.
Tensor matmul(Tensor a, Tensor b);
/// x Wᵀ + b (PyTorch's F.linear): x [..., in], W [out, in], b [out] or undefined.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor());
/// Sum of the diagonal of a matrix.
Tensor trace(const Tensor& x);
/// a bᵀ for vectors a, b.
Tensor outer(const Tensor& a, const Tensor& b);
/// aᵀ b for vectors of equal length.
Tensor dot(const Tensor& a, const Tensor& b);

// ---- shape ----  src/ops/shape.cpp
/// One dimension may be -1 (inferred).
Tensor reshape(const Tensor& x, const std::vector<std::int64_t>& shape);
Tensor reshape(const Tensor& x, std::initializer_list<std::int64_t> shape);
Tensor reshape(const Tensor& x, const Shape& shape);
/// Merges dimensions start..end (inclusive) into one.
Tensor flatten(const Tensor& x, int start = 0, int end = -1);
Tensor squeeze(const Tensor& x, int axis);
Tensor unsqueeze(const Tensor& x, int axis);
/// Swaps the last two dimensions (a 1-D tensor is returned as is).
Tensor transpose(const Tensor& x);
Tensor transpose(const Tensor& x, int axis0, int axis1);
/// Reorders the axes: out.shape[i] = x.shape[axes[i]].
Tensor permute(const Tensor& x, const std::vector<int>& axes);
/// Broadcasts x to `shape` (NumPy broadcast_to).
Tensor expand(const Tensor& x, const Shape& shape);
Tensor concatenate(const std::vector<Tensor>& xs, int axis = 0);
Tensor stack(const std::vector<Tensor>& xs, int axis = 0);
/// Concatenation along axis 1 (axis 0 for 1-D tensors), like numpy.hstack.
Tensor hstack(const std::vector<Tensor>& xs);
/// x[start:stop:step] along one axis; start and stop may be negative.
Tensor slice(const Tensor& x, int axis, std::int64_t start, std::int64_t stop, std::int64_t step = 1);
/// Entries `indices` along an axis.
Tensor index_select(const Tensor& x, int axis, const std::vector<std::int64_t>& indices);
/// out[..., j, ...] = x[..., index[..., j, ...], ...] along `axis`; index holds
/// integers and matches x's shape except along `axis`.
Tensor gather(const Tensor& x, int axis, const Tensor& index);

// ---- softmax family ----  src/ops/softmax.cpp
Tensor softmax(const Tensor& x, int axis);
Tensor log_softmax(const Tensor& x, int axis);

}  // namespace hesse
