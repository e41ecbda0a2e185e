// Traces and diagonals (Hutchinson, Hutch++) and the spectral density by
// stochastic Lanczos quadrature.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include <cblas.h>

#include "../detail.hpp"
#include "lanczos.hpp"
#include "../progress.hpp"

extern "C" void dgeqrf_(const int* m, const int* n, double* a, const int* lda, double* tau, double* work,
                        const int* lwork, int* info);
extern "C" void dorgqr_(const int* m, const int* n, const int* k, double* a, const int* lda, const double* tau,
                        double* work, const int* lwork, int* info);

namespace hesse {

namespace {

void check_operator(const char* fn, const LinearOperator& op) {
  if (op.size() == 0) throw ValueError(detail::message(fn, "the operator is undefined (size 0)"));
}

// The options with the probe block chosen when block_size is 0: batching pays
// while a block of probes stays cache-sized (small models, where per-op costs
// dominate); for large n each product is GEMM-bound per vector and a wide
// block only adds memory traffic.
EstimatorOptions checked(const char* fn, const LinearOperator& op, EstimatorOptions o, std::size_t min_probes) {
  check_operator(fn, op);
  if (o.probes < min_probes)
    throw ValueError(detail::message(fn, "needs probes >= ", min_probes, ", got probes = ", o.probes));
  if (o.block_size == 0) o.block_size = std::clamp<std::size_t>((std::size_t(1) << 18) / op.size(), 1, 16);
  o.block_size = std::min(o.block_size, o.probes);  // no block holds more: buffers are sized by it
  return o;
}

/// zᵀ y for every row of Z, Y [rows, n].
std::vector<double> row_dots(const Tensor& z, const Tensor& y) {
  const std::size_t rows = z.shape()[0], n = z.shape()[1];
  std::vector<double> out(rows);
  for (std::size_t i = 0; i < rows; ++i) out[i] = cblas_ddot(int(n), z.data() + i * n, 1, y.data() + i * n, 1);
  return out;
}

/// Sample mean and standard error (sample standard deviation / √count); the
/// error is NaN for fewer than two samples.
std::pair<double, double> mean_and_error(const std::vector<double>& x) {
  double mean = 0;
  for (double v : x) mean += v;
  mean /= double(x.size());
  if (x.size() < 2) return {mean, std::numeric_limits<double>::quiet_NaN()};
  double ss = 0;
  for (double v : x) ss += (v - mean) * (v - mean);
  return {mean, std::sqrt(ss / double(x.size() - 1) / double(x.size()))};
}

/// Rademacher rows [rows, n].
Tensor rademacher(std::size_t rows, std::size_t n, Generator& gen) {
  Tensor z = Tensor::empty({rows, n});
  detail::fill_rademacher(gen, z.mutable_data(), rows * n);
  return z;
}

/// The rows of Y [s, n] made orthonormal by Householder QR (LAPACK dgeqrf +
/// dorgqr on Yᵀ, which is Y's row-major buffer read column-major): Q [r, n],
/// r = min(s, n), with span Q ⊇ span Y.
Tensor orthonormal_rows(const Tensor& y) {
  const std::size_t s = y.shape()[0], n = y.shape()[1], r = std::min(s, n);
  Tensor a = y.clone();
  const int rows = int(n), cols = int(s), rank = int(r);
  std::vector<double> tau(r);
  int info = 0, lwork = -1;
  double query = 0;
  dgeqrf_(&rows, &cols, a.mutable_data(), &rows, tau.data(), &query, &lwork, &info);
  std::vector<double> work(std::size_t(std::max(1.0, query)));
  lwork = int(work.size());
  dgeqrf_(&rows, &cols, a.mutable_data(), &rows, tau.data(), work.data(), &lwork, &info);
  if (info != 0) throw Error(detail::message("hutchpp_trace", "LAPACK dgeqrf failed (info = ", info, ")"));
  lwork = -1;
  dorgqr_(&rows, &rank, &rank, a.mutable_data(), &rows, tau.data(), &query, &lwork, &info);
  work.resize(std::size_t(std::max(1.0, query)));
  lwork = int(work.size());
  dorgqr_(&rows, &rank, &rank, a.mutable_data(), &rows, tau.data(), work.data(), &lwork, &info);
  if (info != 0) throw Error(detail::message("hutchpp_trace", "LAPACK dorgqr failed (info = ", info, ")"));
  Tensor q = Tensor::empty({r, n});
  std::copy(a.data(), a.data() + r * n, q.mutable_data());  // the first r columns of Q are its first r rows here
  return q;
}

/// Rows [first, first + count) of M [rows, n].
Tensor rows_of(const Tensor& m, std::size_t first, std::size_t count) {
  const std::size_t n = m.shape()[1];
  Tensor out = Tensor::empty({count, n});
  std::copy(m.data() + first * n, m.data() + (first + count) * n, out.mutable_data());
  return out;
}

/// A applied to every row of M, `block` rows per product.
Tensor apply_in_blocks(const LinearOperator& op, const Tensor& m, std::size_t block, detail::Progress& progress,
                       std::size_t& done) {
  const std::size_t rows = m.shape()[0], n = m.shape()[1];
  Tensor out = Tensor::empty({rows, n});
  for (std::size_t r0 = 0; r0 < rows; r0 += block) {
    const std::size_t count = std::min(block, rows - r0);
    const Tensor y = op(rows_of(m, r0, count));
    std::copy(y.data(), y.data() + count * n, out.mutable_data() + r0 * n);
    progress.update(done += count);
  }
  return out;
}

}  // namespace

// ============================================================================
// traces
// ============================================================================

TraceEstimate hutchinson_trace(const LinearOperator& op, const EstimatorOptions& options) {
  const EstimatorOptions o = checked("hutchinson_trace", op, options, 2);
  NoGradGuard no_grad;
  const std::size_t n = op.size(), products_before = op.products();
  Generator gen(o.seed);
  detail::Progress progress("hutchinson_trace", o.probes, o.progress);
  // E[zᵀ A z] = tr A for Rademacher z, one block of probes per product
  std::vector<double> samples;
  for (std::size_t done = 0; done < o.probes;) {
    const std::size_t count = std::min(o.block_size, o.probes - done);
    const Tensor z = rademacher(count, n, gen);
    const std::vector<double> q = row_dots(z, op(z));
    samples.insert(samples.end(), q.begin(), q.end());
    progress.update(done += count);
  }
  TraceEstimate out;
  std::tie(out.value, out.standard_error) = mean_and_error(samples);
  out.products = op.products() - products_before;
  return out;
}

TraceEstimate hutchpp_trace(const LinearOperator& op, const EstimatorOptions& options) {
  const EstimatorOptions o = checked("hutchpp_trace", op, options, 3);
  NoGradGuard no_grad;
  const std::size_t n = op.size(), products_before = op.products();
  const std::size_t sketch = o.probes / 3, rest = o.probes - 2 * sketch;
  Generator gen(o.seed);
  detail::Progress progress("hutchpp_trace", o.probes, o.progress);
  std::size_t done = 0;

  // tr A = tr(Qᵀ A Q) + tr((I − QQᵀ) A (I − QQᵀ)), Q an orthonormal basis of
  // the range of A S: the first term exactly, the second (small when A's
  // spectrum decays) by Hutchinson.
  const Tensor q = orthonormal_rows(apply_in_blocks(op, rademacher(sketch, n, gen), o.block_size, progress, done));
  const std::size_t r = q.shape()[0];
  double top = 0;
  for (double v : row_dots(q, apply_in_blocks(op, q, o.block_size, progress, done))) top += v;

  TraceEstimate out;
  out.value = top;
  if (r < n) {  // when Q spans R^n the remainder is zero
    std::vector<double> samples;
    std::vector<double> c(o.block_size * r);
    for (std::size_t i = 0; i < rest;) {
      const std::size_t count = std::min(o.block_size, rest - i);
      Tensor z = rademacher(count, n, gen);
      // z ← (I − QQᵀ) z, row by row: Z −= (Z Qᵀ) Q
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(count), int(r), int(n), 1.0, z.data(), int(n),
                  q.data(), int(n), 0.0, c.data(), int(r));
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(count), int(n), int(r), -1.0, c.data(), int(r),
                  q.data(), int(n), 1.0, z.mutable_data(), int(n));
      const std::vector<double> s = row_dots(z, op(z));
      samples.insert(samples.end(), s.begin(), s.end());
      i += count;
      progress.update(done += count);
    }
    const auto [mean, error] = mean_and_error(samples);
    out.value += mean;
    out.standard_error = error;
  }
  out.products = op.products() - products_before;
  return out;
}

