#define BOOST_TEST_MODULE shape
#include "op_checks.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <xtensor/xarray.hpp>
#include <xtensor/xbuilder.hpp>
#include <xtensor/xmath.hpp>

using namespace hesse;
using namespace hesse::testing;

namespace {


/// Entries `pos` along `axis` (plain loops): out[a, j, c] = x[a, pos[j], c].
Tensor reference_take(const Tensor& x, std::size_t axis, const std::vector<std::size_t>& pos) {
  const Shape& s = x.shape();
  std::size_t outer = 1, inner = 1;
  for (std::size_t d = 0; d < axis; ++d) outer *= s[d];
  for (std::size_t d = axis + 1; d < s.size(); ++d) inner *= s[d];
  Shape os = s;
  os[axis] = pos.size();
  Tensor out = Tensor::empty(os);
  for (std::size_t a = 0; a < outer; ++a)
    for (std::size_t j = 0; j < pos.size(); ++j)
      for (std::size_t c = 0; c < inner; ++c)
        out.mutable_data()[(a * pos.size() + j) * inner + c] = x.data()[(a * s[axis] + pos[j]) * inner + c];
  return out;
}

/// out[a, j, c] = x[a, index[a, j, c], c] along `axis`.
Tensor reference_gather(const Tensor& x, std::size_t axis, const Tensor& index) {
  const Shape& s = index.shape();
  std::size_t outer = 1, inner = 1;
  for (std::size_t d = 0; d < axis; ++d) outer *= s[d];
  for (std::size_t d = axis + 1; d < s.size(); ++d) inner *= s[d];
  Tensor out = Tensor::empty(s);
  const std::size_t m = s[axis], n = x.shape()[axis];
  for (std::size_t a = 0; a < outer; ++a)
    for (std::size_t j = 0; j < m; ++j)
      for (std::size_t c = 0; c < inner; ++c) {
        const std::size_t at = (a * m + j) * inner + c;
        out.mutable_data()[at] = x.data()[(a * n + std::size_t(index.data()[at])) * inner + c];
      }
  return out;
}

/// Integer-valued index tensor with entries in [0, n).
Tensor random_index(const Shape& s, std::size_t n, Generator& gen) {
  Tensor t = Tensor::empty(s);
  for (std::size_t i = 0; i < t.numel(); ++i) t.mutable_data()[i] = std::floor(gen.uniform(0.0, double(n)));
  return t;
}

Tensor xt_tensor(const xt::xarray<double>& a) { return Tensor(a); }

/// An n×1 tensor (Tensor{{a}, {b}} is ambiguous between 1-D and 2-D).
Tensor column(std::initializer_list<double> v) { return reshape(Tensor(v), {std::int64_t(v.size()), 1}); }

}  // namespace

// ---- reshape family ----

BOOST_AUTO_TEST_CASE(reshape_values) {
  Generator gen(1);
  const Tensor x = randn({2, 3, 4}, gen);
  struct Case {
    std::vector<std::int64_t> dims;
    Shape want;
  };
  const std::vector<Case> cases = {{{6, 4}, {6, 4}}, {{-1}, {24}},        {{4, -1}, {4, 6}},   {{2, -1, 3}, {2, 4, 3}},
                                   {{24}, {24}},     {{1, 24, 1}, {1, 24, 1}}, {{-1, 1}, {24, 1}}, {{2, 3, 4}, {2, 3, 4}}};
  for (const Case& c : cases) {
    const Tensor y = reshape(x, c.dims);
    BOOST_REQUIRE_MESSAGE(y.shape() == c.want, to_string(y.shape()) << " vs " << to_string(c.want));
    for (std::size_t i = 0; i < 24; ++i) BOOST_CHECK_EQUAL(y.data()[i], x.data()[i]);
  }
  BOOST_CHECK(reshape(x, {3, 8}).shape() == Shape({3, 8}));           // initializer list
  BOOST_CHECK(reshape(x, Shape{8, 3}).shape() == Shape({8, 3}));      // Shape
  BOOST_CHECK(reshape(Tensor(2.0), {1, 1}).shape() == Shape({1, 1}));  // 0-d
  BOOST_CHECK(reshape(ones({1}), Shape{}).shape() == Shape{});
  BOOST_CHECK(reshape(zeros({0, 3}), {-1, 3}).shape() == Shape({0, 3}));
  CHECK_CLOSE(reshape(x, {4, 6}), xt_tensor(xt::xarray<double>(xt::reshape_view(x.value(), {4, 6}))), 0.0);
}

