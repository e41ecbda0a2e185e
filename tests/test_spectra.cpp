#define BOOST_TEST_MODULE spectra
#include "test_util.hpp"

// Spectra, traces, diagonals and spectral densities of linear operators
// (include/hesse/curvature.hpp): Lanczos and power iteration against matrices
// Q diag(λ) Qᵀ with known spectra, the trace and diagonal estimators inside
// their own error bars, stochastic Lanczos quadrature against spectra with a
// few distinct eigenvalues, determinism, and every error path.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <xtensor-blas/xlinalg.hpp>
#include <xtensor/xarray.hpp>

using namespace hesse;
using hesse::testing::max_abs_diff;

namespace {

using Array = xt::xarray<double>;

// ---------------------------------------------------------------- helpers

/// A random orthogonal matrix [n, n]: Q of the QR factorisation of a Gaussian matrix.
Array random_orthogonal(std::size_t n, std::uint64_t seed) {
  Generator gen(seed);
  const Array g = randn({n, n}, gen).value();
  return std::get<0>(xt::linalg::qr(g));
}

/// Q diag(values) Qᵀ for a random orthogonal Q: a dense symmetric matrix with a known spectrum.
Tensor with_spectrum(const std::vector<double>& values, std::uint64_t seed = 7) {
  const std::size_t n = values.size();
  const Array q = random_orthogonal(n, seed);
  Tensor a = zeros({n, n});
  double* out = a.mutable_data();
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j <= i; ++j) {
      double s = 0;
      for (std::size_t l = 0; l < n; ++l) s += q(i, l) * values[l] * q(j, l);
      out[i * n + j] = out[j * n + i] = s;
    }
  return a;
}

/// The operator diag(values), applied entrywise (no dense matrix: any n).
LinearOperator diagonal_operator(const std::vector<double>& values) {
  const std::size_t n = values.size();
  return LinearOperator(
      n,
      [values, n](const Tensor& block) {
        Tensor out = Tensor::empty(block.shape());
        for (std::size_t i = 0; i < block.numel(); ++i) out.mutable_data()[i] = block.data()[i] * values[i % n];
        return out;
      },
      "diagonal");
}

/// Evenly spaced values lo, ..., hi.
std::vector<double> linspace(double lo, double hi, std::size_t count) {
  std::vector<double> v(count);
  for (std::size_t i = 0; i < count; ++i) v[i] = count == 1 ? lo : lo + (hi - lo) * double(i) / double(count - 1);
  return v;
}

std::vector<double> concat(std::vector<double> a, const std::vector<double>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

/// `count` copies of `value`.
std::vector<double> repeat(double value, std::size_t count) { return std::vector<double>(count, value); }

/// Dense A x for every row of X [k, n], computed here (no operator products).
Tensor dense_apply(const Tensor& a, const Tensor& x) {
  const std::size_t k = x.shape()[0], n = x.shape()[1];
  Tensor out = zeros({k, n});
  for (std::size_t r = 0; r < k; ++r)
    for (std::size_t i = 0; i < n; ++i) {
      double s = 0;
      for (std::size_t j = 0; j < n; ++j) s += a.data()[i * n + j] * x.data()[r * n + j];
      out.mutable_data()[r * n + i] = s;
    }
  return out;
}

/// ‖A v − λ v‖ for every pair, recomputed densely.
std::vector<double> dense_residuals(const Tensor& a, const Eigenpairs& e) {
  const std::size_t k = e.vectors.shape()[0], n = e.vectors.shape()[1];
  const Tensor av = dense_apply(a, e.vectors);
  std::vector<double> out(k);
  for (std::size_t r = 0; r < k; ++r) {
    double s = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const double d = av.data()[r * n + i] - e.values.data()[r] * e.vectors.data()[r * n + i];
      s += d * d;
    }
    out[r] = std::sqrt(s);
  }
  return out;
}

/// Largest |V Vᵀ − I| for the rows of V.
double orthonormality_error(const Tensor& v) {
  const std::size_t k = v.shape()[0], n = v.shape()[1];
  double worst = 0;
  for (std::size_t a = 0; a < k; ++a)
    for (std::size_t b = 0; b < k; ++b) {
      double s = 0;
      for (std::size_t i = 0; i < n; ++i) s += v.data()[a * n + i] * v.data()[b * n + i];
      worst = std::max(worst, std::abs(s - (a == b ? 1.0 : 0.0)));
    }
  return worst;
}

Tensor values_tensor(const std::vector<double>& v) {
  Tensor t = zeros({v.size()});
  std::copy(v.begin(), v.end(), t.mutable_data());
  return t;
}

double trace_of(const Tensor& a) {
  const std::size_t n = a.shape()[0];
  double s = 0;
  for (std::size_t i = 0; i < n; ++i) s += a.data()[i * n + i];
  return s;
}

LanczosOptions options(std::size_t k, Which which, std::size_t block = 1) {
  LanczosOptions o;
  o.k = k;
  o.which = which;
  o.block_size = block;
  o.progress = false;
  return o;
}

EstimatorOptions estimator(std::size_t probes, std::uint64_t seed = 0, std::size_t block = 16) {
  EstimatorOptions o;
  o.probes = probes;
  o.seed = seed;
  o.block_size = block;
  o.progress = false;
  return o;
}

