#pragma once
// Small helpers shared by the test suites.
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "hesse/hesse.hpp"

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

/// The losses the suites run every check under, on N samples of C outputs:
/// MSE (mean, sum), cross-entropy with class indices, BCE with logits.
inline std::vector<LossCase> loss_cases(Generator& gen, std::size_t N, std::size_t C) {
  Tensor classes = zeros({N});
  for (std::size_t i = 0; i < N; ++i) classes.mutable_data()[i] = double((i * 2 + 1) % C);
  return {{"mse_mean", nn::MSELoss(), randn({N, C}, gen)},
          {"mse_sum", nn::MSELoss(nn::Reduction::sum), randn({N, C}, gen)},
          {"cross_entropy", nn::CrossEntropyLoss(), classes},
          {"bce_with_logits", nn::BCEWithLogitsLoss(), rand({N, C}, gen)}};
}

}  // namespace hesse::testing