// ============================================================================
// diagonals
// ============================================================================

DiagonalEstimate hutchinson_diagonal(const LinearOperator& op, const EstimatorOptions& options) {
  const EstimatorOptions o = checked("hutchinson_diagonal", op, options, 2);
  NoGradGuard no_grad;
  const std::size_t n = op.size(), products_before = op.products();
  Generator gen(o.seed);
  detail::Progress progress("hutchinson_diagonal", o.probes, o.progress);
  // E[z ⊙ A z] = diag A; Welford's running mean and sum of squares per entry
  std::vector<double> mean(n, 0.0), squares(n, 0.0);
  std::size_t count = 0;
  for (std::size_t done = 0; done < o.probes;) {
    const std::size_t rows = std::min(o.block_size, o.probes - done);
    const Tensor z = rademacher(rows, n, gen);
    const Tensor az = op(z);
    for (std::size_t i = 0; i < rows; ++i) {
      ++count;
      const double* zi = z.data() + i * n;
      const double* yi = az.data() + i * n;
      for (std::size_t e = 0; e < n; ++e) {
        const double x = zi[e] * yi[e], delta = x - mean[e];
        mean[e] += delta / double(count);
        squares[e] += delta * (x - mean[e]);
      }
    }
    progress.update(done += rows);
  }
  DiagonalEstimate out;
  out.value = Tensor::empty({n});
  out.standard_error = Tensor::empty({n});
  for (std::size_t e = 0; e < n; ++e) {
    out.value.mutable_data()[e] = mean[e];
    out.standard_error.mutable_data()[e] = std::sqrt(squares[e] / double(count - 1) / double(count));
  }
  out.products = op.products() - products_before;
  return out;
}

