// gradcheck / gradgradcheck: analytic Jacobians from one backward pass per
// output entry, numeric ones from central differences.
#include <cmath>
#include <sstream>

#include "hesse/check.hpp"
#include "../detail.hpp"

namespace hesse {
namespace {

// J[i][j] = d out_j / d (flattened input i), for the inputs that require grad.
using Jacobian = std::vector<std::vector<double>>;

// The Jacobians are compared entry by entry: every call of f must give the
// shape of the first (`shape`, when given).
void check_output(const Tensor& out, const Shape* shape) {
  if (!out.defined()) throw ValueError("hesse::gradcheck: the function returned an undefined tensor");
  if (shape && out.shape() != *shape)
    throw ValueError(detail::message("gradcheck", "the function returned shape ", to_string(out.shape()),
                                     " where its first call gave ", to_string(*shape),
                                     ": its output's shape must not depend on the input values"));
}

Tensor evaluate(const TensorFunction& f, const std::vector<Tensor>& inputs, const Shape* shape = nullptr) {
  NoGradGuard guard;
  Tensor out = f(inputs);
  check_output(out, shape);
  return out;
}

std::vector<Jacobian> numeric_jacobians(const TensorFunction& f, const std::vector<Tensor>& inputs, double eps,
                                        const Shape& out_shape) {
  const std::size_t n_out = numel_of(out_shape);
  std::vector<Jacobian> jac(inputs.size());
  std::vector<Tensor> moved;
  for (const Tensor& t : inputs) moved.push_back(t.clone());
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].requires_grad()) continue;
    jac[i].assign(inputs[i].numel(), std::vector<double>(n_out));
    double* x = moved[i].mutable_data();
    for (std::size_t j = 0; j < inputs[i].numel(); ++j) {
      const double orig = x[j];
      // clone: f may return a view of its input (reshape shares storage), and
      // the next perturbation would change it under our feet
      x[j] = orig + eps;
      const Tensor plus = evaluate(f, moved, &out_shape).clone();
      x[j] = orig - eps;
      const Tensor minus = evaluate(f, moved, &out_shape).clone();
      x[j] = orig;
      for (std::size_t k = 0; k < n_out; ++k) jac[i][j][k] = (plus.data()[k] - minus.data()[k]) / (2 * eps);
    }
  }
  return jac;
}

std::vector<Jacobian> analytic_jacobians(const TensorFunction& f, const std::vector<Tensor>& inputs,
                                         const Shape& out_shape) {
  std::vector<Tensor> leaves;
  std::vector<std::size_t> which;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    Tensor t = inputs[i].detach();
    if (inputs[i].requires_grad()) {
      t.requires_grad_(true);
      which.push_back(i);
    }
    leaves.push_back(t);
  }
  std::vector<Tensor> wrt;
  for (std::size_t i : which) wrt.push_back(leaves[i]);
  EnableGradGuard on;  // gradcheck may be called under a NoGradGuard
  const Tensor out = f(leaves);
  check_output(out, &out_shape);
  std::vector<Jacobian> jac(inputs.size());
  for (std::size_t i : which) jac[i].assign(inputs[i].numel(), std::vector<double>(out.numel(), 0.0));
  if (!out.requires_grad() || wrt.empty()) return jac;  // a constant: the Jacobian is zero
  GradOptions options;
  options.retain_graph = true;
  options.allow_unused = true;
  for (std::size_t k = 0; k < out.numel(); ++k) {
    Tensor seed = zeros(out.shape());
    seed.mutable_data()[k] = 1.0;
    const std::vector<Tensor> grads = grad({out}, wrt, {seed}, options);
    for (std::size_t w = 0; w < which.size(); ++w)
      if (grads[w].defined())
        for (std::size_t j = 0; j < grads[w].numel(); ++j) jac[which[w]][j][k] = grads[w].data()[j];
  }
  return jac;
}