BOOST_AUTO_TEST_CASE(flatten_squeeze_unsqueeze_values) {
  Generator gen(2);
  const Tensor x = randn({2, 3, 4, 5}, gen);
  BOOST_CHECK(flatten(x).shape() == Shape({120}));
  BOOST_CHECK(flatten(x, 1).shape() == Shape({2, 60}));
  BOOST_CHECK(flatten(x, 1, 2).shape() == Shape({2, 12, 5}));
  BOOST_CHECK(flatten(x, -2, -1).shape() == Shape({2, 3, 20}));
  BOOST_CHECK(flatten(x, 2, 2).shape() == Shape({2, 3, 4, 5}));
  BOOST_CHECK(flatten(Tensor(3.0)).shape() == Shape({1}));
  for (std::size_t i = 0; i < x.numel(); ++i) BOOST_CHECK_EQUAL(flatten(x, 0, 1).data()[i], x.data()[i]);

  const Tensor y = randn({3, 1, 2, 1}, gen);
  BOOST_CHECK(squeeze(y, 1).shape() == Shape({3, 2, 1}));
  BOOST_CHECK(squeeze(y, -1).shape() == Shape({3, 1, 2}));
  BOOST_CHECK(squeeze(ones({1}), 0).shape() == Shape{});
  CHECK_CLOSE(flatten(squeeze(y, 3)), flatten(y), 0.0);
  BOOST_CHECK(unsqueeze(y, 0).shape() == Shape({1, 3, 1, 2, 1}));
  BOOST_CHECK(unsqueeze(y, 4).shape() == Shape({3, 1, 2, 1, 1}));
  BOOST_CHECK(unsqueeze(y, -1).shape() == Shape({3, 1, 2, 1, 1}));
  BOOST_CHECK(unsqueeze(y, -5).shape() == Shape({1, 3, 1, 2, 1}));
  BOOST_CHECK(unsqueeze(y, 2).shape() == Shape({3, 1, 1, 2, 1}));
  BOOST_CHECK(unsqueeze(Tensor(1.0), 0).shape() == Shape({1}));
  CHECK_CLOSE(flatten(unsqueeze(y, 2)), flatten(y), 0.0);
}

BOOST_AUTO_TEST_CASE(reshape_family_gradients) {
  Generator gen(3);
  const Tensor x = normal({2, 3, 2}, gen);
  // the gradient is the seed read in the input's shape
  const Tensor seed = randn({3, 4}, gen);
  const Tensor g = grad(reshape(x, {3, -1}), x, seed);
  BOOST_REQUIRE(g.shape() == x.shape());
  for (std::size_t i = 0; i < 12; ++i) BOOST_CHECK_EQUAL(g.data()[i], seed.data()[i]);
  check_derivatives("reshape -1", [](const std::vector<Tensor>& t) { return reshape(t[0], {-1, 4}); }, {x});
  check_derivatives("reshape^2", [](const std::vector<Tensor>& t) { return square(reshape(t[0], {6, 2})); }, {x});
  check_derivatives("flatten", [](const std::vector<Tensor>& t) { return flatten(t[0], 1); }, {x});
  check_derivatives("squeeze", [](const std::vector<Tensor>& t) { return squeeze(t[0], 1); }, {normal({3, 1, 2}, gen)});
  check_derivatives("unsqueeze", [](const std::vector<Tensor>& t) { return hesse::sin(unsqueeze(t[0], -2)); }, {x});
}

