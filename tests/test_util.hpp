#pragma once
// Small helpers shared by the test suites.
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>
#include <xtensor/xarray.hpp>  // tests build reference values as xtensor arrays

#include "hesse/hesse.hpp"
#include "hesse/profile.hpp"

namespace hesse::testing {

/// Largest |a - b| over all entries; the shapes must agree.
inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  BOOST_REQUIRE_MESSAGE(a.shape() == b.shape(),
                        "shapes differ: " + to_string(a.shape()) + " vs " + to_string(b.shape()));
  double m = 0.0;
  for (std::size_t i = 0; i < a.numel(); ++i) {
    const double d = std::abs(a.data()[i] - b.data()[i]);
    if (!(d <= m)) m = std::isnan(d) ? INFINITY : d;  // a NaN is never close
  }
  return m;
}

/// Asserts that two tensors have the same shape and agree to `tol` entrywise.
#define HESSE_CHECK_CLOSE(a, b, tol)                                                          \
  do {                                                                                        \
    const double hesse_diff_ = ::hesse::testing::max_abs_diff((a), (b));                      \
    BOOST_CHECK_MESSAGE(hesse_diff_ <= (tol), "max |" #a " - " #b "| = " << hesse_diff_);     \
  } while (0)

/// Asserts that `expr` throws a hesse exception of type `E` whose message contains `text`.
#define HESSE_CHECK_THROWS(expr, E, text)                                                      \
  BOOST_CHECK_EXCEPTION(expr, E, [](const E& e) {                                              \
    const std::string what = e.what();                                                         \
    const bool ok = what.find(text) != std::string::npos;                                      \
    if (!ok) BOOST_TEST_MESSAGE("message was: " << what);                                      \
    return ok;                                                                                 \
  })

/// A loss with a target for it.
struct LossCase {
  std::string name;
  Criterion criterion;
  Tensor target;
};

/// Class indices for N samples of C classes (every class appears once N >= C).
inline Tensor class_targets(std::size_t N, std::size_t C) {
  Tensor classes = zeros({N});
  for (std::size_t i = 0; i < N; ++i) classes.mutable_data()[i] = double((i * 2 + 1) % C);
  return classes;
}

/// The losses the suites run every check under, on N samples of C outputs:
/// MSE (mean, sum), cross-entropy with class indices, BCE with logits.
inline std::vector<LossCase> loss_cases(Generator& gen, std::size_t N, std::size_t C) {
  return {{"mse_mean", nn::MSELoss(), randn({N, C}, gen)},
          {"mse_sum", nn::MSELoss(nn::Reduction::sum), randn({N, C}, gen)},
          {"cross_entropy", nn::CrossEntropyLoss(), class_targets(N, C)},
          {"bce_with_logits", nn::BCEWithLogitsLoss(), rand({N, C}, gen)}};
}

/// The GEMM flops f() issues.
template <class F>
std::uint64_t gemm_flops_of(F&& f) {
  const std::uint64_t before = profile::gemm_flops();
  f();
  return profile::gemm_flops() - before;
}

/// f = x1ᵀ B1 B2 x2 per sample: x1 [N, p], x2 [N, r] -> [N] (its Hessian's
/// off-diagonal blocks are commutation-Kronecker products; its diagonal ones zero).
struct DoubleBilinear : nn::Module {
  Tensor B1, B2;
  DoubleBilinear(std::size_t p, std::size_t q, std::size_t r, Generator& gen) {
    B1 = register_parameter("B1", randn({p, q}, gen));
    B2 = register_parameter("B2", randn({q, r}, gen));
  }
  Tensor forward(const std::vector<Tensor>& in) override {
    return sum(matmul(matmul(in[0], B1), B2) * in[1], {-1});
  }
};

/// hvp_large in miniature: a tanh MLP 32-16-2 under cross-entropy, batch 512.
/// The first-level gradient of 0.weight, δᵀ X, is a product large enough to
/// be deferred (kDeferredFlops); that of 2.weight (2·512·16) is not.
struct MiniHvpLarge {
  Generator gen{64};
  std::shared_ptr<nn::Sequential> net = nn::mlp({32, 16, 2}, nn::Activation::Kind::tanh, gen);
  Tensor x = randn({512, 32}, gen);
  Tensor t = class_targets(512, 2);
  nn::CrossEntropyLoss ce;
  std::size_t n = net->num_parameters();
  static constexpr std::uint64_t kDeferredFlops = 2 * 16 * 512 * 32;

  /// H V for the rows of V [k, n], as hessian_vector_product takes it, but with
  /// every first-level gradient read before the second pass: nothing deferred.
  Tensor hvp_reading_the_gradient(const Tensor& V) {
    std::vector<Tensor> params;
    for (const auto& [name, p] : net->trainable_parameters()) params.push_back(p);
    GradOptions first;
    first.create_graph = true;
    const std::vector<Tensor> g = grad({ce((*net)(x), t)}, params, {}, first);
    for (const Tensor& gp : g) (void)gp.data();
    const std::size_t k = V.shape()[0];
    std::vector<Tensor> seeds;
    std::size_t at = 0;
    for (const Tensor& p : params) {
      Shape shape{k};
      shape.insert(shape.end(), p.shape().begin(), p.shape().end());
      seeds.push_back(reshape(slice(V, 1, std::int64_t(at), std::int64_t(at + p.numel())), shape));
      at += p.numel();
    }
    GradOptions second;
    second.retain_graph = true;
    second.batched_grad_outputs = true;
    const std::vector<Tensor> hv = grad(g, params, seeds, second);
    std::vector<Tensor> flat;
    for (const Tensor& h : hv) flat.push_back(reshape(h, Shape{k, h.numel() / k}));
    return concatenate(flat, 1);
  }
};

}  // namespace hesse::testing
