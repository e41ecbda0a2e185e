#define BOOST_TEST_MODULE elementwise
#include "op_checks.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <xtensor/xarray.hpp>
#include <xtensor/xmath.hpp>

using namespace hesse;
using namespace hesse::testing;
namespace {


using Unary = Tensor (*)(const Tensor&);
using Closed = std::function<double(double)>;

/// out[i] = closed(x[i]) for every entry.
void check_unary_values(const std::string& name, Unary op, const Closed& closed, const Tensor& x,
                        double tol = 1e-14) {
  const Tensor y = op(x.detach());
  BOOST_REQUIRE(y.shape() == x.shape());
  double worst = 0.0;
  for (std::size_t i = 0; i < x.numel(); ++i) {
    const double want = closed(x.data()[i]);
    worst = std::max(worst, std::abs(y.data()[i] - want) / std::max(1.0, std::abs(want)));
  }
  BOOST_CHECK_MESSAGE(worst <= tol, name << ": forward differs from the closed form by " << worst);
}

/// d op(x)/dx entrywise against a closed-form derivative.
void check_unary_derivative(const std::string& name, Unary op, const Closed& derivative, const Tensor& x,
                            double tol = 1e-13) {
  const Tensor xl = leaf(x.detach());
  const Tensor g = grad(sum(op(xl)), xl);
  double worst = 0.0;
  for (std::size_t i = 0; i < x.numel(); ++i) {
    const double want = derivative(x.data()[i]);
    worst = std::max(worst, std::abs(g.data()[i] - want) / std::max(1.0, std::abs(want)));
  }
  BOOST_CHECK_MESSAGE(worst <= tol, name << ": derivative differs from the closed form by " << worst);
}

const double kPi = std::acos(-1.0);
double phi(double v) { return std::exp(-0.5 * v * v) / std::sqrt(2 * kPi); }
double Phi(double v) { return 0.5 * std::erfc(-v / std::sqrt(2.0)); }

}  // namespace

// ---- binary ops: forward with broadcasting ----

BOOST_AUTO_TEST_CASE(binary_forward_broadcasting) {
  Generator gen(1);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{2, 3}, {2, 3}}, {{3, 1}, {1, 4}}, {{2, 3, 4}, {4}}, {{4}, {2, 3, 4}}, {{5}, {}},
      {{}, {5}},        {{}, {}},         {{2, 1, 4}, {3, 1}}, {{1}, {3}},   {{2, 3, 1}, {1}}};
  for (const auto& [sa, sb] : cases) {
    const Tensor a = randn(sa, gen);
    const Tensor b = uniform(sb, gen, 0.5, 2.0).detach();
    const xt::xarray<double> va = a.value(), vb = b.value();
    const std::string shapes = to_string(sa) + " x " + to_string(sb);
    BOOST_TEST_CONTEXT(shapes) {
      CHECK_CLOSE(add(a, b), Tensor(xt::xarray<double>(va + vb)), 0.0);
      CHECK_CLOSE(sub(a, b), Tensor(xt::xarray<double>(va - vb)), 0.0);
      CHECK_CLOSE(mul(a, b), Tensor(xt::xarray<double>(va * vb)), 0.0);
      CHECK_CLOSE(div(a, b), Tensor(xt::xarray<double>(va / vb)), 0.0);
      CHECK_CLOSE(a + b, Tensor(xt::xarray<double>(va + vb)), 0.0);
      CHECK_CLOSE(a - b, Tensor(xt::xarray<double>(va - vb)), 0.0);
      CHECK_CLOSE(a * b, Tensor(xt::xarray<double>(va * vb)), 0.0);
      CHECK_CLOSE(a / b, Tensor(xt::xarray<double>(va / vb)), 0.0);
    }
  }
}

