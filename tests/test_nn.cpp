#define BOOST_TEST_MODULE nn
#include "test_util.hpp"

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#include "hesse/check.hpp"
#include "hesse/io.hpp"

using namespace hesse;
using namespace hesse::nn;
namespace fs = std::filesystem;

namespace {

Shape S(std::initializer_list<std::size_t> dims) { return Shape(dims.begin(), dims.end()); }

std::vector<std::string> names_of(const std::vector<NamedTensor>& params) {
  std::vector<std::string> out;
  for (const auto& p : params) out.push_back(p.first);
  return out;
}

/// A fresh folder under the temp dir, removed with its files at scope exit.
struct TempDir {
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("hesse_test_nn_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
  std::string file(const std::string& name) const { return (path / name).string(); }
  fs::path path;
};

/// Deep copies of every parameter's values, in order.
std::vector<Tensor> snapshot(const Module& m) {
  std::vector<Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.clone());
  return out;
}

bool same_values(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].shape() != b[i].shape()) return false;
    for (std::size_t j = 0; j < a[i].numel(); ++j)
      if (a[i].data()[j] != b[i].data()[j]) return false;
  }
  return true;
}

/// Adds `delta` to every entry of every parameter (outside the tape).
void shift_parameters(Module& m, double delta) {
  for (auto p : m.parameters())
    for (std::size_t i = 0; i < p.numel(); ++i) p.mutable_data()[i] += delta;
}

/// A module whose registration functions are public, to test them directly.
struct Open : Module {
  using Module::register_module;
  using Module::register_parameter;
  Tensor forward(const std::vector<Tensor>& inputs) override { return inputs.at(0); }
};

/// scale (own parameter), encoder = Sequential(Linear(3,4), Tanh, Linear(4,2)), head = Linear(2,1).
/// The encoder is registered before `scale` to show that own parameters still come first.
struct EncoderModel : Module {
  std::shared_ptr<Sequential> encoder;
  std::shared_ptr<Linear> head;
  Tensor scale;
  explicit EncoderModel(Generator& gen) {
    encoder = register_module("encoder", std::make_shared<Sequential>(Sequential{
                                             std::make_shared<Linear>(3, 4, true, gen), std::make_shared<Tanh>(),
                                             std::make_shared<Linear>(4, 2, true, gen)}));
    scale = register_parameter("scale", Tensor{2.0});
    head = register_module("head", std::make_shared<Linear>(2, 1, true, gen));
  }
  Tensor forward(const std::vector<Tensor>& inputs) override {
    return (*head)((*encoder)(inputs) * scale);
  }
};

/// Like the seed's MimoModel: f(x, y) = hstack(tr(AᵀA) x, tr(BᵀB) y), A, B 2×2 parameters.
struct Mimo : Module {
  Tensor A, B;
  explicit Mimo(Generator& gen) {
    A = register_parameter("A", randn({2, 2}, gen));
    B = register_parameter("B", randn({2, 2}, gen));
  }
  Tensor forward(const std::vector<Tensor>& in) override {
    if (in.size() != 2) throw ValueError("hesse::Mimo: takes two inputs, got " + std::to_string(in.size()));
    return hstack({trace(matmul(transpose(A), A)) * in[0], trace(matmul(transpose(B), B)) * in[1]});
  }
};

/// y = x Wᵀ + b by loops, for x [N, in] (or [in] when `vector`).
Tensor linear_by_loops(const Tensor& x, const Tensor& W, const Tensor& b) {
  const std::size_t out = W.shape()[0], in = W.shape()[1];
  const bool vector = x.ndim() == 1;
  const std::size_t n = vector ? 1 : x.shape()[0];
  Tensor y = vector ? zeros(S({out})) : zeros(S({n, out}));
  for (std::size_t r = 0; r < n; ++r)
    for (std::size_t k = 0; k < out; ++k) {
      double acc = b.defined() ? b.data()[k] : 0.0;
      for (std::size_t i = 0; i < in; ++i) acc += x.data()[r * in + i] * W.data()[k * in + i];
      y.mutable_data()[r * out + k] = acc;
    }
  return y;
}

/// y[n,k] = Σ_ij x1[n,i] W[k,i,j] x2[n,j] + b[k] by loops.
Tensor bilinear_by_loops(const Tensor& x1, const Tensor& x2, const Tensor& W, const Tensor& b) {
  const std::size_t out = W.shape()[0], in1 = W.shape()[1], in2 = W.shape()[2], n = x1.shape()[0];
  Tensor y = zeros(S({n, out}));
  for (std::size_t r = 0; r < n; ++r)
    for (std::size_t k = 0; k < out; ++k) {
      double acc = b.defined() ? b.data()[k] : 0.0;
      for (std::size_t i = 0; i < in1; ++i)
        for (std::size_t j = 0; j < in2; ++j)
          acc += x1.data()[r * in1 + i] * W.data()[(k * in1 + i) * in2 + j] * x2.data()[r * in2 + j];
      y.mutable_data()[r * out + k] = acc;
    }
  return y;
}

/// Puts `weight` and `bias` into a Linear or Bilinear for a scope, so a
/// gradcheck lambda can differentiate the module's own forward with respect
/// to them; the original handles come back at scope exit.
template <class Layer>
struct SwapParams {
  SwapParams(Layer& layer, const Tensor& w, const Tensor& b) : layer_(layer), w_(layer.weight), b_(layer.bias) {
    layer.weight = w;
    layer.bias = b;
  }
  ~SwapParams() {
    layer_.weight = w_;
    layer_.bias = b_;
  }
  Layer& layer_;
  Tensor w_, b_;
};

CheckOptions tight() {
  CheckOptions o;
  o.atol = 1e-6;
  o.rtol = 1e-5;
  return o;
}

Tensor leaf(const Shape& shape, Generator& gen) { return randn(shape, gen).requires_grad_(true); }

}  // namespace

// ---------------------------------------------------------------- naming and order

BOOST_AUTO_TEST_SUITE(naming)

