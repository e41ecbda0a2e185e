#define BOOST_TEST_MODULE sharpness
#include "test_util.hpp"

// Sharpness past the memory limit: loss_sharpness, batch_loss_sharpness and
// model_sharpness switch from the dense Hessian to matrix-free Lanczos, say so
// through the notice handler, and agree with the dense answer.

#include <string>
#include <vector>

#include "../examples/mimo_model.hpp"

using namespace hesse;

namespace {

// Collects notices for the lifetime of the fixture.
struct Notices {
  std::vector<std::string> lines;
  NoticeHandler previous;
  Notices() {
    previous = set_notice_handler([this](const std::string& text) { lines.push_back(text); });
  }
  ~Notices() { set_notice_handler(previous); }
  bool mention(const std::string& text) const {
    for (const std::string& l : lines)
      if (l.find(text) != std::string::npos) return true;
    return false;
  }
};

// A request whose dense Hessian cannot fit: 1 KB against n = 26 (5408 bytes).
HessianOptions tiny_limit() {
  HessianOptions o;
  o.max_bytes = 1000;
  return o;
}

void check_relative(double got, double expected, double tol) {
  BOOST_CHECK_MESSAGE(std::abs(got - expected) <= tol * std::max(1.0, std::abs(expected)),
                      "got " << got << ", expected " << expected);
}

}  // namespace

BOOST_AUTO_TEST_CASE(loss_sharpness_switches_to_lanczos_and_says_so) {
  Generator gen(1);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  const double dense = loss_sharpness(*net, nn::MSELoss(), {x}, t);
  Notices notices;
  BOOST_CHECK(notices.lines.empty());  // the dense route said nothing
  const double free = loss_sharpness(*net, nn::MSELoss(), {x}, t, tiny_limit());
  check_relative(free, dense, 1e-8);
  BOOST_REQUIRE_EQUAL(notices.lines.size(), 1u);
  BOOST_CHECK(notices.mention("hesse::loss_sharpness"));
  BOOST_CHECK(notices.mention("5408 bytes"));
  BOOST_CHECK(notices.mention("Lanczos"));
}

BOOST_AUTO_TEST_CASE(the_switch_can_be_refused) {
  Generator gen(2);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  HessianOptions o = tiny_limit();
  o.matrix_free_fallback = false;
  HESSE_CHECK_THROWS(loss_sharpness(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError, "5408 bytes");
  HESSE_CHECK_THROWS(model_sharpness(*net, {x}, o), MemoryLimitError, "bytes");
  HESSE_CHECK_THROWS(batch_loss_sharpness(*net, nn::MSELoss(), {x}, t, o), MemoryLimitError, "bytes");
}

BOOST_AUTO_TEST_CASE(diagonal_only_and_subsets_switch_too) {
  Generator gen(3);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  const nn::CrossEntropyLoss ce;
  const Tensor labels = Tensor{0, 1, 1, 0, 1};
  for (const bool diagonal : {false, true})
    for (const std::vector<std::string>& params : {std::vector<std::string>{}, {"0.weight", "2.bias"}}) {
      HessianOptions o;
      o.diagonal_only = diagonal;
      o.params = params;
      const double dense = loss_sharpness(*net, ce, {x}, labels, o);
      o.max_bytes = 8;  // nothing fits
      Notices notices;
      check_relative(loss_sharpness(*net, ce, {x}, labels, o), dense, 1e-8);
      BOOST_CHECK_EQUAL(notices.lines.size(), 1u);
    }
}

BOOST_AUTO_TEST_CASE(batch_loss_sharpness_switches_per_sample) {
  Generator gen(4);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::softplus, gen);
  const Tensor x = randn({3, 3}, gen), t = randn({3, 2}, gen);
  const Tensor dense = batch_loss_sharpness(*net, nn::MSELoss(), {x}, t);
  Notices notices;
  const Tensor free = batch_loss_sharpness(*net, nn::MSELoss(), {x}, t, tiny_limit());
  BOOST_REQUIRE(free.shape() == Shape({3}));
  for (std::size_t b = 0; b < 3; ++b) check_relative(free.data()[b], dense.data()[b], 1e-8);
  BOOST_CHECK_EQUAL(notices.lines.size(), 3u);
  BOOST_CHECK(notices.mention("hesse::batch_loss_sharpness"));
}

BOOST_AUTO_TEST_CASE(model_sharpness_switches_per_entry) {
  Generator gen(5);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({3, 3}, gen);
  for (const bool batch : {true, false}) {
    HessianOptions o;
    o.is_batch = batch;
    const Tensor dense = model_sharpness(*net, {x}, o);
    o.max_bytes = 1000;
    Notices notices;
    const Tensor free = model_sharpness(*net, {x}, o);
    BOOST_REQUIRE(free.shape() == dense.shape());
    for (std::size_t e = 0; e < free.numel(); ++e) check_relative(free.data()[e], dense.data()[e], 1e-8);
    BOOST_CHECK_EQUAL(notices.lines.size(), dense.numel());
    BOOST_CHECK(notices.mention("hesse::model_sharpness"));
  }
}

BOOST_AUTO_TEST_CASE(mimo_model_sharpness_matrix_free_is_exact) {
  // the seed's model: sharpness of output (i, j) is 2|x_ij|
  Generator gen(6);
  MimoModel model(gen);
  const Tensor x = Tensor{{1, 2}, {3, 4}}, y = -x;
  HessianOptions o;
  o.max_bytes = 64;
  Notices notices;
  HESSE_CHECK_CLOSE(model_sharpness(model, {x, y}, o), (Tensor{{2, 4, 2, 4}, {6, 8, 6, 8}}), 1e-10);
}

BOOST_AUTO_TEST_CASE(notice_handler_can_be_silenced_and_restored) {
  Generator gen(7);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  Notices outer;
  const NoticeHandler mine = set_notice_handler(NoticeHandler());
  BOOST_CHECK(static_cast<bool>(mine));
  (void)loss_sharpness(*net, nn::MSELoss(), {x}, t, tiny_limit());  // silent
  set_notice_handler(mine);
  BOOST_CHECK(outer.lines.empty());
  (void)loss_sharpness(*net, nn::MSELoss(), {x}, t, tiny_limit());
  BOOST_CHECK_EQUAL(outer.lines.size(), 1u);
}

BOOST_AUTO_TEST_CASE(errors_still_name_the_request) {
  Generator gen(8);
  auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
  const Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  HessianOptions o = tiny_limit();
  o.params = {"nope"};
  HESSE_CHECK_THROWS(loss_sharpness(*net, nn::MSELoss(), {x}, t, o), ValueError, "nope");
  HESSE_CHECK_THROWS(batch_loss_sharpness(*net, nn::MSELoss(), {x}, randn({4, 2}, gen), tiny_limit()), ShapeError,
                     "batch");
  auto unreduced = [](const Tensor& out, const Tensor& target) { return (out - target) * (out - target); };
  HESSE_CHECK_THROWS(loss_sharpness(*net, unreduced, {x}, t, tiny_limit()), ShapeError, "scalar");
}
