#define BOOST_TEST_MODULE hessian_storage
#include "test_util.hpp"

// Structure found on the tape, packed and block-sparse storage, the planner,
// and sharpness bounds from the diagonal blocks (include/hesse/curvature.hpp).
// The oracle throughout is the dense route: loss_hessian_dict / _matrix and
// model_hessian_dict / _matrix, and symmetric_sharpness of the dense matrix.

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../examples/mimo_model.hpp"

using namespace hesse;
using hesse::testing::max_abs_diff;

namespace {

/// Exact equality of shape and every value.
#define CHECK_EXACT(a, b) HESSE_CHECK_CLOSE(a, b, 0.0)

double max_abs(const Tensor& t) {
  double m = 0.0;
  for (std::size_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.data()[i]));
  return m;
}

double frobenius(const Tensor& t) {
  double s = 0.0;
  for (std::size_t i = 0; i < t.numel(); ++i) s += t.data()[i] * t.data()[i];
  return std::sqrt(s);
}

HessianOptions with_params(std::vector<std::string> names) {
  HessianOptions o;
  o.params = std::move(names);
  return o;
}

HessianOptions diagonal() {
  HessianOptions o;
  o.diagonal_only = true;
  return o;
}

HessianOptions not_batched() {
  HessianOptions o;
  o.is_batch = false;
  return o;
}

/// y = tanh(x Aᵀ) ⊙ (x Bᵀ): A and B meet in a product, so (A, B) is a full block.
struct Coupled : nn::Module {
  Tensor A, B;
  explicit Coupled(Generator& gen) {
    A = register_parameter("A", randn({3, 3}, gen));
    B = register_parameter("B", randn({3, 3}, gen));
  }
  Tensor forward(const std::vector<Tensor>& in) override {
    return tanh(matmul(in[0], transpose(A))) * matmul(in[0], transpose(B));
  }
};

/// y = x Wᵀ with a second parameter U that the output ignores.
struct PartlyUnused : nn::Module {
  Tensor W, U;
  explicit PartlyUnused(Generator& gen) {
    W = register_parameter("W", randn({2, 3}, gen));
    U = register_parameter("U", randn({2}, gen));
  }
  Tensor forward(const std::vector<Tensor>& in) override { return matmul(in[0], transpose(W)); }
};

std::shared_ptr<nn::Sequential> tanh_mlp(Generator& gen) { return nn::mlp({3, 4, 2}, nn::Activation::Kind::tanh, gen); }

/// Every block reported zero is exactly zero in the dense dict; every other one is nonzero
/// here (unless only `sound`: a structural nonzero may still hold zeros).
void check_structure_against(const HessianStructure& s, const HessianDict& d, std::size_t lead_entries = 1,
                             bool sound = false) {
  BOOST_REQUIRE(s.names == d.names());
  for (const std::string& p : s.names)
    for (const std::string& q : s.names) {
      const double m = max_abs(d(p, q));
      BOOST_CHECK_MESSAGE(s.nonzero(p, q) == (m > 0) || (sound && s.nonzero(p, q)),
                          "block (" << p << ", " << q << "): structure " << s.nonzero(p, q) << ", max |H| = " << m
                                    << " over " << lead_entries << " entries");
    }
}

/// The upper triangle (diagonal included) of every matrix in [..., n, n] agrees exactly.
void check_upper_exact(const Tensor& a, const Tensor& b) {
  BOOST_REQUIRE(a.shape() == b.shape());
  const std::size_t n = a.shape().back();
  for (std::size_t e = 0; e < a.numel() / (n * n); ++e)
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = i; j < n; ++j) {
        const std::size_t k = (e * n + i) * n + j;
        if (a.data()[k] != b.data()[k]) {
          BOOST_CHECK_MESSAGE(false,
                              "entry " << e << " (" << i << ", " << j << "): " << a.data()[k] << " vs " << b.data()[k]);
          return;
        }
      }
}

struct Fixture {
  Generator gen{7};
  std::shared_ptr<nn::Sequential> mlp = tanh_mlp(gen);
  Tensor x = randn({5, 3}, gen), t = randn({5, 2}, gen);
  MimoModel mimo{gen};
  Tensor mx = randn({2, 2}, gen), my = randn({2, 2}, gen), mt = randn({2, 4}, gen);
  Coupled coupled{gen};
  Tensor cx = randn({4, 3}, gen), ct = randn({4, 3}, gen);
};

}  // namespace

// ============================================================================
// structure
// ============================================================================

BOOST_FIXTURE_TEST_SUITE(structure, Fixture)

