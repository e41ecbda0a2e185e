// softmax and log_softmax, through logsumexp: stable for large entries, and
// differentiable to any order because they are compositions of primitives.
#include "../detail.hpp"

namespace hesse {

// log_softmax(x) = x - logsumexp(x)
Tensor log_softmax(const Tensor& x, int axis) { return x - logsumexp(x, axis, /*keepdim=*/true); }

// softmax(x) = exp(log_softmax(x))
Tensor softmax(const Tensor& x, int axis) { return exp(log_softmax(x, axis)); }

}  // namespace hesse
