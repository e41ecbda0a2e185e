// Linear algebra. matmul is one primitive, op(A) op(B) with transpose flags,
// so that its adjoints are again matmuls read through BLAS's transpose flags
// (no transposed copies), and the rules close over the same primitive:
//   C = A B      dA = g Bᵀ,   dB = Aᵀ g
// Leading dimensions broadcast; k batched seeds become one folded GEMM where
// only A is batched.
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "hesse/profile.hpp"
#include "../detail.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace hesse {
namespace {

std::atomic<std::uint64_t> flops{0};

using detail::make;
using detail::message;

struct MatmulDims {
  std::size_t m, k, n;
  Shape batch;  // broadcast of both operands' leading dims
};

std::size_t rows(const Shape& s, bool t) { return t ? s[s.size() - 1] : s[s.size() - 2]; }
std::size_t cols(const Shape& s, bool t) { return t ? s[s.size() - 2] : s[s.size() - 1]; }
Shape lead(const Shape& s) { return Shape(s.begin(), s.end() - 2); }

MatmulDims matmul_dims(const Tensor& a, const Tensor& b, bool ta, bool tb) {
  const Shape& sa = a.shape();
  const Shape& sb = b.shape();
  if (sa.size() < 2 || sb.size() < 2 || cols(sa, ta) != rows(sb, tb))
    throw ShapeError(message("matmul", "shapes ", to_string(sa), ta ? "ᵀ" : "", " and ", to_string(sb), tb ? "ᵀ" : "",
                             " do not fit (inner dimensions differ)"));
  MatmulDims d{rows(sa, ta), cols(sa, ta), cols(sb, tb), {}};
  try {
    d.batch = detail::broadcast_shapes("matmul", lead(sa), lead(sb));
  } catch (const ShapeError&) {
    throw ShapeError(message("matmul", "batch dimensions of ", to_string(sa), " and ", to_string(sb),
                             " cannot be broadcast"));
  }
  return d;
}

Tensor matmul_t(const Tensor& a, const Tensor& b, bool ta, bool tb, bool defer = false);

constexpr std::size_t kSmallGemm = 512;  // m·n·k up to which a plain loop beats BLAS

// Tiny products (per-sample Hessians are full of them) cost more in BLAS's
// call and packing overhead than in arithmetic: a plain loop does them.
// Each c[i][j] sums its k products in order from 0.0, whichever loop order.

// c[i][j] as dot products. K > 0 fixes k at compile time: the dots of the
// tiniest products (2 × 2 parameter matrices) become straight-line code; and
// c never overlaps a or b, which spares them the overlap tests of vectorised
// loops (those cost more than such products).
template <bool TA, bool TB, std::size_t K = 0>
void dot_gemm(const MatmulDims& d, const double* __restrict a, const double* __restrict b, double* __restrict c) {
  const std::size_t m = d.m, n = d.n, k = K ? K : d.k;
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (std::size_t p = 0; p < k; ++p)
        acc += (TA ? a[p * m + i] : a[i * k + p]) * (TB ? b[j * k + p] : b[p * n + j]);
      c[i * n + j] = acc;
    }
}

// c = op(A) op(B) for 2 × 2 results (examples/mimo_model.hpp is made of them): the
// four sums stay in registers through one loop over p, in the same order.
template <bool TA, bool TB, std::size_t K = 0>
void dot_gemm_2x2(const MatmulDims& d, const double* __restrict a, const double* __restrict b, double* __restrict c) {
  const std::size_t k = K ? K : d.k;
  double c00 = 0.0, c01 = 0.0, c10 = 0.0, c11 = 0.0;
  for (std::size_t p = 0; p < k; ++p) {
    const double a0 = TA ? a[p * 2] : a[p], a1 = TA ? a[p * 2 + 1] : a[k + p];
    const double b0 = TB ? b[p] : b[p * 2], b1 = TB ? b[k + p] : b[p * 2 + 1];
    c00 += a0 * b0;
    c01 += a0 * b1;
    c10 += a1 * b0;
    c11 += a1 * b1;
  }
  c[0] = c00, c[1] = c01, c[2] = c10, c[3] = c11;
}

// Dot products when rows of B are contiguous in p, or when the product is so
// small that the vectorised axpy loop's set-up outweighs its work.
template <bool TB>
bool by_dots(const MatmulDims& d) {
  return TB || d.m * d.n * d.k <= 64;
}

