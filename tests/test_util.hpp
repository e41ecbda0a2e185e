#pragma once
// Small helpers shared by the test suites.
#include <cmath>
#include <sstream>
#include <string>

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

}  // namespace hesse::testing