BOOST_AUTO_TEST_CASE(reshape_family_errors) {
  const Tensor x = zeros({2, 3, 4});
  HESSE_CHECK_THROWS(reshape(x, {5, 5}), hesse::ShapeError, "hesse::reshape");
  HESSE_CHECK_THROWS(reshape(x, {-1, -1}), hesse::ShapeError, "hesse::reshape");
  HESSE_CHECK_THROWS(reshape(x, {-2, 12}), hesse::ShapeError, "hesse::reshape");
  HESSE_CHECK_THROWS(reshape(x, {5, -1}), hesse::ShapeError, "hesse::reshape");
  HESSE_CHECK_THROWS(reshape(x, {0, -1}), hesse::ShapeError, "hesse::reshape");
  HESSE_CHECK_THROWS(reshape(x, Shape{25}), hesse::ShapeError, "hesse::reshape");
  check_message<ShapeError>([&] { reshape(x, {5, 5}); }, {"hesse::reshape", "[2, 3, 4]", "[5, 5]"});
  check_message<ShapeError>([&] { reshape(x, {5, -1}); }, {"hesse::reshape", "[2, 3, 4]"});
  check_message<ShapeError>([&] { reshape(x, {-1, -1}); }, {"hesse::reshape", "[2, 3, 4]"});
  HESSE_CHECK_THROWS(flatten(x, 2, 1), hesse::IndexError, "hesse::flatten");
  HESSE_CHECK_THROWS(flatten(x, 0, 3), hesse::IndexError, "hesse::flatten");
  HESSE_CHECK_THROWS(flatten(x, -4), hesse::IndexError, "hesse::flatten");
  HESSE_CHECK_THROWS(flatten(Tensor(1.0), 1), hesse::IndexError, "hesse::flatten");
  BOOST_CHECK(flatten(Tensor(1.0), -1, 0).shape() == Shape({1}));
  check_message<IndexError>([&] { flatten(x, 2, 1); }, {"hesse::flatten", "[2, 3, 4]"});
  HESSE_CHECK_THROWS(squeeze(x, 0), hesse::ShapeError, "hesse::squeeze");
  HESSE_CHECK_THROWS(squeeze(x, 3), hesse::IndexError, "hesse::squeeze");
  HESSE_CHECK_THROWS(squeeze(Tensor(1.0), 0), hesse::IndexError, "hesse::squeeze");
  check_message<ShapeError>([&] { squeeze(x, -1); }, {"hesse::squeeze", "[2, 3, 4]", "axis -1"});
  HESSE_CHECK_THROWS(unsqueeze(x, 4), hesse::IndexError, "hesse::unsqueeze");
  HESSE_CHECK_THROWS(unsqueeze(x, -5), hesse::IndexError, "hesse::unsqueeze");
}

// ---- expand ----

BOOST_AUTO_TEST_CASE(expand_values_gradients_errors) {
  Generator gen(4);
  struct Case {
    Shape from, to;
  };
  const std::vector<Case> cases = {{{3, 1}, {2, 3, 4}}, {{}, {2, 2}},    {{4}, {3, 4}},
                                   {{1, 4}, {1, 4}},    {{2, 1, 3}, {2, 5, 3}}, {{1}, {0, 3}}};
  for (const Case& c : cases) {
    const Tensor x = normal(c.from, gen);
    const Tensor y = expand(x, c.to);
    BOOST_REQUIRE(y.shape() == c.to);
    const xt::xarray<double> want = xt::broadcast(x.value(), std::vector<std::size_t>(c.to.begin(), c.to.end()));
    CHECK_CLOSE(y, xt_tensor(want), 0.0);
    if (numel_of(c.to) > 0)
      check_derivatives("expand " + to_string(c.from) + " -> " + to_string(c.to),
                        [to = c.to](const std::vector<Tensor>& t) { return expand(t[0], to); }, {x});
  }
  // the gradient sums the seed over the broadcast dims
  const Tensor x = normal({3, 1}, gen);
  const Tensor seed = randn({2, 3, 4}, gen);
  const xt::xarray<double> want = xt::sum(seed.value(), {0, 2}, xt::evaluation_strategy::immediate);
  CHECK_CLOSE(grad(expand(x, {2, 3, 4}), x, seed), reshape(xt_tensor(want), {3, 1}), 1e-14);
  check_derivatives("expand^3", [](const std::vector<Tensor>& t) { return hesse::pow(expand(t[0], {2, 3, 2}), 3.0); },
                    {x});
  HESSE_CHECK_THROWS(expand(zeros({3}), {4}), hesse::ShapeError, "hesse::expand");
  HESSE_CHECK_THROWS(expand(zeros({2, 3}), {3}), hesse::ShapeError, "hesse::expand");
  HESSE_CHECK_THROWS(expand(zeros({2, 3}), {2, 1}), hesse::ShapeError, "hesse::expand");
  check_message<ShapeError>([] { expand(zeros({2, 3}), {3}); }, {"hesse::expand", "[2, 3]", "[3]"});
  check_message<ShapeError>([] { expand(zeros({3}), {2, 4}); }, {"hesse::expand", "[3]", "[2, 4]"});
}

// ---- concatenate, stack, hstack ----

