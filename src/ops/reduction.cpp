// Reductions. A reduced axis is remembered counted from the end, so a rule
// can find it again in a gradient that carries extra leading batch dims.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../detail.hpp"

namespace hesse {
namespace {

using detail::make;
using detail::record;

// Which axes a reduction sums (kept inline: sums run for every bias rule).
using AxisFlags = xt::svector<bool, 8>;

// Σ x[0..n), in four interleaved partial sums: a single running sum waits on
// each add (4 cycles), four keep the adder busy and let the loop vectorise.
double sum_run(const double* x, std::size_t n) {
  double lane[4] = {};
  std::size_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (std::size_t l = 0; l < 4; ++l) lane[l] += x[j + l];
  for (; j < n; ++j) lane[0] += x[j];
  return (lane[0] + lane[1]) + (lane[2] + lane[3]);
}

// out[a, c] += Σ_j in[a, j, c]; in and out never overlap (which spares the
// short rows of seed batches the overlap tests of vectorised loops). Rows of
// Inner > 0 values (a 2 × 2 weight's are 4) are summed with Inner fixed: a
// loop over c that short cost more in its set-up than in its additions.
template <std::size_t Inner = 0>
HESSE_AVX2_CLONE void sum_middle(const double* __restrict in, std::size_t outer, std::size_t mid,
                                 std::size_t inner, double* __restrict out) {
  if (Inner) inner = Inner;
  for (std::size_t a = 0; a < outer; ++a)
    for (std::size_t j = 0; j < mid; ++j) {
      const double* row = in + (a * mid + j) * inner;
      double* acc = out + a * inner;
      for (std::size_t c = 0; c < inner; ++c) acc[c] += row[c];
    }
}

void sum_middle_rows(const double* in, std::size_t outer, std::size_t mid, std::size_t inner, double* out) {
  switch (inner) {
    case 2: return sum_middle<2>(in, outer, mid, inner, out);
    case 4: return sum_middle<4>(in, outer, mid, inner, out);
    default: return sum_middle(in, outer, mid, inner, out);
  }
}

// Sum over the axes flagged in `reduce`; the result keeps every axis (size 1
// where reduced). Consecutive axes with the same flag are merged first so
// that the inner loops run over contiguous memory.
Tensor sum_kernel(const Tensor& x, const AxisFlags& reduce) {
  Shape kept = x.shape();
  for (std::size_t d = 0; d < kept.size(); ++d)
    if (reduce[d]) kept[d] = 1;
  Tensor out = zeros(kept);
  Shape dims;
  AxisFlags flags;
  for (std::size_t d = 0; d < x.ndim(); ++d) {
    if (x.shape()[d] == 1) continue;
    if (!dims.empty() && flags.back() == reduce[d]) dims.back() *= x.shape()[d];
    else dims.push_back(x.shape()[d]), flags.push_back(reduce[d]);
  }
  const double* in = x.data();
  double* o = out.mutable_data();
  if (dims.empty()) {
    if (x.numel() == 1) o[0] = in[0];
    return out;
  }
  // the common case after merging: [kept, reduced, kept] (a bias gradient with
  // seed batches in front), summed row by row
  if ((dims.size() == 2 || dims.size() == 3) && !flags.back() && flags[dims.size() - 2]) {
    sum_middle_rows(in, dims.size() == 3 ? dims[0] : 1, dims[dims.size() - 2], dims.back(), o);
    return out;
  }
  // strides of the merged input dims in the output (0 where reduced)
  Shape in_dims = dims, out_strides(dims.size(), 0);
  std::size_t stride = 1;
  for (std::size_t d = dims.size(); d-- > 0;) {
    if (!flags[d]) out_strides[d] = stride, stride *= dims[d];
  }
  const std::size_t n = dims.size();
  const std::size_t inner = dims[n - 1];
  Shape index(n, 0);
  std::size_t oo = 0;
  for (std::size_t i = 0, total = x.numel(); i < total; i += inner) {
    if (flags[n - 1]) {
      o[oo] += sum_run(in + i, inner);
    } else {
      for (std::size_t j = 0; j < inner; ++j) o[oo + j] += in[i + j];
    }
    for (std::size_t d = n - 1; d-- > 0;) {
      ++index[d];
      oo += out_strides[d];
      if (index[d] < in_dims[d]) break;
      oo -= out_strides[d] * in_dims[d];
      index[d] = 0;
    }
  }
  return out;
}

Shape drop_axes(const Shape& s, const AxisFlags& reduce) {
  Shape out;
  for (std::size_t d = 0; d < s.size(); ++d)
    if (!reduce[d]) out.push_back(s[d]);
  return out;
}

AxisFlags axes_mask(const char* op, const Tensor& x, const std::vector<int>& axes) {
  AxisFlags reduce(x.ndim(), false);
  for (int a : axes) {
    const std::size_t d = detail::normalize_axis(op, a, x.shape());
    if (reduce[d])
      throw IndexError(detail::message(op, "axis ", a, " is listed twice for shape ", to_string(x.shape())));
    reduce[d] = true;
  }
  return reduce;
}

// Splits x around one axis: [outer, n, inner].
struct AxisSplit {
  std::size_t outer, n, inner;
};
AxisSplit split_at(const Shape& s, std::size_t axis) {
  return {detail::prod(s, 0, axis), s[axis], detail::prod(s, axis + 1, s.size())};
}

Shape with_one_at(Shape s, std::size_t axis) {
  s[axis] = 1;
  return s;
}

// A gradient of a reduction's output, reshaped to the input's rank with size-1
// reduced axes (keeping its batch dims), so that it broadcasts over the input.
Tensor regrow(const Tensor& g, const Shape& output_shape, const Shape& kept_shape) {
  return reshape(g, detail::concat_shape(detail::batch_dims(g, output_shape), kept_shape));
}

// (Σ x)' = 1: the gradient is broadcast back over the reduced axes
Tensor sum_over(const Tensor& x, const AxisFlags& reduce, bool keepdim) {
  Tensor kept = sum_kernel(x, reduce);
  Tensor out = keepdim ? kept : detail::with_shape(kept, drop_axes(x.shape(), reduce));
  return record("sum", out, {x},
                [in = x.shape(), kept = kept.shape(), so = out.shape()](const Tensor& g, const Tensor&, Needs) {
                  const Shape batch = detail::batch_dims(g, so);
                  return std::vector<Tensor>{expand(regrow(g, so, kept), detail::concat_shape(batch, in))};
                });
}

}  // namespace

namespace detail {
Tensor reduce_grad(const Tensor& grad, const Shape& output_shape, const Shape& input_shape) {
  const Shape batch = batch_dims(grad, output_shape);
  const Shape target = concat_shape(batch, input_shape);
  if (grad.shape() == target) return grad;
  // The common case where nothing is recorded (the passes that take Hessian
  // rows): an input broadcast over leading dims only, a weight shared by a
  // batch or a bias. One pass sums them into the result, adding in the order
  // the general route below does; that route costs three tensors and shape work.
  const Shape& gs = grad.shape();
  const std::size_t inner = numel_of(input_shape), rest = gs.size() - input_shape.size();
  const std::size_t terms = prod(gs, batch.size(), rest);  // entries added into each result (1: a reshape does)
  if (inner > 1 && terms > 1 && !any_requires_grad({grad}) &&
      std::equal(input_shape.begin(), input_shape.end(), gs.begin() + std::ptrdiff_t(rest))) {
    Tensor out = zeros(target);
    sum_middle_rows(grad.data(), numel_of(batch), terms, inner, out.mutable_data());
    return out;
  }
  // sum the dims broadcasting added in front of the input, and those where it
  // had size 1; a dim of size 1 in the output needs no sum, only the reshape
  AxisFlags reduce(grad.ndim(), false);
  bool any = false;
  const std::size_t lead = output_shape.size() - input_shape.size();
  for (std::size_t d = 0; d < output_shape.size(); ++d)
    if (output_shape[d] != 1 && (d < lead || input_shape[d - lead] == 1)) {
      reduce[batch.size() + d] = true;
      any = true;
    }
  Tensor summed = any ? sum_over(grad, reduce, /*keepdim=*/true) : grad;
  return reshape(summed, target);
}
}  // namespace detail

Tensor sum(const Tensor& x, const std::vector<int>& axes, bool keepdim) {
  return sum_over(x, axes_mask("sum", x, axes), keepdim);
}

Tensor sum(const Tensor& x) { return sum_over(x, AxisFlags(x.ndim(), true), false); }

Tensor mean(const Tensor& x, const std::vector<int>& axes, bool keepdim) {
  const AxisFlags reduce = axes_mask("mean", x, axes);
  std::size_t count = 1;
  for (std::size_t d = 0; d < x.ndim(); ++d)
    if (reduce[d]) count *= x.shape()[d];
  return sum(x, axes, keepdim) / double(count);
}

Tensor mean(const Tensor& x) { return sum(x) / double(x.numel()); }

Tensor sum_to(const Tensor& x, const Shape& shape) {
  if (detail::broadcast_shapes("sum_to", shape, x.shape()) != x.shape() || shape.size() > x.ndim())
    throw ShapeError(detail::message("sum_to", "cannot sum shape ", to_string(x.shape()), " to shape ",
                                     to_string(shape)));
  return detail::reduce_grad(x, x.shape(), shape);
}

// logsumexp = m + log Σ e^(x - m);  d/dx = e^(x - logsumexp) = softmax(x)
Tensor logsumexp(const Tensor& x, int axis, bool keepdim) {
  const std::size_t ax = detail::normalize_axis("logsumexp", axis, x.shape());
  const auto [outer, n, inner] = split_at(x.shape(), ax);
  if (n == 0) throw ShapeError(detail::message("logsumexp", "axis ", axis, " of shape ", to_string(x.shape()), " is empty"));
  const Shape kept = with_one_at(x.shape(), ax);
  Tensor out = make(keepdim ? kept : drop_axes(x.shape(), axes_mask("logsumexp", x, {axis})));
  const double* in = x.data();
  double* o = out.mutable_data();
  for (std::size_t a = 0; a < outer; ++a)
    for (std::size_t c = 0; c < inner; ++c) {
      const double* base = in + a * n * inner + c;
      double m = -std::numeric_limits<double>::infinity();
      for (std::size_t j = 0; j < n; ++j) m = std::max(m, base[j * inner]);
      double s = 0.0;
      if (std::isinf(m)) {
        o[a * inner + c] = m;
        continue;
      }
      for (std::size_t j = 0; j < n; ++j) s += std::exp(base[j * inner] - m);
      o[a * inner + c] = m + std::log(s);
    }
  return record(
      "logsumexp", out, {x},
      [x, kept](const Tensor& g, const Tensor& out, Needs) {
        const Tensor lse = reshape(out, kept);
        return std::vector<Tensor>{regrow(g, out.shape(), kept) * exp(x - lse)};
      },
      true);
}

namespace {
// Index of the first maximum along the split axis, for each (outer, inner).
std::vector<std::size_t> argmax_kernel(const char* op, const Tensor& x, int axis, std::size_t ax) {
  const auto [outer, n, inner] = split_at(x.shape(), ax);
  if (n == 0) throw ShapeError(detail::message(op, "axis ", axis, " of shape ", to_string(x.shape()), " is empty"));
  std::vector<std::size_t> idx(outer * inner, 0);
  const double* in = x.data();
  for (std::size_t a = 0; a < outer; ++a)
    for (std::size_t c = 0; c < inner; ++c) {
      const double* base = in + a * n * inner + c;
      std::size_t best = 0;
      for (std::size_t j = 1; j < n; ++j)
        if (base[j * inner] > base[best * inner] || (std::isnan(base[j * inner]) && !std::isnan(base[best * inner])))
          best = j;
      idx[a * inner + c] = best;
    }
  return idx;
}
}  // namespace

// max' = 1 at the (first) maximum, 0 elsewhere
Tensor max(const Tensor& x, int axis, bool keepdim) {
  const std::size_t ax = detail::normalize_axis("max", axis, x.shape());
  const std::vector<std::size_t> idx = argmax_kernel("max", x, axis, ax);
  const auto [outer, n, inner] = split_at(x.shape(), ax);
  const Shape kept = with_one_at(x.shape(), ax);
  Tensor out = make(keepdim ? kept : drop_axes(x.shape(), axes_mask("max", x, {axis})));
  Tensor mask = zeros(x.shape());
  for (std::size_t a = 0; a < outer; ++a)
    for (std::size_t c = 0; c < inner; ++c) {
      const std::size_t at = a * n * inner + idx[a * inner + c] * inner + c;
      out.mutable_data()[a * inner + c] = x.data()[at];
      mask.mutable_data()[at] = 1.0;
    }
  return record("max", out, {x}, [mask, kept, so = out.shape()](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{regrow(g, so, kept) * mask};
  });
}

Tensor argmax(const Tensor& x, int axis, bool keepdim) {
  const std::size_t ax = detail::normalize_axis("argmax", axis, x.shape());
  const std::vector<std::size_t> idx = argmax_kernel("argmax", x, axis, ax);
  Tensor out = make(keepdim ? with_one_at(x.shape(), ax) : drop_axes(x.shape(), axes_mask("argmax", x, {axis})));
  for (std::size_t i = 0; i < idx.size(); ++i) out.mutable_data()[i] = double(idx[i]);
  return out;
}

}  // namespace hesse
