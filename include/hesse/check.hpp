#pragma once
// Finite-difference checks of the tape, like PyTorch's gradcheck and
// gradgradcheck: the analytic Jacobian from backward passes against central
// differences in double precision.
#include <functional>
#include <vector>

#include "hesse/tensor.hpp"

namespace hesse {

/// f maps tensors to one tensor; inputs that require grad are checked.
using TensorFunction = std::function<Tensor(const std::vector<Tensor>&)>;

struct CheckOptions {
  double eps = 1e-6;   // finite-difference step
  double atol = 1e-5;  // |analytic - numeric| <= atol + rtol |numeric|
  double rtol = 1e-3;
  bool raise = true;   // throw hesse::Error with the worst entry instead of returning false
  std::uint64_t seed = 0;  // for gradgradcheck's random grad_outputs
};

/// Checks d f / d inputs (every output entry, every input entry).
bool gradcheck(const TensorFunction& f, const std::vector<Tensor>& inputs, const CheckOptions& options = {});

/// Checks the second derivative: gradcheck of v ↦ grad(f(inputs), inputs, v)
/// with respect to the inputs and v (create_graph through every rule).
bool gradgradcheck(const TensorFunction& f, const std::vector<Tensor>& inputs, const CheckOptions& options = {});

}  // namespace hesse
