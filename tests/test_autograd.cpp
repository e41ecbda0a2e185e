#define BOOST_TEST_MODULE test_autograd
#include "test_util.hpp"

#include <array>
#include <cmath>
#include <cstdio>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

using namespace hesse;
using hesse::testing::gemm_flops_of;
using hesse::testing::max_abs_diff;

namespace {

Shape S(std::initializer_list<std::size_t> dims) { return Shape(dims.begin(), dims.end()); }

GradOptions with_graph() {
  GradOptions o;
  o.create_graph = true;
  return o;
}

GradOptions retaining() {
  GradOptions o;
  o.retain_graph = true;
  return o;
}

/// Row `i` of a tensor whose first dimension indexes rows, as a tensor of the remaining shape.
Tensor row(const Tensor& t, std::size_t i) {
  const Shape rest(t.shape().begin() + 1, t.shape().end());
  const std::size_t n = numel_of(rest);
  Tensor r = Tensor::empty(rest);
  std::copy(t.data() + i * n, t.data() + (i + 1) * n, r.mutable_data());
  return r;
}

/// e_i of length n.
Tensor unit(std::size_t n, std::size_t i) {
  Tensor e = zeros(S({n}));
  e.mutable_data()[i] = 1.0;
  return e;
}

/// The n-th derivative of an elementwise f at the entries of x, by nesting grad.
Tensor nth_derivative(const std::function<Tensor(const Tensor&)>& f, const Tensor& x, int n) {
  Tensor y = f(x);
  for (int k = 0; k < n; ++k) y = grad(sum(y), x, Tensor(), with_graph());
  return y;
}

}  // namespace

// ================================================================ backward()

BOOST_AUTO_TEST_SUITE(backward_api)

BOOST_AUTO_TEST_CASE(scalar_backward_accumulates_into_leaves) {
  Tensor x = Tensor{1.0, -2.0, 3.0}.requires_grad_();
  Tensor w = Tensor{0.5, 4.0, -1.0}.requires_grad_();
  auto loss = [&] { return sum(x * x * w); };  // d/dx = 2xw, d/dw = x²
  loss().backward();
  HESSE_CHECK_CLOSE(x.grad(), (Tensor{1.0, -16.0, -6.0}), 1e-15);
  HESSE_CHECK_CLOSE(w.grad(), (Tensor{1.0, 4.0, 9.0}), 1e-15);
  BOOST_TEST(!x.grad().requires_grad());
  loss().backward();  // accumulates: doubled
  HESSE_CHECK_CLOSE(x.grad(), (Tensor{2.0, -32.0, -12.0}), 1e-15);
  HESSE_CHECK_CLOSE(w.grad(), (Tensor{2.0, 8.0, 18.0}), 1e-15);
  x.zero_grad();
  BOOST_TEST(!x.grad().defined());
  BOOST_TEST(w.grad().defined());
  loss().backward();
  HESSE_CHECK_CLOSE(x.grad(), (Tensor{1.0, -16.0, -6.0}), 1e-15);
  HESSE_CHECK_CLOSE(w.grad(), (Tensor{3.0, 12.0, 27.0}), 1e-15);
}

BOOST_AUTO_TEST_CASE(free_function_backward_with_several_outputs) {
  Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  Tensor a = sum(x * x);   // 2x
  Tensor b = x * 3.0;      // seed s: 3s
  backward({a, b}, {Tensor(), Tensor{1.0, -1.0}});
  HESSE_CHECK_CLOSE(x.grad(), (Tensor{2.0 + 3.0, 4.0 - 3.0}), 1e-15);
}

BOOST_AUTO_TEST_CASE(non_scalar_backward_needs_a_seed) {
  Tensor x = ones(S({2, 3}), true);
  Tensor y = x * 2.0;
  HESSE_CHECK_THROWS(y.backward(), AutogradError, "[2, 3]");
  HESSE_CHECK_THROWS(y.backward(), AutogradError, "seed");
  HESSE_CHECK_THROWS(y.backward(ones(S({3, 2}))), ShapeError, "[3, 2]");
  HESSE_CHECK_THROWS(y.backward(ones(S({6}))), ShapeError, "[2, 3]");
  BOOST_TEST(!x.grad().defined());  // the failed calls delivered nothing
  Tensor seed{{1.0, 2.0, 3.0}, {4.0, 5.0, 6.0}};
  y.backward(seed);
  HESSE_CHECK_CLOSE(x.grad(), seed * 2.0, 0.0);
}

// A rule must give each input a gradient of its shape, behind the seed's batch
// dims; the engine names the op and the shapes when one does not.
BOOST_AUTO_TEST_CASE(a_rule_with_wrong_gradient_shapes_is_reported) {
  Tensor x = ones(S({2, 3}), true);
  auto op = [](const Tensor& in, Shape grad_shape) {
    Tensor out = in.detach() * 2.0;  // an op records a fresh tensor
    return detail::record("faulty", out, {in}, [grad_shape](const Tensor&, const Tensor&, Needs) {
      return std::vector<Tensor>{zeros(grad_shape)};
    });
  };
  HESSE_CHECK_THROWS(grad(sum(op(x, S({3, 2}))), x), Error, "faulty");
  HESSE_CHECK_THROWS(grad(sum(op(x, S({3, 2}))), x), Error, "[3, 2]");
  HESSE_CHECK_THROWS(grad(sum(op(x, S({2, 3, 1}))), x), Error, "[2, 3, 1]");
  // batched seeds: the gradient must keep the batch dims in front
  GradOptions batched;
  batched.batched_grad_outputs = true;
  HESSE_CHECK_THROWS(grad({op(x, S({2, 3}))}, {x}, {ones(S({4, 2, 3}))}, batched), Error, "batch [4]");
  HESSE_CHECK_THROWS(grad({op(x, S({5, 2, 3}))}, {x}, {ones(S({4, 2, 3}))}, batched), Error, "[5, 2, 3]");
  BOOST_TEST(grad(op(x, S({4, 2, 3})), x, ones(S({4, 2, 3})), batched).shape() == S({4, 2, 3}));
}

BOOST_AUTO_TEST_CASE(one_element_non_scalar_needs_no_seed) {
  Tensor x = reshape(Tensor{3.0}, {1, 1}).requires_grad_();
  (x * x).backward();
  BOOST_TEST(x.grad().item() == 6.0);
}

BOOST_AUTO_TEST_CASE(backward_of_a_constant_throws) {
  Tensor c = Tensor{1.0, 2.0};
  HESSE_CHECK_THROWS(sum(c * 2.0).backward(), AutogradError, "does not require grad");
}