BOOST_AUTO_TEST_CASE(binary_forward_plain_loops) {
  // [3,1] x [1,4] -> [3,4] and [2,3,4] x [4], written out with explicit indices
  Generator gen(2);
  const Tensor a = randn({3, 1}, gen), b = randn({1, 4}, gen);
  const Tensor c = mul(a, b);
  BOOST_REQUIRE(c.shape() == Shape({3, 4}));
  for (std::size_t i = 0; i < 3; ++i)
    for (std::size_t j = 0; j < 4; ++j) BOOST_CHECK_EQUAL(c.data()[i * 4 + j], a.data()[i] * b.data()[j]);
  const Tensor x = randn({2, 3, 4}, gen), v = randn({4}, gen);
  const Tensor s = sub(x, v);
  BOOST_REQUIRE(s.shape() == Shape({2, 3, 4}));
  for (std::size_t i = 0; i < 24; ++i) BOOST_CHECK_EQUAL(s.data()[i], x.data()[i] - v.data()[i % 4]);
  const Tensor r = sub(v, x);  // broadcasting on the left operand
  for (std::size_t i = 0; i < 24; ++i) BOOST_CHECK_EQUAL(r.data()[i], v.data()[i % 4] - x.data()[i]);
}

BOOST_AUTO_TEST_CASE(scalar_operands_both_sides) {
  Generator gen(3);
  const Tensor x = uniform({2, 3}, gen, 0.5, 2.0).detach();
  const double s = 1.75;
  for (std::size_t i = 0; i < x.numel(); ++i) {
    const double v = x.data()[i];
    // one IEEE operation each: results are exact, as in NumPy / PyTorch
    BOOST_CHECK_EQUAL((x + s).data()[i], v + s);
    BOOST_CHECK_EQUAL((s + x).data()[i], s + v);
    BOOST_CHECK_EQUAL((x - s).data()[i], v - s);
    BOOST_CHECK_EQUAL((s - x).data()[i], s - v);
    BOOST_CHECK_EQUAL((x * s).data()[i], v * s);
    BOOST_CHECK_EQUAL((s * x).data()[i], s * v);
    BOOST_CHECK_EQUAL((x / s).data()[i], v / s);
    BOOST_CHECK_EQUAL((s / x).data()[i], s / v);
    BOOST_CHECK_EQUAL((x / 3.0).data()[i], v / 3.0);
    BOOST_CHECK_EQUAL((-x).data()[i], -v);
    BOOST_CHECK_EQUAL(neg(x).data()[i], -v);
  }
  // a 0-d Tensor mixes like a scalar
  CHECK_CLOSE(x * Tensor(s), x * s, 1e-15);
  CHECK_CLOSE(Tensor(s) - x, s - x, 1e-15);
}

// ---- binary ops: derivatives ----

BOOST_AUTO_TEST_CASE(binary_gradcheck_broadcasting) {
  Generator gen(4);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{2, 3}, {2, 3}}, {{3, 1}, {1, 4}}, {{2, 3, 2}, {2}}, {{2}, {2, 3, 2}}, {{5}, {}}, {{}, {5}}, {{2, 1, 3}, {2, 1}}};
  for (const auto& [sa, sb] : cases) {
    const std::string shapes = " " + to_string(sa) + " x " + to_string(sb);
    const Tensor a = normal(sa, gen);
    const Tensor b = uniform(sb, gen, 0.5, 1.5);
    check_derivatives("add" + shapes, [](const std::vector<Tensor>& t) { return add(t[0], t[1]); }, {a, b});
    check_derivatives("sub" + shapes, [](const std::vector<Tensor>& t) { return sub(t[0], t[1]); }, {a, b});
    check_derivatives("mul" + shapes, [](const std::vector<Tensor>& t) { return mul(t[0], t[1]); }, {a, b});
    check_derivatives("div" + shapes, [](const std::vector<Tensor>& t) { return div(t[0], t[1]); }, {a, b});
  }
}

