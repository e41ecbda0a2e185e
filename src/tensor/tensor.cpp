// Tensor handle, creation, printing.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <limits>
#include <ostream>
#include <sstream>

#include <xtensor/xio.hpp>

#include "../detail.hpp"

namespace hesse {

std::string to_string(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::size_t numel_of(const Shape& shape) { return detail::prod(shape, 0, shape.size()); }

namespace detail {
TensorImpl::~TensorImpl() {
  if (grad_fn) release_node(std::move(grad_fn));
}
}  // namespace detail

double Generator::uniform(double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(engine_);
}
double Generator::normal(double mean, double stddev) {
  return std::normal_distribution<double>(mean, stddev)(engine_);
}
Generator& default_generator() {
  thread_local Generator gen(0);
  return gen;
}
void manual_seed(std::uint64_t seed) { default_generator().seed(seed); }

// ---- construction ----

namespace {
// The number of elements of a shape; refuses a shape whose byte count wraps
// around (it would get a buffer smaller than the shape says).
// (overflow flags, not a division per dimension: every new tensor passes here)
std::size_t checked_numel(const Shape& shape) {
  if (std::find(shape.begin(), shape.end(), std::size_t(0)) != shape.end()) return 0;
  std::size_t numel = 1;
  bool overflow = false;
  for (std::size_t d : shape) overflow |= __builtin_mul_overflow(numel, d, &numel);
  if (overflow || numel > std::numeric_limits<std::size_t>::max() / sizeof(double))
    throw ValueError(detail::message("Tensor", "shape ", to_string(shape), " has too many elements"));
  return numel;
}
}  // namespace

Tensor Tensor::empty(const Shape& shape) {
  auto impl = detail::make_cached<detail::TensorImpl>();
  impl->shape = shape;
  impl->numel = checked_numel(shape);
  impl->storage = detail::make_cached<detail::Storage>(impl->numel);
  return Tensor(std::move(impl));
}

namespace detail {
Tensor deferred(const Shape& shape, const std::vector<Tensor>& operands,
                std::function<void(const std::vector<Tensor>& operands, double* out)> fill) {
  std::vector<Tensor> kept;  // detached: a pending value holds the operands' values, not their graphs
  std::vector<Storage*> reads;
  for (const Tensor& t : operands) {
    kept.push_back(t.detach());
    reads.push_back(t.impl()->storage.get());
  }
  auto impl = make_cached<TensorImpl>();
  impl->shape = shape;
  impl->numel = checked_numel(shape);
  impl->storage = Storage::deferred(
      impl->numel, [kept = std::move(kept), fill = std::move(fill)](double* out) { fill(kept, out); }, reads);
  return Tensor(std::move(impl));
}
}  // namespace detail

namespace {
Tensor from_values(const Shape& shape, const double* values) {
  Tensor t = Tensor::empty(shape);
  std::copy(values, values + t.numel(), t.mutable_data());
  return t;
}
}  // namespace

Tensor::Tensor(double value) : Tensor(from_values({}, &value)) {}

Tensor::Tensor(const xt::xarray<double>& value, bool requires_grad)
    : Tensor(empty(Shape(value.shape().begin(), value.shape().end()))) {
  detail::view_mut(*this) = value;  // also handles non-row-major sources
  impl_->requires_grad = requires_grad;
}

Tensor::Tensor(std::initializer_list<double> values)
    : Tensor(from_values({values.size()}, values.begin())) {}

namespace {
// Nested lists must be rectangular: xtensor would silently zero-pad ragged rows.
[[noreturn]] void ragged(const std::string& where, std::size_t got, std::size_t want) {
  throw ShapeError(detail::message("Tensor", "ragged nested initializer list: entry ", where, " has ", got,
                                   " elements, expected ", want));
}

Tensor from_nested(std::initializer_list<std::initializer_list<double>> values) {
  const std::size_t rows = values.size();
  const std::size_t cols = rows ? values.begin()->size() : 0;
  Tensor t = Tensor::empty({rows, cols});
  double* o = t.mutable_data();
  std::size_t r = 0;
  for (const auto& row : values) {
    if (row.size() != cols) ragged("[" + std::to_string(r) + "]", row.size(), cols);
    o = std::copy(row.begin(), row.end(), o);
    ++r;
  }
  return t;
}

Tensor from_nested(std::initializer_list<std::initializer_list<std::initializer_list<double>>> values) {
  const std::size_t d0 = values.size();
  const std::size_t d1 = d0 ? values.begin()->size() : 0;
  const std::size_t d2 = d1 ? values.begin()->begin()->size() : 0;
  Tensor t = Tensor::empty({d0, d1, d2});
  double* o = t.mutable_data();
  std::size_t i = 0;
  for (const auto& plane : values) {
    if (plane.size() != d1) ragged("[" + std::to_string(i) + "]", plane.size(), d1);
    std::size_t j = 0;
    for (const auto& row : plane) {
      if (row.size() != d2) ragged("[" + std::to_string(i) + "][" + std::to_string(j) + "]", row.size(), d2);
      o = std::copy(row.begin(), row.end(), o);
      ++j;
    }
    ++i;
  }
  return t;
}
}  // namespace

Tensor::Tensor(std::initializer_list<std::initializer_list<double>> values) : Tensor(from_nested(values)) {}

Tensor::Tensor(std::initializer_list<std::initializer_list<std::initializer_list<double>>> values)
    : Tensor(from_nested(values)) {}

// ---- accessors ----

void Tensor::undefined() { throw ValueError("hesse::Tensor: use of an undefined tensor"); }

std::size_t Tensor::size(int axis) const {
  return shape()[detail::normalize_axis("Tensor::size", axis, shape())];
}

xt::xarray<double> Tensor::value() const { return detail::view(*this); }

double Tensor::item() const {
  if (numel() != 1)
    throw ShapeError(detail::message("item", "needs a one-element tensor, got shape ", to_string(shape())));
  return data()[0];
}

Tensor& Tensor::requires_grad_(bool flag) {
  if (!is_leaf())
    throw AutogradError(detail::message(
        "requires_grad_", "only leaves can be marked; this tensor was made by '", impl_->grad_fn->name,
        "' (use detach() first)"));
  impl_->requires_grad = flag;
  return *this;
}

bool Tensor::is_leaf() const { return checked().grad_fn == nullptr; }

Tensor Tensor::grad() const {
  const auto& g = checked().grad;
  return g ? Tensor(g) : Tensor();
}

void Tensor::zero_grad() { checked(), impl_->grad.reset(); }

void Tensor::set_grad(const Tensor& g) {
  checked();
  if (g.defined() && g.shape() != shape())
    throw ShapeError(detail::message("set_grad", "gradient of shape ", to_string(g.shape()),
                                     " for a tensor of shape ", to_string(shape())));
  // a gradient that carries a tape would keep its graph alive, and through a
  // leaf edge back to this tensor, forever (a reference cycle)
  impl_->grad = g.defined() && g.grad_fn() ? g.detach().impl() : g.impl();
}

void Tensor::backward(const Tensor& gradient, bool retain_graph) const {
  hesse::backward({*this}, {gradient}, retain_graph);
}

Tensor Tensor::detach() const {
  auto impl = detail::make_cached<detail::TensorImpl>();
  impl->shape = shape();
  impl->numel = numel();
  impl->storage = impl_->storage;
  impl->offset = impl_->offset;
  return Tensor(std::move(impl));
}

Tensor Tensor::clone() const { return from_values(shape(), data()); }

const std::shared_ptr<Node>& Tensor::grad_fn() const { return checked().grad_fn; }

namespace {

// NumPy-style printing: nested brackets, right-aligned columns, and "..." in
// dimensions longer than 6 once a tensor has more than 1000 entries.
struct Printer {
  const Tensor& t;
  bool summarize;
  std::size_t width = 1;

  std::string number(double v) const {
    std::ostringstream os;
    os << std::setprecision(6) << v;
    return os.str();
  }
  template <class F>
  void for_shown(std::size_t dim, F f) const {  // f(index) or f(SIZE_MAX) for "..."
    const std::size_t n = t.shape()[dim];
    for (std::size_t i = 0; i < n; ++i) {
      if (summarize && n > 6 && i == 3) {
        f(SIZE_MAX);
        i = n - 4;
        continue;
      }
      f(i);
    }
  }
  void measure(std::size_t dim, std::size_t offset) {
    if (dim == t.ndim()) {
      width = std::max(width, number(t.data()[offset]).size());
      return;
    }
    const std::size_t stride = detail::prod(t.shape(), dim + 1, t.ndim());
    for_shown(dim, [&](std::size_t i) {
      if (i != SIZE_MAX) measure(dim + 1, offset + i * stride);
    });
  }
  void print(std::ostream& os, std::size_t dim, std::size_t offset, std::size_t indent) const {
    if (dim == t.ndim()) {
      const std::string s = number(t.data()[offset]);
      os << std::string(width - s.size(), ' ') << s;
      return;
    }
    const std::size_t stride = detail::prod(t.shape(), dim + 1, t.ndim());
    const bool last = dim + 1 == t.ndim();
    const std::string gap = last ? ", " : ",\n" + std::string(t.ndim() - dim - 1 > 1 ? 1 : 0, '\n') +
                                              std::string(indent + 1, ' ');
    os << "[";
    bool first = true;
    for_shown(dim, [&](std::size_t i) {
      if (!first) os << gap;
      first = false;
      if (i == SIZE_MAX) os << "...";
      else print(os, dim + 1, offset + i * stride, indent + 1);
    });
    os << "]";
  }
};

}  // namespace

std::ostream& operator<<(std::ostream& os, const Tensor& t) {
  if (!t.defined()) return os << "tensor(undefined)";
  os << "tensor(";
  if (t.numel() == 0) {
    os << "[], shape=" << to_string(t.shape());  // (measuring would walk every leading index of [2^30, 0])
  } else {
    Printer p{t, t.numel() > 1000};
    p.measure(0, 0);
    p.print(os, 0, 0, 7);
  }
  if (t.grad_fn()) os << ", grad_fn=" << t.grad_fn()->name;
  else if (t.requires_grad()) os << ", requires_grad";
  return os << ")";
}

// ---- creation ----

Tensor full(const Shape& shape, double value, bool requires_grad) {
  Tensor t = Tensor::empty(shape);
  std::fill_n(t.mutable_data(), t.numel(), value);
  return t.requires_grad_(requires_grad);
}
// memset: all-zero bytes are 0.0, and glibc's memset writes whole cache lines
// without reading them first (seeds and results are mostly zeros)
Tensor zeros(const Shape& shape, bool requires_grad) {
  Tensor t = Tensor::empty(shape);
  std::memset(t.mutable_data(), 0, t.numel() * sizeof(double));
  return t.requires_grad_(requires_grad);
}
Tensor ones(const Shape& shape, bool requires_grad) { return full(shape, 1.0, requires_grad); }
Tensor zeros_like(const Tensor& t) { return zeros(t.shape()); }
Tensor ones_like(const Tensor& t) { return ones(t.shape()); }

Tensor eye(std::size_t n) { return eye(n, n); }

Tensor eye(std::size_t n, std::size_t m) {
  Tensor t = zeros({n, m});
  for (std::size_t i = 0; i < std::min(n, m); ++i) t.mutable_data()[i * m + i] = 1.0;
  return t;
}

Tensor arange(double stop) { return arange(0.0, stop, 1.0); }

Tensor arange(double start, double stop, double step) {
  if (step == 0.0) throw ValueError("hesse::arange: step must not be zero");
  if (!std::isfinite(start) || !std::isfinite(stop) || !std::isfinite(step))
    throw ValueError(detail::message("arange", "start, stop and step must be finite, got ", start, ", ", stop,
                                     ", ", step));
  const double count = std::ceil((stop - start) / step);
  if (count >= 9.0e15)  // beyond exact integers in a double, and beyond any memory
    throw ValueError(detail::message("arange", "[", start, ", ", stop, ") in steps of ", step, " has ", count,
                                     " elements"));
  const std::size_t n = count > 0 ? static_cast<std::size_t>(count) : 0;
  Tensor t = Tensor::empty({n});
  double* out = t.mutable_data();
  for (std::size_t i = 0; i < n; ++i) out[i] = start + step * static_cast<double>(i);
  return t;
}

Tensor rand(const Shape& shape, Generator& gen) {
  Tensor t = Tensor::empty(shape);
  double* out = t.mutable_data();
  for (std::size_t i = 0; i < t.numel(); ++i) out[i] = gen.uniform();
  return t;
}

Tensor randn(const Shape& shape, Generator& gen) {
  Tensor t = Tensor::empty(shape);
  double* out = t.mutable_data();
  for (std::size_t i = 0; i < t.numel(); ++i) out[i] = gen.normal();
  return t;
}

namespace detail {

std::size_t normalize_axis(const char* op, int axis, std::size_t ndim) {
  const auto n = static_cast<int>(ndim);
  if (axis < -n || axis >= n)
    throw IndexError(message(op, "axis ", axis, " is out of range for a tensor with ", ndim, " dimension",
                             ndim == 1 ? "" : "s"));
  return static_cast<std::size_t>(axis < 0 ? axis + n : axis);
}

std::size_t normalize_axis(const char* op, int axis, const Shape& shape) {
  const auto n = static_cast<int>(shape.size());
  if (axis < -n || axis >= n)
    throw IndexError(message(op, "axis ", axis, " is out of range for a tensor of shape ", to_string(shape)));
  return static_cast<std::size_t>(axis < 0 ? axis + n : axis);
}

Shape broadcast_shapes(const char* op, const Shape& a, const Shape& b) {
  const std::size_t n = std::max(a.size(), b.size());
  Shape out(n, 1);
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    const std::size_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    if (da != db && da != 1 && db != 1)
      throw ShapeError(message(op, "shapes ", to_string(a), " and ", to_string(b), " cannot be broadcast"));
    out[i] = da == 1 ? db : da;
  }
  return out;
}

}  // namespace detail
}  // namespace hesse