DensityOptions density_options(std::size_t probes, std::size_t nodes, std::uint64_t seed = 0) {
  DensityOptions o;
  o.probes = probes;
  o.nodes = nodes;
  o.seed = seed;
  o.progress = false;
  return o;
}

/// Runs Lanczos on a dense matrix and checks values, vectors, reported
/// residuals and the product count.
Eigenpairs check_lanczos(const Tensor& a, const LanczosOptions& o, const std::vector<double>& expected) {
  const LinearOperator op = matrix_operator(a);
  const Eigenpairs e = lanczos(op, o);
  BOOST_TEST_CONTEXT("k = " << o.k << ", block = " << o.block_size << ", which = " << int(o.which)) {
    HESSE_CHECK_CLOSE(e.values, values_tensor(expected), 1e-8);
    BOOST_CHECK(e.converged);
    BOOST_CHECK_EQUAL(e.products, op.products());
    BOOST_CHECK_LE(orthonormality_error(e.vectors), 1e-10);
    const std::vector<double> r = dense_residuals(a, e);
    for (std::size_t i = 0; i < r.size(); ++i) {
      BOOST_CHECK_LE(r[i], 1e-8);
      BOOST_CHECK_SMALL(r[i] - e.residuals.data()[i], 1e-12);  // reported = measured
    }
  }
  return e;
}

}  // namespace

// ============================================================================
BOOST_AUTO_TEST_SUITE(lanczos_spectra)

BOOST_AUTO_TEST_CASE(top_and_bottom_of_a_diagonal_matrix) {
  // [0, 1] with two isolated eigenvalues at each end
  const std::vector<double> values = concat(linspace(0, 1, 196), {-3, -2, 2, 3});
  const Tensor a = zeros({200, 200});
  Tensor d = a.clone();
  for (std::size_t i = 0; i < 200; ++i) d.mutable_data()[i * 200 + i] = values[i];
  check_lanczos(d, options(2, Which::largest), {3, 2});
  check_lanczos(d, options(3, Which::smallest), {-3, -2, 0});
}

BOOST_AUTO_TEST_CASE(long_runs_past_a_converged_eigenvalue_make_no_ghosts) {
  // An isolated eigenvalue converges in a few steps; without reorthogonalisation
  // its copies ("ghosts") then reappear among the Ritz values. The partial
  // reorthogonalisation must keep the basis semi-orthogonal over a long run
  // that resolves the clustered rest, here 250 steps on n = 400.
  std::vector<double> values = concat(linspace(0, 1, 397), {100, 50, 1.5});
  Tensor d = zeros({400, 400});
  for (std::size_t i = 0; i < 400; ++i) d.mutable_data()[i * 400 + i] = values[i];
  LanczosOptions o = options(6, Which::largest);
  o.tolerance = 1e-13;
  o.max_products = 250;
  const Eigenpairs e = lanczos(matrix_operator(d), o);
  const double expected[] = {100, 50, 1.5, 1, 1 - 1.0 / 396, 1 - 2.0 / 396};
  o.full_reorthogonalization = true;  // the same answer the expensive way
  const Eigenpairs full = lanczos(matrix_operator(d), o);
  HESSE_CHECK_CLOSE(full.values, e.values, 1e-10);
  for (std::size_t i = 0; i < 6; ++i) BOOST_CHECK_SMALL(e.values.data()[i] - expected[i], 1e-8);
  const Tensor gram = matmul(e.vectors, transpose(e.vectors, 0, 1));
  HESSE_CHECK_CLOSE(gram, eye(6), 1e-8);
  for (std::size_t i = 0; i < 6; ++i) BOOST_CHECK_SMALL(e.residuals.data()[i], 1e-7);
}

BOOST_AUTO_TEST_CASE(rotated_spectra_with_blocks_of_one_and_three) {
  const std::vector<double> values = concat(linspace(-1, 1, 114), {3, 2.5, 2, -4, -3.5, -2.9});
  const Tensor a = with_spectrum(values);
  for (std::size_t block : {1, 3}) {
    check_lanczos(a, options(3, Which::largest, block), {3, 2.5, 2});
    check_lanczos(a, options(3, Which::smallest, block), {-4, -3.5, -2.9});
    check_lanczos(a, options(4, Which::largest_magnitude, block), {-4, -3.5, 3, -2.9});
  }
}

BOOST_AUTO_TEST_CASE(largest_magnitude_of_a_mostly_positive_spectrum_is_negative) {
  const Tensor a = with_spectrum(concat(linspace(0, 1, 77), {-5, 4, 1.5}), 11);
  check_lanczos(a, options(2, Which::largest_magnitude), {-5, 4});
}

BOOST_AUTO_TEST_CASE(repeated_eigenvalues_survive_breakdown) {
  // three distinct eigenvalues: a single Krylov space breaks down after three
  // steps and holds one copy of each; the restarts find the multiplicities
  const Tensor a = with_spectrum(concat(concat(repeat(5, 20), repeat(1, 20)), repeat(-2, 20)), 3);
  check_lanczos(a, options(2, Which::largest), {5, 5});
  check_lanczos(a, options(4, Which::largest), {5, 5, 5, 5});
  check_lanczos(a, options(3, Which::smallest), {-2, -2, -2});
  check_lanczos(a, options(4, Which::largest, 3), {5, 5, 5, 5});
  const Eigenpairs e = check_lanczos(a, options(3, Which::largest_magnitude, 2), {5, 5, 5});
  BOOST_CHECK_LE(e.products, 40u);  // restarts are cheap: no walk to max_products
}