// use(kernel) with the dot kernel for m × n results and k (2 × 2 results in
// registers; k unrolled for 1 to 4); each kernel is a lambda of its own type,
// so that a loop calling it inlines it.
template <bool TA, bool TB, class Use>
void with_dots(std::size_t m, std::size_t n, std::size_t k, Use use) {
  auto kernel = [](auto fixed_k) {
    return [](const MatmulDims& d, const double* a, const double* b, double* c) {
      dot_gemm<TA, TB, decltype(fixed_k)::value>(d, a, b, c);
    };
  };
  auto kernel_2x2 = [](auto fixed_k) {
    return [](const MatmulDims& d, const double* a, const double* b, double* c) {
      dot_gemm_2x2<TA, TB, decltype(fixed_k)::value>(d, a, b, c);
    };
  };
  if (m == 2 && n == 2)
    return k == 2 ? use(kernel_2x2(std::integral_constant<std::size_t, 2>()))
                  : use(kernel_2x2(std::integral_constant<std::size_t, 0>()));
  switch (k) {
    case 1: return use(kernel(std::integral_constant<std::size_t, 1>()));  // outer products
    case 2: return use(kernel(std::integral_constant<std::size_t, 2>()));
    case 3: return use(kernel(std::integral_constant<std::size_t, 3>()));
    case 4: return use(kernel(std::integral_constant<std::size_t, 4>()));
    default: return use(kernel(std::integral_constant<std::size_t, 0>()));
  }
}

template <bool TA, bool TB>
void small_gemm(const MatmulDims& d, const double* a, const double* b, double* c) {
  if (by_dots<TB>(d)) return with_dots<TA, TB>(d.m, d.n, d.k, [&](auto dots) { dots(d, a, b, c); });
  const std::size_t m = d.m, n = d.n, k = d.k;
  for (std::size_t i = 0; i < m; ++i) {  // rows of B are contiguous in j: axpy order, vectorised
    double* ci = c + i * n;
    for (std::size_t j = 0; j < n; ++j) ci[j] = 0.0;
    for (std::size_t p = 0; p < k; ++p) {
      const double aip = TA ? a[p * m + i] : a[i * k + p];
      const double* bp = b + p * n;
      for (std::size_t j = 0; j < n; ++j) ci[j] += aip * bp[j];
    }
  }
}

// k = 1: c = a bᵀ whatever the flags (a and b are vectors either way). For
// small ones (per-sample gradients are full of them) BLAS's packing costs more
// than the product; large ones are store-bound, and BLAS's threads store faster.
// Rows of up to 4 (a seed batch's outer products with a small input) are
// written by a loop with n fixed at compile time, whatever their number: a
// loop over a runtime n that short costs three times as much.
constexpr std::size_t kSmallOuter = 4096;  // m·n
template <std::size_t N = 0>
HESSE_AVX2_CLONE void outer_product(const MatmulDims& d, const double* __restrict a, const double* __restrict b,
                                    double* __restrict c) {
  const std::size_t n = N ? N : d.n;
  for (std::size_t i = 0; i < d.m; ++i)
    for (std::size_t j = 0; j < n; ++j) c[i * n + j] = a[i] * b[j];
}

bool outer_product(const MatmulDims& d, const double* a, const double* b, double* c) {
  switch (d.n) {
    case 2: outer_product<2>(d, a, b, c); return true;
    case 3: outer_product<3>(d, a, b, c); return true;
    case 4: outer_product<4>(d, a, b, c); return true;
    default:
      if (d.m * d.n > kSmallOuter) return false;
      outer_product<0>(d, a, b, c);
      return true;
  }
}

void small_gemm(bool ta, bool tb, const MatmulDims& d, const double* a, const double* b, double* c) {
  if (ta) tb ? small_gemm<true, true>(d, a, b, c) : small_gemm<true, false>(d, a, b, c);
  else tb ? small_gemm<false, true>(d, a, b, c) : small_gemm<false, false>(d, a, b, c);
}

// y = M x for a row-major rows × cols matrix M: one dot product per row,
// four partial sums for instruction-level parallelism. Cols > 0 fixes cols at
// compile time: short rows (seed batches times a small input) then keep x in
// registers; y never overlaps M or x.
template <std::size_t Cols = 0>
HESSE_AVX2_CLONE void gemv_dots(const double* __restrict mat, std::size_t rows, std::size_t cols_,
                                const double* __restrict x, double* __restrict y) {
  if constexpr (Cols >= 2 && Cols <= 4) {  // the same sums, spelled out: x stays in registers
    const double x0 = x[0], x1 = x[1], x2 = x[Cols > 2 ? 2 : 0], x3 = x[Cols > 3 ? 3 : 0];
    for (std::size_t r = 0; r < rows; ++r) {
      const double* row = mat + r * Cols;
      const double s = row[0] * x0 + row[1] * x1;
      if constexpr (Cols == 2) y[r] = s;
      if constexpr (Cols == 3) y[r] = s + row[2] * x2;
      if constexpr (Cols == 4) y[r] = s + (row[2] * x2 + row[3] * x3);
    }
    return;
  }
  const std::size_t cols = Cols ? Cols : cols_;
  for (std::size_t r = 0; r < rows; ++r) {
    const double* row = mat + r * cols;
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    std::size_t c = 0;
    for (; c + 4 <= cols; c += 4) {
      s0 += row[c] * x[c];
      s1 += row[c + 1] * x[c + 1];
      s2 += row[c + 2] * x[c + 2];
      s3 += row[c + 3] * x[c + 3];
    }
    for (; c < cols; ++c) s0 += row[c] * x[c];
    y[r] = (s0 + s1) + (s2 + s3);
  }
}