BOOST_AUTO_TEST_CASE(binary_gradients_closed_form) {
  // d/da sum(a/b) = sum over broadcast dims of 1/b; d/db = -a/b^2 summed the same way
  Generator gen(5);
  const Tensor a = normal({3, 1}, gen), b = uniform({1, 4}, gen, 0.5, 1.5);
  const std::vector<Tensor> g = grad({sum(div(a, b))}, {a, b});
  for (std::size_t i = 0; i < 3; ++i) {
    double want = 0.0;
    for (std::size_t j = 0; j < 4; ++j) want += 1.0 / b.data()[j];
    BOOST_CHECK_CLOSE_FRACTION(g[0].data()[i], want, 1e-14);
  }
  for (std::size_t j = 0; j < 4; ++j) {
    double want = 0.0;
    for (std::size_t i = 0; i < 3; ++i) want -= a.data()[i] / (b.data()[j] * b.data()[j]);
    BOOST_CHECK_CLOSE_FRACTION(g[1].data()[j], want, 1e-13);
  }
  // mul with a 0-d operand: d/ds sum(x s) = sum(x)
  const Tensor x = normal({5}, gen), s = leaf(Tensor(0.7));
  const std::vector<Tensor> gm = grad({sum(mul(x, s))}, {x, s});
  BOOST_CHECK(gm[1].shape() == Shape{});
  BOOST_CHECK_CLOSE_FRACTION(gm[1].item(), xt::sum(x.value())(), 1e-14);
  CHECK_CLOSE(gm[0], full({5}, 0.7), 0.0);
}

BOOST_AUTO_TEST_CASE(scalar_operand_gradcheck) {
  Generator gen(6);
  const Tensor x = uniform({2, 3}, gen, 0.5, 2.0);
  const double s = -1.3;
  check_derivatives("x + s", [s](const std::vector<Tensor>& t) { return t[0] + s; }, {x});
  check_derivatives("s + x", [s](const std::vector<Tensor>& t) { return s + t[0]; }, {x});
  check_derivatives("x - s", [s](const std::vector<Tensor>& t) { return t[0] - s; }, {x});
  check_derivatives("s - x", [s](const std::vector<Tensor>& t) { return s - t[0]; }, {x});
  check_derivatives("x * s", [s](const std::vector<Tensor>& t) { return t[0] * s; }, {x});
  check_derivatives("s * x", [s](const std::vector<Tensor>& t) { return s * t[0]; }, {x});
  check_derivatives("x / s", [s](const std::vector<Tensor>& t) { return t[0] / s; }, {x});
  check_derivatives("s / x", [s](const std::vector<Tensor>& t) { return s / t[0]; }, {x});
  check_derivatives("-x", [](const std::vector<Tensor>& t) { return -t[0]; }, {x});
  check_derivatives("neg", [](const std::vector<Tensor>& t) { return neg(t[0]); }, {x});
  // second derivative of s / x is 2 s / x^3
  const Tensor xl = leaf(Tensor{0.8, 1.6});
  GradOptions cg;
  cg.create_graph = true;
  const Tensor g1 = grad(sum(s / xl), xl, Tensor(), cg);
  const Tensor g2 = grad(sum(g1), xl);
  for (std::size_t i = 0; i < 2; ++i) {
    const double v = xl.data()[i];
    BOOST_CHECK_CLOSE_FRACTION(g1.data()[i], -s / (v * v), 1e-14);
    BOOST_CHECK_CLOSE_FRACTION(g2.data()[i], 2 * s / (v * v * v), 1e-14);
  }
}

BOOST_AUTO_TEST_CASE(binary_shape_errors) {
  const Tensor a = zeros({2, 3}), b = zeros({4}), c = zeros({3, 2});
  HESSE_CHECK_THROWS(add(a, b), hesse::ShapeError, "hesse::add");
  HESSE_CHECK_THROWS(sub(a, b), hesse::ShapeError, "hesse::sub");
  HESSE_CHECK_THROWS(mul(a, c), hesse::ShapeError, "hesse::mul");
  HESSE_CHECK_THROWS(div(a, c), hesse::ShapeError, "hesse::div");
  HESSE_CHECK_THROWS(a + b, hesse::ShapeError, "hesse::add");
  HESSE_CHECK_THROWS(a - b, hesse::ShapeError, "hesse::sub");
  HESSE_CHECK_THROWS(a * b, hesse::ShapeError, "hesse::mul");
  HESSE_CHECK_THROWS(a / b, hesse::ShapeError, "hesse::div");
  check_message<ShapeError>([&] { add(a, b); }, {"hesse::add", "[2, 3]", "[4]"});
  check_message<ShapeError>([&] { mul(zeros({2, 3, 4}), zeros({3, 3})); }, {"hesse::mul", "[2, 3, 4]", "[3, 3]"});
  check_message<ValueError>([&] { add(Tensor(), a); }, {"undefined"});
}

