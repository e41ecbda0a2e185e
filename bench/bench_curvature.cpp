// Matrix-free curvature on hvp_large (MLP 784-256-10 tanh, cross-entropy mean,
// batch 64, n = 203,530), the workload of ../shared/anchors/anchor_torch.py:
// one gradient, one Hessian-vector product, 20 power and 20 Lanczos steps,
// then the top 5 eigenvalues, a 100-probe Hutchinson trace and a 50-node
// spectral density. Each workload runs in its own process (its own peak RSS).
// Prints one JSON object.
//
//   bench_curvature [--only name ...] [--reps-budget seconds]
#include <cmath>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <hesse/hesse.hpp>

#include "bench_util.hpp"

using hesse::Tensor;
namespace nn = hesse::nn;

namespace {

// The anchor's hvp_large: same sizes, same loss (weights differ: a different RNG).
struct HvpLarge {
  hesse::Generator gen{0};
  std::shared_ptr<nn::Sequential> model = nn::mlp({784, 256, 10}, nn::Activation::Kind::tanh, gen);
  Tensor x = hesse::randn({64, 784}, gen);
  Tensor target = bench::class_targets(64, 10, gen);
  nn::CrossEntropyLoss loss;
  hesse::LinearOperator hessian() { return hesse::loss_hessian_operator(*model, loss, {x}, target); }
};

std::string json_number(double v) {
  std::ostringstream os;
  os.precision(12);
  os << v;
  return os.str();
}

std::string values_json(const Tensor& t) {
  std::string s = "[";
  for (std::size_t i = 0; i < t.numel(); ++i) s += (i ? ", " : "") + json_number(t.data()[i]);
  return s + "]";
}

std::string run_workload(const std::string& name) {
  HvpLarge w;
  const std::size_t n = w.model->num_parameters();
  std::ostringstream os;
  os << "{\"status\": \"ok\", \"P\": " << n << ", ";
  if (name == "hvp_steps") {
    Tensor v = hesse::randn({n}, w.gen);
    const auto gradient = [&] {
      w.model->zero_grad();
      w.loss((*w.model)(w.x), w.target).backward();
    };
    const bench::Timing grad = bench::time_it(gradient);
    const hesse::LinearOperator h = w.hessian();  // the gradient's graph is built once
    const bench::Timing build = bench::time_it([&] { w.hessian(); });
    const bench::Timing hvp = bench::time_it([&] { h(v); });
    // from scratch (forward, gradient graph, backward), as the anchor's HVPs are timed
    const auto hvp_from_scratch = [&] { hesse::hessian_vector_product(*w.model, w.loss, {w.x}, w.target, v); };
    const bench::Timing hvp_full = bench::time_it(hvp_from_scratch);
    const double paired = bench::paired_ratio(gradient, hvp_from_scratch);
    hesse::PowerIteration power;
    // the 20-step figures include building the operator, as the anchor's include its graph
    const bench::Timing power20 = bench::time_it([&] { power = hesse::power_iteration(w.hessian(), 20, 1); });
    hesse::LanczosOptions lo;
    lo.which = hesse::Which::largest_magnitude;
    lo.max_products = 20;
    lo.tolerance = 1e-300;  // run all 20 steps
    lo.progress = false;
    hesse::Eigenpairs lz;
    const bench::Timing lanczos20 = bench::time_it([&] { lz = hesse::lanczos(w.hessian(), lo); });
    os << "\"gradient\": " << bench::timing_json(grad) << ", \"build_operator\": " << bench::timing_json(build)
       << ", \"hvp_kept_graph\": " << bench::timing_json(hvp) << ", \"hvp\": " << bench::timing_json(hvp_full)
       << ", \"hvp_over_gradient\": " << hvp_full.median_s / grad.median_s
       << ", \"hvp_over_gradient_paired\": " << paired
       << ", \"power_iteration_20\": " << bench::timing_json(power20)
       << ", \"power_eigenvalue\": " << json_number(power.value) << ", \"power_residual\": " << power.residual
       << ", \"lanczos_20\": " << bench::timing_json(lanczos20)
       << ", \"lanczos_eigenvalue\": " << json_number(lz.values.data()[0])
       << ", \"lanczos_residual\": " << lz.residuals.data()[0] << ", \"lanczos_products\": " << lz.products;
  } else if (name == "top5") {
    hesse::LanczosOptions lo;
    lo.k = 5;
    lo.tolerance = 1e-8;
    lo.progress = false;
    hesse::Eigenpairs top;
    const bench::Timing t = bench::time_it([&] { top = hesse::lanczos(w.hessian(), lo); });
    os << "\"top5\": " << bench::timing_json(t) << ", \"values\": " << values_json(top.values)
       << ", \"residuals\": " << values_json(top.residuals) << ", \"products\": " << top.products
       << ", \"converged\": " << (top.converged ? "true" : "false");
  } else if (name == "hutchinson_100") {
    hesse::EstimatorOptions eo;
    eo.probes = 100;
    eo.progress = false;
    hesse::TraceEstimate tr;
    const bench::Timing t = bench::time_it([&] { tr = hesse::hutchinson_trace(w.hessian(), eo); });
    hesse::TraceEstimate tpp;
    const bench::Timing tp = bench::time_it([&] { tpp = hesse::hutchpp_trace(w.hessian(), eo); });
    os << "\"hutchinson\": " << bench::timing_json(t) << ", \"trace\": " << json_number(tr.value)
       << ", \"standard_error\": " << tr.standard_error << ", \"hutchpp\": " << bench::timing_json(tp)
       << ", \"hutchpp_trace\": " << json_number(tpp.value) << ", \"hutchpp_standard_error\": " << tpp.standard_error;
  } else if (name == "density_50") {
    hesse::DensityOptions d;
    d.nodes = 50;
    d.probes = 1;
    d.progress = false;
    hesse::SpectralDensity sd;
    const bench::Timing t = bench::time_it([&] { sd = hesse::spectral_density(w.hessian(), d); });
    os << "\"density\": " << bench::timing_json(t) << ", \"probes\": " << d.probes << ", \"nodes\": " << d.nodes
       << ", \"products\": " << sd.products;
  } else {
    throw std::runtime_error("unknown workload " + name);
  }
  os << "}";
  return os.str();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> names = {"hvp_steps", "top5", "hutchinson_100", "density_50"};
  names = bench::workloads_from_args(argc, argv, names, "bench_curvature");
  if (names.empty()) return 2;
  std::cout << "{\"benchmark\": \"hesse_curvature\", \"workload\": \"hvp_large\", \"env\": " << bench::env_json()
            << ", \"results\": {";
  for (std::size_t i = 0; i < names.size(); ++i)
    std::cout << (i ? ", " : "") << "\n \"" << names[i] << "\": "
              << bench::run_isolated([&] { return run_workload(names[i]); }) << std::flush;
  std::cout << "\n}}\n";
  return 0;
}
