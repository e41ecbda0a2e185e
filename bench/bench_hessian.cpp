// Hessian workloads of ../shared/anchors/anchor_torch.py, named the same, timed
// the same way (one warm-up, then repetitions for ~5 s, median). Each workload
// runs in a child process so that its peak RSS is its own. Prints one JSON object.
//
//   bench_hessian [--only name ...] [--reps-budget seconds]
#include <cblas.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <hesse/hesse.hpp>
#include <hesse/nn/loss.hpp>
#include <hesse/profile.hpp>

#include "../examples/mimo_model.hpp"

using hesse::Tensor;
namespace nn = hesse::nn;

namespace {

double budget_s = 5.0;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Timing {
  double median_s, min_s, warmup_s;
  int reps;
};

// One warm-up call, then repetitions filling the time budget (like the anchor).
Timing time_it(const std::function<void()>& fn) {
  double t0 = now();
  fn();
  const double warm = now() - t0;
  const int reps = warm > 8.0 ? 0 : warm < 2.0 ? std::max(3, std::min(200, int(budget_s / std::max(warm, 1e-6))))
                                               : std::max(1, std::min(3, int(15.0 / warm)));
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    t0 = now();
    fn();
    times.push_back(now() - t0);
  }
  if (times.empty()) times.push_back(warm);
  std::sort(times.begin(), times.end());
  return {times[times.size() / 2], times.front(), warm, int(times.size())};
}

std::string timing_json(const Timing& t) {
  std::ostringstream os;
  os.precision(6);
  os << "{\"median_s\": " << t.median_s << ", \"min_s\": " << t.min_s << ", \"warmup_s\": " << t.warmup_s
     << ", \"reps\": " << t.reps << "}";
  return os.str();
}

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

// Integer class targets as doubles, and inputs, from one seeded generator.
Tensor class_targets(std::size_t n, std::size_t classes, hesse::Generator& gen) {
  Tensor t = Tensor::empty({n});
  for (std::size_t i = 0; i < n; ++i) t.mutable_data()[i] = std::floor(gen.uniform(0, double(classes)));
  return t;
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

// Runs one workload in a child process; returns its JSON with the child's peak RSS.
std::string run_isolated(const std::string& name) {
  int fds[2];
  if (pipe(fds) != 0) return "{\"status\": \"error\", \"error\": \"pipe\"}";
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    std::string out;
    try {
      out = run_workload(name);
    } catch (const std::exception& e) {
      out = std::string("{\"status\": \"error\", \"error\": \"") + e.what() + "\"}";
    }
    if (write(fds[1], out.data(), out.size()) < 0) _exit(2);
    close(fds[1]);
    _exit(0);
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t got;
  while ((got = read(fds[0], buf, sizeof buf)) > 0) out.append(buf, std::size_t(got));
  close(fds[0]);
  int status = 0;
  struct rusage usage {};
  wait4(pid, &status, 0, &usage);
  if (out.empty()) return "{\"status\": \"error\", \"error\": \"child died\"}";
  std::ostringstream os;
  os << out.substr(0, out.size() - 1) << ", \"peak_rss_mb\": " << double(usage.ru_maxrss) / 1024.0
     << ", \"major_faults\": " << usage.ru_majflt << ", \"minor_faults\": " << usage.ru_minflt << "}";
  return os.str();
}

const char* env_or_null(const char* k) { return std::getenv(k); }

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> names = {"mimo", "mlp_small_loss", "mlp_medium_loss", "per_sample_model", "hvp_large"};
  std::vector<std::string> only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--only") {
      while (i + 1 < argc && argv[i + 1][0] != '-') only.push_back(argv[++i]);
    } else if (a == "--reps-budget" && i + 1 < argc) {
      budget_s = std::atof(argv[++i]);
    } else {
      std::cerr << "usage: bench_hessian [--only name ...] [--reps-budget seconds]\n";
      return 2;
    }
  }
  if (!only.empty()) names = only;
  std::cout << "{\"benchmark\": \"hesse_hessian\", \"env\": {";
  const char* keys[] = {"OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "GLIBC_TUNABLES", "OMP_NUM_THREADS"};
  for (std::size_t i = 0; i < 4; ++i) {
    const char* v = env_or_null(keys[i]);
    std::cout << (i ? ", " : "") << "\"" << keys[i] << "\": " << (v ? "\"" + std::string(v) + "\"" : "null");
  }
  std::cout << "}, \"dgemm_gflops\": " << dgemm_gflops() << ", \"workloads\": {";
  for (std::size_t i = 0; i < names.size(); ++i) {
    std::cout << (i ? ", " : "") << "\n \"" << names[i] << "\": " << run_isolated(names[i]) << std::flush;
  }
  std::cout << "\n}}\n";
  return 0;
}