// ---- unary ops ----

BOOST_AUTO_TEST_CASE(unary_forward_closed_forms) {
  Generator gen(7);
  Tensor x = randn({4, 5}, gen) * 2.0;
  const Tensor pos = uniform({4, 5}, gen, 0.1, 3.0).detach();
  check_unary_values("neg", neg, [](double v) { return -v; }, x, 0.0);
  check_unary_values("exp", hesse::exp, [](double v) { return std::exp(v); }, x);
  check_unary_values("log", hesse::log, [](double v) { return std::log(v); }, pos);
  check_unary_values("sqrt", hesse::sqrt, [](double v) { return std::sqrt(v); }, pos);
  check_unary_values("abs", hesse::abs, [](double v) { return v < 0 ? -v : v; }, x, 0.0);
  check_unary_values("square", square, [](double v) { return v * v; }, x);
  check_unary_values("tanh", hesse::tanh,
                     [](double v) { return (std::exp(v) - std::exp(-v)) / (std::exp(v) + std::exp(-v)); }, x, 1e-14);
  check_unary_values("sigmoid", sigmoid, [](double v) { return 1.0 / (1.0 + std::exp(-v)); }, x);
  check_unary_values("relu", relu, [](double v) { return v > 0 ? v : 0.0; }, x, 0.0);
  check_unary_values("softplus", softplus, [](double v) { return std::log(1.0 + std::exp(v)); }, x);
  check_unary_values("gelu", gelu, [](double v) { return v * Phi(v); }, x);
  check_unary_values("erf", hesse::erf, [](double v) { return 1.0 - std::erfc(v); }, x);
  check_unary_values("sin", hesse::sin, [](double v) { return std::cos(v - kPi / 2); }, x, 1e-14);
  check_unary_values("cos", hesse::cos, [](double v) { return std::sin(v + kPi / 2); }, x, 1e-14);
  // 0-d and empty tensors keep their shape
  BOOST_CHECK(hesse::exp(Tensor(0.0)).shape() == Shape{});
  BOOST_CHECK_EQUAL(hesse::exp(Tensor(0.0)).item(), 1.0);
  BOOST_CHECK(hesse::tanh(zeros({0, 3})).shape() == Shape({0, 3}));
}

BOOST_AUTO_TEST_CASE(unary_stable_for_large_entries) {
  const Tensor big = Tensor{-800.0, -40.0, 0.0, 40.0, 800.0};
  const Tensor sg = sigmoid(big), sp = softplus(big), th = hesse::tanh(big), ge = gelu(big);
  for (std::size_t i = 0; i < 5; ++i) {
    BOOST_CHECK(std::isfinite(sg.data()[i]) && std::isfinite(sp.data()[i]) && std::isfinite(th.data()[i]) &&
                std::isfinite(ge.data()[i]));
  }
  BOOST_CHECK_EQUAL(sg.data()[0], 0.0);
  BOOST_CHECK_EQUAL(sg.data()[4], 1.0);
  BOOST_CHECK_EQUAL(sp.data()[4], 800.0);
  BOOST_CHECK_CLOSE_FRACTION(sp.data()[1], std::exp(-40.0), 1e-12);  // log1p(e^-40)
  BOOST_CHECK_CLOSE_FRACTION(sp.data()[3], 40.0, 1e-15);
  BOOST_CHECK_CLOSE_FRACTION(sp.data()[2], std::log(2.0), 1e-15);
  BOOST_CHECK_EQUAL(ge.data()[0], 0.0);
  BOOST_CHECK_EQUAL(ge.data()[4], 800.0);
  // gradients stay finite too
  const Tensor xl = leaf(big.clone());
  for (Unary op : {Unary(sigmoid), Unary(softplus), Unary(hesse::tanh), Unary(gelu)}) {
    const Tensor g = grad(sum(op(xl)), xl);
    for (std::size_t i = 0; i < 5; ++i) BOOST_CHECK(std::isfinite(g.data()[i]));
  }
}

