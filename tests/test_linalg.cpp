#define BOOST_TEST_MODULE linalg
#include "op_checks.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <numeric>
#include <vector>

#include <xtensor/xarray.hpp>
#include <xtensor/xmath.hpp>

using namespace hesse;
using namespace hesse::testing;

namespace {


/// Row-major offset of a multi-index read through a (right-aligned) broadcast of shape `s`.
std::size_t broadcast_offset(const std::vector<std::size_t>& idx, const Shape& s) {
  std::size_t off = 0;
  const std::size_t lead = idx.size() - s.size();
  for (std::size_t d = 0; d < s.size(); ++d) off = off * s[d] + (s[d] == 1 ? 0 : idx[lead + d]);
  return off;
}

/// NumPy matmul with plain loops: 1-D operands promoted then squeezed, batch dims broadcast.
Tensor reference_matmul(const Tensor& A, const Tensor& B) {
  Shape sa = A.shape(), sb = B.shape();
  const bool va = sa.size() == 1, vb = sb.size() == 1;
  if (va) sa = {1, sa[0]};
  if (vb) sb = {sb[0], 1};
  const std::size_t m = sa[sa.size() - 2], k = sa.back(), n = sb.back();
  BOOST_REQUIRE(sb[sb.size() - 2] == k);
  const Shape la(sa.begin(), sa.end() - 2), lb(sb.begin(), sb.end() - 2);
  const std::size_t nb = std::max(la.size(), lb.size());
  Shape batch(nb, 1);
  for (std::size_t d = 0; d < nb; ++d) {
    const std::size_t x = d + la.size() >= nb ? la[d + la.size() - nb] : 1;
    const std::size_t y = d + lb.size() >= nb ? lb[d + lb.size() - nb] : 1;
    BOOST_REQUIRE(x == y || x == 1 || y == 1);
    batch[d] = std::max(x, y);
  }
  Shape out_shape = batch;
  if (!va) out_shape.push_back(m);
  if (!vb) out_shape.push_back(n);
  Tensor out = zeros(out_shape);
  std::size_t batches = 1;
  for (std::size_t b : batch) batches *= b;
  std::vector<std::size_t> idx(nb);
  for (std::size_t t = 0; t < batches; ++t) {
    std::size_t rem = t;
    for (std::size_t d = nb; d-- > 0;) idx[d] = rem % batch[d], rem /= batch[d];
    const double* a = A.data() + broadcast_offset(idx, la) * m * k;
    const double* b = B.data() + broadcast_offset(idx, lb) * k * n;
    double* c = out.mutable_data() + t * m * n;
    for (std::size_t i = 0; i < m; ++i)
      for (std::size_t j = 0; j < n; ++j) {
        double s = 0.0;
        for (std::size_t p = 0; p < k; ++p) s += a[i * k + p] * b[p * n + j];
        c[i * n + j] = s;
      }
  }
  return out;
}

/// out[i0, i1, ...] = x[i_{perm^-1}...]: out.shape[i] = x.shape[perm[i]], by explicit index arithmetic.
Tensor reference_permute(const Tensor& x, const std::vector<std::size_t>& perm) {
  const Shape& s = x.shape();
  Shape os(perm.size());
  for (std::size_t i = 0; i < perm.size(); ++i) os[i] = s[perm[i]];
  Tensor out = Tensor::empty(os);
  std::vector<std::size_t> oi(os.size()), xi(s.size());
  for (std::size_t flat = 0; flat < out.numel(); ++flat) {
    std::size_t rem = flat;
    for (std::size_t d = os.size(); d-- > 0;) oi[d] = rem % os[d], rem /= os[d];
    for (std::size_t i = 0; i < perm.size(); ++i) xi[perm[i]] = oi[i];
    std::size_t off = 0;
    for (std::size_t d = 0; d < s.size(); ++d) off = off * s[d] + xi[d];
    out.mutable_data()[flat] = x.data()[off];
  }
  return out;
}

using Binary = std::function<Tensor(const std::vector<Tensor>&)>;
const Binary kMatmul = [](const std::vector<Tensor>& t) { return matmul(t[0], t[1]); };

const std::vector<std::pair<Shape, Shape>> kMatmulCases = {
    {{4}, {4}},          {{3}, {3, 2}},       {{2, 3}, {3}},          {{2, 3}, {3, 4}},    {{1, 3}, {3, 1}},
    {{3, 1}, {1, 2}},    {{2, 3, 4}, {4, 2}}, {{3, 4}, {2, 4, 2}},    {{2, 3, 4}, {2, 4, 5}},
    {{2, 1, 3, 4}, {5, 4, 2}}, {{3}, {2, 3, 4}}, {{2, 3, 4}, {4}},     {{1, 2, 3}, {4, 3, 2}},
    {{2, 3, 0}, {0, 2}}, {{0, 3}, {3, 2}}, {{2, 1, 3, 4}, {1, 5, 4, 2}}, {{1, 3, 4}, {2, 4, 2}},
    {{3, 4}, {1, 1, 4, 2}}, {{2, 3, 4}, {1, 4, 5}},
    // 2 × 2 results (their own kernel): k = 2 and other k, single and batched
    {{2, 2}, {2, 2}}, {{2, 5}, {5, 2}}, {{3, 2, 2}, {2, 2}}, {{2, 2}, {4, 2, 2}}, {{3, 2, 7}, {3, 7, 2}},
    // matrix-vector products past the plain loop's size (m·k > 512), with rows of
    // 2, 3 and 4 (their own kernels) and of 5
    {{300, 2}, {2}}, {{200, 3}, {3}}, {{2, 100, 4}, {4, 1}}, {{203, 4}, {4}}, {{130, 5}, {5}}};

}  // namespace

