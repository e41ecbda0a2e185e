#define BOOST_TEST_MODULE hessian
#include "test_util.hpp"

// Model and loss Hessians (include/hesse/hessian.hpp), mirroring the analytic
// tests of the Python hesse library: closed forms that hold exactly (MimoModel,
// Bilinear, the double-bilinear x1ᵀ B1 B2 x2, squared norms), finite
// differences of gradients for MLPs under MSE / cross-entropy / BCE, the
// batched forms, matrix-free routes, sharpness, parameter selection, mode and
// flag restoration, and every error path.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include <xtensor-blas/xlinalg.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xview.hpp>

#include "../examples/mimo_model.hpp"

// last: its termios macros (B0, ...) clash with LAPACK's parameter names
#include <pty.h>

using namespace hesse;
using hesse::testing::DoubleBilinear;
using hesse::testing::max_abs_diff;
namespace fs = std::filesystem;

namespace {

using Array = xt::xarray<double>;

// ---------------------------------------------------------------- helpers

Array arr(const Tensor& t) { return t.value(); }

/// The largest |entry|.
double max_abs(const Tensor& t) {
  double m = 0.0;
  for (std::size_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.data()[i]));
  return m;
}

/// Exact equality of shape and every value.
#define CHECK_EXACT(a, b) HESSE_CHECK_CLOSE(a, b, 0.0)

/// a and b agree to `rel` relative to the larger of 1 and max |b|.
#define CHECK_REL(a, b, rel)                                                                   \
  do {                                                                                         \
    const double scale_ = std::max(1.0, max_abs(b));                                           \
    const double diff_ = max_abs_diff((a), (b));                                               \
    BOOST_CHECK_MESSAGE(diff_ <= (rel) * scale_,                                               \
                        "max |" #a " - " #b "| = " << diff_ << " (scale " << scale_ << ")");   \
  } while (0)

/// The 2-D Kronecker product.
Array kron(const Array& a, const Array& b) {
  const std::size_t ar = a.shape()[0], ac = a.shape()[1], br = b.shape()[0], bc = b.shape()[1];
  Array k = xt::zeros<double>({ar * br, ac * bc});
  for (std::size_t i = 0; i < ar; ++i)
    for (std::size_t j = 0; j < ac; ++j)
      for (std::size_t p = 0; p < br; ++p)
        for (std::size_t q = 0; q < bc; ++q) k(i * br + p, j * bc + q) = a(i, j) * b(p, q);
  return k;
}

Array matmul2(const Array& a, const Array& b) {
  Array c = xt::zeros<double>({a.shape()[0], b.shape()[1]});
  for (std::size_t i = 0; i < a.shape()[0]; ++i)
    for (std::size_t k = 0; k < a.shape()[1]; ++k)
      for (std::size_t j = 0; j < b.shape()[1]; ++j) c(i, j) += a(i, k) * b(k, j);
  return c;
}

Array identity(std::size_t n) { return xt::eye<double>(n); }

/// Sample b of every input, as a batch of one.
std::vector<Tensor> sample_of(const std::vector<Tensor>& inputs, std::size_t b) {
  std::vector<Tensor> out;
  for (const Tensor& x : inputs) out.push_back(slice(x, 0, std::int64_t(b), std::int64_t(b) + 1).clone());
  return out;
}

/// Hessian (or block) `entry` of a stack [..., rows, cols] as a [rows, cols] tensor.
Tensor hessian_at(const Tensor& h, std::size_t entry) {
  const std::size_t rows = h.shape()[h.ndim() - 2], cols = h.shape().back();
  Tensor out = zeros({rows, cols});
  std::copy(h.data() + entry * rows * cols, h.data() + (entry + 1) * rows * cols, out.mutable_data());
  return out;
}

/// Block [r0, r0+rows) x [c0, c0+cols) of a matrix.
Tensor block_of(const Tensor& m, std::size_t r0, std::size_t rows, std::size_t c0, std::size_t cols) {
  return slice(slice(m, 0, std::int64_t(r0), std::int64_t(r0 + rows)), 1, std::int64_t(c0), std::int64_t(c0 + cols))
      .clone();
}

/// The trainable parameters of a model, in registration order.
std::vector<Tensor> trainable(const nn::Module& m) {
  std::vector<Tensor> out;
  for (const auto& [name, t] : m.trainable_parameters()) out.push_back(t);
  return out;
}

/// The gradient of a scalar with respect to `params`, flattened and concatenated.
std::vector<double> flat_grad(const Tensor& scalar, const std::vector<Tensor>& params) {
  GradOptions o;
  o.allow_unused = true;
  const std::vector<Tensor> g = grad({scalar}, params, {}, o);
  std::vector<double> out;
  for (std::size_t p = 0; p < params.size(); ++p)
    for (std::size_t i = 0; i < params[p].numel(); ++i) out.push_back(g[p].defined() ? g[p].data()[i] : 0.0);
  return out;
}

/// Central differences (step h) of the gradient of `scalar()` w.r.t. `params`: [n, n].
Tensor fd_hessian(std::vector<Tensor> params, const std::function<Tensor()>& scalar, double h = 1e-6) {
  std::size_t n = 0;
  for (const Tensor& p : params) n += p.numel();
  Tensor H = zeros({n, n});
  std::size_t col = 0;
  for (Tensor& p : params)
    for (std::size_t i = 0; i < p.numel(); ++i, ++col) {
      const double orig = p.data()[i];
      p.mutable_data()[i] = orig + h;
      const std::vector<double> gp = flat_grad(scalar(), params);
      p.mutable_data()[i] = orig - h;
      const std::vector<double> gm = flat_grad(scalar(), params);
      p.mutable_data()[i] = orig;
      for (std::size_t r = 0; r < n; ++r) H.mutable_data()[r * n + col] = (gp[r] - gm[r]) / (2 * h);
    }
  return H;
}

/// Central differences (step h) of the gradient of `scalar()` along v: H v, [n].
Tensor fd_hvp(std::vector<Tensor> params, const std::function<Tensor()>& scalar, const Tensor& v, double h = 1e-5) {
  std::vector<Tensor> saved;
  for (const Tensor& p : params) saved.push_back(p.clone());
  auto gradient_at = [&](double step) {  // ∇ at θ + step · v
    std::size_t at = 0;
    for (std::size_t k = 0; k < params.size(); ++k)
      for (std::size_t i = 0; i < params[k].numel(); ++i, ++at)
        params[k].mutable_data()[i] = saved[k].data()[i] + step * v.data()[at];
    return flat_grad(scalar(), params);
  };
  const std::vector<double> gp = gradient_at(h), gm = gradient_at(-h);
  for (std::size_t k = 0; k < params.size(); ++k)
    std::copy(saved[k].data(), saved[k].data() + saved[k].numel(), params[k].mutable_data());
  Tensor out = zeros({gp.size()});
  for (std::size_t r = 0; r < gp.size(); ++r) out.mutable_data()[r] = (gp[r] - gm[r]) / (2 * h);
  return out;
}

/// Largest |H - Hᵀ|.
double asymmetry(const Tensor& H) {
  const std::size_t n = H.shape()[0];
  double m = 0.0;
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) m = std::max(m, std::abs(H.data()[i * n + j] - H.data()[j * n + i]));
  return m;
}

/// max |eigenvalue| of a symmetric [n, n] tensor, computed by LAPACK through xtensor-blas.
double max_abs_eig(const Tensor& H) {
  const Array w = xt::linalg::eigvalsh(arr(H));
  return std::max(std::abs(xt::amin(w)()), std::abs(xt::amax(w)()));
}

/// A model MLP with two different smooth activations: gelu and softplus.
std::shared_ptr<nn::Sequential> gelu_softplus_net(Generator& gen, std::size_t in = 3, std::size_t hidden = 4,
                                                  std::size_t out = 3) {
  auto net = std::make_shared<nn::Sequential>();
  net->add(std::make_shared<nn::Linear>(in, hidden, true, gen));
  net->add(std::make_shared<nn::GELU>());
  net->add(std::make_shared<nn::Linear>(hidden, hidden, true, gen));
  net->add(std::make_shared<nn::Softplus>());
  net->add(std::make_shared<nn::Linear>(hidden, out, true, gen));
  return net;
}

/// Offsets of each trainable parameter in θ (registration order).
std::vector<std::size_t> offsets_of(const nn::Module& m) {
  std::vector<std::size_t> off;
  std::size_t n = 0;
  for (const auto& [name, t] : m.trainable_parameters()) {
    off.push_back(n);
    n += t.numel();
  }
  off.push_back(n);
  return off;
}

/// Sets the thread count for one test; back to automatic after.
struct ThreadCount {
  explicit ThreadCount(std::size_t threads) { set_num_threads(threads); }
  ~ThreadCount() { set_num_threads(0); }
};

/// The positions in θ (every trainable parameter, registration order) of the named ones.
std::vector<std::int64_t> positions_of(const nn::Module& m, const std::set<std::string>& names) {
  std::vector<std::int64_t> out;
  std::int64_t at = 0;
  for (const auto& [name, t] : m.trainable_parameters())
    for (std::size_t i = 0; i < t.numel(); ++i, ++at)
      if (names.count(name)) out.push_back(at);
  return out;
}

/// Rows and columns `keep` of every matrix of a stack [..., n, n].
Tensor sub_matrix(const Tensor& h, const std::vector<std::int64_t>& keep) {
  const int last = int(h.ndim()) - 1;
  return index_select(index_select(h, last - 1, keep), last, keep).clone();
}

/// A stack of Hessians [..., n, n] with its off-diagonal blocks (P ≠ Q, P at [off[P], off[P + 1])) zeroed.
Tensor without_off_diagonal_blocks(const Tensor& h, const std::vector<std::size_t>& off) {
  Tensor out = h.clone();
  const std::size_t n = off.back();
  for (std::size_t e = 0; e < h.numel() / (n * n); ++e)
    for (std::size_t p = 0; p + 1 < off.size(); ++p)
      for (std::size_t q = 0; q + 1 < off.size(); ++q)
        if (p != q)
          for (std::size_t i = off[p]; i < off[p + 1]; ++i)
            for (std::size_t j = off[q]; j < off[q + 1]; ++j) out.mutable_data()[(e * n + i) * n + j] = 0.0;
  return out;
}

/// Each block (P, Q) of `d` has shape lead + P.shape + Q.shape (lead: the shape of the
/// stack h [lead..., n, n]) and, entry by entry, is exactly the matching block of h. With
/// diagonal_only the (P, Q ≠ P) blocks are absent from the dict and zero in h.
void check_dict_matches_matrix(const HessianDict& d, const Tensor& h, const nn::Module& m,
                               bool diagonal_only = false) {
  const Shape lead(h.shape().begin(), h.shape().end() - 2);
  const std::size_t n = h.shape().back(), entries = h.numel() / (n * n);
  std::vector<Shape> shapes;
  std::vector<std::size_t> off{0};
  for (const std::string& name : d.names()) {
    shapes.push_back(m.parameter(name).shape());
    off.push_back(off.back() + m.parameter(name).numel());
  }
  BOOST_REQUIRE_EQUAL(off.back(), n);
  for (std::size_t p = 0; p < shapes.size(); ++p)
    for (std::size_t q = 0; q < shapes.size(); ++q) {
      const std::string& P = d.names()[p];
      const std::string& Q = d.names()[q];
      BOOST_TEST_CONTEXT("block (" << P << ", " << Q << ")") {
        const std::size_t rp = off[p + 1] - off[p], rq = off[q + 1] - off[q];
        if (diagonal_only && p != q) {
          BOOST_CHECK(!d.contains(P, Q));
          for (std::size_t e = 0; e < entries; ++e)
            CHECK_EXACT(block_of(hessian_at(h, e), off[p], rp, off[q], rq), zeros({rp, rq}));
          continue;
        }
        BOOST_REQUIRE(d.contains(P, Q));
        Shape expected = lead;
        expected.insert(expected.end(), shapes[p].begin(), shapes[p].end());
        expected.insert(expected.end(), shapes[q].begin(), shapes[q].end());
        BOOST_CHECK(d(P, Q).shape() == expected);
        const Tensor blocks = reshape(d(P, Q), Shape{entries, rp, rq});
        for (std::size_t e = 0; e < entries; ++e)
          CHECK_EXACT(hessian_at(blocks, e), block_of(hessian_at(h, e), off[p], rp, off[q], rq));
      }
    }
}

/// The Jacobian of nn::Bilinear's output for sample s by θ = [weight, bias]:
/// J = [I_out ⊗ (x1_s ⊗ x2_s)ᵀ, I_out], [out, n]. The output is linear in θ.
Array bilinear_jacobian(const Tensor& x1, const Tensor& x2, std::size_t s, std::size_t out) {
  const std::size_t in1 = x1.shape()[1], in2 = x2.shape()[1], nw = out * in1 * in2;
  Array a = xt::zeros<double>({std::size_t(1), in1}), b = xt::zeros<double>({std::size_t(1), in2});
  for (std::size_t i = 0; i < in1; ++i) a(0, i) = x1.data()[s * in1 + i];
  for (std::size_t j = 0; j < in2; ++j) b(0, j) = x2.data()[s * in2 + j];
  Array J = xt::zeros<double>({out, nw + out});
  xt::view(J, xt::all(), xt::range(0, nw)) = kron(identity(out), kron(a, b));
  xt::view(J, xt::all(), xt::range(nw, nw + out)) = identity(out);
  return J;
}

/// ∂²(x1ᵀ B1 B2 x2)/∂B1 ∂B2 for sample s, B1 [p, q], B2 [q, r]: x1_s ⊗ I_q ⊗ x2_sᵀ, [p·q, q·r].
Array double_bilinear_cross_block(const Tensor& x1, const Tensor& x2, std::size_t s, std::size_t q) {
  const std::size_t p = x1.shape()[1], r = x2.shape()[1];
  Array x1c = xt::zeros<double>({p, std::size_t(1)}), x2r = xt::zeros<double>({std::size_t(1), r});
  for (std::size_t a = 0; a < p; ++a) x1c(a, 0) = x1.data()[s * p + a];
  for (std::size_t j = 0; j < r; ++j) x2r(0, j) = x2.data()[s * r + j];
  return kron(kron(x1c, identity(q)), x2r);
}

/// The whole Hessian of x1ᵀ B1 B2 x2 for sample s: [[0, C], [Cᵀ, 0]], C the cross block.
Tensor double_bilinear_hessian(const Tensor& x1, const Tensor& x2, std::size_t s, std::size_t q) {
  const Array C = double_bilinear_cross_block(x1, x2, s, q);
  const std::size_t n1 = C.shape()[0], n2 = C.shape()[1];
  Array h = xt::zeros<double>({n1 + n2, n1 + n2});
  xt::view(h, xt::range(0, n1), xt::range(n1, n1 + n2)) = C;
  xt::view(h, xt::range(n1, n1 + n2), xt::range(0, n1)) = xt::transpose(C);
  return Tensor(h);
}

// ---------------------------------------------------------------- models

/// f = (‖A‖² + ‖B‖²) s for an input scalar s per sample: s [N, 1] -> [N, 1].
struct SquaredNorms : nn::Module {
  Tensor A, B;
  explicit SquaredNorms(Generator& gen) {
    A = register_parameter("A", randn({2, 3}, gen));
    B = register_parameter("B", randn({3}, gen));
  }
  Tensor forward(const std::vector<Tensor>& in) override { return (sum(square(A)) + sum(square(B))) * in[0]; }
};

/// A Linear that records whether it was in training mode at each forward
/// (and, when asked, then refuses inputs with a negative entry).
struct ModeRecorder : nn::Module {
  std::shared_ptr<nn::Linear> lin;
  std::vector<bool> seen;
  bool refuses_negative_inputs = false;
  explicit ModeRecorder(Generator& gen) { lin = register_module("lin", std::make_shared<nn::Linear>(3, 2, true, gen)); }
  Tensor forward(const std::vector<Tensor>& in) override {
    seen.push_back(is_training());
    seen.push_back(lin->is_training());
    const double* x = in[0].data();
    if (refuses_negative_inputs && std::any_of(x, x + in[0].numel(), [](double v) { return v < 0; }))
      throw ValueError("ModeRecorder: a negative input");
    return tanh((*lin)(in[0]));
  }
};