#if defined(__x86_64__)
// gemv_dots<4> four rows at a time: the same two pairwise sums per row, the
// rows' products added pairwise by hadd and the halves by one shuffle.
__attribute__((target("avx"))) void gemv_rows_of_4(const double* mat, std::size_t rows, const double* x, double* y) {
  const __m256d xs = _mm256_loadu_pd(x);
  std::size_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const double* m = mat + r * 4;
    const __m256d p0 = _mm256_mul_pd(_mm256_loadu_pd(m), xs), p1 = _mm256_mul_pd(_mm256_loadu_pd(m + 4), xs);
    const __m256d p2 = _mm256_mul_pd(_mm256_loadu_pd(m + 8), xs), p3 = _mm256_mul_pd(_mm256_loadu_pd(m + 12), xs);
    const __m256d h01 = _mm256_hadd_pd(p0, p1), h23 = _mm256_hadd_pd(p2, p3);  // [s01(0), s01(1), s23(0), s23(1)]
    _mm256_storeu_pd(y + r, _mm256_add_pd(_mm256_permute2f128_pd(h01, h23, 0x20), _mm256_permute2f128_pd(h01, h23, 0x31)));
  }
  gemv_dots<4>(mat + r * 4, rows - r, 4, x, y + r);
}
#endif

void gemv_dots(const double* mat, std::size_t rows, std::size_t cols, const double* x, double* y) {
  switch (cols) {
    case 2: return gemv_dots<2>(mat, rows, cols, x, y);
    case 3: return gemv_dots<3>(mat, rows, cols, x, y);
    case 4:
#if defined(__x86_64__)
      if (__builtin_cpu_supports("avx")) return gemv_rows_of_4(mat, rows, x, y);
#endif
      return gemv_dots<4>(mat, rows, cols, x, y);
    default: return gemv_dots<0>(mat, rows, cols, x, y);
  }
}

// y = Mᵀ x for a row-major rows × cols matrix M: rows added in turn (vectorised).
HESSE_AVX2_CLONE void gemv_axpy(const double* mat, std::size_t rows, std::size_t cols, const double* x, double* y) {
  for (std::size_t c = 0; c < cols; ++c) y[c] = 0.0;
  for (std::size_t r = 0; r < rows; ++r) {
    const double xr = x[r];
    const double* row = mat + r * cols;
    for (std::size_t c = 0; c < cols; ++c) y[c] += xr * row[c];
  }
}

// (flops are counted once per product, in matmul_kernel: an atomic add per
// tiny GEMM of a batch costs more than the GEMM)
void gemm(bool ta, bool tb, const MatmulDims& d, const double* a, const double* b, double* c) {
  if (d.k == 1 && outer_product(d, a, b, c)) return;
  if (d.m * d.n * d.k <= kSmallGemm) return small_gemm(ta, tb, d, a, b, c);
  // a product with one row or one column is a matrix-vector product: dgemm
  // packs whole panels for it, and OpenBLAS's dgemv starts threads even for
  // small ones (ruinous on a loaded 2-core machine): plain loops do it
  if (d.n == 1) {  // c = op(A) b; b is a contiguous k-vector either way
    if (ta) gemv_axpy(a, d.k, d.m, b, c);
    else gemv_dots(a, d.m, d.k, b, c);
    return;
  }
  if (d.m == 1) {  // cᵀ = op(B)ᵀ aᵀ; a is a contiguous k-vector either way
    if (tb) gemv_dots(b, d.n, d.k, a, c);
    else gemv_axpy(b, d.k, d.n, a, c);
    return;
  }
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(d.m), int(d.n),
              int(d.k), 1.0, a, ta ? int(d.m) : int(d.k), b, tb ? int(d.k) : int(d.n), 0.0, c, int(d.n));
}

// C[i] = op(A) B[i] for a batch of B's and an A of K ≤ 4 columns: A's row
// stays in registers and C[i]'s row is one pass along B[i]'s K rows (as
// dot_gemm sums). Folding would copy every B[i] side by side and C back.
template <bool TA, std::size_t K>
HESSE_AVX2_CLONE void narrow_a_each(const double* __restrict a, const double* __restrict b, double* __restrict c,
                                    std::size_t batches, std::size_t m, std::size_t n) {
  for (std::size_t i = 0; i < batches; ++i)
    for (std::size_t r = 0; r < m; ++r) {
      double ar[K];
      for (std::size_t p = 0; p < K; ++p) ar[p] = TA ? a[p * m + r] : a[r * K + p];
      const double* bi = b + i * K * n;
      double* cr = c + (i * m + r) * n;
      for (std::size_t j = 0; j < n; ++j) {
        double acc = 0.0;
        for (std::size_t p = 0; p < K; ++p) acc += ar[p] * bi[p * n + j];
        cr[j] = acc;
      }
    }
}

