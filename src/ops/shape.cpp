// Shape ops: reshape, expand, permute, concatenation, slicing, indexing.
// Axes that rules need are kept counted from the end (negative), so that a
// gradient with extra leading batch dims finds the same axis.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "../detail.hpp"

namespace hesse {
namespace {

using detail::make;
using detail::message;
using detail::record;
using IndexList = std::shared_ptr<const std::vector<std::size_t>>;

// Positions along an axis: the range start, start + step, ... (slices), or an
// explicit list (index_select).
struct Positions {
  std::size_t start = 0, step = 1, count = 0;
  IndexList list;
  std::size_t size() const { return list ? list->size() : count; }
  std::size_t operator[](std::size_t j) const { return list ? (*list)[j] : start + j * step; }
  bool contiguous() const { return !list && step == 1; }
};

// axis counted from the end of a tensor with `ndim` dims -> axis from the front
std::size_t from_end(int axis_from_end, std::size_t ndim) {
  return static_cast<std::size_t>(static_cast<int>(ndim) + axis_from_end);
}

struct AxisSplit {
  std::size_t outer, n, inner;
};
AxisSplit split_at(const Shape& s, std::size_t axis) {
  return {detail::prod(s, 0, axis), s[axis], detail::prod(s, axis + 1, s.size())};
}

Tensor select_positions(const char* op, const Tensor& x, int axis_from_end, Positions pos);
Tensor add_at_positions(const Tensor& g, int axis_from_end, Positions pos, std::size_t length);

// out[.., j, ..] = x[.., pos[j], ..]; its adjoint adds g back at pos
Tensor select_positions(const char* op, const Tensor& x, int axis_from_end, Positions pos) {
  const std::size_t ax = from_end(axis_from_end, x.ndim());
  const auto [outer, n, inner] = split_at(x.shape(), ax);
  Shape shape = x.shape();
  const std::size_t m = pos.size();
  shape[ax] = m;
  if (outer == 1 && pos.contiguous()) {  // one contiguous run: share x's storage, copy nothing
    auto impl = detail::make_cached<detail::TensorImpl>();
    impl->shape = shape;
    impl->numel = m * inner;
    impl->storage = x.impl()->storage;
    impl->offset = x.impl()->offset + pos.start * inner;
    return record(op, Tensor(std::move(impl)), {x}, [axis_from_end, pos, n](const Tensor& g, const Tensor&, Needs) {
      return std::vector<Tensor>{add_at_positions(g, axis_from_end, pos, n)};
    });
  }
  Tensor out = make(shape);
  const double* in = x.data();
  double* o = out.mutable_data();
  for (std::size_t a = 0; a < outer; ++a) {
    if (pos.contiguous()) {
      std::memcpy(o + a * m * inner, in + (a * n + pos.start) * inner, m * inner * sizeof(double));
      continue;
    }
    for (std::size_t j = 0; j < m; ++j)
      std::memcpy(o + (a * m + j) * inner, in + (a * n + pos[j]) * inner, inner * sizeof(double));
  }
  return record(op, out, {x}, [axis_from_end, pos, n](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{add_at_positions(g, axis_from_end, pos, n)};
  });
}

Tensor add_at_positions(const Tensor& g, int axis_from_end, Positions pos, std::size_t length) {
  const std::size_t ax = from_end(axis_from_end, g.ndim());
  const auto [outer, m, inner] = split_at(g.shape(), ax);
  Shape shape = g.shape();
  shape[ax] = length;
  Tensor out = zeros(shape);
  const double* in = g.data();
  double* o = out.mutable_data();
  for (std::size_t a = 0; a < outer; ++a)
    for (std::size_t j = 0; j < m; ++j) {
      double* dst = o + (a * length + pos[j]) * inner;
      const double* src = in + (a * m + j) * inner;
      for (std::size_t c = 0; c < inner; ++c) dst[c] += src[c];
    }
  return record("index_add", out, {g}, [axis_from_end, pos](const Tensor& gg, const Tensor&, Needs) {
    return std::vector<Tensor>{select_positions("index_select", gg, axis_from_end, pos)};
  });
}

int axis_from_end_of(std::size_t axis, std::size_t ndim) { return static_cast<int>(axis) - static_cast<int>(ndim); }

// gather / scatter_add with `x` allowed extra leading dims over which `index` broadcasts
Tensor scatter_add_rec(const Tensor& g, int axis_from_end, const Tensor& index, IndexList idx, std::size_t length);

Tensor gather_rec(const Tensor& x, int axis_from_end, const Tensor& index, IndexList idx) {
  const std::size_t lead = x.ndim() - index.ndim();
  const std::size_t ax = from_end(axis_from_end, x.ndim());
  const auto [outer_i, m, inner] = split_at(index.shape(), ax - lead);
  const std::size_t n = x.shape()[ax];
  const std::size_t lead_n = detail::prod(x.shape(), 0, lead);
  Shape shape(x.shape().begin(), x.shape().begin() + static_cast<std::ptrdiff_t>(lead));
  shape.insert(shape.end(), index.shape().begin(), index.shape().end());
  Tensor out = make(shape);
  const double* in = x.data();
  double* o = out.mutable_data();
  const std::size_t per_lead_in = outer_i * n * inner, per_lead_out = index.numel();
  for (std::size_t l = 0; l < lead_n; ++l)
    for (std::size_t a = 0; a < outer_i; ++a)
      for (std::size_t j = 0; j < m; ++j)
        for (std::size_t c = 0; c < inner; ++c) {
          const std::size_t at = (a * m + j) * inner + c;
          o[l * per_lead_out + at] = in[l * per_lead_in + (a * n + (*idx)[at]) * inner + c];
        }
  return record("gather", out, {x}, [axis_from_end, index, idx, n](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{scatter_add_rec(g, axis_from_end, index, idx, n)};
  });
}

Tensor scatter_add_rec(const Tensor& g, int axis_from_end, const Tensor& index, IndexList idx, std::size_t length) {
  const std::size_t lead = g.ndim() - index.ndim();
  const std::size_t ax = from_end(axis_from_end, g.ndim());
  const auto [outer_i, m, inner] = split_at(index.shape(), ax - lead);
  Shape shape = g.shape();
  shape[ax] = length;
  Tensor out = zeros(shape);
  const std::size_t lead_n = detail::prod(g.shape(), 0, lead);
  const double* in = g.data();
  double* o = out.mutable_data();
  const std::size_t per_lead_out = outer_i * length * inner, per_lead_in = index.numel();
  for (std::size_t l = 0; l < lead_n; ++l)
    for (std::size_t a = 0; a < outer_i; ++a)
      for (std::size_t j = 0; j < m; ++j)
        for (std::size_t c = 0; c < inner; ++c) {
          const std::size_t at = (a * m + j) * inner + c;
          o[l * per_lead_out + (a * length + (*idx)[at]) * inner + c] += in[l * per_lead_in + at];
        }
  return record("scatter_add", out, {g}, [axis_from_end, index, idx](const Tensor& gg, const Tensor&, Needs) {
    return std::vector<Tensor>{gather_rec(gg, axis_from_end, index, idx)};
  });
}

}  // namespace

// ---- reshape family: same storage, new shape; the gradient is reshaped back ----

Tensor reshape(const Tensor& x, const Shape& shape) {
  if (numel_of(shape) != x.numel())
    throw ShapeError(message("reshape", "cannot reshape ", to_string(x.shape()), " (", x.numel(), " elements) to ",
                             to_string(shape)));
  if (shape == x.shape()) return x;
  Tensor out = detail::with_shape(x, shape);
  return record("reshape", out, {x}, [in = x.shape(), shape](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{reshape(g, detail::concat_shape(detail::batch_dims(g, shape), in))};
  });
}

Tensor reshape(const Tensor& x, const std::vector<std::int64_t>& dims) {
  Shape shape;
  std::size_t known = 1;
  int infer = -1;
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] == -1 && infer < 0) {
      infer = int(i);
      shape.push_back(1);
    } else if (dims[i] < 0) {
      throw ShapeError(message("reshape", "invalid dimension ", dims[i], " (only one -1 is allowed) for shape ",
                               to_string(x.shape())));
    } else {
      shape.push_back(std::size_t(dims[i]));
      known *= std::size_t(dims[i]);
    }
  }
  if (infer >= 0) {
    if (known == 0 || x.numel() % known != 0)
      throw ShapeError(message("reshape", "cannot infer -1 reshaping ", to_string(x.shape()), " with ",
                               x.numel(), " elements"));
    shape[std::size_t(infer)] = x.numel() / known;
  }
  return reshape(x, shape);
}