BOOST_AUTO_TEST_CASE(tanh_within_3_ulp_of_libm) {
  // hesse's tanh is its own vectorised polynomial: compare it with libm's over
  // magnitudes from 1e-300 to beyond saturation, both signs, and a dense grid
  // around the branch points of the range reduction (k = 0, 1, 2 ...).
  std::vector<double> values;
  for (double e = -300; e <= 2; e += 0.01) values.push_back(std::pow(10.0, e));
  for (double v = 0; v <= 25; v += 1.0 / 4096) values.push_back(v);
  for (int k = 1; k < 64; ++k) {
    const double edge = k * std::log(2.0) / 2;  // 2|x| = k ln 2
    for (double d = -1e-12; d <= 1e-12; d += 1e-14) values.push_back(edge + d);
  }
  const std::size_t half = values.size();
  for (std::size_t i = 0; i < half; ++i) values.push_back(-values[i]);
  Tensor x = Tensor::empty({values.size()});
  std::copy(values.begin(), values.end(), x.mutable_data());
  const Tensor t = hesse::tanh(x);
  double worst = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    const double want = std::tanh(values[i]), got = t.data()[i];
    const double ulp = std::nextafter(std::fabs(want), INFINITY) - std::fabs(want);
    worst = std::max(worst, std::fabs(got - want) / ulp);
    if (std::signbit(got) != std::signbit(want)) BOOST_ERROR("tanh(" << values[i] << ") has the wrong sign");
  }
  BOOST_TEST_MESSAGE("tanh: worst error " << worst << " ulp");
  BOOST_CHECK_LE(worst, 3.0);
  // special values, as libm gives them
  const Tensor s = hesse::tanh(Tensor{0.0, -0.0, 1e-310, -1e-310, 22.0, -700.0, INFINITY, -INFINITY, NAN});
  BOOST_CHECK(s.data()[0] == 0.0 && !std::signbit(s.data()[0]));
  BOOST_CHECK(s.data()[1] == 0.0 && std::signbit(s.data()[1]));
  BOOST_CHECK_EQUAL(s.data()[2], 1e-310);
  BOOST_CHECK_EQUAL(s.data()[3], -1e-310);
  BOOST_CHECK_EQUAL(s.data()[4], 1.0);
  BOOST_CHECK_EQUAL(s.data()[5], -1.0);
  BOOST_CHECK_EQUAL(s.data()[6], 1.0);
  BOOST_CHECK_EQUAL(s.data()[7], -1.0);
  BOOST_CHECK(std::isnan(s.data()[8]));
}

BOOST_AUTO_TEST_CASE(unary_derivatives_closed_forms) {
  Generator gen(8);
  const Tensor x = away_from_zero({3, 4}, gen).detach();
  const Tensor pos = uniform({3, 4}, gen, 0.2, 3.0).detach();
  check_unary_derivative("neg", neg, [](double) { return -1.0; }, x);
  check_unary_derivative("exp", hesse::exp, [](double v) { return std::exp(v); }, x);
  check_unary_derivative("log", hesse::log, [](double v) { return 1.0 / v; }, pos);
  check_unary_derivative("sqrt", hesse::sqrt, [](double v) { return 0.5 / std::sqrt(v); }, pos);
  check_unary_derivative("abs", hesse::abs, [](double v) { return v > 0 ? 1.0 : -1.0; }, x);
  check_unary_derivative("square", square, [](double v) { return 2 * v; }, x);
  check_unary_derivative("tanh", hesse::tanh, [](double v) { return 1.0 / (std::cosh(v) * std::cosh(v)); }, x);
  check_unary_derivative("sigmoid", sigmoid,
                         [](double v) { return std::exp(-v) / ((1 + std::exp(-v)) * (1 + std::exp(-v))); }, x);
  check_unary_derivative("relu", relu, [](double v) { return v > 0 ? 1.0 : 0.0; }, x);
  check_unary_derivative("softplus", softplus, [](double v) { return 1.0 / (1.0 + std::exp(-v)); }, x);
  check_unary_derivative("gelu", gelu, [](double v) { return Phi(v) + v * phi(v); }, x);
  check_unary_derivative("erf", hesse::erf, [](double v) { return 2.0 / std::sqrt(kPi) * std::exp(-v * v); }, x);
  check_unary_derivative("sin", hesse::sin, [](double v) { return std::cos(v); }, x);
  check_unary_derivative("cos", hesse::cos, [](double v) { return -std::sin(v); }, x);
  // at the kinks the subgradient is 0, like PyTorch
  const Tensor z = leaf(zeros({3}));
  CHECK_CLOSE(grad(sum(relu(z)), z), zeros({3}), 0.0);
  CHECK_CLOSE(grad(sum(hesse::abs(z)), z), zeros({3}), 0.0);
}

