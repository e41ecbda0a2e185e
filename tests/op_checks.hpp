#pragma once
// Checks shared by the op-family suites (test_elementwise, test_reduction,
// test_linalg, test_shape): derivatives against finite differences at first
// and second order, batched seeds against one seed at a time, and messages.
#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace hesse::testing {

/// Entrywise closeness; fails on NaN and on shape mismatches.
#define CHECK_CLOSE(a, b, tol) HESSE_CHECK_CLOSE(a, b, tol)

inline Tensor leaf(Tensor t) { return t.requires_grad_(true); }

/// Standard normal entries, requiring grad.
inline Tensor normal(const Shape& s, Generator& gen) { return leaf(randn(s, gen)); }

/// Entries uniform on [lo, hi), requiring grad.
inline Tensor uniform(const Shape& s, Generator& gen, double lo, double hi) {
  Tensor t = Tensor::empty(s);
  for (std::size_t i = 0; i < t.numel(); ++i) t.mutable_data()[i] = gen.uniform(lo, hi);
  return leaf(t);
}

/// Normal entries pushed at least `margin` away from 0 (away from kinks).
inline Tensor away_from_zero(const Shape& s, Generator& gen, double margin = 0.2) {
  Tensor t = randn(s, gen);
  for (std::size_t i = 0; i < t.numel(); ++i) {
    double& v = t.mutable_data()[i];
    v = v >= 0 ? v + margin : v - margin;
  }
  return leaf(t);
}

/// Row i of a tensor along its first axis, as a fresh tensor.
inline Tensor row(const Tensor& t, std::size_t i) {
  Tensor r = Tensor::empty(Shape(t.shape().begin() + 1, t.shape().end()));
  std::copy_n(t.data() + i * r.numel(), r.numel(), r.mutable_data());
  return r;
}

inline Tensor or_zeros(const Tensor& t, const Shape& s) { return t.defined() ? t : zeros(s); }

inline Shape prepend(std::size_t k, const Shape& s) {
  Shape out{k};
  out.insert(out.end(), s.begin(), s.end());
  return out;
}

/// gradcheck and gradgradcheck of f at `inputs`, reporting the worst entry on failure.
inline void check_derivatives(const std::string& name, const TensorFunction& f, const std::vector<Tensor>& inputs,
                       CheckOptions options = {}) {
  for (const bool second : {false, true}) {
    try {
      const bool ok = second ? gradgradcheck(f, inputs, options) : gradcheck(f, inputs, options);
      BOOST_CHECK_MESSAGE(ok, name << (second ? ": gradgradcheck" : ": gradcheck") << " failed");
    } catch (const std::exception& e) {
      BOOST_ERROR(name << (second ? ": gradgradcheck: " : ": gradcheck: ") << e.what());
    }
  }
}

/// Seeds with k extra leading batch dims must give exactly the k gradients of
/// one seed at a time, at first order and at second order (the batched
/// first-order gradient differentiated again, w.r.t. the inputs and the seeds).
inline void check_batched_seeds(const std::string& name, const TensorFunction& f, const std::vector<Tensor>& xs,
                         std::size_t k = 3, std::uint64_t seed = 7) {
  constexpr double tol = 1e-14;
  Generator gen(seed);
  const Tensor y = f(xs);
  const Tensor V = leaf(randn(prepend(k, y.shape()), gen));
  GradOptions batched;
  batched.create_graph = true;
  batched.allow_unused = true;
  batched.batched_grad_outputs = true;
  const std::vector<Tensor> Gb = grad({y}, xs, {V}, batched);

  // second-order seeds: w[i][j] for seed i and input j; the batched pass gets
  // W_j of shape [k, k, x_j] holding w[i][j] at [i, i] and zeros elsewhere
  std::vector<std::vector<Tensor>> w(k);
  std::vector<Tensor> outs, seeds;
  for (std::size_t j = 0; j < xs.size(); ++j) {
    Tensor W = zeros(prepend(k, prepend(k, xs[j].shape())));
    const std::size_t n = xs[j].numel();
    for (std::size_t i = 0; i < k; ++i) {
      w[i].push_back(randn(xs[j].shape(), gen));
      std::copy_n(w[i][j].data(), n, W.mutable_data() + (i * k + i) * n);
    }
    if (Gb[j].defined() && Gb[j].requires_grad()) outs.push_back(Gb[j]), seeds.push_back(W);
  }
  std::vector<Tensor> wrt = xs;
  wrt.push_back(V);
  GradOptions second;
  second.allow_unused = true;
  second.batched_grad_outputs = true;
  second.retain_graph = true;
  const std::vector<Tensor> Hb = grad(outs, wrt, seeds, second);

  for (std::size_t i = 0; i < k; ++i) {
    const Tensor Vi = leaf(row(V, i).detach());
    GradOptions one;
    one.create_graph = true;
    one.allow_unused = true;
    const std::vector<Tensor> Gi = grad({y}, xs, {Vi}, one);
    std::vector<Tensor> outs_i, seeds_i;
    for (std::size_t j = 0; j < xs.size(); ++j) {
      const Tensor gb = row(or_zeros(Gb[j], prepend(k, xs[j].shape())), i);
      const double d = max_abs_diff(gb, or_zeros(Gi[j], xs[j].shape()));
      BOOST_CHECK_MESSAGE(d <= tol, name << ": batched first-order gradient, seed " << i << ", input " << j
                                         << " differs by " << d);
      if (Gi[j].defined() && Gi[j].requires_grad()) outs_i.push_back(Gi[j]), seeds_i.push_back(w[i][j]);
    }
    std::vector<Tensor> wrt_i = xs;
    wrt_i.push_back(Vi);
    GradOptions plain;
    plain.allow_unused = true;
    plain.retain_graph = true;
    const std::vector<Tensor> Hi = grad(outs_i, wrt_i, seeds_i, plain);
    for (std::size_t j = 0; j <= xs.size(); ++j) {
      const Shape s = wrt_i[j].shape();
      const Tensor hi = or_zeros(Hi[j], s);
      Tensor hb = row(or_zeros(Hb[j], prepend(k, wrt[j].shape())), i);
      if (j == xs.size()) {  // d/dV: only block i of V is involved
        for (std::size_t l = 0; l < k; ++l) {
          const double d = max_abs_diff(row(hb, l), l == i ? hi : zeros(s));
          BOOST_CHECK_MESSAGE(d <= tol, name << ": batched second-order gradient w.r.t. seed block " << l
                                             << ", seed " << i << " differs by " << d);
        }
      } else {
        const double d = max_abs_diff(hb, hi);
        BOOST_CHECK_MESSAGE(d <= tol, name << ": batched second-order gradient, seed " << i << ", input " << j
                                           << " differs by " << d);
      }
    }
  }
}

/// Runs f, expecting an exception of type E whose message contains every part.
template <class E, class F>
inline void check_message(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    BOOST_ERROR("no exception thrown; expected one mentioning " << parts.front());
  } catch (const E& e) {
    const std::string what = e.what();
    for (const std::string& p : parts)
      BOOST_CHECK_MESSAGE(what.find(p) != std::string::npos, "message '" << what << "' lacks '" << p << "'");
  } catch (const std::exception& e) {
    BOOST_ERROR("wrong exception type: " << e.what());
  }
}

}  // namespace hesse::testing