BOOST_AUTO_TEST_CASE(eigenvectors_along_the_axes_are_found_from_every_seed) {
  // Random-sign start vectors are orthogonal to e₁ - e₂ half the time and, on
  // restart, to the rest of a repeated eigenvalue's axes: those eigenvalues
  // were then missed, with converged = true. Every seed must find them.
  Tensor pair = zeros({12, 12});  // top eigenvector (e₁ - e₂)/√2: eigenvalues 3, 1, 0, ...
  pair.mutable_data()[0] = pair.mutable_data()[13] = 2.0;
  pair.mutable_data()[1] = pair.mutable_data()[12] = -1.0;
  Tensor repeated = zeros({12, 12});  // diag(5, 5, 5, 1, 0, ...)
  for (std::size_t i = 0; i < 4; ++i) repeated.mutable_data()[i * 13] = i < 3 ? 5.0 : 1.0;
  for (std::uint64_t seed = 0; seed < 24; ++seed) {
    BOOST_TEST_CONTEXT("seed " << seed) {
      LanczosOptions o = options(1, Which::largest);
      o.seed = seed;
      BOOST_CHECK_SMALL(lanczos(matrix_operator(pair), o).values.data()[0] - 3.0, 1e-10);
      o.k = 4;
      const Eigenpairs e = lanczos(matrix_operator(repeated), o);
      BOOST_CHECK(e.converged);
      HESSE_CHECK_CLOSE(e.values, (Tensor{5.0, 5.0, 5.0, 1.0}), 1e-10);
      BOOST_CHECK_SMALL(power_iteration(matrix_operator(pair), 200, seed).value - 3.0, 1e-8);
    }
  }
}

BOOST_AUTO_TEST_CASE(low_rank_operator_stops_after_its_range) {
  // rank 8 in R^100: the range is exhausted after ~9 products, then one restart
  // lands in the null space and confirms nothing larger remains
  const Tensor a = with_spectrum(concat({9, 8, 7, 6, 5, 4, 3, 2}, repeat(0, 92)), 5);
  const Eigenpairs e = check_lanczos(a, options(3, Which::largest), {9, 8, 7});
  BOOST_CHECK_LE(e.products, 20u);
}

BOOST_AUTO_TEST_CASE(tiny_sizes_and_k_equal_to_n) {
  check_lanczos(full({1, 1}, 2.5), options(1, Which::largest), {2.5});
  check_lanczos(Tensor{{2.0, 1.0}, {1.0, 2.0}}, options(2, Which::largest), {3, 1});
  check_lanczos(Tensor{{2.0, 1.0}, {1.0, 2.0}}, options(1, Which::smallest), {1});
  check_lanczos(Tensor{{2.0, 1.0}, {1.0, 2.0}}, options(2, Which::smallest, 3), {1, 3});  // block clamped to n
  const std::vector<double> values = {-3, -1.5, -0.2, 0.1, 0.7, 1.1, 2, 4.5, 6, 8};
  check_lanczos(with_spectrum(values), options(10, Which::smallest), values);
  // blocks of 3 in R^10: the last block is cut to the one vector that fits
  check_lanczos(with_spectrum(values), options(10, Which::largest, 3),
                std::vector<double>(values.rbegin(), values.rend()));
}

BOOST_AUTO_TEST_CASE(zero_operator) {
  const Tensor a = zeros({30, 30});
  const Eigenpairs e = check_lanczos(a, options(2, Which::largest), {0, 0});
  BOOST_CHECK_EQUAL(e.residuals.data()[0], 0.0);
}

BOOST_AUTO_TEST_CASE(non_convergence_is_reported_not_thrown) {
  const LinearOperator op = diagonal_operator(linspace(0, 1, 400));
  LanczosOptions o = options(3, Which::largest);
  o.max_products = 6;
  Eigenpairs e;
  BOOST_REQUIRE_NO_THROW(e = lanczos(op, o));
  BOOST_CHECK(!e.converged);
  BOOST_CHECK_EQUAL(e.products, 6u + 3u);  // the basis, then one measuring block
  BOOST_CHECK_EQUAL(op.products(), e.products);
  BOOST_CHECK_GT(e.residuals.data()[0], 1e-6);
  BOOST_CHECK_LE(e.values.data()[0], 1.0 + 1e-12);  // Ritz values stay inside the spectrum
}

BOOST_AUTO_TEST_CASE(large_matrix_free_operator) {
  // n = 50,000: the basis is 100 rows; only products and GEMMs touch n
  std::vector<double> values = linspace(0, 1, 50000);
  values[123] = 3;
  values[45678] = 2;
  const LinearOperator op = diagonal_operator(values);
  const Eigenpairs e = lanczos(op, options(2, Which::largest));
  BOOST_CHECK(e.converged);
  BOOST_CHECK_SMALL(e.values.data()[0] - 3, 1e-10);
  BOOST_CHECK_SMALL(e.values.data()[1] - 2, 1e-10);
  BOOST_CHECK_GT(std::abs(e.vectors.data()[123]), 1 - 1e-8);
  BOOST_CHECK_GT(std::abs(e.vectors.data()[50000 + 45678]), 1 - 1e-8);
  BOOST_CHECK_LT(e.products, 100u);
}