bool compare(const char* api, const std::vector<Jacobian>& analytic, const std::vector<Jacobian>& numeric,
             const CheckOptions& options) {
  for (std::size_t i = 0; i < analytic.size(); ++i)
    for (std::size_t j = 0; j < analytic[i].size(); ++j)
      for (std::size_t k = 0; k < analytic[i][j].size(); ++k) {
        const double a = analytic[i][j][k], n = numeric[i][j][k];
        if (std::abs(a - n) <= options.atol + options.rtol * std::abs(n) && std::isfinite(a)) continue;
        if (!options.raise) return false;
        std::ostringstream os;
        os.precision(12);
        os << "hesse::" << api << ": Jacobian mismatch for input " << i << ", element " << j << ", output " << k
           << ": analytic " << a << " vs numeric " << n;
        throw Error(os.str());
      }
  return true;
}

}  // namespace

namespace {
void check_arguments(const char* api, const std::vector<Tensor>& inputs, const CheckOptions& options) {
  if (!(options.eps > 0) || !std::isfinite(options.eps) || !(options.atol >= 0) || !std::isfinite(options.atol) ||
      !(options.rtol >= 0) || !std::isfinite(options.rtol))
    throw ValueError(detail::message(api, "eps must be positive and atol, rtol non-negative, all finite; got eps ",
                                     options.eps, ", atol ", options.atol, ", rtol ", options.rtol));
  for (std::size_t i = 0; i < inputs.size(); ++i)
    if (!inputs[i].defined())
      throw ValueError(detail::message(api, "input ", i, " is an undefined tensor"));
  for (const Tensor& t : inputs)
    if (t.requires_grad()) return;
  throw ValueError(detail::message(api, "none of the ", inputs.size(),
                                   " inputs requires grad: nothing would be checked (call requires_grad_())"));
}
}  // namespace

bool gradcheck(const TensorFunction& f, const std::vector<Tensor>& inputs, const CheckOptions& options) {
  check_arguments("gradcheck", inputs, options);
  const Shape out_shape = evaluate(f, inputs).shape();
  return compare("gradcheck", analytic_jacobians(f, inputs, out_shape),
                 numeric_jacobians(f, inputs, options.eps, out_shape), options);
}

bool gradgradcheck(const TensorFunction& f, const std::vector<Tensor>& inputs, const CheckOptions& options) {
  check_arguments("gradgradcheck", inputs, options);
  const Tensor out = evaluate(f, inputs);
  Generator gen(options.seed);
  Tensor v = randn(out.shape(), gen).requires_grad_(true);
  std::vector<std::size_t> which;
  for (std::size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].requires_grad()) which.push_back(i);
  // g(inputs, v) = flattened d<v, f(inputs)>/d inputs
  const std::size_t n_inputs = inputs.size();
  TensorFunction first_derivative = [&f, which, n_inputs](const std::vector<Tensor>& args) {
    std::vector<Tensor> xs(args.begin(), args.begin() + std::ptrdiff_t(n_inputs));
    const Tensor& seed = args[n_inputs];
    std::vector<Tensor> wrt;
    for (std::size_t i : which) {
      if (!xs[i].requires_grad()) xs[i] = xs[i].detach().requires_grad_(true);  // numeric pass
      wrt.push_back(xs[i]);
    }
    EnableGradGuard on;  // the numeric pass runs under NoGradGuard
    const Tensor y = f(xs);
    std::vector<Tensor> parts;
    if (!y.requires_grad()) {
      for (const Tensor& w : wrt) parts.push_back(zeros({w.numel()}));
      return concatenate(parts);
    }
    GradOptions options;
    options.create_graph = true;
    options.allow_unused = true;
    const std::vector<Tensor> grads = grad({y}, wrt, {seed}, options);
    for (std::size_t w = 0; w < wrt.size(); ++w)
      parts.push_back(grads[w].defined() ? reshape(grads[w], {-1}) : zeros({wrt[w].numel()}));
    return concatenate(parts);
  };
  std::vector<Tensor> args = inputs;
  args.push_back(v);
  return gradcheck(first_derivative, args, options);
}

}  // namespace hesse
