// Elementwise ops: forward kernel and backward rule side by side.
// Rules receive gradients with extra leading batch dims and use only
// differentiable ops, so they can be differentiated again.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../detail.hpp"

namespace hesse {
namespace {

using detail::make;
using detail::record;
using detail::reduce_grad;

template <class F>
Tensor map_unary(const Tensor& x, F f) {
  Tensor out = make(x.shape());
  const double* a = x.data();
  double* o = out.mutable_data();
  const std::size_t n = x.numel();
  for (std::size_t i = 0; i < n; ++i) o[i] = f(a[i]);
  return out;
}

// True when `inner` equals the trailing dimensions of `outer`.
bool trails(const Shape& inner, const Shape& outer) {
  return inner.size() <= outer.size() && std::equal(inner.begin(), inner.end(), outer.end() - std::ptrdiff_t(inner.size()));
}

// o = f(a, b) where one operand is whole (n values) and the other a row of
// `period` values repeated along o's leading dims (e.g. over seed batches;
// period n: both whole). o is fresh, so it overlaps neither: __restrict spares
// each short row the overlap tests of a vectorised loop. Out of line, so that
// how the loop compiles does not hang on the inlining budget of each op.
template <bool RowFirst, class F>
__attribute__((noinline)) HESSE_AVX2_CLONE void zip_rows(const double* __restrict whole, const double* __restrict row,
                                                         double* __restrict o, std::size_t n, std::size_t period, F f) {
  for (std::size_t i = 0; i < n; i += period)
    for (std::size_t j = 0; j < period; ++j) o[i + j] = RowFirst ? f(row[j], whole[i + j]) : f(whole[i + j], row[j]);
}

template <class F>
Tensor map_binary(const char* op, const Tensor& a, const Tensor& b, F f) {
  const double* pa = a.data();
  const double* pb = b.data();
  if (a.shape() == b.shape()) {
    Tensor out = make(a.shape());
    zip_rows<false>(pa, pb, out.mutable_data(), a.numel(), a.numel(), f);
    return out;
  }
  const Shape shape = detail::broadcast_shapes(op, a.shape(), b.shape());
  Tensor out = make(shape);
  double* o = out.mutable_data();
  if (b.numel() == 1 && shape == a.shape()) {
    const double s = pb[0];
    for (std::size_t i = 0, n = a.numel(); i < n; ++i) o[i] = f(pa[i], s);
  } else if (a.numel() == 1 && shape == b.shape()) {
    const double s = pa[0];
    for (std::size_t i = 0, n = b.numel(); i < n; ++i) o[i] = f(s, pb[i]);
  } else if (shape == a.shape() && b.numel() > 0 && a.numel() % b.numel() == 0 && trails(b.shape(), a.shape())) {
    zip_rows<false>(pa, pb, o, a.numel(), b.numel(), f);  // b repeats along a's leading dims
  } else if (shape == b.shape() && a.numel() > 0 && b.numel() % a.numel() == 0 && trails(a.shape(), b.shape())) {
    zip_rows<true>(pb, pa, o, b.numel(), a.numel(), f);
  } else {
    detail::for_each_broadcast(shape, detail::broadcast_strides(a.shape(), shape),
                               detail::broadcast_strides(b.shape(), shape),
                               [&](std::size_t io, std::size_t ia, std::size_t ib) { o[io] = f(pa[ia], pb[ib]); });
  }
  return out;
}

// A constant (unrecorded) tensor, e.g. the 0/1 mask in relu's derivative.
template <class F>
Tensor constant_map(const Tensor& x, F f) {
  NoGradGuard guard;
  return map_unary(x, f);
}

const double kSqrt2 = std::sqrt(2.0);
const double kInvSqrt2Pi = 1.0 / std::sqrt(2.0 * M_PI);
const double kTwoOverSqrtPi = 2.0 / std::sqrt(M_PI);

}  // namespace

// ---- binary ----

// (a + b)' = (1, 1), summed back over broadcast dims
Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = map_binary("add", a, b, [](double x, double y) { return x + y; });
  return record("add", out, {a, b},
                [sa = a.shape(), sb = b.shape(), so = out.shape()](const Tensor& g, const Tensor&, Needs needs) {
                  return std::vector<Tensor>{needs[0] ? reduce_grad(g, so, sa) : Tensor(),
                                             needs[1] ? reduce_grad(g, so, sb) : Tensor()};
                });
}

// (a - b)' = (1, -1)
Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = map_binary("sub", a, b, [](double x, double y) { return x - y; });
  return record("sub", out, {a, b},
                [sa = a.shape(), sb = b.shape(), so = out.shape()](const Tensor& g, const Tensor&, Needs needs) {
                  return std::vector<Tensor>{needs[0] ? reduce_grad(g, so, sa) : Tensor(),
                                             needs[1] ? neg(reduce_grad(g, so, sb)) : Tensor()};
                });
}