BOOST_AUTO_TEST_CASE(unary_second_derivatives_closed_forms) {
  // d²/dx² through create_graph for a few ops with well-known second derivatives
  Generator gen(9);
  const Tensor x = leaf(randn({6}, gen));
  GradOptions cg;
  cg.create_graph = true;
  struct Case {
    const char* name;
    Unary op;
    Closed second;
  };
  const std::vector<Case> cases = {
      {"tanh", hesse::tanh, [](double v) { const double t = std::tanh(v); return -2 * t * (1 - t * t); }},
      {"sigmoid", sigmoid, [](double v) { const double s = 1 / (1 + std::exp(-v)); return s * (1 - s) * (1 - 2 * s); }},
      {"softplus", softplus, [](double v) { const double s = 1 / (1 + std::exp(-v)); return s * (1 - s); }},
      {"gelu", gelu, [](double v) { return phi(v) * (2 - v * v); }},
      {"erf", hesse::erf, [](double v) { return -4 * v / std::sqrt(kPi) * std::exp(-v * v); }},
      {"sin", hesse::sin, [](double v) { return -std::sin(v); }},
      {"cos", hesse::cos, [](double v) { return -std::cos(v); }},
      {"exp", hesse::exp, [](double v) { return std::exp(v); }},
      {"square", square, [](double) { return 2.0; }},
  };
  for (const Case& c : cases) {
    const Tensor g1 = grad(sum(c.op(x)), x, Tensor(), cg);
    const Tensor g2 = grad(sum(g1), x);
    double worst = 0.0;
    for (std::size_t i = 0; i < 6; ++i) worst = std::max(worst, std::abs(g2.data()[i] - c.second(x.data()[i])));
    BOOST_CHECK_MESSAGE(worst <= 1e-13, c.name << ": second derivative differs by " << worst);
  }
}

BOOST_AUTO_TEST_CASE(unary_gradcheck) {
  Generator gen(10);
  const Tensor x = normal({2, 3}, gen);
  const Tensor pos = uniform({2, 3}, gen, 0.3, 2.0);
  const Tensor kinkless = away_from_zero({2, 3}, gen, 0.1);
  struct Case {
    const char* name;
    Unary op;
    Tensor input;
  };
  const std::vector<Case> cases = {
      {"neg", neg, x},          {"exp", hesse::exp, x},          {"log", hesse::log, pos},
      {"sqrt", hesse::sqrt, pos}, {"abs", hesse::abs, kinkless},   {"square", square, x},
      {"tanh", hesse::tanh, x}, {"sigmoid", sigmoid, x},         {"relu", relu, kinkless},
      {"softplus", softplus, x}, {"gelu", gelu, x},               {"erf", hesse::erf, x},
      {"sin", hesse::sin, x},   {"cos", hesse::cos, x},
  };
  for (const Case& c : cases)
    check_derivatives(c.name, [op = c.op](const std::vector<Tensor>& t) { return op(t[0]); }, {c.input});
  // compositions reuse inputs and saved outputs
  check_derivatives("tanh(x) * sigmoid(x) + exp(-x^2)",
                    [](const std::vector<Tensor>& t) {
                      return hesse::tanh(t[0]) * sigmoid(t[0]) + hesse::exp(-square(t[0]));
                    },
                    {x});
}

// ---- pow ----

