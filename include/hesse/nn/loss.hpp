#pragma once
// Losses with PyTorch's definitions and reductions. Each is composed of
// differentiable hesse ops, so a loss differentiates to any order (the loss
// Hessians of layer 5 are built on that). Each comes as a free function
// (mse_loss, cross_entropy, ...) and as a small callable class (MSELoss, ...).
#include <cstdint>
#include <functional>

#include "hesse/tensor.hpp"

namespace hesse::nn {

/// How per-element losses are combined: kept, summed, or averaged (default).
enum class Reduction { none, sum, mean };

/// Anything that maps (output, target) to a loss tensor: a loss class, a
/// lambda, a free function bound to its options.
using Loss = std::function<Tensor(const Tensor& output, const Tensor& target)>;

// ---- regression ----

/// (x - y)²; input and target of the same shape.
Tensor mse_loss(const Tensor& input, const Tensor& target, Reduction reduction = Reduction::mean);

struct HuberOptions {
  Reduction reduction = Reduction::mean;
  /// Where the loss turns from quadratic to linear (> 0).
  double delta = 1.0;
};
/// ½ d² where |d| < δ, else δ (|d| - ½ δ), with d = x - y.
Tensor huber_loss(const Tensor& input, const Tensor& target, const HuberOptions& options = {});

struct GaussianNLLOptions {
  Reduction reduction = Reduction::mean;
  /// Adds the constant ½ log 2π.
  bool full = false;
  /// var is clamped to at least eps in value; its gradient passes unchanged (as in PyTorch).
  double eps = 1e-6;
};
/// ½ (log var + (x - y)² / var) [+ ½ log 2π]. var has the input's shape, or
/// the input's shape without its last dimension, or with a last dimension of 1
/// (one variance shared by the last axis); var >= 0.
Tensor gaussian_nll_loss(const Tensor& input, const Tensor& target, const Tensor& var,
                         const GaussianNLLOptions& options = {});

// ---- classification ----

struct NLLOptions {
  Reduction reduction = Reduction::mean;
  /// Per-class weights [C]; undefined for all ones.
  Tensor weight = Tensor();
  /// Targets equal to this are skipped (and not counted by the mean).
  std::int64_t ignore_index = -100;
};
/// -w[y] logp[y] for log-probabilities logp [N, C] (or [C], or [N, C, d...])
/// and class indices y [N] (or [], or [N, d...]) stored as integral doubles.
/// The mean divides by Σ w[y] over the samples not ignored.
Tensor nll_loss(const Tensor& input, const Tensor& target, const NLLOptions& options = {});

struct CrossEntropyOptions {
  Reduction reduction = Reduction::mean;
  /// Mixes the target with the uniform distribution: (1 - ε) y + ε / C.
  double label_smoothing = 0.0;
  /// Per-class weights [C]; undefined for all ones.
  Tensor weight = Tensor();
  /// Class-index targets equal to this are skipped.
  std::int64_t ignore_index = -100;
  /// Probability targets must be non-negative with rows summing to 1 (within 1e-6).
  bool check_distribution = true;
};
/// Cross-entropy of logits x [N, C] (or [C], or [N, C, d...]) against either
/// class indices (shape [N], [] or [N, d...], integral doubles):
///   -w[y] log_softmax(x)[y]
/// or probabilities of the logits' shape:
///   -Σ_c w[c] y[c] log_softmax(x)[c]   (the mean divides by N·d...).
Tensor cross_entropy(const Tensor& input, const Tensor& target, const CrossEntropyOptions& options = {});

struct BCEWithLogitsOptions {
  Reduction reduction = Reduction::mean;
  /// Weight of the positive term, broadcast against the input (e.g. [C]).
  Tensor pos_weight = Tensor();
  /// Per-element weight, broadcast against the input.
  Tensor weight = Tensor();
};
/// Binary cross-entropy of logits x and targets y in [0, 1], in the stable form
///   max(x, 0) - x y + log(1 + e^-|x|) = softplus(x) - x y,
/// and with pos_weight p:  (1 - y) x + (1 + (p - 1) y) softplus(-x).
Tensor binary_cross_entropy_with_logits(const Tensor& input, const Tensor& target,
                                        const BCEWithLogitsOptions& options = {});

// ---- the same as callables ----

class MSELoss {
 public:
  explicit MSELoss(Reduction reduction = Reduction::mean) : reduction_(reduction) {}
  Tensor operator()(const Tensor& input, const Tensor& target) const { return mse_loss(input, target, reduction_); }

 private:
  Reduction reduction_;
};

class HuberLoss {
 public:
  explicit HuberLoss(HuberOptions options = {}) : options_(options) {}
  Tensor operator()(const Tensor& input, const Tensor& target) const { return huber_loss(input, target, options_); }

 private:
  HuberOptions options_;
};

class GaussianNLLLoss {
 public:
  explicit GaussianNLLLoss(GaussianNLLOptions options = {}) : options_(options) {}
  Tensor operator()(const Tensor& input, const Tensor& target, const Tensor& var) const {
    return gaussian_nll_loss(input, target, var, options_);
  }

 private:
  GaussianNLLOptions options_;
};

class NLLLoss {
 public:
  explicit NLLLoss(NLLOptions options = {}) : options_(std::move(options)) {}
  Tensor operator()(const Tensor& input, const Tensor& target) const { return nll_loss(input, target, options_); }

 private:
  NLLOptions options_;
};

class CrossEntropyLoss {
 public:
  explicit CrossEntropyLoss(CrossEntropyOptions options = {}) : options_(std::move(options)) {}
  Tensor operator()(const Tensor& input, const Tensor& target) const {
    return cross_entropy(input, target, options_);
  }

 private:
  CrossEntropyOptions options_;
};

class BCEWithLogitsLoss {
 public:
  explicit BCEWithLogitsLoss(BCEWithLogitsOptions options = {}) : options_(std::move(options)) {}
  Tensor operator()(const Tensor& input, const Tensor& target) const {
    return binary_cross_entropy_with_logits(input, target, options_);
  }

 private:
  BCEWithLogitsOptions options_;
};

}  // namespace hesse::nn
