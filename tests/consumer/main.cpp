// Built against an installed hesse: includes <hesse/hesse.hpp>, links
// libhesse, and checks one gradient against its closed form.
//   f(x) = Σ x² tanh(x)      ∂f/∂xᵢ = 2xᵢ tanh(xᵢ) + xᵢ² (1 − tanh²(xᵢ))
#include <cmath>
#include <cstdio>

#include <hesse/hesse.hpp>

int main() {
  hesse::Tensor x = hesse::Tensor{-1.0, 0.5, 2.0}.requires_grad_();
  hesse::Tensor f = hesse::sum(hesse::square(x) * hesse::tanh(x));
  hesse::Tensor g = hesse::grad(f, x);

  double worst = 0.0;
  for (std::size_t i = 0; i < x.numel(); ++i) {
    const double xi = x.data()[i], t = std::tanh(xi);
    const double expected = 2 * xi * t + xi * xi * (1 - t * t);
    std::printf("df/dx[%zu] = %.12f (closed form %.12f)\n", i, g.data()[i], expected);
    worst = std::fmax(worst, std::fabs(g.data()[i] - expected));
  }
  if (!(worst < 1e-12)) {
    std::printf("consumer FAILED: max error %.3g\n", worst);
    return 1;
  }
  std::printf("consumer ok\n");
  return 0;
}
