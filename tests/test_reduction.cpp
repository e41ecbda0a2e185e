#define BOOST_TEST_MODULE reduction
#include "op_checks.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <xtensor/xarray.hpp>
#include <xtensor/xmath.hpp>

using namespace hesse;
using namespace hesse::testing;

namespace {


/// The shape after reducing `axes` (already normalised) with or without keepdim.
Shape reduced_shape(const Shape& s, const std::vector<std::size_t>& axes, bool keepdim) {
  Shape out;
  for (std::size_t d = 0; d < s.size(); ++d) {
    const bool reduced = std::find(axes.begin(), axes.end(), d) != axes.end();
    if (!reduced) out.push_back(s[d]);
    else if (keepdim) out.push_back(1);
  }
  return out;
}

/// Sum over `axes` with plain loops: every input entry is added into the output
/// entry whose multi-index drops (or zeroes) the reduced axes.
Tensor reference_sum(const Tensor& x, const std::vector<std::size_t>& axes, bool keepdim) {
  const Shape& s = x.shape();
  Tensor out = zeros(reduced_shape(s, axes, keepdim));
  std::vector<std::size_t> idx(s.size(), 0);
  for (std::size_t flat = 0; flat < x.numel(); ++flat) {
    std::size_t rem = flat;
    for (std::size_t d = s.size(); d-- > 0;) idx[d] = rem % s[d], rem /= s[d];
    std::size_t o = 0;
    for (std::size_t d = 0; d < s.size(); ++d) {
      if (std::find(axes.begin(), axes.end(), d) != axes.end()) continue;
      o = o * s[d] + idx[d];
    }
    out.mutable_data()[o] += x.data()[flat];
  }
  return out;
}

std::vector<std::size_t> normalised(const std::vector<int>& axes, std::size_t ndim) {
  std::vector<std::size_t> out;
  for (int a : axes) out.push_back(std::size_t(a < 0 ? a + int(ndim) : a));
  return out;
}

/// Applies f to each 1-D lane along `axis` (outer, inner split) and writes one value per lane.
Tensor per_lane(const Tensor& x, std::size_t axis, bool keepdim,
                const std::function<double(const std::vector<double>&)>& f) {
  const Shape& s = x.shape();
  std::size_t outer = 1, inner = 1;
  for (std::size_t d = 0; d < axis; ++d) outer *= s[d];
  for (std::size_t d = axis + 1; d < s.size(); ++d) inner *= s[d];
  const std::size_t n = s[axis];
  Tensor out = Tensor::empty(reduced_shape(s, {axis}, keepdim));
  for (std::size_t a = 0; a < outer; ++a)
    for (std::size_t c = 0; c < inner; ++c) {
      std::vector<double> lane(n);
      for (std::size_t j = 0; j < n; ++j) lane[j] = x.data()[(a * n + j) * inner + c];
      out.mutable_data()[a * inner + c] = f(lane);
    }
  return out;
}

double naive_lse(const std::vector<double>& v) {
  long double s = 0;
  for (double e : v) s += std::exp((long double)e);
  return double(std::log(s));
}
double lane_max(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }
double lane_argmax(const std::vector<double>& v) { return double(std::max_element(v.begin(), v.end()) - v.begin()); }

const std::vector<std::vector<int>> kAxisSets = {{}, {0}, {1}, {2}, {-1}, {-3}, {0, 2}, {2, 0}, {-1, 0}, {0, 1, 2}, {1, -1}};

}  // namespace

// ---- sum ----