BOOST_AUTO_TEST_CASE(concatenate_values) {
  Generator gen(5);
  const Tensor a = randn({2, 3, 4}, gen), b = randn({2, 1, 4}, gen), c = randn({2, 2, 4}, gen);
  const Tensor got = concatenate({a, b, c}, 1);
  BOOST_REQUIRE(got.shape() == Shape({2, 6, 4}));
  // plain loops: position j along axis 1 comes from a (j < 3), b (j == 3) or c
  for (std::size_t i = 0; i < 2; ++i)
    for (std::size_t j = 0; j < 6; ++j)
      for (std::size_t k = 0; k < 4; ++k) {
        const double want = j < 3    ? a.data()[(i * 3 + j) * 4 + k]
                            : j == 3 ? b.data()[i * 4 + k]
                                     : c.data()[(i * 2 + (j - 4)) * 4 + k];
        BOOST_CHECK_EQUAL(got.data()[(i * 6 + j) * 4 + k], want);
      }
  CHECK_CLOSE(concatenate({a, b, c}, -2), got, 0.0);
  const Tensor d = randn({2, 3, 1}, gen);
  CHECK_CLOSE(concatenate({a, d}, -1), xt_tensor(xt::concatenate(xt::xtuple(a.value(), d.value()), 2)), 0.0);
  const Tensor e = randn({1, 3, 4}, gen);
  CHECK_CLOSE(concatenate({a, e}), xt_tensor(xt::concatenate(xt::xtuple(a.value(), e.value()), 0)), 0.0);
  CHECK_CLOSE(concatenate({a}, 1), a, 0.0);
  CHECK_CLOSE(concatenate({a, zeros({2, 0, 4})}, 1), a, 0.0);
  // stack
  const Tensor s1 = randn({3, 2}, gen), s2 = randn({3, 2}, gen);
  for (int axis : {0, 1, 2, -1, -3}) {
    const std::size_t ax = std::size_t(axis < 0 ? axis + 3 : axis);
    // out[i0, i1, i2] = (i_ax == 0 ? s1 : s2)[the other two indices]
    const Tensor got = stack({s1, s2}, axis);
    const Shape want_shape = ax == 0 ? Shape{2, 3, 2} : ax == 1 ? Shape{3, 2, 2} : Shape{3, 2, 2};
    BOOST_REQUIRE(got.shape() == want_shape);
    for (std::size_t flat = 0; flat < 12; ++flat) {
      std::size_t idx[3], rem = flat;
      for (std::size_t d = 3; d-- > 0;) idx[d] = rem % want_shape[d], rem /= want_shape[d];
      std::size_t rest[2], r = 0;
      for (std::size_t d = 0; d < 3; ++d)
        if (d != ax) rest[r++] = idx[d];
      const Tensor& src = idx[ax] == 0 ? s1 : s2;
      BOOST_CHECK_EQUAL(got.data()[flat], src.data()[rest[0] * 2 + rest[1]]);
    }
  }
  BOOST_CHECK(stack({Tensor(1.0), Tensor(2.0), Tensor(3.0)}).shape() == Shape({3}));
  // hstack: axis 0 for vectors, axis 1 otherwise; scalars count as length-1 vectors
  CHECK_CLOSE(hstack({Tensor{1.0, 2.0}, Tensor(3.0), Tensor{4.0}}), (Tensor{1.0, 2.0, 3.0, 4.0}), 0.0);
  const Tensor h = randn({3, 4}, gen);
  CHECK_CLOSE(hstack({s1, h}), xt_tensor(xt::hstack(xt::xtuple(s1.value(), h.value()))), 0.0);
  CHECK_CLOSE(hstack({a, b}), concatenate({a, b}, 1), 0.0);  // 3-D: axis 1
}

BOOST_AUTO_TEST_CASE(concatenate_gradients) {
  Generator gen(6);
  const Tensor a = normal({2, 3}, gen), b = normal({2, 1}, gen), c = normal({2, 2}, gen);
  const Tensor seed = randn({2, 6}, gen);
  const std::vector<Tensor> g = grad({concatenate({a, b, c}, 1)}, {a, b, c}, {seed});
  CHECK_CLOSE(g[0], reference_take(seed, 1, {0, 1, 2}), 0.0);
  CHECK_CLOSE(g[1], reference_take(seed, 1, {3}), 0.0);
  CHECK_CLOSE(g[2], reference_take(seed, 1, {4, 5}), 0.0);
  check_derivatives("concatenate axis 1", [](const std::vector<Tensor>& t) { return concatenate(t, 1); }, {a, b, c});
  check_derivatives("concatenate axis 0", [](const std::vector<Tensor>& t) { return concatenate(t, 0); },
                    {normal({1, 2}, gen), normal({3, 2}, gen)});
  check_derivatives("concatenate(x, x^2)",
                    [](const std::vector<Tensor>& t) { return concatenate({t[0], square(t[0])}, -1); }, {a});
  // an input that does not require grad
  check_derivatives("concatenate with a constant", [](const std::vector<Tensor>& t) { return concatenate(t, 0); },
                    {a, randn({1, 3}, gen)});
  check_derivatives("stack axis 1", [](const std::vector<Tensor>& t) { return stack(t, 1); },
                    {normal({2, 2}, gen), normal({2, 2}, gen)});
  check_derivatives("stack 0-d", [](const std::vector<Tensor>& t) { return stack(t); },
                    {normal({}, gen), normal({}, gen)});
  check_derivatives("hstack", [](const std::vector<Tensor>& t) { return hstack(t); }, {a, b});
  check_derivatives("hstack 1-D", [](const std::vector<Tensor>& t) { return hstack(t); },
                    {normal({2}, gen), normal({}, gen)});
}

