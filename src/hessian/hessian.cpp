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
#include "../detail.hpp"

extern "C" void dsyevr_(const char* jobz, const char* range, const char* uplo, const int* n, double* a,
                        const int* lda, const double* vl, const double* vu, const int* il, const int* iu,
                        const double* abstol, int* m, double* w, double* z, const int* ldz, int* isuppz,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info);

namespace hesse {
namespace {

std::size_t global_limit = std::size_t(4) << 30;

// The parameters a request differentiates by, and where each starts in the
// flattened vector θ.
struct Selection {
  std::vector<std::string> names;
  std::vector<Tensor> params;
  std::vector<std::size_t> offsets, sizes;
  std::size_t n = 0;
};

Selection select(const char* api, const nn::Module& model, const HessianOptions& options) {
  const auto all = model.named_parameters();
  Selection sel;
  auto add = [&sel](const std::string& name, const Tensor& t) {
    sel.names.push_back(name);
    sel.params.push_back(t);
    sel.offsets.push_back(sel.n);
    sel.sizes.push_back(t.numel());
    sel.n += t.numel();
  };
  if (options.params.empty()) {
    for (const auto& [name, t] : all)
      if (t.requires_grad()) add(name, t);
    if (sel.n == 0) throw ValueError(detail::message(api, "the model has no trainable parameters"));
    return sel;
  }
  for (const auto& [name, t] : all) {  // keep registration order whatever order the user listed
    if (std::find(options.params.begin(), options.params.end(), name) == options.params.end()) continue;
    if (!t.requires_grad())
      throw ValueError(detail::message(api, "parameter '", name, "' is frozen (requires_grad is false)"));
    add(name, t);
  }
  for (const std::string& want : options.params)
    if (std::find(sel.names.begin(), sel.names.end(), want) == sel.names.end()) {
      std::string known;
      for (const auto& p : all) known += (known.empty() ? "" : ", ") + p.first;
      throw ValueError(detail::message(api, "unknown parameter '", want, "' (parameters: ", known, ")"));
    }
  if (sel.n == 0) throw ValueError(detail::message(api, "the selected parameters hold no entries"));
  return sel;
}

// For the duration of a request: eval mode, and parameters outside the
// selection cut from the tape (their derivatives are never needed).
class RequestScope {
 public:
  RequestScope(nn::Module& model, const Selection& sel) : eval_(model) {
    for (const auto& [name, t] : model.named_parameters())
      if (t.requires_grad() && std::find(sel.names.begin(), sel.names.end(), name) == sel.names.end()) {
        Tensor handle = t;
        handle.requires_grad_(false);
        frozen_.push_back(handle);
      }
  }
  ~RequestScope() {
    for (Tensor& t : frozen_) t.requires_grad_(true);
  }
  RequestScope(const RequestScope&) = delete;
  RequestScope& operator=(const RequestScope&) = delete;