BOOST_AUTO_TEST_CASE(mimo_blocks_a_b_are_structurally_zero) {
  const HessianStructure s = model_hessian_structure(mimo, {mx, my});
  BOOST_CHECK(s.nonzero("A", "A") && s.nonzero("B", "B"));
  BOOST_CHECK(!s.nonzero("A", "B") && !s.nonzero("B", "A"));
  BOOST_CHECK(s.nonzero(1, 1) && !s.nonzero(0, 1));
  HESSE_CHECK_THROWS(s.nonzero(2, 0), IndexError, "block (2, 0) is out of range for 2 parameters");
  check_structure_against(s, model_hessian_dict(mimo, {mx, my}), 8);
  // Through a loss, ∂L/∂out is one tensor that depends on A and B, so the tape
  // alone cannot rule (A, B) out; the random probes do, and the block-sparse
  // loss Hessian skips it too.
  const HessianStructure l = loss_hessian_structure(mimo, nn::MSELoss(), {mx, my}, mt);
  BOOST_CHECK(!l.nonzero("A", "B") && l.nonzero("A", "A") && l.nonzero("B", "B"));
  check_structure_against(l, loss_hessian_dict(mimo, nn::MSELoss(), {mx, my}, mt));
  const BlockSparseHessian sparse = loss_hessian_block_sparse(mimo, nn::MSELoss(), {mx, my}, mt);
  BOOST_CHECK(sparse.blocks.count({0, 1}) == 0 && sparse.blocks.size() == 2);
  BOOST_CHECK_EQUAL(max_abs_diff(sparse.dense(), loss_hessian_matrix(mimo, nn::MSELoss(), {mx, my}, mt)), 0.0);
  BOOST_TEST_MESSAGE(s.str());
  BOOST_CHECK(s.str().find("A x .") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(a_nonlinearity_couples_the_blocks) {
  const HessianStructure s = model_hessian_structure(coupled, {cx});
  BOOST_CHECK(s.nonzero("A", "B") && s.nonzero("A", "A"));
  BOOST_CHECK(!s.nonzero("B", "B"));  // y is linear in B
  check_structure_against(s, model_hessian_dict(coupled, {cx}), 12);
  check_structure_against(s, model_hessian_dict(coupled, {cx}, not_batched()), 12);
  BOOST_CHECK(model_hessian_structure(coupled, {cx}, not_batched()).nonzero_blocks == s.nonzero_blocks);
}

BOOST_AUTO_TEST_CASE(mlp_under_mse_is_dense_and_its_model_hessian_is_not) {
  const HessianStructure l = loss_hessian_structure(*mlp, nn::MSELoss(), {x}, t);
  BOOST_CHECK(std::all_of(l.nonzero_blocks.begin(), l.nonzero_blocks.end(), [](bool b) { return b; }));
  check_structure_against(l, loss_hessian_dict(*mlp, nn::MSELoss(), {x}, t));
  // the output is linear in the last layer: (2.weight, 2.weight) and every 2.bias block vanish
  const HessianStructure m = model_hessian_structure(*mlp, {x});
  BOOST_CHECK(!m.nonzero("2.weight", "2.weight") && !m.nonzero("2.bias", "0.weight"));
  BOOST_CHECK(m.nonzero("2.weight", "0.bias") && m.nonzero("0.weight", "0.weight"));
  check_structure_against(m, model_hessian_dict(*mlp, {x}), 10);
}

BOOST_AUTO_TEST_CASE(linear_under_mse_couples_weight_and_bias) {
  nn::Linear lin(3, 2, true, gen);
  const HessianStructure s = loss_hessian_structure(lin, nn::MSELoss(), {x}, t);
  BOOST_CHECK(s.nonzero("weight", "bias") && s.nonzero("bias", "weight") && s.nonzero("bias", "bias"));
  check_structure_against(s, loss_hessian_dict(lin, nn::MSELoss(), {x}, t));
  // the model itself is linear: every block is zero
  const HessianStructure m = model_hessian_structure(lin, {x});
  BOOST_CHECK(std::none_of(m.nonzero_blocks.begin(), m.nonzero_blocks.end(), [](bool b) { return b; }));
}

BOOST_AUTO_TEST_CASE(subsets_frozen_and_unused_parameters) {
  const HessianStructure s = loss_hessian_structure(*mlp, nn::MSELoss(), {x}, t, with_params({"2.bias", "0.weight"}));
  BOOST_CHECK((s.names == std::vector<std::string>{"0.weight", "2.bias"}));
  BOOST_CHECK(s.nonzero("2.bias", "0.weight"));
  mlp->parameter("0.bias").requires_grad_(false);
  const HessianStructure f = loss_hessian_structure(*mlp, nn::MSELoss(), {x}, t);
  BOOST_CHECK_EQUAL(f.names.size(), 3u);
  check_structure_against(f, loss_hessian_dict(*mlp, nn::MSELoss(), {x}, t));
  mlp->parameter("0.bias").requires_grad_(true);

  PartlyUnused pu(gen);
  const HessianStructure u = loss_hessian_structure(pu, nn::MSELoss(), {x}, t);
  BOOST_CHECK(u.nonzero("W", "W") && !u.nonzero("U", "U") && !u.nonzero("W", "U"));
  check_structure_against(u, loss_hessian_dict(pu, nn::MSELoss(), {x}, t));
}

BOOST_AUTO_TEST_CASE(structure_errors) {
  const HessianStructure s = model_hessian_structure(mimo, {mx, my});
  HESSE_CHECK_THROWS(s.nonzero("A", "C"), ValueError, "unknown parameter 'C'");
  HESSE_CHECK_THROWS(model_hessian_structure(mimo, {mx, my}, with_params({"Z"})), ValueError,
                     "model_hessian_structure: unknown parameter 'Z'");
  HESSE_CHECK_THROWS(loss_hessian_structure(*mlp, nn::MSELoss(), {x}, randn({5}, gen)), ShapeError, "");
  HESSE_CHECK_THROWS(loss_hessian_structure(*mlp, nn::MSELoss(nn::Reduction::none), {x}, t), ShapeError,
                     "loss_hessian_structure: the criterion returned shape [5, 2]");
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================
// packed
// ============================================================================

BOOST_FIXTURE_TEST_SUITE(packed, Fixture)

BOOST_AUTO_TEST_CASE(loss_packed_is_the_upper_triangle) {
  const PackedHessian p = loss_hessian_packed(*mlp, nn::MSELoss(), {x}, t);
  const Tensor h = loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t);
  BOOST_CHECK_EQUAL(p.n(), 26u);
  BOOST_CHECK_EQUAL(p.count(), 1u);
  BOOST_CHECK_EQUAL(p.bytes(), 26u * 27 / 2 * 8);
  check_upper_exact(p.dense(), h);
  HESSE_CHECK_CLOSE(p.dense(), h, 1e-14 * max_abs(h));  // the lower triangle: the same to rounding
  BOOST_CHECK_EQUAL(p.at(3, 17), p.at(17, 3));
  BOOST_CHECK_EQUAL(p.at(3, 17), h.data()[3 * 26 + 17]);
}

BOOST_AUTO_TEST_CASE(model_packed_per_entry) {
  const PackedHessian p = model_hessian_packed(mimo, {mx, my});
  const Tensor h = model_hessian_matrix(mimo, {mx, my});  // [2, 4, 8, 8]
  BOOST_CHECK_EQUAL(p.count(), 8u);
  BOOST_CHECK_EQUAL(p.bytes(), 8u * 36 * 8);
  const Tensor dense = p.dense();
  BOOST_CHECK(dense.shape() == (Shape{8, 8, 8}));
  CHECK_EXACT(dense, reshape(h, Shape{8, 8, 8}));
  const PackedHessian c = model_hessian_packed(coupled, {cx}, not_batched());
  const Tensor hc = model_hessian_matrix(coupled, {cx}, not_batched());
  check_upper_exact(c.dense(), reshape(hc, Shape{12, 18, 18}));
}

BOOST_AUTO_TEST_CASE(packed_with_subsets_frozen_and_diagonal_only) {
  const HessianOptions sub = with_params({"2.weight", "0.bias"});
  check_upper_exact(loss_hessian_packed(*mlp, nn::MSELoss(), {x}, t, sub).dense(),
                    loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t, sub));
  check_upper_exact(loss_hessian_packed(*mlp, nn::MSELoss(), {x}, t, diagonal()).dense(),
                    loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t, diagonal()));
  mlp->parameter("2.bias").requires_grad_(false);
  const PackedHessian f = loss_hessian_packed(*mlp, nn::MSELoss(), {x}, t);
  BOOST_CHECK_EQUAL(f.n(), 24u);
  check_upper_exact(f.dense(), loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t));
  mlp->parameter("2.bias").requires_grad_(true);
}