Tensor reshape(const Tensor& x, std::initializer_list<std::int64_t> shape) {
  return reshape(x, std::vector<std::int64_t>(shape));
}

Tensor flatten(const Tensor& x, int start, int end) {
  // a 0-d tensor flattens to [1]; its axes are checked as if it had one dimension (like PyTorch)
  const std::size_t s = detail::normalize_axis("flatten", start, std::max<std::size_t>(x.ndim(), 1));
  const std::size_t e = detail::normalize_axis("flatten", end, std::max<std::size_t>(x.ndim(), 1));
  if (x.ndim() == 0) return reshape(x, Shape{1});
  if (s > e)
    throw IndexError(message("flatten", "start axis ", start, " comes after end axis ", end, " for shape ",
                             to_string(x.shape())));
  Shape shape(x.shape().begin(), x.shape().begin() + std::ptrdiff_t(s));
  shape.push_back(detail::prod(x.shape(), s, e + 1));
  shape.insert(shape.end(), x.shape().begin() + std::ptrdiff_t(e + 1), x.shape().end());
  return reshape(x, shape);
}

Tensor squeeze(const Tensor& x, int axis) {
  const std::size_t ax = detail::normalize_axis("squeeze", axis, x.shape());
  if (x.shape()[ax] != 1)
    throw ShapeError(message("squeeze", "axis ", axis, " of shape ", to_string(x.shape()), " has size ",
                             x.shape()[ax], ", not 1"));
  Shape shape = x.shape();
  shape.erase(shape.begin() + std::ptrdiff_t(ax));
  return reshape(x, shape);
}

