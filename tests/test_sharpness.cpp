#define BOOST_TEST_MODULE sharpness
#include "test_util.hpp"

// Sharpness past the memory limit: loss_sharpness, batch_loss_sharpness and
// model_sharpness switch from the dense Hessian to matrix-free Lanczos, say so
// through the notice handler, and agree with the dense answer.
// Then closed forms, on both routes: Bilinear and the double-bilinear
// x1ᵀ B1 B2 x2, diagonal_only and a frozen parameter, each against an
// eigenvalue known by hand or taken by LAPACK from an independent matrix.

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <xtensor-blas/xlinalg.hpp>
#include <xtensor/xarray.hpp>

#include "../examples/mimo_model.hpp"

using namespace hesse;
using hesse::testing::DoubleBilinear;

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

// ---- closed forms ----

namespace {

using Array = xt::xarray<double>;

/// Calls check(options) on the dense route, then on the matrix-free one (nothing
/// fits in 8 bytes), and checks that only the second switched to Lanczos.
template <class F>
void on_both_routes(const HessianOptions& o, F&& check) {
  Notices notices;
  check(o);
  BOOST_CHECK(notices.lines.empty());
  HessianOptions free = o;
  free.max_bytes = 8;
  check(free);
  BOOST_CHECK(notices.mention("Lanczos"));
}

/// The largest |eigenvalue| of a symmetric [n, n] array, by LAPACK through xtensor-blas.
double max_abs_eig(const Array& H) {
  const Array w = xt::linalg::eigvalsh(H);
  return std::max(std::abs(xt::amin(w)()), std::abs(xt::amax(w)()));
}

/// H with every entry outside the diagonal blocks [offsets[k], offsets[k+1])² set to 0.
Array block_diagonal_part(Array H, const std::vector<std::size_t>& offsets) {
  auto block = [&](std::size_t i) { return std::upper_bound(offsets.begin(), offsets.end(), i) - offsets.begin(); };
  for (std::size_t i = 0; i < H.shape()[0]; ++i)
    for (std::size_t j = 0; j < H.shape()[1]; ++j)
      if (block(i) != block(j)) H(i, j) = 0.0;
  return H;
}

/// H without the rows and columns [from, from + count).
Array without(const Array& H, std::size_t from, std::size_t count) {
  const std::size_t n = H.shape()[0];
  Array out = xt::zeros<double>({n - count, n - count});
  for (std::size_t i = 0, oi = 0; i < n; ++i) {
    if (i >= from && i < from + count) continue;
    for (std::size_t j = 0, oj = 0; j < n; ++j) {
      if (j >= from && j < from + count) continue;
      out(oi, oj++) = H(i, j);
    }
    ++oi;
  }
  return out;
}

/// Hessian `entry` of a stack [..., n, n] as an [n, n] array.
Array hessian_at(const Tensor& h, std::size_t entry) {
  const std::size_t n = h.shape().back();
  Array out = xt::zeros<double>({n, n});
  std::copy(h.data() + entry * n * n, h.data() + (entry + 1) * n * n, out.begin());
  return out;
}

/// The MSE-sum loss Hessian of nn::Bilinear over samples [first, last), built by hand:
/// 2 Σ_s J_sᵀ J_s with J_s = [I_out ⊗ (x1_s ⊗ x2_s)ᵀ, I_out], θ = [weight out·in1·in2 | bias out].
Array bilinear_mse_sum_hessian(const Tensor& x1, const Tensor& x2, std::size_t out, std::size_t first,
                               std::size_t last) {
  const std::size_t in1 = x1.shape()[1], in2 = x2.shape()[1], nw = out * in1 * in2, n = nw + out;
  Array H = xt::zeros<double>({n, n});
  for (std::size_t s = first; s < last; ++s) {
    Array J = xt::zeros<double>({out, n});
    for (std::size_t k = 0; k < out; ++k) {
      for (std::size_t i = 0; i < in1; ++i)
        for (std::size_t j = 0; j < in2; ++j)
          J(k, (k * in1 + i) * in2 + j) = x1.data()[s * in1 + i] * x2.data()[s * in2 + j];
      J(k, nw + k) = 1.0;
    }
    H += 2.0 * xt::linalg::dot(xt::transpose(J), J);
  }
  return H;
}

/// ‖x[row]‖ of a matrix x [N, d].
double row_norm(const Tensor& x, std::size_t row) {
  const std::size_t d = x.shape()[1];
  double sq = 0.0;
  for (std::size_t i = 0; i < d; ++i) sq += x.data()[row * d + i] * x.data()[row * d + i];
  return std::sqrt(sq);
}

/// |got - expected| <= rel |expected|.
void check_rel(double got, double expected, double rel) {
  BOOST_CHECK_MESSAGE(std::abs(got - expected) <= rel * std::abs(expected),
                      "got " << got << ", expected " << expected << " (relative " << rel << ")");
}

}  // namespace