BOOST_AUTO_TEST_CASE(packed_errors) {
  PackedHessian p(3, 2);
  p.at(2, 0, 1) = 5.0;
  BOOST_CHECK_EQUAL(p.at(0, 2, 1), 5.0);
  BOOST_CHECK_EQUAL(p.values().size(), 12u);
  HESSE_CHECK_THROWS(p.at(3, 0), IndexError, "PackedHessian::at: index (3, 0, entry 0) out of range for 2 matrices");
  HESSE_CHECK_THROWS(p.at(0, 0, 2), IndexError, "entry 2");
  // sizes whose product wraps: refused, not an empty store that at() writes past
  HESSE_CHECK_THROWS(PackedHessian(4, std::size_t(1) << 63), ValueError, "overflows");
  HESSE_CHECK_THROWS(PackedHessian(std::size_t(1) << 32, std::size_t(1) << 32), ValueError, "overflows");
  HESSE_CHECK_THROWS(PackedHessian(SIZE_MAX, 1), ValueError, "overflows");
  HessianOptions small;
  small.max_bytes = 26 * 27 / 2 * 8 - 1;
  HESSE_CHECK_THROWS(loss_hessian_packed(*mlp, nn::MSELoss(), {x}, t, small), MemoryLimitError,
                     "loss_hessian_packed: the packed result needs 2808 bytes");
  small.max_bytes = 26 * 27 / 2 * 8;
  BOOST_CHECK_NO_THROW(loss_hessian_packed(*mlp, nn::MSELoss(), {x}, t, small));
  HESSE_CHECK_THROWS(model_hessian_packed(mimo, {mx}), ValueError, "MimoModel: takes two inputs");
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================
// block-sparse
// ============================================================================

BOOST_FIXTURE_TEST_SUITE(block_sparse, Fixture)

BOOST_AUTO_TEST_CASE(mimo_a_b_block_is_neither_computed_nor_stored) {
  const BlockSparseHessian s = model_hessian_block_sparse(mimo, {mx, my});
  BOOST_CHECK_EQUAL(s.blocks.size(), 2u);
  BOOST_CHECK(s.blocks.count({0, 0}) && s.blocks.count({1, 1}) && !s.blocks.count({0, 1}));
  BOOST_CHECK(s.lead == (Shape{2, 4}));
  BOOST_CHECK(s.blocks.at({0, 0}).shape() == (Shape{2, 4, 2, 2, 2, 2}));
  BOOST_CHECK_EQUAL(s.bytes(), 2u * 8 * 16 * 8);
  CHECK_EXACT(s.dense(), model_hessian_matrix(mimo, {mx, my}));
  // the seed README's closed form, for inputs (x, −x)
  const Tensor readme = model_hessian_block_sparse(mimo, {mx, -mx}).dense();
  HESSE_CHECK_CLOSE(readme, seed_readme_hessian(mx), 1e-14);
  CHECK_EXACT(s.block("A", "B"), zeros({2, 4, 2, 2, 2, 2}));
  const HessianDict d = model_hessian_dict(mimo, {mx, my});
  const HessianDict sd = s.dict();
  BOOST_CHECK(sd.names() == d.names());
  BOOST_CHECK_EQUAL(sd.blocks().size(), d.blocks().size());
  for (const auto& [key, block] : d.blocks()) CHECK_EXACT(sd(key.first, key.second), block);
}

BOOST_AUTO_TEST_CASE(loss_block_sparse_reproduces_the_dense_routes) {
  const BlockSparseHessian s = loss_hessian_block_sparse(*mlp, nn::MSELoss(), {x}, t);
  BOOST_CHECK_EQUAL(s.blocks.size(), 10u);  // every pair P ≤ Q of 4 parameters
  BOOST_CHECK(s.lead.empty());
  CHECK_EXACT(s.dense(), loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t));
  const HessianDict d = loss_hessian_dict(*mlp, nn::MSELoss(), {x}, t);
  for (const auto& [key, block] : d.blocks()) CHECK_EXACT(s.block(key.first, key.second), block);
  BOOST_CHECK(s.block("2.weight", "0.weight").shape() == (Shape{2, 4, 4, 3}));
  std::size_t bytes = 0;
  for (const auto& kv : s.blocks) bytes += kv.second.numel() * 8;
  BOOST_CHECK_EQUAL(s.bytes(), bytes);
  BOOST_CHECK_EQUAL(s.bytes(), (26u * 26 + 144 + 16 + 64 + 4) / 2 * 8);  // Σ_{P ≤ Q} size_P size_Q
}