BOOST_AUTO_TEST_CASE(mlp_names_shapes_and_order) {
  Generator gen(1);
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  const auto params = net->named_parameters();
  BOOST_REQUIRE_EQUAL(params.size(), 4u);
  const std::vector<std::string> names{"0.weight", "0.bias", "2.weight", "2.bias"};
  const std::vector<Shape> shapes{S({5, 3}), S({5}), S({2, 5}), S({2})};
  for (std::size_t i = 0; i < 4; ++i) {
    BOOST_CHECK_EQUAL(params[i].first, names[i]);
    BOOST_CHECK_MESSAGE(params[i].second.shape() == shapes[i],
                        names[i] << " has shape " << to_string(params[i].second.shape()));
    BOOST_CHECK(params[i].second.requires_grad());
    BOOST_CHECK(params[i].second.is_leaf());
  }
  const auto plain = net->parameters();
  BOOST_REQUIRE_EQUAL(plain.size(), 4u);
  for (std::size_t i = 0; i < 4; ++i) BOOST_CHECK(plain[i].impl() == params[i].second.impl());
  BOOST_CHECK_EQUAL(net->num_parameters(), 15u + 5u + 10u + 2u);
  BOOST_CHECK_EQUAL(net->size(), 3u);
}

BOOST_AUTO_TEST_CASE(nested_dotted_names_own_parameters_first) {
  Generator gen(2);
  EncoderModel model(gen);
  const std::vector<std::string> expected{"scale",           "encoder.0.weight", "encoder.0.bias", "encoder.2.weight",
                                          "encoder.2.bias", "head.weight",      "head.bias"};
  BOOST_CHECK(names_of(model.named_parameters()) == expected);
  BOOST_CHECK_EQUAL(model.num_parameters(), 1u + 12u + 4u + 8u + 2u + 2u + 1u);
  BOOST_CHECK(model.parameter("encoder.2.bias").shape() == S({2}));
  BOOST_CHECK(model.parameter("encoder.2.bias").impl() == model.encoder->parameter("2.bias").impl());
}

BOOST_AUTO_TEST_CASE(named_modules_and_children) {
  Generator gen(3);
  EncoderModel model(gen);
  const auto mods = model.named_modules();
  const std::vector<std::string> expected{"", "encoder", "encoder.0", "encoder.1", "encoder.2", "head"};
  BOOST_REQUIRE_EQUAL(mods.size(), expected.size());
  for (std::size_t i = 0; i < mods.size(); ++i) BOOST_CHECK_EQUAL(mods[i].first, expected[i]);
  BOOST_CHECK(mods[0].second == &model);
  BOOST_CHECK(mods[1].second == model.encoder.get());
  BOOST_CHECK(mods[5].second == model.head.get());
  BOOST_CHECK(dynamic_cast<Activation*>(mods[3].second) != nullptr);
  BOOST_REQUIRE_EQUAL(model.children().size(), 2u);
  BOOST_CHECK_EQUAL(model.children()[0].first, "encoder");
  BOOST_CHECK_EQUAL(model.children()[1].first, "head");
}

BOOST_AUTO_TEST_CASE(parameter_returns_the_same_handle) {
  Generator gen(4);
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  Tensor w = net->parameter("2.weight");
  auto* second = dynamic_cast<Linear*>(net->children()[2].second.get());
  BOOST_REQUIRE(second != nullptr);
  BOOST_CHECK(w.impl() == second->weight.impl());
  w.mutable_data()[3] = 123.5;
  BOOST_CHECK_EQUAL(second->weight.data()[3], 123.5);
  BOOST_CHECK_EQUAL(net->named_parameters()[2].second.data()[3], 123.5);
  second->bias.mutable_data()[1] = -7.25;
  BOOST_CHECK_EQUAL(net->parameter("2.bias").data()[1], -7.25);
  // and the forward pass sees the change
  const Tensor x = randn(S({1, 3}), gen);
  const Tensor y = (*net)(x);
  const Tensor h = tanh(linear(x, net->parameter("0.weight"), net->parameter("0.bias")));
  HESSE_CHECK_CLOSE(y, linear_by_loops(h, second->weight, second->bias), 1e-12);
}

BOOST_AUTO_TEST_CASE(unknown_name_lists_the_names) {
  Generator gen(5);
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  HESSE_CHECK_THROWS(net->parameter("1.weight"), ValueError, "1.weight");
  HESSE_CHECK_THROWS(net->parameter("1.weight"), ValueError, "0.weight, 0.bias, 2.weight, 2.bias");
  HESSE_CHECK_THROWS(net->parameter(""), ValueError, "0.weight");
  EncoderModel model(gen);
  HESSE_CHECK_THROWS(model.parameter("encoder.1.bias"), ValueError, "encoder.2.bias");
  HESSE_CHECK_THROWS(model.parameter("encoder"), ValueError, "head.weight");
}

BOOST_AUTO_TEST_CASE(registration_rejects_duplicates_and_bad_names) {
  Open m;
  m.register_parameter("w", zeros(S({2})));
  HESSE_CHECK_THROWS(m.register_parameter("w", zeros(S({3}))), ValueError, "'w'");
  HESSE_CHECK_THROWS(m.register_module("w", std::make_shared<Tanh>()), ValueError, "'w'");
  m.register_module("act", std::make_shared<Tanh>());
  HESSE_CHECK_THROWS(m.register_module("act", std::make_shared<Tanh>()), ValueError, "'act'");
  HESSE_CHECK_THROWS(m.register_parameter("act", zeros(S({1}))), ValueError, "'act'");
  HESSE_CHECK_THROWS(m.register_parameter("a.b", zeros(S({1}))), ValueError, "'a.b'");
  HESSE_CHECK_THROWS(m.register_module("a.b", std::make_shared<Tanh>()), ValueError, "'a.b'");
  HESSE_CHECK_THROWS(m.register_parameter("", zeros(S({1}))), ValueError, "name");
  HESSE_CHECK_THROWS(m.register_parameter("u", Tensor()), ValueError, "'u'");
  HESSE_CHECK_THROWS(m.register_module("null", std::shared_ptr<Module>()), ValueError, "'null'");
  // a module inside itself: every walk over the modules would recurse forever
  auto outer = std::make_shared<Sequential>(), inner = std::make_shared<Sequential>();
  outer->add(inner);
  HESSE_CHECK_THROWS(outer->add(outer), ValueError, "is this module or contains it");
  HESSE_CHECK_THROWS(inner->add(outer), ValueError, "is this module or contains it");
  BOOST_CHECK(outer->named_parameters().empty());
  // the failed registrations left nothing behind
  BOOST_CHECK(names_of(m.named_parameters()) == std::vector<std::string>{"w"});
  BOOST_CHECK_EQUAL(m.children().size(), 1u);
}

