#pragma once
// Curvature beyond the dense Hessian (layer 5 of DESIGN.md): matrix-free
// operators (Hessian, generalized Gauss-Newton, empirical Fisher), spectra by
// Lanczos, traces and diagonals by Hutchinson / Hutch++, spectral densities by
// stochastic Lanczos quadrature, certified bounds on sharpness from the
// diagonal blocks, symmetric packed and block-sparse storage with structural
// zeros found on the tape, a planner, and third-order directional derivatives.
//
// Vectors follow the Hessian conventions (hessian.hpp): θ is the selected
// parameters concatenated in registration order, each flattened row-major.
// A block of k vectors is a [k, n] tensor, one vector per row; operators apply
// to a whole block in one batched pass.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hesse/hessian.hpp"
#include "hesse/nn/data.hpp"
#include "hesse/nn/module.hpp"
#include "hesse/tensor.hpp"

namespace hesse {

// ============================================================================
// Linear operators
// ============================================================================

/// A symmetric linear operator on R^n, applied to blocks of vectors. Cheap to
/// copy (copies share the operator and its product counter).
class LinearOperator {
 public:
  /// V [k, n] -> A V [k, n], row by row, k >= 1.
  using BlockApply = std::function<Tensor(const Tensor& block)>;

  LinearOperator() = default;
  LinearOperator(std::size_t n, BlockApply apply, std::string name = "operator");

