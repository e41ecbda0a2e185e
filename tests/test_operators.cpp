#define BOOST_TEST_MODULE operators
#include "test_util.hpp"

// Curvature operators (include/hesse/curvature.hpp): the loss Hessian, the
// contracted model Hessian, the GGN and the empirical Fisher as matrix-free
// operators, checked through to_dense against independent dense routes
// (hessian.hpp, an explicitly built Jacobian, per-sample gradients), and the
// third-order directional derivative against finite differences and a cubic
// closed form. Also: options, model state, product counts, errors.

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include <xtensor-blas/xlinalg.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xview.hpp>

using namespace hesse;
using hesse::testing::max_abs_diff;

namespace {

using Array = xt::xarray<double>;

// ---------------------------------------------------------------- helpers

double max_abs(const Tensor& t) {
  double m = 0.0;
  for (std::size_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.data()[i]));
  return m;
}

/// a and b agree to `rel` relative to the larger of 1 and max |b|.
#define CHECK_REL(a, b, rel)                                                                   \
  do {                                                                                         \
    const double scale_ = std::max(1.0, max_abs(b));                                           \
    const double diff_ = max_abs_diff((a), (b));                                               \
    BOOST_CHECK_MESSAGE(diff_ <= (rel) * scale_,                                               \
                        "max |" #a " - " #b "| = " << diff_ << " (scale " << scale_ << ")");   \
  } while (0)

std::vector<Tensor> trainable(const nn::Module& m) {
  std::vector<Tensor> out;
  for (const auto& [name, t] : m.trainable_parameters()) out.push_back(t);
  return out;
}

std::size_t count(const std::vector<Tensor>& params) {
  std::size_t n = 0;
  for (const Tensor& p : params) n += p.numel();
  return n;
}

/// ∇ of a scalar by `params`, flattened and concatenated (zeros where unused).
Array flat_grad(const Tensor& scalar, const std::vector<Tensor>& params, const Tensor& seed = Tensor()) {
  GradOptions o;
  o.allow_unused = true;
  o.retain_graph = true;
  const std::vector<Tensor> g = grad({scalar}, params, {seed}, o);
  Array out = xt::zeros<double>({count(params)});
  std::size_t at = 0;
  for (std::size_t p = 0; p < params.size(); ++p)
    for (std::size_t i = 0; i < params[p].numel(); ++i, ++at) out(at) = g[p].defined() ? g[p].data()[i] : 0.0;
  return out;
}

Tensor tensor(const Array& a) { return Tensor(a); }

/// Rows [b0, b1) of every input (and the target).
Batch rows(const std::vector<Tensor>& inputs, const Tensor& target, std::size_t b0, std::size_t b1) {
  Batch b;
  for (const Tensor& x : inputs) b.inputs.push_back(slice(x, 0, std::int64_t(b0), std::int64_t(b1)).clone());
  b.target = slice(target, 0, std::int64_t(b0), std::int64_t(b1)).clone();
  return b;
}

/// Zeroes the blocks (P, Q), P != Q, of a matrix over `params`.
Tensor block_diagonal_part(const Tensor& h, const std::vector<Tensor>& params) {
  Tensor out = h.clone();
  const std::size_t n = h.shape()[0];
  std::vector<std::size_t> owner;
  for (std::size_t p = 0; p < params.size(); ++p) owner.insert(owner.end(), params[p].numel(), p);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j)
      if (owner[i] != owner[j]) out.mutable_data()[i * n + j] = 0.0;
  return out;
}

double min_eig(const Tensor& h) { return xt::amin(xt::linalg::eigvalsh(h.value()))(); }

/// A tanh MLP and a softplus MLP, 3 -> 4 -> 3 (31 parameters).
std::shared_ptr<nn::Module> tanh_net(Generator& gen) { return nn::mlp({3, 4, 3}, nn::Activation::Kind::tanh, gen); }
std::shared_ptr<nn::Module> softplus_net(Generator& gen) {
  return nn::mlp({3, 4, 3}, nn::Activation::Kind::softplus, gen);
}

OperatorOptions with_params(std::vector<std::string> names) {
  OperatorOptions o;
  o.params = std::move(names);
  return o;
}

// ---------------------------------------------------------------- oracles

/// ∂z/∂θ [m, n] for z = model(x), one gradient row per output entry.
Array jacobian(nn::Module& net, const Tensor& x) {
  const Tensor z = net(x);
  const std::vector<Tensor> params = trainable(net);
  Array J = xt::zeros<double>({z.numel(), count(params)});
  for (std::size_t e = 0; e < z.numel(); ++e) {
    Tensor seed = zeros(z.shape());
    seed.mutable_data()[e] = 1.0;
    xt::row(J, e) = flat_grad(z, params, seed);
  }
  return J;
}

/// The model output as the only parameter: its loss Hessian is ∇²_z ℓ.
struct OutputAsParameter : nn::Module {
  Tensor Z;
  explicit OutputAsParameter(const Tensor& z) { Z = register_parameter("Z", z.detach().clone()); }
  Tensor forward(const std::vector<Tensor>&) override { return Z * 1.0; }
};

/// Jᵀ (∇²_z ℓ) J built explicitly.
Tensor explicit_ggn(nn::Module& net, const Criterion& c, const Tensor& x, const Tensor& t) {
  const Array J = jacobian(net, x);
  OutputAsParameter out(net(x));
  const Array Hz = loss_hessian_matrix(out, c, {x}, t).value();
  return tensor(xt::linalg::dot(xt::transpose(J), xt::linalg::dot(Hz, J)));
}

/// Σ_n g_n g_nᵀ over per-sample gradients, each from its own forward pass.
Tensor per_sample_outer_sum(nn::Module& net, const Criterion& c, const Tensor& x, const Tensor& t) {
  const std::vector<Tensor> params = trainable(net);
  const std::size_t n = count(params);
  Array F = xt::zeros<double>({n, n});
  for (std::size_t s = 0; s < x.shape()[0]; ++s) {
    const Tensor xs = slice(x, 0, std::int64_t(s), std::int64_t(s) + 1);
    const Tensor ts = slice(t, 0, std::int64_t(s), std::int64_t(s) + 1);
    const Array g = flat_grad(c(net(xs), ts), params);
    F += xt::linalg::outer(g, g);
  }
  return tensor(F);
}