// Lanczos and power iteration work in place in a product they own. An operator may instead
// return its input (a view of Lanczos's basis) or a result it keeps: those
// must come through unchanged, and the answer must not depend on which.
BOOST_AUTO_TEST_CASE(operators_that_keep_their_results) {
  const std::vector<double> values = concat(linspace(-1, 1, 37), {2.5, -3});
  const LinearOperator fresh = diagonal_operator(values);
  // every block it was given (copied) and every result it handed out (kept)
  auto history = std::make_shared<std::vector<std::pair<Tensor, Tensor>>>();
  const LinearOperator keeping(
      values.size(),
      [fresh, history](const Tensor& block) {
        history->emplace_back(block.clone(), fresh(block));
        return history->back().second;
      },
      "keeping");
  const Eigenpairs want = lanczos(fresh, options(2, Which::largest_magnitude));
  const Eigenpairs got = lanczos(keeping, options(2, Which::largest_magnitude));
  BOOST_CHECK_EQUAL(max_abs_diff(got.values, want.values), 0.0);
  BOOST_CHECK_EQUAL(max_abs_diff(got.vectors, want.vectors), 0.0);
  const PowerIteration p_want = power_iteration(fresh, 15), p_got = power_iteration(keeping, 15);
  BOOST_CHECK_EQUAL(p_got.value, p_want.value);
  BOOST_CHECK_CLOSE(p_got.residual, p_want.residual, 1e-12);  // (percent) summed in another order
  BOOST_REQUIRE_GT(history->size(), 20u);
  for (const auto& [block, result] : *history) BOOST_CHECK_EQUAL(max_abs_diff(result, fresh(block)), 0.0);
  // the identity hands back its input: a view of the basis itself
  const LinearOperator identity(50, [](const Tensor& block) { return block; }, "identity");
  const Eigenpairs one = lanczos(identity, options(1, Which::largest));
  BOOST_CHECK_SMALL(one.values.data()[0] - 1.0, 1e-14);
  BOOST_CHECK_SMALL(one.residuals.data()[0], 1e-14);
  const PowerIteration p_one = power_iteration(identity, 5);
  BOOST_CHECK_SMALL(p_one.value - 1.0, 1e-14);
  BOOST_CHECK_SMALL(p_one.residual, 1e-14);
}

BOOST_AUTO_TEST_CASE(same_seed_same_bits) {
  const LinearOperator op = matrix_operator(with_spectrum(concat(linspace(-1, 1, 57), {2, 3, -4})));
  LanczosOptions o = options(3, Which::largest_magnitude, 2);
  o.seed = 42;
  const Eigenpairs a = lanczos(op, o), b = lanczos(op, o);
  BOOST_CHECK_EQUAL(max_abs_diff(a.values, b.values), 0.0);
  BOOST_CHECK_EQUAL(max_abs_diff(a.vectors, b.vectors), 0.0);
  BOOST_CHECK_EQUAL(max_abs_diff(a.residuals, b.residuals), 0.0);
  o.seed = 43;
  const Eigenpairs c = lanczos(op, o);
  BOOST_CHECK_GT(max_abs_diff(a.residuals, c.residuals), 0.0);  // another start, other rounding
}