BOOST_AUTO_TEST_CASE(model_block_sparse_skips_the_linear_last_layer) {
  const BlockSparseHessian s = model_hessian_block_sparse(*mlp, {x});
  const auto& names = s.names;
  auto idx = [&](const std::string& n) {
    return std::size_t(std::find(names.begin(), names.end(), n) - names.begin());
  };
  BOOST_CHECK(!s.blocks.count({idx("2.weight"), idx("2.weight")}));
  BOOST_CHECK(!s.blocks.count({idx("2.bias"), idx("2.bias")}));
  CHECK_EXACT(s.dense(), model_hessian_matrix(*mlp, {x}));
  const BlockSparseHessian c = model_hessian_block_sparse(coupled, {cx}, not_batched());
  BOOST_CHECK(c.lead == (Shape{4, 3}));
  CHECK_EXACT(c.dense(), model_hessian_matrix(coupled, {cx}, not_batched()));
  BOOST_CHECK_EQUAL(c.blocks.size(), 2u);  // (A, A), (A, B); (B, B) is zero
}

BOOST_AUTO_TEST_CASE(block_sparse_with_subsets_frozen_and_diagonal_only) {
  const HessianOptions sub = with_params({"2.weight", "0.bias"});
  CHECK_EXACT(loss_hessian_block_sparse(*mlp, nn::MSELoss(), {x}, t, sub).dense(),
              loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t, sub));
  const BlockSparseHessian d = loss_hessian_block_sparse(*mlp, nn::MSELoss(), {x}, t, diagonal());
  BOOST_CHECK_EQUAL(d.blocks.size(), 4u);
  BOOST_CHECK_EQUAL(d.bytes(), (144u + 16 + 64 + 4) * 8);
  CHECK_EXACT(d.dense(), loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t, diagonal()));
  const HessianDict dd = loss_hessian_dict(*mlp, nn::MSELoss(), {x}, t, diagonal());
  for (const auto& [key, block] : dd.blocks()) CHECK_EXACT(d.block(key.first, key.second), block);
  // its dict has the pairs loss_hessian_dict has: the (P, P) blocks only
  BOOST_CHECK(d.diagonal_only);
  BOOST_CHECK_EQUAL(d.dict().blocks().size(), dd.blocks().size());
  BOOST_CHECK(!d.dict().contains("0.weight", "2.bias"));
  mlp->parameter("0.weight").requires_grad_(false);
  const BlockSparseHessian f = loss_hessian_block_sparse(*mlp, nn::MSELoss(), {x}, t);
  BOOST_CHECK((f.names == std::vector<std::string>{"0.bias", "2.weight", "2.bias"}));
  CHECK_EXACT(f.dense(), loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t));
  mlp->parameter("0.weight").requires_grad_(true);
}