// (a b)' = (b, a)
Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = map_binary("mul", a, b, [](double x, double y) { return x * y; });
  return record("mul", out, {a, b}, [a, b, so = out.shape()](const Tensor& g, const Tensor&, Needs needs) {
    return std::vector<Tensor>{needs[0] ? reduce_grad(g * b, so, a.shape()) : Tensor(),
                               needs[1] ? reduce_grad(g * a, so, b.shape()) : Tensor()};
  });
}

// (a / b)' = (1 / b, -a / b² = -out / b)
Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = map_binary("div", a, b, [](double x, double y) { return x / y; });
  return record(
      "div", out, {a, b},
      [sa = a.shape(), b](const Tensor& g, const Tensor& out, Needs needs) {
        const Tensor g_over_b = g / b;
        return std::vector<Tensor>{needs[0] ? reduce_grad(g_over_b, out.shape(), sa) : Tensor(),
                                   needs[1] ? neg(reduce_grad(g_over_b * out, out.shape(), b.shape())) : Tensor()};
      },
      /*save_output=*/true);
}

Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }

// ---- with a scalar ----

// (x + s)' = 1
Tensor operator+(const Tensor& x, double s) {
  Tensor out = map_unary(x, [s](double v) { return v + s; });
  return record("add_scalar", out, {x},
                [](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g}; });
}
Tensor operator+(double s, const Tensor& x) { return x + s; }
Tensor operator-(const Tensor& x, double s) { return x + (-s); }
Tensor operator-(double s, const Tensor& x) { return neg(x) + s; }

// (s x)' = s
Tensor operator*(const Tensor& x, double s) {
  Tensor out = map_unary(x, [s](double v) { return v * s; });
  return record("mul_scalar", out, {x},
                [s](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g * s}; });
}
Tensor operator*(double s, const Tensor& x) { return x * s; }

// (x / s)' = 1 / s  (divides, rather than multiplying by 1/s, so values match x / s exactly)
Tensor operator/(const Tensor& x, double s) {
  Tensor out = map_unary(x, [s](double v) { return v / s; });
  return record("div_scalar", out, {x},
                [s](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g / s}; });
}

// (s / x)' = -s / x² = -out / x
Tensor operator/(double s, const Tensor& x) {
  Tensor out = map_unary(x, [s](double v) { return s / v; });
  return record(
      "rdiv_scalar", out, {x},
      [x](const Tensor& g, const Tensor& out, Needs) { return std::vector<Tensor>{neg(g * out / x)}; },
      /*save_output=*/true);
}

Tensor operator-(const Tensor& x) { return neg(x); }

// ---- unary ----

// (-x)' = -1
Tensor neg(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return -v; });
  return record("neg", out, {x}, [](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{neg(g)}; });
}

// (x^p)' = p x^(p-1);  (x^0)' = 0 also at x = 0 (where p x^(p-1) would be 0 · inf)
Tensor pow(const Tensor& x, double p) {
  if (p == 1.0) return x * 1.0;
  if (p == 0.0)
    return record("pow", ones(x.shape()), {x},
                  [](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g * 0.0}; });
  Tensor out = map_unary(x, [p](double v) { return p == 2.0 ? v * v : std::pow(v, p); });
  return record("pow", out, {x}, [x, p](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{g * (pow(x, p - 1.0) * p)};
  });
}

// (e^x)' = e^x
Tensor exp(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return std::exp(v); });
  return record(
      "exp", out, {x}, [](const Tensor& g, const Tensor& out, Needs) { return std::vector<Tensor>{g * out}; },
      true);
}

// (log x)' = 1 / x
Tensor log(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return std::log(v); });
  return record("log", out, {x}, [x](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g / x}; });
}

// (√x)' = 1 / (2 √x)
Tensor sqrt(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return std::sqrt(v); });
  return record(
      "sqrt", out, {x},
      [](const Tensor& g, const Tensor& out, Needs) { return std::vector<Tensor>{g * 0.5 / out}; }, true);
}

// |x|' = sign(x)  (0 at 0, like PyTorch)
Tensor abs(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return std::abs(v); });
  return record("abs", out, {x}, [x](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{g * constant_map(x, [](double v) { return double((v > 0) - (v < 0)); })};
  });
}

// (x²)' = 2x
Tensor square(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return v * v; });
  return record("square", out, {x},
                [x](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g * (x * 2.0)}; });
}