template <bool TA>
void narrow_a_each(const MatmulDims& d, const double* a, const double* b, double* c, std::size_t batches) {
  switch (d.k) {
    case 1: return narrow_a_each<TA, 1>(a, b, c, batches, d.m, d.n);
    case 2: return narrow_a_each<TA, 2>(a, b, c, batches, d.m, d.n);
    case 3: return narrow_a_each<TA, 3>(a, b, c, batches, d.m, d.n);
    default: return narrow_a_each<TA, 4>(a, b, c, batches, d.m, d.n);
  }
}

// C[i] = op(A) op(B[i]) for a batch of B's and one A, as one folded GEMM
// (k small GEMMs run ~3× slower than one of the same work):
//   tb:  stack op(B[i])ᵀ = B[i] as rows, D = [B[0]; B[1]; ...] op(A)ᵀ, C[i] = D[i]ᵀ
//   !tb: lay the B[i] side by side, E = op(A) [B[0] B[1] ...], C[i] = E[:, i]
void matmul_shared_a(const Tensor& a, const Tensor& b, bool ta, bool tb, const MatmulDims& d, std::size_t batches,
                     double* c) {
  const std::size_t m = d.m, n = d.n, k = d.k;
  if (tb && m == 1) {  // D[i] is a column: its transpose is the same memory
    gemm(false, !ta, MatmulDims{batches * n, k, m, {}}, b.data(), a.data(), c);
    return;
  }
  Tensor tmp_t = Tensor::empty({batches * m * n});  // pooled: fresh memory is slow to fault in
  double* tmp = tmp_t.mutable_data();
  if (tb) {
    MatmulDims folded{batches * n, k, m, {}};
    gemm(false, !ta, folded, b.data(), a.data(), tmp);  // [batches·n, m]
    detail::transpose_each(tmp, batches, n, m, c);
    return;
  }
  Tensor side_t = Tensor::empty({k * batches * n});  // [k, batches, n]
  double* side = side_t.mutable_data();
  const double* pb = b.data();
  for (std::size_t i = 0; i < batches; ++i)
    for (std::size_t r = 0; r < k; ++r)
      std::copy(pb + (i * k + r) * n, pb + (i * k + r + 1) * n, side + (r * batches + i) * n);
  MatmulDims wide{m, k, batches * n, {}};
  gemm(ta, false, wide, a.data(), side, tmp);  // [m, batches·n]
  for (std::size_t i = 0; i < batches; ++i)
    for (std::size_t r = 0; r < m; ++r)
      std::copy(tmp + (r * batches + i) * n, tmp + (r * batches + i + 1) * n, c + (i * m + r) * n);
}

// C[i] = op(A[i]) op(B[i]) over the broadcast batch, each by `product`.
template <class Product>
void each_of_batch(const Tensor& a, const Tensor& b, const MatmulDims& d, double* pc, Product product) {
  const std::size_t a_mat = d.m * d.k, b_mat = d.k * d.n, c_mat = d.m * d.n;
  const double* pa = a.data();
  const double* pb = b.data();
  detail::for_each_broadcast(d.batch, detail::broadcast_strides(lead(a.shape()), d.batch),
                             detail::broadcast_strides(lead(b.shape()), d.batch),
                             [&](std::size_t io, std::size_t ia, std::size_t ib) {
                               product(d, pa + ia * a_mat, pb + ib * b_mat, pc + io * c_mat);
                             });
}

// use(kernel) with the kernel for many tiny products of dims d, chosen once
// for all of them, so that 2 × 2 products run as inlined straight-line dots
// (per-sample Hessians of small parameter matrices are made of them).
template <bool TA, bool TB, class Use>
void with_tiny_kernel(const MatmulDims& d, Use use) {
  if (by_dots<TB>(d)) return with_dots<TA, TB>(d.m, d.n, d.k, use);
  use([](const MatmulDims& dm, const double* x, const double* y, double* z) { small_gemm<TA, TB>(dm, x, y, z); });
}

template <bool TA, bool TB>
void tiny_batch(const Tensor& a, const Tensor& b, const MatmulDims& d, double* pc) {
  with_tiny_kernel<TA, TB>(d, [&](auto product) { each_of_batch(a, b, d, pc, product); });
}

