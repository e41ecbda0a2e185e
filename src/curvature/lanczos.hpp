#pragma once
// Block Lanczos with full reorthogonalisation, shared by lanczos() and by
// spectral_density() (stochastic Lanczos quadrature is Lanczos whose
// quadrature weights are the squared first components of T's eigenvectors).
#include <cstddef>
#include <vector>

#include "hesse/curvature.hpp"

namespace hesse::detail {

/// Eigenvalues (ascending) and eigenvectors of a symmetric m × m matrix;
/// eigenvector j is vectors[j m, (j + 1) m).
struct SymmetricEigen {
  std::size_t m = 0;
  std::vector<double> values;
  std::vector<double> vectors;
  const double* vector(std::size_t j) const { return vectors.data() + j * m; }
};
/// LAPACK dsyevr on the m × m block at `a` (leading dimension lda, symmetric).
SymmetricEigen symmetric_eigen(const double* a, std::size_t m, std::size_t lda);

/// The Euclidean norm of x [n].
double norm(const double* x, std::size_t n);

/// `count` Rademacher signs ±1, 64 per draw of the generator.
void fill_rademacher(Generator& gen, double* out, std::size_t count);
/// `count` values uniform in [-1, 1), from one draw of the generator. Start
/// vectors of eigensolvers use them: random signs are orthogonal to vectors
/// such as e₁ - e₂ with probability 1/2, and Lanczos would then miss their
/// eigenvalues (or a repeated eigenvalue's copies on restart), without a sign.
void fill_uniform(Generator& gen, double* out, std::size_t count);

/// An orthonormal Krylov basis V (one vector per row) of a symmetric operator A
/// and the projection T = V A Vᵀ, grown one block at a time:
///
///   A V_j = L_{j-1}ᵀ V_{j-1} + T_jj V_j + L_j V_{j+1}   (V_j: the rows of block j)
///
/// so T is block tridiagonal with T_{j,j+1} = L_j.
///
/// Each product block is orthogonalised twice against the whole basis with
/// GEMMs ("twice is enough"), so V stays orthonormal to rounding and T stays
/// the projection. Rows of a new block whose residual vanishes are dropped,
/// and, when restarts are allowed, replaced by random vectors orthogonal to
/// the basis; when a whole block vanishes the basis spans an invariant
/// subspace and T splits into decoupled diagonal blocks ("segments").
class KrylovBasis {
 public:
  /// At most `capacity` (≤ n) vectors, blocks of at most `block_size` rows;
  /// `always_full`: reorthogonalise against the whole basis at every step.
  KrylovBasis(const LinearOperator& op, std::size_t capacity, std::size_t block_size, Generator& gen,
              bool restart, bool always_full = false);

  /// Starts over from `count` rows [count, n] (orthonormalised here).
  void start(const double* rows, std::size_t count);
  /// Starts over from block_size rows of random signs.
  void start_random();
  /// Multiplies the newest block by A, extends T and forms the next block.
  void step();

  std::size_t n() const { return n_; }
  /// Vectors multiplied so far; T is size() × size().
  std::size_t size() const { return m_; }
  /// Whether step() can run again (a next block exists and fits).
  bool can_grow() const { return next_ > 0; }
  /// Steps that reorthogonalised against the whole basis.
  std::size_t full_passes() const { return full_passes_; }
  /// The last step found an invariant subspace (its whole residual vanished).
  bool broke_down() const { return broke_; }
  /// First row of every decoupled diagonal block of T; the last one is growing.
  const std::vector<std::size_t>& segments() const { return segments_; }
  /// T(i, j) lives at t()[i * ldt() + j].
  const double* t() const { return t_.data(); }
  std::size_t ldt() const { return capacity_; }
  /// Basis vector i, [n].
  const double* row(std::size_t i) const { return v_.data() + i * n_; }
  /// Rows [last_block_start(), size()) were multiplied last.
  std::size_t last_block_start() const { return last_start_; }
  /// ‖A V y − θ V y‖ for a Ritz pair (θ, y) of T: ‖L yₗ‖ with yₗ the entries
  /// of y on the last multiplied block (the Lanczos residual estimate).
  double residual_estimate(const double* y_last) const;

 private:
  double* row_mut(std::size_t i) { return v_.mutable_data() + i * n_; }
  /// Orthonormalises rows [m_, m_ + count) in place against the basis and each
  /// other; returns how many rows survive (compacted to the front), filling
  /// L_ (count × count) with the coefficients of the surviving rows.
  std::size_t orthonormalize_block(std::size_t count, double threshold);
  /// Whether the residual of vector j (T_jj = alpha, norm beta after the local
  /// pass) needs a pass against the whole basis (partial reorthogonalisation).
  bool needs_full_pass(std::size_t j, double alpha, double beta);
  /// Writes a random unit vector orthogonal to rows [0, r) into row r;
  /// false when none exists (r = n).
  bool random_row(std::size_t r);

  LinearOperator op_;
  std::size_t n_, capacity_, block_;
  Generator& gen_;
  bool restart_, always_full_;
  Tensor v_;                  // [capacity + block, n]: basis, then the block being formed
  std::vector<double> t_;     // [capacity, capacity], row-major
  std::vector<double> l_;     // [block, block]: L of the last block (row a: block row, column b: next row)
  std::vector<double> coef_, coef2_;  // Gram-Schmidt coefficients, [capacity, block]
  std::vector<std::size_t> segments_;
  std::size_t m_ = 0, next_ = 0, last_start_ = 0, last_size_ = 0;
  double anorm_ = 0;          // largest ‖A v‖ seen: the scale for "vanished"
  std::vector<double> omega_, omega_previous_;  // estimated v_j · v_k and v_{j-1} · v_k
  int force_full_ = 0;        // full passes owed to the next vectors
  std::size_t full_passes_ = 0;
  bool broke_ = false;
};

}  // namespace hesse::detail