/// y_b = (w·x_b) Σ_c w·x_c for x [N, 3]: every output depends on the whole batch.
/// Over the batch, ∂²y_b/∂w² = x_b x̄ᵀ + x̄ x_bᵀ (x̄ = Σ_c x_c); a sample alone
/// (x̄ = x_b) gives 2 x_b x_bᵀ.
struct CouplesTheBatch : nn::Module {
  Tensor w;
  CouplesTheBatch() { w = register_parameter("w", Tensor{0.5, -1.0, 2.0}); }
  Tensor forward(const std::vector<Tensor>& in) override {
    const Tensor s = matmul(in[0], w);  // [N]
    return s * sum(s);
  }
};

/// y = s² W ⊙ x for x [N, 2, 3]: a 0-d parameter s, W [2, 3], and two output
/// dims per sample. Per entry (b, i, j): ∂²y/∂s² = 2 W_ij x_bij,
/// ∂²y/∂s ∂W_ij = 2 s x_bij, and ∂²y/∂W² = 0.
struct ScalarTimesMatrix : nn::Module {
  Tensor s, W;
  ScalarTimesMatrix() {
    s = register_parameter("s", Tensor(1.5));
    W = register_parameter("W", Tensor{{1.0, -2.0, 0.5}, {3.0, 0.25, -1.0}});
  }
  Tensor forward(const std::vector<Tensor>& in) override { return square(s) * W * in[0]; }
};

/// A parameter of 2^24 entries that the output ignores; the output is 2 x.
struct HugeUnused : nn::Module {
  HugeUnused() { register_parameter("P", zeros({std::size_t(1) << 24})); }
  Tensor forward(const std::vector<Tensor>& in) override { return in[0] * 2.0; }
};

/// Another module, counting the times it runs.
struct CountsForwards : nn::Module {
  std::shared_ptr<nn::Module> inner;
  std::shared_ptr<int> forwards = std::make_shared<int>(0);
  explicit CountsForwards(std::shared_ptr<nn::Module> m) : inner(register_module("inner", std::move(m))) {}
  Tensor forward(const std::vector<Tensor>& in) override {
    ++*forwards;
    return (*inner)(in);
  }
};

/// y = x Wᵀ with a second parameter U that the output ignores.
struct PartlyUnused : nn::Module {
  Tensor W, U;
  PartlyUnused() {
    W = register_parameter("W", Tensor{{1.0, 2.0}});
    U = register_parameter("U", Tensor{3.0, 4.0});
  }
  Tensor forward(const std::vector<Tensor>& in) override { return matmul(in[0], transpose(W)); }
};

/// y = (x ⊙ w²) ⊙ w for x [N, 2]: ∂²y_ij/∂w_j² = 6 x_ij w_j, every other entry zero.
/// The gradient's graph holds its seed (the last product's rule multiplies it by
/// the other factor, which depends on w).
struct CubeTimesInput : nn::Module {
  Tensor w;
  CubeTimesInput() { w = register_parameter("w", Tensor{0.5, -2.0}); }
  Tensor forward(const std::vector<Tensor>& in) override { return (in[0] * square(w)) * w; }
};

/// tanh(x W) with W [2, 2], refusing inputs whose first entry is negative.
struct RefusesNegativeInputs : nn::Module {
  Tensor W;
  RefusesNegativeInputs() { W = register_parameter("W", Tensor{{0.5, -1.0}, {2.0, 0.25}}); }
  Tensor forward(const std::vector<Tensor>& in) override {
    if (in[0].data()[0] < 0) throw ValueError("RefusesNegativeInputs: negative input");
    return tanh(matmul(in[0], W));
  }
};

/// A model whose per-sample output is a scalar (no batch dimension).
struct SumsTheBatch : nn::Module {
  Tensor W;
  explicit SumsTheBatch(Generator& gen) { W = register_parameter("W", randn({3}, gen)); }
  Tensor forward(const std::vector<Tensor>& in) override { return sum(tanh(matmul(in[0], W))); }
};

// Each sample's output has as many entries as its input's first value says.
struct OutputSizeVaries : nn::Module {
  Tensor w;
  OutputSizeVaries() { w = register_parameter("w", Tensor{1.0, 2.0, 3.0}); }
  Tensor forward(const std::vector<Tensor>& in) override {
    return slice(reshape(square(w) * sum(in[0]), {1, 3}), 1, 0, std::int64_t(in[0].data()[0]));
  }
};

const Tensor mimo_x() { return Tensor{{1, 2}, {3, 4}}; }

HessianOptions with_params(std::vector<std::string> names) {
  HessianOptions o;
  o.params = std::move(names);
  return o;
}

}  // namespace

// ================================================================ MimoModel

BOOST_AUTO_TEST_SUITE(mimo_model)

BOOST_AUTO_TEST_CASE(matrix_equals_the_seed_readme_blocks_exactly) {
  Generator gen(1);
  MimoModel model(gen);
  const Tensor x = mimo_x(), y = -x;
  const Tensor h = model_hessian_matrix(model, {x, y});
  BOOST_CHECK(h.shape() == Shape({2, 4, 8, 8}));
  CHECK_EXACT(h, seed_readme_hessian(x));
  // spot-check the README's numbers: entry (1, 3) is -8 on B's block
  BOOST_CHECK_EQUAL(h.data()[((1 * 4 + 3) * 8 + 5) * 8 + 5], -8.0);
  BOOST_CHECK_EQUAL(h.data()[((0 * 4 + 1) * 8 + 2) * 8 + 2], 4.0);
  BOOST_CHECK_EQUAL(h.data()[((0 * 4 + 1) * 8 + 6) * 8 + 6], 0.0);
}

BOOST_AUTO_TEST_CASE(dict_blocks_have_parameter_shapes_and_match_the_matrix) {
  Generator gen(2);
  MimoModel model(gen);
  const Tensor x = mimo_x(), y = -x;
  const HessianDict d = model_hessian_dict(model, {x, y});
  const Tensor h = model_hessian_matrix(model, {x, y});
  BOOST_CHECK(d.names() == std::vector<std::string>({"A", "B"}));
  BOOST_CHECK_EQUAL(d.blocks().size(), 4u);
  const std::vector<std::string> names{"A", "B"};
  for (std::size_t p = 0; p < 2; ++p)
    for (std::size_t q = 0; q < 2; ++q) {
      BOOST_REQUIRE(d.contains(names[p], names[q]));
      const Tensor& blk = d(names[p], names[q]);
      BOOST_CHECK(blk.shape() == Shape({2, 4, 2, 2, 2, 2}));
      for (std::size_t e = 0; e < 8; ++e)
        for (std::size_t a = 0; a < 4; ++a)
          for (std::size_t b = 0; b < 4; ++b)
            BOOST_CHECK_EQUAL(blk.data()[(e * 4 + a) * 4 + b], h.data()[(e * 8 + 4 * p + a) * 8 + 4 * q + b]);
    }
  HESSE_CHECK_THROWS(d.at("A", "C"), ValueError, "'C'");
}

BOOST_AUTO_TEST_CASE(params_subset_gives_a_blocks) {
  Generator gen(3);
  MimoModel model(gen);
  const Tensor x = mimo_x(), y = -x;
  const Tensor ha = model_hessian_matrix(model, {x, y}, with_params({"A"}));
  BOOST_CHECK(ha.shape() == Shape({2, 4, 4, 4}));
  const Tensor h = model_hessian_matrix(model, {x, y});
  for (std::size_t e = 0; e < 8; ++e)
    for (std::size_t a = 0; a < 4; ++a)
      for (std::size_t b = 0; b < 4; ++b)
        BOOST_CHECK_EQUAL(ha.data()[(e * 4 + a) * 4 + b], h.data()[(e * 8 + a) * 8 + b]);
  const HessianDict db = model_hessian_dict(model, {x, y}, with_params({"B"}));
  BOOST_CHECK(db.names() == std::vector<std::string>({"B"}));
  BOOST_CHECK_EQUAL(db.blocks().size(), 1u);
  BOOST_CHECK(db("B", "B").shape() == Shape({2, 4, 2, 2, 2, 2}));
  CHECK_EXACT(db("B", "B"), model_hessian_dict(model, {x, y})("B", "B"));
}

BOOST_AUTO_TEST_CASE(diagonal_only_keeps_only_diagonal_blocks) {
  Generator gen(4);
  MimoModel model(gen);
  const Tensor x = mimo_x(), y = -x;
  HessianOptions o;
  o.diagonal_only = true;
  const HessianDict d = model_hessian_dict(model, {x, y}, o);
  BOOST_CHECK_EQUAL(d.blocks().size(), 2u);
  BOOST_CHECK(d.contains("A", "A") && d.contains("B", "B"));
  BOOST_CHECK(!d.contains("A", "B") && !d.contains("B", "A"));
  HESSE_CHECK_THROWS(d.at("A", "B"), ValueError, "diagonal_only");
  const Tensor h = model_hessian_matrix(model, {x, y}, o);
  CHECK_EXACT(h, seed_readme_hessian(x));  // off-diagonal blocks are zero here anyway
  const HessianDict full = model_hessian_dict(model, {x, y});
  CHECK_EXACT(d("A", "A"), full("A", "A"));
  CHECK_EXACT(d("B", "B"), full("B", "B"));
}

BOOST_AUTO_TEST_CASE(is_batch_false_gives_the_same_values) {
  Generator gen(5);
  MimoModel model(gen);
  const Tensor x = mimo_x(), y = -x;
  HessianOptions o;
  o.is_batch = false;
  CHECK_EXACT(model_hessian_matrix(model, {x, y}, o), seed_readme_hessian(x));
  const HessianDict a = model_hessian_dict(model, {x, y}, o), b = model_hessian_dict(model, {x, y});
  for (const auto& [key, blk] : b.blocks()) CHECK_EXACT(a.at(key.first, key.second), blk);
}

BOOST_AUTO_TEST_CASE(sharpness_of_each_entry_is_two_abs_x) {
  Generator gen(6);
  MimoModel model(gen);
  const Tensor x = mimo_x(), y = -x;
  const Tensor s = model_sharpness(model, {x, y});
  BOOST_CHECK(s.shape() == Shape({2, 4}));
  HESSE_CHECK_CLOSE(s, (Tensor{{2, 4, 2, 4}, {6, 8, 6, 8}}), 1e-12);
}