BOOST_AUTO_TEST_CASE(pow_values_and_derivatives) {
  Generator gen(11);
  const Tensor pos = uniform({2, 3}, gen, 0.3, 2.0);
  const Tensor any = away_from_zero({2, 3}, gen, 0.3);
  for (const double p : {2.0, 3.0, 1.0, 0.5, 1.7, -1.0, -2.5, 0.0, 4.0}) {
    const bool integer = p == std::floor(p);
    const Tensor& x = integer ? any : pos;
    BOOST_TEST_CONTEXT("p = " << p) {
      const Tensor y = hesse::pow(x.detach(), p);
      double worst = 0.0;
      for (std::size_t i = 0; i < x.numel(); ++i) {
        double want = 1.0;
        if (integer) {
          for (int r = 0; r < std::abs(int(p)); ++r) want *= x.data()[i];
          if (p < 0) want = 1.0 / want;
        } else {
          want = std::exp(p * std::log(x.data()[i]));
        }
        worst = std::max(worst, std::abs(y.data()[i] - want) / std::max(1.0, std::abs(want)));
      }
      BOOST_CHECK_MESSAGE(worst <= 1e-14, "pow forward differs by " << worst);
      // first and second derivatives: p x^(p-1), p (p-1) x^(p-2)
      const Tensor xl = leaf(x.detach());
      GradOptions cg;
      cg.create_graph = true;
      const Tensor g1 = grad(sum(hesse::pow(xl, p)), xl, Tensor(), cg);
      GradOptions unused;
      unused.allow_unused = true;
      const Tensor d1 = g1.requires_grad() ? grad(sum(g1), xl, Tensor(), unused) : Tensor();
      for (std::size_t i = 0; i < x.numel(); ++i) {
        const double v = x.data()[i];
        BOOST_CHECK_SMALL(g1.data()[i] - p * std::pow(v, p - 1), 1e-12 * std::max(1.0, std::abs(p * std::pow(v, p - 1))));
        const double h = d1.defined() ? d1.data()[i] : 0.0;
        BOOST_CHECK_SMALL(h - p * (p - 1) * std::pow(v, p - 2), 1e-11 * std::max(1.0, std::abs(std::pow(v, p - 2))));
      }
      check_derivatives("pow " + std::to_string(p), [p](const std::vector<Tensor>& t) { return hesse::pow(t[0], p); },
                        {x});
    }
  }
}

BOOST_AUTO_TEST_CASE(pow_at_zero) {
  // x^0 = 1 everywhere (also at 0) with derivative 0; x^2 and x^3 have derivative 0 at 0
  const Tensor z = leaf(Tensor{0.0, 1.5, -2.0});
  const Tensor y0 = hesse::pow(z, 0.0);
  CHECK_CLOSE(y0, ones({3}), 0.0);
  CHECK_CLOSE(grad(sum(y0), z), zeros({3}), 0.0);
  const Tensor g2 = grad(sum(hesse::pow(z, 2.0)), z);
  BOOST_CHECK_EQUAL(g2.data()[0], 0.0);
  const Tensor g3 = grad(sum(hesse::pow(z, 3.0)), z);
  BOOST_CHECK_EQUAL(g3.data()[0], 0.0);
  BOOST_CHECK_CLOSE_FRACTION(g3.data()[2], 12.0, 1e-15);
}

// ---- batched seeds ----