  std::size_t size() const;
  const std::string& name() const;
  /// A v for v of shape [n], or A applied to every row of V [k, n].
  Tensor operator()(const Tensor& v) const;
  /// Matrix-vector products applied so far (a block of k counts k).
  std::size_t products() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

/// The operator of a dense symmetric matrix [n, n].
LinearOperator matrix_operator(const Tensor& matrix);
/// The dense matrix of an operator, from n products in blocks of `block` rows.
Tensor to_dense(const LinearOperator& op, std::size_t block = 64);

// ============================================================================
// Curvature operators of a model and a loss
// ============================================================================

// An operator holds the model by reference (it must outlive the operator),
// and its batches and their recorded graphs by value. Each product checks the
// parameters against the values the graphs were recorded at and records them
// again when they changed (an optimiser step, Module::load), so a product
// always sees the current parameters.

/// One mini-batch of a dataset (a model may take several inputs).
struct Batch {
  std::vector<Tensor> inputs;
  Tensor target;
};

/// The batches of one epoch of a DataLoader, in its order (x as the only input).
std::vector<Batch> batches_of(const nn::DataLoader& loader, std::size_t epoch = 0);

struct OperatorOptions {
  /// Parameters to differentiate by, by dotted name; empty = every trainable one.
  std::vector<std::string> params;
  /// Only the (P, P) blocks: the block-diagonal part of the matrix.
  bool block_diagonal = false;
  /// Keep each batch's gradient graph between products (fast: a product is one
  /// backward pass). When false every product reruns the forward pass and the
  /// gradient, and memory stays at one graph whatever the number of batches.
  bool keep_graph = true;
  /// Over a dataset of batches: true gives Σ_b (B_b / N) M_b, the matrix of the
  /// mean loss over all N samples when the criterion's reduction is mean;
  /// false gives Σ_b M_b (reduction sum).
  bool dataset_mean = true;
};

/// The loss Hessian ∇²_θ criterion(model(inputs), target) as an operator.
LinearOperator loss_hessian_operator(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                                     const Tensor& target, const OperatorOptions& options = {});
/// The same over a dataset, accumulated batch by batch in order (deterministic).
LinearOperator loss_hessian_operator(nn::Module& model, const Criterion& criterion, const std::vector<Batch>& data,
                                     const OperatorOptions& options = {});

/// ∇²_θ Σ_e weights_e · y_e for y = model(inputs): the Hessian of the output
/// contracted with `weights` (of the output's shape; a one-hot picks one entry).
LinearOperator model_hessian_operator(nn::Module& model, const std::vector<Tensor>& inputs, const Tensor& weights,
                                      const OperatorOptions& options = {});

/// The generalized Gauss-Newton matrix Jᵀ (∇²_z ℓ) J, with z = model(inputs),
/// J = ∂z/∂θ and ℓ = criterion(z, target). Positive semi-definite for convex losses.
LinearOperator ggn_operator(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                            const Tensor& target, const OperatorOptions& options = {});
LinearOperator ggn_operator(nn::Module& model, const Criterion& criterion, const std::vector<Batch>& data,
                            const OperatorOptions& options = {});

/// The empirical Fisher (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ (Σ_n without dataset_mean), where
/// ℓ_n = criterion(model(x_n), y_n) is the loss of sample n alone.
LinearOperator empirical_fisher_operator(nn::Module& model, const Criterion& criterion,
                                         const std::vector<Tensor>& inputs, const Tensor& target,
                                         const OperatorOptions& options = {});
LinearOperator empirical_fisher_operator(nn::Module& model, const Criterion& criterion, const std::vector<Batch>& data,
                                         const OperatorOptions& options = {});

/// ∇³L[v, v] = ∇_θ (vᵀ ∇²L(θ) v), shape [n] (v: [n]). For a unit eigenvector v
/// of eigenvalue λ this is ∇λ, the gradient of the eigenvalue.
Tensor third_order_directional(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                               const Tensor& target, const Tensor& v, const OperatorOptions& options = {});

// ============================================================================
// Spectra
// ============================================================================

/// Which end of the spectrum.
enum class Which {
  largest,            ///< algebraically largest first
  smallest,           ///< algebraically smallest first
  largest_magnitude,  ///< largest |λ| first
};

struct LanczosOptions {
  /// Eigenpairs wanted.
  std::size_t k = 1;
  Which which = Which::largest;
  /// Vectors per block (block Lanczos); 1 is plain Lanczos.
  std::size_t block_size = 1;
  /// Products at most (the Krylov basis holds this many vectors: 8 n bytes each);
  /// 0 = min(n, max(40 k, 200)).
  /// The k products that measure the residuals at the end come on top.
  std::size_t max_products = 0;
  /// Reorthogonalise every new vector against the whole basis. By default,
  /// with block_size 1, that pass is made only when Simon's recurrence says
  /// orthogonality is about to be lost (partial reorthogonalisation: the same
  /// eigenvalues to rounding, far less memory traffic at large n); blocks
  /// larger than 1 are always reorthogonalised fully.
  bool full_reorthogonalization = false;
  /// Converged when ‖A v − λ v‖ ≤ tolerance · max |λ| for every wanted pair.
  double tolerance = 1e-10;
  std::uint64_t seed = 0;
  /// A progress line on stderr when it is a terminal.
  bool progress = true;
};

struct Eigenpairs {
  Tensor values;     ///< [k], in the order asked for
  Tensor vectors;    ///< [k, n], orthonormal rows
  Tensor residuals;  ///< [k], ‖A v − λ v‖ measured with true products
  std::size_t products = 0;
  bool converged = false;
};

/// Extreme eigenpairs of a symmetric operator by (block) Lanczos, the basis kept
/// orthogonal to rounding (see full_reorthogonalization); residuals are
/// measured, not estimated. When the Krylov
/// space becomes invariant (few distinct eigenvalues, low rank) Lanczos restarts
/// from a random vector orthogonal to it, until a restart finds nothing beyond
/// the k-th value, so repeated eigenvalues come out with their multiplicity.
/// Not converging within max_products is reported (converged = false), not thrown.
/// Same seed, same bits, for a given OpenBLAS thread count (long vectors'
/// dot products are split over its threads).
Eigenpairs lanczos(const LinearOperator& op, const LanczosOptions& options = {});

struct PowerIteration {
  double value = 0;  ///< the Rayleigh quotient of the last iterate
  Tensor vector;     ///< [n], unit norm
  double residual = 0;
  std::size_t products = 0;
};
/// `steps` power-iteration steps from a seeded random start: the eigenvalue of
/// largest magnitude (what the PyTorch anchor measures).
PowerIteration power_iteration(const LinearOperator& op, std::size_t steps, std::uint64_t seed = 0);

// ============================================================================
// Traces and diagonals
// ============================================================================

struct EstimatorOptions {
  /// Random probe vectors (Rademacher); Hutch++ splits them in thirds.
  std::size_t probes = 100;
  /// Probes per batched product; 0 chooses (up to 16 for small n, 1 for large n).
  std::size_t block_size = 0;
  std::uint64_t seed = 0;
  bool progress = true;
};

struct TraceEstimate {
  double value = 0;
  double standard_error = 0;  ///< of the estimate (sample standard deviation / √probes)
  std::size_t products = 0;
};
TraceEstimate hutchinson_trace(const LinearOperator& op, const EstimatorOptions& options = {});
/// Hutch++: the trace of a rank-(probes/3) sketch, exact, plus Hutchinson on the rest.
/// The standard error is that of the Hutchinson part (NaN with a single remaining
/// probe, probes = 3); when probes/3 ≥ n the result is exact and the error 0.
TraceEstimate hutchpp_trace(const LinearOperator& op, const EstimatorOptions& options = {});

struct DiagonalEstimate {
  Tensor value;           ///< [n]
  Tensor standard_error;  ///< [n]
  std::size_t products = 0;
};
/// Hutchinson's diagonal estimate E[z ⊙ A z].
DiagonalEstimate hutchinson_diagonal(const LinearOperator& op, const EstimatorOptions& options = {});
/// The exact diagonal from n products (for a loss Hessian, loss_hessian_diagonal
/// is cheaper: it only walks the (P, P) blocks).
Tensor exact_diagonal(const LinearOperator& op, std::size_t block = 64);

// ============================================================================
// Spectral density (stochastic Lanczos quadrature)
// ============================================================================

struct DensityOptions {
  /// Random starting vectors; each gives one Gauss quadrature.
  std::size_t probes = 10;
  /// Lanczos steps per probe (quadrature nodes).
  std::size_t nodes = 50;
  /// Points of the output grid.
  std::size_t grid_points = 1000;
  /// Gaussian broadening, as a fraction of the spectral range: σ = sigma · (largest
  /// node − smallest node), or sigma · max|node| when all nodes coincide.
  double sigma = 0.01;
  std::uint64_t seed = 0;
  bool progress = true;
};

struct SpectralDensity {
  Tensor grid;     ///< [grid_points], from 5σ below the smallest node to 5σ above the largest
  Tensor density;  ///< [grid_points], integrates to about 1
  /// [probes, nodes]: Ritz values, ascending. A probe whose Krylov space became
  /// invariant early (or n < nodes) has fewer: its row is padded with its last
  /// node at weight 0.
  Tensor nodes;
  Tensor weights;  ///< [probes, nodes]: quadrature weights (each row sums to 1)
  std::size_t products = 0;
  /// "eigenvalue,density" lines with a header.
  void save_csv(const std::string& path) const;
};
/// φ(x) = (1/probes) Σ_p Σ_j w_pj N(x; θ_pj, σ²): per probe (a normalised
/// Rademacher vector) `nodes` Lanczos steps give the Gauss quadrature nodes θ
/// and weights w (Ubaru, Chen & Saad 2017), broadened by Gaussians.
SpectralDensity spectral_density(const LinearOperator& op, const DensityOptions& options = {});

// ============================================================================
// Sharpness bounds from the diagonal blocks
// ============================================================================

/// The sharpness ‖H‖₂ of the block-diagonal part D of H (the diagonal_only
/// Hessian) and a certified interval for the true sharpness: pinching never
/// raises the norm, so ‖D‖₂ ≤ ‖H‖₂, and ‖H‖₂ ≤ ‖D‖₂ + ‖N‖₂ where N holds the
/// Frobenius norms of the off-diagonal blocks (‖O‖₂ ≤ ‖N‖₂).
struct SharpnessBounds {
  double block_diagonal = 0;  ///< ‖D‖₂, the diagonal_only sharpness
  double lower = 0;           ///< ≤ ‖H‖₂
  double upper = 0;           ///< ≥ ‖H‖₂
  Tensor block_norms;         ///< [P, P]: Frobenius norm of every block
  std::vector<std::string> names;
};
/// Streams the off-diagonal blocks (never stored): memory of the diagonal blocks only.
SharpnessBounds loss_sharpness_bounds(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                                      const Tensor& target, const HessianOptions& options = {});
/// One interval per output entry, in row-major order of the output.
std::vector<SharpnessBounds> model_sharpness_bounds(nn::Module& model, const std::vector<Tensor>& inputs,
                                                    const HessianOptions& options = {});

// ============================================================================
// Structure and sparse storage
// ============================================================================

/// Which parameter-pair blocks can be nonzero, found on the tape: block (P, Q)
/// is structurally zero when the gradient with respect to P never depends on Q.
struct HessianStructure {
  std::vector<std::string> names;
  std::vector<bool> nonzero_blocks;  ///< P × P, row-major
  bool nonzero(const std::string& p, const std::string& q) const;
  bool nonzero(std::size_t p, std::size_t q) const;
  /// A small table of the pattern.
  std::string str() const;
};
HessianStructure loss_hessian_structure(nn::Module& model, const Criterion& criterion,
                                        const std::vector<Tensor>& inputs, const Tensor& target,
                                        const HessianOptions& options = {});
/// The union over every output entry.
HessianStructure model_hessian_structure(nn::Module& model, const std::vector<Tensor>& inputs,
                                         const HessianOptions& options = {});

/// The upper triangle of symmetric matrices, row-major packed: n (n + 1) / 2
/// values per matrix, for each of `count` matrices (output entries).
class PackedHessian {
 public:
  PackedHessian() = default;
  PackedHessian(std::size_t n, std::size_t count);
  std::size_t n() const { return n_; }
  std::size_t count() const { return count_; }
  double at(std::size_t i, std::size_t j, std::size_t entry = 0) const;
  double& at(std::size_t i, std::size_t j, std::size_t entry = 0);
  /// [n, n], or [count, n, n] when count > 1.
  Tensor dense() const;
  std::size_t bytes() const { return values_.size() * sizeof(double); }
  const std::vector<double>& values() const { return values_; }