BOOST_AUTO_TEST_CASE(shared_parameters_and_modules_listed_once) {
  // PyTorch's remove_duplicate=True: a tied tensor is one set of variables, under its first name
  Generator gen(33);
  Open m;
  auto lin = std::make_shared<Linear>(2, 3, true, gen);
  m.register_module("a", lin);
  m.register_module("b", lin);
  BOOST_CHECK(names_of(m.named_parameters()) == (std::vector<std::string>{"a.weight", "a.bias"}));
  BOOST_CHECK_EQUAL(m.num_parameters(), 9u);
  const auto mods = m.named_modules();
  BOOST_REQUIRE_EQUAL(mods.size(), 2u);
  BOOST_CHECK_EQUAL(mods[1].first, "a");
  BOOST_CHECK(m.parameter("a.weight").impl() == lin->weight.impl());
  HESSE_CHECK_THROWS(m.parameter("b.weight"), ValueError, "a.weight, a.bias");
  Open tied;
  Tensor t = tied.register_parameter("p", randn(S({2}), gen));
  tied.register_parameter("q", t);
  tied.register_parameter("r", randn(S({3}), gen));
  BOOST_CHECK(names_of(tied.named_parameters()) == (std::vector<std::string>{"p", "r"}));
  BOOST_CHECK_EQUAL(tied.num_parameters(), 5u);
}

BOOST_AUTO_TEST_CASE(registered_parameters_are_leaves) {
  Open m;
  const Tensor a = randn(S({2, 2})).requires_grad_(true);
  const Tensor made = a * 2.0;  // not a leaf
  Tensor p = m.register_parameter("p", made);
  BOOST_CHECK(p.is_leaf());
  BOOST_CHECK(p.requires_grad());
  BOOST_CHECK(!p.grad_fn());
  HESSE_CHECK_CLOSE(p, made, 0.0);
  Tensor q = m.register_parameter("q", zeros(S({3})), false);
  BOOST_CHECK(!q.requires_grad());
  BOOST_CHECK_EQUAL(m.num_parameters(), 7u);
  BOOST_CHECK_EQUAL(m.num_parameters(true), 4u);
}

BOOST_AUTO_TEST_CASE(freezing_and_trainable_parameters) {
  Generator gen(6);
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  BOOST_CHECK_EQUAL(net->num_parameters(true), 32u);
  net->parameter("0.bias").requires_grad_(false);
  BOOST_CHECK_EQUAL(net->num_parameters(), 32u);
  BOOST_CHECK_EQUAL(net->num_parameters(true), 27u);
  BOOST_CHECK(names_of(net->trainable_parameters()) ==
              (std::vector<std::string>{"0.weight", "2.weight", "2.bias"}));
  const auto trainable = net->trainable_parameters();
  BOOST_CHECK(trainable[1].second.impl() == net->parameter("2.weight").impl());
  net->parameter("0.bias").requires_grad_(true);
  BOOST_CHECK_EQUAL(net->trainable_parameters().size(), 4u);
}

BOOST_AUTO_TEST_CASE(summary_lists_names_shapes_counts_frozen) {
  Generator gen(7);
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  net->parameter("2.bias").requires_grad_(false);
  const std::string s = net->summary();
  for (const char* text : {"0.weight", "0.bias", "2.weight", "2.bias", "[5, 3]", "[5]", "[2, 5]", "[2]", "15", "10",
                           "frozen", "32 parameters", "30 trainable"})
    BOOST_CHECK_MESSAGE(s.find(text) != std::string::npos, "summary lacks '" << text << "':\n" << s);
  // "frozen" sits on the line of 2.bias only
  std::istringstream lines(s);
  std::string line;
  int frozen_lines = 0;
  while (std::getline(lines, line))
    if (line.find("frozen") != std::string::npos) {
      ++frozen_lines;
      BOOST_CHECK_MESSAGE(line.find("2.bias") != std::string::npos, line);
    }
  BOOST_CHECK_EQUAL(frozen_lines, 1);
  std::ostringstream os;
  os << *net;
  BOOST_CHECK_EQUAL(os.str(), s);
}