BOOST_AUTO_TEST_CASE(second_backward_through_freed_graph) {
  Tensor x = Tensor{0.5, 1.5}.requires_grad_();
  Tensor y = sum(tanh(x) * x);
  y.backward();
  HESSE_CHECK_THROWS(y.backward(), AutogradError, "retain_graph");

  Tensor x2 = Tensor{0.5, 1.5}.requires_grad_();
  Tensor y2 = sum(tanh(x2) * x2);
  y2.backward(Tensor(), /*retain_graph=*/true);
  const Tensor once = x2.grad().clone();
  y2.backward();
  HESSE_CHECK_CLOSE(x2.grad(), once * 2.0, 1e-15);
  HESSE_CHECK_THROWS(y2.backward(), AutogradError, "a second time");
  // the expected value, by hand: d/dx (x tanh x) = tanh x + x (1 - tanh² x)
  for (std::size_t i = 0; i < 2; ++i) {
    const double v = x2.data()[i], t = std::tanh(v);
    BOOST_TEST(once.data()[i] == t + v * (1 - t * t), boost::test_tools::tolerance(1e-14));
  }
}

BOOST_AUTO_TEST_CASE(leaf_grads_own_their_storage) {
  // z = a + b sends the same gradient tensor to a and b
  Tensor a = Tensor{1.0, 2.0}.requires_grad_();
  Tensor b = Tensor{3.0, 4.0}.requires_grad_();
  Tensor seed{10.0, 20.0};
  (a + b).backward(seed);
  BOOST_TEST(a.grad().data() != b.grad().data());
  BOOST_TEST(a.grad().data() != seed.data());
  a.grad().mutable_data()[0] = 0.0;  // e.g. an optimiser clipping in place
  BOOST_TEST(b.grad().data()[0] == 10.0);
  BOOST_TEST(seed.data()[0] == 10.0);
  // a leaf that is itself the output
  Tensor c = Tensor{5.0, 6.0}.requires_grad_();
  c.backward(seed);
  BOOST_TEST(c.grad().data() != seed.data());
  HESSE_CHECK_CLOSE(c.grad(), seed, 0.0);
}

BOOST_AUTO_TEST_CASE(broken_rules_and_records_are_reported) {
  Tensor x = Tensor{1.0, 2.0, 3.0}.requires_grad_();
  auto fresh = [&] {
    NoGradGuard guard;
    return x * 1.0;
  };
  // a rule returning a gradient of the wrong shape
  Tensor y = detail::record("bad_shape_op", fresh(), {x}, [](const Tensor&, const Tensor&, Needs) {
    return std::vector<Tensor>{ones(Shape{2})};
  });
  HESSE_CHECK_THROWS(sum(y).backward(), Error, "bad_shape_op");
  HESSE_CHECK_THROWS(grad(sum(y), x), Error, "[2]");
  // a rule returning the wrong number of gradients
  Tensor z = detail::record("bad_count_op", fresh(), {x}, [](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{g, g};
  });
  HESSE_CHECK_THROWS(grad(sum(z), x), Error, "bad_count_op");
  // recording onto an input, or onto a tensor already recorded, is refused
  auto identity = [](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g}; };
  HESSE_CHECK_THROWS(detail::record("self_op", x, {x}, identity), Error, "own inputs");
  BOOST_TEST(x.is_leaf());
  Tensor w = x * 2.0;
  HESSE_CHECK_THROWS(detail::record("again_op", w, {x}, identity), Error, "mul_scalar");
  BOOST_TEST(std::string(w.grad_fn()->name) == "mul_scalar");
  // nothing recorded when no input requires grad: the result comes back as is
  Tensor c{1.0};
  Tensor r = detail::record("const_op", c, {c}, identity);
  BOOST_TEST(r.impl() == c.impl());
  BOOST_TEST(!detail::any_requires_grad({c, Tensor()}));
  BOOST_TEST(detail::any_requires_grad({c, x}));
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ grad()

BOOST_AUTO_TEST_SUITE(functional_grad)

BOOST_AUTO_TEST_CASE(leaves_dot_grad_alone) {
  Tensor x = Tensor{1.0, 2.0, 3.0}.requires_grad_();
  Tensor g = grad(sum(x * x), x);
  HESSE_CHECK_CLOSE(g, x * 2.0, 0.0);
  BOOST_TEST(!x.grad().defined());
  BOOST_TEST(!g.requires_grad());  // no create_graph: a plain value
}

BOOST_AUTO_TEST_CASE(create_graph_makes_grad_differentiable) {
  Tensor x = Tensor{0.3, -0.7}.requires_grad_();
  Tensor y = sum(x * x * x);
  Tensor g = grad(y, x, Tensor(), with_graph());  // 3x²
  BOOST_TEST(g.requires_grad());
  BOOST_TEST(!g.is_leaf());
  HESSE_CHECK_CLOSE(g, x * x * 3.0, 1e-15);
  // create_graph retains by default: the first graph can be used again
  Tensor g2 = grad(y, x, Tensor(), retaining());
  HESSE_CHECK_CLOSE(g2, g.detach(), 0.0);
  Tensor h = grad(sum(g), x);  // 6x; frees the graph, which reaches back into y's
  HESSE_CHECK_CLOSE(h, x * 6.0, 1e-15);
  HESSE_CHECK_THROWS(grad(y, x), AutogradError, "retain_graph");
}

BOOST_AUTO_TEST_CASE(retain_graph_semantics) {
  Tensor x = Tensor{0.2, 0.4}.requires_grad_();
  Tensor y = sum(exp(x));
  Tensor g1 = grad(y, x, Tensor(), retaining());
  Tensor g2 = grad(y, x);  // frees
  HESSE_CHECK_CLOSE(g1, g2, 0.0);
  HESSE_CHECK_THROWS(grad(y, x), AutogradError, "retain_graph");
  // create_graph with an explicit retain_graph=false frees the first graph
  Tensor z = sum(exp(x));
  GradOptions o = with_graph();
  o.retain_graph = false;
  Tensor gz = grad(z, x, Tensor(), o);
  HESSE_CHECK_CLOSE(gz, g1, 0.0);
  HESSE_CHECK_THROWS(grad(z, x), AutogradError, "retain_graph");
}

