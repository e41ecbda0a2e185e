// Cost of the autograd engine on a small MLP, in the regime where per-op
// overhead matters: a tanh MLP 32-64-64-10 written with raw ops, mean
// cross-entropy (log_softmax + gather), batch 128, seeded data. Times
//   forward    the loss
//   gradient   forward + backward to all six weight tensors
//   hvp        forward + gradient with create_graph + grad of <gradient, v>,
//              i.e. the Hessian-vector product H v
// and prints medians (and minima) over repeated runs as JSON on stdout.
//   usage: bench_autograd [repeats]   (default 300)
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include <hesse/hesse.hpp>

using hesse::Tensor;

namespace {

constexpr std::size_t kBatch = 128;
const std::vector<std::size_t> kWidths = {32, 64, 64, 10};

struct Mlp {
  std::vector<Tensor> params;  // W0 [32, 64], b0 [64], W1 [64, 64], b1 [64], W2 [64, 10], b2 [10]
};

Mlp make_mlp(hesse::Generator& gen) {
  Mlp m;
  for (std::size_t l = 0; l + 1 < kWidths.size(); ++l) {
    const double scale = 1.0 / std::sqrt(double(kWidths[l]));
    m.params.push_back((hesse::randn({kWidths[l], kWidths[l + 1]}, gen) * scale).requires_grad_());
    m.params.push_back((hesse::randn({kWidths[l + 1]}, gen) * 0.1).requires_grad_());
  }
  return m;
}

// loss = mean_i -log softmax(mlp(X)_i)[label_i]
Tensor loss_of(const std::vector<Tensor>& p, const Tensor& X, const Tensor& labels) {
  Tensor h = X;
  const std::size_t layers = p.size() / 2;
  for (std::size_t l = 0; l < layers; ++l) {
    h = hesse::matmul(h, p[2 * l]) + p[2 * l + 1];  // [B, out]
    if (l + 1 < layers) h = hesse::tanh(h);
  }
  return -hesse::mean(hesse::gather(hesse::log_softmax(h, 1), 1, labels));
}

std::vector<Tensor> gradient(const std::vector<Tensor>& p, const Tensor& X, const Tensor& labels) {
  return hesse::grad({loss_of(p, X, labels)}, p);
}

// H v = ∇_w <∇_w loss, v>
std::vector<Tensor> hvp(const std::vector<Tensor>& p, const std::vector<Tensor>& v, const Tensor& X,
                        const Tensor& labels) {
  hesse::GradOptions keep;
  keep.create_graph = true;
  std::vector<Tensor> g = hesse::grad({loss_of(p, X, labels)}, p, {}, keep);
  Tensor gv = hesse::sum(g[0] * v[0]);
  for (std::size_t i = 1; i < g.size(); ++i) gv = gv + hesse::sum(g[i] * v[i]);
  return hesse::grad({gv}, p);
}

struct Stats {
  double median_us, min_us;
};

Stats time_it(int repeats, const std::function<void()>& f) {
  for (int i = 0; i < std::max(3, repeats / 10); ++i) f();  // warm the storage pool and caches
  std::vector<double> us(repeats);
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    us[i] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  std::sort(us.begin(), us.end());
  const double median = repeats % 2 ? us[repeats / 2] : 0.5 * (us[repeats / 2 - 1] + us[repeats / 2]);
  return {median, us.front()};
}

std::string env_json(const char* name) {
  const char* v = std::getenv(name);
  return v ? "\"" + std::string(v) + "\"" : "null";
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::max(1, std::atoi(argv[1])) : 300;

  hesse::Generator gen(2024);
  Mlp mlp = make_mlp(gen);
  Tensor X = hesse::randn({kBatch, kWidths.front()}, gen);
  Tensor labels = Tensor::empty({kBatch, 1});
  for (std::size_t i = 0; i < kBatch; ++i)
    labels.mutable_data()[i] = double(std::min<std::size_t>(kWidths.back() - 1, std::size_t(gen.uniform() * kWidths.back())));
  std::vector<Tensor> v;
  std::size_t n_params = 0;
  for (const Tensor& p : mlp.params) {
    v.push_back(hesse::randn(p.shape(), gen));
    n_params += p.numel();
  }

  // sanity: H v against central differences of the gradient, (g(w + εv) - g(w - εv)) / 2ε
  double hvp_rel_err = 0.0;
  {
    const std::vector<Tensor> hv = hvp(mlp.params, v, X, labels);
    const double eps = 1e-5;
    std::vector<Tensor> plus, minus;
    for (std::size_t i = 0; i < v.size(); ++i) {
      plus.push_back((mlp.params[i].detach() + v[i] * eps).requires_grad_());
      minus.push_back((mlp.params[i].detach() - v[i] * eps).requires_grad_());
    }
    const std::vector<Tensor> gp = gradient(plus, X, labels), gm = gradient(minus, X, labels);
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < v.size(); ++i)
      for (std::size_t j = 0; j < hv[i].numel(); ++j) {
        const double fd = (gp[i].data()[j] - gm[i].data()[j]) / (2 * eps);
        num = std::max(num, std::fabs(hv[i].data()[j] - fd));
        den = std::max(den, std::fabs(fd));
      }
    hvp_rel_err = num / den;
  }

