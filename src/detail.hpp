#pragma once
// Internal helpers shared by the library's sources (not installed).
#include <sstream>
#include <string>
#include <vector>

#include <xtensor/xadapt.hpp>

#include "hesse/autograd.hpp"
#include "hesse/ops.hpp"
#include "hesse/tensor.hpp"

namespace hesse::detail {

/// Destroys a node without recursion: a chain of 100,000 nodes would
/// otherwise overflow the stack through nested destructors.
void release_node(std::shared_ptr<Node>&& node);
/// A value for Node::epoch no pass or walk has used: marks a traversal's visits.
std::uint64_t new_epoch();
/// The sequence number the next recorded node will get (nodes are numbered in creation order).
std::uint64_t next_node_sequence();

/// A fresh tensor with pooled, uninitialised storage.
inline Tensor make(const Shape& shape) { return Tensor::empty(shape); }

// Per-thread state read by every op: initial-exec TLS is a fixed offset from
// the thread pointer, not a call to __tls_get_addr per access (hesse's
// thread-locals are a few hundred bytes of static TLS).
#define HESSE_FAST_TLS __attribute__((tls_model("initial-exec")))

// Hot loops of plain arithmetic get a copy for AVX2 machines, picked at load
// time through an ifunc (GCC with glibc; other builds get the plain loop).
// The library is built with -ffp-contract=off: both copies round alike. For
// functions of internal linkage only: the ifunc is not meant to be exported.
// Not under ThreadSanitizer, whose runtime is not up yet when ifuncs resolve.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) && \
    !defined(__SANITIZE_THREAD__)
#define HESSE_AVX2_CLONE __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HESSE_AVX2_CLONE
#endif

/// True when no other tensor shares t's TensorImpl or its buffer: its values
/// may then be taken or overwritten in place.
inline bool held_alone(const Tensor& t) { return t.impl().use_count() == 1 && t.impl()->storage.use_count() == 1; }

/// std::make_shared with the object and its count in a recycled block.
template <class T, class... Args>
std::shared_ptr<T> make_cached(Args&&... args) {
  return std::allocate_shared<T>(BlockAllocator<T>(), std::forward<Args>(args)...);
}

/// A tensor whose values fill(operands, out) computes on first access, for a
/// result that may never be read (a gradient whose graph alone is used). Until
/// then it holds the operands' values (not their graphs); a write to an operand
/// computes it first. Worth it only where fill is costly (a large product).
Tensor deferred(const Shape& shape, const std::vector<Tensor>& operands,
                std::function<void(const std::vector<Tensor>& operands, double* out)> fill);

/// The same storage under another shape of equal size (nothing recorded).
inline Tensor with_shape(const Tensor& t, const Shape& shape) {
  auto impl = make_cached<TensorImpl>();
  impl->shape = shape;
  impl->numel = t.numel();
  impl->storage = t.impl()->storage;
  impl->offset = t.impl()->offset;
  return Tensor(std::move(impl));
}

/// A read-only xtensor view of a tensor's storage.
inline auto view(const Tensor& t) {
  return xt::adapt(t.data(), t.numel(), xt::no_ownership(), t.shape());
}
inline auto view_mut(Tensor& t) {
  return xt::adapt(t.mutable_data(), t.numel(), xt::no_ownership(), t.shape());
}

/// Normalises a possibly negative axis of an ndim-dimensional tensor.
std::size_t normalize_axis(const char* op, int axis, std::size_t ndim);
/// The same for an axis of a tensor of this shape (named in the message).
std::size_t normalize_axis(const char* op, int axis, const Shape& shape);

/// The NumPy broadcast of two shapes, or a ShapeError naming the op.
Shape broadcast_shapes(const char* op, const Shape& a, const Shape& b);

/// "[2, 3]" for messages.
inline std::string str(const Shape& s) { return to_string(s); }

template <class... Parts>
std::string message(const char* op, const Parts&... parts) {
  std::ostringstream os;
  os << "hesse::" << op << ": ";
  (os << ... << parts);
  return os.str();
}

/// Product of shape[begin, end).
inline std::size_t prod(const Shape& s, std::size_t begin, std::size_t end) {
  std::size_t p = 1;
  for (std::size_t i = begin; i < end; ++i) p *= s[i];
  return p;
}

/// The leading dimensions a batched gradient carries beyond an op's output.
inline Shape batch_dims(const Tensor& grad, const Shape& output_shape) {
  return Shape(grad.shape().begin(), grad.shape().end() - static_cast<std::ptrdiff_t>(output_shape.size()));
}

/// batch + shape
inline Shape concat_shape(const Shape& batch, const Shape& shape) {
  Shape out = batch;
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

/// Sums a (possibly batched) gradient back to an input's shape, keeping the
/// gradient's leading batch dimensions.
Tensor reduce_grad(const Tensor& grad, const Shape& output_shape, const Shape& input_shape);

/// dst[c][r] = src[r][c] for a rows × cols matrix; rows are src_stride and
/// dst_stride elements apart (linalg.cpp).
void transpose_into(const double* src, std::size_t src_stride, std::size_t rows, std::size_t cols, double* dst,
                    std::size_t dst_stride);
/// dst[i] = src[i]ᵀ for `batches` contiguous row-major rows × cols matrices.
void transpose_each(const double* src, std::size_t batches, std::size_t rows, std::size_t cols, double* dst);

}  // namespace hesse::detail

namespace hesse::detail {

/// Strides (in elements) of a row-major tensor of shape `in` read as if it had
/// been broadcast to `out`: 0 along broadcast dimensions.
inline Shape broadcast_strides(const Shape& in, const Shape& out) {
  Shape strides(out.size(), 0);
  std::size_t stride = 1;
  for (std::size_t k = 0; k < in.size(); ++k) {
    const std::size_t i = in.size() - 1 - k, o = out.size() - 1 - k;
    strides[o] = in[i] == 1 ? 0 : stride;
    stride *= in[i];
  }
  return strides;
}

/// Calls f(out_offset, a_offset, b_offset) for every element of `out` in
/// row-major order, with a and b read through broadcast strides.
template <class F>
void for_each_broadcast(const Shape& out, const Shape& sa, const Shape& sb, F&& f) {
  const std::size_t n = out.size();
  const std::size_t total = numel_of(out);
  if (total == 0) return;
  if (n == 0) {
    f(0, 0, 0);
    return;
  }
  const std::size_t inner = out[n - 1], ia = sa[n - 1], ib = sb[n - 1];
  Shape index(n, 0);
  std::size_t oa = 0, ob = 0;
  for (std::size_t o = 0; o < total; o += inner) {
    for (std::size_t j = 0; j < inner; ++j) f(o + j, oa + j * ia, ob + j * ib);
    for (std::size_t d = n - 1; d-- > 0;) {  // odometer over the outer dims
      ++index[d];
      oa += sa[d];
      ob += sb[d];
      if (index[d] < out[d]) break;
      oa -= sa[d] * out[d];
      ob -= sb[d] * out[d];
      index[d] = 0;
    }
  }
}

}  // namespace hesse::detail