/// A model whose per-sample output has no batch dimension.
struct ScalarOut : nn::Module {
  Tensor W;
  explicit ScalarOut(Generator& gen) { W = register_parameter("W", randn({3}, gen)); }
  Tensor forward(const std::vector<Tensor>& in) override { return sum(square(in[0] * W)); }
};

BOOST_AUTO_TEST_CASE(block_sparse_errors) {
  ScalarOut scalar(gen);
  HESSE_CHECK_THROWS(model_hessian_block_sparse(scalar, {x}), ShapeError,
                     "model_hessian_block_sparse: with is_batch the model's output needs a leading batch dimension");
  BOOST_CHECK_EQUAL(model_hessian_block_sparse(scalar, {x}, not_batched()).blocks.size(), 1u);
  const BlockSparseHessian s = model_hessian_block_sparse(mimo, {mx, my});
  HESSE_CHECK_THROWS(s.block("A", "nope"), ValueError, "BlockSparseHessian::block: unknown parameter 'nope'");
  // its fields are public: dense() checks them before writing
  BlockSparseHessian bad = s;
  bad.shapes.pop_back();
  HESSE_CHECK_THROWS(bad.dense(), ValueError, "BlockSparseHessian::dense: 2 names but 1 parameter shapes");
  bad = s;
  bad.blocks[{0, 3}] = zeros({2, 2, 4, 4});
  HESSE_CHECK_THROWS(bad.dense(), ShapeError, "block (0, 3) of shape [2, 2, 4, 4] does not fit 2 parameters");
  bad = s;
  bad.blocks[{0, 1}] = zeros({2, 4, 2, 2});
  HESSE_CHECK_THROWS(bad.dense(), ShapeError, "block (0, 1) of shape [2, 4, 2, 2]");
  bad = s;
  bad.blocks[{0, 0}] = zeros({2, 4, 16});  // the right number of entries in the wrong shape
  HESSE_CHECK_THROWS(bad.dense(), ShapeError, "block (0, 0) of shape [2, 4, 16]");
  HessianOptions small;
  small.max_bytes = 2 * 8 * 16 * 8 - 1;  // one byte short of the two stored blocks
  HESSE_CHECK_THROWS(model_hessian_block_sparse(mimo, {mx, my}, small), MemoryLimitError,
                     "model_hessian_block_sparse: the block-sparse result needs 2048 bytes");
  small.max_bytes = 2 * 8 * 16 * 8;  // less than the dense 4096 bytes
  BOOST_CHECK_NO_THROW(model_hessian_block_sparse(mimo, {mx, my}, small));
  HESSE_CHECK_THROWS(loss_hessian_block_sparse(*mlp, nn::MSELoss(), {x}, t, with_params({"9.weight"})), ValueError,
                     "loss_hessian_block_sparse: unknown parameter '9.weight'");
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================
// planner
// ============================================================================

BOOST_FIXTURE_TEST_SUITE(planner, Fixture)

BOOST_AUTO_TEST_CASE(plans_count_what_requests_allocate) {
  const std::size_t big = std::size_t(1) << 30;
  const HessianPlan dense = plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage::dense, big);
  BOOST_CHECK_EQUAL(dense.n, 26u);
  BOOST_CHECK_EQUAL(dense.matrices, 1u);
  BOOST_CHECK_EQUAL(dense.result_bytes, loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t).numel() * 8);
  BOOST_CHECK_EQUAL(dense.products, 26u);
  BOOST_CHECK(dense.fits);
  BOOST_CHECK_EQUAL(dense.chunk_size, 26u);  // all rows in one pass when memory allows
  BOOST_CHECK(dense.working_bytes > 0);
  BOOST_TEST_MESSAGE(dense.str());
  BOOST_CHECK(dense.str().find("loss_hessian_matrix (dense)") != std::string::npos);

  const HessianPlan diag = plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage::diagonal_only, big);
  std::size_t diag_bytes = 0;
  const HessianDict diag_dict = loss_hessian_dict(*mlp, nn::MSELoss(), {x}, t, diagonal());
  for (const auto& kv : diag_dict.blocks()) diag_bytes += kv.second.numel() * 8;
  BOOST_CHECK_EQUAL(diag.result_bytes, diag_bytes);
  BOOST_CHECK(diag.options().diagonal_only);
  BOOST_CHECK(!dense.options().diagonal_only);

  const HessianPlan packed = plan_model_hessian(mimo, {mx, my}, Storage::packed, big);
  BOOST_CHECK_EQUAL(packed.matrices, 8u);
  BOOST_CHECK_EQUAL(packed.result_bytes, model_hessian_packed(mimo, {mx, my}).bytes());
  BOOST_CHECK_EQUAL(packed.products, 64u);

  const HessianPlan sparse = plan_model_hessian(mimo, {mx, my}, Storage::block_sparse, big);
  BOOST_CHECK_EQUAL(sparse.result_bytes, model_hessian_block_sparse(mimo, {mx, my}).bytes());
  const HessianPlan model_dense = plan_model_hessian(*mlp, {x}, Storage::dense, big);
  BOOST_CHECK_EQUAL(model_dense.result_bytes, model_hessian_matrix(*mlp, {x}).numel() * 8);
  // block-sparse pushes no seeds for rows whose blocks are all structurally zero (2.weight, 2.bias rows)
  const HessianPlan model_sparse = plan_model_hessian(*mlp, {x}, Storage::block_sparse, big);
  BOOST_CHECK_EQUAL(model_sparse.products, 10u * (12 + 4));
  BOOST_CHECK_EQUAL(model_sparse.result_bytes, model_hessian_block_sparse(*mlp, {x}).bytes());
  const HessianPlan sub = plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage::dense, big, with_params({"0.bias"}));
  BOOST_CHECK_EQUAL(sub.n, 4u);
  BOOST_CHECK_EQUAL(sub.result_bytes, 16u * 8);
}