BOOST_AUTO_TEST_CASE(tanh_second_derivatives_unrecorded_equal_recorded) {
  // the gradient of tanh under 2 seeds at once is tanh_backward(V, tanh x)
  // with tanh x broadcast along V's seed dim; its x-derivative under 3 seeds
  // more sums over that dim. Unrecorded, one fused pass sums as it goes:
  // exactly the values of the recorded ops and their sum.
  Generator gen(13);
  for (const Shape& xs : {Shape{1, 4}, Shape{5}, Shape{3, 1}}) {
    BOOST_TEST_CONTEXT(to_string(xs)) {
      const Tensor x = leaf(normal(xs, gen));
      const Tensor V = randn(prepend(2, xs), gen);
      GradOptions first;
      first.create_graph = true;
      first.batched_grad_outputs = true;
      const Tensor g = grad(std::vector<Tensor>{hesse::tanh(x)}, std::vector<Tensor>{x}, {V}, first)[0];
      const Tensor W = randn(prepend(3, g.shape()), gen);
      GradOptions second;
      second.batched_grad_outputs = true;
      second.retain_graph = true;
      const Tensor fused = grad(std::vector<Tensor>{g}, std::vector<Tensor>{x}, {W}, second)[0];
      second.create_graph = true;
      const Tensor recorded = grad(std::vector<Tensor>{g}, std::vector<Tensor>{x}, {W}, second)[0];
      BOOST_REQUIRE(recorded.requires_grad() && !fused.requires_grad());
      CHECK_CLOSE(fused, recorded.detach(), 0.0);
      // and their value: Σ_j W[i, j] V[j] (-2 tanh x)(1 - tanh² x)
      const Tensor t = hesse::tanh(x.detach());
      const Tensor want = sum(W * V * (t * -2.0) * (1.0 - t * t), {1});
      CHECK_CLOSE(fused, want, 1e-15);
    }
  }
}

BOOST_AUTO_TEST_CASE(batched_seeds_elementwise) {
  Generator gen(12);
  {
    const Tensor a = normal({3, 1}, gen), b = normal({1, 4}, gen);
    check_batched_seeds("mul [3,1]x[1,4]", [](const std::vector<Tensor>& t) { return mul(t[0], t[1]); }, {a, b});
  }
  {
    const Tensor a = normal({2, 3, 4}, gen), b = normal({4}, gen);
    check_batched_seeds("mul [2,3,4]x[4]", [](const std::vector<Tensor>& t) { return mul(t[0], t[1]); }, {a, b});
    check_batched_seeds("add [2,3,4]+[4]", [](const std::vector<Tensor>& t) { return add(t[0], t[1]); }, {a, b});
  }
  {
    const Tensor a = normal({5}, gen), b = normal({}, gen);
    check_batched_seeds("mul [5]x[]", [](const std::vector<Tensor>& t) { return mul(t[0], t[1]); }, {a, b});
  }
  {
    const Tensor a = normal({3, 1}, gen), b = uniform({4}, gen, 0.5, 1.5);
    check_batched_seeds("div [3,1]/[4]", [](const std::vector<Tensor>& t) { return div(t[0], t[1]); }, {a, b});
    check_batched_seeds("sub [3,1]-[4]", [](const std::vector<Tensor>& t) { return sub(t[0], t[1]); }, {a, b});
  }
  const Tensor x = normal({2, 3}, gen);
  const Tensor pos = uniform({2, 3}, gen, 0.3, 2.0);
  check_batched_seeds("tanh", [](const std::vector<Tensor>& t) { return hesse::tanh(t[0]); }, {x});
  check_batched_seeds("tanh k=1", [](const std::vector<Tensor>& t) { return hesse::tanh(t[0]); }, {x}, 1);
  check_batched_seeds("sigmoid", [](const std::vector<Tensor>& t) { return sigmoid(t[0]); }, {x});
  check_batched_seeds("gelu", [](const std::vector<Tensor>& t) { return gelu(t[0]); }, {x});
  check_batched_seeds("log", [](const std::vector<Tensor>& t) { return hesse::log(t[0]); }, {pos});
  check_batched_seeds("sqrt", [](const std::vector<Tensor>& t) { return hesse::sqrt(t[0]); }, {pos});
  check_batched_seeds("pow 2.5", [](const std::vector<Tensor>& t) { return hesse::pow(t[0], 2.5); }, {pos});
  check_batched_seeds("pow 0", [](const std::vector<Tensor>& t) { return hesse::pow(t[0], 0.0); }, {x});
  check_batched_seeds("pow 3", [](const std::vector<Tensor>& t) { return hesse::pow(t[0], 3.0); }, {x});
  check_batched_seeds("s / x", [](const std::vector<Tensor>& t) { return 2.0 / t[0]; }, {pos});
  check_batched_seeds("sin*cos", [](const std::vector<Tensor>& t) { return hesse::sin(t[0]) * hesse::cos(t[0]); },
                      {x});
}