 private:
  nn::EvalModeGuard eval_;
  std::vector<Tensor> frozen_;
};

std::size_t limit_of(const HessianOptions& o) { return o.max_bytes ? o.max_bytes : global_limit; }

// Bytes of the dense result: `count` Hessians of the selection (saturating
// at SIZE_MAX, so that an overflow is refused rather than wrapped).
std::size_t dense_bytes(const Selection& sel, std::size_t count, bool diagonal_only) {
  auto mul = [](std::size_t a, std::size_t b) {
    std::size_t r;
    return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
  };
  auto add = [](std::size_t a, std::size_t b) {
    std::size_t r;
    return __builtin_add_overflow(a, b, &r) ? SIZE_MAX : r;
  };
  std::size_t per = 0;
  if (diagonal_only)
    for (std::size_t s : sel.sizes) per = add(per, mul(s, s));
  else
    per = mul(sel.n, sel.n);
  return mul(mul(per, count), sizeof(double));
}

void check_memory(const char* api, const Selection& sel, std::size_t count, const HessianOptions& o) {
  const std::size_t bytes = dense_bytes(sel, count, o.diagonal_only);
  if (bytes > limit_of(o))
    throw MemoryLimitError(detail::message(
        api, "the dense result needs ", bytes, " bytes (", count, " Hessian", count == 1 ? "" : "s", " of n = ",
        sel.n, " parameters) but the limit is ", limit_of(o),
        " bytes; use diagonal_only, a smaller params selection, or the matrix-free routes "
        "(hessian_vector_product, loss_hessian_diagonal), or raise HessianOptions::max_bytes"));
}

// Entries of every tensor on y's tape: what one seed carries through a backward pass.
std::size_t tape_elements(const Tensor& y) {
  std::size_t total = 0;
  std::vector<const Node*> stack;
  std::unordered_set<const Node*> seen;
  if (y.grad_fn()) stack.push_back(y.grad_fn().get());
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();
    if (!seen.insert(n).second) continue;
    total += numel_of(n->output_shape);
    for (const Edge& e : n->edges)
      if (e.node) stack.push_back(e.node.get());
  }
  return std::max<std::size_t>(total, 1);
}

// Seeds per backward pass: as many as keep one seed's copies of the whole tape
// near 64k entries (512 KB: elementwise passes stay in cache), but at least 8 so that
// products stay GEMM-sized; small problems take all their rows in one pass,
// since there the per-op overhead dominates. The user may choose instead.
std::size_t chunk_of(const HessianOptions& o, std::size_t rows, std::size_t per_seed) {
  const std::size_t k = o.chunk_size ? o.chunk_size : std::max<std::size_t>((std::size_t(1) << 16) / per_seed, 8);
  return std::max<std::size_t>(1, std::min(rows, k));
}

// Receives one Hessian row: output entry `entry` (within the group), row `row`
// of parameter p (flattened), its part against parameter q (sizes[q] values).
// With `mirrored`, the same values are column `row` of block (q, p) instead:
// the Hessian is symmetric, so only blocks q >= p are computed.
using RowSink = std::function<void(std::size_t entry, std::size_t p, std::size_t row, std::size_t q,
                                   const double* values, bool mirrored)>;

// Output entries whose Hessians are computed together: the first-level
// gradient takes all of them as one batch of seeds, and the second level
// pushes (entry, row) pairs through as seeds. Small groups keep the seeds dense.
constexpr std::size_t kEntryGroup = 8;

// Hessians of the entries [first, first + count) of y, reported to sink with
// entry = index - first.
void hessian_rows(const Tensor& y, std::size_t first, std::size_t count, const Selection& sel,
                  const HessianOptions& o, const RowSink& sink) {
  if (!y.requires_grad()) return;  // constant in θ: the Hessians are zero
  const std::size_t per_seed = count * tape_elements(y);
  Tensor entry_seeds = zeros(detail::concat_shape({count}, y.shape()));
  for (std::size_t e = 0; e < count; ++e) entry_seeds.mutable_data()[e * y.numel() + first + e] = 1.0;
  GradOptions first_level;
  first_level.create_graph = true;
  first_level.allow_unused = true;
  first_level.batched_grad_outputs = true;
  const std::vector<Tensor> g = grad({y}, sel.params, {entry_seeds}, first_level);  // g[p]: [count, P.shape]

  GradOptions second_level;
  second_level.retain_graph = true;
  second_level.allow_unused = true;
  second_level.batched_grad_outputs = true;
  // seeds for g[p]: k one-hot rows picking (entry, row of p) pairs
  auto seeds_for = [&](std::size_t p, std::size_t k, const std::vector<std::pair<std::size_t, std::size_t>>& picks) {
    Tensor seeds = zeros(detail::concat_shape({k, count}, sel.params[p].shape()));
    for (std::size_t i = 0; i < k; ++i)
      if (picks[i].second != SIZE_MAX)
        seeds.mutable_data()[(i * count + picks[i].first) * sel.sizes[p] + picks[i].second] = 1.0;
    return seeds;
  };
  auto live = [&](std::size_t p) { return g[p].defined() && g[p].requires_grad(); };

  if (o.diagonal_only) {  // (P, P) blocks only: seeds and derivatives stay within P
    for (std::size_t p = 0; p < sel.params.size(); ++p) {
      if (!live(p)) continue;
      const std::size_t total = count * sel.sizes[p], k_max = chunk_of(o, total, per_seed);
      for (std::size_t t0 = 0; t0 < total; t0 += k_max) {
        const std::size_t k = std::min(k_max, total - t0);
        std::vector<std::pair<std::size_t, std::size_t>> picks(k);
        for (std::size_t i = 0; i < k; ++i) picks[i] = {(t0 + i) / sel.sizes[p], (t0 + i) % sel.sizes[p]};
        const Tensor rows = grad(g[p], sel.params[p], seeds_for(p, k, picks), second_level);
        if (rows.defined())
          for (std::size_t i = 0; i < k; ++i)
            sink(picks[i].first, p, picks[i].second, p, rows.data() + i * sel.sizes[p], false);
      }
    }
    return;
  }
  // full rows: chunks of (entry, global row) pairs; each chunk seeds the g[p]
  // whose rows it touches, and one backward pass gives the blocks (p, q >= p)
  // of those rows: by symmetry the rest are their transposes, and the pass
  // never needs to reach the parameters before p on the tape
  const std::size_t total = count * sel.n, k_max = chunk_of(o, total, per_seed);
  for (std::size_t t0 = 0; t0 < total; t0 += k_max) {
    const std::size_t k = std::min(k_max, total - t0);
    std::vector<Tensor> outputs, seeds;
    std::vector<std::pair<std::size_t, std::size_t>> where(k);  // (p, row in p) of each seed
    for (std::size_t i = 0; i < k; ++i) {
      const std::size_t r = (t0 + i) % sel.n;
      const std::size_t p = std::size_t(std::upper_bound(sel.offsets.begin(), sel.offsets.end(), r) -
                                        sel.offsets.begin()) - 1;
      where[i] = {p, r - sel.offsets[p]};
    }
    for (std::size_t p = 0; p < sel.params.size(); ++p) {
      if (!live(p)) continue;
      std::vector<std::pair<std::size_t, std::size_t>> picks(k, {0, SIZE_MAX});
      bool touched = false;
      for (std::size_t i = 0; i < k; ++i)
        if (where[i].first == p) picks[i] = {(t0 + i) / sel.n, where[i].second}, touched = true;
      if (!touched) continue;
      outputs.push_back(g[p]);
      seeds.push_back(seeds_for(p, k, picks));
    }
    if (outputs.empty()) continue;  // rows of parameters that enter linearly: zero
    std::size_t p_min = sel.params.size();
    for (const auto& w : where) p_min = std::min(p_min, w.first);
    const std::vector<Tensor> wrt(sel.params.begin() + std::ptrdiff_t(p_min), sel.params.end());
    const std::vector<Tensor> rows = grad(outputs, wrt, seeds, second_level);
    for (std::size_t q = p_min; q < sel.params.size(); ++q) {
      const Tensor& block_rows = rows[q - p_min];
      if (!block_rows.defined()) continue;
      for (std::size_t i = 0; i < k; ++i) {
        const auto [p, row] = where[i];
        if (q < p) continue;  // comes from the mirror of block (q, p)
        const double* values = block_rows.data() + i * sel.sizes[q];
        sink((t0 + i) / sel.n, p, row, q, values, false);
        if (q > p) sink((t0 + i) / sel.n, p, row, q, values, true);
      }
    }
  }
}

// Hessians of every entry of y, in groups; entry e of y reports as base + e.
void hessians_of_entries(const Tensor& y, const Selection& sel, const HessianOptions& o,
                         const std::function<RowSink(std::size_t entry)>& sink_from) {
  for (std::size_t first = 0; first < y.numel(); first += kEntryGroup)
    hessian_rows(y, first, std::min(kEntryGroup, y.numel() - first), sel, o, sink_from(first));
}

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

// The batch size shared by every input (and the target, when given).
std::size_t batch_size(const char* api, const std::vector<Tensor>& inputs, const Tensor& target = Tensor()) {
  if (inputs.empty()) throw ValueError(detail::message(api, "no inputs given"));
  std::size_t b = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& x = inputs[i];
    if (!x.defined() || x.ndim() == 0)
      throw ShapeError(detail::message(api, "with is_batch every input needs a leading batch dimension; input ", i,
                                       " has shape ", x.defined() ? to_string(x.shape()) : "undefined"));
    if (i == 0) b = x.shape()[0];
    else if (x.shape()[0] != b)
      throw ShapeError(detail::message(api, "inputs disagree on the batch size: ", to_string(inputs[0].shape()),
                                       " and ", to_string(x.shape())));
  }
  if (b == 0) throw ValueError(detail::message(api, "the batch is empty (input 0 has shape ", to_string(inputs[0].shape()), ")"));
  if (target.defined() && (target.ndim() == 0 || target.shape()[0] != b))
    throw ShapeError(detail::message(api, "target of shape ", to_string(target.shape()),
                                     " does not match the batch size ", b, " of the inputs"));
  return b;
}