/// vᵀ H(θ) v from the dense loss Hessian.
double vhv(nn::Module& net, const Criterion& c, const Tensor& x, const Tensor& t, const Tensor& v,
           const OperatorOptions& o = {}) {
  HessianOptions ho;
  ho.params = o.params;
  const Tensor H = loss_hessian_matrix(net, c, {x}, t, ho);
  return dot(v, matmul(H, v)).item();
}

/// Central differences of f(θ) over `params`, perturbed in place.
Tensor fd_gradient(std::vector<Tensor> params, const std::function<double()>& f, double h) {
  Tensor out = zeros({count(params)});
  std::size_t at = 0;
  for (Tensor& p : params)
    for (std::size_t i = 0; i < p.numel(); ++i, ++at) {
      const double orig = p.data()[i];
      auto set = [&](double value) {
        NoGradGuard no_grad;  // an in-place change of a parameter, outside any graph
        p.mutable_data()[i] = value;
      };
      set(orig + h);
      const double fp = f();
      set(orig - h);
      const double fm = f();
      set(orig);
      out.mutable_data()[at] = (fp - fm) / (2 * h);
    }
  return out;
}

/// A Linear that records the mode it ran in.
struct ModeRecorder : nn::Module {
  std::shared_ptr<nn::Linear> lin;
  std::vector<bool> seen;
  explicit ModeRecorder(Generator& gen) { lin = register_module("lin", std::make_shared<nn::Linear>(3, 2, true, gen)); }
  Tensor forward(const std::vector<Tensor>& in) override {
    seen.push_back(is_training());
    return tanh((*lin)(in[0]));
  }
  /// Every forward since the last call ran in eval mode (and there was one).
  bool all_eval() {
    const bool ok = !seen.empty() && std::none_of(seen.begin(), seen.end(), [](bool b) { return b; });
    seen.clear();
    return ok;
  }
};

/// y = x wᵀ, one output per sample: with ℓ = Σ y³ the third derivative is exact.
struct LinearScore : nn::Module {
  Tensor w;
  explicit LinearScore(Generator& gen) { w = register_parameter("w", randn({1, 3}, gen)); }
  Tensor forward(const std::vector<Tensor>& in) override { return matmul(in[0], transpose(w)); }
};

}  // namespace

// ================================================================ loss Hessian operator

BOOST_AUTO_TEST_SUITE(loss_hessian)

