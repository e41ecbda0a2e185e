// SGD and Adam with torch.optim's update rules (its "for-loop" implementation,
// element by element). Updates write into the parameters' storage under a
// NoGradGuard: an optimiser step is not part of any graph.
#include <cmath>
#include <set>

#include "hesse/autograd.hpp"
#include "hesse/nn/optim.hpp"
#include "../detail.hpp"

namespace hesse::nn {
namespace {

using detail::message;

void require(bool ok, const char* op, const char* what, double value) {
  if (!ok) throw ValueError(message(op, "invalid ", what, ": ", value));
}

}  // namespace

Optimizer::Optimizer(std::vector<Tensor> params, const char* name) : params_(std::move(params)) {
  if (params_.empty()) throw ValueError(message(name, "got an empty parameter list"));
  std::set<const void*> seen;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    if (!p.defined()) throw ValueError(message(name, "parameter ", i, " is undefined"));
    if (!p.is_leaf() || !p.requires_grad())
      throw ValueError(message(name, "parameter ", i, " of shape ", to_string(p.shape()),
                               " is not a leaf that requires grad"));
    if (!seen.insert(p.impl().get()).second)
      throw ValueError(message(name, "parameter ", i, " of shape ", to_string(p.shape()), " is listed twice"));
  }
}

void Optimizer::zero_grad() {
  for (Tensor& p : params_) p.zero_grad();
}

// ---- SGD ----

SGD::SGD(std::vector<Tensor> params, SGDOptions options)
    : Optimizer(std::move(params), "SGD"), options_(options), momentum_(params_.size()) {
  require(options.lr >= 0.0, "SGD", "learning rate", options.lr);
  require(options.momentum >= 0.0, "SGD", "momentum", options.momentum);
  require(options.weight_decay >= 0.0, "SGD", "weight_decay", options.weight_decay);
  if (options.nesterov && (options.momentum <= 0.0 || options.dampening != 0.0))
    throw ValueError(message("SGD", "nesterov momentum requires a momentum > 0 and zero dampening (momentum ",
                             options.momentum, ", dampening ", options.dampening, ")"));
}

void SGD::step() {
  NoGradGuard no_grad;
  const auto [lr, mu, tau, wd, nesterov] = options_;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    Tensor& p = params_[i];
    const Tensor grad = p.grad();
    if (!grad.defined()) continue;
    double* x = p.mutable_data();
    const double* g0 = grad.data();
    std::vector<double>& buf = momentum_[i];
    const bool first = buf.empty();
    if (mu != 0.0 && first) buf.resize(p.numel());
    for (std::size_t j = 0; j < p.numel(); ++j) {
      double g = g0[j] + wd * x[j];  // L2 weight decay folded into the gradient
      if (mu != 0.0) {
        buf[j] = first ? g : mu * buf[j] + (1.0 - tau) * g;  // the first step takes g undamped
        g = nesterov ? g + mu * buf[j] : buf[j];
      }
      x[j] -= lr * g;
    }
  }
}

// ---- Adam ----

Adam::Adam(std::vector<Tensor> params, AdamOptions options)
    : Optimizer(std::move(params), "Adam"), options_(options), state_(params_.size()) {
  require(options.lr >= 0.0, "Adam", "learning rate", options.lr);
  require(options.eps >= 0.0, "Adam", "epsilon", options.eps);
  require(options.beta1 >= 0.0 && options.beta1 < 1.0, "Adam", "beta1 (must be in [0, 1))", options.beta1);
  require(options.beta2 >= 0.0 && options.beta2 < 1.0, "Adam", "beta2 (must be in [0, 1))", options.beta2);
  require(options.weight_decay >= 0.0, "Adam", "weight_decay", options.weight_decay);
}

void Adam::step() {
  NoGradGuard no_grad;
  const auto [lr, b1, b2, eps, wd] = options_;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    Tensor& p = params_[i];
    const Tensor grad = p.grad();
    if (!grad.defined()) continue;
    State& s = state_[i];
    if (s.step == 0) s.m.assign(p.numel(), 0.0), s.v.assign(p.numel(), 0.0);
    ++s.step;
    // bias corrections: m and v start at 0, so early averages are scaled down by 1 - βᵗ
    const double bc1 = 1.0 - std::pow(b1, double(s.step));
    const double bc2_sqrt = std::sqrt(1.0 - std::pow(b2, double(s.step)));
    const double step_size = lr / bc1;
    double* x = p.mutable_data();
    const double* g0 = grad.data();
    for (std::size_t j = 0; j < p.numel(); ++j) {
      const double g = g0[j] + wd * x[j];
      s.m[j] = b1 * s.m[j] + (1.0 - b1) * g;  // torch: m.lerp_(g, 1 - β₁)
      s.v[j] = b2 * s.v[j] + (1.0 - b2) * g * g;
      x[j] -= step_size * s.m[j] / (std::sqrt(s.v[j]) / bc2_sqrt + eps);
    }
  }
}

}  // namespace hesse::nn