BOOST_AUTO_TEST_CASE(bilinear_model_sharpness_is_zero) {
  // y_k = x1ᵀ W_k x2 + b_k is linear in θ: every model Hessian is 0
  Generator gen(30);
  nn::Bilinear bil(3, 2, 2, true, gen);
  const Tensor x1 = randn({3, 3}, gen), x2 = randn({3, 2}, gen);
  for (const bool batch : {true, false}) {
    HessianOptions o;
    o.is_batch = batch;
    on_both_routes(o, [&](const HessianOptions& route) {
      HESSE_CHECK_CLOSE(model_sharpness(bil, {x1, x2}, route), zeros({3, 2}), 0.0);
    });
  }
}

BOOST_AUTO_TEST_CASE(bilinear_mse_sum_loss_sharpness_is_the_closed_form_eigenvalue) {
  Generator gen(31);
  const std::size_t N = 3, in1 = 3, in2 = 2, out = 2;
  nn::Bilinear bil(in1, in2, out, true, gen);
  const Tensor x1 = randn({N, in1}, gen), x2 = randn({N, in2}, gen), t = randn({N, out}, gen);
  const nn::MSELoss mse(nn::Reduction::sum);
  const double expected = max_abs_eig(bilinear_mse_sum_hessian(x1, x2, out, 0, N));
  on_both_routes(HessianOptions(), [&](const HessianOptions& route) {
    check_rel(loss_sharpness(bil, mse, {x1, x2}, t, route), expected, 1e-12);
    const Tensor per_sample = batch_loss_sharpness(bil, mse, {x1, x2}, t, route);
    BOOST_REQUIRE(per_sample.shape() == Shape({N}));
    for (std::size_t s = 0; s < N; ++s) {
      check_rel(per_sample.data()[s], max_abs_eig(bilinear_mse_sum_hessian(x1, x2, out, s, s + 1)), 1e-12);
      // by hand: J_s J_sᵀ = (‖x1_s‖² ‖x2_s‖² + 1) I_out, so 2 J_sᵀ J_s has that eigenvalue, twice
      const double n1 = row_norm(x1, s), n2 = row_norm(x2, s);
      check_rel(per_sample.data()[s], 2.0 * (n1 * n1 * n2 * n2 + 1.0), 1e-12);
    }
  });
}

BOOST_AUTO_TEST_CASE(double_bilinear_model_sharpness_is_the_norm_product) {
  // H = [[0, M], [Mᵀ, 0]] with M = K (I_q ⊗ x1 x2ᵀ): its eigenvalues are ± the singular
  // values of M; K is a permutation, so these are those of x1 x2ᵀ (q times): ‖x1‖ ‖x2‖.
  Generator gen(32);
  const std::size_t N = 3, p = 3, q = 2, r = 4;
  DoubleBilinear model(p, q, r, gen);
  const Tensor x1 = randn({N, p}, gen), x2 = randn({N, r}, gen);
  for (const bool batch : {true, false}) {
    HessianOptions o;
    o.is_batch = batch;
    on_both_routes(o, [&](const HessianOptions& route) {
      const Tensor s = model_sharpness(model, {x1, x2}, route);
      BOOST_REQUIRE(s.shape() == Shape({N}));
      for (std::size_t n = 0; n < N; ++n) check_rel(s.data()[n], row_norm(x1, n) * row_norm(x2, n), 1e-12);
    });
  }
}

BOOST_AUTO_TEST_CASE(diagonal_only_sharpness_is_that_of_the_masked_hessian) {
  HessianOptions diagonal;
  diagonal.diagonal_only = true;
  {  // the double-bilinear: both diagonal blocks are 0
    Generator gen(33);
    DoubleBilinear model(3, 2, 4, gen);
    const Tensor x1 = randn({3, 3}, gen), x2 = randn({3, 4}, gen);
    on_both_routes(diagonal, [&](const HessianOptions& route) {
      HESSE_CHECK_CLOSE(model_sharpness(model, {x1, x2}, route), zeros({3}), 0.0);
    });
  }
  {  // Bilinear under MSE sum: the closed form, its weight-bias blocks masked
    Generator gen(34);
    const std::size_t N = 3, in1 = 3, in2 = 2, out = 2, nw = out * in1 * in2;
    nn::Bilinear bil(in1, in2, out, true, gen);
    const Tensor x1 = randn({N, in1}, gen), x2 = randn({N, in2}, gen), t = randn({N, out}, gen);
    const nn::MSELoss mse(nn::Reduction::sum);
    const std::vector<std::size_t> blocks{0, nw, nw + out};
    const double expected = max_abs_eig(block_diagonal_part(bilinear_mse_sum_hessian(x1, x2, out, 0, N), blocks));
    BOOST_REQUIRE(std::abs(expected - max_abs_eig(bilinear_mse_sum_hessian(x1, x2, out, 0, N))) > 1e-3);
    on_both_routes(diagonal, [&](const HessianOptions& route) {
      check_rel(loss_sharpness(bil, mse, {x1, x2}, t, route), expected, 1e-12);
      const Tensor per_sample = batch_loss_sharpness(bil, mse, {x1, x2}, t, route);
      BOOST_REQUIRE(per_sample.shape() == Shape({N}));
      for (std::size_t s = 0; s < N; ++s)
        check_rel(per_sample.data()[s],
                  max_abs_eig(block_diagonal_part(bilinear_mse_sum_hessian(x1, x2, out, s, s + 1), blocks)), 1e-12);
    });
  }
  {  // an MLP's model Hessians (dense, from hesse), masked
    Generator gen(35);
    auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
    const Tensor x = randn({3, 3}, gen);
    const std::vector<std::size_t> blocks{0, 12, 16, 24, 26};  // 0.weight | 0.bias | 2.weight | 2.bias
    const Tensor h = model_hessian_matrix(*net, {x});
    BOOST_REQUIRE(h.shape() == Shape({3, 2, 26, 26}));
    on_both_routes(diagonal, [&](const HessianOptions& route) {
      const Tensor s = model_sharpness(*net, {x}, route);
      BOOST_REQUIRE(s.shape() == Shape({3, 2}));
      for (std::size_t e = 0; e < 6; ++e)
        check_rel(s.data()[e], max_abs_eig(block_diagonal_part(hessian_at(h, e), blocks)), 1e-12);
    });
  }
}