BOOST_AUTO_TEST_CASE(chunk_sizes_do_not_change_the_result) {
  Generator gen(7);
  MimoModel model(gen);
  const Tensor x = mimo_x(), y = -x;
  for (std::size_t k : {1u, 3u, 4u, 100u}) {
    HessianOptions o;
    o.chunk_size = k;
    CHECK_EXACT(model_hessian_matrix(model, {x, y}, o), seed_readme_hessian(x));
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ closed forms

BOOST_AUTO_TEST_SUITE(closed_forms)

BOOST_AUTO_TEST_CASE(bilinear_model_hessian_is_zero) {
  Generator gen(10);
  nn::Bilinear bil(3, 2, 2, true, gen);
  const Tensor x1 = randn({3, 3}, gen), x2 = randn({3, 2}, gen);
  const Tensor h = model_hessian_matrix(bil, {x1, x2});
  BOOST_CHECK(h.shape() == Shape({3, 2, 14, 14}));
  CHECK_EXACT(h, zeros({3, 2, 14, 14}));
  HessianOptions o;
  o.is_batch = false;
  CHECK_EXACT(model_hessian_matrix(bil, {x1, x2}, o), zeros({3, 2, 14, 14}));
  const HessianDict d = model_hessian_dict(bil, {x1, x2});
  BOOST_CHECK(d("weight", "bias").shape() == Shape({3, 2, 2, 3, 2, 2}));
  BOOST_CHECK(d("bias", "weight").shape() == Shape({3, 2, 2, 2, 3, 2}));
  CHECK_EXACT(d("weight", "weight"), zeros({3, 2, 2, 3, 2, 2, 3, 2}));
}

BOOST_AUTO_TEST_CASE(bilinear_mse_sum_loss_hessian_is_two_jt_j) {
  Generator gen(11);
  const std::size_t N = 3, in1 = 3, in2 = 2, out = 2, nw = out * in1 * in2, n = nw + out;
  nn::Bilinear bil(in1, in2, out, true, gen);
  const Tensor x1 = randn({N, in1}, gen), x2 = randn({N, in2}, gen), t = randn({N, out}, gen);
  const Tensor h = loss_hessian_matrix(bil, nn::MSELoss(nn::Reduction::sum), {x1, x2}, t);
  BOOST_REQUIRE(h.shape() == Shape({n, n}));

  Array expected = xt::zeros<double>({n, n});
  for (std::size_t s = 0; s < N; ++s) {
    const Array J = bilinear_jacobian(x1, x2, s, out);
    expected += 2.0 * matmul2(xt::transpose(J), J);
  }
  HESSE_CHECK_CLOSE(h, Tensor(expected), 1e-12);
  BOOST_CHECK_LE(asymmetry(h), 1e-12);
  // the weight-bias block is 2 Σ_n (I ⊗ x12ᵀ)ᵀ I: a row per weight entry
  const HessianDict d = loss_hessian_dict(bil, nn::MSELoss(nn::Reduction::sum), {x1, x2}, t);
  BOOST_CHECK(d("weight", "bias").shape() == Shape({out, in1, in2, out}));
  HESSE_CHECK_CLOSE(reshape(d("weight", "bias"), Shape{nw, out}), block_of(h, 0, nw, nw, out), 0.0);
  HESSE_CHECK_CLOSE(reshape(d("bias", "bias"), Shape{out, out}), Tensor(2.0 * N * identity(out)), 1e-12);
}

BOOST_AUTO_TEST_CASE(double_bilinear_has_commutation_kronecker_structure) {
  Generator gen(12);
  const std::size_t p = 3, q = 2, r = 4;
  DoubleBilinear model(p, q, r, gen);
  const Tensor x1 = randn({1, p}, gen), x2 = randn({1, r}, gen);
  const HessianDict d = model_hessian_dict(model, {x1, x2});
  BOOST_REQUIRE(d("B1", "B2").shape() == Shape({1, p, q, q, r}));
  BOOST_CHECK(d("B2", "B1").shape() == Shape({1, q, r, p, q}));
  CHECK_EXACT(d("B1", "B1"), zeros({1, p, q, p, q}));
  CHECK_EXACT(d("B2", "B2"), zeros({1, q, r, q, r}));

  // entrywise: ∂²f/∂B1_ab ∂B2_cd = x1_a δ_bc x2_d
  Array x1c = xt::zeros<double>({p, std::size_t(1)}), x2r = xt::zeros<double>({std::size_t(1), r});
  for (std::size_t a = 0; a < p; ++a) x1c(a, 0) = x1.data()[a];
  for (std::size_t j = 0; j < r; ++j) x2r(0, j) = x2.data()[j];
  Array entrywise = xt::zeros<double>({p * q, q * r});
  for (std::size_t a = 0; a < p; ++a)
    for (std::size_t b = 0; b < q; ++b)
      for (std::size_t c = 0; c < q; ++c)
        for (std::size_t e = 0; e < r; ++e) entrywise(a * q + b, c * r + e) = (b == c) ? x1c(a, 0) * x2r(0, e) : 0.0;
  // Kronecker form: x1 ⊗ I_q ⊗ x2ᵀ
  const Array kform = double_bilinear_cross_block(x1, x2, 0, q);
  // commutation form: K (I_q ⊗ x1 x2ᵀ), K the [pq, qp] commutation matrix taking
  // the (b, a)-ordered rows of I_q ⊗ x1 x2ᵀ to the (a, b) order of vec_r(B1)
  Array K = xt::zeros<double>({p * q, q * p});
  for (std::size_t a = 0; a < p; ++a)
    for (std::size_t b = 0; b < q; ++b) K(a * q + b, b * p + a) = 1.0;
  const Array cform = matmul2(K, kron(identity(q), matmul2(x1c, x2r)));
  BOOST_REQUIRE(entrywise == kform);
  BOOST_REQUIRE(entrywise == cform);

  const Tensor b12 = reshape(d("B1", "B2"), Shape{p * q, q * r});
  const Tensor b21 = reshape(d("B2", "B1"), Shape{q * r, p * q});
  CHECK_EXACT(b12, Tensor(kform));
  CHECK_EXACT(b21, Tensor(Array(xt::transpose(kform))));

  // the matrix form: [[0, C], [Cᵀ, 0]]
  const Tensor h = model_hessian_matrix(model, {x1, x2});
  BOOST_REQUIRE(h.shape() == Shape({1, p * q + q * r, p * q + q * r}));
  const Tensor m = hessian_at(h, 0);
  CHECK_EXACT(block_of(m, 0, p * q, p * q, q * r), Tensor(kform));
  CHECK_EXACT(block_of(m, p * q, q * r, 0, p * q), Tensor(Array(xt::transpose(kform))));
  CHECK_EXACT(block_of(m, 0, p * q, 0, p * q), zeros({p * q, p * q}));
}

// Per sample, Bilinear under a summed MSE has the loss Hessian 2 J_bᵀ J_b.
BOOST_AUTO_TEST_CASE(batch_bilinear_mse_sum_loss_hessians_are_two_jt_j_per_sample) {
  Generator gen(14);
  const std::size_t N = 4, in1 = 3, in2 = 2, out = 2, n = out * in1 * in2 + out;
  nn::Bilinear bil(in1, in2, out, true, gen);
  const Tensor x1 = randn({N, in1}, gen), x2 = randn({N, in2}, gen), t = randn({N, out}, gen);
  const Tensor hb = batch_loss_hessian_matrix(bil, nn::MSELoss(nn::Reduction::sum), {x1, x2}, t);
  BOOST_REQUIRE(hb.shape() == Shape({N, n, n}));
  for (std::size_t s = 0; s < N; ++s) {
    const Array J = bilinear_jacobian(x1, x2, s, out);
    HESSE_CHECK_CLOSE(hessian_at(hb, s), Tensor(Array(2.0 * matmul2(xt::transpose(J), J))), 1e-12);
  }
}

// The samples of x1ᵀ B1 B2 x2 are independent: per sample or over the whole
// batch, output b's Hessian is [[0, C_b], [C_bᵀ, 0]], C_b = x1_b ⊗ I_q ⊗ x2_bᵀ.
BOOST_AUTO_TEST_CASE(double_bilinear_hessians_of_a_batch_are_each_samples_closed_form) {
  Generator gen(15);
  const std::size_t N = 3, p = 3, q = 2, r = 4, n = p * q + q * r;
  DoubleBilinear model(p, q, r, gen);
  const Tensor x1 = randn({N, p}, gen), x2 = randn({N, r}, gen);
  for (const bool is_batch : {true, false}) {
    BOOST_TEST_CONTEXT("is_batch " << is_batch) {
      HessianOptions o;
      o.is_batch = is_batch;
      const Tensor h = model_hessian_matrix(model, {x1, x2}, o);
      BOOST_REQUIRE(h.shape() == Shape({N, n, n}));
      for (std::size_t b = 0; b < N; ++b) CHECK_EXACT(hessian_at(h, b), double_bilinear_hessian(x1, x2, b, q));
      check_dict_matches_matrix(model_hessian_dict(model, {x1, x2}, o), h, model);
    }
  }
}

// diagonal_only must cut the work, not only the output. For f = x1ᵀ B1 B2 x2
// the products are counted by hand ([m, k]·[k, n] costs 2mnk), per sample:
//   forward:          x1 B1: 2pq,  (x1 B1) B2: 2qr
//   first level:      u = x2 B2ᵀ: 2qr,  ∂f/∂B2 = (x1 B1)ᵀ x2: 2qr,  ∂f/∂B1 = x1ᵀ u: 2pq
//   a row S of B1's:  x1 S: 2pq, then (x1 S)ᵀ x2 on to B2: 2qr
// ∂f/∂B1 does not depend on B1, nor ∂f/∂B2 on B2: the (P, P) blocks are zero and
// a diagonal_only request is the forward and the first level alone.
BOOST_AUTO_TEST_CASE(diagonal_only_skips_the_off_diagonal_passes) {
  using hesse::testing::gemm_flops_of;
  ThreadCount one_thread(1);  // a helper computing loss rows would run one more forward pass
  Generator gen(16);
  const std::size_t N = 3, p = 3, q = 2, r = 4;
  DoubleBilinear model(p, q, r, gen);
  const Tensor x1 = randn({N, p}, gen), x2 = randn({N, r}, gen), t = randn({N}, gen);
  const std::vector<std::size_t> off = offsets_of(model);
  HessianOptions diagonal;
  diagonal.diagonal_only = true;
  const std::uint64_t first_level = 4 * p * q + 6 * q * r, row_of_b1 = 2 * p * q + 2 * q * r;
  Tensor full, diag;
  BOOST_TEST(gemm_flops_of([&] { full = model_hessian_matrix(model, {x1, x2}); }) ==
             N * (first_level + p * q * row_of_b1));
  BOOST_TEST(gemm_flops_of([&] { diag = model_hessian_matrix(model, {x1, x2}, diagonal); }) == N * first_level);
  BOOST_TEST(gemm_flops_of([&] { model_hessian_dict(model, {x1, x2}, diagonal); }) == N * first_level);
  CHECK_EXACT(diag, without_off_diagonal_blocks(full, off));

  // Under a mean MSE the (P, P) blocks are not zero. A row of B1's also reaches B2,
  // by two products of [q, N]·[N, r]: through the B2ᵀ of ∂L/∂B1 = x1ᵀ (δ x2) B2ᵀ
  // (δ = ∂L/∂f), and through δ to the forward's (x1 B1) B2. Those, and only those, are skipped.
  const nn::MSELoss mse;
  HessianDict dict;
  const std::uint64_t full_flops = gemm_flops_of([&] { full = loss_hessian_matrix(model, mse, {x1, x2}, t); });
  const std::uint64_t diag_flops =
      gemm_flops_of([&] { diag = loss_hessian_matrix(model, mse, {x1, x2}, t, diagonal); });
  BOOST_TEST(full_flops - diag_flops == p * q * 2 * (2 * q * N * r));
  BOOST_TEST(gemm_flops_of([&] { dict = loss_hessian_dict(model, mse, {x1, x2}, t, diagonal); }) == diag_flops);
  const Tensor full_diagonal_blocks = without_off_diagonal_blocks(full, off);
  BOOST_CHECK_GT(max_abs(full - full_diagonal_blocks), 0.1);  // the skipped blocks are not zero
  BOOST_CHECK_GT(max_abs(full_diagonal_blocks), 0.1);         // nor the kept ones
  CHECK_EXACT(diag, full_diagonal_blocks);
  check_dict_matches_matrix(dict, diag, model, true);
}

// A 0-d parameter and per-sample outputs [2, 3]: block (P, Q) of the dict has
// shape output.shape + P.shape + Q.shape, so (s, s) is [N, 2, 3].
BOOST_AUTO_TEST_CASE(scalar_parameter_and_matrix_outputs_have_closed_form_blocks) {
  ScalarTimesMatrix model;
  const std::size_t N = 2, n = 7;  // θ = [s | W (6)]
  const Tensor x = Tensor{{{1.0, 2.0, -1.0}, {0.5, 3.0, 4.0}}, {{-2.0, 1.0, 0.25}, {1.0, -0.5, 2.0}}};
  Tensor expected = zeros({N, 2, 3, n, n});
  for (std::size_t e = 0; e < N * 6; ++e) {  // entry (b, i, j); W_ij is θ's entry 1 + e % 6
    double* h = expected.mutable_data() + e * n * n;
    const std::size_t w = 1 + e % 6;
    h[0] = 2.0 * model.W.data()[e % 6] * x.data()[e];
    h[w] = h[w * n] = 2.0 * model.s.item() * x.data()[e];
  }
  for (const bool is_batch : {true, false}) {
    BOOST_TEST_CONTEXT("is_batch " << is_batch) {
      HessianOptions o;
      o.is_batch = is_batch;
      const Tensor h = model_hessian_matrix(model, {x}, o);
      CHECK_EXACT(h, expected);
      const HessianDict d = model_hessian_dict(model, {x}, o);
      BOOST_CHECK(d("s", "s").shape() == Shape({N, 2, 3}));
      BOOST_CHECK(d("s", "W").shape() == Shape({N, 2, 3, 2, 3}));
      check_dict_matches_matrix(d, h, model);
    }
  }
}

BOOST_AUTO_TEST_CASE(squared_norms_times_input_is_two_x_identity) {
  Generator gen(13);
  SquaredNorms model(gen);
  const Tensor s = reshape(Tensor{1.5, -0.25, 3.0}, Shape{3, 1});
  const Tensor h = model_hessian_matrix(model, {s});
  BOOST_REQUIRE(h.shape() == Shape({3, 1, 9, 9}));
  for (std::size_t b = 0; b < 3; ++b) CHECK_EXACT(hessian_at(h, b), Tensor(2.0 * s.data()[b] * identity(9)));
  HessianOptions o;
  o.is_batch = false;
  CHECK_EXACT(model_hessian_matrix(model, {s}, o), h);
  // sharpness 2|s|
  HESSE_CHECK_CLOSE(model_sharpness(model, {s}), reshape(Tensor{3.0, 0.5, 6.0}, Shape{3, 1}), 1e-12);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ parameter selection

BOOST_AUTO_TEST_SUITE(selection)

BOOST_AUTO_TEST_CASE(frozen_parameter_is_excluded) {
  Generator gen(20);
  nn::Linear lin(3, 2, true, gen);
  lin.bias.requires_grad_(false);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 2}, gen);
  const Tensor h = loss_hessian_matrix(lin, nn::MSELoss(), {x}, t);
  BOOST_CHECK(h.shape() == Shape({6, 6}));
  const HessianDict d = loss_hessian_dict(lin, nn::MSELoss(), {x}, t);
  BOOST_CHECK(d.names() == std::vector<std::string>({"weight"}));
  BOOST_CHECK_EQUAL(d.blocks().size(), 1u);
  BOOST_CHECK(!d.contains("bias", "bias"));
  BOOST_CHECK(model_hessian_matrix(lin, {x}).shape() == Shape({4, 2, 6, 6}));
  BOOST_CHECK(!lin.bias.requires_grad());  // still frozen
}

// Freezing a parameter drops its rows and columns and changes no other value.
BOOST_AUTO_TEST_CASE(frozen_parameter_leaves_the_sub_block_of_the_others) {
  Generator gen(26);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  const nn::MSELoss mse;
  const std::vector<std::int64_t> others = positions_of(*net, {"0.weight", "2.weight", "2.bias"});
  const Tensor loss = loss_hessian_matrix(*net, mse, {x}, t), model = model_hessian_matrix(*net, {x});
  const HessianDict dict = model_hessian_dict(*net, {x});
  net->parameter("0.bias").requires_grad_(false);
  const Tensor frozen_loss = loss_hessian_matrix(*net, mse, {x}, t);
  const Tensor frozen_model = model_hessian_matrix(*net, {x});
  BOOST_REQUIRE(frozen_model.shape() == Shape({5, 2, 22, 22}));
  CHECK_EXACT(frozen_loss, sub_matrix(loss, others));
  CHECK_EXACT(frozen_model, sub_matrix(model, others));
  BOOST_CHECK_GT(max_abs(frozen_loss), 1e-3);
  BOOST_CHECK_GT(max_abs(frozen_model), 1e-3);
  const HessianDict frozen_dict = model_hessian_dict(*net, {x});
  BOOST_CHECK(frozen_dict.names() == std::vector<std::string>({"0.weight", "2.weight", "2.bias"}));
  BOOST_CHECK_EQUAL(frozen_dict.blocks().size(), 9u);
  for (const auto& [key, block] : frozen_dict.blocks()) CHECK_EXACT(block, dict(key.first, key.second));
}

BOOST_AUTO_TEST_CASE(params_in_any_order_come_out_in_registration_order) {
  Generator gen(21);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  const HessianOptions o = with_params({"2.weight", "0.bias"});
  const HessianDict d = loss_hessian_dict(*net, nn::MSELoss(), {x}, t, o);
  BOOST_CHECK(d.names() == std::vector<std::string>({"0.bias", "2.weight"}));
  BOOST_CHECK_EQUAL(d.blocks().size(), 4u);
  // the subset matrix is the corresponding sub-block of the full one
  const Tensor sub = loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o);
  const Tensor full = loss_hessian_matrix(*net, nn::MSELoss(), {x}, t);
  BOOST_REQUIRE(sub.shape() == Shape({12, 12}));
  BOOST_REQUIRE(full.shape() == Shape({26, 26}));
  HESSE_CHECK_CLOSE(sub, sub_matrix(full, positions_of(*net, {"0.bias", "2.weight"})), 1e-12);
}

BOOST_AUTO_TEST_CASE(unknown_name_is_a_value_error_naming_it) {
  Generator gen(22);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  HESSE_CHECK_THROWS(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, with_params({"0.weight", "1.weight"})),
                     ValueError, "'1.weight'");
  HESSE_CHECK_THROWS(model_hessian_matrix(*net, {x}, with_params({"nope"})), ValueError, "nope");
  HESSE_CHECK_THROWS(model_hessian_dict(*net, {x}, with_params({"nope"})), ValueError, "nope");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, with_params({"nope"})), ValueError,
                     "nope");
  HESSE_CHECK_THROWS(hessian_vector_product(*net, nn::MSELoss(), {x}, t, zeros({26}), with_params({"nope"})),
                     ValueError, "nope");
  HESSE_CHECK_THROWS(loss_hessian_diagonal(*net, nn::MSELoss(), {x}, t, with_params({"nope"})), ValueError, "nope");
}

BOOST_AUTO_TEST_CASE(empty_selection_is_a_value_error) {
  Generator gen(23);
  nn::Linear lin(3, 2, true, gen);
  lin.weight.requires_grad_(false);
  lin.bias.requires_grad_(false);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 2}, gen);
  HESSE_CHECK_THROWS(model_hessian_matrix(lin, {x}), ValueError, "no trainable parameters");
  HESSE_CHECK_THROWS(loss_hessian_matrix(lin, nn::MSELoss(), {x}, t), ValueError, "no trainable parameters");
  HESSE_CHECK_THROWS(loss_hessian_dict(lin, nn::MSELoss(), {x}, t), ValueError, "no trainable parameters");
  HESSE_CHECK_THROWS(loss_hessian_diagonal(lin, nn::MSELoss(), {x}, t), ValueError, "no trainable parameters");
}

BOOST_AUTO_TEST_CASE(naming_a_frozen_parameter_is_a_value_error) {
  Generator gen(24);
  nn::Linear lin(3, 2, true, gen);
  lin.bias.requires_grad_(false);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 2}, gen);
  HESSE_CHECK_THROWS(loss_hessian_matrix(lin, nn::MSELoss(), {x}, t, with_params({"bias"})), ValueError,
                     "'bias' is frozen");
  HESSE_CHECK_THROWS(model_hessian_dict(lin, {x}, with_params({"weight", "bias"})), ValueError, "'bias' is frozen");
  BOOST_CHECK(lin.weight.requires_grad());
  BOOST_CHECK(!lin.bias.requires_grad());
}

