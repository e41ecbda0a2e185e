// Spectra: block Lanczos with full reorthogonalisation, and power iteration.
#include "lanczos.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include <cblas.h>

#include "../detail.hpp"
#include "../progress.hpp"

extern "C" void dsyevr_(const char* jobz, const char* range, const char* uplo, const int* n, double* a,
                        const int* lda, const double* vl, const double* vu, const int* il, const int* iu,
                        const double* abstol, int* m, double* w, double* z, const int* ldz, int* isuppz,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info);

namespace hesse {
namespace detail {

SymmetricEigen symmetric_eigen(const double* a, std::size_t m, std::size_t lda) {
  SymmetricEigen out;
  out.m = m;
  if (m == 0) return out;
  std::vector<double> copy(m * m);  // dsyevr overwrites its input; symmetric, so row or column major alike
  for (std::size_t i = 0; i < m; ++i) std::copy(a + i * lda, a + i * lda + m, copy.data() + i * m);
  if (!std::all_of(copy.begin(), copy.end(), [](double x) { return std::isfinite(x); }))
    throw ValueError(message("lanczos", "the operator's products are not finite (NaN or inf): its spectrum is "
                                        "undefined (a loss or model that is not finite at these inputs?)"));
  out.values.resize(m);
  out.vectors.resize(m * m);
  const char jobz = 'V', range = 'A', uplo = 'L';
  const int size = int(m), none = 0;
  const double unused = 0, abstol = 0;
  int found = 0, info = 0, lwork = -1, liwork = -1, iwork_query = 0;
  double work_query = 0;
  std::vector<int> isuppz(2 * m);
  dsyevr_(&jobz, &range, &uplo, &size, copy.data(), &size, &unused, &unused, &none, &none, &abstol, &found,
          out.values.data(), out.vectors.data(), &size, isuppz.data(), &work_query, &lwork, &iwork_query, &liwork,
          &info);
  lwork = int(work_query);
  liwork = iwork_query;
  std::vector<double> work(std::size_t(std::max(lwork, 1)));
  std::vector<int> iwork(std::size_t(std::max(liwork, 1)));
  dsyevr_(&jobz, &range, &uplo, &size, copy.data(), &size, &unused, &unused, &none, &none, &abstol, &found,
          out.values.data(), out.vectors.data(), &size, isuppz.data(), work.data(), &lwork, iwork.data(), &liwork,
          &info);
  if (info != 0 || found != size)
    throw Error(message("lanczos", "LAPACK dsyevr failed on the ", m, " x ", m, " projected matrix (info = ", info,
                        ")"));
  return out;
}

void fill_rademacher(Generator& gen, double* out, std::size_t count) {
  for (std::size_t i = 0; i < count; i += 64) {
    const std::uint64_t bits = gen.engine()();
    const std::size_t len = std::min<std::size_t>(64, count - i);
    for (std::size_t j = 0; j < len; ++j)  // independent lanes: vectorises
      out[i + j] = double(int((bits >> j) & 1) * 2 - 1);
  }
}

// SplitMix64 on a counter: every value is independent of the others, so the
// loop vectorises, and the whole vector costs one draw of the (slower) engine.
void fill_uniform(Generator& gen, double* out, std::size_t count) {
  const std::uint64_t seed = gen.engine()();
  for (std::size_t i = 0; i < count; ++i) {
    std::uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    out[i] = double(z >> 11) * 0x1p-52 - 1.0;  // 53 random bits
  }
}

namespace {

/// W ← W − Cᵀ V with C = V Wᵀ: removes from `count` rows W [count, n] their
/// components along the m orthonormal rows V [m, n]; C [m, count] keeps them.
void project_out(const double* v, std::size_t m, std::size_t n, double* w, std::size_t count, double* c) {
  if (m == 0) return;
  if (count == 1) {
    cblas_dgemv(CblasRowMajor, CblasNoTrans, int(m), int(n), 1.0, v, int(n), w, 1, 0.0, c, 1);
    cblas_dgemv(CblasRowMajor, CblasTrans, int(m), int(n), -1.0, v, int(n), c, 1, 1.0, w, 1);
    return;
  }
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(count), int(n), 1.0, v, int(n), w, int(n), 0.0, c,
              int(count));
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(count), int(n), int(m), -1.0, c, int(count), v, int(n), 1.0,
              w, int(n));
}

// For vectors this long, OpenBLAS's level-1 routines split the work over its
// threads; one fused loop would run on a single core and take longer, even
// though it reads memory fewer times.

// v · p, u · p and p · p (u may be null: 0).
void three_dots(const double* p, const double* v, const double* u, std::size_t n, double& vp, double& up,
                double& pp) {
  vp = cblas_ddot(int(n), v, 1, p, 1);
  up = u ? cblas_ddot(int(n), u, 1, p, 1) : 0.0;
  pp = cblas_ddot(int(n), p, 1, p, 1);
}

// w = scale (p − α v − γ u) (u may be null); returns ‖w‖². `own` is p's
// buffer when p may be overwritten, else null: the subtractions then run in
// place, on BLAS's threads, and one pass writes w scaled.
double combine(const double* p, double* own, double alpha, const double* v, double gamma, const double* u,
               double scale, std::size_t n, double* w) {
  double* r = own ? own : w;  // where p − α v − γ u is formed
  if (!own) cblas_dcopy(int(n), p, 1, w, 1);
  cblas_daxpy(int(n), -alpha, v, 1, r, 1);
  if (u) cblas_daxpy(int(n), -gamma, u, 1, r, 1);
  double s[4] = {};  // w = scale r and its squared length, in one pass
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (std::size_t l = 0; l < 4; ++l) {
      w[i + l] = scale * r[i + l];
      s[l] += w[i + l] * w[i + l];
    }
  for (; i < n; ++i) w[i] = scale * r[i], s[0] += w[i] * w[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

}  // namespace

// √(x · x): OpenBLAS's dnrm2 guards against overflow with a scaled loop that
// costs several times a dot product; vectors here are far from overflowing.
double norm(const double* x, std::size_t n) { return std::sqrt(cblas_ddot(int(n), x, 1, x, 1)); }

namespace {

// (An operator may return a result it keeps, or its input, a view of the
// basis: only a product held alone, detail::held_alone, may be overwritten.)

// ‖y − θ x‖ over n entries. `own` is y's buffer when y may be overwritten
// (then on BLAS's threads), else null.
double residual(const double* y, double* own, double theta, const double* x, std::size_t n) {
  if (own) {
    cblas_daxpy(int(n), -theta, x, 1, own, 1);
    return norm(own, n);
  }
  double sum = 0;
  for (std::size_t e = 0; e < n; ++e) sum += (y[e] - theta * x[e]) * (y[e] - theta * x[e]);
  return std::sqrt(sum);
}

}  // namespace

KrylovBasis::KrylovBasis(const LinearOperator& op, std::size_t capacity, std::size_t block_size, Generator& gen,
                         bool restart, bool always_full)
    : op_(op), n_(op.size()), capacity_(capacity), block_(block_size), gen_(gen), restart_(restart),
      always_full_(always_full),
      v_(Tensor::empty({capacity + block_size, op.size()})),
      t_(capacity * capacity),
      l_(block_size * block_size),
      coef_(capacity * block_size),
      coef2_(capacity * block_size) {}

void KrylovBasis::start(const double* rows, std::size_t count) {
  std::memmove(row_mut(0), rows, count * n_ * sizeof(double));
  m_ = 0;
  anorm_ = 0;
  broke_ = false;
  last_start_ = last_size_ = 0;
  segments_.assign(1, 0);
  omega_.clear();  // no orthogonality history: the first steps reorthogonalise fully
  omega_previous_.clear();
  force_full_ = 0;
  std::fill(t_.begin(), t_.end(), 0.0);
  double scale = 0;
  for (std::size_t i = 0; i < count; ++i) scale = std::max(scale, norm(row(i), n_));
  std::size_t kept = orthonormalize_block(count, 1e-12 * scale);
  while (kept < count && random_row(kept)) ++kept;  // a dependent start row: replace it
  std::fill(l_.begin(), l_.end(), 0.0);             // no residual before the first product
  next_ = std::min(kept, capacity_);
}

void KrylovBasis::start_random() {
  fill_uniform(gen_, row_mut(0), block_ * n_);
  start(row(0), block_);
}

void KrylovBasis::step() {
  const std::size_t b0 = m_, pj = next_, previous = last_start_;
  if (pj == 0) throw Error(message("lanczos", "internal: step() on a basis that cannot grow"));
  // the block is a view of its rows of the basis: rows < m_ are never written again
  Tensor product = op_(slice(v_, 0, std::int64_t(b0), std::int64_t(b0 + pj)));
  last_start_ = b0;
  last_size_ = pj;
  m_ = b0 + pj;

  // The residual block W = A V_j goes right after the basis, where the next block will be.
  // In exact arithmetic W only has components along V_j and V_{j-1} (the
  // three-term recurrence): that pass is cheap and yields T_jj, and it is
  // repeated only when it removed much of W (Daniel-Gragg-Kaufman-Stewart:
  // then rounding left a visible part behind). What rounding leaves along the
  // older vectors is removed by a pass against the whole basis (another when
  // that pass removed much of W). Reading the basis is what costs at large n,
  // so with single vectors that pass is only made when Simon's recurrence
  // says orthogonality is about to be lost (partial reorthogonalisation):
  // semi-orthogonality, |v_i · v_j| ≤ √ε, keeps T's eigenvalues exact to rounding.
  double* w = row_mut(m_);
  std::fill(coef_.begin(), coef_.end(), 0.0);
  std::fill(coef2_.begin(), coef2_.end(), 0.0);
  double size = 0;          // of W's rows, the largest
  bool full = pj > 1;       // a pass against the whole basis
  bool normalized = false;  // W is already the next basis vector
  if (pj == 1) {
    // Single vectors, the common case: the three dot products, then W
    // written scaled. When the local pass removes less than 3/4 of ‖A v‖²,
    // one pass is enough (DGKS) and Pythagoras gives ‖W‖ to rounding before
    // W is written.
    const double* vj = row(b0);
    const double* vp = previous < b0 ? row(previous) : nullptr;
    double alpha = 0, gamma = 0, pp = 0;
    three_dots(product.data(), vj, vp, n_, alpha, gamma, pp);
    anorm_ = std::max(anorm_, std::sqrt(pp));
    coef_[b0] = alpha;
    if (vp) coef_[previous] = gamma;
    const double left = pp - alpha * alpha - gamma * gamma;
    const bool one_pass = left > 0.25 * pp;
    if (one_pass) {
      size = std::sqrt(left);
      full = needs_full_pass(b0, alpha, size) || always_full_;
      normalized = !full && size > 1e-12 * anorm_ && m_ < n_;
    }
    double* own = detail::held_alone(product) ? product.mutable_data() : nullptr;
    const double written =
        combine(product.data(), own, alpha, vj, gamma, vp, normalized ? 1.0 / size : 1.0, n_, w);
    if (normalized) {
      const double length = std::sqrt(written);  // 1 to rounding
      if (std::abs(length - 1.0) > 1e-12) cblas_dscal(int(n_), 1.0 / length, w, 1);
      size *= length;
    } else if (one_pass) {
      size = std::sqrt(written);
    } else {
      std::vector<double> c(m_ - previous);
      project_out(row(previous), m_ - previous, n_, w, 1, c.data());
      for (std::size_t i = 0; i < c.size(); ++i) coef_[previous + i] += c[i];
      size = norm(w, n_);
      full = needs_full_pass(b0, coef_[b0], size) || always_full_;
    }
  } else {
    std::memcpy(w, product.data(), pj * n_ * sizeof(double));
    for (std::size_t a = 0; a < pj; ++a) size = std::max(size, norm(w + a * n_, n_));
    anorm_ = std::max(anorm_, size);
    for (int pass = 0; pass < 2; ++pass) {
      std::vector<double> c((m_ - previous) * pj);
      project_out(row(previous), m_ - previous, n_, w, pj, c.data());
      for (std::size_t i = 0; i < c.size(); ++i) coef_[previous * pj + i] += c[i];
      const double before = size;
      size = 0;
      for (std::size_t a = 0; a < pj; ++a) size = std::max(size, norm(w + a * n_, n_));
      if (size > 0.5 * before) break;
    }
  }
  if (full) {
    for (int pass = 0; pass < 2; ++pass) {
      double before = 0, after = 0;
      for (std::size_t a = 0; a < pj; ++a) before = std::max(before, norm(w + a * n_, n_));
      std::vector<double> c(m_ * pj);
      project_out(row(0), m_, n_, w, pj, c.data());
      for (std::size_t i = 0; i < c.size(); ++i) coef2_[i] += c[i];
      for (std::size_t a = 0; a < pj; ++a) after = std::max(after, norm(w + a * n_, n_));
      if (after > 0.5 * before) break;
    }
    ++full_passes_;
  }
  for (std::size_t a = 0; a < pj; ++a)
    for (std::size_t b = 0; b < pj; ++b) {
      const std::size_t ab = (b0 + a) * pj + b, ba = (b0 + b) * pj + a;
      t_[(b0 + a) * capacity_ + b0 + b] = 0.5 * (coef_[ab] + coef2_[ab] + coef_[ba] + coef2_[ba]);
    }

  next_ = 0;
  broke_ = false;
  std::fill(l_.begin(), l_.end(), 0.0);
  if (m_ == n_) return;  // the basis spans R^n: A V = V T exactly, nothing is left

  // W = L Q: the next block. A residual row of size ~rounding carries no
  // direction: it is dropped and, if allowed, replaced by a random vector
  // orthogonal to everything so far (its coupling to block j is zero).
  std::size_t kept = 1;
  if (normalized) l_[0] = size;
  else kept = orthonormalize_block(pj, 1e-12 * anorm_);
  broke_ = kept == 0;  // an invariant subspace: T splits here
  std::size_t rows = kept;
  if (restart_ && m_ < capacity_)
    while (rows < pj && random_row(m_ + rows)) ++rows, force_full_ = 2;  // a fresh direction: no history
  if (broke_ && rows > 0) segments_.push_back(m_);
  next_ = std::min(rows, capacity_ - m_);
  for (std::size_t a = 0; a < pj; ++a)
    for (std::size_t b = 0; b < next_; ++b)
      t_[(b0 + a) * capacity_ + m_ + b] = t_[(m_ + b) * capacity_ + b0 + a] = l_[a * block_ + b];
}

bool KrylovBasis::needs_full_pass(std::size_t j, double alpha, double beta) {
  // Simon's recurrence for ω_{j+1,k} ≈ v_{j+1} · v_k from ω_j and ω_{j-1};
  // it is reset to rounding level by a full pass and by every (re)start.
  const double eps = DBL_EPSILON, eps1 = std::sqrt(double(n_)) * eps, sqrt_eps = std::sqrt(eps);
  std::vector<double> next(j + 2, eps1);
  next[j + 1] = 1.0;
  const bool fresh = omega_.size() != j + 1 || omega_previous_.size() != j;  // no history for this vector
  if (force_full_ > 0 || fresh || !(beta > 0)) {
    force_full_ = std::max(force_full_ - 1, 0);
    if (fresh) {
      omega_previous_.assign(j + 1, eps1);
      omega_previous_[j] = 1.0;
    } else {
      omega_previous_ = omega_;
    }
    omega_ = next;
    return true;
  }
  auto alpha_of = [&](std::size_t k) { return t_[k * capacity_ + k]; };
  auto beta_of = [&](std::size_t k) { return k == j ? beta : t_[k * capacity_ + k + 1]; };
  double worst = 0;
  for (std::size_t k = 0; k < j; ++k) {
    double t = beta_of(k) * omega_[k + 1] + (alpha_of(k) - alpha) * omega_[k] - beta_of(j - 1) * omega_previous_[k];
    if (k > 0) t += beta_of(k - 1) * omega_[k - 1];
    next[k] = (t + std::copysign(eps1 * (beta_of(k) + beta), t)) / beta;
    worst = std::max(worst, std::abs(next[k]));
  }
  next[j] = eps1 * std::max(anorm_, beta) / beta;
  omega_previous_ = omega_;
  if (worst <= sqrt_eps) {
    omega_ = next;
    return false;
  }
  force_full_ = 1;  // the next vector inherits the loss: clean it too
  omega_ = std::vector<double>(j + 2, eps1);
  omega_[j + 1] = 1.0;
  return true;
}

std::size_t KrylovBasis::orthonormalize_block(std::size_t count, double threshold) {
  std::fill(l_.begin(), l_.end(), 0.0);
  std::vector<double> c(block_);
  std::size_t kept = 0;
  for (std::size_t a = 0; a < count; ++a) {
    double* w = row_mut(m_ + kept);  // survivors are compacted to the front
    if (kept < a) std::memcpy(w, row(m_ + a), n_ * sizeof(double));
    for (int pass = 0; pass < 2; ++pass) {  // against the rows kept so far (a few)
      project_out(row(m_), kept, n_, w, 1, c.data());
      for (std::size_t b = 0; b < kept; ++b) l_[a * block_ + b] += c[b];
    }
    const double size = norm(w, n_);
    if (size > threshold && m_ + kept < n_) {
      cblas_dscal(int(n_), 1.0 / size, w, 1);
      l_[a * block_ + kept] = size;
      ++kept;
    }
  }
  return kept;
}

bool KrylovBasis::random_row(std::size_t r) {
  if (r >= n_) return false;
  double* x = row_mut(r);
  fill_uniform(gen_, x, n_);
  std::vector<double> c(r);
  // Repeat while a pass removes most of the vector (DGKS); two passes almost always.
  double before = norm(x, n_), after = before;
  for (int pass = 0; pass < 4; ++pass) {
    project_out(row(0), r, n_, x, 1, c.data());
    after = norm(x, n_);
    if (pass >= 1 && after > 0.5 * before) break;
    before = after;
  }
  if (!(after > 0)) return false;
  cblas_dscal(int(n_), 1.0 / after, x, 1);
  return true;
}

double KrylovBasis::residual_estimate(const double* y_last) const {
  double sum = 0;
  for (std::size_t b = 0; b < block_; ++b) {
    double r = 0;
    for (std::size_t a = 0; a < last_size_; ++a) r += y_last[a] * l_[a * block_ + b];
    sum += r * r;
  }
  return std::sqrt(sum);
}

}  // namespace detail

// ============================================================================
// lanczos
// ============================================================================

namespace {

using detail::KrylovBasis;
using detail::SymmetricEigen;

/// The eigenpairs of one decoupled diagonal block of T.
struct Segment {
  std::size_t start = 0;
  SymmetricEigen eigen;
  std::vector<double> estimate;  // Lanczos residual estimate of each pair
};

/// A Ritz pair: eigenvector `index` of segment `segment`.
struct Ritz {
  double value, estimate;
  std::size_t segment, index;
};

/// Whether a comes before b in the order `which` asks for (ties: positive first).
bool before(Which which, double a, double b) {
  switch (which) {
    case Which::largest: return a > b;
    case Which::smallest: return a < b;
    case Which::largest_magnitude: return std::abs(a) > std::abs(b) || (std::abs(a) == std::abs(b) && a > b);
  }
  return false;
}

/// The Ritz pairs of segments [first, last), best first.
std::vector<Ritz> ranked(const std::vector<Segment>& segments, std::size_t first, std::size_t last, Which which) {
  std::vector<Ritz> pairs;
  for (std::size_t s = first; s < last; ++s)
    for (std::size_t j = 0; j < segments[s].eigen.m; ++j)
      pairs.push_back({segments[s].eigen.values[j], segments[s].estimate[j], s, j});
  std::stable_sort(pairs.begin(), pairs.end(),
                   [which](const Ritz& a, const Ritz& b) { return before(which, a.value, b.value); });
  return pairs;
}

Segment make_segment(const KrylovBasis& basis, std::size_t start, std::size_t end, bool closed) {
  Segment s;
  s.start = start;
  s.eigen = detail::symmetric_eigen(basis.t() + start * basis.ldt() + start, end - start, basis.ldt());
  s.estimate.assign(s.eigen.m, 0.0);  // a closed segment spans an invariant subspace
  if (!closed)
    for (std::size_t j = 0; j < s.eigen.m; ++j)
      s.estimate[j] = basis.residual_estimate(s.eigen.vector(j) + (basis.last_block_start() - start));
  return s;
}

/// Brings the per-segment eigenpairs up to date with the basis.
void update_segments(const KrylovBasis& basis, std::vector<Segment>& segments) {
  const auto& starts = basis.segments();
  if (!segments.empty()) segments.pop_back();  // the open segment has grown
  while (segments.size() + 1 < starts.size())
    segments.push_back(make_segment(basis, starts[segments.size()], starts[segments.size() + 1], true));
  segments.push_back(make_segment(basis, starts.back(), basis.size(), false));
}

/// After a breakdown the Krylov space has lost the remaining multiplicity of
/// every eigenvalue it found, so the basis restarts from a fresh random
/// vector. The answer is only trusted once the latest restart has converged
/// on its own extreme Ritz values and they do not improve on the k-th value
/// found before it (else more copies may remain: restart again).
bool restart_settled(const std::vector<Segment>& segments, std::size_t k, Which which, double tolerance,
                     double scale) {
  if (segments.size() == 1) return true;  // never broke down
  std::size_t latest = segments.size() - 1;
  if (segments[latest].eigen.m == 0) latest -= 1;  // just restarted: judge the segment that closed
  const Segment& s = segments[latest];
  const std::size_t lo = 0, hi = s.eigen.m - 1;
  const bool lo_needed = which != Which::largest, hi_needed = which != Which::smallest;
  if ((lo_needed && s.estimate[lo] > tolerance) || (hi_needed && s.estimate[hi] > tolerance)) return false;
  const std::vector<Ritz> older = ranked(segments, 0, latest, which);
  if (older.size() < k) return false;
  const double kth = older[k - 1].value, ties = 1e-8 * scale;
  switch (which) {
    case Which::largest: return s.eigen.values[hi] <= kth + ties;
    case Which::smallest: return s.eigen.values[lo] >= kth - ties;
    case Which::largest_magnitude:
      return std::max(std::abs(s.eigen.values[lo]), std::abs(s.eigen.values[hi])) <= std::abs(kth) + ties;
  }
  return true;
}

double spectral_scale(const std::vector<Ritz>& pairs) {
  double scale = 0;
  for (const Ritz& r : pairs) scale = std::max(scale, std::abs(r.value));
  return std::max(scale, DBL_MIN);
}

void check_options(const LinearOperator& op, const LanczosOptions& o) {
  const std::size_t n = op.size();
  if (n == 0) throw ValueError("hesse::lanczos: the operator is undefined (size 0)");
  if (o.k == 0 || o.k > n)
    throw ValueError(detail::message("lanczos", "k must be in [1, n] = [1, ", n, "], got k = ", o.k));
  if (o.block_size == 0) throw ValueError("hesse::lanczos: block_size must be positive, got 0");
  if (!(o.tolerance > 0)) throw ValueError(detail::message("lanczos", "tolerance must be positive, got ", o.tolerance));
  if (o.max_products != 0 && o.max_products < o.k)
    throw ValueError(detail::message("lanczos", "max_products = ", o.max_products, " is smaller than k = ", o.k));
}

}  // namespace

Eigenpairs lanczos(const LinearOperator& op, const LanczosOptions& o) {
  check_options(op, o);
  NoGradGuard no_grad;
  const std::size_t n = op.size(), k = o.k, products_before = op.products();
  const std::size_t capacity = std::min(n, o.max_products ? o.max_products : std::max<std::size_t>(40 * k, 200));
  const std::size_t block = std::min(o.block_size, capacity);
  const std::size_t check_every = std::max<std::size_t>(1, 5 / block);  // T's eigenproblem every ~5 products

  Generator gen(o.seed);
  KrylovBasis basis(op, capacity, block, gen, /*restart=*/true, o.full_reorthogonalization);
  basis.start_random();
  detail::Progress progress("lanczos", capacity, o.progress);
  std::vector<Segment> segments;
  std::vector<Ritz> pairs;
  std::string note;
  for (std::size_t since = 0;;) {
    basis.step();
    progress.update(basis.size(), note);
    const bool last = !basis.can_grow();
    if (!last && (basis.size() < k || (++since < check_every && !basis.broke_down()))) continue;
    since = 0;
    update_segments(basis, segments);
    pairs = ranked(segments, 0, segments.size(), o.which);
    const double scale = spectral_scale(pairs), tolerance = o.tolerance * scale;
    double worst = 0;  // the largest estimated residual of a wanted pair
    for (std::size_t i = 0; i < std::min(k, pairs.size()); ++i) worst = std::max(worst, pairs[i].estimate);
    if (last || (pairs.size() >= k && worst <= tolerance && restart_settled(segments, k, o.which, tolerance, scale)))
      break;
    char text[64];
    std::snprintf(text, sizeof text, "relative residual %.1e", worst / scale);
    note = text;
  }
  if (pairs.size() < k) throw Error(detail::message("lanczos", "internal: ", pairs.size(), " Ritz pairs for k = ", k));

  // Ritz vectors x = Vᵀ y, then one block product to measure ‖A x − θ x‖.
  Eigenpairs out;
  out.values = Tensor::empty({k});
  out.vectors = Tensor::empty({k, n});
  out.residuals = Tensor::empty({k});
  for (std::size_t i = 0; i < k; ++i) {
    const Segment& s = segments[pairs[i].segment];
    cblas_dgemv(CblasRowMajor, CblasTrans, int(s.eigen.m), int(n), 1.0, basis.row(s.start), int(n),
                s.eigen.vector(pairs[i].index), 1, 0.0, out.vectors.mutable_data() + i * n, 1);
    out.values.mutable_data()[i] = pairs[i].value;
  }
  Tensor ax = op(out.vectors);
  double* own = detail::held_alone(ax) ? ax.mutable_data() : nullptr;
  const double tolerance = o.tolerance * spectral_scale(pairs);
  out.converged = true;
  for (std::size_t i = 0; i < k; ++i) {
    const double r = detail::residual(ax.data() + i * n, own ? own + i * n : nullptr, pairs[i].value,
                              out.vectors.data() + i * n, n);
    out.residuals.mutable_data()[i] = r;
    out.converged = out.converged && r <= tolerance;
  }
  out.products = op.products() - products_before;
  return out;
}

// ============================================================================
// power iteration
// ============================================================================

PowerIteration power_iteration(const LinearOperator& op, std::size_t steps, std::uint64_t seed) {
  if (op.size() == 0) throw ValueError("hesse::power_iteration: the operator is undefined (size 0)");
  if (steps == 0) throw ValueError("hesse::power_iteration: steps must be positive, got 0");
  NoGradGuard no_grad;
  const std::size_t n = op.size(), products_before = op.products();
  Generator gen(seed);
  Tensor v = Tensor::empty({n});
  detail::fill_uniform(gen, v.mutable_data(), n);
  cblas_dscal(int(n), 1.0 / detail::norm(v.data(), n), v.mutable_data(), 1);

  // v_{i+1} = A v_i / ‖A v_i‖; the last product also gives the Rayleigh
  // quotient vᵀ A v and the residual of the returned vector.
  Tensor av = op(v);
  for (std::size_t i = 1; i < steps; ++i) {
    const double size = detail::norm(av.data(), n);
    if (!(size > 0)) break;  // A v = 0: v is an eigenvector of 0
    if (detail::held_alone(av)) {  // scaled in place, on BLAS's threads
      cblas_dscal(int(n), 1.0 / size, av.mutable_data(), 1);
      v = std::move(av);
    } else {  // av / ‖av‖ in one pass (a clone, then a scale, would be two), rounded as dscal does
      v = Tensor::empty({n});
      const double* a = av.data();
      double* x = v.mutable_data();
      const double scale = 1.0 / size;
      for (std::size_t e = 0; e < n; ++e) x[e] = a[e] * scale;
    }
    av = op(v);
  }
  PowerIteration out;
  out.value = cblas_ddot(int(n), v.data(), 1, av.data(), 1);
  double* own = detail::held_alone(av) ? av.mutable_data() : nullptr;
  out.residual = detail::residual(av.data(), own, out.value, v.data(), n);
  out.vector = v;
  out.products = op.products() - products_before;
  return out;
}

}  // namespace hesse