Tensor exact_diagonal(const LinearOperator& op, std::size_t block) {
  check_operator("exact_diagonal", op);
  if (block == 0) throw ValueError("hesse::exact_diagonal: block must be positive, got 0");
  NoGradGuard no_grad;
  const std::size_t n = op.size();
  Tensor out = Tensor::empty({n});
  detail::Progress progress("exact_diagonal", n, true);
  // A e_i for a block of unit vectors e_i; keep entry i of each
  for (std::size_t r0 = 0; r0 < n; r0 += block) {
    const std::size_t count = std::min(block, n - r0);
    Tensor seeds = zeros({count, n});
    for (std::size_t i = 0; i < count; ++i) seeds.mutable_data()[i * n + r0 + i] = 1.0;
    const Tensor rows = op(seeds);
    for (std::size_t i = 0; i < count; ++i) out.mutable_data()[r0 + i] = rows.data()[i * n + r0 + i];
    progress.update(r0 + count);
  }
  return out;
}

// ============================================================================
// spectral density
// ============================================================================

namespace {

void check_options(const LinearOperator& op, const DensityOptions& o) {
  check_operator("spectral_density", op);
  if (o.probes == 0) throw ValueError("hesse::spectral_density: probes must be positive, got 0");
  if (o.nodes == 0) throw ValueError("hesse::spectral_density: nodes must be positive, got 0");
  if (o.grid_points < 2)
    throw ValueError(detail::message("spectral_density", "grid_points must be at least 2, got ", o.grid_points));
  if (!(o.sigma > 0) || !std::isfinite(o.sigma))
    throw ValueError(detail::message("spectral_density", "sigma must be positive and finite, got ", o.sigma));
}

}  // namespace