BOOST_AUTO_TEST_CASE(requires_grad_flags_are_restored) {
  Generator gen(25);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  net->parameter("2.bias").requires_grad_(false);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  auto flags = [&] {
    std::vector<bool> f;
    for (const auto& [name, p] : net->named_parameters()) f.push_back(p.requires_grad());
    return f;
  };
  const std::vector<bool> before = flags();
  BOOST_CHECK(before == std::vector<bool>({true, true, true, false}));
  (void)loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, with_params({"0.bias"}));
  BOOST_CHECK(flags() == before);
  (void)model_hessian_dict(*net, {x}, with_params({"2.weight"}));
  BOOST_CHECK(flags() == before);
  (void)hessian_vector_product(*net, nn::MSELoss(), {x}, t, ones({4}), with_params({"0.bias"}));
  BOOST_CHECK(flags() == before);
  (void)batch_loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, with_params({"0.weight"}));
  BOOST_CHECK(flags() == before);
  // also when the request fails half-way (target of the wrong shape)
  BOOST_CHECK_THROW(loss_hessian_matrix(*net, nn::MSELoss(), {x}, randn({5, 3}, gen), with_params({"0.bias"})),
                    ShapeError);
  BOOST_CHECK(flags() == before);
  // and the model still trains: a plain gradient reaches every trainable parameter
  const std::vector<Tensor> g = grad({nn::mse_loss((*net)(x), t)}, trainable(*net));
  for (const Tensor& gi : g) BOOST_CHECK(gi.defined() && max_abs(gi) > 0.0);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ finite differences

BOOST_AUTO_TEST_SUITE(finite_differences)

