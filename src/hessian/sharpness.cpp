// Sharpness: the largest |eigenvalue| of each Hessian. Dense Hessians go to
// LAPACK; a request whose dense Hessian would not fit the memory limit switches
// to matrix-free Lanczos on the Hessian operator, and says so.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <iostream>

#include "hesse/curvature.hpp"
#include "hesse/hessian.hpp"
#include "request.hpp"

extern "C" void dsyevr_(const char* jobz, const char* range, const char* uplo, const int* n, double* a,
                        const int* lda, const double* vl, const double* vu, const int* il, const int* iu,
                        const double* abstol, int* m, double* w, double* z, const int* ldz, int* isuppz,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info);

namespace hesse {

using namespace detail;

namespace {

NoticeHandler notice_handler = [](const std::string& text) { std::cerr << text << std::endl; };

void notice(const std::string& text) {
  if (notice_handler) notice_handler(text);
}

// Rethrows e as its own kind of hesse error, with the message `text`.
template <class... Kinds>
[[noreturn]] void rethrow_as_its_kind(const Error& e, const std::string& text) {
  ((dynamic_cast<const Kinds*>(&e) ? throw Kinds(text) : void()), ...);
  throw Error(text);
}

// f() for the sharpness function `api`, which hands its work to a Hessian
// request or operator: an error from there also names `api`, its type kept.
template <class F>
auto handed_on(const char* api, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error& e) {
    rethrow_as_its_kind<MemoryLimitError, ShapeError, ValueError, IndexError, AutogradError, IoError>(
        e, std::string(e.what()) + " [in hesse::" + api + "]");
  }
}

// The dense route would need more than the limit: |λ| of largest magnitude by
// Lanczos on the operator instead.
double matrix_free_sharpness(const char* api, const LinearOperator& op, std::size_t bytes, const HessianOptions& o) {
  LanczosOptions lo;
  lo.which = Which::largest_magnitude;
  const Eigenpairs pair = lanczos(op, lo);
  notice(message(api, "the dense Hessian would need ", bytes, " bytes, over the limit of ", limit_of(o),
                 "; used matrix-free Lanczos instead (", pair.products, " Hessian-vector products, residual ",
                 pair.residuals.data()[0], pair.converged ? ")" : ", NOT converged)"));
  return std::abs(pair.values.data()[0]);
}

OperatorOptions operator_options(const HessianOptions& o) {
  OperatorOptions oo;
  oo.params = o.params;
  oo.block_diagonal = o.diagonal_only;
  return oo;
}

// Dense would not fit and the user allows the switch.
bool too_big(const Selection& sel, std::size_t count, const HessianOptions& o) {
  return o.matrix_free_fallback && dense_bytes(sel, count, o.diagonal_only) > limit_of(o);
}

}  // namespace

NoticeHandler set_notice_handler(NoticeHandler handler) {
  std::swap(handler, notice_handler);
  return handler;
}

Tensor symmetric_sharpness(const Tensor& matrices) {
  if (matrices.ndim() < 2 || matrices.shape()[matrices.ndim() - 1] != matrices.shape()[matrices.ndim() - 2])
    throw ShapeError(message("symmetric_sharpness", "needs square matrices [..., n, n], got ",
                                     to_string(matrices.shape())));
  const int n = int(matrices.shape().back());
  const Shape lead(matrices.shape().begin(), matrices.shape().end() - 2);
  if (n == 0) return zeros(lead);  // no eigenvalues (a parameter with no entries)
  Tensor out = Tensor::empty(lead);
  std::vector<double> a(std::size_t(n) * std::size_t(n)), w(std::max<std::size_t>(std::size_t(n), 1)), z(1);
  std::vector<int> isuppz(2 * std::size_t(std::max(n, 1)));
  for (std::size_t e = 0; e < out.numel(); ++e) {
    const double* m = matrices.data() + e * a.size();
    if (!std::all_of(m, m + a.size(), [](double x) { return std::isfinite(x); })) {
      out.mutable_data()[e] = std::numeric_limits<double>::quiet_NaN();  // LAPACK would fail on it
      continue;
    }
    double extreme = 0.0;
    for (int which : {1, n}) {  // the smallest and the largest eigenvalue
      // LAPACK reads one triangle; a computed Hessian's two differ by round-off
      // (a saturated softmax's can be all round-off): use their mean, (A + Aᵀ)/2
      for (std::size_t i = 0; i < std::size_t(n); ++i)
        for (std::size_t j = 0; j < std::size_t(n); ++j) a[i * n + j] = 0.5 * (m[i * n + j] + m[j * n + i]);
      const char jobz = 'N', range = 'I', uplo = 'U';
      const double vl = 0, vu = 0, abstol = 0;
      int m = 0, info = 0, lwork = -1, liwork = -1, iwork_query = 0;
      double work_query = 0;
      dsyevr_(&jobz, &range, &uplo, &n, a.data(), &n, &vl, &vu, &which, &which, &abstol, &m, w.data(), z.data(), &n,
              isuppz.data(), &work_query, &lwork, &iwork_query, &liwork, &info);
      lwork = int(work_query);
      liwork = iwork_query;
      std::vector<double> work(std::size_t(std::max(lwork, 1)));
      std::vector<int> iwork(std::size_t(std::max(liwork, 1)));
      dsyevr_(&jobz, &range, &uplo, &n, a.data(), &n, &vl, &vu, &which, &which, &abstol, &m, w.data(), z.data(), &n,
              isuppz.data(), work.data(), &lwork, iwork.data(), &liwork, &info);
      if (info != 0) throw Error(message("symmetric_sharpness", "LAPACK dsyevr failed with info = ", info));
      extreme = std::max(extreme, std::abs(w[0]));
    }
    out.mutable_data()[e] = extreme;
  }
  return out;
}