BOOST_AUTO_TEST_CASE(unused_inputs) {
  Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  Tensor u = Tensor{5.0}.requires_grad_();
  Tensor y = sum(x * x);
  HESSE_CHECK_THROWS(grad({y}, {x, u}, {}, retaining()), AutogradError, "input 1");
  HESSE_CHECK_THROWS(grad({y}, {x, u}, {}, retaining()), AutogradError, "allow_unused");
  GradOptions o;
  o.allow_unused = true;
  const std::vector<Tensor> gs = grad({y}, {x, u}, {}, o);
  BOOST_REQUIRE(gs.size() == 2u);
  HESSE_CHECK_CLOSE(gs[0], x * 2.0, 0.0);
  BOOST_TEST(!gs[1].defined());
}

BOOST_AUTO_TEST_CASE(input_that_does_not_require_grad_throws) {
  Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  Tensor c = Tensor{3.0, 4.0};
  Tensor y = sum(x * c);
  HESSE_CHECK_THROWS(grad(y, c), AutogradError, "does not require grad");
  HESSE_CHECK_THROWS(grad({y}, {x, c}), AutogradError, "input 1");
  HESSE_CHECK_THROWS(grad(y, Tensor()), ValueError, "undefined");
  HESSE_CHECK_THROWS(grad(std::vector<Tensor>{y}, std::vector<Tensor>{}), ValueError, "no inputs");
}

BOOST_AUTO_TEST_CASE(seed_shape_and_count_are_checked) {
  Tensor x = Tensor{1.0, 2.0, 3.0}.requires_grad_();
  Tensor y = x * 2.0;
  HESSE_CHECK_THROWS(grad(y, x), AutogradError, "[3]");
  HESSE_CHECK_THROWS(grad(y, x, ones(S({2}))), ShapeError, "[2]");
  HESSE_CHECK_THROWS(grad(y, x, ones(S({4, 3}))), ShapeError, "[4, 3]");  // batched seeds need the option
  HESSE_CHECK_THROWS(grad({y, y}, {x}, {ones(S({3}))}), ValueError, "grad_outputs");
}

BOOST_AUTO_TEST_CASE(grad_of_output_with_respect_to_itself) {
  Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  Tensor seed{7.0, -1.0};
  HESSE_CHECK_CLOSE(grad(x, x, seed), seed, 0.0);
  Tensor y = x * 2.0;
  HESSE_CHECK_CLOSE(grad(y, y, seed), seed, 0.0);
}

BOOST_AUTO_TEST_CASE(diamond_graphs_accumulate) {
  // a = sin x feeds two branches: out = Σ a² + 3a,  d/dx = (2a + 3) cos x
  Tensor x = Tensor{0.1, 0.9, -1.3}.requires_grad_();
  Tensor a = sin(x);
  Tensor out = sum(a * a + a * 3.0);
  const std::vector<Tensor> g = grad({out}, {x, a}, {}, retaining());
  for (std::size_t i = 0; i < 3; ++i) {
    const double v = x.data()[i], s = std::sin(v);
    BOOST_TEST(g[0].data()[i] == (2 * s + 3) * std::cos(v), boost::test_tools::tolerance(1e-14));
    BOOST_TEST(g[1].data()[i] == 2 * s + 3, boost::test_tools::tolerance(1e-14));  // non-leaf input
  }
  // the same through backward()
  out.backward();
  HESSE_CHECK_CLOSE(x.grad(), g[0], 1e-15);
  BOOST_TEST(!a.grad().defined());  // only leaves accumulate

  // x used many times in one op chain: f = x·x·x + x·x  -> 3x² + 2x
  Tensor z = Tensor{2.0}.requires_grad_();
  Tensor f = sum(z * z * z + z * z);
  BOOST_TEST(grad(f, z).item() == 3 * 4.0 + 2 * 2.0);
}

// Sums of incoming gradients may be formed in place (nothing recording, sum
// unshared): never in a seed, a saved value or a gradient sent elsewhere too.
BOOST_AUTO_TEST_CASE(summed_gradients_touch_no_other_tensor) {
  Tensor a = Tensor{1.0, -2.0, 3.0}.requires_grad_();
  Tensor b = Tensor{0.5, 4.0, -1.0}.requires_grad_();
  const Tensor y = a + a + a * b + exp(a) * 2.0;  // add hands the same tensor to both its inputs
  const Tensor seed = Tensor{1.0, 10.0, 100.0};
  for (int pass = 0; pass < 2; ++pass) {  // the second pass reads what exp saved in the first
    const std::vector<Tensor> g = grad({y}, {a, b}, {seed}, retaining());
    for (std::size_t i = 0; i < 3; ++i) {
      const double s = seed.data()[i], ai = a.data()[i], bi = b.data()[i];
      BOOST_TEST(g[0].data()[i] == s * (2.0 + bi + 2.0 * std::exp(ai)), boost::test_tools::tolerance(1e-15));
      BOOST_TEST(g[1].data()[i] == s * ai, boost::test_tools::tolerance(1e-15));
    }
  }
  HESSE_CHECK_CLOSE(seed, (Tensor{1.0, 10.0, 100.0}), 0.0);

  // x + x by x alone: the first gradient x receives is the seed itself (a view)
  Tensor x = Tensor{2.0, 3.0}.requires_grad_();
  const Tensor view = slice(seed, 0, 0, 2);
  HESSE_CHECK_CLOSE(grad(x + x, x, view), (Tensor{2.0, 20.0}), 0.0);
  HESSE_CHECK_CLOSE(seed, (Tensor{1.0, 10.0, 100.0}), 0.0);

  // Rules that hand out a tensor someone else holds, processed first (recorded
  // last), then joined by a second gradient: their saved output, and a tensor
  // their closure keeps. Both must read the same in the second pass.
  const auto giving_saved_output = [](const Tensor& t) {  // e^t; its rule returns its saved e^t (right for seeds of 1)
    return detail::record(
        "gives_saved_output", exp(t.detach()), {t},
        [](const Tensor&, const Tensor& output, Needs) { return std::vector<Tensor>{output.detach()}; }, true);
  };
  const Tensor kept = Tensor{5.0, 7.0};
  const auto giving_kept = [kept](const Tensor& t) {  // t; its rule returns `kept`, which its closure holds
    return detail::record("gives_kept", t.detach() * 1.0, {t},
                          [kept](const Tensor&, const Tensor&, Needs) { return std::vector<Tensor>{kept}; });
  };
  Tensor z = Tensor{0.5, -1.0}.requires_grad_();
  const Tensor doubled = z * 2.0;  // recorded first: its gradient arrives second
  const Tensor by_saved = doubled + giving_saved_output(z), by_kept = doubled + giving_kept(z);
  for (int pass = 0; pass < 2; ++pass) {
    const Tensor g_saved = grad(by_saved, z, ones({2}), retaining());
    const Tensor g_kept = grad(by_kept, z, ones({2}), retaining());
    for (std::size_t i = 0; i < 2; ++i) {
      BOOST_TEST(g_saved.data()[i] == 2.0 + std::exp(z.data()[i]), boost::test_tools::tolerance(1e-15));
      BOOST_TEST(g_kept.data()[i] == 2.0 + kept.data()[i]);
    }
  }
  HESSE_CHECK_CLOSE(kept, (Tensor{5.0, 7.0}), 0.0);
}