BOOST_AUTO_TEST_CASE(equals_the_dense_loss_hessian_for_every_loss) {
  Generator gen(1);
  for (auto net : {tanh_net(gen), softplus_net(gen)}) {
    const Tensor x = randn({5, 3}, gen);
    for (const hesse::testing::LossCase& c : hesse::testing::loss_cases(gen, 5, 3)) {
      BOOST_TEST_CONTEXT("loss " << c.name) {
        const Tensor H = loss_hessian_matrix(*net, c.criterion, {x}, c.target);
        const LinearOperator op = loss_hessian_operator(*net, c.criterion, {x}, c.target);
        BOOST_CHECK_EQUAL(op.size(), 31u);
        BOOST_CHECK_EQUAL(op.name(), "loss_hessian");
        CHECK_REL(to_dense(op, 8), H, 1e-12);
        BOOST_CHECK_GT(max_abs(H), 1e-3);
        BOOST_CHECK_EQUAL(op.products(), 31u);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(params_subset_is_the_subset_block) {
  Generator gen(2);
  auto net = tanh_net(gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  const OperatorOptions o = with_params({"2.bias", "0.weight"});  // any order: registration order out
  HessianOptions ho;
  ho.params = o.params;
  const LinearOperator op = loss_hessian_operator(*net, nn::MSELoss(), {x}, t, o);
  BOOST_CHECK_EQUAL(op.size(), 15u);
  CHECK_REL(to_dense(op), loss_hessian_matrix(*net, nn::MSELoss(), {x}, t, ho), 1e-12);
}

BOOST_AUTO_TEST_CASE(block_diagonal_is_the_diagonal_only_matrix) {
  Generator gen(3);
  auto net = softplus_net(gen);
  const Tensor x = randn({4, 3}, gen), t = Tensor{0, 2, 1, 1};
  OperatorOptions o;
  o.block_diagonal = true;
  HessianOptions ho;
  ho.diagonal_only = true;
  const nn::CrossEntropyLoss ce;
  const Tensor dense = loss_hessian_matrix(*net, ce, {x}, t, ho);
  const Tensor full = loss_hessian_matrix(*net, ce, {x}, t);
  BOOST_CHECK_GT(max_abs_diff(dense, full), 1e-3);  // the off-diagonal blocks really are non-zero
  CHECK_REL(to_dense(loss_hessian_operator(*net, ce, {x}, t, o)), dense, 1e-12);
  CHECK_REL(dense, block_diagonal_part(full, trainable(*net)), 1e-12);
  // with keep_graph off too
  o.keep_graph = false;
  CHECK_REL(to_dense(loss_hessian_operator(*net, ce, {x}, t, o)), dense, 1e-12);
}

BOOST_AUTO_TEST_CASE(keep_graph_off_gives_the_same_products) {
  Generator gen(4);
  auto net = tanh_net(gen);
  const Tensor x = randn({5, 3}, gen), t = rand({5, 3}, gen);
  const nn::BCEWithLogitsLoss bce;
  OperatorOptions off;
  off.keep_graph = false;
  const LinearOperator kept = loss_hessian_operator(*net, bce, {x}, t);
  const LinearOperator rebuilt = loss_hessian_operator(*net, bce, {x}, t, off);
  const Tensor V = randn({3, 31}, gen);
  CHECK_REL(rebuilt(V), kept(V), 1e-12);
  CHECK_REL(to_dense(rebuilt), loss_hessian_matrix(*net, bce, {x}, t), 1e-12);
}

// A single vector's product may be built in the buffer of its first
// parameter's part (here 0.weight holds 160 of 177 entries). Over batches of
// unit weight, later parts for those columns are added after the row has
// moved out: each product agrees with the dense matrix, and repeating one
// gives the same values (no buffer of the graph was written).
BOOST_AUTO_TEST_CASE(single_vector_products_over_batches) {
  Generator gen(5);
  auto net = nn::mlp({20, 8, 1}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({6, 20}, gen), t = randn({6, 1}, gen);
  const nn::MSELoss mse(nn::Reduction::sum);
  const std::vector<Batch> data{rows({x}, t, 0, 2), rows({x}, t, 2, 6)};
  OperatorOptions unit;
  unit.dataset_mean = false;
  const std::size_t n = net->num_parameters(true);
  const std::vector<std::pair<std::string, LinearOperator>> ops = {
      {"hessian", loss_hessian_operator(*net, mse, data, unit)},
      {"ggn", ggn_operator(*net, mse, data, unit)},
      {"fisher", empirical_fisher_operator(*net, mse, data, unit)},
      {"hessian, one batch", loss_hessian_operator(*net, mse, {x}, t)},
      {"hessian, dataset mean (weights 2/6, 4/6)", loss_hessian_operator(*net, mse, data)}};
  for (const auto& [name, op] : ops) {
    BOOST_TEST_CONTEXT(name) {
      const Tensor dense = to_dense(op, 64);  // blocks of rows: never built in a part
      const Tensor v = randn({n}, gen);
      const Tensor first = op(v), again = op(v);
      CHECK_REL(first, matmul(dense, v), 1e-12);
      BOOST_TEST(max_abs_diff(first, again) == 0.0);
    }
  }
  const Tensor v = randn({n}, gen);
  CHECK_REL(hessian_vector_product(*net, mse, {x}, t, v), matmul(loss_hessian_matrix(*net, mse, {x}, t), v), 1e-12);
}

// The first-level graph is only seeded, never read: recording it skips its
// largest product, once when the graph is kept and in every product when not.
BOOST_FIXTURE_TEST_CASE(operators_skip_the_unread_first_level_product, hesse::testing::MiniHvpLarge) {
  using hesse::testing::gemm_flops_of;
  const Tensor V = randn({2, n}, gen);
  Tensor hv;
  const std::uint64_t hvp = gemm_flops_of([&] { hv = hessian_vector_product(*net, ce, {x}, t, V); });
  BOOST_TEST(gemm_flops_of([&] { (void)hvp_reading_the_gradient(V); }) - hvp == kDeferredFlops);
  LinearOperator kept, rebuilt;
  OperatorOptions off;
  off.keep_graph = false;
  const std::uint64_t build = gemm_flops_of([&] { kept = loss_hessian_operator(*net, ce, {x}, t); });
  (void)gemm_flops_of([&] { rebuilt = loss_hessian_operator(*net, ce, {x}, t, off); });
  Tensor a, b;
  BOOST_TEST(build + gemm_flops_of([&] { a = kept(V); }) == hvp);
  BOOST_TEST(gemm_flops_of([&] { b = rebuilt(V); }) == hvp);
  BOOST_TEST(max_abs_diff(a, hv) == 0.0);
  BOOST_TEST(max_abs_diff(b, hv) == 0.0);
}

BOOST_AUTO_TEST_CASE(a_block_of_k_vectors_is_k_single_products) {
  Generator gen(5);
  auto net = softplus_net(gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  const LinearOperator op = loss_hessian_operator(*net, nn::MSELoss(), {x}, t);
  const Tensor V = randn({5, 31}, gen);
  const Tensor block = op(V);
  BOOST_REQUIRE(block.shape() == Shape({5, 31}));
  BOOST_CHECK_EQUAL(op.products(), 5u);
  for (std::size_t i = 0; i < 5; ++i) {
    const Tensor vi = slice(V, 0, std::int64_t(i), std::int64_t(i) + 1).clone();
    const Tensor single = op(reshape(vi, Shape{31}));
    BOOST_REQUIRE(single.shape() == Shape({31}));
    CHECK_REL(single, reshape(slice(block, 0, std::int64_t(i), std::int64_t(i) + 1).clone(), Shape{31}), 1e-12);
  }
  BOOST_CHECK_EQUAL(op.products(), 10u);
  // products leave the parameters' .grad alone
  for (const Tensor& p : trainable(*net)) BOOST_CHECK(!p.grad().defined());
}

BOOST_AUTO_TEST_CASE(dataset_of_unequal_batches_is_the_hessian_of_the_whole) {
  Generator gen(6);
  auto net = tanh_net(gen);
  const Tensor x = randn({9, 3}, gen), t = randn({9, 3}, gen);
  const Tensor classes = Tensor{0, 1, 2, 2, 1, 0, 1, 2, 0};
  const std::vector<std::pair<std::size_t, std::size_t>> spans{{0, 2}, {2, 5}, {5, 9}};
  struct {
    Criterion c;
    Tensor target;
    bool mean;
  } cases[] = {{nn::MSELoss(), t, true},
               {nn::MSELoss(nn::Reduction::sum), t, false},
               {nn::CrossEntropyLoss(), classes, true},
               {nn::CrossEntropyLoss({nn::Reduction::sum}), classes, false}};
  for (const auto& c : cases) {
    std::vector<Batch> data;
    for (const auto& [b0, b1] : spans) data.push_back(rows({x}, c.target, b0, b1));
    OperatorOptions o;
    o.dataset_mean = c.mean;
    const Tensor whole = loss_hessian_matrix(*net, c.c, {x}, c.target);
    const LinearOperator op = loss_hessian_operator(*net, c.c, data, o);
    CHECK_REL(to_dense(op), whole, 1e-12);
    o.keep_graph = false;
    CHECK_REL(to_dense(loss_hessian_operator(*net, c.c, data, o)), whole, 1e-12);
    // the other weighting is really different
    o.dataset_mean = !c.mean;
    BOOST_CHECK_GT(max_abs_diff(to_dense(loss_hessian_operator(*net, c.c, data, o)), whole), 1e-3);
  }
}

BOOST_AUTO_TEST_CASE(a_data_loader_epoch_is_a_dataset) {
  Generator gen(16);
  auto net = tanh_net(gen);
  const Tensor x = randn({10, 3}, gen), t = randn({10, 3}, gen);
  nn::DataLoader loader(x, t, /*batch_size=*/4, /*shuffle=*/true, /*seed=*/3);  // batches of 4, 4, 2
  const std::vector<Batch> data = batches_of(loader, 2);
  BOOST_REQUIRE_EQUAL(data.size(), 3u);
  BOOST_CHECK_EQUAL(data[2].inputs[0].shape()[0], 2u);
  // the mean loss over the dataset does not depend on the order of the samples
  CHECK_REL(to_dense(loss_hessian_operator(*net, nn::MSELoss(), data)), loss_hessian_matrix(*net, nn::MSELoss(), {x}, t),
            1e-12);
  CHECK_REL(to_dense(ggn_operator(*net, nn::MSELoss(), data)), to_dense(ggn_operator(*net, nn::MSELoss(), {x}, t)),
            1e-12);
}

BOOST_AUTO_TEST_CASE(parameters_changed_after_building_are_seen) {
  Generator gen(7);
  auto net = softplus_net(gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  const LinearOperator op = loss_hessian_operator(*net, nn::MSELoss(), {x}, t);
  const Tensor before = to_dense(op);
  Tensor w = net->parameter("0.weight");
  {
    NoGradGuard no_grad;  // an optimiser-like step in place
    for (std::size_t i = 0; i < w.numel(); ++i) w.mutable_data()[i] += 0.3;
  }
  const Tensor after = loss_hessian_matrix(*net, nn::MSELoss(), {x}, t);
  BOOST_CHECK_GT(max_abs_diff(before, after), 1e-3);
  const Tensor products = to_dense(op);
  CHECK_REL(products, after, 1e-12);
  // Products trust a parameter's write count: a write that changes nothing
  // keeps the products, and must not hide a real change made after it.
  {
    double* values = w.mutable_data();
    for (std::size_t i = 0; i < w.numel(); ++i) values[i] = values[i] * 1.0;
  }
  BOOST_CHECK_EQUAL(max_abs_diff(to_dense(op), products), 0.0);
  nn::SGD sgd(net->parameters(), nn::SGDOptions{0.1});
  sgd.zero_grad();
  nn::MSELoss()((*net)({x}), t).backward();
  sgd.step();
  const Tensor stepped = loss_hessian_matrix(*net, nn::MSELoss(), {x}, t);
  BOOST_CHECK_GT(max_abs_diff(after, stepped), 1e-6);
  CHECK_REL(to_dense(op), stepped, 1e-12);
}

BOOST_AUTO_TEST_CASE(works_under_a_no_grad_guard) {
  Generator gen(8);
  auto net = tanh_net(gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  const Tensor H = loss_hessian_matrix(*net, nn::MSELoss(), {x}, t);
  NoGradGuard no_grad;
  OperatorOptions o;
  o.keep_graph = false;
  CHECK_REL(to_dense(loss_hessian_operator(*net, nn::MSELoss(), {x}, t)), H, 1e-12);
  CHECK_REL(to_dense(loss_hessian_operator(*net, nn::MSELoss(), {x}, t, o)), H, 1e-12);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ model Hessian operator

BOOST_AUTO_TEST_SUITE(model_hessian)

BOOST_AUTO_TEST_CASE(one_hot_weights_pick_one_entry) {
  Generator gen(10);
  auto net = softplus_net(gen);
  const Tensor x = randn({2, 3}, gen);
  HessianOptions ho;
  ho.is_batch = false;
  const Tensor H = model_hessian_matrix(*net, {x}, ho);  // [2, 3, n, n]
  BOOST_REQUIRE(H.shape() == Shape({2, 3, 31, 31}));
  for (std::size_t e = 0; e < 6; ++e) {
    Tensor w = zeros({2, 3});
    w.mutable_data()[e] = 1.0;
    Tensor he = zeros({31, 31});
    std::copy(H.data() + e * 31 * 31, H.data() + (e + 1) * 31 * 31, he.mutable_data());
    CHECK_REL(to_dense(model_hessian_operator(*net, {x}, w)), he, 1e-12);
  }
}

BOOST_AUTO_TEST_CASE(general_weights_give_the_weighted_sum) {
  Generator gen(11);
  auto net = tanh_net(gen);
  const Tensor x = randn({3, 3}, gen), w = randn({3, 3}, gen);
  HessianOptions ho;
  ho.is_batch = false;
  const Tensor H = model_hessian_matrix(*net, {x}, ho);  // [3, 3, n, n]
  const Tensor expect = sum(reshape(w, Shape{3, 3, 1, 1}) * H, {0, 1});
  BOOST_CHECK_GT(max_abs(expect), 1e-3);
  CHECK_REL(to_dense(model_hessian_operator(*net, {x}, w)), expect, 1e-12);
  // with a subset and block_diagonal
  OperatorOptions o = with_params({"0.weight", "0.bias"});
  o.block_diagonal = true;
  ho.params = o.params;
  ho.diagonal_only = true;
  const Tensor Hs = model_hessian_matrix(*net, {x}, ho);
  const std::size_t ns = Hs.shape().back();
  const Tensor expect_s = sum(reshape(w, Shape{3, 3, 1, 1}) * Hs, {0, 1});
  BOOST_CHECK_EQUAL(ns, 16u);
  CHECK_REL(to_dense(model_hessian_operator(*net, {x}, w, o)), expect_s, 1e-12);
}

BOOST_AUTO_TEST_CASE(weights_of_the_wrong_shape) {
  Generator gen(12);
  auto net = tanh_net(gen);
  const Tensor x = randn({3, 3}, gen);
  HESSE_CHECK_THROWS(model_hessian_operator(*net, {x}, ones({3, 2})), ShapeError, "[3, 2]");
  HESSE_CHECK_THROWS(model_hessian_operator(*net, {x}, ones({9})), ShapeError, "model_hessian_operator");
  OperatorOptions o;
  o.keep_graph = false;  // checked when the operator is made, not at the first product
  HESSE_CHECK_THROWS(model_hessian_operator(*net, {x}, ones({3}), o), ShapeError, "model's output, [3, 3]");
  HESSE_CHECK_THROWS(model_hessian_operator(*net, {x}, Tensor()), ValueError, "weights");
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ GGN

BOOST_AUTO_TEST_SUITE(ggn)

BOOST_AUTO_TEST_CASE(linear_model_with_mse_is_the_hessian) {
  Generator gen(20);
  nn::Linear lin(3, 2, true, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  for (auto red : {nn::Reduction::mean, nn::Reduction::sum}) {
    const nn::MSELoss mse(red);
    const Tensor H = loss_hessian_matrix(lin, mse, {x}, t);
    CHECK_REL(to_dense(ggn_operator(lin, mse, {x}, t)), H, 1e-12);
  }
}

BOOST_AUTO_TEST_CASE(mlp_ggn_equals_explicit_jt_hz_j) {
  Generator gen(21);
  for (auto net : {tanh_net(gen), softplus_net(gen)}) {
    const Tensor x = randn({4, 3}, gen);
    for (const hesse::testing::LossCase& c : hesse::testing::loss_cases(gen, 4, 3)) {
      BOOST_TEST_CONTEXT("loss " << c.name) {
        const Tensor expect = explicit_ggn(*net, c.criterion, x, c.target);
        const Tensor G = to_dense(ggn_operator(*net, c.criterion, {x}, c.target));
        CHECK_REL(G, expect, 1e-12);
        BOOST_CHECK_GT(max_abs(G), 1e-3);
        // differs from the Hessian of a nonlinear model
        BOOST_CHECK_GT(max_abs_diff(G, loss_hessian_matrix(*net, c.criterion, {x}, c.target)), 1e-4);
        // positive semi-definite for these convex losses
        BOOST_CHECK_GE(min_eig(G), -1e-12 * std::max(1.0, max_abs(G)));
      }
    }
  }
}

BOOST_FIXTURE_TEST_CASE(ggn_with_a_deferred_first_level_gradient, hesse::testing::MiniHvpLarge) {
  // large enough that Jᵀ u's product for 0.weight is deferred (see MiniHvpLarge)
  CHECK_REL(to_dense(ggn_operator(*net, ce, {x}, t)), explicit_ggn(*net, ce, x, t), 1e-12);
}

BOOST_AUTO_TEST_CASE(mse_sum_ggn_is_two_jt_j) {
  Generator gen(22);
  auto net = tanh_net(gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  const Array J = jacobian(*net, x);
  const Tensor expect = tensor(2.0 * xt::linalg::dot(xt::transpose(J), J));
  CHECK_REL(to_dense(ggn_operator(*net, nn::MSELoss(nn::Reduction::sum), {x}, t)), expect, 1e-12);
}

BOOST_AUTO_TEST_CASE(options_block_diagonal_subset_keep_graph) {
  Generator gen(23);
  auto net = softplus_net(gen);
  const Tensor x = randn({5, 3}, gen), t = Tensor{2, 0, 1, 1, 0};
  const nn::CrossEntropyLoss ce;
  const Tensor full = to_dense(ggn_operator(*net, ce, {x}, t));
  OperatorOptions o;
  o.block_diagonal = true;
  const Tensor diag = to_dense(ggn_operator(*net, ce, {x}, t, o));
  const Tensor expect = block_diagonal_part(full, trainable(*net));
  BOOST_CHECK_GT(max_abs_diff(full, expect), 1e-3);
  CHECK_REL(diag, expect, 1e-12);
  o.keep_graph = false;
  CHECK_REL(to_dense(ggn_operator(*net, ce, {x}, t, o)), expect, 1e-12);
  // a subset: the principal submatrix over 2.weight (rows 16..27 of θ)
  const Tensor sub = to_dense(ggn_operator(*net, ce, {x}, t, with_params({"2.weight"})));
  const Tensor expect_sub = slice(slice(full, 0, 16, 28), 1, 16, 28).clone();
  CHECK_REL(sub, expect_sub, 1e-12);
}

BOOST_AUTO_TEST_CASE(dataset_ggn_is_the_ggn_of_the_whole) {
  Generator gen(24);
  auto net = tanh_net(gen);
  const Tensor x = randn({7, 3}, gen), t = randn({7, 3}, gen);
  std::vector<Batch> data{rows({x}, t, 0, 3), rows({x}, t, 3, 4), rows({x}, t, 4, 7)};
  CHECK_REL(to_dense(ggn_operator(*net, nn::MSELoss(), data)), to_dense(ggn_operator(*net, nn::MSELoss(), {x}, t)),
            1e-12);
  OperatorOptions o;
  o.dataset_mean = false;
  o.keep_graph = false;
  const nn::MSELoss mse_sum(nn::Reduction::sum);
  CHECK_REL(to_dense(ggn_operator(*net, mse_sum, data, o)), explicit_ggn(*net, mse_sum, x, t), 1e-12);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ empirical Fisher

BOOST_AUTO_TEST_SUITE(fisher)

BOOST_AUTO_TEST_CASE(equals_the_mean_outer_product_of_per_sample_gradients) {
  Generator gen(30);
  for (auto net : {tanh_net(gen), softplus_net(gen)}) {
    const Tensor x = randn({5, 3}, gen);
    for (const hesse::testing::LossCase& c : hesse::testing::loss_cases(gen, 5, 3)) {
      BOOST_TEST_CONTEXT("loss " << c.name) {
        const Tensor sum_outer = per_sample_outer_sum(*net, c.criterion, x, c.target);
        const Tensor F = to_dense(empirical_fisher_operator(*net, c.criterion, {x}, c.target));
        CHECK_REL(F, sum_outer / 5.0, 1e-12);
        BOOST_CHECK_GT(max_abs(F), 1e-4);
        BOOST_CHECK_GE(min_eig(F), -1e-12 * std::max(1.0, max_abs(F)));
        OperatorOptions o;
        o.dataset_mean = false;
        o.keep_graph = false;
        CHECK_REL(to_dense(empirical_fisher_operator(*net, c.criterion, {x}, c.target, o)), sum_outer, 1e-12);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(dataset_fisher_averages_over_all_samples) {
  Generator gen(31);
  auto net = softplus_net(gen);
  const Tensor x = randn({8, 3}, gen), t = Tensor{0, 1, 2, 2, 1, 0, 0, 2};
  const nn::CrossEntropyLoss ce;
  std::vector<Batch> data{rows({x}, t, 0, 1), rows({x}, t, 1, 4), rows({x}, t, 4, 8)};
  const Tensor sum_outer = per_sample_outer_sum(*net, ce, x, t);
  CHECK_REL(to_dense(empirical_fisher_operator(*net, ce, data)), sum_outer / 8.0, 1e-12);
  OperatorOptions o;
  o.dataset_mean = false;
  CHECK_REL(to_dense(empirical_fisher_operator(*net, ce, data, o)), sum_outer, 1e-12);
  o.block_diagonal = true;
  CHECK_REL(to_dense(empirical_fisher_operator(*net, ce, data, o)), block_diagonal_part(sum_outer, trainable(*net)),
            1e-12);
}

BOOST_AUTO_TEST_CASE(closed_form_for_a_cubic_score_without_target) {
  // ℓ_n = (x_n·w)³: ∇ℓ_n = 3 (x_n·w)² x_n; the criterion needs no target
  Generator gen(33);
  LinearScore m(gen);
  const Tensor x = randn({4, 3}, gen);
  const Criterion cube = [](const Tensor& y, const Tensor&) { return sum(y * y * y); };
  Array F = xt::zeros<double>({3, 3});
  const Array X = x.value(), w = xt::view(m.w.value(), 0, xt::all());
  for (std::size_t n = 0; n < 4; ++n) {
    const Array xn = xt::view(X, n, xt::all());
    const Array g = 3.0 * std::pow(xt::sum(xn * w)(), 2) * xn;
    F += xt::linalg::outer(g, g) / 4.0;
  }
  CHECK_REL(to_dense(empirical_fisher_operator(m, cube, {x}, Tensor())), tensor(F), 1e-12);
}

BOOST_AUTO_TEST_CASE(criterion_that_cannot_run_per_sample) {
  Generator gen(32);
  auto net = tanh_net(gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  // a criterion that insists on the whole batch
  const Criterion whole_batch_only = [](const Tensor& y, const Tensor& target) {
    if (y.shape()[0] != 4) throw ShapeError("whole_batch_only: needs 4 rows, got " + to_string(y.shape()));
    return nn::mse_loss(y, target);
  };
  BOOST_CHECK_NO_THROW(loss_hessian_operator(*net, whole_batch_only, {x}, t));
  HESSE_CHECK_THROWS(empirical_fisher_operator(*net, whole_batch_only, {x}, t), ShapeError,
                     "cannot be evaluated on sample 0 alone");
  // reduction none gives a per-sample loss that is not a scalar
  const Criterion none = [](const Tensor& y, const Tensor& target) {
    return nn::mse_loss(y, target, nn::Reduction::none);
  };
  HESSE_CHECK_THROWS(empirical_fisher_operator(*net, none, {x}, t), ShapeError, "scalar loss");
  // the model output needs the batch dimension
  const Tensor flat = Tensor{1.0, 2.0, 3.0, 4.0};
  struct Summed : nn::Module {
    Tensor w;
    Summed() { w = register_parameter("w", ones({3})); }
    Tensor forward(const std::vector<Tensor>& in) override { return reshape(sum(matmul(in[0], w)), Shape{1}); }
  } summed;
  HESSE_CHECK_THROWS(empirical_fisher_operator(summed, nn::MSELoss(), {x}, flat), ShapeError, "leading dimension");
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ third order

BOOST_AUTO_TEST_SUITE(third_order)

BOOST_AUTO_TEST_CASE(matches_finite_differences_of_vt_h_v) {
  Generator gen(40);
  auto net = softplus_net(gen);
  const Tensor x = randn({4, 3}, gen), t = Tensor{0, 2, 1, 0};
  const nn::CrossEntropyLoss ce;
  const Tensor v = randn({31}, gen);
  const Tensor d = third_order_directional(*net, ce, {x}, t, v);
  BOOST_REQUIRE(d.shape() == Shape({31}));
  const Tensor fd = fd_gradient(trainable(*net), [&] { return vhv(*net, ce, x, t, v); }, 1e-4);
  BOOST_CHECK_GT(max_abs(fd), 1e-2);
  CHECK_REL(d, fd, 1e-6);
  // a subset: derivatives by the subset only
  const OperatorOptions o = with_params({"2.weight"});
  const Tensor vs = randn({12}, gen);
  const Tensor ds = third_order_directional(*net, ce, {x}, t, vs, o);
  const Tensor fds = fd_gradient({net->parameter("2.weight")}, [&] { return vhv(*net, ce, x, t, vs, o); }, 1e-4);
  CHECK_REL(ds, fds, 1e-6);
}

BOOST_AUTO_TEST_CASE(cubic_loss_closed_form) {
  // ℓ = Σ_n (x_n·w)³:  vᵀ H v = 6 Σ_n (x_n·w)(x_n·v)²,  ∇(vᵀ H v) = 6 Σ_n (x_n·v)² x_n
  Generator gen(41);
  LinearScore m(gen);
  const Tensor x = randn({5, 3}, gen), v = randn({3}, gen);
  const Criterion cube = [](const Tensor& y, const Tensor&) { return sum(y * y * y); };
  const Tensor d = third_order_directional(m, cube, {x}, zeros({5, 1}), v);
  Tensor expect = zeros({3});
  for (std::size_t n = 0; n < 5; ++n) {
    double xv = 0.0;
    for (std::size_t i = 0; i < 3; ++i) xv += x.data()[n * 3 + i] * v.data()[i];
    for (std::size_t i = 0; i < 3; ++i) expect.mutable_data()[i] += 6.0 * xv * xv * x.data()[n * 3 + i];
  }
  CHECK_REL(d, expect, 1e-12);
  // a quadratic loss has no third derivative
  CHECK_REL(third_order_directional(m, nn::MSELoss(), {x}, randn({5, 1}, gen), v), zeros({3}), 1e-14);
}

BOOST_AUTO_TEST_CASE(gradient_of_the_top_eigenvalue) {
  Generator gen(42);
  auto net = tanh_net(gen);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  const nn::MSELoss mse;
  auto top = [&](Tensor* vector) {
    const auto [w, V] = xt::linalg::eigh(loss_hessian_matrix(*net, mse, {x}, t).value());
    const std::size_t n = w.size();
    if (vector) *vector = Tensor(Array(xt::col(V, n - 1)));
    BOOST_REQUIRE_GT(w(n - 1) - w(n - 2), 1e-3);  // simple: λ is differentiable
    return w(n - 1);
  };
  Tensor v;
  (void)top(&v);
  const Tensor d = third_order_directional(*net, mse, {x}, t, v);
  const Tensor fd = fd_gradient(trainable(*net), [&] { return top(nullptr); }, 1e-4);
  BOOST_CHECK_GT(max_abs(fd), 1e-2);
  CHECK_REL(d, fd, 1e-6);
}

BOOST_AUTO_TEST_CASE(block_diagonal_differentiates_the_diagonal_blocks_only) {
  Generator gen(43);
  auto net = tanh_net(gen);
  const Tensor x = randn({3, 3}, gen), t = randn({3, 3}, gen);
  const nn::MSELoss mse;
  const Tensor v = randn({31}, gen);
  OperatorOptions o;
  o.block_diagonal = true;
  HessianOptions ho;
  ho.diagonal_only = true;
  const Tensor d = third_order_directional(*net, mse, {x}, t, v, o);
  auto f = [&] {
    const Tensor H = loss_hessian_matrix(*net, mse, {x}, t, ho);
    return dot(v, matmul(H, v)).item();
  };
  CHECK_REL(d, fd_gradient(trainable(*net), f, 1e-4), 1e-6);
  BOOST_CHECK_GT(max_abs_diff(d, third_order_directional(*net, mse, {x}, t, v)), 1e-4);
}

BOOST_AUTO_TEST_CASE(v_of_the_wrong_shape) {
  Generator gen(44);
  auto net = tanh_net(gen);
  const Tensor x = randn({3, 3}, gen), t = randn({3, 3}, gen);
  HESSE_CHECK_THROWS(third_order_directional(*net, nn::MSELoss(), {x}, t, ones({34})), ShapeError, "[34]");
  HESSE_CHECK_THROWS(third_order_directional(*net, nn::MSELoss(), {x}, t, ones({2, 31})), ShapeError, "[2, 31]");
  HESSE_CHECK_THROWS(third_order_directional(*net, nn::MSELoss(), {x}, t, Tensor()), ShapeError, "undefined");
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ model state

BOOST_AUTO_TEST_SUITE(state)

BOOST_AUTO_TEST_CASE(eval_mode_while_recording_and_mode_restored) {
  Generator gen(50);
  ModeRecorder m(gen);
  const Tensor x = randn({3, 3}, gen), t = randn({3, 2}, gen);
  BOOST_REQUIRE(m.is_training());
  const nn::MSELoss mse;
  for (bool keep : {true, false}) {
    OperatorOptions o;
    o.keep_graph = keep;
    std::vector<LinearOperator> ops{loss_hessian_operator(m, mse, {x}, t, o), ggn_operator(m, mse, {x}, t, o),
                                    empirical_fisher_operator(m, mse, {x}, t, o),
                                    model_hessian_operator(m, {x}, ones({3, 2}), o)};
    BOOST_CHECK(m.all_eval());
    BOOST_CHECK(m.is_training() && m.lin->is_training());
    for (const LinearOperator& op : ops) {
      (void)op(ones({8}));
      if (!keep) BOOST_CHECK(m.all_eval());  // products rerun the forward pass, in eval mode
      BOOST_CHECK(m.seen.empty() || !keep);
      BOOST_CHECK(m.is_training() && m.lin->is_training());
    }
  }
  (void)third_order_directional(m, mse, {x}, t, ones({8}));
  BOOST_CHECK(m.all_eval());
  BOOST_CHECK(m.is_training());
  // restored after a failure too
  BOOST_CHECK_THROW(loss_hessian_operator(m, mse, {x}, randn({3, 5}, gen)), ShapeError);
  BOOST_CHECK(m.is_training() && m.lin->is_training());
  // eval stays eval
  m.eval();
  (void)ggn_operator(m, mse, {x}, t);
  BOOST_CHECK(!m.is_training() && !m.lin->is_training());
}

BOOST_AUTO_TEST_CASE(requires_grad_flags_are_restored) {
  Generator gen(51);
  auto net = tanh_net(gen);
  net->parameter("2.bias").requires_grad_(false);
  const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
  auto flags = [&] {
    std::vector<bool> f;
    for (const auto& [name, p] : net->named_parameters()) f.push_back(p.requires_grad());
    return f;
  };
  const std::vector<bool> before = flags();
  BOOST_REQUIRE(before == std::vector<bool>({true, true, true, false}));
  OperatorOptions o = with_params({"0.bias"});
  for (bool keep : {true, false}) {
    o.keep_graph = keep;
    const LinearOperator h = loss_hessian_operator(*net, nn::MSELoss(), {x}, t, o);
    BOOST_CHECK(flags() == before);
    (void)h(ones({4}));
    BOOST_CHECK(flags() == before);
    const LinearOperator g = ggn_operator(*net, nn::MSELoss(), {x}, t, o);
    const LinearOperator f = empirical_fisher_operator(*net, nn::MSELoss(), {x}, t, o);
    (void)g(ones({4}));
    (void)f(ones({4}));
    BOOST_CHECK(flags() == before);
  }
  (void)third_order_directional(*net, nn::MSELoss(), {x}, t, ones({4}), o);
  BOOST_CHECK(flags() == before);
  BOOST_CHECK_THROW(ggn_operator(*net, nn::MSELoss(), {x}, randn({4, 2}, gen), o), ShapeError);
  BOOST_CHECK(flags() == before);
  // the frozen bias is excluded: 3 + 0 parameters fewer than with it
  BOOST_CHECK_EQUAL(loss_hessian_operator(*net, nn::MSELoss(), {x}, t).size(), 28u);
}

BOOST_AUTO_TEST_CASE(the_operator_outlives_its_inputs_handles) {
  Generator gen(52);
  auto net = softplus_net(gen);
  LinearOperator op;
  Tensor H;
  {
    const Tensor x = randn({4, 3}, gen), t = randn({4, 3}, gen);
    H = loss_hessian_matrix(*net, nn::MSELoss(), {x}, t);
    op = loss_hessian_operator(*net, nn::MSELoss(), {x}, t);
  }
  const LinearOperator copy = op;  // copies share the operator and its counter
  CHECK_REL(to_dense(copy), H, 1e-12);
  BOOST_CHECK_EQUAL(op.products(), 31u);
}

BOOST_AUTO_TEST_SUITE_END()

// ================================================================ errors

BOOST_AUTO_TEST_SUITE(errors)

BOOST_AUTO_TEST_CASE(vector_of_the_wrong_size) {
  Generator gen(60);
  auto net = tanh_net(gen);
  const Tensor x = randn({3, 3}, gen), t = randn({3, 3}, gen);
  const LinearOperator op = ggn_operator(*net, nn::MSELoss(), {x}, t);
  HESSE_CHECK_THROWS(op(ones({34})), ShapeError, "[34]");
  HESSE_CHECK_THROWS(op(ones({2, 36})), ShapeError, "[2, 36]");
  BOOST_CHECK_EQUAL(op.products(), 0u);
}

BOOST_AUTO_TEST_CASE(empty_and_inconsistent_datasets) {
  Generator gen(61);
  auto net = tanh_net(gen);
  const nn::MSELoss mse;
  HESSE_CHECK_THROWS(loss_hessian_operator(*net, mse, std::vector<Batch>{}), ValueError, "dataset is empty");
  HESSE_CHECK_THROWS(ggn_operator(*net, mse, std::vector<Batch>{}), ValueError, "ggn_operator");
  HESSE_CHECK_THROWS(empirical_fisher_operator(*net, mse, std::vector<Batch>{}), ValueError, "dataset is empty");
  const Batch good{{randn({2, 3}, gen)}, randn({2, 3}, gen)};
  const Batch wide{{randn({2, 4}, gen)}, randn({2, 3}, gen)};
  HESSE_CHECK_THROWS(loss_hessian_operator(*net, mse, {good, wide}), ShapeError, "input 0 of batch 1 has shape [2, 4]");
  const Batch bad_target{{randn({3, 3}, gen)}, randn({3, 2}, gen)};
  HESSE_CHECK_THROWS(ggn_operator(*net, mse, {good, bad_target}), ShapeError, "target of batch 1");
  const Batch mismatched{{randn({3, 3}, gen)}, randn({2, 3}, gen)};
  HESSE_CHECK_THROWS(loss_hessian_operator(*net, mse, {good, mismatched}), ShapeError, "batch 1");
  const Batch two_inputs{{randn({2, 3}, gen), randn({2, 3}, gen)}, randn({2, 3}, gen)};
  HESSE_CHECK_THROWS(loss_hessian_operator(*net, mse, {good, two_inputs}), ShapeError, "2 inputs");
  const Batch empty{{zeros({0, 3})}, zeros({0, 3})};
  HESSE_CHECK_THROWS(empirical_fisher_operator(*net, mse, {good, empty}), ValueError, "batch 1");
}

BOOST_AUTO_TEST_CASE(non_scalar_criterion_and_missing_criterion) {
  Generator gen(62);
  auto net = tanh_net(gen);
  const Tensor x = randn({3, 3}, gen), t = randn({3, 3}, gen);
  const Criterion none = [](const Tensor& y, const Tensor& target) {
    return nn::mse_loss(y, target, nn::Reduction::none);
  };
  HESSE_CHECK_THROWS(loss_hessian_operator(*net, none, {x}, t), ShapeError, "scalar loss");
  HESSE_CHECK_THROWS(ggn_operator(*net, none, {x}, t), ShapeError, "ggn_operator");
  OperatorOptions o;
  o.keep_graph = false;
  HESSE_CHECK_THROWS(loss_hessian_operator(*net, none, {x}, t, o), ShapeError, "[3, 3]");
  HESSE_CHECK_THROWS(third_order_directional(*net, none, {x}, t, ones({31})), ShapeError, "scalar loss");
  HESSE_CHECK_THROWS(loss_hessian_operator(*net, Criterion(), {x}, t), ValueError, "no criterion");
  HESSE_CHECK_THROWS(empirical_fisher_operator(*net, Criterion(), {x}, t), ValueError, "no criterion");
}

BOOST_AUTO_TEST_CASE(unknown_and_frozen_parameter_names) {
  Generator gen(63);
  auto net = tanh_net(gen);
  const Tensor x = randn({3, 3}, gen), t = randn({3, 3}, gen);
  HESSE_CHECK_THROWS(loss_hessian_operator(*net, nn::MSELoss(), {x}, t, with_params({"0.wieght"})), ValueError,
                     "unknown parameter '0.wieght'");
  HESSE_CHECK_THROWS(ggn_operator(*net, nn::MSELoss(), {x}, t, with_params({"9.bias"})), ValueError, "ggn_operator");
  HESSE_CHECK_THROWS(model_hessian_operator(*net, {x}, ones({3, 3}), with_params({"nope"})), ValueError, "'nope'");
  HESSE_CHECK_THROWS(third_order_directional(*net, nn::MSELoss(), {x}, t, ones({31}), with_params({"x"})), ValueError,
                     "unknown parameter 'x'");
  net->parameter("0.bias").requires_grad_(false);
  HESSE_CHECK_THROWS(empirical_fisher_operator(*net, nn::MSELoss(), {x}, t, with_params({"0.bias"})), ValueError,
                     "'0.bias' is frozen");
}

BOOST_AUTO_TEST_CASE(model_that_does_not_depend_on_the_selection_gives_zero) {
  // U is never used: every operator over U alone is the zero matrix
  struct PartlyUnused : nn::Module {
    Tensor W, U;
    PartlyUnused() {
      W = register_parameter("W", Tensor{{1.0, 2.0}});
      U = register_parameter("U", Tensor{3.0, 4.0});
    }
    Tensor forward(const std::vector<Tensor>& in) override { return tanh(matmul(in[0], transpose(W))); }
  } m;
  const Tensor x = Tensor{{1.0, -1.0}, {0.5, 2.0}}, t = reshape(Tensor{0.0, 1.0}, Shape{2, 1});
  const OperatorOptions o = with_params({"U"});
  const nn::MSELoss mse;
  BOOST_CHECK_EQUAL(max_abs(to_dense(loss_hessian_operator(m, mse, {x}, t, o))), 0.0);
  BOOST_CHECK_EQUAL(max_abs(to_dense(ggn_operator(m, mse, {x}, t, o))), 0.0);
  BOOST_CHECK_EQUAL(max_abs(to_dense(empirical_fisher_operator(m, mse, {x}, t, o))), 0.0);
  BOOST_CHECK_EQUAL(max_abs(third_order_directional(m, mse, {x}, t, ones({2}), o)), 0.0);
  // and the U rows/columns of the full operators are zero while W's are not
  const Tensor G = to_dense(ggn_operator(m, mse, {x}, t));
  BOOST_CHECK_GT(std::abs(G.data()[0]), 1e-3);
  BOOST_CHECK_EQUAL(max_abs(slice(G, 0, 2, 4).clone()), 0.0);
}

BOOST_AUTO_TEST_SUITE_END()
