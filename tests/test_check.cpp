#define BOOST_TEST_MODULE test_check
#include "test_util.hpp"

#include <cmath>

using namespace hesse;

namespace {

Shape S(std::initializer_list<std::size_t> dims) { return Shape(dims.begin(), dims.end()); }

CheckOptions quiet() {
  CheckOptions o;
  o.raise = false;
  return o;
}

/// The value of an elementwise function, computed without recording.
template <class F>
Tensor constant_map(const Tensor& x, F f) {
  Tensor out = Tensor::empty(x.shape());
  for (std::size_t i = 0; i < x.numel(); ++i) out.mutable_data()[i] = f(x.data()[i]);
  return out;
}

// ---- custom ops built with detail::record ----

/// x³ with the correct rule 3x², written with differentiable ops.
Tensor good_cube(const Tensor& x) {
  Tensor out = constant_map(x, [](double v) { return v * v * v; });
  return detail::record("good_cube", out, {x}, [x](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{g * (x * x * 3.0)};
  });
}

/// x³ with a wrong rule: 2x² instead of 3x².
Tensor bad_cube(const Tensor& x) {
  Tensor out = constant_map(x, [](double v) { return v * v * v; });
  return detail::record("bad_cube", out, {x}, [x](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{g * (x * x * 2.0)};
  });
}

/// a·b with the gradients of the two inputs swapped (right for a == b only).
Tensor swapped_mul(const Tensor& a, const Tensor& b) {
  Tensor out;
  {
    NoGradGuard guard;
    out = a * b;
  }
  return detail::record("swapped_mul", out, {a, b}, [a, b](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{g * a, g * b};
  });
}

/// tanh whose first derivative is right but is computed under NoGradGuard
/// from the saved output: a constant to the tape, so the second derivative
/// misses the -2 t (1 - t²) term.
Tensor frozen_tanh(const Tensor& x) {
  Tensor out = constant_map(x, [](double v) { return std::tanh(v); });
  return detail::record(
      "frozen_tanh", out, {x},
      [](const Tensor& g, const Tensor& out, Needs) {
        Tensor slope;
        {
          NoGradGuard guard;
          slope = 1.0 - out * out;
        }
        return std::vector<Tensor>{g * slope};
      },
      /*save_output=*/true);
}

/// tanh with the differentiable rule, for contrast.
Tensor good_tanh(const Tensor& x) {
  Tensor out = constant_map(x, [](double v) { return std::tanh(v); });
  return detail::record(
      "good_tanh", out, {x},
      [](const Tensor& g, const Tensor& out, Needs) { return std::vector<Tensor>{g * (1.0 - out * out)}; },
      /*save_output=*/true);
}

TensorFunction unary(Tensor (*op)(const Tensor&)) {
  return [op](const std::vector<Tensor>& xs) { return op(xs[0]); };
}

}  // namespace

// ================================================================ correct functions pass

BOOST_AUTO_TEST_SUITE(correct_functions)

BOOST_AUTO_TEST_CASE(elementwise_and_reductions) {
  Generator gen(1);
  Tensor x = (randn(S({2, 3}), gen)).requires_grad_();
  Tensor p = (rand(S({2, 3}), gen) + 0.5).requires_grad_();
  BOOST_TEST(gradcheck(unary([](const Tensor& v) { return tanh(v) * sin(v); }), {x}));
  BOOST_TEST(gradcheck(unary([](const Tensor& v) { return log(v) / v; }), {p}));
  BOOST_TEST(gradcheck(unary([](const Tensor& v) { return sum(exp(v), {0}); }), {x}));
  BOOST_TEST(gradgradcheck(unary([](const Tensor& v) { return tanh(v) * sin(v); }), {x}));
  BOOST_TEST(gradgradcheck(unary([](const Tensor& v) { return sqrt(v) * softplus(v); }), {p}));
}

BOOST_AUTO_TEST_CASE(several_inputs_and_a_constant) {
  Generator gen(2);
  Tensor A = randn(S({3, 4}), gen).requires_grad_();
  Tensor B = randn(S({4, 2}), gen).requires_grad_();
  Tensor C = randn(S({3, 2}), gen);  // not checked
  TensorFunction f = [](const std::vector<Tensor>& xs) {
    return log_softmax(matmul(xs[0], xs[1]) * xs[2], -1);
  };
  BOOST_TEST(gradcheck(f, {A, B, C}));
  BOOST_TEST(gradgradcheck(f, {A, B, C}));
}

