#pragma once
// Modules: named parameters and submodules with PyTorch's naming and order
// (`0.weight`, `encoder.1.bias`), freezing, train/eval, save/load by name.
#include <iosfwd>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hesse/tensor.hpp"

namespace hesse::nn {

using NamedTensor = std::pair<std::string, Tensor>;

class Module {
 public:
  virtual ~Module() = default;

  /// The model: outputs from a list of inputs (most modules take one).
  virtual Tensor forward(const std::vector<Tensor>& inputs) = 0;
  Tensor operator()(const std::vector<Tensor>& inputs) { return forward(inputs); }
  Tensor operator()(const Tensor& x) { return forward({x}); }
  Tensor operator()(const Tensor& x, const Tensor& y) { return forward({x, y}); }

  /// Every parameter with its dotted name: own parameters first, then each
  /// submodule's, in registration order (PyTorch's order).
  std::vector<NamedTensor> named_parameters() const;
  std::vector<Tensor> parameters() const;
  /// Parameters that require grad (not frozen), in the same order.
  std::vector<NamedTensor> trainable_parameters() const;
  /// The parameter with this dotted name; a hesse::ValueError lists the names otherwise.
  Tensor parameter(const std::string& name) const;
  /// Number of scalars in all parameters (or only in trainable ones).
  std::size_t num_parameters(bool trainable_only = false) const;

  /// Direct submodules in registration order, and every module below this one.
  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& children() const { return children_; }
  std::vector<std::pair<std::string, Module*>> named_modules();

  /// Training mode (the default) or evaluation mode, applied to all submodules.
  void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }

  /// Clears every parameter's accumulated gradient.
  void zero_grad();

  /// Names, shapes, counts and frozen flags, one line each.
  std::string summary() const;

  /// One `<name>.npy` per parameter in `folder` (created if missing).
  void save(const std::string& folder) const;
  /// Reads `<name>.npy` for every parameter; checks names and shapes.
  void load(const std::string& folder);

 protected:
  /// Adds a parameter (a leaf that requires grad) and returns its handle.
  Tensor register_parameter(const std::string& name, Tensor value, bool requires_grad = true);
  /// Adds a submodule and returns it.
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    add_child(name, module);
    return module;
  }

 private:
  void add_child(const std::string& name, std::shared_ptr<Module> module);
  void check_new_name(const std::string& name) const;
  void collect(const std::string& prefix, std::vector<NamedTensor>& out) const;

  std::vector<NamedTensor> params_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

std::ostream& operator<<(std::ostream& os, const Module& m);

/// Puts a module in eval mode for a scope and restores its mode afterwards.
class EvalModeGuard {
 public:
  explicit EvalModeGuard(Module& m) : module_(m), was_training_(m.is_training()) { m.eval(); }
  ~EvalModeGuard() { module_.train(was_training_); }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  Module& module_;
  bool was_training_;
};

}  // namespace hesse::nn
