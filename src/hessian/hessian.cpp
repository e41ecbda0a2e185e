// Model and loss Hessians. The gradient is taken once with create_graph; then
// chunks of k identity rows go through its graph as one batched backward pass,
// and each chunk's k Hessian rows are written straight into the result.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <unordered_set>

#include "hesse/hessian.hpp"
#include "hesse/io.hpp"
#include "request.hpp"

extern "C" void dsyevr_(const char* jobz, const char* range, const char* uplo, const int* n, double* a,
                        const int* lda, const double* vl, const double* vu, const int* il, const int* iu,
                        const double* abstol, int* m, double* w, double* z, const int* ldz, int* isuppz,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info);

namespace hesse {

using namespace detail;

namespace {

std::size_t global_limit = std::size_t(4) << 30;

// Sinks writing into the two result layouts, from output entry `base` on.
RowSink matrix_sink(Tensor& h, std::size_t base, const Selection& sel) {
  double* data = h.mutable_data();
  return [data, base, &sel](std::size_t e, std::size_t p, std::size_t row, std::size_t q, const double* values,
                            bool mirrored) {
    double* matrix = data + (base + e) * sel.n * sel.n;
    if (!mirrored) {
      std::memcpy(matrix + (sel.offsets[p] + row) * sel.n + sel.offsets[q], values, sel.sizes[q] * sizeof(double));
      return;
    }
    for (std::size_t c = 0; c < sel.sizes[q]; ++c) matrix[(sel.offsets[q] + c) * sel.n + sel.offsets[p] + row] = values[c];
  };
}

RowSink dict_sink(HessianDict& d, std::size_t base, const Selection& sel) {
  return [&d, base, &sel](std::size_t e, std::size_t p, std::size_t row, std::size_t q, const double* values,
                          bool mirrored) {
    if (!mirrored) {
      Tensor& block = d.blocks_.at({sel.names[p], sel.names[q]});
      std::memcpy(block.mutable_data() + ((base + e) * sel.sizes[p] + row) * sel.sizes[q], values,
                  sel.sizes[q] * sizeof(double));
      return;
    }
    double* block = d.blocks_.at({sel.names[q], sel.names[p]}).mutable_data() + (base + e) * sel.sizes[q] * sel.sizes[p];
    for (std::size_t c = 0; c < sel.sizes[q]; ++c) block[c * sel.sizes[p] + row] = values[c];
  };
}

HessianDict empty_dict(const Selection& sel, const Shape& lead, bool diagonal_only) {
  HessianDict d;
  d.names_ = sel.names;
  for (std::size_t p = 0; p < sel.params.size(); ++p)
    for (std::size_t q = 0; q < sel.params.size(); ++q) {
      if (diagonal_only && p != q) continue;
      Shape s = detail::concat_shape(lead, sel.params[p].shape());
      s = detail::concat_shape(s, sel.params[q].shape());
      d.blocks_.emplace(std::make_pair(sel.names[p], sel.names[q]), zeros(s));
    }
  return d;
}

// One Hessian per entry of the model's output. With is_batch, sample b is run
// alone (batch of one) and its entries fill row b of the result. prepare and
// finish(first entry, count) run just before and after each sample's rows, so
// that a result can be cleared and completed while that part is in cache.
template <class MakeResult, class SinkFor, class Prepare, class Finish>
void model_hessians(const char* api, nn::Module& model, const std::vector<Tensor>& inputs, const Selection& sel,
                    const HessianOptions& o, MakeResult make_result, SinkFor sink_for, Prepare prepare,
                    Finish finish) {
  const std::size_t batches = o.is_batch ? batch_size(api, inputs) : 1;
  Shape out_shape;
  std::size_t per_sample = 0;
  for (std::size_t b = 0; b < batches; ++b) {
    const Tensor y = o.is_batch ? run_sample(api, model, inputs, b) : model(inputs);
    if (b == 0) {
      out_shape = y.shape();
      if (o.is_batch) {
        if (y.ndim() == 0 || y.shape()[0] != 1)
          throw ShapeError(detail::message(api, "with is_batch the model's output needs a leading batch dimension; "
                                                "one sample gave shape ",
                                           to_string(y.shape())));
        out_shape[0] = batches;
      }
      per_sample = y.numel();
      check_memory(api, sel, numel_of(out_shape), o);
      make_result(out_shape);
    }
    prepare(b * per_sample, per_sample);
    hessians_of_entries(y, sel, o, [&](std::size_t first) { return sink_for(b * per_sample + first); });
    finish(b * per_sample, per_sample);
  }
}

}  // namespace

void set_hessian_memory_limit(std::size_t bytes) { global_limit = bytes; }
std::size_t hessian_memory_limit() { return global_limit; }

const Tensor& HessianDict::at(const std::string& p, const std::string& q) const {
  auto it = blocks_.find({p, q});
  if (it == blocks_.end())
    throw ValueError("hesse::HessianDict: no block ('" + p + "', '" + q + "')" +
                     (std::find(names_.begin(), names_.end(), p) != names_.end() &&
                              std::find(names_.begin(), names_.end(), q) != names_.end()
                          ? " (diagonal_only keeps only (P, P) blocks)"
                          : ""));
  return it->second;
}

void HessianDict::save(const std::string& folder) const {
  std::error_code ec;
  std::filesystem::create_directories(folder, ec);
  if (ec) throw IoError("hesse::HessianDict::save: cannot create folder '" + folder + "': " + ec.message());
  for (const auto& [key, block] : blocks_) save_npy(folder + "/" + key.first + "__" + key.second + ".npy", block);
}

// ---- model Hessians ----

HessianDict model_hessian_dict(nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& o) {
  const Selection sel = select("model_hessian_dict", model, o);
  RequestScope scope(model, sel);
  HessianDict d;
  model_hessians(
      "model_hessian_dict", model, inputs, sel, o,
      [&](const Shape& out_shape) { d = empty_dict(sel, out_shape, o.diagonal_only); },
      [&](std::size_t entry) { return dict_sink(d, entry, sel); }, [](std::size_t, std::size_t) {},
      [](std::size_t, std::size_t) {});
  return d;
}

Tensor model_hessian_matrix(nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& o) {
  const Selection sel = select("model_hessian_matrix", model, o);
  RequestScope scope(model, sel);
  Tensor h;
  const std::size_t n = sel.n;
  // Each sample's matrices are cleared just before its rows arrive and their
  // lower blocks are copied from the upper ones right after: the result is
  // far larger than the cache, and zeroing it all first, then writing
  // columns of mirrored blocks across it, missed the cache on every row.
  model_hessians(
      "model_hessian_matrix", model, inputs, sel, o,
      [&](const Shape& out_shape) { h = Tensor::empty(detail::concat_shape(out_shape, {n, n})); },
      [&](std::size_t entry) -> RowSink {
        RowSink upper = matrix_sink(h, entry, sel);
        return [upper](std::size_t e, std::size_t p, std::size_t row, std::size_t q, const double* values,
                       bool mirrored) {
          if (!mirrored) upper(e, p, row, q, values, false);  // finish writes the mirrored blocks
        };
      },
      [&](std::size_t first, std::size_t count) {
        std::fill_n(h.mutable_data() + first * n * n, count * n * n, 0.0);
      },
      [&](std::size_t first, std::size_t count) {
        if (o.diagonal_only) return;
        for (std::size_t e = first; e < first + count; ++e) {
          double* m = h.mutable_data() + e * n * n;
          for (std::size_t p = 0; p < sel.params.size(); ++p)
            for (std::size_t q = p + 1; q < sel.params.size(); ++q)  // block (q, p) = block (p, q)ᵀ
              for (std::size_t r = 0; r < sel.sizes[p]; ++r)
                for (std::size_t c = 0; c < sel.sizes[q]; ++c)
                  m[(sel.offsets[q] + c) * n + sel.offsets[p] + r] = m[(sel.offsets[p] + r) * n + sel.offsets[q] + c];
        }
      });
  return h;
}

// ---- loss Hessians ----

HessianDict loss_hessian_dict(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                              const Tensor& target, const HessianOptions& o) {
  const char* api = "loss_hessian_dict";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  const Tensor loss = scalar_loss(api, criterion, model(inputs), target);
  check_memory(api, sel, 1, o);
  HessianDict d = empty_dict(sel, {}, o.diagonal_only);
  hessian_rows(loss, 0, 1, sel, o, dict_sink(d, 0, sel));
  return d;
}

Tensor loss_hessian_matrix(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                           const Tensor& target, const HessianOptions& o) {
  const char* api = "loss_hessian_matrix";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  const Tensor loss = scalar_loss(api, criterion, model(inputs), target);
  check_memory(api, sel, 1, o);
  Tensor h = zeros({sel.n, sel.n});
  hessian_rows(loss, 0, 1, sel, o, matrix_sink(h, 0, sel));
  return h;
}

Tensor batch_loss_hessian_matrix(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                                 const Tensor& target, const HessianOptions& o) {
  const char* api = "batch_loss_hessian_matrix";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  const std::size_t batches = batch_size(api, inputs, target);
  check_memory(api, sel, batches, o);
  Tensor h = zeros({batches, sel.n, sel.n});
  for (std::size_t b = 0; b < batches; ++b) {
    const Tensor t = slice(target, 0, std::int64_t(b), std::int64_t(b) + 1);
    const Tensor loss = scalar_loss(api, criterion, run_sample(api, model, inputs, b), t);
    hessian_rows(loss, 0, 1, sel, o, matrix_sink(h, b, sel));
  }
  return h;
}

// ---- sharpness ----

Tensor symmetric_sharpness(const Tensor& matrices) {
  if (matrices.ndim() < 2 || matrices.shape()[matrices.ndim() - 1] != matrices.shape()[matrices.ndim() - 2])
    throw ShapeError(detail::message("symmetric_sharpness", "needs square matrices [..., n, n], got ",
                                     to_string(matrices.shape())));
  const int n = int(matrices.shape().back());
  const Shape lead(matrices.shape().begin(), matrices.shape().end() - 2);
  Tensor out = Tensor::empty(lead);
  std::vector<double> a(std::size_t(n) * std::size_t(n)), w(std::max<std::size_t>(std::size_t(n), 1)), z(1);
  std::vector<int> isuppz(2 * std::size_t(std::max(n, 1)));
  for (std::size_t e = 0; e < out.numel(); ++e) {
    double extreme = 0.0;
    for (int which : {1, n}) {  // the smallest and the largest eigenvalue
      std::memcpy(a.data(), matrices.data() + e * a.size(), a.size() * sizeof(double));
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
      if (info != 0) throw Error(detail::message("symmetric_sharpness", "LAPACK dsyevr failed with info = ", info));
      extreme = std::max(extreme, std::abs(w[0]));
    }
    out.mutable_data()[e] = extreme;
  }
  return out;
}

Tensor model_sharpness(nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& o) {
  return symmetric_sharpness(model_hessian_matrix(model, inputs, o));
}

double loss_sharpness(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                      const Tensor& target, const HessianOptions& o) {
  return symmetric_sharpness(loss_hessian_matrix(model, criterion, inputs, target, o)).item();
}

Tensor batch_loss_sharpness(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                            const Tensor& target, const HessianOptions& o) {
  return symmetric_sharpness(batch_loss_hessian_matrix(model, criterion, inputs, target, o));
}

// ---- matrix-free ----

Tensor hessian_vector_product(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                              const Tensor& target, const Tensor& v, const HessianOptions& o) {
  const char* api = "hessian_vector_product";
  const Selection sel = select(api, model, o);
  if (!v.defined() || v.ndim() == 0 || v.ndim() > 2 || v.shape().back() != sel.n)
    throw ShapeError(detail::message(api, "v must have shape [", sel.n, "] or [k, ", sel.n, "], got ",
                                     v.defined() ? to_string(v.shape()) : "undefined"));
  RequestScope scope(model, sel);
  const Tensor loss = scalar_loss(api, criterion, model(inputs), target);
  const bool batched = v.ndim() == 2;
  const Tensor vk = batched ? v : unsqueeze(v, 0);
  const std::size_t k = vk.shape()[0];
  if (!loss.requires_grad()) return zeros(v.shape());  // the loss does not depend on the selection
  std::vector<Tensor> seeds, wanted;
  GradOptions first;
  first.create_graph = true;
  first.allow_unused = true;
  const std::vector<Tensor> g = grad({loss}, sel.params, {}, first);
  for (std::size_t p = 0; p < sel.params.size(); ++p) {
    if (!g[p].defined() || !g[p].requires_grad()) continue;
    const Tensor piece = slice(vk, 1, std::int64_t(sel.offsets[p]), std::int64_t(sel.offsets[p] + sel.sizes[p]));
    seeds.push_back(reshape(piece, detail::concat_shape({k}, sel.params[p].shape())));
    wanted.push_back(g[p]);
  }
  std::vector<Tensor> parts;
  std::vector<Tensor> hv;
  if (!wanted.empty()) {
    GradOptions second;
    second.allow_unused = true;
    second.batched_grad_outputs = true;
    hv = grad(wanted, sel.params, seeds, second);
  }
  for (std::size_t p = 0; p < sel.params.size(); ++p)
    parts.push_back(!hv.empty() && hv[p].defined() ? reshape(hv[p], Shape{k, sel.sizes[p]})
                                                   : zeros({k, sel.sizes[p]}));
  Tensor out = concatenate(parts, 1);
  return batched ? out : reshape(out, Shape{sel.n});
}

Tensor loss_hessian_diagonal(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                             const Tensor& target, const HessianOptions& options) {
  const char* api = "loss_hessian_diagonal";
  HessianOptions o = options;
  o.diagonal_only = true;  // only (P, P) rows are needed
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  const Tensor loss = scalar_loss(api, criterion, model(inputs), target);
  Tensor diag = zeros({sel.n});
  hessian_rows(loss, 0, 1, sel, o, [&](std::size_t, std::size_t p, std::size_t row, std::size_t, const double* v, bool) {
    diag.mutable_data()[sel.offsets[p] + row] = v[row];
  });
  return diag;
}

}  // namespace hesse