Tensor unsqueeze(const Tensor& x, int axis) {
  const std::size_t ax = detail::normalize_axis("unsqueeze", axis, x.ndim() + 1);
  Shape shape;  // (svector::insert of a single value trips GCC's -Warray-bounds)
  for (std::size_t d = 0; d <= x.ndim(); ++d) {
    if (d == ax) shape.push_back(1);
    if (d < x.ndim()) shape.push_back(x.shape()[d]);
  }
  return reshape(x, shape);
}

// ---- expand: copy along broadcast dims; the adjoint sums them ----

Tensor expand(const Tensor& x, const Shape& shape) {
  if (shape.size() < x.ndim() || detail::broadcast_shapes("expand", x.shape(), shape) != shape)
    throw ShapeError(message("expand", "cannot broadcast shape ", to_string(x.shape()), " to ", to_string(shape)));
  if (shape == x.shape()) return x;
  Tensor out = make(shape);
  const double* in = x.data();
  double* o = out.mutable_data();
  detail::for_each_broadcast(shape, detail::broadcast_strides(x.shape(), shape), Shape(shape.size(), 0),
                             [&](std::size_t io, std::size_t ia, std::size_t) { o[io] = in[ia]; });
  return record("expand", out, {x}, [in = x.shape(), shape](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{detail::reduce_grad(g, shape, in)};
  });
}

// ---- permute: the adjoint applies the inverse permutation ----