BOOST_AUTO_TEST_CASE(concatenate_errors) {
  const Tensor a = zeros({2, 3}), b = zeros({3, 3}), c = zeros({2, 3, 1});
  HESSE_CHECK_THROWS(concatenate({}, 0), hesse::ValueError, "hesse::concatenate");
  HESSE_CHECK_THROWS(concatenate({a, b}, 1), hesse::ShapeError, "hesse::concatenate");
  HESSE_CHECK_THROWS(concatenate({a, c}, 0), hesse::ShapeError, "hesse::concatenate");
  HESSE_CHECK_THROWS(concatenate({a, b}, 2), hesse::IndexError, "hesse::concatenate");
  HESSE_CHECK_THROWS(concatenate({Tensor(1.0), Tensor(2.0)}, 0), hesse::ShapeError, "hesse::concatenate");
  check_message<ShapeError>([&] { concatenate({a, b}, 1); }, {"hesse::concatenate", "[2, 3]", "[3, 3]"});
  check_message<ShapeError>([&] { concatenate({a, c}, -1); }, {"hesse::concatenate", "[2, 3]", "[2, 3, 1]"});
  HESSE_CHECK_THROWS(stack({}, 0), hesse::ValueError, "hesse::stack");
  HESSE_CHECK_THROWS(stack({a, b}, 0), hesse::ShapeError, "hesse::stack");
  HESSE_CHECK_THROWS(stack({a, a}, 3), hesse::IndexError, "hesse::stack");
  check_message<ShapeError>([&] { stack({a, b}); }, {"hesse::stack", "[2, 3]", "[3, 3]"});
  HESSE_CHECK_THROWS(hstack({}), hesse::ValueError, "hesse::hstack");
  HESSE_CHECK_THROWS(hstack({a, zeros({3, 1})}), hesse::ShapeError, "hesse::hstack");
  check_message<ShapeError>([&] { hstack({a, zeros({3, 1})}); }, {"hesse::hstack", "[2, 3]", "[3, 1]"});
}

// ---- slice and index_select ----

BOOST_AUTO_TEST_CASE(slice_values) {
  Generator gen(7);
  const Tensor x = randn({3, 7, 2}, gen);
  struct Case {
    int axis;
    std::int64_t start, stop, step;
    std::vector<std::size_t> pos;
  };
  const std::vector<Case> cases = {
      {1, 0, 7, 1, {0, 1, 2, 3, 4, 5, 6}}, {1, 2, 5, 1, {2, 3, 4}}, {1, -3, 7, 1, {4, 5, 6}},
      {1, -5, -1, 1, {2, 3, 4, 5}},        {1, 0, 7, 2, {0, 2, 4, 6}}, {1, 1, 7, 3, {1, 4}},
      {1, -6, -1, 2, {1, 3, 5}},           {1, -100, 100, 1, {0, 1, 2, 3, 4, 5, 6}},
      {1, 5, 2, 1, {}},                    {1, 3, 4, 5, {3}},          {0, -1, 3, 1, {2}},
      {-1, 1, 2, 1, {1}},                  {-3, 0, 3, 2, {0, 2}},      {1, 7, 9, 1, {}},
      {1, 2, 7, INT64_MAX, {2}},           {1, -100, 100, INT64_MAX - 1, {0}}};  // (stop - start + step) overflowed
  for (const Case& c : cases) {
    BOOST_TEST_CONTEXT("slice axis " << c.axis << " " << c.start << ":" << c.stop << ":" << c.step) {
      const std::size_t ax = std::size_t(c.axis < 0 ? c.axis + 3 : c.axis);
      const Tensor got = slice(x, c.axis, c.start, c.stop, c.step);
      const Tensor want = reference_take(x, ax, c.pos);
      BOOST_REQUIRE(got.shape() == want.shape());
      CHECK_CLOSE(got, want, 0.0);
    }
  }
}

