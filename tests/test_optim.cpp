#define BOOST_TEST_MODULE test_optim
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <vector>

#include "hesse/nn/data.hpp"
#include "hesse/nn/loss.hpp"
#include "hesse/nn/optim.hpp"

using namespace hesse;

namespace {

Shape S(std::initializer_list<std::size_t> dims) { return Shape(dims.begin(), dims.end()); }

Tensor param(const Tensor& t) {
  Tensor c = t.clone();
  c.requires_grad_();
  return c;
}

std::vector<double> values(const Tensor& t) { return std::vector<double>(t.data(), t.data() + t.numel()); }

double distance(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// ---- a test problem: f(p, q) = ½ pᵀ A p - bᵀ p + ½ Σ c ⊙ q², so ∇p = A p - b, ∇q = c ⊙ q ----

const Tensor kA{{3.0, 0.5, 0.0}, {0.5, 2.0, -0.4}, {0.0, -0.4, 1.0}};
const Tensor kB{1.0, -2.0, 0.5};
const Tensor kC{{0.5, 1.0}, {2.0, 4.0}};

Tensor objective(const Tensor& p, const Tensor& q) {
  return 0.5 * dot(p, matmul(kA, p)) - dot(kB, p) + 0.5 * sum(kC * square(q));
}

// the same gradients by hand
std::vector<double> grad_p(const std::vector<double>& p) {
  std::vector<double> g(3);
  for (std::size_t i = 0; i < 3; ++i) {
    g[i] = -kB.data()[i];
    for (std::size_t j = 0; j < 3; ++j) g[i] += kA.data()[i * 3 + j] * p[j];
  }
  return g;
}
std::vector<double> grad_q(const std::vector<double>& q) {
  std::vector<double> g(4);
  for (std::size_t i = 0; i < 4; ++i) g[i] = kC.data()[i] * q[i];
  return g;
}

// A⁻¹ b by Gaussian elimination: the minimiser over p
std::vector<double> minimiser() {
  std::vector<double> a = values(kA), b = values(kB);
  for (std::size_t k = 0; k < 3; ++k)
    for (std::size_t i = k + 1; i < 3; ++i) {
      const double f = a[i * 3 + k] / a[k * 3 + k];
      for (std::size_t j = k; j < 3; ++j) a[i * 3 + j] -= f * a[k * 3 + j];
      b[i] -= f * b[k];
    }
  std::vector<double> x(3);
  for (std::size_t i = 3; i-- > 0;) {
    double s = b[i];
    for (std::size_t j = i + 1; j < 3; ++j) s -= a[i * 3 + j] * x[j];
    x[i] = s / a[i * 3 + i];
  }
  return x;
}

const Tensor kP0{0.3, -0.7, 1.2};
const Tensor kQ0{{1.0, -2.0}, {0.5, 0.25}};

// ---- torch.optim's documented algorithms, written out for one parameter ----

struct SGDRef {
  double lr, mu, tau, wd;
  bool nesterov;
  std::vector<double> buf;
  void step(std::vector<double>& p, const std::vector<double>& grad) {
    const bool first = buf.empty();
    if (first) buf.resize(p.size());
    for (std::size_t i = 0; i < p.size(); ++i) {
      double g = grad[i] + wd * p[i];
      if (mu != 0.0) {
        buf[i] = first ? g : mu * buf[i] + (1 - tau) * g;
        g = nesterov ? g + mu * buf[i] : buf[i];
      }
      p[i] -= lr * g;
    }
  }
};

struct AdamRef {
  double lr, b1, b2, eps, wd;
  int t = 0;
  std::vector<double> m{}, v{};
  void step(std::vector<double>& p, const std::vector<double>& grad) {
    if (t == 0) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
    ++t;
    for (std::size_t i = 0; i < p.size(); ++i) {
      const double g = grad[i] + wd * p[i];
      m[i] = b1 * m[i] + (1 - b1) * g;
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      const double m_hat = m[i] / (1 - std::pow(b1, t)), v_hat = v[i] / (1 - std::pow(b2, t));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
};

/// Runs `steps` optimiser steps on the test problem; returns (p, q).
template <class Optim, class Options>
std::pair<std::vector<double>, std::vector<double>> run(const Options& options, int steps) {
  Tensor p = param(kP0), q = param(kQ0);
  Optim opt({p, q}, options);
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    objective(p, q).backward();
    opt.step();
  }
  return {values(p), values(q)};
}

/// One step on f(p) = ½ p² from p, `steps` times: the scalar examples worked by hand.
template <class Optim, class Options>
std::vector<double> scalar_path(const Options& options, double p0, int steps) {
  Tensor p = param(Tensor{p0});
  Optim opt({p}, options);
  std::vector<double> path;
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    (0.5 * sum(square(p))).backward();
    opt.step();
    path.push_back(p.item());
  }
  return path;
}

void check_path(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  BOOST_REQUIRE_EQUAL(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    BOOST_CHECK_MESSAGE(std::abs(got[i] - want[i]) <= tol, "step " << i + 1 << ": " << got[i] << " vs " << want[i]);
}

}  // namespace

// ---- SGD ----

BOOST_AUTO_TEST_CASE(sgd_steps_by_hand) {
  // f = ½ p², so g = p; p₀ = 1, lr = 0.1
  // plain: p ← 0.9 p
  check_path(scalar_path<nn::SGD>(nn::SGDOptions{0.1}, 1.0, 3), {0.9, 0.81, 0.729}, 1e-15);
  // momentum 0.9: b = 1, p = 0.9;  b = 0.9 + 0.9 = 1.8, p = 0.72;  b = 1.62 + 0.72 = 2.34, p = 0.486
  check_path(scalar_path<nn::SGD>(nn::SGDOptions{0.1, 0.9}, 1.0, 3), {0.9, 0.72, 0.486}, 1e-15);
  // dampening 0.5: the first buffer is g undamped; b = 0.9 + 0.5 · 0.9 = 1.35, p = 0.765
  check_path(scalar_path<nn::SGD>(nn::SGDOptions{0.1, 0.9, 0.5}, 1.0, 2), {0.9, 0.765}, 1e-15);
  // nesterov: g + μ b = 1.9, p = 0.81;  b = 0.9 + 0.81 = 1.71, g = 0.81 + 1.539 = 2.349, p = 0.5751
  check_path(scalar_path<nn::SGD>(nn::SGDOptions{0.1, 0.9, 0.0, 0.0, true}, 1.0, 2), {0.81, 0.5751}, 1e-15);
  // weight decay 0.1: g = 1.1 p, p ← 0.89 p
  check_path(scalar_path<nn::SGD>(nn::SGDOptions{0.1, 0.0, 0.0, 0.1}, 1.0, 2), {0.89, 0.7921}, 1e-15);
}

BOOST_AUTO_TEST_CASE(sgd_matches_torch_formulas) {
  const std::vector<nn::SGDOptions> cases = {
      {0.05}, {0.05, 0.9}, {0.05, 0.8, 0.3}, {0.05, 0.9, 0.0, 0.01, true}, {0.02, 0.5, 0.1, 0.2},
  };
  for (const nn::SGDOptions& o : cases) {
    BOOST_TEST_CONTEXT("lr " << o.lr << " momentum " << o.momentum << " dampening " << o.dampening << " wd "
                             << o.weight_decay << " nesterov " << o.nesterov) {
      SGDRef rp{o.lr, o.momentum, o.dampening, o.weight_decay, o.nesterov, {}}, rq = rp;
      std::vector<double> p = values(kP0), q = values(kQ0);
      for (int s = 0; s < 6; ++s) {
        const std::vector<double> gp = grad_p(p), gq = grad_q(q);
        rp.step(p, gp);
        rq.step(q, gq);
      }
      const auto [hp, hq] = run<nn::SGD>(o, 6);
      BOOST_CHECK_SMALL(distance(hp, p), 1e-13);
      BOOST_CHECK_SMALL(distance(hq, q), 1e-13);
    }
  }
}

BOOST_AUTO_TEST_CASE(sgd_minimises_a_quadratic) {
  const auto [p, q] = run<nn::SGD>(nn::SGDOptions{0.1, 0.9}, 600);
  BOOST_CHECK_SMALL(distance(p, minimiser()), 1e-10);
  BOOST_CHECK_SMALL(distance(q, std::vector<double>(4, 0.0)), 1e-10);
}

// ---- Adam ----

BOOST_AUTO_TEST_CASE(adam_first_step_is_lr_times_sign) {
  // at t = 1 the bias corrections give m̂ = g, v̂ = g²: every entry moves by lr g / (|g| + ε)
  Tensor p = param(Tensor{1.0, -2.0, 0.5, 3.0});
  const Tensor scale{4.0, 0.01, -3.0, 1.0};
  nn::Adam opt({p}, nn::AdamOptions{0.1});
  sum(scale * p).backward();  // g = scale
  opt.step();
  std::vector<double> want = {1.0, -2.0, 0.5, 3.0};
  for (std::size_t i = 0; i < 4; ++i) want[i] -= 0.1 * scale.data()[i] / (std::abs(scale.data()[i]) + 1e-8);
  BOOST_CHECK_SMALL(distance(values(p), want), 1e-15);
}

BOOST_AUTO_TEST_CASE(adam_matches_torch_formulas) {
  const std::vector<nn::AdamOptions> cases = {
      {}, {0.05}, {0.05, 0.8, 0.99}, {0.01, 0.9, 0.999, 1e-3}, {0.05, 0.5, 0.9, 1e-8, 0.1},
  };
  for (const nn::AdamOptions& o : cases) {
    BOOST_TEST_CONTEXT("lr " << o.lr << " betas " << o.beta1 << ", " << o.beta2 << " eps " << o.eps << " wd "
                             << o.weight_decay) {
      AdamRef rp{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay}, rq = rp;
      std::vector<double> p = values(kP0), q = values(kQ0);
      for (int s = 0; s < 6; ++s) {
        const std::vector<double> gp = grad_p(p), gq = grad_q(q);
        rp.step(p, gp);
        rq.step(q, gq);
      }
      const auto [hp, hq] = run<nn::Adam>(o, 6);
      BOOST_CHECK_SMALL(distance(hp, p), 1e-13);
      BOOST_CHECK_SMALL(distance(hq, q), 1e-13);
    }
  }
}

BOOST_AUTO_TEST_CASE(adam_minimises_a_quadratic) {
  const Tensor p = param(kP0), q = param(kQ0);
  nn::Adam opt({p, q}, nn::AdamOptions{0.02});
  const double f0 = objective(p, q).item();
  for (int s = 0; s < 2000; ++s) {
    opt.zero_grad();
    objective(p, q).backward();
    opt.step();
  }
  BOOST_CHECK_LT(objective(p, q).item(), f0);
  BOOST_CHECK_SMALL(distance(values(p), minimiser()), 1e-4);
  BOOST_CHECK_SMALL(distance(values(q), std::vector<double>(4, 0.0)), 1e-4);
}

// ---- what both share ----

BOOST_AUTO_TEST_CASE(parameters_without_gradient_are_skipped) {
  Tensor used = param(Tensor{1.0, 2.0}), unused = param(Tensor{5.0, -5.0});
  nn::Adam adam({used, unused}, nn::AdamOptions{0.1});
  nn::SGD sgd({used, unused}, nn::SGDOptions{0.1, 0.9});
  sum(used).backward();
  adam.step();
  sgd.step();
  HESSE_CHECK_CLOSE(unused, (Tensor{5.0, -5.0}), 0.0);
  // unused's first gradient starts its own Adam count: a first step of lr · sign(g)
  adam.zero_grad();
  sum(unused * -1.0).backward();
  adam.step();
  HESSE_CHECK_CLOSE(unused, (Tensor{5.0 + 0.1 / (1 + 1e-8), -5.0 + 0.1 / (1 + 1e-8)}), 1e-15);
}

BOOST_AUTO_TEST_CASE(zero_grad_clears_and_step_records_nothing) {
  Tensor p = param(Tensor{1.0, 2.0});
  nn::SGD opt({p}, nn::SGDOptions{0.5});
  sum(square(p)).backward();
  BOOST_CHECK(p.grad().defined());
  opt.step();
  BOOST_CHECK(p.is_leaf());
  BOOST_CHECK(p.requires_grad());
  BOOST_CHECK(!p.grad_fn());
  HESSE_CHECK_CLOSE(p, (Tensor{0.0, 0.0}), 0.0);  // p - 0.5 · 2p
  opt.zero_grad();
  BOOST_CHECK(!p.grad().defined());
  p.mutable_data()[0] = 3.0;
  opt.step();  // no gradient: nothing moves
  HESSE_CHECK_CLOSE(p, (Tensor{3.0, 0.0}), 0.0);
}

BOOST_AUTO_TEST_CASE(optimiser_errors) {
  const Tensor p = param(Tensor{1.0});
  HESSE_CHECK_THROWS(nn::SGD({}, nn::SGDOptions{}), ValueError, "hesse::SGD: got an empty parameter list");
  HESSE_CHECK_THROWS(nn::SGD({p * 2.0}, nn::SGDOptions{}), ValueError,
                     "hesse::SGD: parameter 0 of shape [1] is not a leaf that requires grad");
  HESSE_CHECK_THROWS(nn::Adam({p, Tensor{1.0, 2.0}}, nn::AdamOptions{}), ValueError,
                     "hesse::Adam: parameter 1 of shape [2] is not a leaf that requires grad");
  HESSE_CHECK_THROWS(nn::Adam({p, Tensor()}, nn::AdamOptions{}), ValueError, "hesse::Adam: parameter 1 is undefined");
  HESSE_CHECK_THROWS(nn::SGD({p, p}, nn::SGDOptions{}), ValueError, "hesse::SGD: parameter 1 of shape [1] is listed twice");
  HESSE_CHECK_THROWS(nn::SGD({p}, nn::SGDOptions{-0.1}), ValueError, "hesse::SGD: invalid learning rate: -0.1");
  HESSE_CHECK_THROWS(nn::SGD({p}, nn::SGDOptions{0.1, -0.5}), ValueError, "invalid momentum");
  HESSE_CHECK_THROWS(nn::SGD({p}, nn::SGDOptions{0.1, 0.0, 0.0, -1.0}), ValueError, "invalid weight_decay");
  HESSE_CHECK_THROWS(nn::SGD({p}, nn::SGDOptions{0.1, 0.0, 0.0, 0.0, true}), ValueError,
                     "hesse::SGD: nesterov momentum requires a momentum > 0 and zero dampening");
  HESSE_CHECK_THROWS(nn::SGD({p}, nn::SGDOptions{0.1, 0.9, 0.1, 0.0, true}), ValueError, "zero dampening");
  HESSE_CHECK_THROWS(nn::Adam({p}, nn::AdamOptions{-1.0}), ValueError, "hesse::Adam: invalid learning rate");
  HESSE_CHECK_THROWS(nn::Adam({p}, nn::AdamOptions{0.1, 1.0}), ValueError, "invalid beta1 (must be in [0, 1)): 1");
  HESSE_CHECK_THROWS(nn::Adam({p}, nn::AdamOptions{0.1, 0.9, -0.1}), ValueError, "invalid beta2");
  HESSE_CHECK_THROWS(nn::Adam({p}, nn::AdamOptions{0.1, 0.9, 0.999, -1e-8}), ValueError, "invalid epsilon");
  HESSE_CHECK_THROWS(nn::Adam({p}, nn::AdamOptions{0.1, 0.9, 0.999, 1e-8, -0.1}), ValueError, "invalid weight_decay");
}

// ---- DataLoader ----

namespace {

/// X[i] = (i, 10 i), Y[i] = i: a batch's rows tell which samples it holds.
Tensor sample_x(std::size_t n) {
  Tensor x = Tensor::empty(S({n, 2}));
  for (std::size_t i = 0; i < n; ++i) x.mutable_data()[2 * i] = double(i), x.mutable_data()[2 * i + 1] = 10.0 * i;
  return x;
}

/// The sample ids of a batch, checking that X and Y rows agree.
std::vector<std::int64_t> ids(const nn::Batch& b) {
  std::vector<std::int64_t> out;
  for (std::size_t r = 0; r < b.x.shape()[0]; ++r) {
    const double i = b.x.data()[2 * r];
    BOOST_CHECK_EQUAL(b.x.data()[2 * r + 1], 10.0 * i);
    if (b.y.defined()) BOOST_CHECK_EQUAL(b.y.data()[r], i);
    out.push_back(std::int64_t(i));
  }
  return out;
}

std::vector<std::int64_t> epoch_ids(const nn::DataLoader::Epoch& epoch) {
  std::vector<std::int64_t> all;
  for (const nn::Batch& b : epoch) {
    const std::vector<std::int64_t> part = ids(b);
    all.insert(all.end(), part.begin(), part.end());
  }
  return all;
}

}  // namespace

BOOST_AUTO_TEST_CASE(loader_in_order_keeps_last_partial_batch) {
  nn::DataLoader loader(sample_x(10), arange(10.0), 4);
  BOOST_CHECK_EQUAL(loader.num_samples(), 10u);
  BOOST_CHECK_EQUAL(loader.size(), 3u);
  std::vector<std::vector<std::int64_t>> got;
  for (const nn::Batch& b : loader) got.push_back(ids(b));
  const std::vector<std::vector<std::int64_t>> want = {{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9}};
  BOOST_CHECK(got == want);
  BOOST_CHECK(loader.batch(0, 2).x.shape() == S({2, 2}));
  BOOST_CHECK(loader.batch(0, 2).y.shape() == S({2}));
  // drop_last leaves the partial batch out
  nn::DataLoader dropping(sample_x(10), arange(10.0), nn::DataLoaderOptions{4, false, 0, true});
  BOOST_CHECK_EQUAL(dropping.size(), 2u);
  BOOST_CHECK_EQUAL(epoch_ids(dropping.batches(0)).size(), 8u);
  // an exact multiple has no partial batch
  BOOST_CHECK_EQUAL(nn::DataLoader(sample_x(8), Tensor(), 4).size(), 2u);
}

BOOST_AUTO_TEST_CASE(loader_shuffles_each_epoch_from_the_seed) {
  nn::DataLoader a(sample_x(17), arange(17.0), 5, true, 42), b(sample_x(17), arange(17.0), 5, true, 42);
  nn::DataLoader other_seed(sample_x(17), arange(17.0), 5, true, 43);
  std::vector<std::vector<std::int64_t>> epochs;
  for (std::size_t e = 0; e < 4; ++e) {
    BOOST_CHECK_EQUAL(a.epoch(), e);
    std::vector<std::int64_t> seen;
    std::size_t batches = 0;
    for (const nn::Batch& batch : a) {  // each loop is the next epoch
      const std::vector<std::int64_t> part = ids(batch);
      BOOST_CHECK_EQUAL(part.size(), batches < 3 ? 5u : 2u);
      seen.insert(seen.end(), part.begin(), part.end());
      ++batches;
    }
    BOOST_CHECK_EQUAL(batches, 4u);
    // every sample once
    std::vector<std::int64_t> sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    std::vector<std::int64_t> all(17);
    for (std::size_t i = 0; i < 17; ++i) all[i] = std::int64_t(i);
    BOOST_CHECK(sorted == all);
    // the same seed replays it; an epoch can be replayed on its own
    BOOST_CHECK(epoch_ids(b.next_epoch()) == seen);
    BOOST_CHECK(epoch_ids(a.batches(e)) == seen);
    BOOST_CHECK(a.order(e) == seen);
    BOOST_CHECK(other_seed.order(e) != seen);
    epochs.push_back(seen);
  }
  BOOST_CHECK_EQUAL(std::set<std::vector<std::int64_t>>(epochs.begin(), epochs.end()).size(), 4u);
  a.set_epoch(2);
  BOOST_CHECK(epoch_ids(a.next_epoch()) == epochs[2]);
  BOOST_CHECK_EQUAL(a.epoch(), 3u);
}

BOOST_AUTO_TEST_CASE(loader_permutations_are_uniform) {
  // 3 samples: 6 orders, each expected 1000 times in 6000 epochs (sd ≈ 29)
  nn::DataLoader loader(sample_x(3), Tensor(), 3, true, 7);
  std::map<std::vector<std::int64_t>, int> count;
  for (std::size_t e = 0; e < 6000; ++e) ++count[loader.order(e)];
  BOOST_CHECK_EQUAL(count.size(), 6u);
  for (const auto& [order, n] : count) {
    BOOST_CHECK_GT(n, 850);
    BOOST_CHECK_LT(n, 1150);
  }
}

BOOST_AUTO_TEST_CASE(loader_errors) {
  HESSE_CHECK_THROWS(nn::DataLoader(sample_x(4), arange(5.0), 2), ShapeError,
                     "hesse::DataLoader: X of shape [4, 2] and Y of shape [5] hold different numbers of samples");
  HESSE_CHECK_THROWS(nn::DataLoader(sample_x(4), arange(4.0), 0), ValueError, "hesse::DataLoader: batch_size must be positive");
  HESSE_CHECK_THROWS(nn::DataLoader(Tensor(1.0), Tensor(), 1), ShapeError, "hesse::DataLoader: X and Y need a sample axis 0");
  HESSE_CHECK_THROWS(nn::DataLoader(Tensor(), Tensor(), 1), ValueError, "X is undefined");
  nn::DataLoader loader(sample_x(4), arange(4.0), 3);
  HESSE_CHECK_THROWS(loader.batch(0, 2), IndexError, "hesse::DataLoader: batch 2 is out of range: an epoch has 2 batches");
}

// ---- together: fitting a line with mini-batches ----

BOOST_AUTO_TEST_CASE(sgd_fits_a_line_from_minibatches) {
  // y = 2 x - 1 exactly; the minimiser of the MSE is (w, b) = (2, -1)
  const Tensor x = reshape(arange(-1.0, 1.0, 0.1), {-1, 1});
  const Tensor y = x * 2.0 - 1.0;
  Tensor w = param(zeros(S({1, 1}))), b = param(zeros(S({1})));
  nn::SGD opt({w, b}, nn::SGDOptions{0.2, 0.9});
  nn::DataLoader loader(x, y, 6, true, 3);
  const nn::Loss loss = nn::MSELoss();
  for (int epoch = 0; epoch < 200; ++epoch)
    for (const nn::Batch& batch : loader) {
      opt.zero_grad();
      loss(matmul(batch.x, w) + b, batch.y).backward();
      opt.step();
    }
  BOOST_CHECK_SMALL(w.item() - 2.0, 1e-6);
  BOOST_CHECK_SMALL(b.item() + 1.0, 1e-6);
}