// out[o] = Σ_e op(X[o, e]) op(Y[o, e]) over `outer` sums of `terms` tiny
// products, X and Y read through strides (in values) over o and e. Each
// product is added into its sum as it is made, in e's order from zero.
template <bool TX, bool TY>
void sums_of_products(const MatmulDims& d, const double* x, std::size_t x_outer, std::size_t x_term,
                      const double* y, std::size_t y_outer, std::size_t y_term, std::size_t outer,
                      std::size_t terms, double* out) {
  const std::size_t size = d.m * d.n;
  with_tiny_kernel<TX, TY>(d, [&](auto product) {
    double term[kSmallGemm];
    for (std::size_t o = 0; o < outer; ++o) {
      double* sum = out + o * size;
      for (std::size_t e = 0; e < terms; ++e) {
        product(d, x + o * x_outer + e * x_term, y + o * y_outer + e * y_term, term);
        for (std::size_t i = 0; i < size; ++i) sum[i] += term[i];
      }
    }
  });
}

// c = op(A) op(B), written into c (batch + [m, n] values).
void matmul_kernel(const Tensor& a, const Tensor& b, bool ta, bool tb, const MatmulDims& d, double* c) {
  const std::size_t batches = numel_of(d.batch);
  if (batches * d.m * d.n == 0) return;
  if (d.k == 0) {
    std::fill_n(c, batches * d.m * d.n, 0.0);
    return;
  }
  flops.fetch_add(2 * std::uint64_t(d.m) * d.n * d.k * batches, std::memory_order_relaxed);
  const std::size_t a_mat = d.m * d.k, b_mat = d.k * d.n, c_mat = d.m * d.n;
  const bool a_batched = numel_of(lead(a.shape())) > 1, b_batched = numel_of(lead(b.shape())) > 1;
  if (!b_batched && !ta) {  // fold A's batch into M: one GEMM
    MatmulDims folded = d;
    folded.m = d.m * batches;
    if (!a_batched) {  // A broadcast over a batch that only B's shape has (of size 1 per dim): loop
      for (std::size_t i = 0; i < batches; ++i) gemm(ta, tb, d, a.data(), b.data(), c + i * c_mat);
      return;
    }
    return gemm(ta, tb, folded, a.data(), b.data(), c);
  }
  // A[i]ᵀ op(B) folds as one GEMM below; when A[i] is a single row it is its
  // own transpose, and the fold copies nothing (outer products of a batch of
  // first-layer gradients with one input row)
  const bool a_each_against_b = a_batched && !b_batched && numel_of(lead(a.shape())) == batches;
  const bool folds_free = a_each_against_b && d.k == 1;
  // a batch of tiny products (per-sample Hessians are full of them): folding
  // costs more in temporaries and copies than the products; loop instead
  if (d.m * d.n * d.k * batches <= 8 * kSmallGemm && !d.batch.empty() && !folds_free) {
    if (ta) tb ? tiny_batch<true, true>(a, b, d, c) : tiny_batch<true, false>(a, b, d, c);
    else tb ? tiny_batch<false, true>(a, b, d, c) : tiny_batch<false, false>(a, b, d, c);
    return;
  }
  if (!a_batched && b_batched && numel_of(lead(b.shape())) == batches) {
    if (!tb && d.k <= 4 && d.m <= 16)
      return ta ? narrow_a_each<true>(d, a.data(), b.data(), c, batches)
                : narrow_a_each<false>(d, a.data(), b.data(), c, batches);
    return matmul_shared_a(a, b, ta, tb, d, batches, c);
  }
  if (a_each_against_b) {
    // C[i] = A[i]ᵀ op(B): transpose each A[i] once, then fold as above
    Tensor at = d.k == 1 ? a : Tensor::empty({batches * a_mat});
    if (d.k > 1) detail::transpose_each(a.data(), batches, d.k, d.m, at.mutable_data());
    MatmulDims folded = d;
    folded.m = d.m * batches;
    return gemm(false, tb, folded, at.data(), b.data(), c);
  }
  // one GEMM per batch entry, operands read through broadcast strides
  const Shape batch = d.batch;
  const Shape sa = detail::broadcast_strides(lead(a.shape()), batch);
  const Shape sb = detail::broadcast_strides(lead(b.shape()), batch);
  if (batch.empty()) return gemm(ta, tb, d, a.data(), b.data(), c);
  detail::for_each_broadcast(batch, sa, sb, [&](std::size_t io, std::size_t ia, std::size_t ib) {
    gemm(ta, tb, d, a.data() + ia * a_mat, b.data() + ib * b_mat, c + io * c_mat);
  });
}

// Deferring costs about a microsecond of bookkeeping, paid in full when the
// value is read at once: only products of ~10 µs and more (m·n·k ≥ 2^18) are
// deferred, so that such a read costs a few percent at most.
constexpr std::size_t kDeferrable = std::size_t(1) << 18;

// op(A) op(B) now, or (defer) when first read: a gradient returned by grad()
// with create_graph is often only differentiated again, never read.
Tensor product(const Tensor& a, const Tensor& b, bool ta, bool tb, const MatmulDims& d, bool defer) {
  const Shape shape = detail::concat_shape(d.batch, {d.m, d.n});
  if (defer && d.m * d.n * d.k * numel_of(d.batch) >= kDeferrable)
    return detail::deferred(shape, {a, b}, [ta, tb, d](const std::vector<Tensor>& in, double* c) {
      matmul_kernel(in[0], in[1], ta, tb, d, c);
    });
  Tensor out = make(shape);
  matmul_kernel(a, b, ta, tb, d, out.mutable_data());
  return out;
}