// ---- matmul ----

BOOST_AUTO_TEST_CASE(matmul_values) {
  Generator gen(1);
  for (const auto& [sa, sb] : kMatmulCases) {
    BOOST_TEST_CONTEXT(to_string(sa) << " @ " << to_string(sb)) {
      const Tensor a = randn(sa, gen), b = randn(sb, gen);
      const Tensor got = matmul(a, b), want = reference_matmul(a, b);
      BOOST_REQUIRE_MESSAGE(got.shape() == want.shape(), to_string(got.shape()) << " vs " << to_string(want.shape()));
      CHECK_CLOSE(got, want, 1e-13);
    }
  }
  // a larger product goes through BLAS blocking
  const Tensor a = randn({37, 53}, gen), b = randn({53, 29}, gen);
  CHECK_CLOSE(matmul(a, b), reference_matmul(a, b), 1e-12);
  const Tensor c = randn({3, 17, 20}, gen), d = randn({3, 20, 9}, gen);
  CHECK_CLOSE(matmul(c, d), reference_matmul(c, d), 1e-12);
}

// k = 1 products are outer products: small ones computed by a loop, large ones
// by BLAS, under every transpose flag (the flags come from the adjoints below).
BOOST_AUTO_TEST_CASE(outer_products_of_every_size) {
  Generator gen(5);
  const std::vector<std::pair<Shape, Shape>> cases = {{{1, 1}, {1, 1}},    {{3, 1}, {1, 2}},      {{5, 1}, {1, 7}},
                                                      {{40, 1}, {1, 30}}, {{2, 3, 1}, {1, 4}},   {{4, 1}, {3, 1, 6}},
                                                      {{2, 1, 3, 1}, {2, 1, 5}}, {{100, 1}, {1, 50}}};
  for (const auto& [sa, sb] : cases) {
    BOOST_TEST_CONTEXT(to_string(sa) << " @ " << to_string(sb)) {
      const Tensor a = randn(sa, gen), b = randn(sb, gen);
      CHECK_CLOSE(matmul(a, b), reference_matmul(a, b), 0.0);
    }
  }
  // rows of 2 to 4 are written by their own loops however many there are;
  // so are a batch's single-row Aᵢᵀ times B (a seed batch's weight gradients),
  // also a batch of tiny ones (64 × 16 × 4 is the tiny-product size)
  for (const std::size_t n : {2, 3, 4, 5}) {
    const Tensor a = randn({1500, 1}, gen), b = randn({1, n}, gen);
    CHECK_CLOSE(matmul(a, b), reference_matmul(a, b), 0.0);
    for (const std::size_t batch : {3, 64, 300}) {
      const Tensor rows = randn({batch, 1, 16}, gen);
      CHECK_CLOSE(matmul(transpose(rows, 1, 2), b), reference_matmul(reference_permute(rows, {0, 2, 1}), b), 0.0);
    }
  }
  // a batch of tiny outer products against a batch, under every transpose flag
  for (const bool ta : {false, true})
    for (const bool tb : {false, true}) {
      BOOST_TEST_CONTEXT("batched outer products, ta " << ta << ", tb " << tb) {
        const Tensor a = randn(ta ? Shape{5, 1, 3} : Shape{5, 3, 1}, gen);
        const Tensor b = randn(tb ? Shape{5, 4, 1} : Shape{5, 1, 4}, gen);
        const Tensor op_a = ta ? reference_permute(a, {0, 2, 1}) : a, op_b = tb ? reference_permute(b, {0, 2, 1}) : b;
        CHECK_CLOSE(matmul(ta ? transpose(a, 1, 2) : a, tb ? transpose(b, 1, 2) : b), reference_matmul(op_a, op_b), 0.0);
      }
    }
  // C = A B with one row (dB = Aᵀ G: an outer product of a transposed A) and
  // with one column (dA = G Bᵀ: an outer product of a transposed B)
  for (std::size_t size : {3, 40, 90}) {
    const Tensor A = normal({1, size}, gen), B = normal({size, size - 1}, gen), G = randn({1, size - 1}, gen);
    CHECK_CLOSE(grad(matmul(A, B), B, G), reference_matmul(reference_permute(A.detach(), {1, 0}), G), 0.0);
    const Tensor A2 = normal({size - 1, size}, gen), B2 = normal({size, 1}, gen), G2 = randn({size - 1, 1}, gen);
    CHECK_CLOSE(grad(matmul(A2, B2), A2, G2), reference_matmul(G2, reference_permute(B2.detach(), {1, 0})), 0.0);
    check_derivatives("outer " + std::to_string(size), kMatmul, {normal({size, 1}, gen), normal({1, size}, gen)});
  }
}