BOOST_AUTO_TEST_CASE(sum_values) {
  Generator gen(1);
  const Tensor x = randn({2, 3, 4}, gen);
  CHECK_CLOSE(sum(x), reference_sum(x, {0, 1, 2}, false), 1e-13);
  BOOST_CHECK(sum(x).shape() == Shape{});
  BOOST_CHECK_CLOSE_FRACTION(sum(x).item(), xt::sum(x.value())(), 1e-13);
  for (const auto& axes : kAxisSets)
    for (const bool keepdim : {false, true}) {
      BOOST_TEST_CONTEXT("axes " << axes.size() << " first " << (axes.empty() ? 99 : axes[0]) << " keepdim "
                                 << keepdim) {
        const Tensor got = sum(x, axes, keepdim);
        const Tensor want = reference_sum(x, normalised(axes, 3), keepdim);
        BOOST_CHECK_MESSAGE(got.shape() == want.shape(), to_string(got.shape()) << " vs " << to_string(want.shape()));
        if (got.shape() == want.shape()) CHECK_CLOSE(got, want, 1e-13);
      }
    }
  // xtensor's own reducer agrees on a two-axis case
  const xt::xarray<double> xs = xt::sum(x.value(), {0, 2}, xt::evaluation_strategy::immediate);
  CHECK_CLOSE(sum(x, {0, -1}), Tensor(xs), 1e-13);
}

// More dims than the reduced-axis flags keep inline (8): axes 0, 4 and 8 of 9.
BOOST_AUTO_TEST_CASE(sum_over_many_dims) {
  const Tensor x = reshape(arange(0.0, 64.0), {2, 1, 2, 1, 2, 1, 2, 1, 4});
  const Tensor s9 = sum(x, {0, 4, 8});
  BOOST_TEST(to_string(s9.shape()) == "[1, 2, 1, 1, 2, 1]");
  for (std::size_t j = 0; j < 2; ++j)
    for (std::size_t l = 0; l < 2; ++l) {
      double want = 0;
      for (std::size_t i = 0; i < 2; ++i)
        for (std::size_t k = 0; k < 2; ++k)
          for (std::size_t m = 0; m < 4; ++m) want += double(((i * 2 + j) * 2 + k) * 2 * 4 + l * 4 + m);
      BOOST_CHECK_EQUAL(s9.data()[j * 2 + l], want);
    }
  // gradients reduce over their flags too (sum_to runs that path)
  CHECK_CLOSE(sum_to(x, Shape{2, 1, 1, 1, 2, 1, 1, 1, 1}), sum(x, {1, 2, 3, 5, 6, 7, 8}, true), 0.0);
}

BOOST_AUTO_TEST_CASE(sum_of_long_rows_every_remainder) {
  // long rows are summed in four interleaved lanes plus a tail: every length
  // mod 4, whole-tensor and per-row, against exact integer sums
  for (std::size_t n : {1001u, 1002u, 1003u, 1004u, 3u}) {
    const Tensor x = arange(0.0, double(n));
    BOOST_CHECK_EQUAL(sum(x).item(), double(n * (n - 1) / 2));
    const Tensor rows = reshape(arange(0.0, double(3 * n)), {3, std::int64_t(n)});
    const Tensor per_row = sum(rows, {1});
    for (std::size_t r = 0; r < 3; ++r)
      BOOST_CHECK_EQUAL(per_row.data()[r], double(n * (r * n) + n * (n - 1) / 2));
  }
}

BOOST_AUTO_TEST_CASE(sum_edge_shapes) {
  Generator gen(2);
  // size-1 axes among the reduced and kept ones
  const Tensor x = randn({2, 1, 3, 1}, gen);
  for (const auto& axes : std::vector<std::vector<int>>{{1}, {0, 1}, {1, 3}, {2}, {0, 2}, {0, 1, 2, 3}, {3}})
    for (const bool keepdim : {false, true}) {
      const Tensor got = sum(x, axes, keepdim);
      const Tensor want = reference_sum(x, normalised(axes, 4), keepdim);
      BOOST_REQUIRE(got.shape() == want.shape());
      CHECK_CLOSE(got, want, 1e-14);
    }
  // every subset of the axes of a 4-D tensor (merged runs of reduced / kept axes)
  const Tensor x4 = randn({3, 4, 2, 5}, gen);
  for (int mask = 0; mask < 16; ++mask) {
    std::vector<int> axes;
    for (int d = 0; d < 4; ++d)
      if (mask & (1 << d)) axes.push_back(d % 2 ? d - 4 : d);  // mix negative and positive axes
    for (const bool keepdim : {false, true}) {
      const Tensor got = sum(x4, axes, keepdim);
      const Tensor want = reference_sum(x4, normalised(axes, 4), keepdim);
      BOOST_REQUIRE(got.shape() == want.shape());
      CHECK_CLOSE(got, want, 1e-13);
    }
  }
  // 0-d and empty tensors
  BOOST_CHECK_EQUAL(sum(Tensor(2.5)).item(), 2.5);
  BOOST_CHECK_EQUAL(sum(zeros({0, 3})).item(), 0.0);
  CHECK_CLOSE(sum(ones({0, 3}), {0}), zeros({3}), 0.0);
  BOOST_CHECK(sum(ones({0, 3}), {1}).shape() == Shape({0}));
  CHECK_CLOSE(sum(ones({3, 0}), {1}), zeros({3}), 0.0);
  CHECK_CLOSE(mean(ones({2, 3}), {}), ones({2, 3}), 0.0);
  // a larger sum is accumulated in double without surprises
  const Tensor big = ones({50, 70});
  BOOST_CHECK_EQUAL(sum(big).item(), 3500.0);
  CHECK_CLOSE(sum(big, {1}), full({50}, 70.0), 0.0);
}