// The derivatives of tanh and σ as fused ops of (g, y): one pass instead of
// four over the (often seed-batched) gradient, and differentiable again.
namespace {

// o = gg g (-2 y) with g repeated along gg's leading dims and y along g's (o
// is fresh: __restrict, as in zip_rows). Summed: o[a, c] = Σ_j of those
// values at [a, j, c], added from o's zeros in j's order (as reduce_grad adds).
template <bool Summed>
HESSE_AVX2_CLONE void tanh_backward_dy_rows(const double* __restrict gg, const double* __restrict g,
                                            const double* __restrict y, double* __restrict o, std::size_t n,
                                            std::size_t ng, std::size_t ny) {
  for (std::size_t a = 0; a < n; a += ng) {
    double* oa = Summed ? o + a / ng * ny : o + a;
    for (std::size_t b = 0; b < ng; b += ny)
      for (std::size_t c = 0; c < ny; ++c) {
        const double v = (gg[a + b + c] * g[b + c]) * (y[c] * -2.0);
        if (Summed) oa[c] += v;
        else oa[b + c] = v;
      }
  }
}

// gg g (-2 y) summed to y's shape (and gg's seed dims): the y-gradient of
// tanh_backward, whose output has shape `so`. In one pass when nothing
// records (a second-level pass) and g, y repeat along gg's leading dims (the
// seeds), summed as it goes where y was broadcast along g; the values are
// those of the three ops and the sum it replaces.
Tensor tanh_backward_dy(const Tensor& gg, const Tensor& g, const Tensor& y, const Shape& so) {
  const bool fused = !detail::any_requires_grad({gg, g, y}) && trails(g.shape(), gg.shape()) &&
                     trails(y.shape(), g.shape()) && y.numel() > 0;
  if (!fused) return reduce_grad(gg * g * (y * -2.0), so, y.shape());
  if (g.shape() == so && y.numel() > 1 && g.numel() > y.numel()) {  // where reduce_grad would sum rows
    Tensor out = zeros(detail::concat_shape(detail::batch_dims(gg, so), y.shape()));
    tanh_backward_dy_rows<true>(gg.data(), g.data(), y.data(), out.mutable_data(), gg.numel(), g.numel(), y.numel());
    return out;
  }
  Tensor out = make(gg.shape());
  tanh_backward_dy_rows<false>(gg.data(), g.data(), y.data(), out.mutable_data(), gg.numel(), g.numel(), y.numel());
  return reduce_grad(out, so, y.shape());
}

// g (1 - y²);  ∂/∂g = (1 - y²),  ∂/∂y = -2 g y
Tensor tanh_backward(const Tensor& g, const Tensor& y) {
  Tensor out = map_binary("tanh_backward", g, y, [](double a, double b) { return a * (1.0 - b * b); });
  return record("tanh_backward", out, {g, y}, [g, y, so = out.shape()](const Tensor& gg, const Tensor&, Needs needs) {
    return std::vector<Tensor>{needs[0] ? reduce_grad(tanh_backward(gg, y), so, g.shape()) : Tensor(),
                               needs[1] ? tanh_backward_dy(gg, g, y, so) : Tensor()};
  });
}

// g y (1 - y);  ∂/∂g = y (1 - y),  ∂/∂y = g (1 - 2y)
Tensor sigmoid_backward(const Tensor& g, const Tensor& y) {
  Tensor out = map_binary("sigmoid_backward", g, y, [](double a, double b) { return a * b * (1.0 - b); });
  return record("sigmoid_backward", out, {g, y}, [g, y, so = out.shape()](const Tensor& gg, const Tensor&, Needs needs) {
    return std::vector<Tensor>{needs[0] ? reduce_grad(sigmoid_backward(gg, y), so, g.shape()) : Tensor(),
                               needs[1] ? reduce_grad(gg * g * (1.0 - y * 2.0), so, y.shape()) : Tensor()};
  });
}

// As HESSE_AVX2_CLONE (detail.hpp), and comparisons that may not trap let
// the loop vectorise (tanh's clamp). Fused multiply-adds are allowed here:
// tanh's polynomial runs 1.8x faster with them, so its AVX2 copy rounds
// unlike the plain one (both stay within 3 ulp of libm: test_elementwise).
#if defined(__GNUC__) && !defined(__clang__)
#define HESSE_VECTORISED HESSE_AVX2_CLONE __attribute__((optimize("no-trapping-math", "fp-contract=fast")))
#else
#define HESSE_VECTORISED
#endif

// tanh x = e / (e + 2) with e = expm1(2|x|) = 2^k (expm1(r) + 1) − 1, where
// k = ⌊2|x| / ln 2⌋ and r ∈ [0, ln 2) (so nothing cancels), expm1(r) by its
// Taylor series to r¹⁷. Branch-free, so the loop vectorises: libm's tanh does
// not and was most of a small MLP's forward pass. Within 3 ulp of libm (tested).
inline __attribute__((always_inline)) double tanh_value(double x) {
  const double ax = std::fabs(x);
  const double a = ax > 22.0 ? 22.0 : ax;  // tanh 22 rounds to 1; NaN stays NaN
  const double u = 2.0 * a;
  constexpr double inv_ln2 = 1.4426950408889634, ln2_hi = 6.93147180369123816490e-01,
                   ln2_lo = 1.90821492927058770002e-10;
  constexpr double shifter = 0x1.8p52;  // adding it rounds to an integer, kept in the low bits
  const double kd = (u * inv_ln2 - 0.5) + shifter;
  const double k = kd - shifter;
  const double r = (u - k * ln2_hi) - k * ln2_lo;  // Cody-Waite: ln 2 in two parts
  constexpr double inverse_factorials[] = {1.0 / 355687428096000.0, 1.0 / 20922789888000.0, 1.0 / 1307674368000.0,
                                           1.0 / 87178291200.0,     1.0 / 6227020800.0,     1.0 / 479001600.0,
                                           1.0 / 39916800.0,        1.0 / 3628800.0,        1.0 / 362880.0,
                                           1.0 / 40320.0,           1.0 / 5040.0,           1.0 / 720.0,
                                           1.0 / 120.0,             1.0 / 24.0,             1.0 / 6.0,
                                           0.5};
  double p = inverse_factorials[0];
  for (std::size_t i = 1; i < 16; ++i) p = p * r + inverse_factorials[i];
  const double expm1_r = r + r * r * p;
  std::uint64_t bits;
  std::memcpy(&bits, &kd, sizeof bits);
  bits = (bits + 1023) << 52;  // the double 2^k
  double two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  const double e = two_k * expm1_r + (two_k - 1.0);
  return std::copysign(e / (e + 2.0), x);
}

HESSE_VECTORISED void tanh_kernel(const double* x, double* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] = tanh_value(x[i]);
}

}  // namespace