Tensor model_sharpness(nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& o) {
  const char* api = "model_sharpness";
  const Selection sel = select(api, model, o);
  // one Hessian per output entry: the output's shape decides whether dense fits
  const std::size_t batches = output_count(api, inputs, o);
  Shape out_shape;
  {
    NoGradGuard shape_only;
    nn::EvalModeGuard eval(model);
    const Tensor y = o.is_batch ? run_sample(api, model, inputs, 0) : run_model(api, model, inputs);
    if (o.is_batch) check_sample_output(api, y, 0, y.shape());
    out_shape = y.shape();
  }
  const std::size_t per_sample = numel_of(out_shape);
  return handed_on(api, [&] {
    if (!too_big(sel, batches * per_sample, o)) return symmetric_sharpness(model_hessian_matrix(model, inputs, o));
    if (o.is_batch) out_shape = concat_shape({batches}, Shape(out_shape.begin() + 1, out_shape.end()));
    Tensor out = Tensor::empty(out_shape);
    for (std::size_t b = 0; b < batches; ++b) {
      const std::vector<Tensor> x = o.is_batch ? sample(inputs, b) : inputs;
      for (std::size_t e = 0; e < per_sample; ++e) {
        Tensor weights =
            zeros(o.is_batch ? concat_shape({1}, Shape(out_shape.begin() + 1, out_shape.end())) : out_shape);
        weights.mutable_data()[e] = 1.0;
        out.mutable_data()[b * per_sample + e] = matrix_free_sharpness(
            api, model_hessian_operator(model, x, weights, operator_options(o)),
            dense_bytes(sel, batches * per_sample, o.diagonal_only), o);
      }
    }
    return out;
  });
}

double loss_sharpness(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                      const Tensor& target, const HessianOptions& o) {
  const char* api = "loss_sharpness";
  const Selection sel = select(api, model, o);
  return handed_on(api, [&] {
    if (!too_big(sel, 1, o))
      return symmetric_sharpness(loss_hessian_matrix(model, criterion, inputs, target, o)).item();
    return matrix_free_sharpness(api, loss_hessian_operator(model, criterion, inputs, target, operator_options(o)),
                                 dense_bytes(sel, 1, o.diagonal_only), o);
  });
}

Tensor batch_loss_sharpness(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                            const Tensor& target, const HessianOptions& o) {
  const char* api = "batch_loss_sharpness";
  const Selection sel = select(api, model, o);
  const std::size_t batches = batch_size(api, inputs, target);
  return handed_on(api, [&] {
    if (!too_big(sel, batches, o))
      return symmetric_sharpness(batch_loss_hessian_matrix(model, criterion, inputs, target, o));
    Tensor out = Tensor::empty({batches});
    for (std::size_t b = 0; b < batches; ++b) {
      const Tensor t = sample_target(target, b);
      out.mutable_data()[b] = matrix_free_sharpness(
          api, loss_hessian_operator(model, criterion, sample(inputs, b), t, operator_options(o)),
          dense_bytes(sel, batches, o.diagonal_only), o);
    }
    return out;
  });
}

}  // namespace hesse