BOOST_AUTO_TEST_CASE(a_tiny_budget_does_not_fit) {
  const HessianPlan p = plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage::dense, 1000);
  BOOST_CHECK(!p.fits);
  BOOST_CHECK_EQUAL(p.chunk_size, 1u);
  HESSE_CHECK_THROWS(p.require(), MemoryLimitError, "loss_hessian_matrix (dense) needs ");
  HESSE_CHECK_THROWS(p.require(), MemoryLimitError, "bytes (result 5408 + working");
  HESSE_CHECK_THROWS(p.require(), MemoryLimitError, "but the budget is 1000 bytes; try diagonal_only");
  BOOST_CHECK(p.str().find("does not fit") != std::string::npos);
  // what the plan refuses, the request refuses too
  HESSE_CHECK_THROWS(loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t, p.options()), MemoryLimitError, "bytes");
  // a budget of 0 would become max_bytes = 0, the default limit
  HESSE_CHECK_THROWS(plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage::dense, 0), ValueError,
                     "plan_loss_hessian: the budget must be positive, got 0 bytes");
  HESSE_CHECK_THROWS(plan_model_hessian(mimo, {mx, my}, Storage::packed, 0), ValueError, "budget must be positive");
}

BOOST_AUTO_TEST_CASE(a_tight_budget_gives_small_chunks_and_the_same_hessian) {
  const std::size_t big = std::size_t(1) << 30;
  const HessianPlan wide = plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage::dense, big);
  // the per-seed cost, from two plans: working = first + chunk · per_seed
  const HessianPlan one = plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage::dense, wide.result_bytes);
  const std::size_t per_seed = (wide.working_bytes - one.working_bytes) / (wide.chunk_size - 1);
  const std::size_t first = one.working_bytes - per_seed;
  const HessianPlan tight =
      plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage::dense, wide.result_bytes + first + 3 * per_seed + 7);
  BOOST_CHECK_EQUAL(tight.chunk_size, 3u);
  BOOST_CHECK(tight.fits);
  BOOST_CHECK_NO_THROW(tight.require());
  BOOST_CHECK_EQUAL(tight.options().chunk_size, 3u);
  BOOST_CHECK_EQUAL(tight.options().max_bytes, tight.budget);
  const Tensor h = loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t);
  HESSE_CHECK_CLOSE(loss_hessian_matrix(*mlp, nn::MSELoss(), {x}, t, tight.options()), h, 1e-13 * max_abs(h));

  const HessianPlan tight_model = plan_model_hessian(coupled, {cx}, Storage::packed, 40000);
  BOOST_CHECK(tight_model.fits);
  BOOST_CHECK(tight_model.chunk_size < 18);
  check_upper_exact(reshape(model_hessian_packed(coupled, {cx}, tight_model.options()).dense(), Shape{12, 18, 18}),
                    reshape(model_hessian_matrix(coupled, {cx}), Shape{12, 18, 18}));
}