// A batch of B's against one A of at most 4 columns (a seed batch through a
// model's small output layer) is a loop of its own past the tiny-product
// size, summing as the reference does; with op(A) = Aᵀ too.
BOOST_AUTO_TEST_CASE(a_batch_against_a_narrow_a) {
  Generator gen(6);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{2, 2}, {128, 2, 16}}, {{16, 3}, {40, 3, 10}}, {{5, 4}, {300, 4, 3}}, {{7, 1}, {700, 1, 1}}, {{3, 2}, {4, 30, 2, 9}}};
  for (const auto& [sa, sb] : cases) {
    BOOST_TEST_CONTEXT(to_string(sa) << " @ " << to_string(sb)) {
      const Tensor a = randn(sa, gen), b = randn(sb, gen);
      CHECK_CLOSE(matmul(a, b), reference_matmul(a, b), 0.0);
      const Tensor at = randn({sa[1], sa[0]}, gen);
      CHECK_CLOSE(matmul(transpose(at), b), reference_matmul(reference_permute(at, {1, 0}), b), 0.0);
    }
  }
}

BOOST_AUTO_TEST_CASE(matmul_gradients_closed_form) {
  // C = A B: dA = G Bᵀ, dB = Aᵀ G
  Generator gen(2);
  const Tensor A = normal({3, 4}, gen), B = normal({4, 2}, gen), G = randn({3, 2}, gen);
  const std::vector<Tensor> g = grad({matmul(A, B)}, {A, B}, {G});
  CHECK_CLOSE(g[0], reference_matmul(G, reference_permute(B.detach(), {1, 0})), 1e-14);
  CHECK_CLOSE(g[1], reference_matmul(reference_permute(A.detach(), {1, 0}), G), 1e-14);
  // broadcast batch: dB sums over the batch of A
  const Tensor A3 = normal({5, 3, 4}, gen), G3 = randn({5, 3, 2}, gen);
  const std::vector<Tensor> g3 = grad({matmul(A3, B)}, {A3, B}, {G3});
  Tensor want = zeros({4, 2});
  for (std::size_t i = 0; i < 5; ++i)
    want = want + reference_matmul(reference_permute(row(A3, i), {1, 0}), row(G3, i));
  CHECK_CLOSE(g3[1], want, 1e-13);
  // 2 × 2 results under every transpose flag (their own kernel), k = 2 and
  // k = 6: A Bᵀ in linear; Aᵀ G for a B shared by a batch of A's (rows stacked)
  for (const std::size_t r : {std::size_t(1), std::size_t(3)}) {
    const Tensor a = normal({2, r, 2}, gen), b = normal({2, 2}, gen), gc = randn({2, r, 2}, gen);
    const std::vector<Tensor> gk = grad({matmul(a, b)}, {a, b}, {gc});
    Tensor want_b = zeros({2, 2});
    for (std::size_t i = 0; i < 2; ++i) {
      CHECK_CLOSE(row(gk[0], i), reference_matmul(row(gc, i), reference_permute(b.detach(), {1, 0})), 1e-14);
      want_b = want_b + reference_matmul(reference_permute(row(a, i), {1, 0}), row(gc, i));
    }
    CHECK_CLOSE(gk[1], want_b, 1e-14);
    const Tensor x = randn({2, 2 * r}, gen), w = randn({2, 2 * r}, gen);
    CHECK_CLOSE(linear(x, w), reference_matmul(x, reference_permute(w, {1, 0})), 1e-14);
  }
  // one input row: x Wᵀ is W x, dot products over rows of k = 2, 3, 4, 5
  for (const std::size_t k : {std::size_t(2), std::size_t(3), std::size_t(4), std::size_t(5)}) {
    const Tensor x = randn({1, k}, gen), w = randn({300, k}, gen);
    CHECK_CLOSE(linear(x, w), reference_matmul(x, reference_permute(w, {1, 0})), 1e-14);
  }
}

BOOST_AUTO_TEST_CASE(matmul_gradcheck) {
  Generator gen(3);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{3}, {3}},       {{3}, {3, 2}},       {{2, 3}, {3}},       {{2, 3}, {3, 2}},     {{2, 2, 3}, {3, 2}},
      {{2, 3}, {2, 3, 2}}, {{2, 1, 2, 3}, {3, 3, 2}}, {{3}, {2, 3, 2}}, {{2, 2, 3}, {3}}, {{3, 1}, {1, 2}},
      {{2, 1, 2, 3}, {1, 2, 3, 2}}, {{1, 2, 3}, {2, 3, 2}}, {{2, 2}, {2, 2}}, {{3, 2, 2}, {2, 2}}, {{2, 2}, {3, 2, 2}},
      {{4, 3, 2}, {2, 2}}};
  for (const auto& [sa, sb] : cases) {
    const Tensor a = normal(sa, gen), b = normal(sb, gen);
    check_derivatives("matmul " + to_string(sa) + " @ " + to_string(sb), kMatmul, {a, b});
  }
  // only one side differentiable
  const Tensor a = normal({2, 3}, gen), b = randn({3, 2}, gen);
  check_derivatives("matmul, constant B", kMatmul, {a, b});
  check_derivatives("matmul, constant A", kMatmul, {b.detach(), leaf(a.detach().clone())});
  // x appearing on both sides: the Hessian of xᵀ M x
  const Tensor M = randn({3, 3}, gen), x = normal({3}, gen);
  check_derivatives("x M x", [M](const std::vector<Tensor>& t) { return matmul(t[0], matmul(M, t[0])); }, {x});
  check_derivatives("tanh(W x)", [](const std::vector<Tensor>& t) { return hesse::tanh(matmul(t[0], t[1])); },
                    {normal({2, 3}, gen), normal({3}, gen)});
}

