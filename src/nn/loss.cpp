// Losses, each as PyTorch defines it (torch.nn.functional), composed of
// differentiable ops so that gradients of any order come from the tape. What
// is not differentiated (class indices, masks, class weights) enters as a
// constant tensor.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "hesse/nn/loss.hpp"
#include "hesse/ops.hpp"
#include "../detail.hpp"

namespace hesse::nn {
namespace {

using detail::message;

Tensor reduce(const Tensor& loss, Reduction reduction) {
  switch (reduction) {
    case Reduction::none: return loss;
    case Reduction::sum: return sum(loss);
    case Reduction::mean: return mean(loss);
  }
  return loss;
}

void check_defined(const char* op, const Tensor& input, const Tensor& target) {
  if (!input.defined() || !target.defined())
    throw ValueError(message(op, "the ", input.defined() ? "target" : "input", " is undefined"));
}

void check_same_shape(const char* op, const Tensor& input, const Tensor& target) {
  check_defined(op, input, target);
  if (input.shape() != target.shape())
    throw ShapeError(message(op, "target of shape ", to_string(target.shape()), " does not match input of shape ",
                             to_string(input.shape())));
}

// A tensor that must broadcast to the input's shape without changing it.
void check_broadcasts_to(const char* op, const char* what, const Tensor& t, const Shape& shape) {
  bool fits = t.ndim() <= shape.size();
  for (std::size_t k = 0; fits && k < t.ndim(); ++k) {
    const std::size_t a = t.shape()[t.ndim() - 1 - k], b = shape[shape.size() - 1 - k];
    fits = a == b || a == 1;
  }
  if (!fits)
    throw ShapeError(message(op, what, " of shape ", to_string(t.shape()), " does not broadcast to input of shape ",
                             to_string(shape)));
}

Tensor filled(const Shape& shape, const std::vector<double>& values) {
  Tensor t = Tensor::empty(shape);
  std::copy(values.begin(), values.end(), t.mutable_data());
  return t;
}

// ---- class-index targets, shared by nll_loss and cross_entropy ----

// Input [N, C, d...] (a 1-D input [C] is seen as [1, C]); targets [N, d...].
struct ClassTargets {
  Tensor index;          // [N, 1, d...]: the target class, 0 where ignored (for gather)
  Tensor sample_weight;  // [N, d...]: w[y], 0 where ignored
  double weight_sum = 0; // Σ sample_weight: the mean's denominator
  std::size_t counted = 0;  // targets not ignored
  bool trivial = true;   // no class weights and nothing ignored (sample_weight is all ones)
};

ClassTargets class_targets(const char* op, const Tensor& input, const Tensor& target, const Tensor& weight,
                           std::int64_t ignore_index) {
  const std::size_t C = input.shape()[1];
  if (weight.defined() && (weight.ndim() != 1 || weight.shape()[0] != C))
    throw ShapeError(message(op, "weight of shape ", to_string(weight.shape()), " does not fit ", C,
                             " classes (input of shape ", to_string(input.shape()), ")"));
  Shape index_shape = input.shape();
  index_shape[1] = 1;
  std::vector<double> index(target.numel()), w(target.numel());
  ClassTargets out;
  out.trivial = !weight.defined();
  const double* y = target.data();
  for (std::size_t i = 0; i < target.numel(); ++i) {
    const double v = y[i];
    if (v != std::floor(v))
      throw ValueError(message(op, "target ", v, " at position ", i, " is not an integral class index (target of shape ",
                               to_string(target.shape()), ")"));
    if (v == double(ignore_index)) {
      index[i] = 0.0, w[i] = 0.0, out.trivial = false;
      continue;
    }
    if (v < 0 || v >= double(C))
      throw IndexError(message(op, "target ", v, " at position ", i, " is out of range for ", C,
                               " classes (input of shape ", to_string(input.shape()), ", target of shape ",
                               to_string(target.shape()), ")"));
    index[i] = v;
    w[i] = weight.defined() ? weight.data()[std::size_t(v)] : 1.0;
    out.weight_sum += w[i];
    ++out.counted;
  }
  out.index = filled(index_shape, index);
  out.sample_weight = filled(target.shape(), w);
  return out;
}

// Input and target with a batch axis in front: [C] -> [1, C] and [] -> [1]
// (or [C] -> [1, C] for probabilities); `unbatched` says to drop it again.
struct Batched {
  Tensor input, target;
  bool unbatched = false;
};

Batched with_batch_axis(const char* op, const Tensor& input, const Tensor& target) {
  check_defined(op, input, target);
  if (input.ndim() == 0)
    throw ShapeError(message(op, "input must have a class axis: [C], [N, C] or [N, C, d...], got shape ",
                             to_string(input.shape())));
  if (input.ndim() > 1) return {input, target, false};
  return {unsqueeze(input, 0), target.ndim() == 0 ? reshape(target, Shape{1}) : unsqueeze(target, 0), true};
}

bool is_index_target(const Tensor& input, const Tensor& target) {
  if (target.ndim() + 1 != input.ndim()) return false;
  for (std::size_t d = 0; d < target.ndim(); ++d)
    if (target.shape()[d] != input.shape()[d < 1 ? d : d + 1]) return false;
  return true;
}

// Class weights [C] shaped to broadcast along axis 1 of an [N, C, d...] tensor.
Tensor class_axis_weight(const Tensor& weight, std::size_t ndim) {
  Shape s(ndim - 1, 1);
  s[0] = weight.shape()[0];
  return reshape(weight.detach(), s);
}

// -w[y] logp[y] per sample, then reduced; the mean divides by Σ w[y]. With
// label smoothing ε it is mixed with the uniform-target loss -Σ_c w[c] logp[c]
// as PyTorch does: (1 - ε) nll + (ε / C) smooth, both over the same denominator.
Tensor index_loss(const char* op, const Tensor& logp, const Tensor& target, const Tensor& weight,
                  std::int64_t ignore_index, double label_smoothing, Reduction reduction, bool unbatched) {
  const ClassTargets t = class_targets(op, logp, target, weight, ignore_index);
  Tensor loss = neg(squeeze(gather(logp, 1, t.index), 1));  // [N, d...]
  if (!t.trivial) loss = loss * t.sample_weight;
  if (label_smoothing > 0.0) {
    const double C = double(logp.shape()[1]);
    const Tensor weighted = weight.defined() ? logp * class_axis_weight(weight, logp.ndim()) : logp;
    Tensor smooth = neg(sum(weighted, {1}));
    if (!t.trivial) {  // zero where ignored
      std::vector<double> keep(target.numel());
      for (std::size_t i = 0; i < keep.size(); ++i)
        keep[i] = target.data()[i] == double(ignore_index) ? 0.0 : 1.0;
      smooth = smooth * filled(target.shape(), keep);
    }
    loss = loss * (1.0 - label_smoothing) + smooth * (label_smoothing / C);
  }
  switch (reduction) {
    case Reduction::none: return unbatched ? reshape(loss, Shape{}) : loss;
    case Reduction::sum: return sum(loss);
    case Reduction::mean:
      if (t.trivial) return mean(loss);
      // Every target ignored: the value is 0 / 0 as in PyTorch, whose
      // derivatives skip ignored targets (zero, not 0 · ∞). A constant NaN would
      // leave the tape, and grad() would find no path: 0 · sum keeps it on the
      // tape with zero derivatives. (Targets of weight 0 give NaN derivatives, in PyTorch too.)
      if (t.counted == 0) return sum(loss) * 0.0 + std::numeric_limits<double>::quiet_NaN();
      return sum(loss) / t.weight_sum;
  }
  return loss;
}

void check_distribution(const char* op, const Tensor& target) {
  // rows along axis 1 of [N, C, d...]
  const std::size_t N = target.shape()[0], C = target.shape()[1], inner = target.numel() / (N * C);
  const double* p = target.data();
  for (std::size_t n = 0; n < N; ++n)
    for (std::size_t k = 0; k < inner; ++k) {
      double total = 0.0;
      for (std::size_t c = 0; c < C; ++c) {
        const double v = p[(n * C + c) * inner + k];
        if (!(v >= 0.0))
          throw ValueError(message(op, "probability target ", v, " at sample ", n, ", class ", c,
                                   " is negative or not a number (target of shape ", to_string(target.shape()), ")"));
        total += v;
      }
      if (std::abs(total - 1.0) > 1e-6)
        throw ValueError(message(op, "probability targets of sample ", n, " sum to ", total,
                                 ", not 1 (target of shape ", to_string(target.shape()),
                                 "; pass class indices of shape [N] or set check_distribution = false)"));
    }
}

}  // namespace

// ---- regression ----

// ℓ = (x - y)²
Tensor mse_loss(const Tensor& input, const Tensor& target, Reduction reduction) {
  check_same_shape("mse_loss", input, target);
  return reduce(square(input - target), reduction);
}

// ℓ = ½ d² if |d| < δ else δ (|d| - ½ δ): quadratic near 0, linear beyond δ,
// with matching value and slope at |d| = δ. The branch is a constant mask, so
// ℓ' = d or δ sign(d), ℓ'' = 1 or 0, as in PyTorch.
Tensor huber_loss(const Tensor& input, const Tensor& target, const HuberOptions& options) {
  check_same_shape("huber_loss", input, target);
  if (!(options.delta > 0.0))
    throw ValueError(message("huber_loss", "delta must be positive, got ", options.delta));
  const double delta = options.delta;
  const Tensor d = input - target;
  const Tensor a = abs(d);
  std::vector<double> inside(d.numel());
  const double* size = a.data();
  for (std::size_t i = 0; i < inside.size(); ++i) inside[i] = size[i] < delta ? 1.0 : 0.0;
  const Tensor m = filled(d.shape(), inside);
  const Tensor loss = m * (square(d) * 0.5) + (1.0 - m) * ((a - 0.5 * delta) * delta);
  return reduce(loss, options.reduction);
}

// ℓ = ½ (log v + (x - y)² / v) [+ ½ log 2π],  v = max(var, eps) in value
Tensor gaussian_nll_loss(const Tensor& input, const Tensor& target, const Tensor& var,
                         const GaussianNLLOptions& options) {
  const char* op = "gaussian_nll_loss";
  check_same_shape(op, input, target);
  if (!var.defined()) throw ValueError(message(op, "var is undefined"));
  // var: the input's shape, the input's shape without its last axis, or with a last axis of 1
  Tensor v = var;
  const Shape& s = input.shape();
  const bool same = var.shape() == s;
  const bool drop_last = !s.empty() && var.shape() == Shape(s.begin(), s.end() - 1);
  const bool last_one = !s.empty() && var.ndim() == s.size() && var.shape().back() == 1 &&
                        std::equal(s.begin(), s.end() - 1, var.shape().begin());
  if (!same && !drop_last && !last_one)
    throw ShapeError(message(op, "var of shape ", to_string(var.shape()), " does not fit input of shape ",
                             to_string(s), " (expects the input's shape, or it without its last axis, or with a "
                                           "last axis of 1)"));
  if (!same && drop_last) v = unsqueeze(var, -1);
  if (!(options.eps >= 0.0)) throw ValueError(message(op, "eps must be non-negative, got ", options.eps));
  // PyTorch clamps var in place under no_grad: the value becomes max(var, eps)
  // while the gradient passes as if unclamped. Adding the constant difference
  // does the same.
  std::vector<double> lift(v.numel());
  bool lifted = false;
  const double* values = v.data();
  for (std::size_t i = 0; i < lift.size(); ++i) {
    const double x = values[i];
    if (!(x >= 0.0))
      throw ValueError(message(op, "var has a negative or NaN entry ", x, " at position ", i, " (var of shape ",
                               to_string(var.shape()), ")"));
    lift[i] = x < options.eps ? options.eps - x : 0.0;
    lifted = lifted || lift[i] != 0.0;
  }
  if (lifted) v = v + filled(v.shape(), lift);
  Tensor loss = (log(v) + square(input - target) / v) * 0.5;
  if (options.full) loss = loss + 0.5 * std::log(2.0 * M_PI);
  return reduce(loss, options.reduction);
}

// ---- classification ----

// ℓ = -w[y] logp[y]
Tensor nll_loss(const Tensor& input, const Tensor& target, const NLLOptions& options) {
  const char* op = "nll_loss";
  const Batched b = with_batch_axis(op, input, target);
  if (!is_index_target(b.input, b.target))
    throw ShapeError(message(op, "target of shape ", to_string(target.shape()), " does not fit input of shape ",
                             to_string(input.shape()), " (expects class indices of the input's shape without axis ",
                             input.ndim() > 1 ? 1 : 0, ")"));
  return index_loss(op, b.input, b.target, options.weight, options.ignore_index, 0.0, options.reduction, b.unbatched);
}

// ℓ = -Σ_c w[c] y[c] log_softmax(x)[c]; with class indices y this is -w[y] log_softmax(x)[y]
Tensor cross_entropy(const Tensor& input, const Tensor& target, const CrossEntropyOptions& options) {
  const char* op = "cross_entropy";
  const Batched b = with_batch_axis(op, input, target);
  const double eps = options.label_smoothing;
  if (!(eps >= 0.0 && eps <= 1.0))
    throw ValueError(message(op, "label_smoothing must be in [0, 1], got ", eps));
  const Tensor logp = log_softmax(b.input, 1);
  if (is_index_target(b.input, b.target))
    return index_loss(op, logp, b.target, options.weight, options.ignore_index, eps, options.reduction, b.unbatched);
  if (b.target.shape() != b.input.shape())
    throw ShapeError(message(op, "target of shape ", to_string(target.shape()), " does not fit input of shape ",
                             to_string(input.shape()), " (expects class indices of the input's shape without axis ",
                             input.ndim() > 1 ? 1 : 0, ", or probabilities of the input's shape)"));
  // probability targets
  const std::size_t C = b.input.shape()[1];
  if (options.weight.defined() && (options.weight.ndim() != 1 || options.weight.shape()[0] != C))
    throw ShapeError(message(op, "weight of shape ", to_string(options.weight.shape()), " does not fit ", C,
                             " classes (input of shape ", to_string(input.shape()), ")"));
  if (options.check_distribution) check_distribution(op, b.target);
  Tensor y = eps > 0.0 ? b.target * (1.0 - eps) + eps / double(C) : b.target;
  if (options.weight.defined()) y = y * class_axis_weight(options.weight, b.input.ndim());
  const Tensor loss = neg(sum(logp * y, {1}));  // [N, d...]
  switch (options.reduction) {
    case Reduction::none: return b.unbatched ? reshape(loss, Shape{}) : loss;
    case Reduction::sum: return sum(loss);
    case Reduction::mean: return mean(loss);  // over N·d..., whatever the weights
  }
  return loss;
}

// ℓ = softplus(x) - x y  (= max(x, 0) - x y + log(1 + e^-|x|), never overflowing);
// with pos_weight p:  ℓ = (1 - y) x + (1 + (p - 1) y) softplus(-x)
Tensor binary_cross_entropy_with_logits(const Tensor& input, const Tensor& target,
                                        const BCEWithLogitsOptions& options) {
  const char* op = "binary_cross_entropy_with_logits";
  check_same_shape(op, input, target);
  if (options.pos_weight.defined()) check_broadcasts_to(op, "pos_weight", options.pos_weight, input.shape());
  if (options.weight.defined()) check_broadcasts_to(op, "weight", options.weight, input.shape());
  Tensor loss;
  if (options.pos_weight.defined()) {
    const Tensor log_weight = (options.pos_weight - 1.0) * target + 1.0;
    loss = (1.0 - target) * input + log_weight * softplus(neg(input));
  } else {
    loss = softplus(input) - input * target;
  }
  if (options.weight.defined()) loss = loss * options.weight;
  return reduce(loss, options.reduction);
}

}  // namespace hesse::nn