BOOST_AUTO_TEST_CASE(plan_errors) {
  HESSE_CHECK_THROWS(plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage::dense, 1 << 20, with_params({"q"})),
                     ValueError, "plan_loss_hessian: unknown parameter 'q'");
  HESSE_CHECK_THROWS(plan_model_hessian(mimo, {mx}, Storage::dense, 1 << 20), ValueError, "two inputs");
  HESSE_CHECK_THROWS(plan_loss_hessian(*mlp, nn::MSELoss(), {x}, t, Storage(42), 1 << 20), ValueError,
                     "unknown Storage value 42");
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================
// sharpness bounds
// ============================================================================

BOOST_FIXTURE_TEST_SUITE(bounds, Fixture)

/// lower ≤ true ≤ upper, block_diagonal = the diagonal_only sharpness, norms = the dict's.
void check_bounds(const SharpnessBounds& b, double truth, double diagonal_sharpness, const HessianDict& d,
                  std::size_t entry, std::size_t entries) {
  BOOST_CHECK_LE(b.lower, truth + 1e-12);
  BOOST_CHECK_GE(b.upper, truth - 1e-12);
  BOOST_CHECK_CLOSE_FRACTION(b.block_diagonal, diagonal_sharpness, 1e-12);
  BOOST_CHECK_EQUAL(b.lower, b.block_diagonal);
  const std::size_t P = b.names.size();
  BOOST_REQUIRE(b.block_norms.shape() == (Shape{P, P}));
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t q = 0; q < P; ++q) {
      const Tensor& block = d(b.names[p], b.names[q]);
      const std::size_t per = block.numel() / entries;
      Tensor one = zeros({per});
      std::copy(block.data() + entry * per, block.data() + (entry + 1) * per, one.mutable_data());
      BOOST_CHECK_SMALL(b.block_norms.data()[p * P + q] - frobenius(one), 1e-12 * (1 + frobenius(one)));
    }
}

