#pragma once
// Hessians of models and losses with respect to a model's parameters
// (layer 5 of DESIGN.md), in the vocabulary of the Python hesse library.
//
// Conventions (shared with PyTorch): parameters are concatenated in
// registration order, each flattened row-major; block (P, Q) of a dict has
// shape output.shape + P.shape + Q.shape; a model Hessian matrix has shape
// output.shape + [n, n]; a loss Hessian is [n, n].
//
// How: the gradient is taken once with create_graph, then k rows of the
// identity go through its graph in one batched backward pass (BLAS-sized
// matrix products), chunk after chunk.
#include <cstddef>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "hesse/nn/module.hpp"
#include "hesse/tensor.hpp"

namespace hesse {

/// A loss: (model output, target) -> scalar tensor. Every hesse::nn loss fits.
using Criterion = std::function<Tensor(const Tensor& output, const Tensor& target)>;

struct HessianOptions {
  /// Parameters to differentiate by, by dotted name; empty = every trainable one.
  std::vector<std::string> params;
  /// Only the (P, P) blocks; the work for the other blocks is not done.
  bool diagonal_only = false;
  /// The leading dimension of every input is a batch: each sample is evaluated
  /// on its own and gets its own Hessian (as with vmap in the Python library).
  /// Model requests only (model Hessians, their sharpness, bounds, structure,
  /// plans and storage forms): a loss is one scalar over the batch
  /// (batch_loss_hessian_matrix gives each sample's).
  bool is_batch = true;
  /// Seeds pushed through one batched backward pass (0 = choose).
  std::size_t chunk_size = 0;
  /// Refuse, before allocating, a dense result larger than this (0 = the global
  /// default, see set_hessian_memory_limit).
  std::size_t max_bytes = 0;
  /// Long requests report their progress on stderr when it is a terminal: the
  /// rows of one Hessian, or the samples done of a batch.
  bool progress = true;
  /// Sharpness only: when the dense Hessians would exceed the limit, use
  /// matrix-free Lanczos instead (and say so through the notice handler).
  bool matrix_free_fallback = true;
};

/// Receives hesse's notes about choices it made for the user (a switch to a
/// matrix-free route); the default prints the line on stderr.
using NoticeHandler = std::function<void(const std::string& text)>;
/// Installs `handler` (empty = silence) and returns the previous one.
NoticeHandler set_notice_handler(NoticeHandler handler);

/// The default limit for dense results (4 GiB unless changed).
void set_hessian_memory_limit(std::size_t bytes);
std::size_t hessian_memory_limit();

/// Threads that dense Hessians spread their work over: per-sample Hessians
/// (model_hessian_matrix and model_hessian_dict with is_batch,
/// batch_loss_hessian_matrix) their samples, loss_hessian_matrix and
/// loss_hessian_dict their chunks of rows. 0, the default, means one per core
/// this process may run on, once the work left after the first sample or
/// chunk would take long enough on one thread to pay for starting others
/// (0.2 ms of samples, 2 ms of rows); a count set here is always used, and 1
/// keeps all work on the calling thread.
/// - The model always runs on the calling thread. A helper computing rows
///   gets its own copy of the loss's graph from one more forward pass (in
///   eval mode; a model that draws random numbers in forward would differ
///   between copies). Samples kept for helpers hold at most 16 MB of graphs.
/// - A backward pass writes into the nodes it runs through, so work whose
///   graphs share nodes (inputs with a history, tensors a model keeps
///   between calls) stays on the calling thread.
/// - While helpers run, OpenBLAS runs on one thread. This is OpenBLAS's
///   process-wide setting: BLAS calls elsewhere in the program meanwhile run
///   on one thread too. Results agree with one thread's to rounding
///   (OpenBLAS's products may round differently on one thread than on several).
void set_num_threads(std::size_t threads);
/// The threads Hessians may use (set_num_threads, 0 resolved).
std::size_t num_threads();

/// Blocks keyed by parameter-name pairs, in registration order.
class HessianDict {
 public:
  /// The selected parameter names, in order.
  const std::vector<std::string>& names() const { return names_; }
  /// Block (P, Q); a hesse::ValueError names a missing pair.
  const Tensor& at(const std::string& p, const std::string& q) const;
  const Tensor& operator()(const std::string& p, const std::string& q) const { return at(p, q); }
  bool contains(const std::string& p, const std::string& q) const { return blocks_.count({p, q}) > 0; }
  const std::map<std::pair<std::string, std::string>, Tensor>& blocks() const { return blocks_; }
  /// Writes `<P>__<Q>.npy` for every block into `folder`.
  void save(const std::string& folder) const;

  std::vector<std::string> names_;
  std::map<std::pair<std::string, std::string>, Tensor> blocks_;
};

// ---- model Hessians: d²model(inputs) / dθ² for every output entry ----
HessianDict model_hessian_dict(nn::Module& model, const std::vector<Tensor>& inputs,
                               const HessianOptions& options = {});
Tensor model_hessian_matrix(nn::Module& model, const std::vector<Tensor>& inputs,
                            const HessianOptions& options = {});

// ---- loss Hessians: d² criterion(model(inputs), target) / dθ² ----
HessianDict loss_hessian_dict(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                              const Tensor& target, const HessianOptions& options = {});
Tensor loss_hessian_matrix(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                           const Tensor& target, const HessianOptions& options = {});
/// [B, n, n]: the Hessian of each sample's loss criterion(model(x_b), y_b).
Tensor batch_loss_hessian_matrix(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                                 const Tensor& target, const HessianOptions& options = {});

// ---- sharpness: the largest |eigenvalue| of each Hessian ----
// From the dense Hessian by LAPACK dsyevr; past the memory limit, from the
// Hessian operator by Lanczos (curvature.hpp), with a notice.
/// One value per output entry: shape output.shape.
Tensor model_sharpness(nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& options = {});
/// A scalar (a [B] vector with batch_loss_sharpness).
double loss_sharpness(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                      const Tensor& target, const HessianOptions& options = {});
Tensor batch_loss_sharpness(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                            const Tensor& target, const HessianOptions& options = {});

// ---- matrix-free ----
/// H v for the loss Hessian, v of shape [n] (or [k, n]: k products in one pass);
/// with diagonal_only, the product with its block-diagonal part (the (P, P) blocks).
Tensor hessian_vector_product(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                              const Tensor& target, const Tensor& v, const HessianOptions& options = {});
/// The exact diagonal of the loss Hessian, [n].
Tensor loss_hessian_diagonal(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                             const Tensor& target, const HessianOptions& options = {});

/// The largest |eigenvalue| of a symmetric matrix [n, n] (or of each matrix in [..., n, n]),
/// taken of (A + Aᵀ)/2, so that round-off between the triangles averages out; NaN for a
/// matrix with a NaN or infinite entry (a loss that is not finite there), 0 when n = 0.
/// (The matrix-free route of the sharpness functions throws on a non-finite Hessian.)
Tensor symmetric_sharpness(const Tensor& matrices);

}  // namespace hesse