BOOST_AUTO_TEST_CASE(sum_gradients) {
  Generator gen(3);
  const Tensor x = normal({2, 3, 2}, gen);
  // d sum / dx = 1 everywhere, whatever the axes
  for (const auto& axes : kAxisSets) {
    const Tensor y = sum(x, axes, true);
    const Tensor seed = randn(y.shape(), gen);
    const Tensor g = grad(y, x, seed);
    CHECK_CLOSE(g, Tensor(xt::xarray<double>(seed.value() + xt::zeros<double>({2, 3, 2}))), 0.0);
  }
  check_derivatives("sum", [](const std::vector<Tensor>& t) { return sum(t[0]); }, {x});
  for (const auto& axes : std::vector<std::vector<int>>{{0}, {-1}, {0, 2}, {}})
    for (const bool keepdim : {false, true})
      check_derivatives("sum axes keepdim=" + std::to_string(keepdim),
                        [axes, keepdim](const std::vector<Tensor>& t) { return sum(t[0], axes, keepdim); }, {x});
  // a nonlinear consumer makes the second derivative non-trivial
  check_derivatives("sum(x, 1)^2", [](const std::vector<Tensor>& t) { return square(sum(t[0], {1})); }, {x});
}

// ---- mean ----

BOOST_AUTO_TEST_CASE(mean_values_and_gradients) {
  Generator gen(4);
  const Tensor x = normal({2, 3, 4}, gen);
  BOOST_CHECK_CLOSE_FRACTION(mean(x).item(), xt::mean(x.value())(), 1e-13);
  BOOST_CHECK(mean(x).shape() == Shape{});
  for (const auto& axes : kAxisSets)
    for (const bool keepdim : {false, true}) {
      const std::vector<std::size_t> ax = normalised(axes, 3);
      double count = 1;
      for (std::size_t a : ax) count *= double(x.shape()[a]);
      const Tensor got = mean(x, axes, keepdim);
      const Tensor want = reference_sum(x.detach(), ax, keepdim) / count;
      BOOST_REQUIRE(got.shape() == want.shape());
      CHECK_CLOSE(got, want, 1e-14);
    }
  // d mean / dx = 1 / count
  CHECK_CLOSE(grad(mean(x, {0, 2}, false), x, ones({3})), full({2, 3, 4}, 1.0 / 8.0), 1e-16);
  CHECK_CLOSE(grad(mean(x), x), full({2, 3, 4}, 1.0 / 24.0), 1e-16);
  const Tensor small = normal({2, 3}, gen);
  check_derivatives("mean", [](const std::vector<Tensor>& t) { return mean(t[0]); }, {small});
  check_derivatives("mean axis -1", [](const std::vector<Tensor>& t) { return mean(t[0], {-1}); }, {small});
  check_derivatives("mean axis 0 keepdim", [](const std::vector<Tensor>& t) { return mean(t[0], {0}, true); }, {small});
  check_derivatives("mean(x^3, 0)", [](const std::vector<Tensor>& t) { return mean(hesse::pow(t[0], 3.0), {0}); },
                    {small});
}

// ---- logsumexp ----