BOOST_AUTO_TEST_CASE(scalar_output_and_custom_correct_op) {
  Tensor x = Tensor{-1.2, 0.4, 2.0}.requires_grad_();
  BOOST_TEST(gradcheck(unary([](const Tensor& v) { return sum(good_cube(v)); }), {x}));
  BOOST_TEST(gradgradcheck(unary([](const Tensor& v) { return good_cube(v); }), {x}));
  BOOST_TEST(gradgradcheck(unary([](const Tensor& v) { return good_tanh(v); }), {x}));
}

BOOST_AUTO_TEST_CASE(function_returning_a_view_of_its_input) {
  // reshape shares storage with its input: the numeric Jacobian must not be
  // fooled by later perturbations of that storage
  Tensor x = Tensor{{1.0, 2.0}, {3.0, 4.0}}.requires_grad_();
  BOOST_TEST(gradcheck(unary([](const Tensor& v) { return reshape(v, {-1}); }), {x}));
  BOOST_TEST(gradcheck([](const std::vector<Tensor>& xs) { return xs[0]; }, {x}));
}

BOOST_AUTO_TEST_CASE(function_that_ignores_an_input) {
  Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  Tensor y = Tensor{3.0}.requires_grad_();
  TensorFunction f = [](const std::vector<Tensor>& xs) { return xs[0] * 2.0; };
  BOOST_TEST(gradcheck(f, {x, y}));
  BOOST_TEST(gradgradcheck(f, {x, y}));
}

BOOST_AUTO_TEST_CASE(works_under_a_no_grad_guard) {
  Tensor x = Tensor{0.3, -0.6}.requires_grad_();
  NoGradGuard guard;
  BOOST_TEST(gradcheck(unary([](const Tensor& v) { return exp(v) * v; }), {x}));
  BOOST_TEST(gradgradcheck(unary([](const Tensor& v) { return exp(v) * v; }), {x}));
  BOOST_TEST(!is_grad_enabled());
}