// tanh' = 1 - tanh²
Tensor tanh(const Tensor& x) {
  Tensor out = make(x.shape());
  tanh_kernel(x.data(), out.mutable_data(), x.numel());
  return record(
      "tanh", out, {x},
      [](const Tensor& g, const Tensor& out, Needs) { return std::vector<Tensor>{tanh_backward(g, out)}; }, true);
}

// σ' = σ (1 - σ)
Tensor sigmoid(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return v >= 0 ? 1.0 / (1.0 + std::exp(-v)) : std::exp(v) / (1.0 + std::exp(v)); });
  return record(
      "sigmoid", out, {x},
      [](const Tensor& g, const Tensor& out, Needs) { return std::vector<Tensor>{sigmoid_backward(g, out)}; }, true);
}

// relu' = 1 where x > 0, else 0
Tensor relu(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return v > 0 ? v : 0.0; });
  return record("relu", out, {x}, [x](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{g * constant_map(x, [](double v) { return v > 0 ? 1.0 : 0.0; })};
  });
}

// softplus = max(x, 0) + log1p(e^-|x|);  softplus' = σ
Tensor softplus(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return std::max(v, 0.0) + std::log1p(std::exp(-std::abs(v))); });
  return record("softplus", out, {x},
                [x](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g * sigmoid(x)}; });
}

// erf' = 2/√π e^(-x²)
Tensor erf(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return std::erf(v); });
  return record("erf", out, {x}, [x](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{g * (exp(neg(square(x))) * kTwoOverSqrtPi)};
  });
}

// gelu = x Φ(x);  gelu' = Φ(x) + x φ(x),  Φ(x) = (1 + erf(x/√2)) / 2,  φ(x) = e^(-x²/2) / √(2π)
Tensor gelu(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return 0.5 * v * (1.0 + std::erf(v / kSqrt2)); });
  return record("gelu", out, {x}, [x](const Tensor& g, const Tensor&, Needs) {
    const Tensor cdf = (erf(x * (1.0 / kSqrt2)) + 1.0) * 0.5;
    const Tensor pdf = exp(square(x) * -0.5) * kInvSqrt2Pi;
    return std::vector<Tensor>{g * (cdf + x * pdf)};
  });
}

// sin' = cos
Tensor sin(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return std::sin(v); });
  return record("sin", out, {x}, [x](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g * cos(x)}; });
}

// cos' = -sin
Tensor cos(const Tensor& x) {
  Tensor out = map_unary(x, [](double v) { return std::cos(v); });
  return record("cos", out, {x},
                [x](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{neg(g * sin(x))}; });
}

}  // namespace hesse