BOOST_AUTO_TEST_CASE(matmul_errors) {
  HESSE_CHECK_THROWS(matmul(zeros({3}), zeros({4})), hesse::ShapeError, "hesse::matmul");
  HESSE_CHECK_THROWS(matmul(zeros({2, 3}), zeros({4, 2})), hesse::ShapeError, "hesse::matmul");
  HESSE_CHECK_THROWS(matmul(zeros({3}), zeros({4, 2})), hesse::ShapeError, "hesse::matmul");
  HESSE_CHECK_THROWS(matmul(zeros({2, 3}), zeros({4})), hesse::ShapeError, "hesse::matmul");
  HESSE_CHECK_THROWS(matmul(zeros({2, 2, 3}), zeros({3, 3, 2})), hesse::ShapeError, "hesse::matmul");
  HESSE_CHECK_THROWS(matmul(Tensor(2.0), zeros({3})), hesse::ShapeError, "hesse::matmul");
  HESSE_CHECK_THROWS(matmul(zeros({3}), Tensor(2.0)), hesse::ShapeError, "hesse::matmul");
  check_message<ShapeError>([] { matmul(zeros({2, 3}), zeros({4, 2})); }, {"hesse::matmul", "[2, 3]", "[4, 2]"});
  check_message<ShapeError>([] { matmul(zeros({3}), zeros({4})); }, {"hesse::matmul", "[3]", "[4]"});
  check_message<ShapeError>([] { matmul(zeros({5, 3}), zeros({2})); }, {"hesse::matmul", "[5, 3]", "[2]"});
  check_message<ShapeError>([] { matmul(zeros({2, 2, 3}), zeros({3, 3, 2})); },
                            {"hesse::matmul", "[2, 2, 3]", "[3, 3, 2]"});
  check_message<ShapeError>([] { matmul(Tensor(2.0), zeros({3})); }, {"hesse::matmul", "[]", "[3]"});
}

// ---- transpose and permute ----

BOOST_AUTO_TEST_CASE(transpose_and_permute_values) {
  Generator gen(4);
  const Tensor v = randn({5}, gen), m = randn({3, 4}, gen), t = randn({2, 3, 4}, gen);
  CHECK_CLOSE(transpose(v), v, 0.0);
  BOOST_CHECK(transpose(v).shape() == Shape({5}));
  CHECK_CLOSE(transpose(m), reference_permute(m, {1, 0}), 0.0);
  CHECK_CLOSE(transpose(m), Tensor(xt::xarray<double>(xt::transpose(m.value()))), 0.0);
  CHECK_CLOSE(transpose(t), reference_permute(t, {0, 2, 1}), 0.0);
  CHECK_CLOSE(transpose(t, 0, 2), reference_permute(t, {2, 1, 0}), 0.0);
  CHECK_CLOSE(transpose(t, -3, -2), reference_permute(t, {1, 0, 2}), 0.0);
  CHECK_CLOSE(transpose(t, 1, 1), t, 0.0);
  CHECK_CLOSE(transpose(Tensor(3.0)), Tensor(3.0), 0.0);
  const std::vector<std::vector<int>> perms = {{0, 1, 2}, {2, 0, 1}, {1, 2, 0}, {2, 1, 0}, {-1, 0, -2}};
  for (const auto& p : perms) {
    std::vector<std::size_t> q;
    for (int a : p) q.push_back(std::size_t(a < 0 ? a + 3 : a));
    CHECK_CLOSE(permute(t, p), reference_permute(t, q), 0.0);
  }
  const Tensor t4 = randn({2, 1, 3, 2}, gen);
  CHECK_CLOSE(permute(t4, {3, 1, 0, 2}), reference_permute(t4, {3, 1, 0, 2}), 0.0);
  CHECK_CLOSE(permute(t4, {3, 1, 0, 2}),
              Tensor(xt::xarray<double>(xt::transpose(t4.value(), {3, 1, 0, 2}))), 0.0);
}

BOOST_AUTO_TEST_CASE(transposes_of_every_size_class) {
  // Matrix transposes run four rows at a time over bands of 64 columns: rows
  // below, at and above multiples of 4, columns across a band's edge, batches,
  // and empty matrices.
  Generator gen(41);
  for (const Shape& s : {Shape{1, 1}, Shape{3, 2}, Shape{4, 4}, Shape{5, 7}, Shape{9, 64}, Shape{8, 65},
                         Shape{13, 130}, Shape{130, 13}, Shape{3, 6, 5}, Shape{2, 2, 4, 9}, Shape{2, 0, 3},
                         Shape{2, 2}, Shape{5, 2, 2}}) {
    const Tensor x = randn(s, gen);
    std::vector<std::size_t> perm(s.size());
    std::iota(perm.begin(), perm.end(), std::size_t(0));
    std::swap(perm[s.size() - 2], perm[s.size() - 1]);
    CHECK_CLOSE(transpose(x), reference_permute(x, perm), 0.0);
  }
}