  double sink = 0.0;  // keeps the results observable
  const Stats fwd = time_it(repeats, [&] {
    hesse::NoGradGuard no_grad;  // inference: nothing recorded
    sink += loss_of(mlp.params, X, labels).item();
  });
  const Stats fwd_tape = time_it(repeats, [&] { sink += loss_of(mlp.params, X, labels).item(); });
  const Stats grd = time_it(repeats, [&] { sink += gradient(mlp.params, X, labels)[0].data()[0]; });
  const Stats hv = time_it(repeats, [&] { sink += hvp(mlp.params, v, X, labels)[0].data()[0]; });

  std::printf("{\n");
  std::printf("  \"benchmark\": \"autograd_mlp\",\n");
  std::printf("  \"model\": {\"widths\": [32, 64, 64, 10], \"activation\": \"tanh\", \"loss\": \"cross_entropy_mean\", "
              "\"batch\": %zu, \"parameters\": %zu},\n",
              kBatch, n_params);
  std::printf("  \"repeats\": %d,\n", repeats);
  std::printf("  \"env\": {\"OPENBLAS_NUM_THREADS\": %s, \"OPENBLAS_CORETYPE\": %s, \"GLIBC_TUNABLES\": %s, "
              "\"openblas_core\": \"%s\", \"openblas_threads\": %d},\n",
              env_json("OPENBLAS_NUM_THREADS").c_str(), env_json("OPENBLAS_CORETYPE").c_str(),
              env_json("GLIBC_TUNABLES").c_str(), openblas_get_corename(), openblas_get_num_threads());
  std::printf("  \"median_us\": {\"forward\": %.1f, \"forward_recorded\": %.1f, \"gradient\": %.1f, \"hvp\": %.1f},\n",
              fwd.median_us, fwd_tape.median_us, grd.median_us, hv.median_us);
  std::printf("  \"min_us\": {\"forward\": %.1f, \"forward_recorded\": %.1f, \"gradient\": %.1f, \"hvp\": %.1f},\n",
              fwd.min_us, fwd_tape.min_us, grd.min_us, hv.min_us);
  std::printf("  \"ratio_gradient_over_forward\": %.3f,\n", grd.median_us / fwd_tape.median_us);
  std::printf("  \"ratio_hvp_over_gradient\": %.3f,\n", hv.median_us / grd.median_us);
  std::printf("  \"hvp_check_max_rel_err\": %.2e\n", hvp_rel_err);
  std::printf("}\n");
  return std::isfinite(sink) ? 0 : 1;
}