namespace {

void check_loss_hessians_against_fd(nn::Module& net, const Tensor& x, Generator& gen) {
  const std::size_t N = x.shape()[0];
  const std::size_t C = net(x).shape()[1];
  for (const hesse::testing::LossCase& c : hesse::testing::loss_cases(gen, N, C)) {
    BOOST_TEST_CONTEXT("loss " << c.name) {
      const Tensor h = loss_hessian_matrix(net, c.criterion, {x}, c.target);
      const std::vector<Tensor> params = trainable(net);
      const Tensor fd = fd_hessian(params, [&] { return c.criterion(net(x), c.target); });
      CHECK_REL(h, fd, 1e-6);
      BOOST_CHECK_LE(asymmetry(h), 1e-12);
      BOOST_CHECK_GT(max_abs(h), 1e-3);  // not trivially zero
      // the dict agrees with the matrix
      const HessianDict d = loss_hessian_dict(net, c.criterion, {x}, c.target);
      const std::vector<std::size_t> off = offsets_of(net);
      for (std::size_t p = 0; p < d.names().size(); ++p)
        for (std::size_t q = 0; q < d.names().size(); ++q) {
          const Tensor& blk = d(d.names()[p], d.names()[q]);
          const std::size_t rp = off[p + 1] - off[p], rq = off[q + 1] - off[q];
          CHECK_EXACT(reshape(blk, Shape{rp, rq}), block_of(h, off[p], rp, off[q], rq));
        }
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(tanh_mlp_losses) {
  Generator gen(30);
  auto net = nn::mlp({3, 5, 3}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({4, 3}, gen);
  check_loss_hessians_against_fd(*net, x, gen);
}

BOOST_AUTO_TEST_CASE(gelu_softplus_mlp_losses) {
  Generator gen(31);
  auto net = gelu_softplus_net(gen);
  const Tensor x = randn({4, 3}, gen);
  check_loss_hessians_against_fd(*net, x, gen);
}

BOOST_AUTO_TEST_CASE(model_hessians_of_both_mlps) {
  Generator gen(32);
  std::vector<std::shared_ptr<nn::Module>> nets{nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen),
                                                gelu_softplus_net(gen, 3, 4, 2)};
  for (auto& net : nets) {
    const Tensor x = randn({2, 3}, gen);
    const Tensor h = model_hessian_matrix(*net, {x});
    const std::size_t n = net->num_parameters(true);
    BOOST_REQUIRE(h.shape() == Shape({2, 2, n, n}));
    const std::vector<Tensor> params = trainable(*net);
    for (std::size_t e = 0; e < 4; ++e) {
      Tensor seed = zeros({2, 2});
      seed.mutable_data()[e] = 1.0;
      const Tensor fd = fd_hessian(params, [&] { return sum((*net)(x) * seed); });
      const Tensor he = hessian_at(h, e);
      CHECK_REL(he, fd, 1e-6);
      BOOST_CHECK_LE(asymmetry(he), 1e-12);
    }
  }
}

BOOST_AUTO_TEST_CASE(diagonal_only_matrix_is_the_full_matrix_with_off_blocks_zeroed) {
  Generator gen(33);
  auto net = gelu_softplus_net(gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  HessianOptions o;
  o.diagonal_only = true;
  const Tensor full = loss_hessian_matrix(*net, nn::MSELoss(), {x}, t);
  const Tensor diag = loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o);
  const std::vector<std::size_t> off = offsets_of(*net);
  const Tensor expect = without_off_diagonal_blocks(full, off);
  BOOST_CHECK_GT(max_abs_diff(full, expect), 1e-3);  // the off blocks are really non-zero
  // the two routes sum in different orders (different seed batches): agree to rounding
  HESSE_CHECK_CLOSE(diag, expect, 1e-13);
  // model Hessians too
  const Tensor mfull = model_hessian_matrix(*net, {x});
  HESSE_CHECK_CLOSE(model_hessian_matrix(*net, {x}, o), without_off_diagonal_blocks(mfull, off), 1e-13);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ batched forms

BOOST_AUTO_TEST_SUITE(batched)

BOOST_AUTO_TEST_CASE(batch_loss_hessian_equals_per_sample_loss_hessians) {
  Generator gen(40);
  auto net = nn::mlp({3, 4, 3}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen);
  const Tensor classes = Tensor{0, 2, 1, 1, 0};
  const Tensor t = randn({5, 3}, gen);
  const std::size_t n = net->num_parameters(true);
  struct {
    Criterion c;
    Tensor target;
  } cases[] = {{nn::CrossEntropyLoss(), classes}, {nn::MSELoss(), t}};
  for (const auto& c : cases) {
    const Tensor hb = batch_loss_hessian_matrix(*net, c.c, {x}, c.target);
    BOOST_REQUIRE(hb.shape() == Shape({5, n, n}));
    for (std::size_t b = 0; b < 5; ++b) {
      const Tensor tb = slice(c.target, 0, std::int64_t(b), std::int64_t(b) + 1).clone();
      const Tensor hs = loss_hessian_matrix(*net, c.c, sample_of({x}, b), tb);
      HESSE_CHECK_CLOSE(hessian_at(hb, b), hs, 1e-12);
    }
  }
}

BOOST_AUTO_TEST_CASE(a_sample_whose_target_is_ignored_has_a_zero_hessian) {
  // its mean cross-entropy is 0 / 0 (NaN, as in PyTorch) but no derivative
  // reaches it: its Hessian, its sharpness and its part of the Fisher are zero
  Generator gen(44);
  auto net = nn::mlp({3, 4, 3}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({3, 3}, gen);
  const Tensor classes = Tensor{0, -100, 2};
  const nn::CrossEntropyLoss ce;
  const std::size_t n = net->num_parameters(true);
  const Tensor hb = batch_loss_hessian_matrix(*net, ce, {x}, classes);
  HESSE_CHECK_CLOSE(hessian_at(hb, 1), zeros({n, n}), 0.0);
  BOOST_CHECK_GT(max_abs(hessian_at(hb, 0)), 1e-3);
  const Tensor s = batch_loss_sharpness(*net, ce, {x}, classes);
  BOOST_CHECK_EQUAL(s.data()[1], 0.0);
  BOOST_CHECK(std::isfinite(s.data()[0]) && std::isfinite(s.data()[2]));
  const Tensor hv = hessian_vector_product(*net, ce, sample_of({x}, 1), slice(classes, 0, 1, 2), randn({n}, gen));
  HESSE_CHECK_CLOSE(hv, zeros({n}), 0.0);
  // the Fisher (1/3) Σ_n g_n g_nᵀ of the batch is (2/3) that of samples 0 and 2 alone
  const Tensor fisher = to_dense(empirical_fisher_operator(*net, ce, {x}, classes));
  const Tensor counted = to_dense(empirical_fisher_operator(*net, ce, {index_select(x, 0, {0, 2})}, Tensor{0, 2}));
  BOOST_CHECK_GT(max_abs(counted), 1e-3);
  CHECK_REL(fisher, counted * (2.0 / 3.0), 1e-12);
}

BOOST_AUTO_TEST_CASE(per_sample_model_hessians_equal_full_batch_ones) {
  Generator gen(41);
  auto net = gelu_softplus_net(gen, 3, 4, 2);
  const Tensor x = randn({3, 3}, gen);
  const std::size_t n = net->num_parameters(true);
  const Tensor hb = model_hessian_matrix(*net, {x});
  BOOST_REQUIRE(hb.shape() == Shape({3, 2, n, n}));
  HessianOptions o;
  o.is_batch = false;
  const Tensor hf = model_hessian_matrix(*net, {x}, o);
  BOOST_REQUIRE(hf.shape() == Shape({3, 2, n, n}));
  CHECK_REL(hb, hf, 1e-12);
  BOOST_CHECK_GT(max_abs(hb), 1e-3);
  // and the dict forms agree
  const HessianDict db = model_hessian_dict(*net, {x}), df = model_hessian_dict(*net, {x}, o);
  for (const auto& [key, blk] : db.blocks()) CHECK_REL(blk, df.at(key.first, key.second), 1e-12);
}

// With is_batch each sample is run as a batch of one; without, the whole batch
// at once. A model that couples its samples tells the two apart.
BOOST_AUTO_TEST_CASE(is_batch_runs_each_sample_alone_even_when_the_model_couples_them) {
  CouplesTheBatch model;
  const Tensor x = Tensor{{1.0, 2.0, 0.0}, {-1.0, 0.0, 3.0}, {2.0, 1.0, 1.0}};
  const Array X = arr(x);
  const Array xbar = xt::sum(X, {0});
  Array alone = xt::zeros<double>({3, 3, 3}), together = xt::zeros<double>({3, 3, 3});
  for (std::size_t b = 0; b < 3; ++b)
    for (std::size_t i = 0; i < 3; ++i)
      for (std::size_t j = 0; j < 3; ++j) {
        alone(b, i, j) = 2.0 * X(b, i) * X(b, j);
        together(b, i, j) = X(b, i) * xbar(j) + xbar(i) * X(b, j);
      }
  BOOST_REQUIRE_GT(xt::amax(xt::abs(alone - together))(), 1.0);
  HessianOptions whole;
  whole.is_batch = false;
  const Tensor per_sample = model_hessian_matrix(model, {x}), batch = model_hessian_matrix(model, {x}, whole);
  CHECK_EXACT(per_sample, Tensor(alone));
  CHECK_EXACT(batch, Tensor(together));
  check_dict_matches_matrix(model_hessian_dict(model, {x}), per_sample, model);
  check_dict_matches_matrix(model_hessian_dict(model, {x}, whole), batch, model);
  // a loss is one scalar of the whole batch, Σ_b y_b = (Σ_b w·x_b)²: 2 x̄ x̄ᵀ;
  // the per-sample losses see each sample alone
  const Criterion total = [](const Tensor& out, const Tensor&) { return sum(out); };
  CHECK_EXACT(batch_loss_hessian_matrix(model, total, {x}, Tensor()), Tensor(alone));
  const Array xbar_column = xt::reshape_view(xbar, {3, 1});
  CHECK_EXACT(loss_hessian_matrix(model, total, {x}, Tensor()),
              Tensor(Array(2.0 * matmul2(xbar_column, xt::transpose(xbar_column)))));
}

/// tanh(x W) through an op whose backward rule notes the thread it runs on,
/// takes half a millisecond (so that helper threads surely get work), and
/// refuses a sample whose first input is negative, or to run on any thread
/// but `only_on` when that is set: failures that only the derivatives meet,
/// on whichever thread computes them.
struct WatchesItsThreads : nn::Module {
  Tensor W;
  std::thread::id only_on;  // none: any thread
  std::chrono::milliseconds delay{0};             // the rule's delay on every thread
  std::chrono::milliseconds off_caller_delay{0};  // and on threads other than the constructing one
  std::thread::id caller = std::this_thread::get_id();
  bool keeps_a_node = false;  // W · 1 made on the first call, used by every later one
  int keeps_a_node_from = -1;  // or made on this call (counted from 0), used by every later one,
                               // whose derivatives (sharing it) refuse to run off the constructing thread
  int calls = 0;
  Tensor kept;
  // A sample whose first input is this one waits, once and at most 10 s, until
  // a second thread has run the rule: whether helpers get work then does not
  // depend on how fast the machine starts them.
  double waits_for_a_helper = std::nan("");
  struct Seen {
    std::mutex mutex;
    std::condition_variable changed;
    std::set<std::thread::id> threads;
    bool waited = false;
  };
  std::shared_ptr<Seen> seen = std::make_shared<Seen>();
  std::set<std::thread::id>* threads = &seen->threads;
  WatchesItsThreads() { W = register_parameter("W", Tensor{{0.5, -1.0}, {2.0, 0.25}}); }
  Tensor forward(const std::vector<Tensor>& in) override {
    const int call = calls++;
    const bool keeping = keeps_a_node || (keeps_a_node_from >= 0 && call >= keeps_a_node_from);
    if (keeping && !kept.defined()) kept = W * 1.0;
    const Tensor y = tanh(matmul(in[0], keeping ? kept : W));
    const bool refuse = in[0].data()[0] < 0;
    const bool waits = in[0].data()[0] == waits_for_a_helper;
    auto s = seen;
    const std::thread::id only = only_on, home = caller;
    const auto everywhere = delay, off_caller = off_caller_delay;
    const int keeps_from = keeps_a_node_from;
    return detail::record("watched", y.detach() * 1.0, {y}, [=](const Tensor& g, const Tensor&, Needs) {
      {
        std::unique_lock<std::mutex> lock(s->mutex);
        s->threads.insert(std::this_thread::get_id());
        s->changed.notify_all();
        if (waits && !s->waited) {
          s->waited = true;
          s->changed.wait_for(lock, std::chrono::seconds(10), [&] { return s->threads.size() > 1; });
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(500));
      std::this_thread::sleep_for(everywhere);
      if (std::this_thread::get_id() != home) std::this_thread::sleep_for(off_caller);
      if (refuse) throw ValueError("watched: refuses a negative sample");
      if (only != std::thread::id() && std::this_thread::get_id() != only)
        throw ValueError("watched: refuses to run off the caller's thread");
      if (keeps_from >= 0 && call > keeps_from && std::this_thread::get_id() != home)
        throw ValueError("watched: a sample sharing the kept node ran off the caller's thread");
      return std::vector<Tensor>{g};
    });
  }
};

// Samples' derivatives may be computed on several threads: every per-sample
// result is the same for any thread count, to the bit for any count above one
// (on one thread OpenBLAS may use its own threads, and round differently).
BOOST_AUTO_TEST_CASE(per_sample_results_do_not_depend_on_the_thread_count) {
  Generator gen(46);
  auto net = gelu_softplus_net(gen, 3, 4, 2);
  const Tensor x = randn({7, 3}, gen), t = randn({7, 2}, gen);
  const nn::MSELoss mse(nn::Reduction::sum);
  HessianOptions diagonal;
  diagonal.diagonal_only = true;
  const HessianOptions subset = with_params({"0.weight", "4.bias"});
  const std::vector<std::pair<std::string, std::function<std::vector<Tensor>()>>> requests = {
      {"model", [&] { return std::vector<Tensor>{model_hessian_matrix(*net, {x})}; }},
      {"model diagonal_only", [&] { return std::vector<Tensor>{model_hessian_matrix(*net, {x}, diagonal)}; }},
      {"model subset", [&] { return std::vector<Tensor>{model_hessian_matrix(*net, {x}, subset)}; }},
      {"batch loss", [&] { return std::vector<Tensor>{batch_loss_hessian_matrix(*net, mse, {x}, t)}; }},
      {"dict",
       [&] {
         const HessianDict d = model_hessian_dict(*net, {x});
         std::vector<Tensor> blocks;
         for (const auto& [key, block] : d.blocks()) blocks.push_back(block);
         return blocks;
       }},
      {"packed", [&] { return std::vector<Tensor>{model_hessian_packed(*net, {x}).dense()}; }},
      {"block sparse", [&] { return std::vector<Tensor>{model_hessian_block_sparse(*net, {x}).dense()}; }},
  };
  for (const auto& [name, request] : requests) {
    BOOST_TEST_CONTEXT(name) {
      std::vector<Tensor> one, two;
      {
        ThreadCount threads(1);
        one = request();
      }
      {
        ThreadCount threads(2);
        two = request();
      }
      BOOST_CHECK_GT(max_abs(one[0]), 1e-3);
      BOOST_REQUIRE_EQUAL(two.size(), one.size());
      for (std::size_t i = 0; i < one.size(); ++i) CHECK_REL(two[i], one[i], 1e-13);
      for (const std::size_t threads : {3, 16}) {
        BOOST_TEST_CONTEXT(threads << " threads") {
          ThreadCount count(threads);
          const std::vector<Tensor> many = request();
          BOOST_REQUIRE_EQUAL(many.size(), one.size());
          for (std::size_t i = 0; i < one.size(); ++i) CHECK_EXACT(many[i], two[i]);
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(samples_are_spread_over_the_threads_asked_for) {
  WatchesItsThreads model;
  const Tensor x = Tensor{{1.0, 2.0}, {0.5, 3.0}, {1.5, -1.0}, {2.0, 0.5}, {0.25, 1.0}, {3.0, 2.0}};
  const std::vector<std::pair<std::string, std::function<Tensor()>>> requests = {
      {"matrix", [&] { return model_hessian_matrix(model, {x}); }},
      {"packed", [&] { return model_hessian_packed(model, {x}).dense(); }},
      // (block-sparse requests go the same way, after a structure pass that
      // would meet the waiting sample on this thread alone)
  };
  for (const auto& [name, request] : requests) {
    BOOST_TEST_CONTEXT(name) {
      Tensor one;
      model.threads->clear();
      model.waits_for_a_helper = std::nan("");
      {
        ThreadCount threads(1);
        one = request();
        BOOST_TEST(model.threads->size() == 1u);
        BOOST_TEST(model.threads->count(std::this_thread::get_id()) == 1u);
      }
      model.threads->clear();
      model.seen->waited = false;
      model.waits_for_a_helper = 0.5;  // the second sample, kept for the threads to share
      ThreadCount threads(3);
      BOOST_TEST(num_threads() == 3u);
      const Tensor many = request();
      BOOST_TEST(model.threads->size() > 1u);  // the caller's and at least one helper's
      BOOST_TEST(model.threads->size() <= 3u);
      CHECK_REL(many, one, 1e-13);
      BOOST_CHECK_GT(max_abs(one), 0.1);
    }
  }
}

// One loss Hessian's chunks of rows are shared by threads, each with its own
// copy of the graph (made by running the model again on the calling thread).
BOOST_AUTO_TEST_CASE(a_loss_hessians_rows_are_spread_over_threads) {
  Generator gen(47);
  auto net = gelu_softplus_net(gen, 3, 4, 2);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  const nn::MSELoss mse;
  HessianOptions small_chunks;
  small_chunks.chunk_size = 3;  // many chunks for the threads to share
  HessianOptions diagonal = small_chunks;
  diagonal.diagonal_only = true;
  HessianOptions subset = with_params({"0.weight", "4.bias"});
  subset.chunk_size = 3;
  for (const HessianOptions& o : {small_chunks, diagonal, subset}) {
    BOOST_TEST_CONTEXT("diagonal_only " << o.diagonal_only << ", params " << o.params.size()) {
      Tensor one, two;
      {
        ThreadCount threads(1);
        one = loss_hessian_matrix(*net, mse, {x}, t, o);
      }
      {
        ThreadCount threads(2);
        two = loss_hessian_matrix(*net, mse, {x}, t, o);
      }
      BOOST_CHECK_GT(max_abs(one), 1e-3);
      CHECK_REL(two, one, 1e-13);
      ThreadCount threads(4);
      CHECK_EXACT(loss_hessian_matrix(*net, mse, {x}, t, o), two);
      const HessianDict d = loss_hessian_dict(*net, mse, {x}, t, o);
      const std::vector<std::size_t> off = offsets_of(*net);
      const HessianDict d1 = [&] {
        ThreadCount one_thread(1);
        return loss_hessian_dict(*net, mse, {x}, t, o);
      }();
      for (const auto& [key, block] : d1.blocks()) CHECK_REL(d.at(key.first, key.second), block, 1e-13);
    }
  }
  // the packed and block-sparse forms share their rows the same way
  for (const HessianOptions& o : {small_chunks, diagonal, subset}) {
    BOOST_TEST_CONTEXT("stored, diagonal_only " << o.diagonal_only << ", params " << o.params.size()) {
      auto packed = [&] { return loss_hessian_packed(*net, mse, {x}, t, o).dense(); };
      auto sparse = [&] { return loss_hessian_block_sparse(*net, mse, {x}, t, o).dense(); };
      Tensor packed_one, sparse_one;
      {
        ThreadCount threads(1);
        packed_one = packed();
        sparse_one = sparse();
      }
      ThreadCount threads(2);
      const Tensor packed_two = packed(), sparse_two = sparse();
      CHECK_REL(packed_two, packed_one, 1e-13);
      CHECK_REL(sparse_two, sparse_one, 1e-13);
      BOOST_CHECK_GT(max_abs(packed_one), 1e-3);
      ThreadCount four(4);
      CHECK_EXACT(packed(), packed_two);
      CHECK_EXACT(sparse(), sparse_two);
    }
  }
  // the helpers really take chunks
  WatchesItsThreads model;
  const Tensor xw = Tensor{{1.0, 2.0}, {0.5, 3.0}, {1.5, -1.0}};
  ThreadCount threads(3);
  HessianOptions one_row;
  one_row.chunk_size = 1;
  const std::vector<std::pair<std::string, std::function<Tensor()>>> requests = {
      {"matrix", [&] { return loss_hessian_matrix(model, mse, {xw}, zeros({3, 2}), one_row); }},
      {"packed", [&] { return loss_hessian_packed(model, mse, {xw}, zeros({3, 2}), one_row).dense(); }},
      {"block sparse", [&] { return loss_hessian_block_sparse(model, mse, {xw}, zeros({3, 2}), one_row).dense(); }},
  };
  for (const auto& [name, request] : requests) {
    BOOST_TEST_CONTEXT(name) {
      model.threads->clear();
      const Tensor h = request();
      BOOST_TEST(model.threads->size() > 1u);
      BOOST_CHECK_GT(max_abs(h), 0.01);
    }
  }
}

/// What `request` prints on stderr while stderr is a terminal (a pseudo-terminal).
std::string printed_on_a_terminal(const std::function<void()>& request) {
  int terminal = -1, its_side = -1;
  if (openpty(&terminal, &its_side, nullptr, nullptr, nullptr) != 0) throw std::runtime_error("openpty failed");
  std::fflush(stderr);
  const int saved_stderr = dup(STDERR_FILENO);
  dup2(its_side, STDERR_FILENO);
  std::exception_ptr error;
  try {
    request();
  } catch (...) {
    error = std::current_exception();
  }
  std::fflush(stderr);
  dup2(saved_stderr, STDERR_FILENO);
  close(saved_stderr);
  close(its_side);
  std::string printed;
  char buffer[4096];
  for (ssize_t got; (got = read(terminal, buffer, sizeof buffer)) > 0;) printed.append(buffer, std::size_t(got));
  close(terminal);
  if (error) std::rethrow_exception(error);
  return printed;
}

/// y = tanh(x · W³/3), whose Hessian rows go through a slow op: on a helper
/// thread a row takes 0.7 s (past the report's first 0.5 s). With
/// caller_waits, the calling thread's second row waits until a helper is in a
/// row of its own.
struct SlowRowsOffItsThread : nn::Module {
  Tensor W;
  struct Rows {
    std::mutex mutex;
    std::condition_variable changed;
    std::set<std::thread::id> threads;
    int on_caller = 0;
  };
  std::shared_ptr<Rows> rows = std::make_shared<Rows>();
  std::thread::id home = std::this_thread::get_id();
  bool caller_waits = false;  // for a helper, in its second row
  SlowRowsOffItsThread() { W = register_parameter("W", Tensor{{0.5, -1.0}, {2.0, 0.25}}); }
  Tensor forward(const std::vector<Tensor>& in) override {
    const Tensor w = W;
    auto r = rows;
    const std::thread::id caller = home;
    const bool waits = caller_waits;
    // W², whose derivative, taken only in the rows' passes, is the slow part
    auto square = [=] {
      return detail::record("slow square", (w * w).detach(), {w}, [=](const Tensor& g, const Tensor&, Needs) {
        std::unique_lock<std::mutex> lock(r->mutex);
        r->threads.insert(std::this_thread::get_id());
        r->changed.notify_all();
        if (std::this_thread::get_id() != caller) {
          lock.unlock();
          std::this_thread::sleep_for(std::chrono::milliseconds(700));
        } else if (++r->on_caller == 2 && waits) {
          r->changed.wait_for(lock, std::chrono::seconds(10), [&] { return r->threads.size() > 1; });
        }
        return std::vector<Tensor>{g * w * 2.0};
      });
    };
    const Tensor cube = detail::record("cube / 3", (w * w * w * (1.0 / 3)).detach(), {w},
                                       [=](const Tensor& g, const Tensor&, Needs) { return std::vector<Tensor>{g * square()}; });
    return tanh(matmul(in[0], cube));
  }
};

// The calling thread reports the progress of a request until its helpers are
// done, to the last row, when a helper computes it.
BOOST_AUTO_TEST_CASE(a_threaded_requests_progress_runs_to_the_last_row) {
  SlowRowsOffItsThread model;
  const Tensor x = Tensor{{1.0, 2.0}, {0.5, 3.0}, {1.5, -1.0}};
  HessianOptions one_row;
  one_row.chunk_size = 1;
  Tensor alone;
  {
    ThreadCount threads(1);
    HessianOptions quiet = one_row;
    quiet.progress = false;
    alone = loss_hessian_matrix(model, nn::MSELoss(), {x}, zeros({3, 2}), quiet);
  }
  model.rows->threads.clear();
  model.rows->on_caller = 0;
  model.caller_waits = true;
  ThreadCount threads(2);
  Tensor h;
  const std::string printed =
      printed_on_a_terminal([&] { h = loss_hessian_matrix(model, nn::MSELoss(), {x}, zeros({3, 2}), one_row); });
  BOOST_TEST_MESSAGE("progress: " << printed);
  const std::size_t last = printed.rfind("hesse: Hessian rows ");
  BOOST_REQUIRE(last != std::string::npos);
  BOOST_TEST(printed.substr(last, 24) == "hesse: Hessian rows 4/4 ");
  BOOST_TEST(model.rows->threads.size() == 2u);  // a helper computed rows
  CHECK_REL(h, alone, 1e-13);
  BOOST_CHECK_GT(max_abs(h), 0.01);
}

// A batch of per-sample Hessians reports the samples done, on any thread count,
// and its last line shows them all.
BOOST_AUTO_TEST_CASE(a_batch_reports_the_samples_done) {
  WatchesItsThreads model;
  model.delay = std::chrono::milliseconds(150);  // per sample: 6 of them pass the report's first 0.5 s
  const Tensor x = Tensor{{1.0, 2.0}, {0.5, 3.0}, {1.5, -1.0}, {2.0, 0.5}, {0.25, 1.0}, {3.0, 2.0}};
  for (const std::size_t count : {1, 2}) {
    BOOST_TEST_CONTEXT(count << " threads") {
      ThreadCount threads(count);
      // a helper's sample ends last: the caller's own reports stop before it
      model.off_caller_delay = std::chrono::milliseconds(600);
      Tensor h;
      const std::string printed = printed_on_a_terminal([&] { h = model_hessian_matrix(model, {x}); });
      BOOST_TEST_MESSAGE("progress: " << printed);
      const std::size_t last = printed.rfind("hesse: per-sample Hessians ");
      BOOST_REQUIRE(last != std::string::npos);
      BOOST_TEST(printed.substr(last, 31) == "hesse: per-sample Hessians 6/6 ");
      BOOST_CHECK_GT(max_abs(h), 0.1);
    }
  }
  // and says nothing when asked not to
  HessianOptions quiet;
  quiet.progress = false;
  BOOST_TEST(printed_on_a_terminal([&] { model_hessian_matrix(model, {x}, quiet); }).empty());
}

// A sample that fails on a helper thread fails the request with its own error,
// after every thread has stopped; the next request runs as before.
BOOST_AUTO_TEST_CASE(an_error_on_a_helper_thread_reaches_the_caller) {
  WatchesItsThreads model;
  const Tensor good = Tensor{{1.0, 2.0}, {0.5, 3.0}, {1.5, -1.0}, {2.0, 0.5}, {0.25, 1.0}};
  const Tensor bad = Tensor{{1.0, 2.0}, {0.5, 3.0}, {1.5, -1.0}, {-2.0, 0.5}, {0.25, 1.0}};
  const nn::MSELoss mse;
  Tensor before, before_loss;
  {
    ThreadCount threads(1);
    before = model_hessian_matrix(model, {good});
    before_loss = batch_loss_hessian_matrix(model, mse, {good}, zeros({5, 2}));
  }
  ThreadCount threads(3);
  HESSE_CHECK_THROWS(model_hessian_matrix(model, {bad}), ValueError, "refuses a negative sample");
  HESSE_CHECK_THROWS(model_hessian_dict(model, {bad}), ValueError, "refuses a negative sample");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(model, mse, {bad}, zeros({5, 2})), ValueError,
                     "refuses a negative sample");
  CHECK_REL(model_hessian_matrix(model, {good}), before, 1e-13);
  CHECK_REL(batch_loss_hessian_matrix(model, mse, {good}, zeros({5, 2})), before_loss, 1e-13);
  // the rows of one loss Hessian: a helper fails, the caller's thread does not
  HessianOptions one_row;
  one_row.chunk_size = 1;
  const Tensor loss_before = loss_hessian_matrix(model, mse, {good}, zeros({5, 2}), one_row);
  model.only_on = std::this_thread::get_id();
  HESSE_CHECK_THROWS(loss_hessian_matrix(model, mse, {good}, zeros({5, 2}), one_row), ValueError,
                     "off the caller's thread");
  HESSE_CHECK_THROWS(loss_hessian_dict(model, mse, {good}, zeros({5, 2}), one_row), ValueError,
                     "off the caller's thread");
  {
    ThreadCount one_thread(1);
    CHECK_REL(loss_hessian_matrix(model, mse, {good}, zeros({5, 2}), one_row), loss_before, 1e-13);
  }
  model.only_on = std::thread::id();
  CHECK_EXACT(loss_hessian_matrix(model, mse, {good}, zeros({5, 2}), one_row), loss_before);
}

// A backward pass writes into the nodes it runs through, so threads only take
// samples or rows whose graphs share no node: here the input has a history (it
// depends on the parameter itself), and every sample's slice of it reaches the
// same nodes. The work stays on the calling thread and the result is exact.
BOOST_AUTO_TEST_CASE(threads_leave_shared_graphs_alone) {
  WatchesItsThreads model;
  const Tensor x = Tensor{{1.0, 2.0}, {0.5, 3.0}, {1.5, -1.0}, {2.0, 0.5}, {0.25, 1.0}, {3.0, 2.0}};
  const Tensor with_history = x * sum(model.W);  // the Hessian also goes through the inputs
  const nn::MSELoss mse;
  HessianOptions one_row;
  one_row.chunk_size = 1;
  Tensor model_one, batch_one, loss_one;
  {
    ThreadCount threads(1);
    model_one = model_hessian_matrix(model, {with_history});
    batch_one = batch_loss_hessian_matrix(model, mse, {with_history}, zeros({6, 2}));
    loss_one = loss_hessian_matrix(model, mse, {with_history}, zeros({6, 2}), one_row);
  }
  model.threads->clear();
  ThreadCount threads(3);
  CHECK_EXACT(model_hessian_matrix(model, {with_history}), model_one);
  CHECK_EXACT(batch_loss_hessian_matrix(model, mse, {with_history}, zeros({6, 2})), batch_one);
  CHECK_EXACT(loss_hessian_matrix(model, mse, {with_history}, zeros({6, 2}), one_row), loss_one);
  BOOST_TEST(model.threads->size() == 1u);
  BOOST_TEST(model.threads->count(std::this_thread::get_id()) == 1u);
  // and the inputs' share of the curvature is there: without their history it differs
  BOOST_CHECK_GT(max_abs(model_one - model_hessian_matrix(model, {with_history.detach()})), 1e-3);

  // a model that keeps a node between calls: every sample, and every copy of
  // the loss's graph, reaches the node its first call made
  for (const bool per_sample : {true, false}) {
    BOOST_TEST_CONTEXT("per sample " << per_sample) {
      WatchesItsThreads keeper;
      keeper.keeps_a_node = true;
      auto request = [&] {
        return per_sample ? model_hessian_matrix(keeper, {x}) : loss_hessian_matrix(keeper, mse, {x}, zeros({6, 2}), one_row);
      };
      Tensor alone;
      {
        ThreadCount one_thread(1);
        alone = request();
      }
      keeper.threads->clear();
      keeper.kept = Tensor();  // made again by the request's first call
      ThreadCount three(3);
      CHECK_EXACT(request(), alone);
      BOOST_TEST(keeper.threads->size() == 1u);
      BOOST_CHECK_GT(max_abs(alone), 0.01);
    }
  }
}

// Samples queued for helpers while the calling thread makes the next ones:
// one that reaches a node an earlier sample's graph holds stops the queue,
// and it and every later sample are done on the calling thread.
BOOST_AUTO_TEST_CASE(a_sample_sharing_nodes_midway_stops_the_queue) {
  const Tensor x = Tensor{{1.0, 2.0}, {0.5, 3.0}, {1.5, -1.0}, {2.0, 0.5}, {0.25, 1.0}, {3.0, 2.0}};
  Tensor alone;
  {
    ThreadCount one(1);
    WatchesItsThreads m;
    m.keeps_a_node_from = 3;
    alone = model_hessian_matrix(m, {x});
  }
  ThreadCount three(3);
  WatchesItsThreads m;
  m.keeps_a_node_from = 3;     // sample 0 runs alone, 1 to 3 are queued, 4 shares 3's node
  m.waits_for_a_helper = 0.5;  // sample 1 waits until a second thread has run the rule
  CHECK_EXACT(model_hessian_matrix(m, {x}), alone);
  BOOST_TEST(m.threads->size() >= 2u);
  BOOST_CHECK_GT(max_abs(alone), 0.01);
}

// A queue that holds kQueuedGraphBytes of graphs makes the calling thread
// take its share before it makes more: the results are the same.
BOOST_AUTO_TEST_CASE(a_full_queue_is_worked_off_by_the_calling_thread_too) {
  struct Wide : nn::Module {  // 1 MB of graph per sample, for two parameters; slow off the constructing thread
    Tensor M = randn({3, 40000}, *std::make_unique<Generator>(3)), w, b;
    std::thread::id home = std::this_thread::get_id();
    Wide() {
      w = register_parameter("w", Tensor{0.7});
      b = register_parameter("b", Tensor{-0.2});
    }
    Tensor forward(const std::vector<Tensor>& in) override {
      const Tensor y = sum(tanh(matmul(in[0], M) * w + b), {1}) * 1e-4;
      const std::thread::id caller = home;
      return detail::record("slow", y.detach() * 1.0, {y}, [caller](const Tensor& g, const Tensor&, Needs) {
        if (std::this_thread::get_id() != caller) std::this_thread::sleep_for(std::chrono::milliseconds(3));
        return std::vector<Tensor>{g};
      });
    }
  } wide;
  Generator gen(9);
  const Tensor x = randn({40, 3}, gen);
  Tensor alone;
  {
    ThreadCount one(1);
    alone = model_hessian_matrix(wide, {x});
  }
  ThreadCount two(2);
  CHECK_EXACT(model_hessian_matrix(wide, {x}), alone);
  BOOST_CHECK_GT(max_abs(alone), 1e-3);
}

BOOST_AUTO_TEST_CASE(the_thread_count_defaults_to_the_cores) {
  ThreadCount automatic(0);
  BOOST_TEST(num_threads() >= 1u);
  BOOST_TEST(num_threads() <= std::max<std::size_t>(1, std::thread::hardware_concurrency()));
  set_num_threads(5);
  BOOST_TEST(num_threads() == 5u);
}

// The dict's lower blocks (Q, P) are transposed from (P, Q) after each
// output's rows: every entry's, per sample and over the whole batch.
BOOST_AUTO_TEST_CASE(dict_blocks_match_the_matrix_for_every_entry) {
  Generator gen(45);
  auto net = gelu_softplus_net(gen, 3, 4, 2);
  const Tensor x = randn({3, 3}, gen);
  const std::vector<std::size_t> off = offsets_of(*net);
  const std::size_t n = off.back();
  for (const bool is_batch : {true, false}) {
    BOOST_TEST_CONTEXT("is_batch " << is_batch) {
      HessianOptions o;
      o.is_batch = is_batch;
      const Tensor h = reshape(model_hessian_matrix(*net, {x}, o), Shape{6, n, n});
      const HessianDict d = model_hessian_dict(*net, {x}, o);
      for (std::size_t p = 0; p < d.names().size(); ++p)
        for (std::size_t q = 0; q < d.names().size(); ++q) {
          const std::size_t rp = off[p + 1] - off[p], rq = off[q + 1] - off[q];
          const Tensor blocks = reshape(d(d.names()[p], d.names()[q]), Shape{6, rp, rq});
          for (std::size_t e = 0; e < 6; ++e) {
            const Tensor entry = reshape(slice(blocks, 0, std::int64_t(e), std::int64_t(e) + 1), Shape{rp, rq});
            const Tensor matrix = reshape(slice(h, 0, std::int64_t(e), std::int64_t(e) + 1), Shape{n, n});
            CHECK_EXACT(entry, block_of(matrix, off[p], rp, off[q], rq));
          }
        }
      BOOST_CHECK_GT(max_abs(h), 1e-3);
    }
  }
}

// Seed batches are reused across passes (only their ones are rewritten), but
// never one that something still holds. Here every pass's seeds have the
// shape of the first-level seeds, [8 entries, 8 entries, 2] (16 outputs in
// groups of 8, chunks of 8 rows of w), and the recorded gradient holds those.
BOOST_AUTO_TEST_CASE(seeds_held_by_the_recorded_gradient_are_not_reused) {
  CubeTimesInput model;
  Generator gen(44);
  const Tensor x = randn({8, 2}, gen);
  HessianOptions o;
  o.is_batch = false;
  o.chunk_size = 8;
  const Tensor h = model_hessian_matrix(model, {x}, o);
  BOOST_REQUIRE(h.shape() == Shape({8, 2, 2, 2}));
  Tensor expected = zeros({8, 2, 2, 2});
  for (std::size_t i = 0; i < 8; ++i)
    for (std::size_t j = 0; j < 2; ++j)
      expected.mutable_data()[((i * 2 + j) * 2 + j) * 2 + j] = 6.0 * x.data()[i * 2 + j] * model.w.data()[j];
  CHECK_REL(h, expected, 1e-14);
}

// A request that fails halfway (its second sample throws, after the first
// one's passes took reused seed batches) leaves nothing behind for the next.
BOOST_AUTO_TEST_CASE(a_failed_request_leaves_no_seed_reuse_behind) {
  RefusesNegativeInputs model;
  const Tensor good = Tensor{{1.0, 2.0}, {0.5, -3.0}}, bad = Tensor{{1.0, 2.0}, {-0.5, 3.0}};
  const Tensor before = model_hessian_matrix(model, {good});
  BOOST_CHECK_THROW(model_hessian_matrix(model, {bad}), ValueError);
  BOOST_CHECK_THROW(batch_loss_hessian_matrix(model, nn::MSELoss(), {bad}, zeros({2, 2})), ValueError);
  CHECK_EXACT(model_hessian_matrix(model, {good}), before);
  BOOST_CHECK_GT(max_abs(before), 0.1);
}

// Dense results are not cleared before their rows arrive; what no row reaches
// (unused or linear parameters, diagonal_only's off blocks, a subset) is zeroed
// at the end. Recycled storage full of NaN must leave no trace.
BOOST_AUTO_TEST_CASE(dense_results_do_not_depend_on_recycled_memory) {
  Generator gen(43);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);  // output linear in the last bias
  PartlyUnused unused;
  const Tensor x = randn({3, 3}, gen), t = randn({3, 2}, gen);
  const Tensor xu = Tensor{{1.0, -1.0}, {0.5, 2.0}}, tu = reshape(Tensor{0.0, 1.0}, Shape{2, 1});
  const nn::MSELoss mse(nn::Reduction::sum);
  HessianOptions diagonal;
  diagonal.diagonal_only = true;
  HessianOptions whole_batch;
  whole_batch.is_batch = false;
  const HessianOptions subset = with_params({"0.bias", "2.weight"});
  const std::vector<std::pair<std::string, std::function<Tensor()>>> requests = {
      {"loss", [&] { return loss_hessian_matrix(*net, mse, {x}, t); }},
      {"loss diagonal_only", [&] { return loss_hessian_matrix(*net, mse, {x}, t, diagonal); }},
      {"loss subset", [&] { return loss_hessian_matrix(*net, mse, {x}, t, subset); }},
      {"loss unused", [&] { return loss_hessian_matrix(unused, mse, {xu}, tu); }},
      {"batch loss", [&] { return batch_loss_hessian_matrix(*net, mse, {x}, t); }},
      {"batch loss diagonal_only", [&] { return batch_loss_hessian_matrix(*net, mse, {x}, t, diagonal); }},
      {"model", [&] { return model_hessian_matrix(*net, {x}); }},
      {"model diagonal_only", [&] { return model_hessian_matrix(*net, {x}, diagonal); }},
      {"model whole batch", [&] { return model_hessian_matrix(*net, {x}, whole_batch); }},
      {"model unused", [&] { return model_hessian_matrix(unused, {xu}); }},
      {"model subset", [&] { return model_hessian_matrix(*net, {x}, subset); }},
      {"batch loss unused", [&] { return batch_loss_hessian_matrix(unused, mse, {xu}, tu); }},
  };
  for (const auto& [name, request] : requests) {
    BOOST_TEST_CONTEXT(name) {
      const Shape shape = request().shape();
      // leave freed buffers of the result's size behind, full of `fill`
      auto after = [&](double fill) {
        { const Tensor junk = full(shape, fill); }
        return request();
      };
      const Tensor clean = after(0.0), dirty = after(std::nan(""));
      BOOST_CHECK(std::all_of(dirty.data(), dirty.data() + dirty.numel(), [](double v) { return std::isfinite(v); }));
      CHECK_EXACT(dirty, clean);
    }
  }
}

// Results of 4 MB and more are built a group of entries at a time in a
// staging buffer and streamed out. Here n = 97 is odd, so most samples'
// matrices start and end inside a cache line of the result.
BOOST_AUTO_TEST_CASE(large_results_are_streamed_out_whole) {
  // n = 97 (odd) and 114 with two outputs: most matrices start and end inside
  // a cache line, and bands of rows cross parameters and matrices
  for (const std::size_t outputs : {1, 2}) {
    Generator gen(47);
    auto net = nn::mlp({4, 16, outputs}, nn::Activation::Kind::tanh, gen);
    const std::size_t n = outputs == 1 ? 97 : 114, B = 64;  // 64 · 97² doubles: 4.8 MB
    BOOST_REQUIRE_EQUAL(net->num_parameters(true), n);
    const Tensor x = randn({B, 4}, gen), t = randn({B, outputs}, gen);
    const nn::MSELoss mse(nn::Reduction::sum);
    HessianOptions diagonal, chunked;
    diagonal.diagonal_only = true;
    chunked.chunk_size = 5;  // pieces of rows that bands cut across
    const std::vector<
        std::pair<std::string, std::function<Tensor(const Tensor&, const Tensor&, const HessianOptions&)>>>
        requests = {
            {"model",
             [&](const Tensor& xs, const Tensor&, const HessianOptions& o) { return model_hessian_matrix(*net, {xs}, o); }},
            {"batch loss",
             [&](const Tensor& xs, const Tensor& ts, const HessianOptions& o) {
               return batch_loss_hessian_matrix(*net, mse, {xs}, ts, o);
             }},
        };
    for (const auto& [name, request] : requests)
      for (const HessianOptions& o : {HessianOptions(), diagonal, chunked}) {
        BOOST_TEST_CONTEXT(name << ", " << outputs << " outputs" << (o.diagonal_only ? ", diagonal_only" : "")
                                << (o.chunk_size ? ", chunks of 5" : "")) {
          // leave freed buffers of the result's and a band's sizes behind, full of NaN
          { const Tensor junk = full({B, outputs, n, n}, std::nan("")), band = full({16 * n + 8}, std::nan("")); }
          const Tensor h = request(x, t, o);
          const std::size_t per_sample = h.numel() / B;
          BOOST_REQUIRE(per_sample == (name == "model" ? outputs : 1) * n * n);
          BOOST_CHECK(std::all_of(h.data(), h.data() + h.numel(), [](double v) { return std::isfinite(v); }));
          // each sample alone is a result small enough to be written in place
          for (std::size_t b = 0; b < B; b += 9) {
            const Tensor hb = request(slice(x, 0, b, b + 1), slice(t, 0, b, b + 1), o);
            const Tensor row = reshape(slice(reshape(h, Shape{B, per_sample}), 0, b, b + 1), hb.shape());
            CHECK_REL(row, hb, 1e-13);
          }
          BOOST_CHECK_GT(max_abs(h), 1e-3);
        }
      }
  }
}

BOOST_AUTO_TEST_CASE(sum_of_per_sample_hessians_is_the_batch_hessian_for_sum_losses) {
  Generator gen(42);
  auto net = nn::mlp({3, 4, 3}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({6, 3}, gen);
  struct {
    Criterion c;
    Tensor target;
  } cases[] = {{nn::MSELoss(nn::Reduction::sum), randn({6, 3}, gen)},
               {nn::CrossEntropyLoss({nn::Reduction::sum}), Tensor{2, 0, 1, 1, 2, 0}},
               {nn::BCEWithLogitsLoss({nn::Reduction::sum}), rand({6, 3}, gen)}};
  for (const auto& c : cases) {
    const Tensor hb = batch_loss_hessian_matrix(*net, c.c, {x}, c.target);
    const Tensor summed = sum(hb, {0});
    const Tensor whole = loss_hessian_matrix(*net, c.c, {x}, c.target);
    CHECK_REL(summed, whole, 1e-12);
  }
}

BOOST_AUTO_TEST_CASE(batch_loss_sharpness_is_per_sample) {
  Generator gen(43);
  auto net = gelu_softplus_net(gen);
  const Tensor x = randn({3, 3}, gen), t = randn({3, 3}, gen);
  const Tensor s = batch_loss_sharpness(*net, nn::MSELoss(), {x}, t);
  BOOST_REQUIRE(s.shape() == Shape({3}));
  const Tensor hb = batch_loss_hessian_matrix(*net, nn::MSELoss(), {x}, t);
  for (std::size_t b = 0; b < 3; ++b) {
    const double expect = max_abs_eig(hessian_at(hb, b));
    BOOST_CHECK_LE(std::abs(s.data()[b] - expect), 1e-10 * std::max(1.0, expect));
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ matrix-free and sharpness

BOOST_AUTO_TEST_SUITE(matrix_free)

BOOST_AUTO_TEST_CASE(a_loss_that_is_not_finite_has_no_sharpness) {
  // dense: NaN (with NaN bounds, not the finite rest); matrix-free: an error naming the cause
  Generator gen(51);
  nn::Linear lin(3, 2, true, gen);
  Tensor x = randn({4, 3}, gen);
  x.mutable_data()[0] = NAN;
  const Tensor t = randn({4, 2}, gen);
  BOOST_CHECK(std::isnan(loss_sharpness(lin, nn::MSELoss(), {x}, t)));
  const SharpnessBounds b = loss_sharpness_bounds(lin, nn::MSELoss(), {x}, t);
  BOOST_CHECK(std::isnan(b.block_diagonal) && std::isnan(b.lower) && std::isnan(b.upper));
  HessianOptions tiny;
  tiny.max_bytes = 8;
  HESSE_CHECK_THROWS(loss_sharpness(lin, nn::MSELoss(), {x}, t, tiny), ValueError, "products are not finite");
}

BOOST_AUTO_TEST_CASE(hvp_equals_dense_product) {
  Generator gen(50);
  auto net = gelu_softplus_net(gen);
  const Tensor x = randn({5, 3}, gen), t = Tensor{0, 1, 2, 2, 1};
  const nn::CrossEntropyLoss ce;
  const Tensor H = loss_hessian_matrix(*net, ce, {x}, t);
  const std::size_t n = H.shape()[0];
  const Tensor v = randn({n}, gen);
  const Tensor hv = hessian_vector_product(*net, ce, {x}, t, v);
  BOOST_REQUIRE(hv.shape() == Shape({n}));
  const Tensor expect = matmul(H, v);
  CHECK_REL(hv, expect, 1e-12);
  // k vectors at once
  const Tensor V = randn({4, n}, gen);
  const Tensor HV = hessian_vector_product(*net, ce, {x}, t, V);
  BOOST_REQUIRE(HV.shape() == Shape({4, n}));
  CHECK_REL(HV, transpose(matmul(H, transpose(V))), 1e-12);
  // rows of the identity give the rows of H
  CHECK_REL(hessian_vector_product(*net, ce, {x}, t, eye(n)), H, 1e-12);
  // with a params subset, the subset's block
  const HessianOptions o = with_params({"2.weight"});
  const Tensor Hs = loss_hessian_matrix(*net, ce, {x}, t, o);
  const Tensor vs = randn({16}, gen);
  CHECK_REL(hessian_vector_product(*net, ce, {x}, t, vs, o), matmul(Hs, vs), 1e-12);
  // with diagonal_only, the product with the (P, P) blocks alone
  HessianOptions diagonal;
  diagonal.diagonal_only = true;
  const Tensor D = loss_hessian_matrix(*net, ce, {x}, t, diagonal);
  BOOST_REQUIRE_GT(max_abs(H - D), 1e-3);  // the off-diagonal blocks are not zero here
  CHECK_REL(hessian_vector_product(*net, ce, {x}, t, V, diagonal), transpose(matmul(D, transpose(V))), 1e-12);
}

// The first-level gradient is only seeded, never read: its largest product
// is skipped, and the results are exactly those of reading it first.
BOOST_FIXTURE_TEST_CASE(hvp_skips_the_unread_first_level_product, hesse::testing::MiniHvpLarge) {
  using hesse::testing::gemm_flops_of;
  for (const std::size_t k : {1, 3}) {
    BOOST_TEST_CONTEXT("k = " << k) {
      const Tensor V = randn({k, n}, gen);
      Tensor hv, expect;
      const std::uint64_t flops = gemm_flops_of([&] { hv = hessian_vector_product(*net, ce, {x}, t, V); });
      const std::uint64_t reading = gemm_flops_of([&] { expect = hvp_reading_the_gradient(V); });
      CHECK_EXACT(hv, expect);
      BOOST_TEST(reading - flops == kDeferredFlops);
    }
  }
  // the same Hessian as the dense route (itself deferring) and as central differences
  const Tensor H = loss_hessian_matrix(*net, ce, {x}, t);
  BOOST_CHECK_LE(asymmetry(H), 1e-12);
  for (int trial = 0; trial < 2; ++trial) {
    const Tensor v = randn({n}, gen);
    const Tensor hv = hessian_vector_product(*net, ce, {x}, t, v);
    CHECK_REL(hv, matmul(H, v), 1e-12);
    CHECK_REL(hv, fd_hvp(trainable(*net), [&] { return ce((*net)(x), t); }, v), 1e-7);
  }
}

BOOST_AUTO_TEST_CASE(hvp_of_a_model_linear_in_a_parameter) {
  // Linear + MSE: the loss is quadratic; the Hessian is (2/NC) [x 1]ᵀ[x 1] ⊗ I
  Generator gen(51);
  nn::Linear lin(3, 2, true, gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 2}, gen);
  const Tensor H = loss_hessian_matrix(lin, nn::MSELoss(), {x}, t);
  const Tensor v = randn({8}, gen);
  CHECK_REL(hessian_vector_product(lin, nn::MSELoss(), {x}, t, v), matmul(H, v), 1e-12);
  CHECK_REL(H, fd_hessian(trainable(lin), [&] { return nn::mse_loss(lin(x), t); }), 1e-6);
}

BOOST_AUTO_TEST_CASE(unused_parameters_have_zero_rows) {
  PartlyUnused m;
  const Tensor x = Tensor{{1.0, -1.0}, {0.5, 2.0}}, t = reshape(Tensor{0.0, 1.0}, Shape{2, 1});
  const nn::MSELoss mse(nn::Reduction::sum);
  // H_W = 2 Σ x xᵀ = [[2.5, 0], [0, 10]]; U's rows and columns are zero
  const Tensor H = loss_hessian_matrix(m, mse, {x}, t);
  const Tensor expect = Tensor{{2.5, 0, 0, 0}, {0, 10, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  HESSE_CHECK_CLOSE(H, expect, 1e-12);
  const Tensor v = Tensor{1.0, -2.0, 3.0, 4.0};
  HESSE_CHECK_CLOSE(hessian_vector_product(m, mse, {x}, t, v), matmul(expect, v), 1e-12);
  HESSE_CHECK_CLOSE(loss_hessian_diagonal(m, mse, {x}, t), (Tensor{2.5, 10, 0, 0}), 1e-12);
  CHECK_EXACT(model_hessian_matrix(m, {x}), zeros({2, 1, 4, 4}));
  // only the unused parameter selected: every route gives zeros
  const HessianOptions o = with_params({"U"});
  CHECK_EXACT(loss_hessian_matrix(m, mse, {x}, t, o), zeros({2, 2}));
  CHECK_EXACT(loss_hessian_diagonal(m, mse, {x}, t, o), zeros({2}));
  BOOST_CHECK_EQUAL(loss_sharpness(m, mse, {x}, t, o), 0.0);
  // regression: a loss that does not depend on the selection once made
  // hessian_vector_product throw an AutogradError instead of giving zeros
  CHECK_EXACT(hessian_vector_product(m, mse, {x}, t, Tensor{1.0, 1.0}, o), zeros({2}));
}

BOOST_AUTO_TEST_CASE(diagonal_equals_diag_of_h) {
  Generator gen(52);
  auto net = nn::mlp({3, 5, 3}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({4, 3}, gen), t = rand({4, 3}, gen);
  const nn::BCEWithLogitsLoss bce;
  const Tensor H = loss_hessian_matrix(*net, bce, {x}, t);
  const std::size_t n = H.shape()[0];
  Tensor d = zeros({n});
  for (std::size_t i = 0; i < n; ++i) d.mutable_data()[i] = H.data()[i * n + i];
  const Tensor diag = loss_hessian_diagonal(*net, bce, {x}, t);
  BOOST_REQUIRE(diag.shape() == Shape({n}));
  CHECK_REL(diag, d, 1e-12);
  // with a subset and a small chunk
  HessianOptions o = with_params({"2.bias", "0.weight"});
  o.chunk_size = 2;
  const Tensor Hs = loss_hessian_matrix(*net, bce, {x}, t, o);
  const Tensor ds = loss_hessian_diagonal(*net, bce, {x}, t, o);
  BOOST_REQUIRE(ds.shape() == Shape({18}));
  for (std::size_t i = 0; i < 18; ++i) BOOST_CHECK_LE(std::abs(ds.data()[i] - Hs.data()[i * 18 + i]), 1e-12);
}

BOOST_AUTO_TEST_CASE(sharpness_equals_max_abs_eigenvalue) {
  Generator gen(53);
  auto net = gelu_softplus_net(gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  const nn::MSELoss mse;
  const Tensor H = loss_hessian_matrix(*net, mse, {x}, t);
  const double expect = max_abs_eig(H);
  const double s = loss_sharpness(*net, mse, {x}, t);
  BOOST_CHECK_LE(std::abs(s - expect), 1e-10 * std::max(1.0, expect));
  // model sharpness per output entry
  const Tensor hm = model_hessian_matrix(*net, {x});
  const Tensor sm = model_sharpness(*net, {x});
  BOOST_REQUIRE(sm.shape() == Shape({4, 3}));
  for (std::size_t e = 0; e < 12; ++e) {
    const double ee = max_abs_eig(hessian_at(hm, e));
    BOOST_CHECK_LE(std::abs(sm.data()[e] - ee), 1e-10 * std::max(1.0, ee));
  }
  // symmetric_sharpness on a matrix whose largest |eigenvalue| is negative
  const Tensor m = Tensor{{-5, 1}, {1, 2}};
  // eigenvalues (-3 ± √53) / 2: the largest in absolute value is negative
  BOOST_CHECK_CLOSE(symmetric_sharpness(m).item(), (3.0 + std::sqrt(53.0)) / 2.0, 1e-10);
  HESSE_CHECK_THROWS(symmetric_sharpness(zeros({2, 3})), ShapeError, "[2, 3]");
  // a matrix that is not finite has no sharpness; the others of a batch keep theirs
  Tensor batch = zeros({3, 2, 2});
  batch.mutable_data()[0] = 2.0;
  batch.mutable_data()[5] = std::nan("");
  batch.mutable_data()[11] = -INFINITY;
  const Tensor per_matrix = symmetric_sharpness(batch);
  BOOST_CHECK_EQUAL(per_matrix.data()[0], 2.0);
  BOOST_CHECK(std::isnan(per_matrix.data()[1]) && std::isnan(per_matrix.data()[2]));
  // no eigenvalues: 0; and both triangles count, whichever LAPACK reads: (A + Aᵀ)/2
  HESSE_CHECK_CLOSE(symmetric_sharpness(zeros({3, 0, 0})), zeros({3}), 0.0);
  BOOST_CHECK_CLOSE(symmetric_sharpness(Tensor{{0.0, 10.0}, {0.0, 0.0}}).item(), 5.0, 1e-12);
  BOOST_CHECK_CLOSE(symmetric_sharpness(Tensor{{0.0, 0.0}, {10.0, 0.0}}).item(), 5.0, 1e-12);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ mode

BOOST_AUTO_TEST_SUITE(mode)

BOOST_AUTO_TEST_CASE(requests_record_even_inside_a_no_grad_scope) {
  // the tape is the request's own business: a user's NoGradGuard must not
  // turn every Hessian into zeros
  Generator gen(59);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  const Tensor h = loss_hessian_matrix(*net, nn::MSELoss(), {x}, t);
  const Tensor hm = model_hessian_matrix(*net, {x});
  const Tensor v = randn({26}, gen);
  const Tensor hv = hessian_vector_product(*net, nn::MSELoss(), {x}, t, v);
  NoGradGuard user_scope;
  BOOST_CHECK_GT(max_abs_diff(h, zeros(h.shape())), 0.1);
  BOOST_CHECK_EQUAL(max_abs_diff(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t), h), 0.0);
  BOOST_CHECK_EQUAL(max_abs_diff(model_hessian_matrix(*net, {x}), hm), 0.0);
  BOOST_CHECK_EQUAL(max_abs_diff(hessian_vector_product(*net, nn::MSELoss(), {x}, t, v), hv), 0.0);
  BOOST_CHECK(!is_grad_enabled());  // and the user's scope is intact
}

BOOST_AUTO_TEST_CASE(eval_during_and_mode_restored_after) {
  Generator gen(60);
  ModeRecorder m(gen);
  const Tensor x = randn({3, 3}, gen), t = randn({3, 2}, gen);
  BOOST_REQUIRE(m.is_training());
  auto all_eval = [&] {
    const bool ok = !m.seen.empty() && std::none_of(m.seen.begin(), m.seen.end(), [](bool b) { return b; });
    m.seen.clear();
    return ok;
  };
  const nn::MSELoss mse;
  const std::vector<std::pair<std::string, std::function<void(const Tensor&)>>> requests = {
      {"loss_hessian_matrix", [&](const Tensor& in) { loss_hessian_matrix(m, mse, {in}, t); }},
      {"loss_hessian_dict", [&](const Tensor& in) { loss_hessian_dict(m, mse, {in}, t); }},
      {"model_hessian_matrix", [&](const Tensor& in) { model_hessian_matrix(m, {in}); }},  // per sample
      {"model_hessian_dict", [&](const Tensor& in) { model_hessian_dict(m, {in}); }},
      {"batch_loss_hessian_matrix", [&](const Tensor& in) { batch_loss_hessian_matrix(m, mse, {in}, t); }},
      {"hessian_vector_product", [&](const Tensor& in) { hessian_vector_product(m, mse, {in}, t, ones({8})); }},
      {"loss_hessian_diagonal", [&](const Tensor& in) { loss_hessian_diagonal(m, mse, {in}, t); }},
      {"loss_sharpness", [&](const Tensor& in) { loss_sharpness(m, mse, {in}, t); }},
      {"model_sharpness", [&](const Tensor& in) { model_sharpness(m, {in}); }},
      {"batch_loss_sharpness", [&](const Tensor& in) { batch_loss_sharpness(m, mse, {in}, t); }},
  };
  for (const auto& [name, request] : requests) {
    BOOST_TEST_CONTEXT(name) {
      request(x);
      BOOST_CHECK(all_eval());
      BOOST_CHECK(m.is_training() && m.lin->is_training());
    }
  }
  // restored after a failure too: of the request, or of the model's own forward
  // (on the second sample, after the first one's went through)
  BOOST_CHECK_THROW(loss_hessian_matrix(m, mse, {x}, randn({3, 5}, gen)), ShapeError);
  BOOST_CHECK(m.is_training() && m.lin->is_training());
  m.refuses_negative_inputs = true;
  const Tensor second_negative = Tensor{{1.0, 2.0, 0.5}, {-1.0, 2.0, 0.5}, {1.0, 0.5, 2.0}};
  for (const auto& [name, request] : requests) {
    BOOST_TEST_CONTEXT(name << " failing") {
      HESSE_CHECK_THROWS(request(second_negative), ValueError, "ModeRecorder: a negative input");
      BOOST_CHECK(all_eval());
      BOOST_CHECK(m.is_training() && m.lin->is_training());
    }
  }
  m.refuses_negative_inputs = false;
  // a model in eval mode stays in eval mode
  m.eval();
  (void)loss_hessian_matrix(m, nn::MSELoss(), {x}, t);
  BOOST_CHECK(!m.is_training() && !m.lin->is_training());
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ errors

BOOST_AUTO_TEST_SUITE(errors)

BOOST_AUTO_TEST_CASE(inputs_of_the_wrong_shape) {
  Generator gen(70);
  nn::Linear lin(3, 2, true, gen);
  const Tensor bad = randn({4, 5}, gen), t = randn({4, 2}, gen);
  HESSE_CHECK_THROWS(model_hessian_matrix(lin, {bad}), ShapeError, "Linear");  // names the sample's [1, 5]
  HessianOptions o;
  o.is_batch = false;
  HESSE_CHECK_THROWS(model_hessian_matrix(lin, {bad}, o), ShapeError, "[4, 5]");
  HESSE_CHECK_THROWS(loss_hessian_matrix(lin, nn::MSELoss(), {bad}, t), ShapeError, "[4, 5]");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(lin, nn::MSELoss(), {bad}, t), ShapeError, "Linear");
  // a scalar input has no batch dimension
  HESSE_CHECK_THROWS(model_hessian_matrix(lin, {Tensor(1.0)}), ShapeError, "batch");
}

BOOST_AUTO_TEST_CASE(undefined_inputs_are_named) {
  Generator gen(79);
  nn::Linear lin(3, 2, true, gen);
  const Tensor t = randn({4, 2}, gen);
  HessianOptions whole;
  whole.is_batch = false;
  HESSE_CHECK_THROWS(loss_hessian_matrix(lin, nn::MSELoss(), {Tensor()}, t), ValueError,
                     "loss_hessian_matrix: input 0 is an undefined tensor");
  HESSE_CHECK_THROWS(hessian_vector_product(lin, nn::MSELoss(), {Tensor()}, t, zeros({8})), ValueError,
                     "hessian_vector_product: input 0 is an undefined tensor");
  HESSE_CHECK_THROWS(model_hessian_matrix(lin, {Tensor()}, whole), ValueError,
                     "model_hessian_matrix: input 0 is an undefined tensor");
  HESSE_CHECK_THROWS(model_hessian_matrix(lin, {Tensor()}), ValueError, "model_hessian_matrix: input 0 is an undefined tensor");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(lin, nn::MSELoss(), {randn({4, 3}, gen), Tensor()}, t), ValueError,
                     "batch_loss_hessian_matrix: input 1 is an undefined tensor");
  HESSE_CHECK_THROWS(loss_hessian_operator(lin, nn::MSELoss(), {Tensor()}, t)(zeros({8})), ValueError,
                     "input 0 is an undefined tensor");
  // a criterion that ignores its target may be given none, per sample too
  const Criterion squares = [](const Tensor& out, const Tensor&) { return sum(out * out); };
  const Tensor x = randn({4, 3}, gen);
  const Tensor per_sample = batch_loss_hessian_matrix(lin, squares, {x}, Tensor());
  const Tensor sharp = batch_loss_sharpness(lin, squares, {x}, Tensor());
  for (std::size_t b = 0; b < 4; ++b) {
    CHECK_REL(hessian_at(per_sample, b), loss_hessian_matrix(lin, squares, sample_of({x}, b), Tensor()), 1e-12);
    BOOST_CHECK_CLOSE(sharp.data()[b], max_abs_eig(hessian_at(per_sample, b)), 1e-8);
  }
}

BOOST_AUTO_TEST_CASE(model_output_without_a_batch_dimension) {
  Generator gen(78);
  SumsTheBatch m(gen);
  const Tensor x = randn({4, 3}, gen);
  HESSE_CHECK_THROWS(model_hessian_matrix(m, {x}), ShapeError, "leading batch dimension");
  HESSE_CHECK_THROWS(model_hessian_dict(m, {x}), ShapeError, "leading batch dimension");
  HessianOptions o;
  o.is_batch = false;  // fine without is_batch: one Hessian of the scalar
  BOOST_CHECK(model_hessian_matrix(m, {x}, o).shape() == Shape({3, 3}));
  HESSE_CHECK_THROWS(model_hessian_matrix(m, {}), ValueError, "no inputs");
  // the matrix-free sharpness checks it too
  HessianOptions tiny;
  tiny.max_bytes = 8;
  HESSE_CHECK_THROWS(model_sharpness(m, {x}, tiny), ShapeError, "leading batch dimension");
}

BOOST_AUTO_TEST_CASE(samples_whose_outputs_differ_in_shape) {
  // sample 0 has one output entry, sample 1 three: the result was sized by sample 0
  OutputSizeVaries m;
  const Tensor x = reshape(Tensor{1.0, 3.0}, {2, 1});
  static const char* const says = "sample 0 gave [1, 1], sample 1 gave [1, 3]";
  HESSE_CHECK_THROWS(model_hessian_matrix(m, {x}), ShapeError, says);
  HESSE_CHECK_THROWS(model_hessian_dict(m, {x}), ShapeError, says);
  HESSE_CHECK_THROWS(model_hessian_packed(m, {x}), ShapeError, says);
  HESSE_CHECK_THROWS(model_hessian_block_sparse(m, {x}), ShapeError, says);
  HESSE_CHECK_THROWS(model_sharpness_bounds(m, {x}), ShapeError, says);
  HESSE_CHECK_THROWS(model_sharpness(m, {x}), ShapeError, says);
  // in the other order too, and fine when the sizes agree
  HESSE_CHECK_THROWS(model_hessian_matrix(m, {reshape(Tensor{3.0, 1.0}, {2, 1})}), ShapeError, "gave [1, 3], sample 1");
  BOOST_CHECK(model_hessian_matrix(m, {reshape(Tensor{2.0, 2.0}, {2, 1})}).shape() == Shape({2, 2, 3, 3}));
}

BOOST_AUTO_TEST_CASE(an_empty_batch_is_an_error) {
  PartlyUnused m;
  const Tensor x0 = zeros({0, 2});
  HESSE_CHECK_THROWS(model_hessian_matrix(m, {x0}), ValueError, "the batch is empty");
  HESSE_CHECK_THROWS(model_hessian_dict(m, {x0}), ValueError, "the batch is empty");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(m, nn::MSELoss(), {x0}, zeros({0, 1})), ValueError, "the batch is empty");
}

BOOST_AUTO_TEST_CASE(inputs_with_different_batch_sizes) {
  Generator gen(71);
  nn::Bilinear bil(3, 2, 2, true, gen);
  const Tensor x1 = randn({3, 3}, gen), x2 = randn({2, 2}, gen);
  HESSE_CHECK_THROWS(model_hessian_matrix(bil, {x1, x2}), ShapeError, "[3, 3] and [2, 2]");
  HESSE_CHECK_THROWS(model_hessian_dict(bil, {x1, x2}), ShapeError, "batch size");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(bil, nn::MSELoss(), {x1, x2}, randn({3, 2}, gen)), ShapeError,
                     "batch size");
}

BOOST_AUTO_TEST_CASE(target_of_the_wrong_shape) {
  Generator gen(72);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({4, 3}, gen);
  HESSE_CHECK_THROWS(loss_hessian_matrix(*net, nn::MSELoss(), {x}, randn({4, 3}, gen)), ShapeError, "[4, 3]");
  HESSE_CHECK_THROWS(loss_hessian_dict(*net, nn::MSELoss(), {x}, randn({2, 2}, gen)), ShapeError, "[2, 2]");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(*net, nn::MSELoss(), {x}, randn({3, 2}, gen)), ShapeError,
                     "batch size 4");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(*net, nn::MSELoss(), {x}, Tensor(1.0)), ShapeError, "target");
  HESSE_CHECK_THROWS(hessian_vector_product(*net, nn::MSELoss(), {x}, randn({4, 3}, gen), zeros({26})), ShapeError,
                     "[4, 3]");
}

BOOST_AUTO_TEST_CASE(criterion_returning_a_non_scalar) {
  Generator gen(73);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 2}, gen);
  const Criterion unreduced = [](const Tensor& o, const Tensor& y) {
    return nn::mse_loss(o, y, nn::Reduction::none);
  };
  HESSE_CHECK_THROWS(loss_hessian_matrix(*net, unreduced, {x}, t), ShapeError, "scalar");
  HESSE_CHECK_THROWS(loss_hessian_dict(*net, unreduced, {x}, t), ShapeError, "[4, 2]");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(*net, unreduced, {x}, t), ShapeError, "scalar");
  HESSE_CHECK_THROWS(hessian_vector_product(*net, unreduced, {x}, t, zeros({26})), ShapeError, "scalar");
  HESSE_CHECK_THROWS(loss_hessian_diagonal(*net, unreduced, {x}, t), ShapeError, "scalar");
  HESSE_CHECK_THROWS(loss_sharpness(*net, unreduced, {x}, t), ShapeError, "scalar");
  HESSE_CHECK_THROWS(loss_hessian_matrix(*net, Criterion(), {x}, t), ValueError, "criterion");
}

BOOST_AUTO_TEST_CASE(memory_limit_per_request) {
  Generator gen(74);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);  // n = 26: 26² · 8 = 5408 bytes
  const Tensor x = randn({4, 3}, gen), t = randn({4, 2}, gen);
  HessianOptions o;
  o.max_bytes = 1000;
  HESSE_CHECK_THROWS(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError, "5408 bytes");
  HESSE_CHECK_THROWS(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError, "diagonal_only");
  HESSE_CHECK_THROWS(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError, "params");
  HESSE_CHECK_THROWS(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError,
                     "hessian_vector_product");
  HESSE_CHECK_THROWS(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError, "1000");
  HESSE_CHECK_THROWS(loss_hessian_dict(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError, "bytes");
  // 4 samples x 2 outputs x 5408
  HESSE_CHECK_THROWS(model_hessian_matrix(*net, {x}, o), MemoryLimitError, "43264 bytes");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError, "21632 bytes");
  // the matrix-free routes are not limited
  BOOST_CHECK_NO_THROW(hessian_vector_product(*net, nn::MSELoss(), {x}, t, zeros({26}), o));
  BOOST_CHECK_NO_THROW(loss_hessian_diagonal(*net, nn::MSELoss(), {x}, t, o));
  // diagonal_only: (12² + 4² + 8² + 2²) · 8 = 1824 bytes; a subset {"2.weight"}: 512 bytes
  o.max_bytes = 2000;
  HessianOptions od = o;
  od.diagonal_only = true;
  BOOST_CHECK_THROW(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError);
  BOOST_CHECK_NO_THROW(loss_hessian_dict(*net, nn::MSELoss(), {x}, t, od));
  HessianOptions os = o;
  os.params = {"2.weight"};
  BOOST_CHECK(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, os).shape() == Shape({8, 8}));
  // exactly at the limit is allowed
  o.max_bytes = 5408;
  BOOST_CHECK_NO_THROW(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o));
  o.max_bytes = 5407;
  BOOST_CHECK_THROW(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError);
}

BOOST_AUTO_TEST_CASE(global_memory_limit) {
  Generator gen(75);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 2}, gen);
  const std::size_t saved = hessian_memory_limit();
  BOOST_CHECK_EQUAL(saved, std::size_t(4) << 30);
  set_hessian_memory_limit(1000);
  BOOST_CHECK_EQUAL(hessian_memory_limit(), 1000u);
  try {
    HESSE_CHECK_THROWS(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t), MemoryLimitError, "5408 bytes");
    // a per-request limit overrides the global one
    HessianOptions o;
    o.max_bytes = 10000;
    BOOST_CHECK_NO_THROW(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, o));
  } catch (...) {
    set_hessian_memory_limit(saved);
    throw;
  }
  set_hessian_memory_limit(saved);
  BOOST_CHECK_NO_THROW(loss_hessian_matrix(*net, nn::MSELoss(), {x}, t));
}

BOOST_AUTO_TEST_CASE(large_requests_fail_before_any_work) {
  // n = 300·300 + 300 = 90300: a dense Hessian would need 65 GB
  Generator gen(76);
  CountsForwards big(std::make_shared<nn::Linear>(300, 300, true, gen));
  const Tensor x = randn({2, 300}, gen), t = randn({2, 300}, gen);
  HESSE_CHECK_THROWS(loss_hessian_matrix(big, nn::MSELoss(), {x}, t), MemoryLimitError, "65232720000 bytes");
  HESSE_CHECK_THROWS(batch_loss_hessian_matrix(big, nn::MSELoss(), {x}, t), MemoryLimitError, "bytes");
  BOOST_TEST(*big.forwards == 0);  // the model never ran
  // a model Hessian's size depends on the output's: one forward pass, no more
  HESSE_CHECK_THROWS(model_hessian_matrix(big, {x}), MemoryLimitError, "bytes");
  BOOST_TEST(*big.forwards <= 1);
  // the matrix-free diagonal still works at this size
  HessianOptions o;
  o.params = {"inner.bias"};
  const Tensor diag = loss_hessian_diagonal(big, nn::MSELoss(nn::Reduction::sum), {x}, t, o);
  HESSE_CHECK_CLOSE(diag, full({300}, 4.0), 1e-12);  // 2 per sample
}

BOOST_AUTO_TEST_CASE(byte_count_overflow_is_refused) {
  // n = 2^24 and count = 2^13 give exactly 2^64 bytes: wrapped in std::size_t
  // that would be 0 and pass the limit; the byte count saturates instead.
  HugeUnused m;
  const Tensor x = ones({std::size_t(1) << 13, 1});
  HESSE_CHECK_THROWS(model_hessian_matrix(m, {x}), MemoryLimitError, "bytes");
}

BOOST_AUTO_TEST_CASE(hvp_vector_of_the_wrong_size) {
  Generator gen(77);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);  // n = 26
  const Tensor x = randn({4, 3}, gen), t = randn({4, 2}, gen);
  HESSE_CHECK_THROWS(hessian_vector_product(*net, nn::MSELoss(), {x}, t, zeros({25})), ShapeError, "[25]");
  HESSE_CHECK_THROWS(hessian_vector_product(*net, nn::MSELoss(), {x}, t, zeros({3, 27})), ShapeError, "[26]");
  HESSE_CHECK_THROWS(hessian_vector_product(*net, nn::MSELoss(), {x}, t, zeros({2, 2, 26})), ShapeError,
                     "[2, 2, 26]");
  HESSE_CHECK_THROWS(hessian_vector_product(*net, nn::MSELoss(), {x}, t, Tensor(1.0)), ShapeError, "v must");
  HESSE_CHECK_THROWS(hessian_vector_product(*net, nn::MSELoss(), {x}, t, Tensor()), ShapeError, "undefined");
  // with a subset, v is sized by the subset
  HESSE_CHECK_THROWS(hessian_vector_product(*net, nn::MSELoss(), {x}, t, zeros({26}), with_params({"2.bias"})),
                     ShapeError, "[2]");
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ io

BOOST_AUTO_TEST_SUITE(io)

BOOST_AUTO_TEST_CASE(dict_save_loads_back_with_load_npy) {
  Generator gen(80);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 2}, gen);
  const HessianDict d = loss_hessian_dict(*net, nn::MSELoss(), {x}, t);
  std::random_device rd;
  const fs::path dir = fs::temp_directory_path() /
                       ("hesse_test_hessian_" + std::to_string(::getpid()) + "_" + std::to_string(rd()));
  fs::create_directories(dir);
  try {
    d.save(dir.string());
    std::size_t files = 0;
    for (const auto& entry : fs::directory_iterator(dir)) {
      (void)entry;
      ++files;
    }
    BOOST_CHECK_EQUAL(files, 16u);
    for (const auto& [key, blk] : d.blocks()) {
      const fs::path f = dir / (key.first + "__" + key.second + ".npy");
      BOOST_TEST_CONTEXT("file " << f.string()) {
        BOOST_REQUIRE(fs::exists(f));
        const Tensor back = load_npy(f.string());
        CHECK_EXACT(back, blk);
      }
    }
    // a model dict with an output shape in front
    const HessianDict dm = model_hessian_dict(*net, {x}, with_params({"2.bias"}));
    dm.save(dir.string());
    CHECK_EXACT(load_npy((dir / "2.bias__2.bias.npy").string()), dm("2.bias", "2.bias"));
  } catch (...) {
    fs::remove_all(dir);
    throw;
  }
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_SUITE_END()