BOOST_AUTO_TEST_CASE(transpose_and_permute_gradients) {
  Generator gen(5);
  const Tensor t = normal({2, 3, 2}, gen);
  const Tensor m = normal({2, 3}, gen);
  // the gradient of a permutation is the inverse permutation of the seed
  const Tensor seed = randn({2, 2, 3}, gen);
  CHECK_CLOSE(grad(permute(t, {2, 0, 1}), t, seed), reference_permute(seed, {1, 2, 0}), 0.0);
  check_derivatives("transpose", [](const std::vector<Tensor>& x) { return transpose(x[0]); }, {m});
  check_derivatives("transpose 3-D", [](const std::vector<Tensor>& x) { return transpose(x[0]); }, {t});
  check_derivatives("transpose 0,2", [](const std::vector<Tensor>& x) { return transpose(x[0], 0, -1); }, {t});
  check_derivatives("permute 2,0,1", [](const std::vector<Tensor>& x) { return permute(x[0], {2, 0, 1}); }, {t});
  check_derivatives("permute(x)^2",
                    [](const std::vector<Tensor>& x) { return square(permute(x[0], {1, 2, 0})) * x[0].detach().size(0); },
                    {t});
  check_derivatives("x xᵀ", [](const std::vector<Tensor>& x) { return matmul(x[0], transpose(x[0])); }, {m});
}

// matmul reads a temporary transpose(X) from X through its transpose flag
BOOST_AUTO_TEST_CASE(matmul_reads_a_transposed_temporary_from_its_input) {
  Generator gen(42);
  const std::vector<std::pair<Shape, Shape>> cases = {  // shapes before the transposes; the last past the plain loop
      {{3, 2}, {3, 4}}, {{2, 2}, {2, 2}}, {{2, 4, 3}, {2, 4, 2}}, {{4, 3}, {2, 4, 5}}, {{9, 10}, {9, 11}}};
  auto swapped = [](const Tensor& x) {  // x with its last two axes swapped, by index arithmetic
    std::vector<std::size_t> perm(x.ndim());
    std::iota(perm.begin(), perm.end(), std::size_t(0));
    std::swap(perm[x.ndim() - 2], perm[x.ndim() - 1]);
    return reference_permute(x, perm);
  };
  for (const auto& [sa, sb] : cases) {
    BOOST_TEST_CONTEXT(to_string(sa) << "ᵀ @ " << to_string(sb)) {
      const Tensor a = normal(sa, gen), b = normal(sb, gen);
      CHECK_CLOSE(matmul(transpose(a), b), reference_matmul(swapped(a), b), 1e-13);
      const Tensor at = leaf(swapped(a)), bt = leaf(swapped(b));
      CHECK_CLOSE(matmul(bt, transpose(at)), reference_matmul(bt, a), 1e-13);
      CHECK_CLOSE(matmul(transpose(b), transpose(at)), reference_matmul(bt, a), 1e-13);
      check_derivatives("Aᵀ B", [](const std::vector<Tensor>& t) { return matmul(transpose(t[0]), t[1]); }, {a, b});
    }
  }
  check_derivatives("A Bᵀ", [](const std::vector<Tensor>& t) { return matmul(t[0], transpose(t[1])); },
                    {normal({2, 3}, gen), normal({4, 3}, gen)});
  check_derivatives("Aᵀ Bᵀ", [](const std::vector<Tensor>& t) { return matmul(transpose(t[0]), transpose(t[1])); },
                    {normal({3, 2}, gen), normal({4, 3}, gen)});
  check_derivatives("Bᵀ (Bᵀ)ᵀ",  // the second operand is a transpose of a transpose
                    [](const std::vector<Tensor>& t) { return matmul(transpose(t[0]), transpose(transpose(t[0]))); },
                    {normal({3, 2}, gen)});
  check_derivatives("Aᵀ x", [](const std::vector<Tensor>& t) { return matmul(transpose(t[0]), t[1]); },
                    {normal({3, 2}, gen), normal({3}, gen)});

  const Tensor a = normal({3, 2}, gen), b = normal({3, 4}, gen);
  const Tensor expected = reference_matmul(reference_permute(a, {1, 0}), b);
  // the product's node reads A itself: no transpose in its graph
  const Tensor fused = matmul(transpose(a), b);
  BOOST_TEST(fused.grad_fn()->edges[0].leaf == a.impl());
  // a transpose the caller still holds stays in the graph: gradients can be asked through it
  const Tensor at = transpose(a);
  const Tensor kept = matmul(at, b);
  BOOST_TEST(kept.grad_fn()->edges[0].node == at.grad_fn());
  CHECK_CLOSE(grad(sum(kept), at), reference_matmul(ones({2, 4}), reference_permute(b, {1, 0})), 1e-13);
  // values written since the transpose: the copy's, never the input's new ones
  Tensor copy = transpose(a);
  Tensor changed = a.detach().clone();
  changed.mutable_data()[0] += 1.0;
  Tensor source = leaf(changed.clone());
  Tensor stale = transpose(source);
  source.mutable_data()[0] -= 1.0;  // source now holds a's values; stale still holds changed's transpose
  CHECK_CLOSE(matmul(std::move(stale), b), reference_matmul(reference_permute(changed, {1, 0}), b), 0.0);
  copy.mutable_data()[1] = 7.0;
  Tensor written = reference_permute(a.detach(), {1, 0});
  written.mutable_data()[1] = 7.0;
  CHECK_CLOSE(matmul(std::move(copy), b), reference_matmul(written, b), 0.0);
  CHECK_CLOSE(fused, expected, 1e-13);
  // a transpose recorded while A required grad still sends A its gradient
  const Tensor frozen = normal({3, 2}, gen);
  Tensor recorded = transpose(frozen);
  Tensor handle = frozen;
  handle.requires_grad_(false);
  sum(matmul(std::move(recorded), b)).backward();
  BOOST_REQUIRE(frozen.grad().defined());
  Tensor row_sums = zeros({3, 2});
  for (std::size_t k = 0; k < 3; ++k)
    for (std::size_t i = 0; i < 2; ++i)
      for (std::size_t j = 0; j < 4; ++j) row_sums.mutable_data()[k * 2 + i] += b.data()[k * 4 + j];
  CHECK_CLOSE(frozen.grad(), row_sums, 1e-13);
  // and one whose graph a backward already freed is not skipped: differentiating through it again is refused
  Tensor freed = transpose(a);
  sum(freed).backward();
  const Tensor through_freed = matmul(std::move(freed), b);
  HESSE_CHECK_THROWS(sum(through_freed).backward(), hesse::AutogradError, "a second time");
}