// dA of C = op(A) op(B) for a matrix A shared by a batch of B's, when no
// graph is recorded: Σ over the batch of g op(B)ᵀ (ta: op(B) gᵀ) made as one
// sum of tiny products per seed, where a batch of products would be made and
// then summed (reduce_grad, in the same order). Undefined when that does not fit.
Tensor shared_matrix_grad(const Tensor& g, const Tensor& b, bool ta, bool tb, const Shape& so, const Shape& a_shape) {
  const Shape& gs = g.shape();
  const Shape& bs = b.shape();
  if (a_shape.size() != 2 || so.size() < 3 || bs.size() != so.size() || gs.size() < so.size() ||
      !std::equal(so.begin(), so.end(), gs.end() - std::ptrdiff_t(so.size())) ||
      !std::equal(bs.begin(), bs.end() - 2, so.begin()) || (is_grad_enabled() && detail::any_requires_grad({g, b})))
    return Tensor();
  // each term: !ta: g_e op(B_e)ᵀ, [m, n] · [n, k]; ta: op(B_e) g_eᵀ, [k, m] · [m, n]
  const std::size_t m = so[so.size() - 2], n = so.back(), terms = numel_of(lead(so));
  const MatmulDims d = ta ? MatmulDims{rows(bs, tb), cols(bs, tb), m, {}} : MatmulDims{m, n, rows(bs, tb), {}};
  if (terms < 2 || d.k == 0 || d.m * d.n * d.k > kSmallGemm) return Tensor();
  const Shape seeds = detail::batch_dims(g, so);
  const std::size_t outer = numel_of(seeds), g_mat = m * n, b_mat = bs[bs.size() - 2] * bs.back();
  Tensor out = zeros(detail::concat_shape(seeds, a_shape));
  flops.fetch_add(2 * std::uint64_t(d.m) * d.n * d.k * outer * terms, std::memory_order_relaxed);
  const double* pg = g.data();
  const double* pb = b.data();
  double* po = out.mutable_data();
  if (ta) {  // op(B_e) g_eᵀ
    if (tb) sums_of_products<true, true>(d, pb, 0, b_mat, pg, terms * g_mat, g_mat, outer, terms, po);
    else sums_of_products<false, true>(d, pb, 0, b_mat, pg, terms * g_mat, g_mat, outer, terms, po);
  } else {  // g_e op(B_e)ᵀ
    if (tb) sums_of_products<false, false>(d, pg, terms * g_mat, g_mat, pb, 0, b_mat, outer, terms, po);
    else sums_of_products<false, true>(d, pg, terms * g_mat, g_mat, pb, 0, b_mat, outer, terms, po);
  }
  return out;
}

// C = op(A) op(B) with op(X) = Xᵀ where flagged. Adjoints:
//   dA = g op(B)ᵀ  (ta: dA = op(B) gᵀ)      dB = op(A)ᵀ g  (tb: dB = gᵀ op(A))
Tensor matmul_t(const Tensor& a, const Tensor& b, bool ta, bool tb, bool defer) {
  const MatmulDims d = matmul_dims(a, b, ta, tb);
  Tensor out = product(a, b, ta, tb, d, defer);
  return detail::record("matmul", out, {a, b}, [a, b, ta, tb, so = out.shape()](const Tensor& g, const Tensor&, Needs needs) {
    Tensor ga = needs[0] ? shared_matrix_grad(g, b, ta, tb, so, a.shape()) : Tensor(), gb;
    if (needs[0] && !ga.defined())
      ga = detail::reduce_grad(ta ? matmul_t(b, g, tb, true, needs.may_defer(0))
                                  : matmul_t(g, b, false, !tb, needs.may_defer(0)),
                               so, a.shape());
    // B shared by a batch of A's (A not broadcast): dB = Σᵢ Aᵢᵀ gᵢ is one
    // product of the batch stacked into rows, with no batched product to sum
    const bool stack_rows = !ta && b.ndim() == 2 && a.ndim() > 2 && lead(a.shape()) == lead(so);
    if (needs[1] && stack_rows) {
      const std::size_t rows = numel_of(lead(so)) * so[so.size() - 2];
      const Tensor a_rows = reshape(a, Shape{rows, a.shape().back()});
      const Tensor g_rows = reshape(g, detail::concat_shape(detail::batch_dims(g, so), {rows, so.back()}));
      gb = tb ? matmul_t(g_rows, a_rows, true, false, needs.may_defer(1))
              : matmul_t(a_rows, g_rows, true, false, needs.may_defer(1));
    } else if (needs[1]) {
      gb = detail::reduce_grad(tb ? matmul_t(g, a, true, ta, needs.may_defer(1))
                                  : matmul_t(a, g, !ta, false, needs.may_defer(1)),
                               so, b.shape());
    }
    return std::vector<Tensor>{ga, gb};
  });
}

}  // namespace