 private:
  std::size_t n_ = 0, count_ = 0;
  std::vector<double> values_;
};

/// The nonzero blocks (P, Q) with P ≤ Q only; structurally zero blocks are
/// neither computed nor stored. Blocks have shape lead + P.shape + Q.shape.
class BlockSparseHessian {
 public:
  std::vector<std::string> names;
  std::vector<Shape> shapes;
  Shape lead;  ///< output shape for model Hessians, [] for a loss
  std::map<std::pair<std::size_t, std::size_t>, Tensor> blocks;  ///< p <= q
  bool diagonal_only = false;  ///< computed with diagonal_only: (P, Q ≠ P) is unknown, not zero

  /// Block (P, Q) for any pair (a transpose for P > Q, zeros when absent).
  Tensor block(const std::string& p, const std::string& q) const;
  /// lead + [n, n] (the off-diagonal blocks zero with diagonal_only).
  Tensor dense() const;
  /// As loss_hessian_dict / model_hessian_dict give it: every pair, or only
  /// the (P, P) blocks with diagonal_only.
  HessianDict dict() const;
  std::size_t bytes() const;
};

PackedHessian loss_hessian_packed(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                                  const Tensor& target, const HessianOptions& options = {});
PackedHessian model_hessian_packed(nn::Module& model, const std::vector<Tensor>& inputs,
                                   const HessianOptions& options = {});
BlockSparseHessian loss_hessian_block_sparse(nn::Module& model, const Criterion& criterion,
                                             const std::vector<Tensor>& inputs, const Tensor& target,
                                             const HessianOptions& options = {});
BlockSparseHessian model_hessian_block_sparse(nn::Module& model, const std::vector<Tensor>& inputs,
                                              const HessianOptions& options = {});

// ============================================================================
// Planner
// ============================================================================

enum class Storage { dense, diagonal_only, packed, block_sparse };

/// What a Hessian request will cost, before it runs.
struct HessianPlan {
  std::string request;            ///< e.g. "loss_hessian_matrix (dense)"
  Storage storage = Storage::dense;
  bool diagonal_only = false;     ///< only the (P, P) blocks are computed
  std::size_t n = 0;              ///< selected parameters
  std::size_t matrices = 0;       ///< Hessians in the result (output entries)
  std::size_t result_bytes = 0;   ///< the result itself
  std::size_t working_bytes = 0;  ///< graphs and seed blocks at the chosen chunk size
  std::size_t products = 0;       ///< Hessian-vector products (seeds) the request pushes
  std::size_t chunk_size = 0;     ///< seeds per backward pass for the budget
  std::size_t budget = 0;         ///< the budget planned for
  bool fits = false;
  /// A readable summary of the above.
  std::string str() const;
  /// Throws a MemoryLimitError saying what does not fit and what would.
  void require() const;
  /// Options that run the request as planned (chunk_size, max_bytes, diagonal_only).
  HessianOptions options(HessianOptions base = {}) const;
};
HessianPlan plan_loss_hessian(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                              const Tensor& target, Storage storage, std::size_t budget_bytes,
                              const HessianOptions& options = {});
HessianPlan plan_model_hessian(nn::Module& model, const std::vector<Tensor>& inputs, Storage storage,
                               std::size_t budget_bytes, const HessianOptions& options = {});

}  // namespace hesse