BOOST_AUTO_TEST_CASE(transpose_and_permute_errors) {
  const Tensor t = zeros({2, 3, 4});
  HESSE_CHECK_THROWS(transpose(t, 0, 3), hesse::IndexError, "hesse::transpose");
  HESSE_CHECK_THROWS(transpose(t, -4, 0), hesse::IndexError, "hesse::transpose");
  HESSE_CHECK_THROWS(permute(t, {0, 1}), hesse::ShapeError, "hesse::permute");
  HESSE_CHECK_THROWS(permute(t, {0, 1, 3}), hesse::IndexError, "hesse::permute");
  HESSE_CHECK_THROWS(permute(t, {0, 1, 1}), hesse::IndexError, "hesse::permute");
  HESSE_CHECK_THROWS(permute(t, {0, 1, -2}), hesse::IndexError, "hesse::permute");
  check_message<ShapeError>([&] { permute(t, {0, 1}); }, {"hesse::permute", "[2, 3, 4]"});
  check_message<IndexError>([&] { permute(t, {2, 1, 2}); }, {"hesse::permute", "[2, 3, 4]", "axis 2"});
}

// ---- trace, outer, dot ----

BOOST_AUTO_TEST_CASE(trace_outer_dot_values) {
  Generator gen(6);
  for (const Shape& s : {Shape{3, 3}, Shape{2, 4}, Shape{4, 2}, Shape{1, 1}}) {
    const Tensor x = randn(s, gen);
    double want = 0.0;
    for (std::size_t i = 0; i < std::min(s[0], s[1]); ++i) want += x.data()[i * s[1] + i];
    BOOST_CHECK(trace(x).shape() == Shape{});
    BOOST_CHECK_CLOSE_FRACTION(trace(x).item(), want, 1e-14);
  }
  const Tensor a = randn({3}, gen), b = randn({4}, gen), c = randn({3}, gen);
  const Tensor o = outer(a, b);
  BOOST_REQUIRE(o.shape() == Shape({3, 4}));
  for (std::size_t i = 0; i < 3; ++i)
    for (std::size_t j = 0; j < 4; ++j) BOOST_CHECK_EQUAL(o.data()[i * 4 + j], a.data()[i] * b.data()[j]);
  double want = 0.0;
  for (std::size_t i = 0; i < 3; ++i) want += a.data()[i] * c.data()[i];
  BOOST_CHECK(dot(a, c).shape() == Shape{});
  BOOST_CHECK_CLOSE_FRACTION(dot(a, c).item(), want, 1e-14);
  BOOST_CHECK_EQUAL(dot(zeros({0}), zeros({0})).item(), 0.0);
}