namespace {

// Axis i of the result is axis perm[i] of x (perm checked by the callers).
// Shapes hold the permutation: no heap allocation for up to six dims.
Tensor permuted(const Tensor& x, const Shape& perm) {
  const std::size_t n = x.ndim();
  bool identity = true;
  for (std::size_t i = 0; i < n; ++i) identity = identity && perm[i] == i;
  if (identity) return x;
  Shape in_strides(n, 1), shape(n), strides(n);
  for (std::size_t d = n - 1; d-- > 0;) in_strides[d] = in_strides[d + 1] * x.shape()[d + 1];
  for (std::size_t i = 0; i < n; ++i) shape[i] = x.shape()[perm[i]], strides[i] = in_strides[perm[i]];
  Tensor out = make(shape);
  const double* in = x.data();
  double* o = out.mutable_data();
  bool matrix_transposes = perm[n - 1] == n - 2 && perm[n - 2] == n - 1;  // the common case: transpose()
  for (std::size_t i = 0; i + 2 < n; ++i) matrix_transposes = matrix_transposes && perm[i] == i;
  if (matrix_transposes) {
    const std::size_t rows = x.shape()[n - 2], cols = x.shape()[n - 1];
    if (rows * cols > 0) detail::transpose_each(in, x.numel() / (rows * cols), rows, cols, o);
  } else {
    detail::for_each_broadcast(shape, strides, Shape(n, 0),
                               [&](std::size_t io, std::size_t ia, std::size_t) { o[io] = in[ia]; });
  }
  // the adjoint is the inverse permutation; a gradient's leading batch dims stay in front
  Tensor result = record("permute", out, {x}, [perm](const Tensor& g, const Tensor&, Needs) {
    const std::size_t b = g.ndim() - perm.size();
    Shape inverse(g.ndim());
    for (std::size_t i = 0; i < b; ++i) inverse[i] = i;
    for (std::size_t i = 0; i < perm.size(); ++i) inverse[b + perm[i]] = b + i;
    return std::vector<Tensor>{permuted(g, inverse)};
  });
  if (matrix_transposes && result.grad_fn())
    result.grad_fn()->transposed_from = {x.impl(), x.impl()->storage->writes(), result.impl()->storage->writes()};
  return result;
}

}  // namespace

Tensor permute(const Tensor& x, const std::vector<int>& axes) {
  const std::size_t n = x.ndim();
  if (axes.size() != n)
    throw ShapeError(message("permute", axes.size(), " axes given for a tensor of shape ", to_string(x.shape())));
  Shape perm(n);
  Shape seen(n, 0);
  for (std::size_t i = 0; i < n; ++i) {
    perm[i] = detail::normalize_axis("permute", axes[i], n);
    if (seen[perm[i]]++)
      throw IndexError(message("permute", "axis ", axes[i], " is repeated for a tensor of shape ", to_string(x.shape())));
  }
  return permuted(x, perm);
}

Tensor transpose(const Tensor& x, int axis0, int axis1) {
  const std::size_t a = detail::normalize_axis("transpose", axis0, x.shape());
  const std::size_t b = detail::normalize_axis("transpose", axis1, x.shape());
  Shape perm(x.ndim());
  std::iota(perm.begin(), perm.end(), std::size_t(0));
  std::swap(perm[a], perm[b]);
  return permuted(x, perm);
}

Tensor transpose(const Tensor& x) { return x.ndim() < 2 ? x : transpose(x, -2, -1); }

// ---- concatenation: the adjoint slices the gradient into pieces ----

Tensor concatenate(const std::vector<Tensor>& xs, int axis) {
  if (xs.empty()) throw ValueError("hesse::concatenate: no tensors given");
  const Shape& first = xs[0].shape();
  if (first.empty()) throw ShapeError("hesse::concatenate: cannot concatenate 0-d tensors");
  const std::size_t ax = detail::normalize_axis("concatenate", axis, first.size());
  Shape shape = first;
  shape[ax] = 0;
  for (const Tensor& t : xs) {
    Shape s = t.shape();
    bool fits = s.size() == first.size();
    for (std::size_t d = 0; fits && d < s.size(); ++d) fits = d == ax || s[d] == first[d];
    if (!fits)
      throw ShapeError(message("concatenate", "shapes ", to_string(first), " and ", to_string(s),
                               " differ outside axis ", axis));
    shape[ax] += s[ax];
  }
  Tensor out = make(shape);
  const std::size_t outer = detail::prod(shape, 0, ax), inner = detail::prod(shape, ax + 1, shape.size());
  double* o = out.mutable_data();
  for (std::size_t a = 0; a < outer; ++a)
    for (const Tensor& t : xs) {
      const std::size_t block = t.shape()[ax] * inner;
      std::memcpy(o, t.data() + a * block, block * sizeof(double));
      o += block;
    }
  std::vector<std::size_t> lengths;
  for (const Tensor& t : xs) lengths.push_back(t.shape()[ax]);
  const int axis_from_end = axis_from_end_of(ax, shape.size());
  return record("concatenate", out, xs, [lengths, axis_from_end](const Tensor& g, const Tensor&, Needs needs) {
    std::vector<Tensor> grads(lengths.size());
    std::size_t offset = 0;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      if (needs[i]) {
        grads[i] = select_positions("slice", g, axis_from_end, Positions{offset, 1, lengths[i], nullptr});
      }
      offset += lengths[i];
    }
    return grads;
  });
}