BOOST_AUTO_TEST_CASE(index_select_values) {
  Generator gen(8);
  const Tensor x = randn({3, 4, 2}, gen);
  CHECK_CLOSE(index_select(x, 1, {3, 0, 0, -1, 2, -4}), reference_take(x, 1, {3, 0, 0, 3, 2, 0}), 0.0);
  CHECK_CLOSE(index_select(x, 0, {2, 2}), reference_take(x, 0, {2, 2}), 0.0);
  CHECK_CLOSE(index_select(x, -1, {1, 0, 1}), reference_take(x, 2, {1, 0, 1}), 0.0);
  BOOST_CHECK(index_select(x, 1, {}).shape() == Shape({3, 0, 2}));
}

BOOST_AUTO_TEST_CASE(slice_and_index_select_gradients) {
  Generator gen(9);
  const Tensor x = normal({3, 5}, gen);
  // repeated indices accumulate
  const Tensor seed = randn({3, 4}, gen);
  const Tensor g = grad(index_select(x, 1, {4, 1, 4, -1}), x, seed);
  for (std::size_t r = 0; r < 3; ++r) {
    const double* s = seed.data() + r * 4;
    const std::vector<double> want = {0.0, s[1], 0.0, 0.0, s[0] + s[2] + s[3]};
    for (std::size_t c = 0; c < 5; ++c) BOOST_CHECK_EQUAL(g.data()[r * 5 + c], want[c]);
  }
  const Tensor gs = grad(sum(slice(x, 1, -4, 5, 2)), x);
  CHECK_CLOSE(gs, (Tensor{{0, 1, 0, 1, 0}, {0, 1, 0, 1, 0}, {0, 1, 0, 1, 0}}), 0.0);
  check_derivatives("slice", [](const std::vector<Tensor>& t) { return slice(t[0], 1, 1, 4); }, {x});
  check_derivatives("slice negative step 2", [](const std::vector<Tensor>& t) { return slice(t[0], -1, -5, -1, 2); },
                    {x});
  check_derivatives("slice axis 0", [](const std::vector<Tensor>& t) { return slice(t[0], 0, -2, 3); }, {x});
  check_derivatives("slice^2", [](const std::vector<Tensor>& t) { return square(slice(t[0], 1, 0, 5, 3)); }, {x});
  check_derivatives("index_select", [](const std::vector<Tensor>& t) { return index_select(t[0], 1, {4, 1, 4, -1}); },
                    {x});
  check_derivatives("index_select^3",
                    [](const std::vector<Tensor>& t) { return hesse::pow(index_select(t[0], 0, {2, -3, 2}), 3.0); }, {x});
}

BOOST_AUTO_TEST_CASE(slice_and_index_select_errors) {
  const Tensor x = zeros({3, 4});
  HESSE_CHECK_THROWS(slice(x, 1, 0, 4, 0), hesse::ValueError, "hesse::slice");
  HESSE_CHECK_THROWS(slice(x, 1, 0, 4, -1), hesse::ValueError, "hesse::slice");
  HESSE_CHECK_THROWS(slice(x, 2, 0, 1), hesse::IndexError, "hesse::slice");
  HESSE_CHECK_THROWS(slice(x, -3, 0, 1), hesse::IndexError, "hesse::slice");
  check_message<ValueError>([&] { slice(x, 1, 0, 4, 0); }, {"hesse::slice", "[3, 4]"});
  HESSE_CHECK_THROWS(index_select(x, 1, {4}), hesse::IndexError, "hesse::index_select");
  HESSE_CHECK_THROWS(index_select(x, 1, {0, -5}), hesse::IndexError, "hesse::index_select");
  HESSE_CHECK_THROWS(index_select(x, 2, {0}), hesse::IndexError, "hesse::index_select");
  check_message<IndexError>([&] { index_select(x, 0, {1, 3}); }, {"hesse::index_select", "index 3", "[3, 4]"});
}

// ---- gather ----

BOOST_AUTO_TEST_CASE(gather_values_and_gradients) {
  Generator gen(10);
  const Tensor x = normal({3, 4, 2}, gen);
  for (int axis : {0, 1, 2, -1}) {
    const std::size_t ax = std::size_t(axis < 0 ? axis + 3 : axis);
    Shape is = x.shape();
    is[ax] = 5;  // more entries than the axis has: repeats
    const Tensor index = random_index(is, x.shape()[ax], gen);
    const Tensor got = gather(x, axis, index);
    BOOST_REQUIRE(got.shape() == is);
    CHECK_CLOSE(got, reference_gather(x.detach(), ax, index), 0.0);
    check_derivatives("gather axis " + std::to_string(axis),
                      [axis, index](const std::vector<Tensor>& t) { return gather(t[0], axis, index); }, {x});
  }
  // like the target pick of a cross-entropy
  const Tensor logits = normal({4, 3}, gen);
  const Tensor target = reshape(Tensor{2.0, 0.0, 1.0, 2.0}, {4, 1});
  const Tensor picked = gather(logits, 1, target);
  for (std::size_t i = 0; i < 4; ++i) BOOST_CHECK_EQUAL(picked.data()[i], logits.data()[i * 3 + std::size_t(target.data()[i])]);
  // the gradient scatters and adds where indices repeat
  const Tensor idx = Tensor{{1.0, 1.0, 0.0}, {2.0, 2.0, 2.0}};
  const Tensor xl = normal({2, 3}, gen);
  const Tensor gg = grad(sum(gather(xl, 1, idx)), xl);
  CHECK_CLOSE(gg, (Tensor{{1.0, 2.0, 0.0}, {0.0, 0.0, 3.0}}), 0.0);
  check_derivatives("gather^2", [idx](const std::vector<Tensor>& t) { return square(gather(t[0], 1, idx)); }, {xl});
}