SpectralDensity spectral_density(const LinearOperator& op, const DensityOptions& o) {
  check_options(op, o);
  NoGradGuard no_grad;
  const std::size_t n = op.size(), steps = std::min(o.nodes, n), products_before = op.products();
  Generator gen(o.seed);
  detail::Progress progress("spectral_density", o.probes, o.progress);
  SpectralDensity out;
  out.nodes = zeros({o.probes, o.nodes});
  out.weights = zeros({o.probes, o.nodes});
  double lo = INFINITY, hi = -INFINITY;

  // Per probe v (a normalised Rademacher vector), Lanczos gives T = Vᵀ A V
  // with V e₁ = v; the Gauss quadrature vᵀ f(A) v ≈ Σ_j w_j f(θ_j) has nodes
  // θ_j = eig(T) and weights w_j = (first entry of T's j-th eigenvector)².
  detail::KrylovBasis basis(op, steps, 1, gen, /*restart=*/false);
  std::vector<double> start(n);
  for (std::size_t p = 0; p < o.probes; ++p) {
    detail::fill_rademacher(gen, start.data(), n);
    for (double& x : start) x /= std::sqrt(double(n));
    basis.start(start.data(), 1);
    do basis.step();
    while (basis.can_grow());  // stops early on breakdown: v's spectral measure has fewer points
    const detail::SymmetricEigen eigen = detail::symmetric_eigen(basis.t(), basis.size(), basis.ldt());
    double* nodes = out.nodes.mutable_data() + p * o.nodes;
    double* weights = out.weights.mutable_data() + p * o.nodes;
    for (std::size_t j = 0; j < o.nodes; ++j) {  // padding: the last node again, with weight 0
      const std::size_t jj = std::min(j, eigen.m - 1);
      nodes[j] = eigen.values[jj];
      weights[j] = j < eigen.m ? eigen.vector(j)[0] * eigen.vector(j)[0] : 0.0;
    }
    lo = std::min(lo, eigen.values.front());
    hi = std::max(hi, eigen.values.back());
    progress.update(p + 1);
  }

  // density(x) = (1/probes) Σ_p Σ_j w_pj N(x; θ_pj, σ²) with σ = sigma · (hi − lo),
  // on a grid reaching 5σ beyond the extreme nodes so that it integrates to ≈ 1.
  double width = hi - lo;
  if (!(width > 1e-8 * std::max(std::abs(lo), std::abs(hi)))) width = std::max({std::abs(lo), std::abs(hi), 1.0});
  const double sigma = o.sigma * width, first = lo - 5 * sigma, last = hi + 5 * sigma;
  const double spacing = (last - first) / double(o.grid_points - 1);
  const double norm = 1.0 / (double(o.probes) * sigma * std::sqrt(2 * M_PI));
  if (!std::isfinite(spacing) || !(norm > 0))  // (nodes are finite: an operator giving NaN fails in Lanczos)
    throw ValueError(detail::message("spectral_density", "the grid overflows: sigma ", o.sigma, " times the spectral width ",
                                     width, " reaches past the largest double; use a smaller sigma"));
  out.grid = Tensor::empty({o.grid_points});
  out.density = Tensor::empty({o.grid_points});
  for (std::size_t g = 0; g < o.grid_points; ++g) {
    const double x = g + 1 == o.grid_points ? last : first + double(g) * spacing;
    double sum = 0;
    for (std::size_t i = 0; i < o.probes * o.nodes; ++i) {
      const double w = out.weights.data()[i], z = (x - out.nodes.data()[i]) / sigma;
      if (w > 0) sum += w * std::exp(-0.5 * z * z);
    }
    out.grid.mutable_data()[g] = x;
    out.density.mutable_data()[g] = sum * norm;
  }
  out.products = op.products() - products_before;
  return out;
}

void SpectralDensity::save_csv(const std::string& path) const {
  if (!grid.defined() || !density.defined() || grid.numel() != density.numel())
    throw ValueError("hesse::SpectralDensity::save_csv: no density to save (grid and density undefined or unequal)");
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f)
    throw IoError(detail::message("SpectralDensity::save_csv", "cannot open '", path, "' for writing: ",
                                  std::strerror(errno)));
  std::fprintf(f, "eigenvalue,density\n");
  for (std::size_t i = 0; i < grid.numel(); ++i) std::fprintf(f, "%.17g,%.17g\n", grid.data()[i], density.data()[i]);
  const bool failed = std::ferror(f) != 0;
  if (std::fclose(f) != 0 || failed)
    throw IoError(detail::message("SpectralDensity::save_csv", "writing '", path, "' failed"));
}

}  // namespace hesse