BOOST_AUTO_TEST_CASE(logsumexp_values) {
  Generator gen(5);
  const Tensor x = randn({2, 3, 4}, gen);
  for (int axis : {0, 1, 2, -1, -2, -3})
    for (const bool keepdim : {false, true}) {
      const std::size_t ax = std::size_t(axis < 0 ? axis + 3 : axis);
      const Tensor got = logsumexp(x, axis, keepdim);
      const Tensor want = per_lane(x, ax, keepdim, naive_lse);
      BOOST_REQUIRE_MESSAGE(got.shape() == want.shape(), to_string(got.shape()) << " vs " << to_string(want.shape()));
      CHECK_CLOSE(got, want, 1e-14);
    }
  // 1-D input gives a 0-d result
  const Tensor v = Tensor{0.5, -1.0, 2.0};
  BOOST_CHECK(logsumexp(v, 0).shape() == Shape{});
  BOOST_CHECK_CLOSE_FRACTION(logsumexp(v, 0).item(), std::log(std::exp(0.5) + std::exp(-1.0) + std::exp(2.0)), 1e-15);
}

BOOST_AUTO_TEST_CASE(logsumexp_stable_for_large_entries) {
  Generator gen(6);
  const Tensor x = randn({3, 5}, gen);
  for (const double shift : {1000.0, -1000.0, 700.0}) {
    const Tensor got = logsumexp(x + shift, 1);
    const Tensor want = per_lane(x, 1, false, naive_lse) + shift;
    CHECK_CLOSE(got, want, 1e-12);
    // gradient = softmax of the unshifted entries
    const Tensor xl = leaf((x + shift).detach());
    const Tensor g = grad(sum(logsumexp(xl, 1)), xl);
    double worst = 0.0;
    for (std::size_t r = 0; r < 3; ++r) {
      double z = 0.0;
      for (std::size_t c = 0; c < 5; ++c) z += std::exp(x.data()[r * 5 + c]);
      for (std::size_t c = 0; c < 5; ++c)
        worst = std::max(worst, std::abs(g.data()[r * 5 + c] - std::exp(x.data()[r * 5 + c]) / z));
    }
    BOOST_CHECK_MESSAGE(worst <= 1e-13, "logsumexp gradient with shift " << shift << " off by " << worst);
  }
  // -inf entries drop out; a lane of only -inf gives -inf
  const double inf = std::numeric_limits<double>::infinity();
  const Tensor m = Tensor{{-inf, 0.0, std::log(3.0)}, {-inf, -inf, -inf}};
  const Tensor l = logsumexp(m, 1);
  BOOST_CHECK_CLOSE_FRACTION(l.data()[0], std::log(4.0), 1e-15);
  BOOST_CHECK(std::isinf(l.data()[1]) && l.data()[1] < 0);
}

BOOST_AUTO_TEST_CASE(logsumexp_gradients) {
  Generator gen(7);
  const Tensor x = normal({2, 3, 2}, gen);
  for (int axis : {0, 1, -1})
    for (const bool keepdim : {false, true})
      check_derivatives("logsumexp axis " + std::to_string(axis),
                        [axis, keepdim](const std::vector<Tensor>& t) { return logsumexp(t[0], axis, keepdim); }, {x});
  const Tensor big = leaf((randn({2, 3}, gen) + 1000.0).detach());
  CheckOptions loose;
  loose.eps = 1e-4;  // entries ~1000: a relative step of 1e-7
  check_derivatives("logsumexp near 1000", [](const std::vector<Tensor>& t) { return logsumexp(t[0], 1); }, {big},
                    loose);
}

// ---- max and argmax ----

