// Hessian workloads of ../shared/anchors/anchor_torch.py, named the same, timed
// the same way (one warm-up, then repetitions for ~5 s, median). Each workload
// runs in a child process so that its peak RSS is its own. Prints one JSON object.
//
//   bench_hessian [--only name ...] [--reps-budget seconds]
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <hesse/hesse.hpp>
#include <hesse/nn/loss.hpp>
#include <hesse/profile.hpp>

#include "../examples/mimo_model.hpp"
#include "bench_util.hpp"

using hesse::Tensor;
namespace nn = hesse::nn;

namespace {

using bench::class_targets;
using bench::time_it;
using bench::timing_json;
using bench::Timing;

std::string fingerprint(const Tensor& r) {
  double s = 0, f = 0, asym = 0;
  for (std::size_t i = 0; i < r.numel(); ++i) s += r.data()[i], f += r.data()[i] * r.data()[i];
  if (r.ndim() >= 2 && r.shape()[r.ndim() - 1] == r.shape()[r.ndim() - 2]) {
    const std::size_t n = r.shape().back(), mats = r.numel() / (n * n);
    for (std::size_t m = 0; m < mats; ++m)
      for (std::size_t i = 0; i < n; ++i)
        for (std::size_t j = 0; j < n; ++j)
          asym = std::max(asym, std::abs(r.data()[m * n * n + i * n + j] - r.data()[m * n * n + j * n + i]));
  }
  std::ostringstream os;
  os.precision(12);
  os << "{\"sum\": " << s << ", \"fro\": " << std::sqrt(f) << ", \"max_asym\": " << asym << "}";
  return os.str();
}

// dgemm rate of this machine, now: 2000×2000 products.
double dgemm_gflops() {
  const int n = 2000;
  std::vector<double> a(std::size_t(n) * n, 1.0), b(a), c(a);
  auto run = [&] { cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0, a.data(), n, b.data(), n, 0.0, c.data(), n); };
  const Timing t = time_it(run);
  return 2.0 * n * n * double(n) / t.median_s / 1e9;
}

std::string run_workload(const std::string& name) {
  hesse::Generator gen(0);
  std::ostringstream os;
  os << "{";
  if (name == "mimo") {
    MimoModel model(gen);
    const Tensor x = Tensor{{1, 2}, {3, 4}};
    const Tensor y = -x;
    Tensor h;
    const Timing t = time_it([&] { h = hesse::model_hessian_matrix(model, {x, y}); });
    os << "\"timing\": " << timing_json(t) << ", \"shape\": \"" << hesse::to_string(h.shape())
       << "\", \"fingerprint\": " << fingerprint(h);
  } else if (name == "mlp_small_loss" || name == "mlp_medium_loss") {
    const bool small = name == "mlp_small_loss";
    const std::vector<std::size_t> widths = small ? std::vector<std::size_t>{8, 16, 1}
                                                  : std::vector<std::size_t>{32, 64, 64, 10};
    const std::size_t batch = small ? 32 : 128;
    auto model = nn::mlp(widths, nn::Activation::Kind::tanh, gen);
    const Tensor x = hesse::randn({batch, widths[0]}, gen);
    const Tensor target = small ? hesse::randn({batch, 1}, gen) : class_targets(batch, 10, gen);
    const hesse::Criterion loss = small ? hesse::Criterion(nn::MSELoss(nn::Reduction::sum))
                                        : hesse::Criterion(nn::CrossEntropyLoss());
    Tensor h;
    hesse::profile::reset_gemm_flops();
    h = hesse::loss_hessian_matrix(*model, loss, {x}, target);
    const double flops = double(hesse::profile::gemm_flops());
    const Timing t = time_it([&] { h = Tensor(); h = hesse::loss_hessian_matrix(*model, loss, {x}, target); });
    os << "\"timing\": " << timing_json(t) << ", \"shape\": \"" << hesse::to_string(h.shape())
       << "\", \"fingerprint\": " << fingerprint(h) << ", \"gemm_gflop\": " << flops / 1e9
       << ", \"achieved_gflops\": " << flops / 1e9 / t.median_s
       << ", \"hessian_mb\": " << double(h.numel()) * 8 / 1e6;
  } else if (name == "per_sample_model") {
    auto model = nn::mlp({4, 16, 2}, nn::Activation::Kind::tanh, gen);
    const Tensor x = hesse::randn({64, 4}, gen);
    Tensor h;
    const Timing t = time_it([&] { h = Tensor(); h = hesse::model_hessian_matrix(*model, {x}); });
    os << "\"timing\": " << timing_json(t) << ", \"shape\": \"" << hesse::to_string(h.shape())
       << "\", \"fingerprint\": " << fingerprint(h);
  } else if (name == "hvp_large") {
    auto model = nn::mlp({784, 256, 10}, nn::Activation::Kind::tanh, gen);
    const Tensor x = hesse::randn({64, 784}, gen);
    const Tensor target = class_targets(64, 10, gen);
    const nn::CrossEntropyLoss loss;
    const std::size_t n = model->num_parameters();
    Tensor v = hesse::randn({n}, gen);
    v = v / std::sqrt(hesse::sum(v * v).item());
    const auto params = model->parameters();
    const Timing tg = time_it([&] {
      model->zero_grad();
      loss((*model)(x), target).backward();
    });
    Tensor hv;
    const Timing th = time_it([&] { hv = hesse::hessian_vector_product(*model, loss, {x}, target, v); });
    double lambda = 0;
    const Timing tp = time_it([&] {
      Tensor u = v;
      for (int s = 0; s < 20; ++s) {
        const Tensor hu = hesse::hessian_vector_product(*model, loss, {x}, target, u);
        lambda = hesse::sum(u * hu).item();
        u = hu / std::sqrt(hesse::sum(hu * hu).item());
      }
    });
    os << "\"P\": " << n << ", \"gradient\": " << timing_json(tg) << ", \"hvp\": " << timing_json(th)
       << ", \"power_iteration_20\": " << timing_json(tp) << ", \"hvp_over_gradient\": " << th.median_s / tg.median_s
       << ", \"top_eigenvalue_estimate\": " << lambda;
  } else {
    throw std::runtime_error("unknown workload " + name);
  }
  os << "}";
  return os.str();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> names = {"mimo", "mlp_small_loss", "mlp_medium_loss", "per_sample_model", "hvp_large"};
  names = bench::workloads_from_args(argc, argv, names, "bench_hessian");
  if (names.empty()) return 2;
  std::cout << "{\"benchmark\": \"hesse_hessian\", \"env\": " << bench::env_json();
  std::cout << ", \"dgemm_gflops\": " << dgemm_gflops() << ", \"workloads\": {";
  for (std::size_t i = 0; i < names.size(); ++i) {
    std::cout << (i ? ", " : "") << "\n \"" << names[i]
              << "\": " << bench::run_isolated([&] { return run_workload(names[i]); }) << std::flush;
  }
  std::cout << "\n}}\n";
  return 0;
}