BOOST_AUTO_TEST_CASE(frozen_parameter_sharpness_is_that_of_the_sub_block) {
  {  // Bilinear under MSE sum, bias frozen: the closed form's weight-weight block
    Generator gen(36);
    const std::size_t N = 3, in1 = 3, in2 = 2, out = 2, nw = out * in1 * in2;
    nn::Bilinear bil(in1, in2, out, true, gen);
    const Tensor x1 = randn({N, in1}, gen), x2 = randn({N, in2}, gen), t = randn({N, out}, gen);
    const nn::MSELoss mse(nn::Reduction::sum);
    bil.bias.requires_grad_(false);
    const double expected = max_abs_eig(without(bilinear_mse_sum_hessian(x1, x2, out, 0, N), nw, out));
    on_both_routes(HessianOptions(), [&](const HessianOptions& route) {
      check_rel(loss_sharpness(bil, mse, {x1, x2}, t, route), expected, 1e-12);
      const Tensor per_sample = batch_loss_sharpness(bil, mse, {x1, x2}, t, route);
      BOOST_REQUIRE(per_sample.shape() == Shape({N}));
      for (std::size_t s = 0; s < N; ++s)
        check_rel(per_sample.data()[s],
                  max_abs_eig(without(bilinear_mse_sum_hessian(x1, x2, out, s, s + 1), nw, out)), 1e-12);
    });
  }
  {  // the double-bilinear, B2 frozen: what is left is the B1-B1 block, 0
    Generator gen(37);
    DoubleBilinear model(3, 2, 4, gen);
    const Tensor x1 = randn({3, 3}, gen), x2 = randn({3, 4}, gen);
    model.B2.requires_grad_(false);
    on_both_routes(HessianOptions(), [&](const HessianOptions& route) {
      HESSE_CHECK_CLOSE(model_sharpness(model, {x1, x2}, route), zeros({3}), 0.0);
    });
  }
  {  // an MLP, 0.bias (θ[12, 16)) frozen: the sub-blocks of hesse's unfrozen Hessians
    Generator gen(38);
    auto net = nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen);
    const Tensor x = randn({3, 3}, gen), t = randn({3, 2}, gen);
    const nn::MSELoss mse;
    const Tensor h_loss = loss_hessian_matrix(*net, mse, {x}, t);
    const Tensor h_batch = batch_loss_hessian_matrix(*net, mse, {x}, t);
    const Tensor h_model = model_hessian_matrix(*net, {x});
    BOOST_REQUIRE(h_model.shape() == Shape({3, 2, 26, 26}));
    Tensor frozen;
    for (const auto& [name, param] : net->trainable_parameters())
      if (name == "0.bias") frozen = param;
    frozen.requires_grad_(false);
    on_both_routes(HessianOptions(), [&](const HessianOptions& route) {
      check_rel(loss_sharpness(*net, mse, {x}, t, route), max_abs_eig(without(h_loss.value(), 12, 4)), 1e-12);
      const Tensor per_sample = batch_loss_sharpness(*net, mse, {x}, t, route);
      BOOST_REQUIRE(per_sample.shape() == Shape({3}));
      for (std::size_t s = 0; s < 3; ++s)
        check_rel(per_sample.data()[s], max_abs_eig(without(hessian_at(h_batch, s), 12, 4)), 1e-12);
      const Tensor per_entry = model_sharpness(*net, {x}, route);
      BOOST_REQUIRE(per_entry.shape() == Shape({3, 2}));
      for (std::size_t e = 0; e < 6; ++e)
        check_rel(per_entry.data()[e], max_abs_eig(without(hessian_at(h_model, e), 12, 4)), 1e-12);
    });
  }
}