BOOST_AUTO_TEST_CASE(max_and_argmax_values) {
  Generator gen(8);
  const Tensor x = randn({3, 4, 5}, gen);
  for (int axis : {0, 1, 2, -1, -3})
    for (const bool keepdim : {false, true}) {
      const std::size_t ax = std::size_t(axis < 0 ? axis + 3 : axis);
      const Tensor mx = hesse::max(x, axis, keepdim);
      const Tensor am = argmax(x, axis, keepdim);
      const Tensor want_max = per_lane(x, ax, keepdim, lane_max);
      const Tensor want_arg = per_lane(x, ax, keepdim, lane_argmax);
      BOOST_REQUIRE(mx.shape() == want_max.shape() && am.shape() == want_arg.shape());
      CHECK_CLOSE(mx, want_max, 0.0);
      CHECK_CLOSE(am, want_arg, 0.0);
    }
  // xtensor's reducers agree
  CHECK_CLOSE(hesse::max(x, 1), Tensor(xt::xarray<double>(xt::amax(x.value(), {1}))), 0.0);
  // ties: the first maximum wins
  const Tensor t = Tensor{{1.0, 3.0, 3.0}, {2.0, 2.0, 1.0}, {-1.0, -1.0, -1.0}};
  CHECK_CLOSE(argmax(t, 1), (Tensor{1.0, 0.0, 0.0}), 0.0);
  CHECK_CLOSE(argmax(t, 0), (Tensor{1.0, 0.0, 0.0}), 0.0);
  CHECK_CLOSE(hesse::max(t, 1), (Tensor{3.0, 2.0, -1.0}), 0.0);
  // argmax records nothing
  const Tensor xl = leaf(t.clone());
  BOOST_CHECK(!argmax(xl, 1).requires_grad());
  BOOST_CHECK(hesse::max(xl, 1).requires_grad());
}

BOOST_AUTO_TEST_CASE(max_gradient_goes_to_first_maximum) {
  const Tensor t = leaf(Tensor{{1.0, 3.0, 3.0}, {2.0, 2.0, 1.0}, {-1.0, 0.5, -1.0}});
  const Tensor g1 = grad(sum(hesse::max(t, 1)), t);
  CHECK_CLOSE(g1, (Tensor{{0.0, 1.0, 0.0}, {1.0, 0.0, 0.0}, {0.0, 1.0, 0.0}}), 0.0);
  const Tensor g0 = grad(hesse::max(t, 0, true), t, Tensor{{10.0, 20.0, 30.0}});
  CHECK_CLOSE(g0, (Tensor{{0.0, 20.0, 30.0}, {10.0, 0.0, 0.0}, {0.0, 0.0, 0.0}}), 0.0);
  // gradcheck away from ties: entries spread apart
  Generator gen(9);
  Tensor x = Tensor::empty({3, 4});
  std::vector<double> vals(12);
  for (std::size_t i = 0; i < 12; ++i) vals[i] = 0.3 * double(i);
  std::shuffle(vals.begin(), vals.end(), gen.engine());
  std::copy(vals.begin(), vals.end(), x.mutable_data());
  x = leaf(x);
  for (int axis : {0, 1, -1})
    for (const bool keepdim : {false, true})
      check_derivatives("max axis " + std::to_string(axis),
                        [axis, keepdim](const std::vector<Tensor>& t) { return hesse::max(t[0], axis, keepdim); }, {x});
  check_derivatives("max(x^2)", [](const std::vector<Tensor>& t) { return hesse::max(square(t[0]), 0); }, {x});
}

// ---- sum_to ----

BOOST_AUTO_TEST_CASE(sum_to_values_and_gradients) {
  Generator gen(10);
  const Tensor x = normal({2, 3, 4}, gen);
  struct Case {
    Shape target;
    std::vector<std::size_t> axes;  // axes of x summed away
  };
  const std::vector<Case> cases = {
      {{2, 3, 4}, {}}, {{3, 4}, {0}}, {{4}, {0, 1}}, {{}, {0, 1, 2}}, {{3, 1}, {0, 2}},
      {{1, 4}, {0, 1}}, {{2, 1, 4}, {1}}, {{1, 1, 1}, {0, 1, 2}}, {{1}, {0, 1, 2}}};
  for (const Case& c : cases) {
    BOOST_TEST_CONTEXT("sum_to " << to_string(c.target)) {
      const Tensor got = sum_to(x, c.target);
      BOOST_REQUIRE(got.shape() == c.target);
      const Tensor want = reference_sum(x.detach(), c.axes, false);
      double d = 0.0;
      for (std::size_t i = 0; i < want.numel(); ++i) d = std::max(d, std::abs(got.data()[i] - want.data()[i]));
      BOOST_CHECK_SMALL(d, 1e-14);
      check_derivatives("sum_to " + to_string(c.target),
                        [target = c.target](const std::vector<Tensor>& t) { return sum_to(t[0], target); }, {x});
    }
  }
  // the adjoint of expand: <sum_to(x), y> = <x, expand(y)>
  const Tensor y = randn({3, 1}, gen);
  BOOST_CHECK_CLOSE_FRACTION(sum(sum_to(x, {3, 1}) * y).item(), sum(x * expand(y, {2, 3, 4})).item(), 1e-13);
}