BOOST_AUTO_TEST_CASE(trace_outer_dot_gradients) {
  Generator gen(7);
  const Tensor X = normal({3, 3}, gen), R = normal({2, 3}, gen);
  CHECK_CLOSE(grad(trace(X), X), eye(3), 0.0);
  CHECK_CLOSE(grad(trace(R), R), eye(2, 3), 0.0);
  const Tensor a = normal({3}, gen), b = normal({4}, gen), c = normal({3}, gen);
  const std::vector<Tensor> gd = grad({dot(a, c)}, {a, c});
  CHECK_CLOSE(gd[0], c.detach(), 0.0);
  CHECK_CLOSE(gd[1], a.detach(), 0.0);
  const Tensor G = randn({3, 4}, gen);
  const std::vector<Tensor> go = grad({outer(a, b)}, {a, b}, {G});
  CHECK_CLOSE(go[0], reference_matmul(G, b.detach()), 1e-14);
  CHECK_CLOSE(go[1], reference_matmul(a.detach(), G), 1e-14);
  check_derivatives("trace", [](const std::vector<Tensor>& t) { return trace(t[0]); }, {X});
  check_derivatives("trace non-square", [](const std::vector<Tensor>& t) { return trace(t[0]); }, {R});
  check_derivatives("trace(X X)", [](const std::vector<Tensor>& t) { return trace(matmul(t[0], t[0])); }, {X});
  check_derivatives("outer", [](const std::vector<Tensor>& t) { return outer(t[0], t[1]); }, {a, b});
  check_derivatives("dot", [](const std::vector<Tensor>& t) { return dot(t[0], t[1]); }, {a, c});
  check_derivatives("dot(a, a)", [](const std::vector<Tensor>& t) { return dot(t[0], t[0]); }, {a});
}

BOOST_AUTO_TEST_CASE(trace_outer_dot_errors) {
  HESSE_CHECK_THROWS(trace(zeros({3})), hesse::ShapeError, "hesse::trace");
  HESSE_CHECK_THROWS(trace(zeros({2, 2, 2})), hesse::ShapeError, "hesse::trace");
  HESSE_CHECK_THROWS(outer(zeros({2, 2}), zeros({2})), hesse::ShapeError, "hesse::outer");
  HESSE_CHECK_THROWS(outer(zeros({2}), Tensor(1.0)), hesse::ShapeError, "hesse::outer");
  HESSE_CHECK_THROWS(dot(zeros({2}), zeros({3})), hesse::ShapeError, "hesse::dot");
  HESSE_CHECK_THROWS(dot(zeros({2, 1}), zeros({2, 1})), hesse::ShapeError, "hesse::dot");
  check_message<ShapeError>([] { trace(zeros({2, 2, 2})); }, {"hesse::trace", "[2, 2, 2]"});
  check_message<ShapeError>([] { outer(zeros({2, 2}), zeros({2})); }, {"hesse::outer", "[2, 2]", "[2]"});
  check_message<ShapeError>([] { dot(zeros({2}), zeros({3})); }, {"hesse::dot", "[2]", "[3]"});
}

// ---- linear (x Wᵀ + b) ----

BOOST_AUTO_TEST_CASE(linear_values_and_gradients) {
  Generator gen(8);
  const Tensor W = normal({3, 4}, gen), b = normal({3}, gen);
  for (const Shape& s : {Shape{4}, Shape{2, 4}, Shape{2, 5, 4}}) {
    const Tensor x = normal(s, gen);
    const Tensor want = reference_matmul(x.detach(), reference_permute(W.detach(), {1, 0}));
    CHECK_CLOSE(linear(x, W), want, 1e-14);
    CHECK_CLOSE(linear(x, W, b), Tensor(xt::xarray<double>(want.value() + b.value())), 1e-14);
  }
  const Tensor x = normal({2, 4}, gen);
  check_derivatives("linear", [](const std::vector<Tensor>& t) { return linear(t[0], t[1], t[2]); }, {x, W, b});
  check_derivatives("linear 1-D", [](const std::vector<Tensor>& t) { return linear(t[0], t[1]); },
                    {normal({4}, gen), W});
  check_batched_seeds("linear", [](const std::vector<Tensor>& t) { return hesse::tanh(linear(t[0], t[1], t[2])); },
                      {x, W, b});
  HESSE_CHECK_THROWS(linear(zeros({2, 3}), W), hesse::ShapeError, "hesse::linear");
  HESSE_CHECK_THROWS(linear(zeros({2, 4}), W, zeros({4})), hesse::ShapeError, "hesse::linear");
}

// A batch of A against one B: dB stacks the batch into the rows of a single
// product (both B layouts: matmul's and linear's transposed weight).
BOOST_AUTO_TEST_CASE(shared_b_gradient_over_a_batch) {
  Generator gen(9);
  const Tensor W = normal({3, 4}, gen), B = normal({4, 3}, gen);
  for (const Shape& s : {Shape{2, 5, 4}, Shape{2, 3, 1, 4}}) {
    BOOST_TEST_CONTEXT(to_string(s)) {
      const Tensor x = normal(s, gen);
      Shape gs(s.begin(), s.end() - 1);
      gs.push_back(3);
      const Tensor g = randn(gs, gen);
      // dW of x Wᵀ is Σ_i gᵢᵀ xᵢ, dB of x B is Σ_i xᵢᵀ gᵢ over every batch row i
      const std::size_t rows = x.numel() / 4;
      const Tensor x_rows = reshape(x.detach(), Shape{rows, 4}), g_rows = reshape(g, Shape{rows, 3});
      CHECK_CLOSE(grad(linear(x, W), W, g), reference_matmul(reference_permute(g_rows, {1, 0}), x_rows), 1e-13);
      CHECK_CLOSE(grad(matmul(x, B), B, g), reference_matmul(reference_permute(x_rows, {1, 0}), g_rows), 1e-13);
      check_derivatives("linear " + to_string(s), [](const std::vector<Tensor>& t) { return linear(t[0], t[1]); },
                        {x, W});
      check_derivatives("matmul " + to_string(s), kMatmul, {x, B});
      check_batched_seeds("tanh(linear) " + to_string(s),
                          [](const std::vector<Tensor>& t) { return hesse::tanh(linear(t[0], t[1])); }, {x, W});
      check_batched_seeds("tanh(matmul) " + to_string(s),
                          [](const std::vector<Tensor>& t) { return hesse::tanh(matmul(t[0], t[1])); }, {x, B});
    }
  }
}