BOOST_AUTO_TEST_CASE(gather_errors) {
  const Tensor x = zeros({3, 4});
  HESSE_CHECK_THROWS(gather(x, 1, column({0.0, 1.0})), hesse::ShapeError, "hesse::gather");
  HESSE_CHECK_THROWS(gather(x, 1, Tensor{0.0, 1.0}), hesse::ShapeError, "hesse::gather");
  HESSE_CHECK_THROWS(gather(x, 1, column({0.0, 4.0, 1.0})), hesse::IndexError, "hesse::gather");
  HESSE_CHECK_THROWS(gather(x, 1, column({0.0, -1.0, 1.0})), hesse::IndexError, "hesse::gather");
  HESSE_CHECK_THROWS(gather(x, 1, column({0.0, 0.5, 1.0})), hesse::ValueError, "hesse::gather");
  HESSE_CHECK_THROWS(gather(x, 2, column({0.0, 0.0, 1.0})), hesse::IndexError, "hesse::gather");
  check_message<ShapeError>([&] { gather(x, 1, column({0.0, 1.0})); }, {"hesse::gather", "[2, 1]", "[3, 4]"});
  check_message<IndexError>([&] { gather(x, 1, column({0.0, 4.0, 1.0})); }, {"hesse::gather", "[3, 4]"});
}

// ---- softmax and log_softmax ----

BOOST_AUTO_TEST_CASE(softmax_values) {
  Generator gen(11);
  const Tensor x = randn({3, 4, 5}, gen);
  for (int axis : {0, 1, 2, -1}) {
    const std::size_t ax = std::size_t(axis < 0 ? axis + 3 : axis);
    const xt::xarray<double> e = xt::exp(x.value());
    const xt::xarray<double> z = xt::sum(e, {ax}, xt::keep_dims | xt::evaluation_strategy::immediate);
    const xt::xarray<double> want = e / z;
    CHECK_CLOSE(softmax(x, axis), xt_tensor(want), 1e-15);
    CHECK_CLOSE(log_softmax(x, axis), xt_tensor(xt::xarray<double>(xt::log(want))), 1e-14);
    // lanes sum to 1
    const Tensor s = sum(softmax(x, axis), {axis});
    CHECK_CLOSE(s, ones(s.shape()), 1e-15);
  }
  // stability: shifting every entry by ±1000 changes nothing
  for (const double shift : {1000.0, -1000.0}) {
    const Tensor xs = x + shift;
    // xs - shift is exact; lse itself is rounded at the scale of 1000 (ulp ~1e-13)
    const xt::xarray<double> e = xt::exp(xs.value() - shift);
    const xt::xarray<double> want = e / xt::sum(e, {2}, xt::keep_dims | xt::evaluation_strategy::immediate);
    CHECK_CLOSE(softmax(xs, -1), xt_tensor(want), 1e-12);
    CHECK_CLOSE(log_softmax(xs, -1), xt_tensor(xt::xarray<double>(xt::log(want))), 1e-12);
  }
  const Tensor extreme = Tensor{{1000.0, 0.0, -1000.0}};
  CHECK_CLOSE(softmax(extreme, 1), (Tensor{{1.0, 0.0, 0.0}}), 0.0);
  CHECK_CLOSE(log_softmax(extreme, 1), (Tensor{{0.0, -1000.0, -2000.0}}), 1e-12);
}