// ---- errors ----

BOOST_AUTO_TEST_CASE(reduction_errors) {
  const Tensor x = zeros({2, 3});
  HESSE_CHECK_THROWS(sum(x, {2}), hesse::IndexError, "hesse::sum");
  HESSE_CHECK_THROWS(sum(x, {-3}), hesse::IndexError, "hesse::sum");
  HESSE_CHECK_THROWS(sum(x, {0, 0}), hesse::IndexError, "hesse::sum");
  HESSE_CHECK_THROWS(sum(x, {1, -1}), hesse::IndexError, "hesse::sum");
  HESSE_CHECK_THROWS(mean(x, {5}), hesse::IndexError, "hesse::mean");
  HESSE_CHECK_THROWS(mean(x, {0, -2}), hesse::IndexError, "hesse::mean");
  HESSE_CHECK_THROWS(logsumexp(x, 2), hesse::IndexError, "hesse::logsumexp");
  HESSE_CHECK_THROWS(logsumexp(x, -3), hesse::IndexError, "hesse::logsumexp");
  HESSE_CHECK_THROWS(logsumexp(Tensor(1.0), 0), hesse::IndexError, "hesse::logsumexp");
  HESSE_CHECK_THROWS(logsumexp(zeros({2, 0}), 1), hesse::ShapeError, "hesse::logsumexp");
  HESSE_CHECK_THROWS(hesse::max(x, 2), hesse::IndexError, "hesse::max");
  HESSE_CHECK_THROWS(hesse::max(zeros({0, 3}), 0), hesse::ShapeError, "hesse::max");
  HESSE_CHECK_THROWS(argmax(x, -3), hesse::IndexError, "hesse::argmax");
  HESSE_CHECK_THROWS(argmax(zeros({0, 3}), 0), hesse::ShapeError, "hesse::argmax");
  HESSE_CHECK_THROWS(sum_to(x, {3, 3}), hesse::ShapeError, "hesse::sum_to");
  HESSE_CHECK_THROWS(sum_to(x, {4, 2, 3}), hesse::ShapeError, "hesse::sum_to");
  HESSE_CHECK_THROWS(sum_to(x, {2}), hesse::ShapeError, "hesse::sum_to");
  // messages name the shapes or the axes involved
  check_message<IndexError>([&] { sum(x, {2}); }, {"hesse::sum", "axis 2", "shape [2, 3]"});
  check_message<IndexError>([&] { sum(x, {0, -2}); }, {"hesse::sum", "[2, 3]"});
  check_message<ShapeError>([&] { logsumexp(zeros({2, 0}), 1); }, {"hesse::logsumexp", "[2, 0]"});
  check_message<ShapeError>([&] { hesse::max(zeros({0, 3}), 0); }, {"hesse::max", "[0, 3]"});
  check_message<ShapeError>([&] { argmax(zeros({4, 0}), -1); }, {"hesse::argmax", "[4, 0]", "axis -1"});
  check_message<ShapeError>([&] { sum_to(x, {3, 3}); }, {"hesse::sum_to", "[2, 3]", "[3, 3]"});
  check_message<ShapeError>([&] { sum_to(x, {4, 2, 3}); }, {"hesse::sum_to", "[2, 3]", "[4, 2, 3]"});
}

// ---- batched seeds ----