Tensor stack(const std::vector<Tensor>& xs, int axis) {
  if (xs.empty()) throw ValueError("hesse::stack: no tensors given");
  const std::size_t ax = detail::normalize_axis("stack", axis, xs[0].ndim() + 1);
  std::vector<Tensor> parts;
  for (const Tensor& t : xs) {
    if (t.shape() != xs[0].shape())
      throw ShapeError(message("stack", "shapes ", to_string(xs[0].shape()), " and ", to_string(t.shape()), " differ"));
    parts.push_back(unsqueeze(t, int(ax)));
  }
  return concatenate(parts, int(ax));
}

Tensor hstack(const std::vector<Tensor>& xs) {
  if (xs.empty()) throw ValueError("hesse::hstack: no tensors given");
  std::vector<Tensor> parts;
  for (const Tensor& t : xs) parts.push_back(t.ndim() == 0 ? reshape(t, Shape{1}) : t);
  try {
    return concatenate(parts, parts[0].ndim() == 1 ? 0 : 1);
  } catch (const ShapeError& e) {  // name the op the user called
    throw ShapeError(message("hstack", "via ", e.what()));
  }
}

// ---- slicing and indexing ----

Tensor slice(const Tensor& x, int axis, std::int64_t start, std::int64_t stop, std::int64_t step) {
  const std::size_t ax = detail::normalize_axis("slice", axis, x.shape());
  if (step <= 0)
    throw ValueError(message("slice", "step must be positive, got ", step, " (shape ", to_string(x.shape()), ")"));
  const auto n = static_cast<std::int64_t>(x.shape()[ax]);
  auto clamp = [n](std::int64_t i) { return std::clamp(i < 0 ? i + n : i, std::int64_t(0), n); };
  const std::int64_t b = clamp(start), e = clamp(stop);
  const std::size_t count = e > b ? std::size_t((e - b - 1) / step + 1) : 0;  // (e - b + step - 1) could overflow
  return select_positions("slice", x, axis_from_end_of(ax, x.ndim()),
                          Positions{std::size_t(b), std::size_t(step), count, nullptr});
}

Tensor index_select(const Tensor& x, int axis, const std::vector<std::int64_t>& indices) {
  const std::size_t ax = detail::normalize_axis("index_select", axis, x.shape());
  const auto n = static_cast<std::int64_t>(x.shape()[ax]);
  auto pos = std::make_shared<std::vector<std::size_t>>();
  for (std::int64_t i : indices) {
    if (i < -n || i >= n)
      throw IndexError(message("index_select", "index ", i, " is out of range for axis ", axis, " of size ", n,
                               " (shape ", to_string(x.shape()), ")"));
    pos->push_back(std::size_t(i < 0 ? i + n : i));
  }
  return select_positions("index_select", x, axis_from_end_of(ax, x.ndim()), Positions{0, 1, 0, pos});
}

Tensor gather(const Tensor& x, int axis, const Tensor& index) {
  const std::size_t ax = detail::normalize_axis("gather", axis, x.shape());
  bool fits = index.ndim() == x.ndim();
  for (std::size_t d = 0; fits && d < x.ndim(); ++d) fits = d == ax || index.shape()[d] == x.shape()[d];
  if (!fits)
    throw ShapeError(message("gather", "index of shape ", to_string(index.shape()), " does not match input of shape ",
                             to_string(x.shape()), " outside axis ", axis));
  const std::size_t n = x.shape()[ax];
  auto idx = std::make_shared<std::vector<std::size_t>>(index.numel());
  for (std::size_t i = 0; i < index.numel(); ++i) {
    const double v = index.data()[i];
    if (v != std::floor(v)) throw ValueError(message("gather", "index ", v, " is not an integer"));
    if (v < 0 || v >= double(n))
      throw IndexError(message("gather", "index ", v, " is out of range for axis ", axis, " of size ", n,
                               " (shape ", to_string(x.shape()), ")"));
    (*idx)[i] = std::size_t(v);
  }
  return gather_rec(x, axis_from_end_of(ax, x.ndim()), index.detach(), idx);
}

}  // namespace hesse