BOOST_AUTO_TEST_CASE(softmax_gradients) {
  Generator gen(12);
  const Tensor x = normal({2, 4}, gen);
  // Jacobian of softmax: diag(s) - s sᵀ, per row
  const Tensor s = softmax(x.detach(), 1);
  for (std::size_t k = 0; k < 4; ++k) {
    Tensor seed = zeros({2, 4});
    seed.mutable_data()[k] = 1.0;  // row 0, entry k
    const Tensor g = grad(softmax(x, 1), x, seed);
    for (std::size_t j = 0; j < 4; ++j) {
      const double want = (j == k ? s.data()[k] : 0.0) - s.data()[k] * s.data()[j];
      BOOST_CHECK_SMALL(g.data()[j] - want, 1e-15);
      BOOST_CHECK_EQUAL(g.data()[4 + j], 0.0);
    }
  }
  check_derivatives("softmax", [](const std::vector<Tensor>& t) { return softmax(t[0], 1); }, {x});
  check_derivatives("softmax axis 0", [](const std::vector<Tensor>& t) { return softmax(t[0], 0); }, {x});
  check_derivatives("log_softmax", [](const std::vector<Tensor>& t) { return log_softmax(t[0], -1); }, {x});
  check_derivatives("log_softmax 3-D", [](const std::vector<Tensor>& t) { return log_softmax(t[0], 1); },
                    {normal({2, 3, 2}, gen)});
  HESSE_CHECK_THROWS(softmax(x, 2), hesse::IndexError, "hesse::");
  HESSE_CHECK_THROWS(log_softmax(x, -3), hesse::IndexError, "hesse::");
}

// ---- batched seeds ----

BOOST_AUTO_TEST_CASE(batched_seeds_shape_ops) {
  Generator gen(13);
  const Tensor x = normal({2, 3, 4}, gen);
  check_batched_seeds("reshape", [](const std::vector<Tensor>& t) { return reshape(t[0], {4, -1}); }, {x});
  check_batched_seeds("flatten", [](const std::vector<Tensor>& t) { return flatten(t[0], 1); }, {x});
  check_batched_seeds("unsqueeze+squeeze",
                      [](const std::vector<Tensor>& t) { return squeeze(unsqueeze(t[0], 1), -3); }, {x});
  check_batched_seeds("expand", [](const std::vector<Tensor>& t) { return expand(t[0], {2, 3, 4}); },
                      {normal({3, 1}, gen)});
  check_batched_seeds("expand^2", [](const std::vector<Tensor>& t) { return square(expand(t[0], {2, 5, 3})); },
                      {normal({5, 1}, gen)});
  check_batched_seeds("concatenate axis 1", [](const std::vector<Tensor>& t) { return concatenate(t, 1); },
                      {x, normal({2, 1, 4}, gen), normal({2, 2, 4}, gen)});
  check_batched_seeds("concatenate axis 0", [](const std::vector<Tensor>& t) { return concatenate(t, 0); },
                      {x, normal({1, 3, 4}, gen)});
  check_batched_seeds("stack axis -1", [](const std::vector<Tensor>& t) { return stack(t, -1); },
                      {normal({2, 3}, gen), normal({2, 3}, gen)});
  check_batched_seeds("concatenate(x, x^2)",
                      [](const std::vector<Tensor>& t) { return concatenate({t[0], square(t[0])}, 1); }, {x});
  check_batched_seeds("slice", [](const std::vector<Tensor>& t) { return slice(t[0], 2, -3, 4, 2); }, {x});
  check_batched_seeds("slice axis 0", [](const std::vector<Tensor>& t) { return slice(t[0], 0, 1, 2); }, {x});
  check_batched_seeds("slice^3", [](const std::vector<Tensor>& t) { return hesse::pow(slice(t[0], 1, 0, 3, 2), 3.0); },
                      {x});
  check_batched_seeds("index_select", [](const std::vector<Tensor>& t) { return index_select(t[0], 1, {2, 0, 2, -1}); },
                      {x});
  check_batched_seeds("index_select^2",
                      [](const std::vector<Tensor>& t) { return square(index_select(t[0], -1, {3, 3, 0})); }, {x});
  const Tensor index = random_index({2, 5, 4}, 3, gen);
  check_batched_seeds("gather", [index](const std::vector<Tensor>& t) { return gather(t[0], 1, index); }, {x});
  check_batched_seeds("gather^2", [index](const std::vector<Tensor>& t) { return square(gather(t[0], 1, index)); },
                      {x});
  const Tensor index0 = random_index({4, 3, 4}, 2, gen);
  check_batched_seeds("gather axis 0", [index0](const std::vector<Tensor>& t) { return gather(t[0], 0, index0); },
                      {x});
  check_batched_seeds("softmax", [](const std::vector<Tensor>& t) { return softmax(t[0], -1); }, {x});
  check_batched_seeds("log_softmax axis 0", [](const std::vector<Tensor>& t) { return log_softmax(t[0], 0); }, {x});
}
