// Layers: Linear, Bilinear, activations, Flatten, Sequential, mlp.
#include <cmath>

#include "hesse/nn/layers.hpp"
#include "hesse/ops.hpp"
#include "../detail.hpp"

namespace hesse::nn {
namespace {

Tensor uniform(const Shape& shape, double bound, Generator& gen) {
  Tensor t = Tensor::empty(shape);
  double* out = t.mutable_data();
  for (std::size_t i = 0; i < t.numel(); ++i) out[i] = gen.uniform(-bound, bound);
  return t;
}

const Tensor& single_input(const char* layer, const std::vector<Tensor>& inputs) {
  if (inputs.size() != 1)
    throw ValueError(detail::message(layer, "takes one input, got ", inputs.size()));
  return inputs[0];
}

}  // namespace

// PyTorch: kaiming_uniform_(a=√5) gives U(-1/√in, 1/√in) for the weight; the bias uses the same bound.
Linear::Linear(std::size_t in_features, std::size_t out_features, bool with_bias, Generator& gen) {
  const double bound = in_features > 0 ? 1.0 / std::sqrt(double(in_features)) : 0.0;
  weight = register_parameter("weight", uniform({out_features, in_features}, bound, gen));
  if (with_bias) bias = register_parameter("bias", uniform({out_features}, bound, gen));
}

Tensor Linear::forward(const std::vector<Tensor>& inputs) {
  const Tensor& x = single_input("Linear", inputs);
  const std::size_t in = weight.shape()[1];
  if (x.ndim() == 0 || x.shape().back() != in)
    throw ShapeError(detail::message("Linear", "expects inputs of shape [..., ", in, "], got ", to_string(x.shape())));
  return linear(x, weight, bias);
}

Bilinear::Bilinear(std::size_t in1, std::size_t in2, std::size_t out, bool with_bias, Generator& gen) {
  const double bound = in1 > 0 ? 1.0 / std::sqrt(double(in1)) : 0.0;
  weight = register_parameter("weight", uniform({out, in1, in2}, bound, gen));
  if (with_bias) bias = register_parameter("bias", uniform({out}, bound, gen));
}

// y[n,k] = Σ_ij x1[n,i] W[k,i,j] x2[n,j]: one GEMM with W laid out as [in1, out·in2],
// then a product with x2 and a sum over j. As in PyTorch, the inputs may have any
// leading dimensions (none included), the same for both: [..., in1] and [..., in2].
Tensor Bilinear::forward(const std::vector<Tensor>& inputs) {
  if (inputs.size() != 2) throw ValueError(detail::message("Bilinear", "takes two inputs, got ", inputs.size()));
  const Tensor &x1 = inputs[0], &x2 = inputs[1];
  const std::size_t out = weight.shape()[0], in1 = weight.shape()[1], in2 = weight.shape()[2];
  bool fits = x1.ndim() >= 1 && x1.ndim() == x2.ndim() && x1.shape().back() == in1 && x2.shape().back() == in2;
  for (std::size_t d = 0; fits && d + 1 < x1.ndim(); ++d) fits = x1.shape()[d] == x2.shape()[d];
  if (!fits)
    throw ShapeError(detail::message("Bilinear", "expects inputs of shapes [..., ", in1, "] and [..., ", in2,
                                     "] with the same leading dimensions, got ", to_string(x1.shape()), " and ",
                                     to_string(x2.shape())));
  const Shape lead(x1.shape().begin(), x1.shape().end() - 1);
  const std::size_t n = numel_of(lead);
  const Tensor a = x1.ndim() == 2 ? x1 : reshape(x1, Shape{n, in1});
  const Tensor b = x2.ndim() == 2 ? x2 : reshape(x2, Shape{n, in2});
  const Tensor w = reshape(permute(weight, {1, 0, 2}), Shape{in1, out * in2});
  const Tensor t = reshape(matmul(a, w), Shape{n, out, in2});
  Tensor y = sum(t * unsqueeze(b, 1), {-1});
  if (bias.defined()) y = y + bias;
  if (x1.ndim() == 2) return y;
  Shape shape = lead;
  shape.push_back(out);
  return reshape(y, shape);
}

namespace {
const char* activation_name(Activation::Kind kind) {
  switch (kind) {
    case Activation::Kind::tanh: return "Tanh";
    case Activation::Kind::sigmoid: return "Sigmoid";
    case Activation::Kind::relu: return "ReLU";
    case Activation::Kind::softplus: return "Softplus";
    case Activation::Kind::gelu: return "GELU";
  }
  return "Activation";
}
}  // namespace

Tensor Activation::forward(const std::vector<Tensor>& inputs) {
  const Tensor& x = single_input(activation_name(kind_), inputs);
  switch (kind_) {
    case Kind::tanh: return tanh(x);
    case Kind::sigmoid: return sigmoid(x);
    case Kind::relu: return relu(x);
    case Kind::softplus: return softplus(x);
    case Kind::gelu: return gelu(x);
  }
  throw ValueError("hesse::Activation: unknown kind");
}

Tensor Flatten::forward(const std::vector<Tensor>& inputs) {
  return flatten(single_input("Flatten", inputs), start_, end_);
}

Sequential::Sequential(std::initializer_list<std::shared_ptr<Module>> modules) {
  for (const auto& m : modules) add(m);
}

Sequential& Sequential::add(std::shared_ptr<Module> module) {
  register_module(std::to_string(children().size()), std::move(module));
  return *this;
}

Tensor Sequential::forward(const std::vector<Tensor>& inputs) {
  if (children().empty()) return single_input("Sequential", inputs);
  Tensor x = children()[0].second->forward(inputs);
  for (std::size_t i = 1; i < children().size(); ++i) x = children()[i].second->forward({x});
  return x;
}

std::shared_ptr<Sequential> mlp(const std::vector<std::size_t>& widths, Activation::Kind activation, Generator& gen) {
  if (widths.size() < 2) throw ValueError("hesse::mlp: needs at least an input and an output width");
  auto net = std::make_shared<Sequential>();
  for (std::size_t i = 0; i + 1 < widths.size(); ++i) {
    net->add(std::make_shared<Linear>(widths[i], widths[i + 1], true, gen));
    if (i + 2 < widths.size()) net->add(std::make_shared<Activation>(activation));
  }
  return net;
}

}  // namespace hesse::nn