BOOST_AUTO_TEST_CASE(batched_seeds_reductions) {
  Generator gen(11);
  const Tensor x = normal({2, 3, 4}, gen);
  check_batched_seeds("sum axis 1", [](const std::vector<Tensor>& t) { return sum(t[0], {1}); }, {x});
  check_batched_seeds("sum axes 0,-1 keepdim", [](const std::vector<Tensor>& t) { return sum(t[0], {0, -1}, true); },
                      {x});
  check_batched_seeds("sum all", [](const std::vector<Tensor>& t) { return sum(t[0]); }, {x});
  check_batched_seeds("sum(tanh) axis 2", [](const std::vector<Tensor>& t) { return sum(hesse::tanh(t[0]), {2}); },
                      {x});
  check_batched_seeds("mean axis 0", [](const std::vector<Tensor>& t) { return mean(t[0], {0}); }, {x});
  check_batched_seeds("logsumexp axis 1", [](const std::vector<Tensor>& t) { return logsumexp(t[0], 1); }, {x});
  check_batched_seeds("logsumexp axis -1 keepdim", [](const std::vector<Tensor>& t) { return logsumexp(t[0], -1, true); },
                      {x});
  check_batched_seeds("logsumexp axis 0", [](const std::vector<Tensor>& t) { return logsumexp(t[0], 0); }, {x}, 4);
  check_batched_seeds("max axis 1", [](const std::vector<Tensor>& t) { return hesse::max(square(t[0]), 1); }, {x});
  check_batched_seeds("sum_to [3,1]", [](const std::vector<Tensor>& t) { return sum_to(t[0], {3, 1}); }, {x});
}

// A gradient summed over broadcast dims takes a direct route when nothing is
// recorded (the passes that take Hessian rows) and the general one when it is:
// both give exactly the same values, with and without seed batches.
BOOST_AUTO_TEST_CASE(broadcast_gradients_are_the_same_recorded_or_not) {
  Generator gen(12);
  using Op = std::function<Tensor(const Tensor&, const Tensor&)>;
  const std::vector<std::tuple<std::string, Op, Shape, Shape>> cases = {
      {"shared A @ batched B", [](const Tensor& a, const Tensor& b) { return matmul(a, b); }, {3, 2}, {4, 2, 5}},
      {"batched A @ shared B", [](const Tensor& a, const Tensor& b) { return matmul(a, b); }, {4, 3, 2}, {2, 5}},
      {"x + bias", [](const Tensor& a, const Tensor& b) { return a + b; }, {6, 5}, {5}},
      {"x * row of [1, 5]", [](const Tensor& a, const Tensor& b) { return a * b; }, {2, 3, 5}, {1, 5}},
      {"x * column (general route only)", [](const Tensor& a, const Tensor& b) { return a * b; }, {3, 4}, {3, 1}},
      {"x * scalar", [](const Tensor& a, const Tensor& b) { return a * b; }, {3, 4}, {}}};
  for (const auto& [name, op, sa, sb] : cases)
    for (const std::size_t seeds : {0, 3}) {
      BOOST_TEST_CONTEXT(name << ", " << seeds << " seeds") {
        const Tensor a = normal(sa, gen), b = normal(sb, gen);
        const Tensor y = op(a, b);
        Shape seed_shape = seeds ? Shape{seeds} : Shape{};  // (push_back: GCC misreads svector::insert here)
        for (const std::size_t d : y.shape()) seed_shape.push_back(d);
        const Tensor seed = normal(seed_shape, gen);  // requiring grad: recorded, the gradients require it too
        GradOptions o;
        o.batched_grad_outputs = seeds > 0;
        o.retain_graph = true;
        const std::vector<Tensor> direct = grad({y}, {a, b}, {seed}, o);
        o.create_graph = true;
        const std::vector<Tensor> recorded = grad({y}, {a, b}, {seed}, o);
        for (std::size_t i = 0; i < 2; ++i) {
          BOOST_TEST(recorded[i].requires_grad());
          CHECK_CLOSE(direct[i], recorded[i], 0.0);
        }
      }
    }
  // a broadcast over dims of size 1 only sums nothing: the seed's values, -0.0 included, pass unchanged
  const Tensor row = normal({1, 3}, gen), bias = normal({3}, gen);
  const Tensor seed = Tensor{{-0.0, 2.0, -0.0}};
  const Tensor g = grad(row + bias, bias, seed);
  for (std::size_t j = 0; j < 3; ++j) BOOST_TEST(std::signbit(g.data()[j]) == std::signbit(seed.data()[j]));
}
