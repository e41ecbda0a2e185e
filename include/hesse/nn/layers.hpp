#pragma once
// Layers with PyTorch's parameter names, shapes and default initialisation.
#include <initializer_list>
#include <memory>
#include <vector>

#include "hesse/nn/module.hpp"

namespace hesse::nn {

/// y = x Wᵀ + b;  W [out, in], b [out];  W, b ~ U(-1/√in, 1/√in) as in PyTorch.
class Linear : public Module {
 public:
  Linear(std::size_t in_features, std::size_t out_features, bool bias = true,
         Generator& gen = default_generator());
  Tensor forward(const std::vector<Tensor>& inputs) override;
  Tensor weight, bias;
};

/// y_k = x1ᵀ W_k x2 + b_k;  W [out, in1, in2], b [out];  U(-1/√in1, 1/√in1).
class Bilinear : public Module {
 public:
  Bilinear(std::size_t in1_features, std::size_t in2_features, std::size_t out_features, bool bias = true,
           Generator& gen = default_generator());
  Tensor forward(const std::vector<Tensor>& inputs) override;
  Tensor weight, bias;
};

/// An elementwise activation as a module.
class Activation : public Module {
 public:
  enum class Kind { tanh, sigmoid, relu, softplus, gelu };
  explicit Activation(Kind kind) : kind_(kind) {}
  Tensor forward(const std::vector<Tensor>& inputs) override;
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

struct Tanh : Activation {
  Tanh() : Activation(Kind::tanh) {}
};
struct Sigmoid : Activation {
  Sigmoid() : Activation(Kind::sigmoid) {}
};
struct ReLU : Activation {
  ReLU() : Activation(Kind::relu) {}
};
struct Softplus : Activation {
  Softplus() : Activation(Kind::softplus) {}
};
struct GELU : Activation {
  GELU() : Activation(Kind::gelu) {}
};

/// Merges dimensions start..end of the input (by default all but the batch dim).
class Flatten : public Module {
 public:
  explicit Flatten(int start = 1, int end = -1) : start_(start), end_(end) {}
  Tensor forward(const std::vector<Tensor>& inputs) override;

 private:
  int start_, end_;
};

/// Children named "0", "1", ... applied in order.
class Sequential : public Module {
 public:
  Sequential() = default;
  Sequential(std::initializer_list<std::shared_ptr<Module>> modules);
  /// Appends a module under the next index and returns *this.
  Sequential& add(std::shared_ptr<Module> module);
  Tensor forward(const std::vector<Tensor>& inputs) override;
  std::size_t size() const { return children().size(); }
};

/// Linear layers of the given widths with `activation` between them (none after
/// the last), named like PyTorch's nn.Sequential: 0.weight, 0.bias, 2.weight, ...
std::shared_ptr<Sequential> mlp(const std::vector<std::size_t>& widths, Activation::Kind activation,
                                Generator& gen = default_generator());

}  // namespace hesse::nn