std::uint64_t profile::gemm_flops() { return flops; }
void profile::reset_gemm_flops() { flops = 0; }

// y = x Wᵀ + b through BLAS's transpose flag (no copy of W)
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  if (x.ndim() < 1 || weight.ndim() != 2 || x.shape().back() != weight.shape()[1])
    throw ShapeError(message("linear", "input of shape ", to_string(x.shape()), " does not fit weight of shape ",
                             to_string(weight.shape()), " (expects [..., ", weight.ndim() == 2 ? weight.shape()[1] : 0,
                             "])"));
  if (bias.defined() && (bias.ndim() != 1 || bias.shape()[0] != weight.shape()[0]))
    throw ShapeError(message("linear", "bias of shape ", to_string(bias.shape()), " does not fit weight of shape ",
                             to_string(weight.shape())));
  const Tensor x2 = x.ndim() == 1 ? unsqueeze(x, 0) : x;
  Tensor y = matmul_t(x2, weight, false, true);
  if (x.ndim() == 1) y = squeeze(y, 0);
  return bias.defined() ? y + bias : y;
}

namespace {

// A transposed copy handed to matmul alone, as in matmul(transpose(A), B), is
// read from A through the kernel's transpose flag, the way PyTorch reads its
// .T views: the graph has no transpose at any order of differentiation. Only
// when the caller held no other handle to the copy (taken by value, it is then
// ours alone): no one can ask for gradients through it afterwards. The product
// then saves A itself, as it saves any operand: a graph reads its operands'
// values when it is differentiated (see Tensor::mutable_data).
bool untranspose(Tensor& x) {
  if (x.ndim() < 2 || x.impl().use_count() != 1 || !x.grad_fn() || x.grad_fn()->released) return false;
  const detail::TransposedFrom& from = x.grad_fn()->transposed_from;
  std::shared_ptr<detail::TensorImpl> input = from.input.lock();
  // the copy's edge was recorded while the input required grad; and a write to
  // either since leaves the copy with values the input no longer has
  if (!input || !input->requires_grad || input->storage->writes() != from.input_writes ||
      x.impl()->storage->writes() != from.output_writes)
    return false;
  x = Tensor(std::move(input));
  return true;
}

}  // namespace

Tensor matmul(Tensor a, Tensor b) {
  if (a.ndim() == 0 || b.ndim() == 0)
    throw ShapeError(message("matmul", "0-d operands are not allowed (shapes ", to_string(a.shape()), " and ",
                             to_string(b.shape()), "); use * for scalars"));
  const bool a_vector = a.ndim() == 1, b_vector = b.ndim() == 1;
  if (a.shape().back() != b.shape()[b_vector ? 0 : b.ndim() - 2])
    throw ShapeError(message("matmul", "shapes ", to_string(a.shape()), " and ", to_string(b.shape()),
                             " do not fit (inner dimensions differ)"));
  if (a_vector) a = unsqueeze(a, 0);
  if (b_vector) b = unsqueeze(b, -1);
  const bool ta = untranspose(a), tb = untranspose(b);
  Tensor c = matmul_t(a, b, ta, tb);
  if (b_vector) c = squeeze(c, -1);
  if (a_vector) c = squeeze(c, b_vector ? -1 : -2);
  return c;
}

namespace {

// The trace and its adjoint, over the last two dims (leading dims are seed
// batches). Each is the other's derivative, so the trace costs one op at every
// order, where Σ X ∘ I cost three.
Tensor diagonal_embed(const Tensor& g, std::size_t rows, std::size_t cols);

// Σ_i X[.., i, i]
Tensor diagonal_sum(const Tensor& x) {
  const std::size_t rows = x.shape()[x.ndim() - 2], cols = x.shape()[x.ndim() - 1], d = std::min(rows, cols);
  Tensor out = make(lead(x.shape()));
  const double* in = x.data();
  double* o = out.mutable_data();
  for (std::size_t b = 0; b < out.numel(); ++b) {
    double s = 0.0;
    for (std::size_t i = 0; i < d; ++i) s += in[b * rows * cols + i * cols + i];
    o[b] = s;
  }
  return detail::record("trace", out, {x}, [rows, cols](const Tensor& g, const Tensor&, Needs) {
    return std::vector<Tensor>{diagonal_embed(g, rows, cols)};
  });
}

// G[.., i, i] = g[..], zero elsewhere
Tensor diagonal_embed(const Tensor& g, std::size_t rows, std::size_t cols) {
  Tensor out = zeros(detail::concat_shape(g.shape(), {rows, cols}));
  const double* in = g.data();
  double* o = out.mutable_data();
  for (std::size_t b = 0; b < g.numel(); ++b)
    for (std::size_t i = 0; i < std::min(rows, cols); ++i) o[b * rows * cols + i * cols + i] = in[b];
  return detail::record("trace_backward", out, {g}, [](const Tensor& G, const Tensor&, Needs) {
    return std::vector<Tensor>{diagonal_sum(G)};
  });
}

}  // namespace