BOOST_AUTO_TEST_CASE(a_shared_matrix_gradient_over_a_batch_of_b) {
  // C = op(A) op(B_ij) for one A and a [3, 2] batch of B's, seeded k = 4 times
  // at once: dA is Σ_ij of each product's gradient, summed in the batch's
  // order (unrecorded, each product is added into the sum as it is made;
  // recorded, a batch of products is summed after: the same values)
  Generator gen(12);
  const std::size_t m = 2, k = 3;
  for (const std::size_t n : {2, 1})  // n = 1: each term of dA is an outer product
    for (const bool ta : {false, true})
      for (const bool tb : {false, true})
        for (const bool recorded : {false, true}) {
          BOOST_TEST_CONTEXT("n " << n << ", ta " << ta << ", tb " << tb << (recorded ? ", recorded" : "")) {
            const Tensor a = normal(ta ? Shape{k, m} : Shape{m, k}, gen);
            const Tensor b = normal(tb ? Shape{3, 2, n, k} : Shape{3, 2, k, n}, gen);
            const Tensor c = matmul(ta ? transpose(a) : a, tb ? transpose(b) : b);
            BOOST_REQUIRE(c.shape() == Shape({3, 2, m, n}));
            const Tensor seeds = randn({4, 3, 2, m, n}, gen);
            GradOptions batched;
            batched.batched_grad_outputs = true;
            batched.create_graph = recorded;
            const Tensor ga = grad(std::vector<Tensor>{c}, std::vector<Tensor>{a}, {seeds}, batched)[0];
            BOOST_CHECK_EQUAL(ga.requires_grad(), recorded);
            Tensor want = zeros({4, a.shape()[0], a.shape()[1]});
            for (std::size_t s = 0; s < 4; ++s) {
              Tensor sum = zeros(a.shape());
              for (std::size_t i = 0; i < 6; ++i) {
                const Tensor g = row(reshape(row(seeds, s), Shape{6, m, n}), i);
                const Tensor bi = row(reshape(b, Shape{6, b.shape()[2], b.shape()[3]}), i);
                const Tensor op_b = tb ? reference_permute(bi, {1, 0}) : bi;
                // dA = g op(B)ᵀ, or op(B) gᵀ when C = Aᵀ op(B)
                sum = sum + (ta ? reference_matmul(op_b, reference_permute(g, {1, 0}))
                                : reference_matmul(g, reference_permute(op_b, {1, 0})));
              }
              std::copy_n(sum.data(), sum.numel(), want.mutable_data() + s * sum.numel());
            }
            CHECK_CLOSE(ga.detach(), want, 0.0);
          }
        }
}

// ---- batched seeds ----

BOOST_AUTO_TEST_CASE(batched_seeds_linalg) {
  Generator gen(9);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{2, 3, 4}, {4, 2}}, {{3, 4}, {2, 4, 2}}, {{2, 1, 3, 4}, {5, 4, 2}}, {{2, 3}, {3, 4}},
      {{3}, {3, 2}},       {{2, 3}, {3}},       {{3}, {3}},                {{2, 3, 4}, {2, 4, 2}},
      {{2, 1, 3, 4}, {1, 2, 4, 2}}, {{3}, {2, 3, 2}}};
  for (const auto& [sa, sb] : cases)
    check_batched_seeds("matmul " + to_string(sa) + " @ " + to_string(sb), kMatmul, {normal(sa, gen), normal(sb, gen)});
  // a nonlinear consumer so that the second-order terms in the inputs do not vanish
  check_batched_seeds("tanh(matmul [2,3,4]@[4,2])",
                      [](const std::vector<Tensor>& t) { return hesse::tanh(matmul(t[0], t[1])); },
                      {normal({2, 3, 4}, gen), normal({4, 2}, gen)});
  const Tensor t = normal({2, 3, 4}, gen);
  check_batched_seeds("permute", [](const std::vector<Tensor>& x) { return permute(x[0], {2, 0, 1}); }, {t});
  check_batched_seeds("permute(x)^2", [](const std::vector<Tensor>& x) { return square(permute(x[0], {1, 2, 0})); },
                      {t});
  check_batched_seeds("transpose", [](const std::vector<Tensor>& x) { return transpose(x[0]); }, {t});
  check_batched_seeds("trace", [](const std::vector<Tensor>& x) { return trace(x[0]); }, {normal({3, 3}, gen)});
  check_batched_seeds("outer", [](const std::vector<Tensor>& x) { return outer(x[0], x[1]); },
                      {normal({3}, gen), normal({2}, gen)});
  check_batched_seeds("dot", [](const std::vector<Tensor>& x) { return dot(x[0], x[1]); },
                      {normal({3}, gen), normal({3}, gen)});
}