// A rule's closure lives in a recycled block: it is destroyed exactly once,
// moves leave nothing behind, large closures work, an empty rule throws,
// null callables are empty rules.
BOOST_AUTO_TEST_CASE(backward_rules_own_their_closures) {
  auto token = std::make_shared<int>(7);
  const auto rule_with = [](std::shared_ptr<int> t) {
    return BackwardRule([t](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g * double(*t)}; });
  };
  {
    BackwardRule a = rule_with(token);
    BOOST_TEST(token.use_count() == 2);
    BackwardRule b(std::move(a));
    BOOST_TEST(!a);
    BOOST_TEST(token.use_count() == 2);
    HESSE_CHECK_CLOSE(b(Tensor{1.0, 2.0}, Tensor(), Needs{1, 0})[0], (Tensor{7.0, 14.0}), 0.0);
    BackwardRule c = rule_with(token);
    BOOST_TEST(token.use_count() == 3);
    c = std::move(b);  // c's own closure is destroyed
    BOOST_TEST(token.use_count() == 2);
    c = nullptr;
    BOOST_TEST(token.use_count() == 1);
    BOOST_CHECK_THROW(c(Tensor{1.0}, Tensor(), Needs{1, 0}), std::bad_function_call);
    c = rule_with(token);
    BOOST_TEST(token.use_count() == 2);
  }
  BOOST_TEST(token.use_count() == 1);
  {
    BackwardRule d = rule_with(token);
    BackwardRule& same = d;
    d = std::move(same);  // self-move keeps the closure
    BOOST_TEST(bool(d));
    BOOST_TEST(token.use_count() == 2);
  }
  BOOST_TEST(token.use_count() == 1);
  // a closure whose copy throws: the exception comes through, nothing leaks (ASan run)
  struct Throwing {
    Throwing() = default;
    Throwing(const Throwing&) { throw std::runtime_error("copy"); }
    std::vector<Tensor> operator()(const Tensor& g, const Tensor&, Needs) const { return {g}; }
  };
  const Throwing throwing;
  BOOST_CHECK_THROW(BackwardRule{throwing}, std::runtime_error);
  // null callables make empty rules, as they make empty std::functions
  std::vector<Tensor> (*no_function)(const Tensor&, const Tensor&, Needs) = nullptr;
  BOOST_TEST(!BackwardRule(no_function));
  BOOST_TEST(!BackwardRule(std::function<std::vector<Tensor>(const Tensor&, const Tensor&, Needs)>()));
  static_assert(!std::is_constructible_v<BackwardRule, int>, "only rules convert to BackwardRule");
  std::array<double, 200> big{};  // a closure larger than any recycled block
  big[199] = 3.0;
  const BackwardRule large([big](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g * big[199]}; });
  HESSE_CHECK_CLOSE(large(Tensor{2.0}, Tensor(), Needs{1, 0})[0], Tensor{6.0}, 0.0);
}

BOOST_AUTO_TEST_CASE(grad_with_respect_to_a_non_leaf_only) {
  Tensor x = Tensor{0.5, 2.0}.requires_grad_();
  Tensor h = x * x;        // non-leaf
  Tensor y = sum(log(h));  // d/dh = 1/h
  Tensor gh = grad(y, h);
  HESSE_CHECK_CLOSE(gh, (Tensor{4.0, 0.25}), 1e-15);
  BOOST_TEST(!x.grad().defined());
}