BOOST_AUTO_TEST_CASE(zero_grad_clears_every_gradient) {
  Generator gen(8);
  auto net = mlp({3, 4, 1}, Activation::Kind::tanh, gen);
  sum((*net)(randn(S({5, 3}), gen))).backward();
  for (const auto& [name, p] : net->named_parameters()) BOOST_CHECK_MESSAGE(p.grad().defined(), name);
  net->zero_grad();
  for (const auto& [name, p] : net->named_parameters()) {
    const Tensor g = p.grad();
    bool zero = true;
    if (g.defined())
      for (std::size_t i = 0; i < g.numel(); ++i) zero = zero && g.data()[i] == 0.0;
    BOOST_CHECK_MESSAGE(zero, name << " still has a gradient");
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- train / eval

BOOST_AUTO_TEST_CASE(train_eval_propagate_and_guard_restores) {
  Generator gen(9);
  EncoderModel model(gen);
  auto all_mode = [&](bool training) {
    for (const auto& [name, m] : model.named_modules())
      if (m->is_training() != training) return false;
    return true;
  };
  BOOST_CHECK(all_mode(true));
  model.eval();
  BOOST_CHECK(all_mode(false));
  BOOST_CHECK(model.summary().find("eval mode") != std::string::npos);
  model.train();
  BOOST_CHECK(all_mode(true));
  {
    EvalModeGuard guard(model);
    BOOST_CHECK(all_mode(false));
  }
  BOOST_CHECK(all_mode(true));
  model.train(false);
  {
    EvalModeGuard guard(model);
    BOOST_CHECK(all_mode(false));
  }
  BOOST_CHECK(all_mode(false));
  model.train(true);
  // a guard on a child leaves the parent alone
  {
    EvalModeGuard guard(*model.encoder);
    BOOST_CHECK(model.is_training());
    BOOST_CHECK(!model.encoder->is_training());
    BOOST_CHECK(!model.encoder->children()[0].second->is_training());
    BOOST_CHECK(model.head->is_training());
  }
  BOOST_CHECK(all_mode(true));
}

// ---------------------------------------------------------------- Linear

BOOST_AUTO_TEST_SUITE(linear_layer)

BOOST_AUTO_TEST_CASE(forward_matches_loops) {
  Generator gen(10);
  Linear lin(4, 3, true, gen);
  BOOST_CHECK(lin.weight.shape() == S({3, 4}));
  BOOST_CHECK(lin.bias.shape() == S({3}));
  BOOST_CHECK(names_of(lin.named_parameters()) == (std::vector<std::string>{"weight", "bias"}));
  const Tensor x = randn(S({5, 4}), gen);
  HESSE_CHECK_CLOSE(lin(x), linear_by_loops(x, lin.weight, lin.bias), 1e-12);
  // 1-D input: [in] -> [out]
  const Tensor v = randn(S({4}), gen);
  const Tensor yv = lin(v);
  BOOST_CHECK(yv.shape() == S({3}));
  HESSE_CHECK_CLOSE(yv, linear_by_loops(v, lin.weight, lin.bias), 1e-12);
  // extra leading dimensions: [2, 5, in] -> [2, 5, out]
  const Tensor x3 = randn(S({2, 5, 4}), gen);
  const Tensor y3 = lin(x3);
  BOOST_REQUIRE(y3.shape() == S({2, 5, 3}));
  HESSE_CHECK_CLOSE(reshape(y3, S({10, 3})), linear_by_loops(reshape(x3, S({10, 4})), lin.weight, lin.bias), 1e-12);
}

BOOST_AUTO_TEST_CASE(without_bias) {
  Generator gen(11);
  Linear lin(4, 3, false, gen);
  BOOST_CHECK(!lin.bias.defined());
  BOOST_CHECK(names_of(lin.named_parameters()) == std::vector<std::string>{"weight"});
  BOOST_CHECK_EQUAL(lin.num_parameters(), 12u);
  const Tensor x = randn(S({6, 4}), gen);
  HESSE_CHECK_CLOSE(lin(x), linear_by_loops(x, lin.weight, Tensor()), 1e-12);
}

BOOST_AUTO_TEST_CASE(pytorch_default_init) {
  Generator gen(12);
  const std::size_t in = 7;
  Linear small(in, 9, true, gen);
  const double bound = 1.0 / std::sqrt(double(in));
  for (const auto& [name, p] : small.named_parameters())
    for (std::size_t i = 0; i < p.numel(); ++i)
      BOOST_CHECK_MESSAGE(std::abs(p.data()[i]) <= bound, name << "[" << i << "] = " << p.data()[i]);
  // a large layer: U(-b, b) has mean 0, variance b²/3, and fills the interval
  const std::size_t in_big = 400, out_big = 500;
  Linear big(in_big, out_big, true, gen);
  const double b = 1.0 / std::sqrt(double(in_big));
  const Tensor& w = big.weight;
  double s = 0, s2 = 0, mx = 0;
  for (std::size_t i = 0; i < w.numel(); ++i) {
    s += w.data()[i];
    s2 += w.data()[i] * w.data()[i];
    mx = std::max(mx, std::abs(w.data()[i]));
  }
  const double n = double(w.numel());
  const double mean = s / n, var = s2 / n - mean * mean;
  BOOST_CHECK_SMALL(mean, 5 * b / std::sqrt(3 * n));
  BOOST_CHECK_CLOSE(var, b * b / 3, 2.0);  // percent; the relative standard error is ~0.4 %
  BOOST_CHECK_LE(mx, b);
  BOOST_CHECK_GT(mx, 0.999 * b);
  double bmax = 0;
  for (std::size_t i = 0; i < big.bias.numel(); ++i) bmax = std::max(bmax, std::abs(big.bias.data()[i]));
  BOOST_CHECK_LE(bmax, b);
  BOOST_CHECK_GT(bmax, 0.9 * b);
}

BOOST_AUTO_TEST_CASE(seeded_generator_is_reproducible) {
  Generator g1(42), g2(42), g3(43);
  Linear a(5, 4, true, g1), b(5, 4, true, g2), c(5, 4, true, g3);
  HESSE_CHECK_CLOSE(a.weight, b.weight, 0.0);
  HESSE_CHECK_CLOSE(a.bias, b.bias, 0.0);
  BOOST_CHECK_GT(testing::max_abs_diff(a.weight, c.weight), 0.0);
  // the default generator, reseeded, gives the same layer twice
  manual_seed(5);
  Linear d(3, 2);
  manual_seed(5);
  Linear e(3, 2);
  HESSE_CHECK_CLOSE(d.weight, e.weight, 0.0);
  HESSE_CHECK_CLOSE(d.bias, e.bias, 0.0);
  // mlp draws its layers from the generator in order
  Generator h1(7), h2(7);
  auto m1 = mlp({3, 4, 2}, Activation::Kind::relu, h1);
  auto m2 = mlp({3, 4, 2}, Activation::Kind::relu, h2);
  for (std::size_t i = 0; i < 4; ++i) HESSE_CHECK_CLOSE(m1->parameters()[i], m2->parameters()[i], 0.0);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- Bilinear

BOOST_AUTO_TEST_SUITE(bilinear_layer)

BOOST_AUTO_TEST_CASE(forward_matches_loops) {
  Generator gen(13);
  Bilinear bl(3, 4, 2, true, gen);
  BOOST_CHECK(bl.weight.shape() == S({2, 3, 4}));
  BOOST_CHECK(bl.bias.shape() == S({2}));
  BOOST_CHECK(names_of(bl.named_parameters()) == (std::vector<std::string>{"weight", "bias"}));
  const Tensor x1 = randn(S({5, 3}), gen), x2 = randn(S({5, 4}), gen);
  HESSE_CHECK_CLOSE(bl(x1, x2), bilinear_by_loops(x1, x2, bl.weight, bl.bias), 1e-12);
  Bilinear nb(3, 4, 2, false, gen);
  BOOST_CHECK(!nb.bias.defined());
  HESSE_CHECK_CLOSE(nb(x1, x2), bilinear_by_loops(x1, x2, nb.weight, Tensor()), 1e-12);
}

BOOST_AUTO_TEST_CASE(leading_dimensions_like_pytorch) {
  Generator gen(14);
  Bilinear bl(3, 4, 2, true, gen);
  const Tensor v1 = randn(S({3}), gen), v2 = randn(S({4}), gen);
  const Tensor yv = bl(v1, v2);
  BOOST_REQUIRE(yv.shape() == S({2}));
  HESSE_CHECK_CLOSE(yv, reshape(bilinear_by_loops(reshape(v1, S({1, 3})), reshape(v2, S({1, 4})), bl.weight, bl.bias),
                                S({2})),
                    1e-12);
  const Tensor a = randn(S({2, 3, 3}), gen), b = randn(S({2, 3, 4}), gen);
  const Tensor y = bl(a, b);
  BOOST_REQUIRE(y.shape() == S({2, 3, 2}));
  HESSE_CHECK_CLOSE(reshape(y, S({6, 2})),
                    bilinear_by_loops(reshape(a, S({6, 3})), reshape(b, S({6, 4})), bl.weight, bl.bias), 1e-12);
}

BOOST_AUTO_TEST_CASE(pytorch_default_init_uses_in1) {
  Generator gen(15);
  Bilinear bl(16, 3, 50, true, gen);  // bound 1/4, not 1/√3
  const double bound = 0.25;
  double mx = 0;
  for (const auto& p : bl.parameters())
    for (std::size_t i = 0; i < p.numel(); ++i) mx = std::max(mx, std::abs(p.data()[i]));
  BOOST_CHECK_LE(mx, bound);
  BOOST_CHECK_GT(mx, 0.99 * bound);
  Generator g1(3), g2(3);
  Bilinear p(2, 3, 4, true, g1), q(2, 3, 4, true, g2);
  HESSE_CHECK_CLOSE(p.weight, q.weight, 0.0);
  HESSE_CHECK_CLOSE(p.bias, q.bias, 0.0);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- activations, Flatten, Sequential, mlp

BOOST_AUTO_TEST_SUITE(containers)

BOOST_AUTO_TEST_CASE(activation_modules_equal_the_ops) {
  Generator gen(16);
  const Tensor x = randn(S({3, 4}), gen) * 2.0;
  HESSE_CHECK_CLOSE(Tanh()(x), tanh(x), 0.0);
  HESSE_CHECK_CLOSE(Sigmoid()(x), sigmoid(x), 0.0);
  HESSE_CHECK_CLOSE(ReLU()(x), relu(x), 0.0);
  HESSE_CHECK_CLOSE(Softplus()(x), softplus(x), 0.0);
  HESSE_CHECK_CLOSE(GELU()(x), gelu(x), 0.0);
  HESSE_CHECK_CLOSE(Activation(Activation::Kind::gelu)(x), gelu(x), 0.0);
  BOOST_CHECK(GELU().kind() == Activation::Kind::gelu);
  BOOST_CHECK_EQUAL(Tanh().num_parameters(), 0u);
  BOOST_CHECK(Tanh().named_parameters().empty());
}

BOOST_AUTO_TEST_CASE(flatten_module) {
  Generator gen(17);
  const Tensor x = randn(S({2, 3, 4}), gen);
  const Tensor y = Flatten()(x);
  BOOST_CHECK(y.shape() == S({2, 12}));
  HESSE_CHECK_CLOSE(reshape(y, S({24})), reshape(x, S({24})), 0.0);
  BOOST_CHECK(Flatten(0)(x).shape() == S({24}));
  BOOST_CHECK(Flatten(1, 2)(randn(S({2, 3, 4, 5}), gen)).shape() == S({2, 12, 5}));
  BOOST_CHECK(Flatten(-2, -1)(randn(S({2, 3, 4, 5}), gen)).shape() == S({2, 3, 20}));
}

BOOST_AUTO_TEST_CASE(sequential_applies_children_in_order) {
  Generator gen(18);
  auto l0 = std::make_shared<Linear>(3, 4, true, gen);
  auto l2 = std::make_shared<Linear>(4, 2, true, gen);
  Sequential seq{l0, std::make_shared<Sigmoid>(), l2};
  seq.add(std::make_shared<Softplus>()).add(std::make_shared<Flatten>(0));
  BOOST_CHECK_EQUAL(seq.size(), 5u);
  for (std::size_t i = 0; i < seq.size(); ++i) BOOST_CHECK_EQUAL(seq.children()[i].first, std::to_string(i));
  BOOST_CHECK(seq.children()[0].second == l0);
  const Tensor x = randn(S({5, 3}), gen);
  const Tensor expected = reshape(softplus(linear(sigmoid(linear(x, l0->weight, l0->bias)), l2->weight, l2->bias)),
                                  S({10}));
  HESSE_CHECK_CLOSE(seq(x), expected, 1e-14);
  BOOST_CHECK(names_of(seq.named_parameters()) ==
              (std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias"}));
  // an empty Sequential is the identity
  Sequential empty;
  HESSE_CHECK_CLOSE(empty(x), x, 0.0);
  // a Sequential whose first child takes two inputs passes both on
  Sequential two{std::make_shared<Bilinear>(3, 2, 4, true, gen), std::make_shared<Tanh>()};
  auto* bl = dynamic_cast<Bilinear*>(two.children()[0].second.get());
  const Tensor z = randn(S({5, 2}), gen);
  HESSE_CHECK_CLOSE(two(x, z), tanh(bilinear_by_loops(x, z, bl->weight, bl->bias)), 1e-12);
}

BOOST_AUTO_TEST_CASE(mlp_structure_for_every_activation) {
  using K = Activation::Kind;
  for (K kind : {K::tanh, K::sigmoid, K::relu, K::softplus, K::gelu}) {
    Generator gen(19);
    auto net = mlp({4, 6, 5, 3}, kind, gen);
    BOOST_REQUIRE_EQUAL(net->size(), 5u);
    for (std::size_t i = 0; i < 5; ++i) {
      const auto& [name, child] = net->children()[i];
      BOOST_CHECK_EQUAL(name, std::to_string(i));
      if (i % 2 == 0) {
        BOOST_CHECK(dynamic_cast<Linear*>(child.get()) != nullptr);
      } else {
        auto* act = dynamic_cast<Activation*>(child.get());
        BOOST_REQUIRE(act != nullptr);
        BOOST_CHECK(act->kind() == kind);
      }
    }
    BOOST_CHECK(names_of(net->named_parameters()) ==
                (std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}));
    BOOST_CHECK(net->parameter("2.weight").shape() == S({5, 6}));
    BOOST_CHECK(net->parameter("4.weight").shape() == S({3, 5}));
    // forward = manual composition; the output is not activated
    const Tensor x = randn(S({2, 4}), gen) * 2.0;
    Tensor h = x;
    for (std::size_t i = 0; i < 3; ++i) {
      const std::string p = std::to_string(2 * i);
      h = linear(h, net->parameter(p + ".weight"), net->parameter(p + ".bias"));
      if (i < 2) h = Activation(kind)(h);
    }
    HESSE_CHECK_CLOSE((*net)(x), h, 1e-13);
  }
  // two widths: one Linear and no activation
  auto single = mlp({3, 2}, Activation::Kind::tanh);
  BOOST_CHECK_EQUAL(single->size(), 1u);
  HESSE_CHECK_THROWS(mlp({3}, Activation::Kind::tanh), ValueError, "mlp");
  HESSE_CHECK_THROWS(mlp({}, Activation::Kind::tanh), ValueError, "mlp");
}

BOOST_AUTO_TEST_CASE(custom_module_with_two_inputs) {
  Generator gen(20);
  Mimo model(gen);
  BOOST_CHECK(names_of(model.named_parameters()) == (std::vector<std::string>{"A", "B"}));
  BOOST_CHECK_EQUAL(model.num_parameters(), 8u);
  const Tensor x = Tensor{{1, 2}, {3, 4}};
  const Tensor y = -x;
  const Tensor out = model(x, y);
  BOOST_REQUIRE(out.shape() == S({2, 4}));
  double ta = 0, tb = 0;
  for (std::size_t i = 0; i < 4; ++i) {
    ta += model.A.data()[i] * model.A.data()[i];
    tb += model.B.data()[i] * model.B.data()[i];
  }
  for (std::size_t r = 0; r < 2; ++r)
    for (std::size_t c = 0; c < 2; ++c) {
      BOOST_CHECK_CLOSE(out.data()[r * 4 + c], ta * x.data()[r * 2 + c], 1e-12);
      BOOST_CHECK_CLOSE(out.data()[r * 4 + 2 + c], tb * y.data()[r * 2 + c], 1e-12);
    }
  // the parameters are leaves of the tape: d Σout / dA = 2 A Σx
  sum(out).backward();
  HESSE_CHECK_CLOSE(model.A.grad(), model.A * (2.0 * 10.0), 1e-12);
  HESSE_CHECK_CLOSE(model.B.grad(), model.B * (2.0 * -10.0), 1e-12);
  HESSE_CHECK_THROWS(model(x), ValueError, "two inputs");
  // gradcheck through the module's own forward w.r.t. A and B (swapped in)
  auto f = [&](const std::vector<Tensor>& in) {
    const Tensor a = model.A, b = model.B;
    model.A = in[0];
    model.B = in[1];
    const Tensor r = model(x, y);
    model.A = a;
    model.B = b;
    return r;
  };
  const std::vector<Tensor> params{leaf(S({2, 2}), gen), leaf(S({2, 2}), gen)};
  BOOST_CHECK(gradcheck(f, params, tight()));
  BOOST_CHECK(gradgradcheck(f, params, tight()));
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- gradcheck / gradgradcheck

BOOST_AUTO_TEST_SUITE(derivatives)

BOOST_AUTO_TEST_CASE(linear_inputs_and_parameters) {
  Generator gen(21);
  Linear lin(3, 2, true, gen);
  // w.r.t. the input, through the module (its own parameters stay fixed)
  auto fx = [&](const std::vector<Tensor>& in) { return lin(in[0]); };
  const std::vector<Tensor> x{leaf(S({4, 3}), gen)};
  BOOST_CHECK(gradcheck(fx, x, tight()));
  BOOST_CHECK(gradgradcheck(fx, x, tight()));
  // w.r.t. input, weight and bias, functionally
  auto ff = [](const std::vector<Tensor>& in) { return linear(in[0], in[1], in[2]); };
  const std::vector<Tensor> all{leaf(S({4, 3}), gen), leaf(S({2, 3}), gen), leaf(S({2}), gen)};
  BOOST_CHECK(gradcheck(ff, all, tight()));
  BOOST_CHECK(gradgradcheck(ff, all, tight()));
  // w.r.t. input, weight and bias through the module's forward (parameters swapped in)
  auto fm = [&](const std::vector<Tensor>& in) {
    SwapParams<Linear> swap(lin, in[1], in[2]);
    return lin(in[0]);
  };
  BOOST_CHECK(gradcheck(fm, all, tight()));
  BOOST_CHECK(gradgradcheck(fm, all, tight()));
  // the swap restored the registered handles
  BOOST_CHECK(lin.weight.impl() == lin.parameter("weight").impl());
  // a non-linear function of the output has a nonzero second derivative in W
  auto fsq = [&](const std::vector<Tensor>& in) {
    SwapParams<Linear> swap(lin, in[1], in[2]);
    return tanh(lin(in[0]));
  };
  BOOST_CHECK(gradgradcheck(fsq, all, tight()));
}

BOOST_AUTO_TEST_CASE(bilinear_inputs_and_parameters) {
  Generator gen(22);
  Bilinear bl(3, 2, 2, true, gen);
  auto fx = [&](const std::vector<Tensor>& in) { return bl(in[0], in[1]); };
  const std::vector<Tensor> xs{leaf(S({3, 3}), gen), leaf(S({3, 2}), gen)};
  BOOST_CHECK(gradcheck(fx, xs, tight()));
  BOOST_CHECK(gradgradcheck(fx, xs, tight()));
  auto fm = [&](const std::vector<Tensor>& in) {
    SwapParams<Bilinear> swap(bl, in[2], in[3]);
    return bl(in[0], in[1]);
  };
  const std::vector<Tensor> all{leaf(S({3, 3}), gen), leaf(S({3, 2}), gen), leaf(S({2, 3, 2}), gen),
                                leaf(S({2}), gen)};
  BOOST_CHECK(gradcheck(fm, all, tight()));
  BOOST_CHECK(gradgradcheck(fm, all, tight()));
  // 1-D inputs too
  const std::vector<Tensor> vs{leaf(S({3}), gen), leaf(S({2}), gen), leaf(S({2, 3, 2}), gen), leaf(S({2}), gen)};
  BOOST_CHECK(gradcheck(fm, vs, tight()));
}

BOOST_AUTO_TEST_CASE(mlp_with_tanh_and_gelu) {
  using K = Activation::Kind;
  for (K kind : {K::tanh, K::gelu}) {
    Generator gen(23);
    auto net = mlp({3, 4, 2}, kind, gen);
    auto* l0 = dynamic_cast<Linear*>(net->children()[0].second.get());
    auto* l2 = dynamic_cast<Linear*>(net->children()[2].second.get());
    BOOST_REQUIRE(l0 && l2);
    auto fx = [&](const std::vector<Tensor>& in) { return (*net)(in[0]); };
    const std::vector<Tensor> x{leaf(S({3, 3}), gen)};
    BOOST_CHECK(gradcheck(fx, x, tight()));
    BOOST_CHECK(gradgradcheck(fx, x, tight()));
    // every parameter through the module: {x, 0.weight, 0.bias, 2.weight, 2.bias}
    auto fm = [&](const std::vector<Tensor>& in) {
      SwapParams<Linear> s0(*l0, in[1], in[2]);
      SwapParams<Linear> s2(*l2, in[3], in[4]);
      return (*net)(in[0]);
    };
    std::vector<Tensor> all{x[0]};
    for (const auto& p : net->parameters()) all.push_back(p.clone().requires_grad_(true));
    BOOST_CHECK(gradcheck(fm, all, tight()));
    BOOST_CHECK(gradgradcheck(fm, all, tight()));
    // the functional form agrees
    auto ff = [&](const std::vector<Tensor>& in) {
      return linear(Activation(kind)(linear(in[0], in[1], in[2])), in[3], in[4]);
    };
    BOOST_CHECK(gradgradcheck(ff, all, tight()));
    HESSE_CHECK_CLOSE(fm(all), ff(all), 0.0);
  }
}

BOOST_AUTO_TEST_CASE(module_gradients_match_the_functional_form) {
  // backward through the module fills its parameters' grads with d loss / d param
  Generator gen(24);
  auto net = mlp({3, 4, 2}, Activation::Kind::gelu, gen);
  const Tensor x = randn(S({5, 3}), gen);
  const Tensor loss = sum(square((*net)(x)));
  const auto params = net->parameters();
  const auto g = grad({loss}, params);
  std::vector<Tensor> copies;
  for (const auto& p : params) copies.push_back(p.detach().clone().requires_grad_(true));
  const Tensor loss2 = sum(square(linear(gelu(linear(x, copies[0], copies[1])), copies[2], copies[3])));
  const auto g2 = grad({loss2}, copies);
  for (std::size_t i = 0; i < params.size(); ++i) HESSE_CHECK_CLOSE(g[i], g2[i], 1e-13);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- errors

BOOST_AUTO_TEST_SUITE(errors)

BOOST_AUTO_TEST_CASE(linear_wrong_width) {
  Generator gen(25);
  Linear lin(3, 2, true, gen);
  HESSE_CHECK_THROWS(lin(zeros(S({4, 5}))), ShapeError, "Linear");
  HESSE_CHECK_THROWS(lin(zeros(S({4, 5}))), ShapeError, "[4, 5]");
  HESSE_CHECK_THROWS(lin(zeros(S({4, 5}))), ShapeError, "3]");
  HESSE_CHECK_THROWS(lin(zeros(S({2}))), ShapeError, "[2]");
  HESSE_CHECK_THROWS(lin(Tensor(1.0)), ShapeError, "Linear");
  // through an mlp, the message still names the layer and shapes
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  HESSE_CHECK_THROWS((*net)(zeros(S({1, 4}))), ShapeError, "Linear");
  HESSE_CHECK_THROWS((*net)(zeros(S({1, 4}))), ShapeError, "[1, 4]");
}

BOOST_AUTO_TEST_CASE(bilinear_wrong_shapes) {
  Generator gen(26);
  Bilinear bl(3, 4, 2, true, gen);
  // wrong width of either input
  HESSE_CHECK_THROWS(bl(zeros(S({5, 2})), zeros(S({5, 4}))), ShapeError, "Bilinear");
  HESSE_CHECK_THROWS(bl(zeros(S({5, 2})), zeros(S({5, 4}))), ShapeError, "[5, 2] and [5, 4]");
  HESSE_CHECK_THROWS(bl(zeros(S({5, 3})), zeros(S({5, 3}))), ShapeError, "[5, 3] and [5, 3]");
  HESSE_CHECK_THROWS(bl(zeros(S({5, 3})), zeros(S({5, 3}))), ShapeError, "4]");
  // mismatched batch sizes
  HESSE_CHECK_THROWS(bl(zeros(S({5, 3})), zeros(S({6, 4}))), ShapeError, "[5, 3] and [6, 4]");
  HESSE_CHECK_THROWS(bl(zeros(S({5, 3})), zeros(S({4}))), ShapeError, "[5, 3] and [4]");
  HESSE_CHECK_THROWS(bl(Tensor(1.0), Tensor(1.0)), ShapeError, "Bilinear");
}

BOOST_AUTO_TEST_CASE(wrong_number_of_inputs) {
  Generator gen(27);
  Linear lin(3, 2, true, gen);
  const Tensor x = zeros(S({1, 3}));
  HESSE_CHECK_THROWS(lin(x, x), ValueError, "Linear");
  HESSE_CHECK_THROWS(lin(x, x), ValueError, "got 2");
  HESSE_CHECK_THROWS(lin(std::vector<Tensor>{}), ValueError, "got 0");
  Bilinear bl(3, 3, 2, true, gen);
  HESSE_CHECK_THROWS(bl(x), ValueError, "Bilinear");
  HESSE_CHECK_THROWS(bl(x), ValueError, "got 1");
  HESSE_CHECK_THROWS(bl(std::vector<Tensor>{x, x, x}), ValueError, "got 3");
  HESSE_CHECK_THROWS(Tanh()(x, x), ValueError, "Tanh");
  HESSE_CHECK_THROWS(GELU()(x, x), ValueError, "GELU");
  HESSE_CHECK_THROWS(Flatten()(x, x), ValueError, "Flatten");
  HESSE_CHECK_THROWS(Sequential()(x, x), ValueError, "Sequential");
  auto net = mlp({3, 2}, Activation::Kind::tanh, gen);
  HESSE_CHECK_THROWS((*net)(x, x), ValueError, "Linear");
  // every error is a hesse::Error
  BOOST_CHECK_THROW(lin(x, x), hesse::Error);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------- save / load

BOOST_AUTO_TEST_SUITE(save_load)

BOOST_AUTO_TEST_CASE(round_trip_restores_exactly) {
  Generator gen(28);
  TempDir dir;
  EncoderModel model(gen);
  model.parameter("head.bias").requires_grad_(false);
  const auto before = snapshot(model);
  const std::string folder = dir.file("model");  // created by save
  model.save(folder);
  for (const auto& [name, p] : model.named_parameters()) {
    const std::string path = folder + "/" + name + ".npy";
    BOOST_REQUIRE_MESSAGE(fs::exists(path), path);
    const Tensor v = load_npy(path);
    HESSE_CHECK_CLOSE(v, p, 0.0);
  }
  shift_parameters(model, 0.5);
  BOOST_CHECK(!same_values(snapshot(model), before));
  const auto handles = model.parameters();
  model.load(folder);
  BOOST_CHECK(same_values(snapshot(model), before));
  // loaded in place: the handles, their trainability and the layers' members are the same
  const auto after = model.parameters();
  for (std::size_t i = 0; i < after.size(); ++i) BOOST_CHECK(after[i].impl() == handles[i].impl());
  BOOST_CHECK(model.head->weight.impl() == model.parameter("head.weight").impl());
  BOOST_CHECK(!model.parameter("head.bias").requires_grad());
  BOOST_CHECK(model.parameter("scale").requires_grad());
  // a fresh model of the same architecture loads the values too; files that are not .npy are ignored
  { std::ofstream(folder + "/README.txt") << "notes"; }
  Generator other(99);
  EncoderModel fresh(other);
  BOOST_CHECK(!same_values(snapshot(fresh), before));
  fresh.load(folder);
  BOOST_CHECK(same_values(snapshot(fresh), before));
  const Tensor x = randn(S({2, 3}), gen);
  HESSE_CHECK_CLOSE(fresh(x), model(x), 0.0);
  // saving into an existing folder overwrites
  shift_parameters(model, 1.0);
  const auto shifted = snapshot(model);
  model.save(folder);
  fresh.load(folder);
  BOOST_CHECK(same_values(snapshot(fresh), shifted));
}

BOOST_AUTO_TEST_CASE(missing_file_names_the_parameter) {
  Generator gen(29);
  TempDir dir;
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  net->save(dir.str());
  fs::remove(dir.file("2.weight.npy"));
  shift_parameters(*net, 1.0);
  const auto before = snapshot(*net);
  HESSE_CHECK_THROWS(net->load(dir.str()), IoError, "'2.weight'");
  BOOST_CHECK(same_values(snapshot(*net), before));
  // a folder that does not exist
  HESSE_CHECK_THROWS(net->load(dir.file("nowhere")), IoError, "0.weight");
  BOOST_CHECK(same_values(snapshot(*net), before));
}

BOOST_AUTO_TEST_CASE(extra_file_names_it) {
  Generator gen(30);
  TempDir dir;
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  net->save(dir.str());
  save_npy(dir.file("4.weight.npy"), zeros(S({2, 2})));
  shift_parameters(*net, 1.0);
  const auto before = snapshot(*net);
  HESSE_CHECK_THROWS(net->load(dir.str()), IoError, "4.weight");
  BOOST_CHECK(same_values(snapshot(*net), before));
}

BOOST_AUTO_TEST_CASE(shape_mismatch_names_parameter_and_shapes) {
  Generator gen(31);
  TempDir dir;
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  net->save(dir.str());
  save_npy(dir.file("2.weight.npy"), zeros(S({5, 2})));
  shift_parameters(*net, 1.0);
  const auto before = snapshot(*net);
  HESSE_CHECK_THROWS(net->load(dir.str()), ShapeError, "'2.weight'");
  HESSE_CHECK_THROWS(net->load(dir.str()), ShapeError, "[2, 5]");
  HESSE_CHECK_THROWS(net->load(dir.str()), ShapeError, "[5, 2]");
  BOOST_CHECK(same_values(snapshot(*net), before));
  // same number of entries, different rank
  save_npy(dir.file("2.weight.npy"), zeros(S({10})));
  HESSE_CHECK_THROWS(net->load(dir.str()), ShapeError, "[10]");
  BOOST_CHECK(same_values(snapshot(*net), before));
  // a model of another architecture cannot load these files
  auto wider = mlp({3, 6, 2}, Activation::Kind::tanh, gen);
  net->save(dir.str());
  const auto wider_before = snapshot(*wider);
  HESSE_CHECK_THROWS(wider->load(dir.str()), ShapeError, "'0.weight'");
  BOOST_CHECK(same_values(snapshot(*wider), wider_before));
}

BOOST_AUTO_TEST_CASE(corrupt_file_is_an_io_error) {
  Generator gen(32);
  TempDir dir;
  auto net = mlp({3, 5, 2}, Activation::Kind::tanh, gen);
  net->save(dir.str());
  shift_parameters(*net, 1.0);
  const auto before = snapshot(*net);
  // the last parameter's file is garbage: the earlier ones were read but must not be applied
  { std::ofstream(dir.file("2.bias.npy"), std::ios::binary) << "this is not a numpy file"; }
  HESSE_CHECK_THROWS(net->load(dir.str()), IoError, "2.bias.npy");
  BOOST_CHECK(same_values(snapshot(*net), before));
  // a truncated file
  net->save(dir.str());
  const auto good = snapshot(*net);
  shift_parameters(*net, 1.0);
  const auto shifted = snapshot(*net);
  fs::resize_file(dir.file("0.weight.npy"), fs::file_size(dir.file("0.weight.npy")) - 8);
  HESSE_CHECK_THROWS(net->load(dir.str()), IoError, "0.weight.npy");
  BOOST_CHECK(same_values(snapshot(*net), shifted));
  BOOST_CHECK(!same_values(shifted, good));
}

BOOST_AUTO_TEST_SUITE_END()
