#define BOOST_TEST_MODULE test_loss
#include "test_util.hpp"

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "hesse/nn/loss.hpp"

using namespace hesse;
using nn::Reduction;

namespace {

Shape S(std::initializer_list<std::size_t> dims) { return Shape(dims.begin(), dims.end()); }

const Reduction kReductions[] = {Reduction::none, Reduction::sum, Reduction::mean};

const char* name(Reduction r) { return r == Reduction::none ? "none" : r == Reduction::sum ? "sum" : "mean"; }

/// A leaf copy that requires grad.
Tensor param(const Tensor& t) {
  Tensor c = t.clone();
  c.requires_grad_();
  return c;
}

Tensor from(const Shape& shape, const std::vector<double>& values) {
  BOOST_REQUIRE_EQUAL(numel_of(shape), values.size());
  Tensor t = Tensor::empty(shape);
  std::copy(values.begin(), values.end(), t.mutable_data());
  return t;
}

/// The expected loss from per-element values: kept (with `shape`), summed, or
/// divided by `denominator` (the element count unless given).
Tensor expected(const std::vector<double>& per, const Shape& shape, Reduction r, double denominator = -1.0) {
  if (r == Reduction::none) return from(shape, per);
  double total = 0.0;
  for (double v : per) total += v;
  if (r == Reduction::sum) return Tensor(total);
  return Tensor(total / (denominator < 0 ? double(per.size()) : denominator));
}

/// log Σ_c exp(x[n, c]) for an [N, C] tensor, by hand.
std::vector<double> logsumexp_rows(const Tensor& x) {
  const std::size_t N = x.shape()[0], C = x.shape()[1];
  std::vector<double> out(N);
  for (std::size_t n = 0; n < N; ++n) {
    double m = -std::numeric_limits<double>::infinity();
    for (std::size_t c = 0; c < C; ++c) m = std::max(m, x.data()[n * C + c]);
    double s = 0.0;
    for (std::size_t c = 0; c < C; ++c) s += std::exp(x.data()[n * C + c] - m);
    out[n] = m + std::log(s);
  }
  return out;
}

/// The Hessian of a scalar f at x0, row by row from a recorded gradient.
Tensor hessian_of(const std::function<Tensor(const Tensor&)>& f, const Tensor& x0) {
  Tensor x = param(x0);
  GradOptions keep;
  keep.create_graph = true;
  const Tensor g = grad(f(x), x, Tensor(), keep);
  const std::size_t n = x.numel();
  Tensor h = zeros(S({n, n}));
  for (std::size_t i = 0; i < n; ++i) {
    Tensor seed = zeros(g.shape());
    seed.mutable_data()[i] = 1.0;
    GradOptions again;
    again.retain_graph = true;
    const Tensor row = grad(g, x, seed, again);
    std::copy(row.data(), row.data() + n, h.mutable_data() + i * n);
  }
  return h;
}

/// gradcheck and gradgradcheck of f over the inputs that require grad.
void check_derivatives(const TensorFunction& f, const std::vector<Tensor>& inputs) {
  BOOST_CHECK(gradcheck(f, inputs));
  BOOST_CHECK(gradgradcheck(f, inputs));
}

double sigmoid_ref(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace

// ---- MSE ----

BOOST_AUTO_TEST_CASE(mse_by_hand) {
  // (1 - 3)² = 4, (2 + 1)² = 9
  HESSE_CHECK_CLOSE(nn::mse_loss(Tensor{1.0, 2.0}, Tensor{3.0, -1.0}), Tensor(6.5), 0.0);
  HESSE_CHECK_CLOSE(nn::mse_loss(Tensor{1.0, 2.0}, Tensor{3.0, -1.0}, Reduction::sum), Tensor(13.0), 0.0);
  HESSE_CHECK_CLOSE(nn::mse_loss(Tensor{1.0, 2.0}, Tensor{3.0, -1.0}, Reduction::none), (Tensor{4.0, 9.0}), 0.0);
}

BOOST_AUTO_TEST_CASE(mse_matches_closed_form) {
  Generator gen(1);
  const Tensor x = randn(S({3, 4}), gen), y = randn(S({3, 4}), gen);
  std::vector<double> per(12);
  for (std::size_t i = 0; i < 12; ++i) per[i] = std::pow(x.data()[i] - y.data()[i], 2);
  for (Reduction r : kReductions) {
    BOOST_TEST_CONTEXT("reduction " << name(r)) {
      HESSE_CHECK_CLOSE(nn::mse_loss(x, y, r), expected(per, x.shape(), r), 1e-14);
      HESSE_CHECK_CLOSE(nn::MSELoss(r)(x, y), expected(per, x.shape(), r), 1e-14);
    }
  }
}

BOOST_AUTO_TEST_CASE(mse_derivatives) {
  Generator gen(2);
  const Tensor x = param(randn(S({2, 3}), gen)), y = param(randn(S({2, 3}), gen));
  for (Reduction r : kReductions) {
    BOOST_TEST_CONTEXT("reduction " << name(r)) {
      check_derivatives([r](const std::vector<Tensor>& in) { return nn::mse_loss(in[0], in[1], r); }, {x, y});
    }
  }
  // mean of n squares: the Hessian is 2/n I
  const Tensor h = hessian_of([&](const Tensor& v) { return nn::mse_loss(v, y.detach()); }, x);
  HESSE_CHECK_CLOSE(h, eye(6) * (2.0 / 6.0), 1e-14);
}

BOOST_AUTO_TEST_CASE(mse_errors) {
  HESSE_CHECK_THROWS(nn::mse_loss(zeros(S({2, 3})), zeros(S({3}))), ShapeError,
                     "hesse::mse_loss: target of shape [3] does not match input of shape [2, 3]");
  HESSE_CHECK_THROWS(nn::mse_loss(zeros(S({2, 3})), zeros(S({3, 2}))), ShapeError, "[3, 2]");
  HESSE_CHECK_THROWS(nn::mse_loss(Tensor(), zeros(S({3}))), ValueError, "hesse::mse_loss: the input is undefined");
}

// ---- Huber ----

BOOST_AUTO_TEST_CASE(huber_by_hand) {
  // δ = 1: d = 0.5 -> ½ 0.25 = 0.125;  d = -2 -> 1 (2 - ½) = 1.5
  const Tensor loss = nn::huber_loss(Tensor{0.5, -2.0}, Tensor{0.0, 0.0}, {Reduction::none});
  HESSE_CHECK_CLOSE(loss, (Tensor{0.125, 1.5}), 1e-15);
  // δ = 2: d = 3 -> 2 (3 - 1) = 4;  d = 1 -> 0.5
  HESSE_CHECK_CLOSE(nn::huber_loss(Tensor{3.0, 1.0}, Tensor{0.0, 0.0}, {Reduction::sum, 2.0}), Tensor(4.5), 1e-15);
}

BOOST_AUTO_TEST_CASE(huber_matches_closed_form) {
  const double delta = 0.7;
  const Tensor x{{0.3, -0.5, 1.9}, {-2.0, 0.69, 0.0}};
  const Tensor y{{0.0, 0.0, 0.7}, {0.0, 0.0, 0.71}};
  std::vector<double> per(6), slope(6);
  for (std::size_t i = 0; i < 6; ++i) {
    const double d = x.data()[i] - y.data()[i];
    per[i] = std::abs(d) < delta ? 0.5 * d * d : delta * (std::abs(d) - 0.5 * delta);
    slope[i] = std::abs(d) < delta ? d : delta * (d > 0 ? 1.0 : -1.0);
  }
  for (Reduction r : kReductions) {
    BOOST_TEST_CONTEXT("reduction " << name(r)) {
      HESSE_CHECK_CLOSE(nn::huber_loss(x, y, {r, delta}), expected(per, x.shape(), r), 1e-15);
      HESSE_CHECK_CLOSE(nn::HuberLoss({r, delta})(x, y), expected(per, x.shape(), r), 1e-15);
    }
  }
  // d ℓ / d x = d inside, δ sign(d) outside
  Tensor xp = param(x);
  nn::huber_loss(xp, y, {Reduction::sum, delta}).backward();
  HESSE_CHECK_CLOSE(xp.grad(), from(x.shape(), slope), 1e-15);
}

BOOST_AUTO_TEST_CASE(huber_derivatives) {
  // points away from the kinks at |d| = δ
  const Tensor x = param(Tensor{{0.3, -0.5, 1.9}, {-2.0, 0.2, 1.1}});
  const Tensor y = param(Tensor{{0.1, 0.2, 0.5}, {0.3, -0.1, 0.4}});
  for (Reduction r : kReductions)
    for (double delta : {0.5, 1.0}) {
      BOOST_TEST_CONTEXT("reduction " << name(r) << ", delta " << delta) {
        check_derivatives([r, delta](const std::vector<Tensor>& in) { return nn::huber_loss(in[0], in[1], {r, delta}); },
                          {x, y});
      }
    }
  // second derivative: 1 inside, 0 outside (δ = 1: d = 0.2, -0.7, 1.4, -2.3, 0.3, 0.7)
  const Tensor h = hessian_of([&](const Tensor& v) { return nn::huber_loss(v, y.detach(), {Reduction::sum}); }, x);
  const std::vector<double> inside = {1, 1, 0, 0, 1, 1};
  for (std::size_t i = 0; i < 6; ++i)
    for (std::size_t j = 0; j < 6; ++j) BOOST_CHECK_EQUAL(h.data()[i * 6 + j], i == j ? inside[i] : 0.0);
}

BOOST_AUTO_TEST_CASE(huber_errors) {
  HESSE_CHECK_THROWS(nn::huber_loss(zeros(S({2})), zeros(S({2})), {Reduction::mean, 0.0}), ValueError,
                     "hesse::huber_loss: delta must be positive, got 0");
  HESSE_CHECK_THROWS(nn::huber_loss(zeros(S({2})), zeros(S({2})), {Reduction::mean, -1.0}), ValueError, "delta");
  HESSE_CHECK_THROWS(nn::huber_loss(zeros(S({2})), zeros(S({2, 1}))), ShapeError,
                     "hesse::huber_loss: target of shape [2, 1] does not match input of shape [2]");
}

// ---- Gaussian NLL ----

BOOST_AUTO_TEST_CASE(gaussian_nll_matches_closed_form) {
  Generator gen(3);
  const Tensor x = randn(S({3, 2}), gen), y = randn(S({3, 2}), gen);
  const Tensor var = rand(S({3, 2}), gen) + 0.5;
  const double half_log_2pi = 0.5 * std::log(2.0 * M_PI);
  for (bool full : {false, true}) {
    std::vector<double> per(6);
    for (std::size_t i = 0; i < 6; ++i) {
      const double d = x.data()[i] - y.data()[i], v = var.data()[i];
      per[i] = 0.5 * (std::log(v) + d * d / v) + (full ? half_log_2pi : 0.0);
    }
    for (Reduction r : kReductions) {
      BOOST_TEST_CONTEXT("reduction " << name(r) << ", full " << full) {
        const nn::GaussianNLLOptions o{r, full};
        HESSE_CHECK_CLOSE(nn::gaussian_nll_loss(x, y, var, o), expected(per, x.shape(), r), 1e-14);
        HESSE_CHECK_CLOSE(nn::GaussianNLLLoss(o)(x, y, var), expected(per, x.shape(), r), 1e-14);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(gaussian_nll_shared_variance) {
  // var [N] or [N, 1]: one variance per row, shared along the last axis
  const Tensor x{{1.0, 2.0, 3.0}, {0.0, -1.0, 0.5}}, y{{0.5, 2.5, 2.0}, {0.0, 0.0, 0.0}};
  const Tensor row_var{0.5, 2.0};
  std::vector<double> per(6);
  for (std::size_t i = 0; i < 6; ++i) {
    const double d = x.data()[i] - y.data()[i], v = row_var.data()[i / 3];
    per[i] = 0.5 * (std::log(v) + d * d / v);
  }
  for (Reduction r : kReductions) {
    HESSE_CHECK_CLOSE(nn::gaussian_nll_loss(x, y, row_var, {r}), expected(per, x.shape(), r), 1e-15);
    HESSE_CHECK_CLOSE(nn::gaussian_nll_loss(x, y, reshape(row_var, {2, 1}), {r}), expected(per, x.shape(), r), 1e-15);
  }
}

BOOST_AUTO_TEST_CASE(gaussian_nll_clamps_var_in_value_only) {
  // var below eps counts as eps in the value; its gradient is that of the
  // unclamped formula at eps (PyTorch clamps in place under no_grad)
  const double eps = 1e-3;
  const Tensor x{0.5, 0.01}, y{0.0, 0.0};
  Tensor var = param(Tensor{0.0, 2e-4});
  const Tensor loss = nn::gaussian_nll_loss(x, y, var, {Reduction::sum, false, eps});
  double value = 0.0;
  std::vector<double> dvar(2);
  for (std::size_t i = 0; i < 2; ++i) {
    const double d = x.data()[i];
    value += 0.5 * (std::log(eps) + d * d / eps);
    dvar[i] = 0.5 * (1.0 / eps - d * d / (eps * eps));
  }
  BOOST_CHECK_CLOSE(loss.item(), value, 1e-12);
  loss.backward();
  HESSE_CHECK_CLOSE(var.grad(), from(S({2}), dvar), 1e-9);
  // the default eps is 1e-6
  const Tensor loss0 = nn::gaussian_nll_loss(Tensor{0.0}, Tensor{0.0}, Tensor{0.0}, {Reduction::sum});
  BOOST_CHECK_CLOSE(loss0.item(), 0.5 * std::log(1e-6), 1e-12);
}

BOOST_AUTO_TEST_CASE(gaussian_nll_derivatives) {
  Generator gen(4);
  const Tensor x = param(randn(S({2, 3}), gen)), y = param(randn(S({2, 3}), gen));
  const Tensor var = param(rand(S({2, 3}), gen) + 0.5), row_var = param(rand(S({2}), gen) + 0.5);
  for (Reduction r : kReductions)
    for (bool full : {false, true}) {
      BOOST_TEST_CONTEXT("reduction " << name(r) << ", full " << full) {
        const nn::GaussianNLLOptions o{r, full};
        check_derivatives([o](const std::vector<Tensor>& in) { return nn::gaussian_nll_loss(in[0], in[1], in[2], o); },
                          {x, y, var});
        check_derivatives([o](const std::vector<Tensor>& in) { return nn::gaussian_nll_loss(in[0], in[1], in[2], o); },
                          {x, y, row_var});
      }
    }
}

BOOST_AUTO_TEST_CASE(gaussian_nll_errors) {
  const Tensor x = zeros(S({2, 3}));
  HESSE_CHECK_THROWS(nn::gaussian_nll_loss(x, x, Tensor{{1.0, 1.0, -0.5}, {1.0, 1.0, 1.0}}), ValueError,
                     "hesse::gaussian_nll_loss: var has a negative or NaN entry -0.5 at position 2 (var of shape [2, 3])");
  HESSE_CHECK_THROWS(nn::gaussian_nll_loss(x, x, Tensor{1.0, std::nan("")}), ValueError, "negative or NaN");
  HESSE_CHECK_THROWS(nn::gaussian_nll_loss(x, x, ones(S({3}))), ShapeError,
                     "hesse::gaussian_nll_loss: var of shape [3] does not fit input of shape [2, 3]");
  HESSE_CHECK_THROWS(nn::gaussian_nll_loss(x, x, ones(S({2, 2}))), ShapeError, "var of shape [2, 2]");
  HESSE_CHECK_THROWS(nn::gaussian_nll_loss(x, x, ones(S({1, 3}))), ShapeError, "var of shape [1, 3]");
  HESSE_CHECK_THROWS(nn::gaussian_nll_loss(x, zeros(S({3, 2})), ones(S({2, 3}))), ShapeError,
                     "hesse::gaussian_nll_loss: target of shape [3, 2] does not match input of shape [2, 3]");
  HESSE_CHECK_THROWS(nn::gaussian_nll_loss(x, x, Tensor()), ValueError, "var is undefined");
  HESSE_CHECK_THROWS(nn::gaussian_nll_loss(x, x, ones(S({2, 3})), {Reduction::mean, false, -1.0}), ValueError,
                     "eps must be non-negative");
}

// ---- NLL ----

BOOST_AUTO_TEST_CASE(nll_matches_closed_form) {
  Generator gen(5);
  const Tensor logp = randn(S({4, 3}), gen);
  const Tensor y{2.0, 0.0, 1.0, 2.0};
  const Tensor w{0.5, 2.0, 1.5};
  std::vector<double> plain(4), weighted(4);
  double wsum = 0.0;
  for (std::size_t n = 0; n < 4; ++n) {
    const std::size_t c = std::size_t(y.data()[n]);
    plain[n] = -logp.data()[n * 3 + c];
    weighted[n] = w.data()[c] * plain[n];
    wsum += w.data()[c];
  }
  for (Reduction r : kReductions) {
    BOOST_TEST_CONTEXT("reduction " << name(r)) {
      HESSE_CHECK_CLOSE(nn::nll_loss(logp, y, {r}), expected(plain, S({4}), r), 1e-15);
      HESSE_CHECK_CLOSE(nn::nll_loss(logp, y, {r, w}), expected(weighted, S({4}), r, wsum), 1e-15);
      HESSE_CHECK_CLOSE(nn::NLLLoss({r, w})(logp, y), expected(weighted, S({4}), r, wsum), 1e-15);
    }
  }
}

BOOST_AUTO_TEST_CASE(nll_weighted_mean_by_hand) {
  // log-probs picked: -1 (class 0, w 1) and -3 (class 1, w 3): (1·1 + 3·3) / (1 + 3) = 2.5
  const Tensor logp{{-1.0, -9.0}, {-9.0, -3.0}};
  HESSE_CHECK_CLOSE(nn::nll_loss(logp, Tensor{0.0, 1.0}, {Reduction::mean, Tensor{1.0, 3.0}}), Tensor(2.5), 0.0);
  HESSE_CHECK_CLOSE(nn::nll_loss(logp, Tensor{0.0, 1.0}), Tensor(2.0), 0.0);
}

BOOST_AUTO_TEST_CASE(nll_ignore_index) {
  const Tensor logp{{-1.0, -2.0}, {-3.0, -4.0}, {-5.0, -6.0}};
  const Tensor y{1.0, -100.0, 0.0};
  HESSE_CHECK_CLOSE(nn::nll_loss(logp, y, {Reduction::none}), (Tensor{2.0, 0.0, 5.0}), 0.0);
  HESSE_CHECK_CLOSE(nn::nll_loss(logp, y), Tensor(3.5), 0.0);  // (2 + 5) / 2 counted samples
  HESSE_CHECK_CLOSE(nn::nll_loss(logp, Tensor{1.0, 1.0, 0.0}, {Reduction::mean, Tensor(), 1}), Tensor(5.0), 0.0);
  // everything ignored: the mean is 0 / 0, as in PyTorch, whose derivatives
  // skip ignored rows: zero, not 0 · ∞ (targets of weight 0 give NaN in both)
  BOOST_CHECK(std::isnan(nn::nll_loss(logp, Tensor{-100.0, -100.0, -100.0}).item()));
  for (double eps : {0.0, 0.2}) {
    Tensor x = param(logp);
    const Tensor all_ignored = nn::cross_entropy(x, Tensor{-100.0, -100.0, -100.0}, {Reduction::mean, eps});
    BOOST_CHECK(std::isnan(all_ignored.item()));
    GradOptions recorded;
    recorded.create_graph = true;
    const Tensor g = grad(all_ignored, x, Tensor(), recorded);
    HESSE_CHECK_CLOSE(g, zeros({3, 2}), 0.0);
    BOOST_REQUIRE(g.requires_grad());
    HESSE_CHECK_CLOSE(grad(g, x, ones({3, 2})), zeros({3, 2}), 0.0);  // and second derivatives
    Tensor zero_weight = param(logp);
    nn::nll_loss(zero_weight, Tensor{0.0, 0.0, 0.0}, {Reduction::mean, Tensor{0.0, 1.0}}).backward();
    BOOST_CHECK(std::isnan(zero_weight.grad().data()[0]));
  }
  // no gradient reaches an ignored row
  Tensor lp = param(logp);
  nn::nll_loss(lp, y).backward();
  HESSE_CHECK_CLOSE(lp.grad(), (Tensor{{0.0, -0.5}, {0.0, 0.0}, {-0.5, 0.0}}), 0.0);
}

BOOST_AUTO_TEST_CASE(nll_shapes) {
  Generator gen(6);
  // unbatched: [C] with a 0-d target gives a 0-d loss
  const Tensor v{-0.5, -1.5, -2.5};
  HESSE_CHECK_CLOSE(nn::nll_loss(v, Tensor(1.0), {Reduction::none}), Tensor(1.5), 0.0);
  HESSE_CHECK_CLOSE(nn::nll_loss(v, Tensor(2.0)), Tensor(2.5), 0.0);
  // [N, C, d]: class axis 1, target [N, d]
  const Tensor x = randn(S({2, 3, 2}), gen);
  const Tensor y{{0.0, 2.0}, {1.0, 1.0}};
  std::vector<double> per(4);
  for (std::size_t n = 0; n < 2; ++n)
    for (std::size_t k = 0; k < 2; ++k)
      per[n * 2 + k] = -x.data()[(n * 3 + std::size_t(y.data()[n * 2 + k])) * 2 + k];
  for (Reduction r : kReductions) HESSE_CHECK_CLOSE(nn::nll_loss(x, y, {r}), expected(per, S({2, 2}), r), 0.0);
}

BOOST_AUTO_TEST_CASE(nll_derivatives) {
  Generator gen(7);
  const Tensor logp = param(randn(S({4, 3}), gen));
  const Tensor y{2.0, -100.0, 1.0, 2.0};
  for (Reduction r : kReductions) {
    BOOST_TEST_CONTEXT("reduction " << name(r)) {
      check_derivatives([r, y](const std::vector<Tensor>& in) { return nn::nll_loss(in[0], y, {r}); }, {logp});
      check_derivatives(
          [r, y](const std::vector<Tensor>& in) { return nn::nll_loss(in[0], y, {r, Tensor{0.5, 2.0, 1.5}}); },
          {logp});
    }
  }
}

BOOST_AUTO_TEST_CASE(nll_errors) {
  const Tensor logp = zeros(S({2, 3}));
  HESSE_CHECK_THROWS(nn::nll_loss(logp, Tensor{0.0, 1.0, 2.0}), ShapeError,
                     "hesse::nll_loss: target of shape [3] does not fit input of shape [2, 3]");
  HESSE_CHECK_THROWS(nn::nll_loss(logp, zeros(S({2, 3}))), ShapeError, "target of shape [2, 3]");
  HESSE_CHECK_THROWS(nn::nll_loss(logp, Tensor{0.0, 3.0}), IndexError,
                     "hesse::nll_loss: target 3 at position 1 is out of range for 3 classes (input of shape [2, 3]");
  HESSE_CHECK_THROWS(nn::nll_loss(logp, Tensor{-1.0, 0.0}), IndexError, "target -1 at position 0 is out of range");
  HESSE_CHECK_THROWS(nn::nll_loss(logp, Tensor{0.0, 1.5}), ValueError,
                     "hesse::nll_loss: target 1.5 at position 1 is not an integral class index");
  HESSE_CHECK_THROWS(nn::nll_loss(logp, Tensor{0.0, std::nan("")}), ValueError, "not an integral class index");
  HESSE_CHECK_THROWS(nn::nll_loss(logp, Tensor{0.0, 1.0}, {Reduction::mean, Tensor{1.0, 1.0}}), ShapeError,
                     "hesse::nll_loss: weight of shape [2] does not fit 3 classes");
  HESSE_CHECK_THROWS(nn::nll_loss(Tensor(1.0), Tensor(0.0)), ShapeError, "hesse::nll_loss: input must have a class axis");
  HESSE_CHECK_THROWS(nn::nll_loss(Tensor{0.0, 1.0}, Tensor{0.0}), ShapeError, "target of shape [1]");
}

// ---- cross-entropy ----

BOOST_AUTO_TEST_CASE(cross_entropy_by_hand) {
  // uniform logits over 4 classes: -log(1/4)
  HESSE_CHECK_CLOSE(nn::cross_entropy(zeros(S({2, 4})), Tensor{1.0, 3.0}), Tensor(std::log(4.0)), 1e-15);
  // large logits stay finite: lse(1000, 0) = 1000, lse(0, -1000) = 0
  const Tensor big{{1000.0, 0.0}, {0.0, -1000.0}};
  HESSE_CHECK_CLOSE(nn::cross_entropy(big, Tensor{1.0, 0.0}, {Reduction::none}), (Tensor{1000.0, 0.0}), 0.0);
}

BOOST_AUTO_TEST_CASE(cross_entropy_index_targets_match_closed_form) {
  Generator gen(8);
  const Tensor x = randn(S({4, 3}), gen) * 3.0;
  const Tensor y{2.0, 0.0, 1.0, 2.0};
  const std::vector<double> lse = logsumexp_rows(x);
  std::vector<double> per(4);
  for (std::size_t n = 0; n < 4; ++n) per[n] = lse[n] - x.data()[n * 3 + std::size_t(y.data()[n])];
  for (Reduction r : kReductions) {
    BOOST_TEST_CONTEXT("reduction " << name(r)) {
      HESSE_CHECK_CLOSE(nn::cross_entropy(x, y, {r}), expected(per, S({4}), r), 1e-14);
      HESSE_CHECK_CLOSE(nn::CrossEntropyLoss({r})(x, y), expected(per, S({4}), r), 1e-14);
      // cross_entropy = nll_loss ∘ log_softmax
      HESSE_CHECK_CLOSE(nn::cross_entropy(x, y, {r}), nn::nll_loss(log_softmax(x, 1), y, {r}), 1e-14);
    }
  }
}

BOOST_AUTO_TEST_CASE(cross_entropy_weights_ignore_and_smoothing) {
  // PyTorch: (1 - ε) w[y] (-logp[y]) + (ε / C) Σ_c w[c] (-logp[c]), zero where
  // ignored; the mean divides by Σ w[y] over the counted samples
  Generator gen(9);
  const Tensor x = randn(S({5, 3}), gen);
  const Tensor y{2.0, 0.0, 7.0, 1.0, 2.0};  // 7 is ignore_index
  const Tensor w{0.5, 2.0, 1.5};
  const std::vector<double> lse = logsumexp_rows(x);
  for (double eps : {0.0, 0.1, 0.5})
    for (bool weighted : {false, true}) {
      std::vector<double> per(5, 0.0);
      double denominator = 0.0;
      for (std::size_t n = 0; n < 5; ++n) {
        if (y.data()[n] == 7.0) continue;
        const std::size_t c = std::size_t(y.data()[n]);
        const double wc = weighted ? w.data()[c] : 1.0;
        double smooth = 0.0;
        for (std::size_t k = 0; k < 3; ++k) smooth += (weighted ? w.data()[k] : 1.0) * (lse[n] - x.data()[n * 3 + k]);
        per[n] = (1.0 - eps) * wc * (lse[n] - x.data()[n * 3 + c]) + eps / 3.0 * smooth;
        denominator += wc;
      }
      for (Reduction r : kReductions) {
        BOOST_TEST_CONTEXT("reduction " << name(r) << ", smoothing " << eps << ", weighted " << weighted) {
          const nn::CrossEntropyOptions o{r, eps, weighted ? w : Tensor(), 7};
          HESSE_CHECK_CLOSE(nn::cross_entropy(x, y, o), expected(per, S({5}), r, denominator), 1e-14);
        }
      }
    }
}

BOOST_AUTO_TEST_CASE(cross_entropy_smoothing_equals_smoothed_probabilities) {
  // without weights, index targets with smoothing ε are the probability targets (1 - ε) onehot + ε / C
  Generator gen(10);
  const Tensor x = randn(S({3, 4}), gen);
  const Tensor y{3.0, 0.0, 1.0};
  const double eps = 0.2;
  Tensor p = full(S({3, 4}), eps / 4.0);
  for (std::size_t n = 0; n < 3; ++n) p.mutable_data()[n * 4 + std::size_t(y.data()[n])] += 1.0 - eps;
  for (Reduction r : kReductions)
    HESSE_CHECK_CLOSE(nn::cross_entropy(x, y, {r, eps}), nn::cross_entropy(x, p, {r}), 1e-14);
}

BOOST_AUTO_TEST_CASE(cross_entropy_probability_targets_match_closed_form) {
  Generator gen(11);
  const Tensor x = randn(S({3, 4}), gen);
  const Tensor p = softmax(randn(S({3, 4}), gen), 1);
  const Tensor w{1.0, 0.5, 2.0, 1.5};
  const std::vector<double> lse = logsumexp_rows(x);
  for (double eps : {0.0, 0.3})
    for (bool weighted : {false, true}) {
      std::vector<double> per(3, 0.0);
      for (std::size_t n = 0; n < 3; ++n)
        for (std::size_t c = 0; c < 4; ++c) {
          const double target = (1.0 - eps) * p.data()[n * 4 + c] + eps / 4.0;
          per[n] += (weighted ? w.data()[c] : 1.0) * target * (lse[n] - x.data()[n * 4 + c]);
        }
      for (Reduction r : kReductions) {
        BOOST_TEST_CONTEXT("reduction " << name(r) << ", smoothing " << eps << ", weighted " << weighted) {
          // the mean divides by N whatever the weights
          HESSE_CHECK_CLOSE(nn::cross_entropy(x, p, {r, eps, weighted ? w : Tensor()}), expected(per, S({3}), r),
                            1e-14);
        }
      }
    }
}

BOOST_AUTO_TEST_CASE(cross_entropy_shapes) {
  Generator gen(12);
  // unbatched: [C] logits, 0-d index or [C] probabilities -> 0-d
  const Tensor v{0.5, -1.0, 2.0};
  const double lse = std::log(std::exp(0.5) + std::exp(-1.0) + std::exp(2.0));
  HESSE_CHECK_CLOSE(nn::cross_entropy(v, Tensor(1.0), {Reduction::none}), Tensor(lse + 1.0), 1e-14);
  HESSE_CHECK_CLOSE(nn::cross_entropy(v, Tensor{0.0, 0.0, 1.0}, {Reduction::none}), Tensor(lse - 2.0), 1e-14);
  HESSE_CHECK_CLOSE(nn::cross_entropy(v, Tensor(1.0)), Tensor(lse + 1.0), 1e-14);
  // [N, C, d]: the class axis is 1
  const Tensor x = randn(S({2, 3, 2}), gen);
  const Tensor y{{0.0, 2.0}, {1.0, 1.0}};
  const Tensor moved = reshape(permute(x, {0, 2, 1}), {4, 3});  // [N·d, C]
  for (Reduction r : kReductions) {
    Tensor want = nn::cross_entropy(moved, reshape(y, {4}), {r});
    if (r == Reduction::none) want = reshape(want, {2, 2});
    HESSE_CHECK_CLOSE(nn::cross_entropy(x, y, {r}), want, 1e-14);
  }
}

BOOST_AUTO_TEST_CASE(cross_entropy_derivatives) {
  Generator gen(13);
  const Tensor x = param(randn(S({3, 4}), gen));
  const Tensor y{3.0, 0.0, 1.0};
  const Tensor z = param(randn(S({3, 4}), gen));
  for (Reduction r : kReductions) {
    BOOST_TEST_CONTEXT("reduction " << name(r)) {
      // w.r.t. the logits, class indices (with weights, ignore_index and smoothing)
      check_derivatives([r, y](const std::vector<Tensor>& in) { return nn::cross_entropy(in[0], y, {r}); }, {x});
      check_derivatives(
          [r](const std::vector<Tensor>& in) {
            return nn::cross_entropy(in[0], Tensor{3.0, -1.0, 1.0}, {r, 0.1, Tensor{1.0, 2.0, 0.5, 1.5}, -1});
          },
          {x});
      // w.r.t. the logits and the probabilities, kept on the simplex as softmax(z)
      check_derivatives([r](const std::vector<Tensor>& in) { return nn::cross_entropy(in[0], softmax(in[1], 1), {r, 0.2}); },
                        {x, z});
      // and w.r.t. raw targets, without the distribution check
      nn::CrossEntropyOptions raw{r};
      raw.check_distribution = false;
      check_derivatives([raw](const std::vector<Tensor>& in) { return nn::cross_entropy(in[0], in[1], raw); },
                        {x, param(softmax(z.detach(), 1))});
    }
  }
}

BOOST_AUTO_TEST_CASE(cross_entropy_hessian_is_softmax_covariance) {
  // for one sample, ∂²/∂x² (-log softmax(x)[y]) = diag(p) - p pᵀ; the mean over N scales blocks by 1/N
  const Tensor x{{0.2, -1.0, 0.7}, {1.5, 0.0, -0.3}};
  const Tensor h = hessian_of([](const Tensor& v) { return nn::cross_entropy(v, Tensor{1.0, 2.0}); }, x);
  Tensor want = zeros(S({6, 6}));
  for (std::size_t n = 0; n < 2; ++n) {
    double z = 0.0;
    for (std::size_t c = 0; c < 3; ++c) z += std::exp(x.data()[n * 3 + c]);
    for (std::size_t a = 0; a < 3; ++a)
      for (std::size_t b = 0; b < 3; ++b) {
        const double pa = std::exp(x.data()[n * 3 + a]) / z, pb = std::exp(x.data()[n * 3 + b]) / z;
        want.mutable_data()[(n * 3 + a) * 6 + n * 3 + b] = ((a == b ? pa : 0.0) - pa * pb) / 2.0;
      }
  }
  HESSE_CHECK_CLOSE(h, want, 1e-14);
}

BOOST_AUTO_TEST_CASE(cross_entropy_errors) {
  const Tensor x = zeros(S({2, 3}));
  HESSE_CHECK_THROWS(nn::cross_entropy(x, Tensor{0.0, 1.0, 2.0}), ShapeError,
                     "hesse::cross_entropy: target of shape [3] does not fit input of shape [2, 3]");
  HESSE_CHECK_THROWS(nn::cross_entropy(x, zeros(S({3, 2}))), ShapeError, "or probabilities of the input's shape");
  HESSE_CHECK_THROWS(nn::cross_entropy(x, Tensor{0.0, 5.0}), IndexError,
                     "hesse::cross_entropy: target 5 at position 1 is out of range for 3 classes");
  HESSE_CHECK_THROWS(nn::cross_entropy(x, Tensor{0.5, 1.0}), ValueError,
                     "hesse::cross_entropy: target 0.5 at position 0 is not an integral class index");
  HESSE_CHECK_THROWS(nn::cross_entropy(x, Tensor{{0.5, 0.7, -0.2}, {1.0, 0.0, 0.0}}), ValueError,
                     "hesse::cross_entropy: probability target -0.2 at sample 0, class 2 is negative");
  HESSE_CHECK_THROWS(nn::cross_entropy(x, Tensor{{0.5, 0.5, 0.0}, {0.3, 0.3, 0.3}}), ValueError,
                     "hesse::cross_entropy: probability targets of sample 1 sum to 0.9, not 1 (target of shape [2, 3]");
  HESSE_CHECK_THROWS(nn::cross_entropy(x, Tensor{0.0, 1.0}, {Reduction::mean, 1.5}), ValueError,
                     "hesse::cross_entropy: label_smoothing must be in [0, 1], got 1.5");
  HESSE_CHECK_THROWS(nn::cross_entropy(x, Tensor{0.0, 1.0}, {Reduction::mean, 0.0, Tensor{1.0}}), ShapeError,
                     "hesse::cross_entropy: weight of shape [1] does not fit 3 classes");
  HESSE_CHECK_THROWS(nn::cross_entropy(x, ones(S({2, 3})) / 3.0, {Reduction::mean, 0.0, ones(S({2}))}), ShapeError,
                     "weight of shape [2]");
  HESSE_CHECK_THROWS(nn::cross_entropy(Tensor(0.0), Tensor(0.0)), ShapeError, "hesse::cross_entropy: input must have a class axis");
  // a sum off by less than 1e-6 is accepted; the check can be turned off
  BOOST_CHECK_NO_THROW(nn::cross_entropy(x, Tensor{{0.5, 0.5 + 5e-7, 0.0}, {1.0, 0.0, 0.0}}));
  nn::CrossEntropyOptions unchecked;
  unchecked.check_distribution = false;
  BOOST_CHECK_NO_THROW(nn::cross_entropy(x, Tensor{{0.5, 0.5, 0.0}, {0.3, 0.3, 0.3}}, unchecked));
}

// ---- BCE with logits ----

BOOST_AUTO_TEST_CASE(bce_with_logits_matches_naive_form) {
  // -(p y log σ(x) + (1 - y) log(1 - σ(x))) · w, fine for moderate x
  Generator gen(14);
  const Tensor x = randn(S({3, 2}), gen) * 2.0;
  const Tensor y = rand(S({3, 2}), gen);
  const Tensor pos{1.5, 0.25};  // per column, broadcast over rows
  const Tensor w = reshape(Tensor{1.0, 2.0, 0.5}, {3, 1});
  for (bool with_pos : {false, true})
    for (bool with_w : {false, true}) {
      std::vector<double> per(6);
      for (std::size_t i = 0; i < 6; ++i) {
        const double s = sigmoid_ref(x.data()[i]), t = y.data()[i];
        const double p = with_pos ? pos.data()[i % 2] : 1.0;
        per[i] = -(p * t * std::log(s) + (1.0 - t) * std::log(1.0 - s)) * (with_w ? w.data()[i / 2] : 1.0);
      }
      for (Reduction r : kReductions) {
        BOOST_TEST_CONTEXT("reduction " << name(r) << ", pos_weight " << with_pos << ", weight " << with_w) {
          const nn::BCEWithLogitsOptions o{r, with_pos ? pos : Tensor(), with_w ? w : Tensor()};
          HESSE_CHECK_CLOSE(nn::binary_cross_entropy_with_logits(x, y, o), expected(per, x.shape(), r), 1e-13);
          HESSE_CHECK_CLOSE(nn::BCEWithLogitsLoss(o)(x, y), expected(per, x.shape(), r), 1e-13);
        }
      }
    }
}

BOOST_AUTO_TEST_CASE(bce_with_logits_is_stable) {
  // the naive form gives log(0) here; the exact values are |x| or 0
  const Tensor x{800.0, -800.0, 800.0, -800.0};
  const Tensor y{0.0, 1.0, 1.0, 0.0};
  HESSE_CHECK_CLOSE(nn::binary_cross_entropy_with_logits(x, y, {Reduction::none}), (Tensor{800.0, 800.0, 0.0, 0.0}),
                    0.0);
  HESSE_CHECK_CLOSE(nn::binary_cross_entropy_with_logits(x, y, {Reduction::none, Tensor{3.0}}),
                    (Tensor{800.0, 2400.0, 0.0, 0.0}), 0.0);
  // dℓ/dx = σ(x) - y: ±1 or 0, finite
  Tensor xp = param(x);
  nn::binary_cross_entropy_with_logits(xp, y, {Reduction::sum}).backward();
  HESSE_CHECK_CLOSE(xp.grad(), (Tensor{1.0, -1.0, 0.0, 0.0}), 0.0);
}

BOOST_AUTO_TEST_CASE(bce_with_logits_derivatives) {
  Generator gen(15);
  const Tensor x = param(randn(S({2, 3}), gen)), y = param(rand(S({2, 3}), gen));
  const Tensor pos = param(rand(S({3}), gen) + 0.5);
  const Tensor w = rand(S({2, 1}), gen) + 0.5;
  for (Reduction r : kReductions) {
    BOOST_TEST_CONTEXT("reduction " << name(r)) {
      check_derivatives([r](const std::vector<Tensor>& in) { return nn::binary_cross_entropy_with_logits(in[0], in[1], {r}); },
                        {x, y});
      check_derivatives(
          [r, w](const std::vector<Tensor>& in) {
            return nn::binary_cross_entropy_with_logits(in[0], in[1], {r, in[2], w});
          },
          {x, y, pos});
    }
  }
}

BOOST_AUTO_TEST_CASE(bce_with_logits_third_derivative) {
  // ℓ = softplus(x) - x y:  ℓ' = σ - y,  ℓ'' = σ(1 - σ),  ℓ''' = σ(1 - σ)(1 - 2σ)
  for (double x0 : {-2.0, 0.3, 1.7}) {
    Tensor x = param(Tensor(x0));
    GradOptions o;
    o.create_graph = true;
    const Tensor d1 = grad(nn::binary_cross_entropy_with_logits(x, Tensor(0.25)), x, Tensor(), o);
    const Tensor d2 = grad(d1, x, Tensor(), o);
    const Tensor d3 = grad(d2, x, Tensor(), o);
    const double s = sigmoid_ref(x0);
    BOOST_CHECK_CLOSE(d1.item(), s - 0.25, 1e-10);
    BOOST_CHECK_CLOSE(d2.item(), s * (1 - s), 1e-10);
    BOOST_CHECK_CLOSE(d3.item(), s * (1 - s) * (1 - 2 * s), 1e-10);
  }
}

BOOST_AUTO_TEST_CASE(bce_with_logits_errors) {
  const Tensor x = zeros(S({3, 3}));
  HESSE_CHECK_THROWS(nn::binary_cross_entropy_with_logits(x, zeros(S({3}))), ShapeError,
                     "hesse::binary_cross_entropy_with_logits: target of shape [3] does not match input of shape [3, 3]");
  HESSE_CHECK_THROWS(nn::binary_cross_entropy_with_logits(x, x, {Reduction::mean, ones(S({4}))}), ShapeError,
                     "hesse::binary_cross_entropy_with_logits: pos_weight of shape [4] does not broadcast to input of "
                     "shape [3, 3]");
  HESSE_CHECK_THROWS(nn::binary_cross_entropy_with_logits(x, x, {Reduction::mean, Tensor(), ones(S({2, 3, 3}))}),
                     ShapeError, "weight of shape [2, 3, 3] does not broadcast");
}

// ---- any callable is a Loss ----

BOOST_AUTO_TEST_CASE(loss_type_erases_callables) {
  const Tensor out{{0.5, -0.5}, {1.0, 2.0}}, target{0.0, 1.0};
  auto total = [](const nn::Loss& loss, const Tensor& o, const Tensor& t) { return loss(o, t).item(); };
  BOOST_CHECK_CLOSE(total(nn::CrossEntropyLoss(), out, target), nn::cross_entropy(out, target).item(), 1e-12);
  BOOST_CHECK_CLOSE(total(nn::MSELoss(Reduction::sum), out, out * 2.0), nn::mse_loss(out, out * 2.0, Reduction::sum).item(),
                    1e-12);
  const nn::Loss custom = [](const Tensor& o, const Tensor& t) { return sum(abs(o - t)); };
  BOOST_CHECK_CLOSE(total(custom, out, zeros(S({2, 2}))), 4.0, 1e-12);
  // a loss differentiates through the std::function like any other
  Tensor p = param(out);
  const nn::Loss ce = nn::CrossEntropyLoss({Reduction::sum});
  ce(p, target).backward();
  BOOST_CHECK(p.grad().defined());
}