std::vector<Tensor> sample(const std::vector<Tensor>& inputs, std::size_t b) {
  std::vector<Tensor> out;
  for (const Tensor& x : inputs) out.push_back(slice(x, 0, std::int64_t(b), std::int64_t(b) + 1));
  return out;
}

std::string shapes_of(const std::vector<Tensor>& inputs) {
  std::string s;
  for (const Tensor& x : inputs) s += (s.empty() ? "" : ", ") + to_string(x.shape());
  return s;
}

// The model on sample b alone; a shape error says which batch it came from.
Tensor run_sample(const char* api, nn::Module& model, const std::vector<Tensor>& inputs, std::size_t b) {
  try {
    return model(sample(inputs, b));
  } catch (const ShapeError& e) {
    throw ShapeError(std::string(e.what()) + " [in hesse::" + api + ", is_batch: sample " + std::to_string(b) +
                     " of inputs of shapes " + shapes_of(inputs) + "]");
  }
}

Tensor scalar_loss(const char* api, const Criterion& criterion, const Tensor& output, const Tensor& target) {
  if (!criterion) throw ValueError(detail::message(api, "no criterion given"));
  Tensor loss = criterion(output, target);
  if (!loss.defined() || loss.numel() != 1)
    throw ShapeError(detail::message(api, "the criterion returned shape ",
                                     loss.defined() ? to_string(loss.shape()) : "undefined",
                                     " where a scalar loss is needed (use reduction sum or mean)"));
  return loss;
}

// One Hessian per entry of the model's output. With is_batch, sample b is run
// alone (batch of one) and its entries fill row b of the result.
template <class MakeResult, class SinkFor>
void model_hessians(const char* api, nn::Module& model, const std::vector<Tensor>& inputs, const Selection& sel,
                    const HessianOptions& o, MakeResult make_result, SinkFor sink_for) {
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
    hessians_of_entries(y, sel, o, [&](std::size_t first) { return sink_for(b * per_sample + first); });
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
      [&](std::size_t entry) { return dict_sink(d, entry, sel); });
  return d;
}

Tensor model_hessian_matrix(nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& o) {
  const Selection sel = select("model_hessian_matrix", model, o);
  RequestScope scope(model, sel);
  Tensor h;
  model_hessians(
      "model_hessian_matrix", model, inputs, sel, o,
      [&](const Shape& out_shape) { h = zeros(detail::concat_shape(out_shape, {sel.n, sel.n})); },
      [&](std::size_t entry) { return matrix_sink(h, entry, sel); });
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