BOOST_AUTO_TEST_CASE(gradients_no_result_needs_are_not_computed) {
  // y = Σ tanh(tanh(X W1ᵀ) W2ᵀ): by W1 alone, the rule of h W2ᵀ needs dh, not dW2
  Generator gen(3);
  Tensor W1 = randn(S({32, 48}), gen).requires_grad_(), W2 = randn(S({16, 32}), gen).requires_grad_();
  const Tensor X = randn(S({64, 48}), gen);
  auto y = [&] { return sum(tanh(linear(tanh(linear(X, W1)), W2))); };
  std::vector<Tensor> both, first;
  const std::uint64_t flops_both = gemm_flops_of([&] { both = grad({y()}, {W1, W2}); });
  const std::uint64_t flops_first = gemm_flops_of([&] { first = grad(std::vector<Tensor>{y()}, std::vector<Tensor>{W1}); });
  BOOST_TEST(flops_both - flops_first == 2u * 16 * 64 * 32);
  HESSE_CHECK_CLOSE(first[0], both[0], 0.0);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ higher order

BOOST_AUTO_TEST_SUITE(higher_order)

const Tensor points = Tensor{-2.1, -0.7, 0.0, 0.3, 1.1, 2.5};

BOOST_AUTO_TEST_CASE(third_derivative_of_tanh) {
  Tensor x = points.clone().requires_grad_();
  Tensor d3 = nth_derivative([](const Tensor& v) { return tanh(v); }, x, 3);
  for (std::size_t i = 0; i < x.numel(); ++i) {
    const double t = std::tanh(x.data()[i]);
    const double expected = -2 * (1 - t * t) * (1 - 3 * t * t);
    BOOST_TEST(d3.data()[i] == expected, boost::test_tools::tolerance(1e-12));
  }
}

BOOST_AUTO_TEST_CASE(third_derivative_of_sigmoid) {
  // s' = s(1-s), s'' = s(1-s)(1-2s), s''' = s(1-s)(1 - 6s + 6s²)
  Tensor x = points.clone().requires_grad_();
  Tensor d3 = nth_derivative([](const Tensor& v) { return sigmoid(v); }, x, 3);
  for (std::size_t i = 0; i < x.numel(); ++i) {
    const double s = 1.0 / (1.0 + std::exp(-x.data()[i]));
    BOOST_TEST(d3.data()[i] == s * (1 - s) * (1 - 6 * s + 6 * s * s), boost::test_tools::tolerance(1e-12));
  }
}

BOOST_AUTO_TEST_CASE(third_derivative_of_softplus) {
  // softplus' = s, so softplus''' = s'' = s(1-s)(1-2s)
  Tensor x = points.clone().requires_grad_();
  Tensor d1 = nth_derivative([](const Tensor& v) { return softplus(v); }, x, 1);
  Tensor d3 = nth_derivative([](const Tensor& v) { return softplus(v); }, x, 3);
  for (std::size_t i = 0; i < x.numel(); ++i) {
    const double s = 1.0 / (1.0 + std::exp(-x.data()[i]));
    BOOST_TEST(d1.data()[i] == s, boost::test_tools::tolerance(1e-14));
    BOOST_TEST(d3.data()[i] == s * (1 - s) * (1 - 2 * s), boost::test_tools::tolerance(1e-12));
  }
}

BOOST_AUTO_TEST_CASE(third_derivative_of_exp_and_log) {
  Tensor x = points.clone().requires_grad_();
  Tensor e3 = nth_derivative([](const Tensor& v) { return exp(v); }, x, 3);
  for (std::size_t i = 0; i < x.numel(); ++i)
    BOOST_TEST(e3.data()[i] == std::exp(x.data()[i]), boost::test_tools::tolerance(1e-14));

  Tensor p = Tensor{0.25, 0.5, 1.0, 3.0, 10.0}.requires_grad_();
  Tensor l3 = nth_derivative([](const Tensor& v) { return log(v); }, p, 3);  // 2 / x³
  for (std::size_t i = 0; i < p.numel(); ++i) {
    const double v = p.data()[i];
    BOOST_TEST(l3.data()[i] == 2.0 / (v * v * v), boost::test_tools::tolerance(1e-13));
  }
}

BOOST_AUTO_TEST_CASE(fourth_and_fifth_order) {
  Tensor x = Tensor{-1.0, 0.5, 2.0}.requires_grad_();
  Tensor e4 = nth_derivative([](const Tensor& v) { return exp(v); }, x, 4);
  for (std::size_t i = 0; i < x.numel(); ++i)
    BOOST_TEST(e4.data()[i] == std::exp(x.data()[i]), boost::test_tools::tolerance(1e-14));
  // sin'''' = sin, sin''''' = cos
  Tensor s4 = nth_derivative([](const Tensor& v) { return sin(v); }, x, 4);
  Tensor s5 = nth_derivative([](const Tensor& v) { return sin(v); }, x, 5);
  for (std::size_t i = 0; i < x.numel(); ++i) {
    BOOST_TEST(s4.data()[i] == std::sin(x.data()[i]), boost::test_tools::tolerance(1e-13));
    BOOST_TEST(s5.data()[i] == std::cos(x.data()[i]), boost::test_tools::tolerance(1e-13));
  }
  // a polynomial runs out: (x⁴)'''' = 24, fifth derivative 0
  Tensor q4 = nth_derivative([](const Tensor& v) { return v * v * v * v; }, x, 4);
  HESSE_CHECK_CLOSE(q4, full(S({3}), 24.0), 1e-13);
}

BOOST_AUTO_TEST_CASE(hessian_of_quadratic_form_is_a_plus_a_transpose) {
  const std::size_t n = 5;
  Generator gen(3);
  Tensor A = randn(S({n, n}), gen);
  Tensor x = randn(S({n}), gen).requires_grad_();
  Tensor f = dot(x, matmul(A, x));
  Tensor g = grad(f, x, Tensor(), with_graph());
  // first derivative: (A + Aᵀ) x
  Tensor At = transpose(A);
  HESSE_CHECK_CLOSE(g, matmul(A + At, x), 1e-13);
  Tensor H = zeros(S({n, n}));
  for (std::size_t i = 0; i < n; ++i) {
    Tensor hrow = grad(g, x, unit(n, i), retaining());
    std::copy(hrow.data(), hrow.data() + n, H.mutable_data() + i * n);
  }
  Tensor expected = A + At;
  HESSE_CHECK_CLOSE(H, expected, 0.0);
  // and it is not just symmetric by accident: A itself is not
  BOOST_TEST(max_abs_diff(A, At) > 0.1);
}

BOOST_AUTO_TEST_CASE(mixed_partials_agree) {
  // f = sin(xy) + x²y³
  // f_x  = y cos(xy) + 2x y³,   f_y = x cos(xy) + 3x² y²
  // f_xy = f_yx = cos(xy) - xy sin(xy) + 6x y²
  // f_xx = -y² sin(xy) + 2y³,   f_yy = -x² sin(xy) + 6x² y
  for (auto [xv, yv] : {std::pair{0.7, -1.2}, std::pair{-0.3, 0.5}, std::pair{1.5, 2.0}}) {
    Tensor x = Tensor(xv).requires_grad_();
    Tensor y = Tensor(yv).requires_grad_();
    Tensor f = sin(x * y) + x * x * y * y * y;
    const std::vector<Tensor> g = grad({f}, {x, y}, {}, with_graph());
    const double c = std::cos(xv * yv), s = std::sin(xv * yv);
    BOOST_TEST(g[0].item() == yv * c + 2 * xv * yv * yv * yv, boost::test_tools::tolerance(1e-14));
    BOOST_TEST(g[1].item() == xv * c + 3 * xv * xv * yv * yv, boost::test_tools::tolerance(1e-14));
    const std::vector<Tensor> gx = grad({g[0]}, {x, y}, {}, retaining());  // f_xx, f_xy
    const std::vector<Tensor> gy = grad({g[1]}, {x, y}, {}, retaining());  // f_yx, f_yy
    const double fxy = c - xv * yv * s + 6 * xv * yv * yv;
    BOOST_TEST(gx[1].item() == fxy, boost::test_tools::tolerance(1e-13));
    BOOST_TEST(gy[0].item() == fxy, boost::test_tools::tolerance(1e-13));
    BOOST_TEST(gx[0].item() == -yv * yv * s + 2 * yv * yv * yv, boost::test_tools::tolerance(1e-13));
    BOOST_TEST(gy[1].item() == -xv * xv * s + 6 * xv * xv * yv, boost::test_tools::tolerance(1e-13));
  }
}

BOOST_AUTO_TEST_CASE(second_order_through_saved_outputs_and_divisions) {
  // f = Σ exp(x) / x:  f' = e^x (x - 1) / x²,  f'' = e^x (x² - 2x + 2) / x³
  Tensor x = Tensor{0.5, 1.0, 2.5}.requires_grad_();
  Tensor d2 = nth_derivative([](const Tensor& v) { return exp(v) / v; }, x, 2);
  for (std::size_t i = 0; i < x.numel(); ++i) {
    const double v = x.data()[i];
    BOOST_TEST(d2.data()[i] == std::exp(v) * (v * v - 2 * v + 2) / (v * v * v), boost::test_tools::tolerance(1e-13));
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ batched seeds

namespace {

// A small MLP on a flat parameter vector θ (so that Hessians are one matrix):
// W1 [3, 4], b1 [3], W2 [2, 3]; inputs X [5, 4]; output log-probabilities [5, 2].
constexpr std::size_t kIn = 4, kHidden = 3, kOut = 2, kBatch = 5;
constexpr std::size_t kParams = kHidden * kIn + kHidden + kOut * kHidden;  // 21

Tensor mlp_logp(const Tensor& theta, const Tensor& X) {
  const std::int64_t w1 = kHidden * kIn, b1 = w1 + kHidden, w2 = b1 + kOut * kHidden;
  Tensor W1 = reshape(slice(theta, 0, 0, w1), {std::int64_t(kHidden), std::int64_t(kIn)});
  Tensor B1 = slice(theta, 0, w1, b1);
  Tensor W2 = reshape(slice(theta, 0, b1, w2), {std::int64_t(kOut), std::int64_t(kHidden)});
  Tensor h = tanh(matmul(X, transpose(W1)) + B1);
  return log_softmax(matmul(h, transpose(W2)), -1);
}

Tensor mlp_loss(const Tensor& theta, const Tensor& X, const Tensor& targets) {
  return -mean(sum(mlp_logp(theta, X) * targets, {-1}));
}

struct MlpCase {
  Generator gen{2024};
  Tensor theta = (randn(S({kParams}), gen) * 0.7).requires_grad_();
  Tensor X = randn(S({kBatch, kIn}), gen);
  Tensor targets = Tensor{{1.0, 0.0}, {0.0, 1.0}, {0.0, 1.0}, {1.0, 0.0}, {0.3, 0.7}};
};

}  // namespace

BOOST_AUTO_TEST_SUITE(batched_seeds)

BOOST_FIXTURE_TEST_CASE(first_order_matches_one_seed_at_a_time, MlpCase) {
  const std::size_t k = 7;
  Tensor seeds = randn(S({k, kBatch, kOut}), gen);
  // a second input, X itself, to check two inputs get the batch dims
  Tensor Xg = X.clone().requires_grad_();
  Tensor out = mlp_logp(theta, Xg);
  GradOptions batched = retaining();
  batched.batched_grad_outputs = true;
  const std::vector<Tensor> gb = grad({out}, {theta, Xg}, {seeds}, batched);
  BOOST_TEST((gb[0].shape() == S({k, kParams})));
  BOOST_TEST((gb[1].shape() == S({k, kBatch, kIn})));
  for (std::size_t i = 0; i < k; ++i) {
    const std::vector<Tensor> g1 = grad({out}, {theta, Xg}, {row(seeds, i)}, retaining());
    HESSE_CHECK_CLOSE(row(gb[0], i), g1[0], 1e-14);
    HESSE_CHECK_CLOSE(row(gb[1], i), g1[1], 1e-14);
  }
  // two leading batch dims work too
  Tensor seeds2 = reshape(seeds, {1, std::int64_t(k), std::int64_t(kBatch), std::int64_t(kOut)});
  Tensor gb2 = grad(out, theta, seeds2, batched);
  BOOST_TEST((gb2.shape() == S({1, k, kParams})));
  HESSE_CHECK_CLOSE(reshape(gb2, gb[0].shape()), gb[0], 1e-14);
}

BOOST_FIXTURE_TEST_CASE(batched_hessian_matches_row_by_row, MlpCase) {
  Tensor L = mlp_loss(theta, X, targets);
  Tensor g = grad(L, theta, Tensor(), with_graph());
  GradOptions batched = retaining();
  batched.batched_grad_outputs = true;
  Tensor H = grad(g, theta, eye(kParams), batched);
  BOOST_TEST((H.shape() == S({kParams, kParams})));
  for (std::size_t i = 0; i < kParams; ++i)
    HESSE_CHECK_CLOSE(row(H, i), grad(g, theta, unit(kParams, i), retaining()), 1e-14);
  // a Hessian is symmetric
  HESSE_CHECK_CLOSE(H, transpose(H), 1e-12);
  // and it is the derivative of the gradient: central differences along a direction
  Tensor v = randn(S({kParams}), gen);
  const double eps = 1e-5;
  Tensor tp = (theta.detach() + v * eps).requires_grad_();
  Tensor tm = (theta.detach() - v * eps).requires_grad_();
  Tensor fd = (grad(mlp_loss(tp, X, targets), tp) - grad(mlp_loss(tm, X, targets), tm)) / (2 * eps);
  HESSE_CHECK_CLOSE(matmul(H, v), fd, 1e-7);
}

BOOST_FIXTURE_TEST_CASE(batched_second_order_with_batched_first_order_seed, MlpCase) {
  // grad-of-grad where the first pass was itself batched: J = ∂logp/∂θ rows,
  // then one batched pass over a seed batch of the flattened Jacobian
  Tensor out = mlp_logp(theta, X);
  GradOptions first = with_graph();
  first.batched_grad_outputs = true;
  const std::size_t k = 3;
  Tensor seeds = randn(S({k, kBatch, kOut}), gen);
  Tensor J = grad(out, theta, seeds, first);  // [k, P]
  Tensor w = randn(S({k, kParams}), gen);
  Tensor second = grad(sum(J * w), theta, Tensor(), retaining());
  // reference: one seed at a time
  Tensor expected = zeros(S({kParams}));
  for (std::size_t i = 0; i < k; ++i) {
    Tensor Ji = grad(out, theta, row(seeds, i), with_graph());
    expected = expected + grad(sum(Ji * row(w, i)), theta, Tensor(), retaining());
  }
  HESSE_CHECK_CLOSE(second, expected, 1e-13);
}

BOOST_AUTO_TEST_CASE(omitted_scalar_seed_broadcasts_over_the_batch) {
  Tensor x = Tensor{0.4, -0.8, 1.2}.requires_grad_();
  Tensor L = sum(x * x);  // scalar, seed omitted: 2x for every batch entry
  Tensor y = sin(x);      // vector, batched seeds V: V_i cos x
  Tensor V{{1.0, 0.0, 0.0}, {0.5, -2.0, 3.0}};
  GradOptions o = retaining();
  o.batched_grad_outputs = true;
  Tensor g = grad({L, y}, {x}, {Tensor(), V}, o)[0];
  BOOST_TEST((g.shape() == S({2, 3})));
  for (std::size_t i = 0; i < 2; ++i)
    HESSE_CHECK_CLOSE(row(g, i), x * 2.0 + row(V, i) * cos(x), 1e-15);
  // disagreeing batch dims are rejected
  HESSE_CHECK_THROWS(grad({y, y}, {x}, {V, ones(S({4, 3}))}, o), ShapeError, "batch");
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ no-grad, detach

BOOST_AUTO_TEST_SUITE(no_grad)

BOOST_AUTO_TEST_CASE(nothing_is_recorded_under_no_grad) {
  Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  BOOST_TEST(is_grad_enabled());
  {
    NoGradGuard guard;
    BOOST_TEST(!is_grad_enabled());
    Tensor y = tanh(x) * x + 1.0;
    BOOST_TEST(!y.requires_grad());
    BOOST_TEST(!y.grad_fn());
    BOOST_TEST(y.is_leaf());
    BOOST_TEST(y.data()[0] == std::tanh(1.0) + 1.0);  // still computes
    HESSE_CHECK_THROWS(sum(y).backward(), AutogradError, "does not require grad");
  }
  BOOST_TEST(is_grad_enabled());
  BOOST_TEST((tanh(x) * x).requires_grad());
}

BOOST_AUTO_TEST_CASE(nested_guards_restore_state) {
  BOOST_TEST(is_grad_enabled());
  {
    NoGradGuard a;
    BOOST_TEST(!is_grad_enabled());
    {
      EnableGradGuard b;
      BOOST_TEST(is_grad_enabled());
      Tensor x = Tensor{1.0}.requires_grad_();
      BOOST_TEST((x * 2.0).requires_grad());
      {
        NoGradGuard c;
        BOOST_TEST(!is_grad_enabled());
        {
          NoGradGuard d;
          BOOST_TEST(!is_grad_enabled());
        }
        BOOST_TEST(!is_grad_enabled());
      }
      BOOST_TEST(is_grad_enabled());
    }
    BOOST_TEST(!is_grad_enabled());
    {
      NoGradGuard e;
    }
    BOOST_TEST(!is_grad_enabled());
  }
  BOOST_TEST(is_grad_enabled());
}

BOOST_AUTO_TEST_CASE(guard_state_is_restored_after_an_exception_in_grad) {
  Tensor x = Tensor{1.0, 2.0}.requires_grad_();
  Tensor y = sum(x * x);
  {
    NoGradGuard guard;
    HESSE_CHECK_THROWS(grad({y}, {x}, {ones(S({7}))}, with_graph()), ShapeError, "[7]");
    BOOST_TEST(!is_grad_enabled());
  }
  BOOST_TEST(is_grad_enabled());
}

BOOST_AUTO_TEST_CASE(create_graph_records_even_inside_no_grad) {
  Tensor x = Tensor{0.5}.requires_grad_();
  Tensor y = sum(x * x * x);
  NoGradGuard guard;
  Tensor g = grad(y, x, Tensor(), with_graph());
  BOOST_TEST(g.requires_grad());
  BOOST_TEST(!is_grad_enabled());
  BOOST_TEST(grad(g, x).item() == 6 * 0.5);
}

BOOST_AUTO_TEST_CASE(detach_cuts_the_tape) {
  Tensor x = Tensor{1.5, -0.5}.requires_grad_();
  Tensor a = x * x;
  Tensor b = a.detach() * x;  // d/dx with a constant a: a = x² (values)
  Tensor g = grad(sum(b), x);
  HESSE_CHECK_CLOSE(g, x.detach() * x.detach(), 0.0);
  // with no path left, the input is unused
  Tensor c = sum(a.detach() * 2.0);
  BOOST_TEST(!c.requires_grad());
  Tensor d = sum(a.detach()) + sum(x) * 0.0;
  HESSE_CHECK_CLOSE(grad(d, x), zeros(S({2})), 0.0);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ deferred values

// A gradient returned by grad() with create_graph is often only differentiated
// again (an HVP seeds it), so a large product that goes nowhere else is
// computed on first access only. Reading it, by any route, gives exactly the
// values computed at once.
BOOST_AUTO_TEST_SUITE(deferred_values)

namespace {

// loss = Σ tanh(X Wᵀ) with W [32, 64] and X [128, 64]: dW = δᵀ X is a
// 32·128·64 product, large enough to be deferred.
struct LargeProduct {
  Generator gen{7};
  Tensor W = (randn(S({32, 64}), gen) * 0.2).requires_grad_();
  Tensor X = randn(S({128, 64}), gen);
  static constexpr std::uint64_t kFlops = 2 * 32 * 128 * 64;

  Tensor loss() const { return sum(tanh(linear(X, W))); }
  /// dW with create_graph: deferred.
  Tensor deferred() const { return grad(loss(), W, Tensor(), with_graph()); }
  /// dW without: computed at once.
  Tensor eager() const { return grad(loss(), W); }
};

std::string printed(const Tensor& t) {
  std::ostringstream os;
  os << t.detach();
  return os.str();
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(a_returned_gradient_is_computed_on_first_read_only, LargeProduct) {
  const Tensor expect = eager();
  Tensor g;
  const std::uint64_t at_grad = gemm_flops_of([&] { g = deferred(); });
  BOOST_TEST(gemm_flops_of([&] { (void)eager(); }) - at_grad == kFlops);  // the product was skipped
  BOOST_TEST(g.requires_grad());
  BOOST_TEST(gemm_flops_of([&] { HESSE_CHECK_CLOSE(g, expect, 0.0); }) == kFlops);  // read: computed now
  BOOST_TEST(gemm_flops_of([&] { HESSE_CHECK_CLOSE(g, expect, 0.0); }) == 0u);      // and only once
  // still differentiable: d/dW Σ g² through the deferred node
  const Tensor gg = grad(sum(g * g), W);
  BOOST_TEST(gg.shape() == W.shape());
}

BOOST_FIXTURE_TEST_CASE(every_read_gives_the_eager_values, LargeProduct) {
  const Tensor expect = eager();
  const xt::xarray<double> expect_values = expect.value();
  BOOST_TEST(deferred().value() == expect_values);
  HESSE_CHECK_CLOSE(deferred().clone(), expect, 0.0);
  HESSE_CHECK_CLOSE(deferred().detach(), expect, 0.0);  // shares the pending storage
  HESSE_CHECK_CLOSE(reshape(deferred(), {-1}), reshape(expect, {-1}), 0.0);
  HESSE_CHECK_CLOSE(slice(deferred(), 0, 3, 7), slice(expect, 0, 3, 7), 0.0);
  HESSE_CHECK_CLOSE(deferred() * 2.0, expect * 2.0, 0.0);
  BOOST_TEST(sum(deferred()).item() == sum(expect).item());
  BOOST_TEST(printed(deferred()) == printed(expect));
  const std::string path = "test_autograd_deferred.npy";
  save_npy(path, deferred());
  HESSE_CHECK_CLOSE(load_npy(path), expect, 0.0);
  std::remove(path.c_str());
  // writing into a deferred tensor computes it first: the other entries stay
  Tensor g = deferred();
  g.mutable_data()[0] += 1.0;
  Tensor expect_written = expect.clone();
  expect_written.mutable_data()[0] += 1.0;
  HESSE_CHECK_CLOSE(g, expect_written, 0.0);
}

BOOST_FIXTURE_TEST_CASE(writing_an_operand_computes_pending_values_first, LargeProduct) {
  const Tensor expect = eager();
  const Tensor g = deferred();  // reads X when computed
  Tensor h = deferred();
  X.mutable_data()[0] += 1.0;  // in place, as a data loader reusing its buffer would
  HESSE_CHECK_CLOSE(g, expect, 0.0);
  HESSE_CHECK_CLOSE(h, expect, 0.0);
  // also through another handle on the same storage
  const Tensor moved = eager();
  const Tensor k = deferred();
  Tensor view = X.detach();
  view.mutable_data()[1] -= 2.0;
  HESSE_CHECK_CLOSE(k, moved, 0.0);
  BOOST_CHECK_GT(max_abs_diff(eager(), moved), 0.0);  // the write did change X
}

BOOST_FIXTURE_TEST_CASE(concurrent_first_reads_compute_once, LargeProduct) {
  const Tensor expect = eager();
  const Tensor g = deferred();
  double first[2] = {0.0, 0.0};
  const std::uint64_t flops = gemm_flops_of([&] {
    std::thread a([&] { first[0] = g.data()[5]; });
    std::thread b([&] { first[1] = g.data()[5]; });
    a.join();
    b.join();
  });
  BOOST_TEST(flops == kFlops);
  BOOST_TEST(first[0] == expect.data()[5]);
  BOOST_TEST(first[1] == expect.data()[5]);
}

BOOST_FIXTURE_TEST_CASE(backward_and_plain_grad_stay_eager, LargeProduct) {
  // leaf .grad() is for reading; so is a gradient without a graph
  BOOST_TEST(gemm_flops_of([&] { loss().backward(); }) == gemm_flops_of([&] { (void)eager(); }));
  HESSE_CHECK_CLOSE(W.grad(), eager(), 0.0);
  BOOST_TEST(gemm_flops_of([&] { (void)W.grad().data(); }) == 0u);
  // a small product is not worth deferring
  Tensor w = randn(S({3, 4}), gen).requires_grad_();
  const Tensor x = randn(S({5, 4}), gen);
  Tensor g;
  const std::uint64_t at_grad = gemm_flops_of([&] { g = grad(sum(tanh(linear(x, w))), w, Tensor(), with_graph()); });
  BOOST_TEST(at_grad == 2u * (5 * 4 * 3) + 2u * (3 * 5 * 4));
  BOOST_TEST(gemm_flops_of([&] { (void)g.data(); }) == 0u);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ deep graphs

BOOST_AUTO_TEST_SUITE(deep_graphs)

constexpr int kDepth = 100000;

BOOST_AUTO_TEST_CASE(long_affine_chain_backpropagates) {
  Tensor x = Tensor(1.0).requires_grad_();
  Tensor y = x;
  for (int i = 0; i < kDepth; ++i) y = y * 1.0000001 + 0.0;
  y.backward();
  BOOST_TEST(x.grad().item() == std::pow(1.0000001, kDepth), boost::test_tools::tolerance(1e-10));
}

BOOST_AUTO_TEST_CASE(long_tanh_chain_gives_the_chain_rule_product) {
  Tensor x = Tensor(0.8).requires_grad_();
  Tensor y = x;
  for (int i = 0; i < kDepth; ++i) y = tanh(y);
  double v = 0.8, d = 1.0;
  for (int i = 0; i < kDepth; ++i) {
    v = std::tanh(v);
    d *= 1 - v * v;
  }
  BOOST_TEST(y.item() == v, boost::test_tools::tolerance(1e-12));
  Tensor g = grad(y, x);
  BOOST_TEST(g.item() == d, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(d > 0.0);  // not underflowed: the comparison means something
}

BOOST_AUTO_TEST_CASE(long_chains_are_destroyed_without_backward) {
  // ops whose rules hold their inputs (sin, mul of two tensors) as well as edges
  Tensor x = Tensor{0.1, 0.2}.requires_grad_();
  Tensor c = Tensor{1.0, 1.0}.requires_grad_();
  {
    Tensor y = x;
    for (int i = 0; i < kDepth; ++i) y = sin(y) * c;
    BOOST_TEST(y.requires_grad());
  }  // y and its 200,000 nodes go here
  {
    Tensor y = x;
    for (int i = 0; i < kDepth; ++i) y = y + 1.0;
    std::shared_ptr<Node> keep = y.grad_fn();  // the last owner is a node handle, not a tensor
    y = Tensor();
    BOOST_TEST(keep != nullptr);
    keep.reset();
  }
  BOOST_TEST(x.requires_grad());
}

BOOST_AUTO_TEST_CASE(long_chain_second_order) {
  // f = x·c^n built from n multiplications: f'' = 0 for the scalar chain,
  // f = x²·c^n: f'' = 2c^n.
  const int n = 20000;
  Tensor x = Tensor(0.7).requires_grad_();
  Tensor y = x * x;
  for (int i = 0; i < n; ++i) y = y * 1.00001;
  Tensor g = grad(y, x, Tensor(), with_graph());
  BOOST_TEST(g.item() == 2 * 0.7 * std::pow(1.00001, n), boost::test_tools::tolerance(1e-10));
  BOOST_TEST(grad(g, x).item() == 2 * std::pow(1.00001, n), boost::test_tools::tolerance(1e-10));
}

BOOST_AUTO_TEST_SUITE_END()