// tr(X) = Σ_i X_ii;  d tr / dX = I
Tensor trace(const Tensor& x) {
  if (x.ndim() != 2) throw ShapeError(message("trace", "needs a matrix, got shape ", to_string(x.shape())));
  return diagonal_sum(x);
}

Tensor outer(const Tensor& a, const Tensor& b) {
  if (a.ndim() != 1 || b.ndim() != 1)
    throw ShapeError(message("outer", "needs two vectors, got shapes ", to_string(a.shape()), " and ",
                             to_string(b.shape())));
  return unsqueeze(a, 1) * unsqueeze(b, 0);
}

Tensor dot(const Tensor& a, const Tensor& b) {
  if (a.ndim() != 1 || b.ndim() != 1 || a.numel() != b.numel())
    throw ShapeError(message("dot", "needs two vectors of equal length, got shapes ", to_string(a.shape()), " and ",
                             to_string(b.shape())));
  return sum(a * b);
}

namespace detail {

// Four source rows at a time, so that every destination row gets four
// contiguous values per visit instead of one, over column bands that keep the
// destination lines in cache: 1.4-2.2x the speed of a tiled element loop.
#if defined(__x86_64__)
namespace {

// Columns [c, c1) of four rows at s0 (rows src_stride apart), four columns at
// a time transposed in registers, into four columns at dst; returns the first
// column left (fewer than four).
__attribute__((target("avx"))) std::size_t transpose_4x4s(const double* s0, std::size_t src_stride, std::size_t c,
                                                          std::size_t c1, double* dst, std::size_t dst_stride) {
  const double *s1 = s0 + src_stride, *s2 = s1 + src_stride, *s3 = s2 + src_stride;
  for (; c + 4 <= c1; c += 4) {
    const __m256d r0 = _mm256_loadu_pd(s0 + c), r1 = _mm256_loadu_pd(s1 + c);
    const __m256d r2 = _mm256_loadu_pd(s2 + c), r3 = _mm256_loadu_pd(s3 + c);
    const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);  // columns 0, 2 and 1, 3 of rows 0, 1
    const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);  // the same of rows 2, 3
    double* d = dst + c * dst_stride;
    _mm256_storeu_pd(d, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(d + dst_stride, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(d + 2 * dst_stride, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(d + 3 * dst_stride, _mm256_permute2f128_pd(t1, t3, 0x31));
  }
  return c;
}

}  // namespace
#endif

void transpose_into(const double* src, std::size_t src_stride, std::size_t rows, std::size_t cols, double* dst,
                    std::size_t dst_stride) {
  constexpr std::size_t band = 64;
#if defined(__x86_64__)
  const bool avx = __builtin_cpu_supports("avx");
#endif
  std::size_t r = 0;
  if (rows >= 4)
    for (std::size_t c0 = 0; c0 < cols; c0 += band) {
      const std::size_t c1 = std::min(cols, c0 + band);
      for (r = 0; r + 4 <= rows; r += 4) {
        const double* s0 = src + r * src_stride;
        const double *s1 = s0 + src_stride, *s2 = s1 + src_stride, *s3 = s2 + src_stride;
        std::size_t c = c0;
#if defined(__x86_64__)
        if (avx) c = transpose_4x4s(s0, src_stride, c0, c1, dst + r, dst_stride);
#endif
        for (; c < c1; ++c) {
          double* d = dst + c * dst_stride + r;
          d[0] = s0[c];
          d[1] = s1[c];
          d[2] = s2[c];
          d[3] = s3[c];
        }
      }
    }
  for (; r < rows; ++r)  // the last rows % 4 (all of them for short matrices)
    for (std::size_t c = 0; c < cols; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
}

void transpose_each(const double* src, std::size_t batches, std::size_t rows, std::size_t cols, double* dst) {
  const std::size_t size = rows * cols;
  if (rows == 2 && cols == 2) {  // 2 × 2 ones by the hundred (examples/mimo_model.hpp)
    for (std::size_t i = 0; i < batches; ++i, src += 4, dst += 4)
      dst[0] = src[0], dst[1] = src[2], dst[2] = src[1], dst[3] = src[3];
    return;
  }
  if (rows < 4) {  // short matrices: one flat loop
    for (std::size_t i = 0; i < batches; ++i)
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < cols; ++c) dst[i * size + c * rows + r] = src[i * size + r * cols + c];
    return;
  }
  for (std::size_t i = 0; i < batches; ++i) transpose_into(src + i * size, cols, rows, cols, dst + i * size, rows);
}

}  // namespace detail
}  // namespace hesse
