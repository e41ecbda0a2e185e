#pragma once
// Optimisers with torch.optim's update formulas. They hold handles to the
// parameters (leaf tensors that require grad, as Module::parameters() gives
// them) and update their values in place, outside the tape.
#include <cstdint>
#include <vector>

#include "hesse/tensor.hpp"

namespace hesse::nn {

class Optimizer {
 public:
  /// Checks that every parameter is a defined leaf that requires grad, listed once.
  explicit Optimizer(std::vector<Tensor> params, const char* name);
  virtual ~Optimizer() = default;
  /// One update of every parameter that has a gradient (the others are skipped).
  virtual void step() = 0;
  /// Clears every parameter's gradient (PyTorch's set_to_none=True).
  void zero_grad();
  const std::vector<Tensor>& params() const { return params_; }

 protected:
  std::vector<Tensor> params_;
};

struct SGDOptions {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  /// Needs momentum > 0 and dampening = 0.
  bool nesterov = false;
};

/// g ← ∇ + λ p;  with momentum μ: b ← g on the first step, else b ← μ b + (1 - τ) g,
/// and g ← g + μ b (nesterov) or g ← b;  then p ← p - lr g.
class SGD : public Optimizer {
 public:
  explicit SGD(std::vector<Tensor> params, SGDOptions options = {});
  void step() override;
  const SGDOptions& options() const { return options_; }

 private:
  SGDOptions options_;
  std::vector<std::vector<double>> momentum_;  // empty until a parameter's first step
};

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  /// Added to the gradient (L2, as torch.optim.Adam; not AdamW's decoupled decay).
  double weight_decay = 0.0;
};

/// g ← ∇ + λ p;  m ← β₁ m + (1 - β₁) g;  v ← β₂ v + (1 - β₂) g²;  t ← t + 1;
/// p ← p - (lr / (1 - β₁ᵗ)) m / (√v / √(1 - β₂ᵗ) + ε). Each parameter counts
/// its own steps t (a step without its gradient does not count).
class Adam : public Optimizer {
 public:
  explicit Adam(std::vector<Tensor> params, AdamOptions options = {});
  void step() override;
  const AdamOptions& options() const { return options_; }

 private:
  struct State {
    std::uint64_t step = 0;
    std::vector<double> m, v;
  };
  AdamOptions options_;
  std::vector<State> state_;
};

}  // namespace hesse::nn