BOOST_AUTO_TEST_CASE(power_iteration_finds_the_dominant_eigenvalue) {
  const Tensor a = with_spectrum(concat(linspace(-4, 4, 47), {-10, 5, 4.5}), 13);
  const LinearOperator op = matrix_operator(a);
  const PowerIteration p = power_iteration(op, 200, 1);
  BOOST_CHECK_SMALL(p.value + 10, 1e-9);
  BOOST_CHECK_LE(p.residual, 1e-6);
  BOOST_CHECK_EQUAL(p.products, 200u);
  BOOST_CHECK_EQUAL(op.products(), 200u);
  BOOST_CHECK_SMALL(std::sqrt(dot(p.vector, p.vector).item()) - 1, 1e-12);
  // the residual is measured: recompute it
  const Tensor av = dense_apply(a, reshape(p.vector, {1, 50}));
  const Tensor r = reshape(av, {50}) - p.value * p.vector;
  BOOST_CHECK_SMALL(std::sqrt(dot(r, r).item()) - p.residual, 1e-12);
  const PowerIteration q = power_iteration(op, 200, 1);
  BOOST_CHECK_EQUAL(max_abs_diff(p.vector, q.vector), 0.0);
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================
BOOST_AUTO_TEST_SUITE(traces_and_diagonals)

BOOST_AUTO_TEST_CASE(hutchinson_and_hutchpp_are_inside_their_error_bars) {
  const std::vector<Tensor> matrices = {
      with_spectrum(linspace(0, 2, 100), 1),                                  // PSD, flat
      with_spectrum(concat(linspace(-3, 1, 90), {10, 8, 6, -7, 5}), 2),       // indefinite
      with_spectrum(concat(repeat(1, 40), repeat(-1, 40)), 3),                // trace 0
  };
  for (std::size_t m = 0; m < matrices.size(); ++m) {
    const double exact = trace_of(matrices[m]);
    for (std::uint64_t seed : {1, 2}) {
      BOOST_TEST_CONTEXT("matrix " << m << ", seed " << seed) {
        const LinearOperator op = matrix_operator(matrices[m]);
        const TraceEstimate h = hutchinson_trace(op, estimator(150, seed, 16));
        BOOST_CHECK_EQUAL(h.products, 150u);
        BOOST_CHECK_EQUAL(op.products(), 150u);
        BOOST_CHECK_GT(h.standard_error, 0.0);
        BOOST_CHECK_LE(std::abs(h.value - exact), 3.5 * h.standard_error);
        const TraceEstimate p = hutchpp_trace(op, estimator(150, seed, 16));
        BOOST_CHECK_EQUAL(p.products, 150u);
        BOOST_CHECK_LE(std::abs(p.value - exact), 3.5 * p.standard_error);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(hutchinson_is_exact_on_a_diagonal_matrix) {
  // zᵀ D z = tr D for every sign vector z
  const std::vector<double> values = linspace(-2, 5, 64);
  const TraceEstimate h = hutchinson_trace(diagonal_operator(values), estimator(10, 3, 4));
  BOOST_CHECK_SMALL(h.value - 64 * 1.5, 1e-12);
  BOOST_CHECK_SMALL(h.standard_error, 1e-12);
}

BOOST_AUTO_TEST_CASE(hutchpp_is_exact_when_the_sketch_covers_the_range) {
  // rank 5 with probes / 3 = 6 ≥ 5: Q spans the range, the remainder is zero
  const Tensor a = with_spectrum(concat({7, 3, -2, 1.5, 0.5}, repeat(0, 195)), 9);
  const TraceEstimate p = hutchpp_trace(matrix_operator(a), estimator(18, 4, 5));
  BOOST_CHECK_SMALL(p.value - 10.0, 1e-10);
  BOOST_CHECK_SMALL(p.standard_error, 1e-10);
  BOOST_CHECK_EQUAL(p.products, 18u);
  // probes / 3 ≥ n: Q is all of R^n and no Hutchinson probes are spent
  const Tensor b = with_spectrum(linspace(-1, 3, 10), 8);
  const TraceEstimate q = hutchpp_trace(matrix_operator(b), estimator(33, 0, 4));
  BOOST_CHECK_SMALL(q.value - 10.0, 1e-12);
  BOOST_CHECK_EQUAL(q.standard_error, 0.0);
  BOOST_CHECK_EQUAL(q.products, 11u + 10u);
}

BOOST_AUTO_TEST_CASE(hutchpp_beats_hutchinson_on_a_decaying_spectrum) {
  std::vector<double> values(200);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = 1.0 / double((i + 1) * (i + 1));
  const LinearOperator op = matrix_operator(with_spectrum(values, 6));
  const TraceEstimate h = hutchinson_trace(op, estimator(60, 5));
  const TraceEstimate p = hutchpp_trace(op, estimator(60, 5));
  BOOST_CHECK_LT(p.standard_error, 0.1 * h.standard_error);
  double exact = 0;
  for (double v : values) exact += v;
  BOOST_CHECK_LE(std::abs(p.value - exact), 3.5 * p.standard_error);
}

BOOST_AUTO_TEST_CASE(hutchinson_diagonal_is_inside_its_error_bars) {
  const Tensor a = with_spectrum(concat(linspace(-1, 2, 77), {4, -3, 6}), 21);
  const LinearOperator op = matrix_operator(a);
  const DiagonalEstimate d = hutchinson_diagonal(op, estimator(400, 8, 32));
  BOOST_CHECK_EQUAL(d.products, 400u);
  std::size_t inside = 0;
  for (std::size_t i = 0; i < 80; ++i) {
    const double err = std::abs(d.value.data()[i] - a.data()[i * 80 + i]);
    BOOST_CHECK_GT(d.standard_error.data()[i], 0.0);
    inside += err <= 3 * d.standard_error.data()[i];
  }
  BOOST_CHECK_GE(inside, 76u);  // ~99.7 % expected
  // the error bars are honest in size too: the typical error is about one s.e.
  double sum_err = 0, sum_se = 0;
  for (std::size_t i = 0; i < 80; ++i) {
    sum_err += std::abs(d.value.data()[i] - a.data()[i * 80 + i]);
    sum_se += d.standard_error.data()[i];
  }
  BOOST_CHECK_GT(sum_err / sum_se, 0.5);
  BOOST_CHECK_LT(sum_err / sum_se, 1.2);
}

BOOST_AUTO_TEST_CASE(exact_diagonal_takes_n_products) {
  const Tensor a = with_spectrum(linspace(-2, 3, 45), 17);
  const LinearOperator op = matrix_operator(a);
  const Tensor d = exact_diagonal(op, 7);
  BOOST_CHECK_EQUAL(op.products(), 45u);
  Tensor expected = zeros({45});
  for (std::size_t i = 0; i < 45; ++i) expected.mutable_data()[i] = a.data()[i * 45 + i];
  HESSE_CHECK_CLOSE(d, expected, 1e-12);
  HESSE_CHECK_CLOSE(exact_diagonal(op, 64), expected, 1e-12);
}

BOOST_AUTO_TEST_CASE(estimators_are_deterministic) {
  const LinearOperator op = matrix_operator(with_spectrum(linspace(-1, 2, 40), 4));
  const EstimatorOptions o = estimator(30, 77, 7);
  const TraceEstimate h1 = hutchinson_trace(op, o), h2 = hutchinson_trace(op, o);
  BOOST_CHECK_EQUAL(h1.value, h2.value);
  BOOST_CHECK_EQUAL(h1.standard_error, h2.standard_error);
  const TraceEstimate p1 = hutchpp_trace(op, o), p2 = hutchpp_trace(op, o);
  BOOST_CHECK_EQUAL(p1.value, p2.value);
  BOOST_CHECK_EQUAL(p1.standard_error, p2.standard_error);
  const DiagonalEstimate d1 = hutchinson_diagonal(op, o), d2 = hutchinson_diagonal(op, o);
  BOOST_CHECK_EQUAL(max_abs_diff(d1.value, d2.value), 0.0);
  BOOST_CHECK_EQUAL(max_abs_diff(d1.standard_error, d2.standard_error), 0.0);
  const TraceEstimate other = hutchinson_trace(op, estimator(30, 78, 7));
  BOOST_CHECK_NE(h1.value, other.value);
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================
BOOST_AUTO_TEST_SUITE(density)

/// ∫ density by the trapezoid rule on its grid.
double integral(const SpectralDensity& d) {
  double s = 0;
  for (std::size_t i = 1; i < d.grid.numel(); ++i)
    s += 0.5 * (d.density.data()[i] + d.density.data()[i - 1]) * (d.grid.data()[i] - d.grid.data()[i - 1]);
  return s;
}

BOOST_AUTO_TEST_CASE(weights_sum_to_one_and_the_density_to_about_one) {
  const LinearOperator op = matrix_operator(with_spectrum(concat(linspace(-1, 3, 190), linspace(5, 6, 10)), 12));
  const SpectralDensity d = spectral_density(op, density_options(6, 30, 2));
  BOOST_CHECK(d.nodes.shape() == (Shape{6, 30}));
  BOOST_CHECK(d.weights.shape() == (Shape{6, 30}));
  BOOST_CHECK(d.grid.shape() == (Shape{1000}));
  BOOST_CHECK_EQUAL(d.products, 6u * 30u);
  BOOST_CHECK_EQUAL(op.products(), d.products);
  for (std::size_t p = 0; p < 6; ++p) {
    double s = 0;
    for (std::size_t j = 0; j < 30; ++j) s += d.weights.data()[p * 30 + j];
    BOOST_CHECK_SMALL(s - 1, 1e-12);
  }
  BOOST_CHECK_SMALL(integral(d) - 1, 1e-4);
  // every node lies in the spectrum; the grid reaches beyond both ends
  for (std::size_t i = 0; i < d.nodes.numel(); ++i) {
    BOOST_CHECK_GE(d.nodes.data()[i], -1 - 1e-10);
    BOOST_CHECK_LE(d.nodes.data()[i], 6 + 1e-10);
  }
  BOOST_CHECK_LT(d.grid.data()[0], -1);
  BOOST_CHECK_GT(d.grid.data()[999], 6);
  // the extreme nodes converge to the extreme eigenvalues
  double top = -1e300;
  for (std::size_t i = 0; i < d.nodes.numel(); ++i) top = std::max(top, d.nodes.data()[i]);
  BOOST_CHECK_SMALL(top - 6, 1e-6);
}

BOOST_AUTO_TEST_CASE(few_distinct_eigenvalues_get_their_share_of_mass) {
  // multiplicities 100, 150, 50 in R^300: every probe's Lanczos breaks down
  // after three steps; the weights at each eigenvalue average to multiplicity / n
  const Tensor a = with_spectrum(concat(concat(repeat(-1, 100), repeat(2, 150)), repeat(4, 50)), 14);
  const std::size_t probes = 24;
  const LinearOperator op = matrix_operator(a);
  const SpectralDensity d = spectral_density(op, density_options(probes, 20, 5));
  BOOST_CHECK_EQUAL(d.products, 3 * probes);
  const std::vector<double> eig = {-1, 2, 4}, share = {100.0 / 300, 150.0 / 300, 50.0 / 300};
  std::vector<std::vector<double>> mass(3);
  for (std::size_t p = 0; p < probes; ++p) {
    for (std::size_t j = 0; j < 3; ++j) BOOST_CHECK_SMALL(d.nodes.data()[p * 20 + j] - eig[j], 1e-8);
    for (std::size_t j = 3; j < 20; ++j) BOOST_CHECK_EQUAL(d.weights.data()[p * 20 + j], 0.0);  // padding
    for (std::size_t j = 0; j < 3; ++j) mass[j].push_back(d.weights.data()[p * 20 + j]);
  }
  for (std::size_t j = 0; j < 3; ++j) {
    double mean = 0, ss = 0;
    for (double w : mass[j]) mean += w;
    mean /= double(probes);
    for (double w : mass[j]) ss += (w - mean) * (w - mean);
    const double se = std::sqrt(ss / double(probes - 1) / double(probes));
    BOOST_TEST_CONTEXT("eigenvalue " << eig[j]) { BOOST_CHECK_LE(std::abs(mean - share[j]), 4 * se); }
  }
  // the density peaks at the eigenvalues, in proportion to their mass
  auto density_at = [&d](double x) {
    std::size_t best = 0;
    for (std::size_t i = 0; i < d.grid.numel(); ++i)
      if (std::abs(d.grid.data()[i] - x) < std::abs(d.grid.data()[best] - x)) best = i;
    return d.density.data()[best];
  };
  BOOST_CHECK_GT(density_at(2), density_at(-1));
  BOOST_CHECK_GT(density_at(-1), density_at(4));
  BOOST_CHECK_LT(density_at(0.5), 1e-6 * density_at(4));
  BOOST_CHECK_SMALL(integral(d) - 1, 1e-4);
}

BOOST_AUTO_TEST_CASE(more_nodes_than_dimensions) {
  const LinearOperator op = matrix_operator(with_spectrum({-1, 0.5, 2, 3, 7}, 15));
  const SpectralDensity d = spectral_density(op, density_options(3, 8, 1));
  BOOST_CHECK_EQUAL(d.products, 3u * 5u);
  for (std::size_t p = 0; p < 3; ++p) {
    const std::vector<double> eig = {-1, 0.5, 2, 3, 7};
    for (std::size_t j = 0; j < 5; ++j) BOOST_CHECK_SMALL(d.nodes.data()[p * 8 + j] - eig[j], 1e-10);
    for (std::size_t j = 5; j < 8; ++j) BOOST_CHECK_EQUAL(d.weights.data()[p * 8 + j], 0.0);
  }
}

BOOST_AUTO_TEST_CASE(a_multiple_of_the_identity) {
  const SpectralDensity d = spectral_density(diagonal_operator(repeat(2.5, 40)), density_options(2, 10));
  BOOST_CHECK_EQUAL(d.products, 2u);  // A v = 2.5 v: one step per probe
  BOOST_CHECK_SMALL(d.nodes.data()[0] - 2.5, 1e-14);
  BOOST_CHECK_SMALL(d.weights.data()[0] - 1, 1e-14);
  BOOST_CHECK_SMALL(integral(d) - 1, 1e-4);
}

BOOST_AUTO_TEST_CASE(same_seed_same_density) {
  const LinearOperator op = matrix_operator(with_spectrum(linspace(-1, 1, 50), 16));
  const DensityOptions o = density_options(3, 12, 9);
  const SpectralDensity a = spectral_density(op, o), b = spectral_density(op, o);
  BOOST_CHECK_EQUAL(max_abs_diff(a.nodes, b.nodes), 0.0);
  BOOST_CHECK_EQUAL(max_abs_diff(a.weights, b.weights), 0.0);
  BOOST_CHECK_EQUAL(max_abs_diff(a.density, b.density), 0.0);
}

BOOST_AUTO_TEST_CASE(save_csv_round_trip) {
  const LinearOperator op = matrix_operator(with_spectrum(linspace(-1, 1, 30), 18));
  DensityOptions o = density_options(2, 10);
  o.grid_points = 57;
  const SpectralDensity d = spectral_density(op, o);
  const std::string path =
      (std::filesystem::temp_directory_path() / ("hesse_density_" + std::to_string(getpid()) + ".csv")).string();
  d.save_csv(path);
  std::ifstream in(path);
  std::string line;
  BOOST_REQUIRE(std::getline(in, line));
  BOOST_CHECK_EQUAL(line, "eigenvalue,density");
  std::size_t count = 0;
  while (std::getline(in, line)) {
    double x = 0, y = 0;
    BOOST_REQUIRE_EQUAL(std::sscanf(line.c_str(), "%lf,%lf", &x, &y), 2);
    BOOST_CHECK_EQUAL(x, d.grid.data()[count]);  // %.17g round-trips exactly
    BOOST_CHECK_EQUAL(y, d.density.data()[count]);
    ++count;
  }
  BOOST_CHECK_EQUAL(count, 57u);
  std::filesystem::remove(path);
  HESSE_CHECK_THROWS(d.save_csv("/nonexistent-hesse-dir/density.csv"), hesse::IoError, "nonexistent-hesse-dir");
  HESSE_CHECK_THROWS(SpectralDensity().save_csv(path), hesse::ValueError, "save_csv");
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================
BOOST_AUTO_TEST_SUITE(errors)

BOOST_AUTO_TEST_CASE(lanczos_options) {
  const LinearOperator op = matrix_operator(with_spectrum(linspace(0, 1, 6)));
  LanczosOptions o = options(0, Which::largest);
  HESSE_CHECK_THROWS(lanczos(op, o), hesse::ValueError, "lanczos: k must be in [1, n] = [1, 6], got k = 0");
  o.k = 7;
  HESSE_CHECK_THROWS(lanczos(op, o), hesse::ValueError, "got k = 7");
  o.k = 2;
  o.block_size = 0;
  HESSE_CHECK_THROWS(lanczos(op, o), hesse::ValueError, "block_size must be positive");
  o.block_size = 1;
  o.tolerance = 0;
  HESSE_CHECK_THROWS(lanczos(op, o), hesse::ValueError, "tolerance must be positive, got 0");
  o.tolerance = -1e-3;
  HESSE_CHECK_THROWS(lanczos(op, o), hesse::ValueError, "got -0.001");
  o.tolerance = 1e-10;
  o.max_products = 1;
  HESSE_CHECK_THROWS(lanczos(op, o), hesse::ValueError, "max_products = 1 is smaller than k = 2");
  HESSE_CHECK_THROWS(lanczos(LinearOperator(), options(1, Which::largest)), hesse::ValueError,
                     "lanczos: the operator is undefined");
  BOOST_CHECK_EQUAL(op.products(), 0u);
}

BOOST_AUTO_TEST_CASE(power_iteration_options) {
  const LinearOperator op = matrix_operator(with_spectrum(linspace(0, 1, 6)));
  HESSE_CHECK_THROWS(power_iteration(op, 0), hesse::ValueError, "power_iteration: steps must be positive");
  HESSE_CHECK_THROWS(power_iteration(LinearOperator(), 10), hesse::ValueError, "power_iteration: the operator is undefined");
}

BOOST_AUTO_TEST_CASE(estimator_options) {
  const LinearOperator op = matrix_operator(with_spectrum(linspace(0, 1, 6)));
  HESSE_CHECK_THROWS(hutchinson_trace(op, estimator(1)), hesse::ValueError,
                     "hutchinson_trace: needs probes >= 2, got probes = 1");
  HESSE_CHECK_THROWS(hutchpp_trace(op, estimator(2)), hesse::ValueError,
                     "hutchpp_trace: needs probes >= 3, got probes = 2");
  HESSE_CHECK_THROWS(hutchinson_diagonal(op, estimator(1)), hesse::ValueError,
                     "hutchinson_diagonal: needs probes >= 2, got probes = 1");
  HESSE_CHECK_THROWS(exact_diagonal(op, 0), hesse::ValueError, "exact_diagonal: block must be positive");
  HESSE_CHECK_THROWS(hutchinson_trace(LinearOperator(), estimator(10)), hesse::ValueError,
                     "hutchinson_trace: the operator is undefined");
  HESSE_CHECK_THROWS(hutchpp_trace(LinearOperator(), estimator(10)), hesse::ValueError,
                     "hutchpp_trace: the operator is undefined");
  HESSE_CHECK_THROWS(hutchinson_diagonal(LinearOperator(), estimator(10)), hesse::ValueError,
                     "hutchinson_diagonal: the operator is undefined");
  HESSE_CHECK_THROWS(exact_diagonal(LinearOperator()), hesse::ValueError, "exact_diagonal: the operator is undefined");
  BOOST_CHECK_EQUAL(op.products(), 0u);
}

BOOST_AUTO_TEST_CASE(block_size_zero_chooses_the_block) {
  // n = 6: blocks of 16 probes, so the same probes as block_size 16
  const LinearOperator op = matrix_operator(with_spectrum(linspace(0, 1, 6)));
  BOOST_CHECK_EQUAL(hutchinson_trace(op, estimator(10, 0, 0)).value, hutchinson_trace(op, estimator(10, 0, 16)).value);
  BOOST_CHECK_EQUAL(hutchpp_trace(op, estimator(9, 0, 0)).value, hutchpp_trace(op, estimator(9, 0, 16)).value);
  HESSE_CHECK_CLOSE(hutchinson_diagonal(op, estimator(5, 0, 0)).value, hutchinson_diagonal(op, estimator(5, 0, 16)).value,
                    0.0);
}

BOOST_AUTO_TEST_CASE(a_block_larger_than_the_probes_is_the_probes) {
  // a huge block_size once sized a buffer by block_size × rank (wrapping to 0)
  const LinearOperator op = matrix_operator(with_spectrum(linspace(0, 1, 10)));
  const std::size_t huge = std::size_t(1) << 62;
  BOOST_CHECK_EQUAL(hutchpp_trace(op, estimator(12, 0, huge)).value, hutchpp_trace(op, estimator(12, 0, 12)).value);
  BOOST_CHECK_EQUAL(hutchinson_trace(op, estimator(7, 0, huge)).value, hutchinson_trace(op, estimator(7, 0, 7)).value);
  HESSE_CHECK_CLOSE(hutchinson_diagonal(op, estimator(5, 0, huge)).value, hutchinson_diagonal(op, estimator(5, 0, 5)).value,
                    0.0);
}

BOOST_AUTO_TEST_CASE(density_options_are_checked) {
  const LinearOperator op = matrix_operator(with_spectrum(linspace(0, 1, 6)));
  DensityOptions o = density_options(0, 10);
  HESSE_CHECK_THROWS(spectral_density(op, o), hesse::ValueError, "spectral_density: probes must be positive, got 0");
  o = density_options(3, 0);
  HESSE_CHECK_THROWS(spectral_density(op, o), hesse::ValueError, "spectral_density: nodes must be positive, got 0");
  o = density_options(3, 4);
  o.grid_points = 1;
  HESSE_CHECK_THROWS(spectral_density(op, o), hesse::ValueError, "grid_points must be at least 2, got 1");
  o.grid_points = 100;
  o.sigma = 0;
  HESSE_CHECK_THROWS(spectral_density(op, o), hesse::ValueError, "sigma must be positive and finite, got 0");
  o.sigma = -0.5;
  HESSE_CHECK_THROWS(spectral_density(op, o), hesse::ValueError, "got -0.5");
  o.sigma = NAN;
  HESSE_CHECK_THROWS(spectral_density(op, o), hesse::ValueError, "got nan");
  HESSE_CHECK_THROWS(spectral_density(LinearOperator(), density_options(2, 3)), hesse::ValueError,
                     "spectral_density: the operator is undefined");
  BOOST_CHECK_EQUAL(op.products(), 0u);
  // a finite sigma whose grid, 5σ past the spectrum, is not (known after the products)
  o = density_options(3, 4);
  o.sigma = 1e308;
  HESSE_CHECK_THROWS(spectral_density(op, o), hesse::ValueError, "spectral_density: the grid overflows: sigma 1e+308");
}

BOOST_AUTO_TEST_SUITE_END()