BOOST_AUTO_TEST_CASE(inputs_are_left_untouched) {
  Tensor x = Tensor{0.5, 1.5}.requires_grad_();
  const Tensor before = x.clone();
  BOOST_TEST(gradgradcheck(unary([](const Tensor& v) { return tanh(v); }), {x}));
  HESSE_CHECK_CLOSE(x, before, 0.0);
  BOOST_TEST(!x.grad().defined());
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ wrong rules are caught

BOOST_AUTO_TEST_SUITE(wrong_rules)

BOOST_AUTO_TEST_CASE(gradcheck_catches_a_wrong_first_derivative) {
  Tensor x = Tensor{0.5, -1.0, 2.0}.requires_grad_();
  const TensorFunction f = unary([](const Tensor& v) { return bad_cube(v); });
  HESSE_CHECK_THROWS(gradcheck(f, {x}), Error, "Jacobian mismatch");
  HESSE_CHECK_THROWS(gradcheck(f, {x}), Error, "gradcheck");
  BOOST_TEST(!gradcheck(f, {x}, quiet()));
  // and the correct op with the same forward passes
  BOOST_TEST(gradcheck(unary([](const Tensor& v) { return good_cube(v); }), {x}));
}

BOOST_AUTO_TEST_CASE(gradcheck_catches_swapped_input_gradients) {
  Tensor a = Tensor{1.0, 2.0}.requires_grad_();
  Tensor b = Tensor{-3.0, 0.5}.requires_grad_();
  const TensorFunction f = [](const std::vector<Tensor>& xs) { return swapped_mul(xs[0], xs[1]); };
  BOOST_TEST(!gradcheck(f, {a, b}, quiet()));
  HESSE_CHECK_THROWS(gradcheck(f, {a, b}), Error, "analytic");
  // checking only one input still catches it
  BOOST_TEST(!gradcheck(f, {a, b.detach()}, quiet()));
}

BOOST_AUTO_TEST_CASE(gradgradcheck_catches_a_wrong_second_derivative) {
  Tensor x = Tensor{-0.8, 0.3, 1.1}.requires_grad_();
  const TensorFunction f = unary([](const Tensor& v) { return frozen_tanh(v); });
  // the first derivative is right ...
  BOOST_TEST(gradcheck(f, {x}));
  // ... the second is not
  BOOST_TEST(!gradgradcheck(f, {x}, quiet()));
  HESSE_CHECK_THROWS(gradgradcheck(f, {x}), Error, "Jacobian mismatch");
  // the differentiable rule with the same forward passes
  BOOST_TEST(gradgradcheck(unary([](const Tensor& v) { return good_tanh(v); }), {x}));
}

BOOST_AUTO_TEST_CASE(tolerances_matter) {
  // bad_cube is off by x²: with a huge tolerance it passes, which shows the
  // tolerance is what decides
  Tensor x = Tensor{0.1, 0.2}.requires_grad_();
  const TensorFunction f = unary([](const Tensor& v) { return bad_cube(v); });
  CheckOptions loose = quiet();
  loose.atol = 1.0;
  BOOST_TEST(gradcheck(f, {x}, loose));
  BOOST_TEST(!gradcheck(f, {x}, quiet()));
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ misuse

BOOST_AUTO_TEST_SUITE(misuse)

BOOST_AUTO_TEST_CASE(no_input_requires_grad) {
  Tensor x = Tensor{1.0, 2.0};
  HESSE_CHECK_THROWS(gradcheck(unary([](const Tensor& v) { return bad_cube(v); }), {x}), ValueError,
                     "requires grad");
  HESSE_CHECK_THROWS(gradgradcheck(unary([](const Tensor& v) { return v; }), {x}), ValueError, "requires grad");
}

BOOST_AUTO_TEST_CASE(undefined_input_or_output) {
  Tensor x = Tensor{1.0}.requires_grad_();
  HESSE_CHECK_THROWS(gradcheck(unary([](const Tensor& v) { return v; }), {x, Tensor()}), ValueError, "undefined");
  HESSE_CHECK_THROWS(gradcheck([](const std::vector<Tensor>&) { return Tensor(); }, {x}), ValueError, "undefined");
}

BOOST_AUTO_TEST_CASE(output_shape_that_changes_between_calls) {
  // 1 entry, then 3 (or 3, then 1): entries were read past the end, or skipped.
  // The analytic pass sees the change here...
  for (const bool grows : {true, false}) {
    int calls = 0;
    const TensorFunction f = [&](const std::vector<Tensor>& v) {
      return (calls++ == 0) == grows ? sum(v[0]) : v[0] * 2.0;
    };
    HESSE_CHECK_THROWS(gradcheck(f, {zeros({3}, true)}), ValueError, "must not depend on the input values");
  }
  // ...and the finite differences here: the shape changes when x[0] moves off 0
  const TensorFunction kinked = [](const std::vector<Tensor>& v) {
    return v[0].data()[0] > 0 ? sum(v[0]) : v[0] * 2.0;
  };
  HESSE_CHECK_THROWS(gradcheck(kinked, {zeros({3}, true)}), ValueError, "returned shape [] where its first call gave [3]");
}

BOOST_AUTO_TEST_CASE(options_out_of_range) {
  const Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  const auto identity = unary([](const Tensor& v) { return v; });
  for (const double bad : {0.0, -1e-6, double(NAN), double(INFINITY)}) {
    CheckOptions step, absolute, relative;
    step.eps = bad;
    HESSE_CHECK_THROWS(gradcheck(identity, {x}, step), ValueError, "eps must be positive");
    HESSE_CHECK_THROWS(gradgradcheck(identity, {x}, step), ValueError, "eps must be positive");
    if (bad == 0.0) continue;  // zero tolerances are allowed
    absolute.atol = bad;
    relative.rtol = bad;
    HESSE_CHECK_THROWS(gradcheck(identity, {x}, absolute), ValueError, "atol");
    HESSE_CHECK_THROWS(gradcheck(identity, {x}, relative), ValueError, "rtol");
  }
}

BOOST_AUTO_TEST_SUITE_END()