BOOST_AUTO_TEST_CASE(loss_bounds_bracket_the_sharpness) {
  const SharpnessBounds b = loss_sharpness_bounds(*mlp, nn::MSELoss(), {x}, t);
  check_bounds(b, loss_sharpness(*mlp, nn::MSELoss(), {x}, t), loss_sharpness(*mlp, nn::MSELoss(), {x}, t, diagonal()),
               loss_hessian_dict(*mlp, nn::MSELoss(), {x}, t), 0, 1);
  BOOST_CHECK(b.upper > b.lower);
  const SharpnessBounds c = loss_sharpness_bounds(coupled, nn::MSELoss(), {cx}, ct);
  check_bounds(c, loss_sharpness(coupled, nn::MSELoss(), {cx}, ct),
               loss_sharpness(coupled, nn::MSELoss(), {cx}, ct, diagonal()),
               loss_hessian_dict(coupled, nn::MSELoss(), {cx}, ct), 0, 1);
  BOOST_CHECK(c.block_norms.data()[1] > 0.1 * c.block_norms.data()[0]);  // strong coupling
  BOOST_CHECK(c.upper > c.lower);
  mlp->parameter("0.bias").requires_grad_(false);  // frozen: not in the bounds
  const SharpnessBounds f = loss_sharpness_bounds(*mlp, nn::MSELoss(), {x}, t);
  BOOST_CHECK_EQUAL(f.names.size(), 3u);
  check_bounds(f, loss_sharpness(*mlp, nn::MSELoss(), {x}, t), loss_sharpness(*mlp, nn::MSELoss(), {x}, t, diagonal()),
               loss_hessian_dict(*mlp, nn::MSELoss(), {x}, t), 0, 1);
  mlp->parameter("0.bias").requires_grad_(true);
  const HessianOptions sub = with_params({"0.weight", "2.bias"});
  check_bounds(loss_sharpness_bounds(*mlp, nn::MSELoss(), {x}, t, sub),
               loss_sharpness(*mlp, nn::MSELoss(), {x}, t, sub),
               loss_sharpness(*mlp, nn::MSELoss(), {x}, t,
                              [&] {
                                HessianOptions o = sub;
                                o.diagonal_only = true;
                                return o;
                              }()),
               loss_hessian_dict(*mlp, nn::MSELoss(), {x}, t, sub), 0, 1);
}

BOOST_AUTO_TEST_CASE(model_bounds_per_entry) {
  const std::vector<SharpnessBounds> m = model_sharpness_bounds(mimo, {mx, my});
  BOOST_REQUIRE_EQUAL(m.size(), 8u);
  const Tensor truth = model_sharpness(mimo, {mx, my});
  const Tensor diag = model_sharpness(mimo, {mx, my}, diagonal());
  const HessianDict d = model_hessian_dict(mimo, {mx, my});
  for (std::size_t e = 0; e < 8; ++e) {
    check_bounds(m[e], truth.data()[e], diag.data()[e], d, e, 8);
    BOOST_CHECK_EQUAL(m[e].upper, m[e].lower);  // (A, B) is zero: the interval collapses
    BOOST_CHECK_CLOSE_FRACTION(m[e].lower, truth.data()[e], 1e-12);
  }
  const std::vector<SharpnessBounds> c = model_sharpness_bounds(coupled, {cx}, not_batched());
  const Tensor ct_truth = model_sharpness(coupled, {cx}, not_batched());
  const Tensor ct_diag = model_sharpness(coupled, {cx}, [] {
    HessianOptions o = not_batched();
    o.diagonal_only = true;
    return o;
  }());
  const HessianDict cd = model_hessian_dict(coupled, {cx}, not_batched());
  BOOST_REQUIRE_EQUAL(c.size(), 12u);
  for (std::size_t e = 0; e < 12; ++e) check_bounds(c[e], ct_truth.data()[e], ct_diag.data()[e], cd, e, 12);
}

BOOST_AUTO_TEST_CASE(bounds_errors) {
  HessianOptions small;
  small.max_bytes = (144 + 16 + 64 + 4) * 8 - 1;
  HESSE_CHECK_THROWS(loss_sharpness_bounds(*mlp, nn::MSELoss(), {x}, t, small), MemoryLimitError,
                     "loss_sharpness_bounds: storing the diagonal blocks needs 1824 bytes");
  small.max_bytes += 1;  // the diagonal blocks fit; the dense 5408 bytes would not
  BOOST_CHECK_NO_THROW(loss_sharpness_bounds(*mlp, nn::MSELoss(), {x}, t, small));
  HESSE_CHECK_THROWS(loss_sharpness_bounds(*mlp, nn::MSELoss(), {x}, t, diagonal()), ValueError,
                     "loss_sharpness_bounds: the upper bound needs the off-diagonal blocks");
  HESSE_CHECK_THROWS(model_sharpness_bounds(mimo, {mx, my}, with_params({"C"})), ValueError,
                     "model_sharpness_bounds: unknown parameter 'C'");
}

BOOST_AUTO_TEST_SUITE_END()
