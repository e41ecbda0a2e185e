// Model and loss Hessians. The gradient is taken once with create_graph; then
// chunks of k identity rows go through its graph as one batched backward pass,
// and each chunk's k Hessian rows are written straight into the result (or,
// for a large one, kept until their matrices are put together band by band
// and streamed out).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <sstream>
#include <unordered_set>

#include "hesse/hessian.hpp"
#include "hesse/io.hpp"
#include "request.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace hesse {

using namespace detail;

namespace {

std::size_t global_limit = std::size_t(4) << 30;

/// The blocks (p, q) that rows reached, P × P (rows arrive on several threads).
class ReachedBlocks {
 public:
  explicit ReachedBlocks(std::size_t P) : P_(P), flags_(new std::atomic<bool>[P * P]) {
    for (std::size_t i = 0; i < P * P; ++i) flags_[i] = false;
  }
  void note(std::size_t p, std::size_t q) { flags_[p * P_ + q].store(true, std::memory_order_relaxed); }
  bool reached(std::size_t p, std::size_t q) const { return flags_[p * P_ + q]; }

 private:
  std::size_t P_;
  std::unique_ptr<std::atomic<bool>[]> flags_;
};

// Sinks writing into the two result layouts. Rows come for the upper blocks
// (p, q >= p) only: complete_matrix completes a matrix (the matrix sink notes
// the blocks its rows reach for it), mirror_dict_blocks a dict, afterwards.
// They write through pointers taken once, on the calling thread: samples'
// rows may arrive on several threads, and a shared Tensor's mutable_data() is
// not for them.
RowSink matrix_sink(double* data, const Selection& sel, ReachedBlocks& reached) {
  return [data, &sel, &reached](const RowBlock& b) {
    reached.note(b.p, b.q);
    const std::size_t n = sel.n, bytes = sel.sizes[b.q] * sizeof(double);
    b.each_row(sel, [&](std::size_t e, std::size_t row, const double* values) {
      std::memcpy(data + e * n * n + (sel.offsets[b.p] + row) * n + sel.offsets[b.q], values, bytes);
    });
  };
}

/// Each block's values, [p * P + q] (null where the dict has no block).
using DictBlocks = std::vector<double*>;

DictBlocks dict_blocks(HessianDict& d, const Selection& sel) {
  const std::size_t P = sel.params.size();
  DictBlocks blocks(P * P, nullptr);
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t q = 0; q < P; ++q)
      if (auto it = d.blocks_.find({sel.names[p], sel.names[q]}); it != d.blocks_.end())
        blocks[p * P + q] = it->second.mutable_data();
  return blocks;
}

RowSink dict_sink(const DictBlocks& blocks, std::size_t base, const Selection& sel) {
  // a block's rows of consecutive seeds are consecutive rows of its values
  return [&blocks, base, &sel](const RowBlock& b) {
    const std::size_t cols = sel.sizes[b.q];
    double* block = blocks[b.p * sel.params.size() + b.q];
    std::memcpy(block + (base * sel.sizes[b.p] + b.first) * cols, b.values.data(), b.k * cols * sizeof(double));
  };
}

// Completes an n × n matrix whose rows reached the blocks `reached` marks:
// an upper block no row reached is zero, and each lower block is the
// transpose of its upper one (zero with diagonal_only). The matrix was never
// cleared: that would be one more pass over memory. On threads, the lower
// blocks are done in stripes of 64 rows, spread over them.
void complete_matrix(double* m, const Selection& sel, const ReachedBlocks& reached, bool diagonal_only,
                     bool on_threads) {
  const std::size_t n = sel.n, P = sel.params.size();
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t q = p; q < P; ++q)
      if (!reached.reached(p, q))
        for (std::size_t r = 0; r < sel.sizes[p]; ++r)
          std::fill_n(m + (sel.offsets[p] + r) * n + sel.offsets[q], sel.sizes[q], 0.0);
  struct Stripe {
    std::size_t p, q, first, rows;  // rows [first, first + rows) of block (q, p), p < q
  };
  constexpr std::size_t kStripeRows = 64;
  std::vector<Stripe> stripes;
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t q = p + 1; q < P; ++q)
      for (std::size_t first = 0; first < sel.sizes[q]; first += kStripeRows)
        stripes.push_back({p, q, first, std::min(kStripeRows, sel.sizes[q] - first)});
  auto lower = [&](std::size_t i) {
    const auto [p, q, first, rows] = stripes[i];
    double* to = m + (sel.offsets[q] + first) * n + sel.offsets[p];
    if (diagonal_only) {
      for (std::size_t r = 0; r < rows; ++r) std::fill_n(to + r * n, sel.sizes[p], 0.0);
      return;
    }
    detail::transpose_into(m + sel.offsets[p] * n + sel.offsets[q] + first, n, sel.sizes[p], rows, to, n);
  };
  if (on_threads) return for_each_part(stripes.size(), lower);
  for (std::size_t i = 0; i < stripes.size(); ++i) lower(i);
}

#if defined(__x86_64__)
// 32-byte streaming stores (16-byte ones drain measurably slower here)
__attribute__((target("avx"))) void stream_lines(double* dst, const double* src, std::size_t count) {
  for (std::size_t i = 0; i < count; i += 4) _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
  _mm_sfence();  // ordered before whatever the caller does next
}
#endif

// dst[0, count) = src[0, count), the whole 64-byte lines of dst stored past
// the cache. A result larger than the caches goes out to memory anyway: a
// plain store would first read each line of it from there.
void stream_copy(double* dst, const double* src, std::size_t count) {
  std::size_t head = count, lines = 0;
#if defined(__x86_64__)
  const std::size_t misalign = reinterpret_cast<std::uintptr_t>(dst) % 64;
  if (misalign % sizeof(double) == 0 && __builtin_cpu_supports("avx")) {
    head = std::min(count, (64 - misalign) % 64 / sizeof(double));
    lines = (count - head) / 8 * 8;
    stream_lines(dst + head, src + head, lines);
  }
#endif
  std::memcpy(dst, src, head * sizeof(double));
  std::memcpy(dst + head + lines, src + head + lines, (count - head - lines) * sizeof(double));
}

// Results larger than this go out to memory past the cache (the cores' own
// caches hold a few MB; the last level is shared). A group of entries whose
// rows take at most kHeldBytes is put together from its rows band by band,
// each band (about kBandBytes) in a buffer that stays in the core's nearest
// cache, and streamed out from there.
constexpr std::size_t kStreamedResultBytes = std::size_t(4) << 20, kHeldBytes = std::size_t(512) << 10,
                      kBandBytes = std::size_t(16) << 10;

/// The rows a group's passes gave, kept as they came until the group's
/// matrices are put together (a copy into a staging matrix cost a tenth of a
/// per-sample Hessian's time).
class HeldRows {
 public:
  explicit HeldRows(const Selection& sel) : sel_(sel), P_(sel.params.size()), blocks_(P_ * P_) {}

  RowSink sink() {
    return [this](const RowBlock& b) { blocks_[b.p * P_ + b.q].push_back(b); };
  }
  bool reached(std::size_t p, std::size_t q) const { return !blocks_[p * P_ + q].empty(); }
  /// f(t, count, values) over the held pieces of block (p, q) that cover the
  /// seeds [begin, end): values holds the rows of the seeds t .. t + count - 1.
  template <class F>
  void each_piece(std::size_t p, std::size_t q, std::size_t begin, std::size_t end, F&& f) const {
    for (const RowBlock& b : blocks_[p * P_ + q]) {
      const std::size_t from = std::max(begin, b.first), to = std::min(end, b.first + b.k);
      if (from < to) f(from, to - from, b.values.data() + (from - b.first) * sel_.sizes[q]);
    }
  }

 private:
  const Selection& sel_;
  std::size_t P_;
  std::vector<std::vector<RowBlock>> blocks_;  // [p * P + q], pieces in seed order
};

/// Copies values out in order to `to`, whole 64-byte lines of it past the
/// cache: the next values are written into room() (up to `room` of them) and
/// send() sends out the lines they complete; finish() sends the rest.
class LineStream {
 public:
  LineStream(double* to, std::size_t room) : to_(to), buffer_(staging_buffer(room + 8)) {}

  double* room() { return buffer_.mutable_data() + carried_; }
  void send(std::size_t count) {
    double* data = buffer_.mutable_data();
    const std::size_t total = carried_ + count;
    const std::size_t line_end = (reinterpret_cast<std::uintptr_t>(to_ + total) % 64) / sizeof(double);
    const std::size_t out = total >= line_end ? total - line_end : 0;  // up to the last whole line
    stream_copy(to_, data, out);
    std::memmove(data, data + out, (total - out) * sizeof(double));
    to_ += out;
    carried_ = total - out;
  }
  void finish() { stream_copy(to_, buffer_.data(), carried_); }  // a last, partial line

 private:
  double* to_;
  Tensor buffer_;
  std::size_t carried_ = 0;
};

/// Writes the n × n Hessians of output entries into a dense result, one
/// group of entries at a time (as hessians_of_entries takes them), each
/// group's matrices completed (unreached blocks zero, lower blocks mirrored)
/// right after their rows arrive, while they are in cache. The result is
/// never cleared, so each line of it is written once; in a large result,
/// each line goes out to memory past the cache.
class MatrixWriter {
 public:
  MatrixWriter(double* result, std::size_t matrices, const Selection& sel, const HessianOptions& o)
      : result_(result),
        sel_(sel),
        o_(o),
        streamed_(saturating_mul(matrices, dense_bytes(sel, 1, false)) >= kStreamedResultBytes) {}

  /// The Hessians of y's entries, as matrices first, first + 1, ... of the result.
  void write(const Tensor& y, std::size_t first) const {
    for (std::size_t e = 0; e < y.numel(); e += kEntryGroup)
      write_group(y, e, std::min(kEntryGroup, y.numel() - e), result_ + (first + e) * sel_.n * sel_.n);
  }

 private:
  void write_group(const Tensor& y, std::size_t first, std::size_t count, double* to) const {
    const std::size_t n = sel_.n;
    if (streamed_ && count * n * n * sizeof(double) <= kHeldBytes) {
      HeldRows held(sel_);
      hessian_rows(y, first, count, sel_, o_, held.sink());
      put_together(held, count, to);
      return;
    }
    ReachedBlocks reached(sel_.params.size());
    hessian_rows(y, first, count, sel_, o_, matrix_sink(to, sel_, reached));
    for (std::size_t e = 0; e < count; ++e) complete_matrix(to + e * n * n, sel_, reached, o_.diagonal_only, false);
  }

  // The group's matrices, a band of rows at a time, each streamed out once put together.
  void put_together(const HeldRows& held, std::size_t count, double* to) const {
    const std::size_t n = sel_.n;
    const std::size_t band = std::max<std::size_t>(4, kBandBytes / (n * sizeof(double)) / 4 * 4);
    LineStream out(to, band * n);
    for (std::size_t e = 0; e < count; ++e)
      for (std::size_t i0 = 0; i0 < n; i0 += band) {
        const std::size_t i1 = std::min(n, i0 + band);
        double* rows = out.room();  // rows i0 .. i1 - 1 of matrix e
        for (std::size_t p = 0; p < sel_.params.size(); ++p) {
          const std::size_t off = sel_.offsets[p];
          const std::size_t r0 = std::max(i0, off), r1 = std::min(i1, off + sel_.sizes[p]);
          for (std::size_t q = 0; r0 < r1 && q < sel_.params.size(); ++q)
            put_block(held, e, p, q, r0 - off, r1 - off, rows + (r0 - i0) * n);
        }
        out.send((i1 - i0) * n);
      }
    out.finish();
  }

  // Rows r0 .. r1 - 1 of parameter p in matrix e, their columns of q, into
  // `rows`: copied from block (p, q >= p), transposed from block (q, p) above
  // a lower one, or zero where no row reached them.
  void put_block(const HeldRows& held, std::size_t e, std::size_t p, std::size_t q, std::size_t r0, std::size_t r1,
                 double* rows) const {
    const std::size_t n = sel_.n, sp = sel_.sizes[p], sq = sel_.sizes[q];
    double* at = rows + sel_.offsets[q];
    if (q >= p && held.reached(p, q)) {
      held.each_piece(p, q, e * sp + r0, e * sp + r1, [&](std::size_t t, std::size_t k, const double* v) {
        double* row = at + (t - e * sp - r0) * n;
        for (std::size_t i = 0; i < k; ++i) std::memcpy(row + i * n, v + i * sq, sq * sizeof(double));
      });
    } else if (q < p && held.reached(q, p)) {  // column c: row c of block (q, p), from its column r0 on
      held.each_piece(q, p, e * sq, e * sq + sq, [&](std::size_t t, std::size_t k, const double* v) {
        detail::transpose_into(v + r0, sp, k, r1 - r0, at + (t - e * sq), n);
      });
    } else {
      for (std::size_t r = 0; r < r1 - r0; ++r) std::fill_n(at + r * n, sq, 0.0);
    }
  }

  double* result_;
  const Selection& sel_;
  const HessianOptions& o_;
  bool streamed_;
};

// The same for the output entries [first, first + count) of a dict.
void mirror_dict_blocks(const DictBlocks& blocks, const Selection& sel, std::size_t first, std::size_t count) {
  const std::size_t P = sel.params.size();
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t q = p + 1; q < P; ++q) {
      const std::size_t sp = sel.sizes[p], sq = sel.sizes[q];
      const double* upper = blocks[p * P + q];
      double* lower = blocks[q * P + p];
      for (std::size_t e = first; e < first + count; ++e)
        detail::transpose_into(upper + e * sp * sq, sq, sp, sq, lower + e * sq * sp, sp);
    }
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
  DictBlocks blocks;
  model_hessians(
      "model_hessian_dict", model, inputs, sel, o,
      [&](const Shape& out_shape) {
        d = empty_dict(sel, out_shape, o.diagonal_only);
        blocks = dict_blocks(d, sel);
      },
      [&](const Tensor& y, std::size_t base) {
        hessians_of_entries(y, sel, o, [&](std::size_t first) { return dict_sink(blocks, base + first, sel); });
        if (!o.diagonal_only) mirror_dict_blocks(blocks, sel, base, y.numel());
      });
  return d;
}

Tensor model_hessian_matrix(nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& o) {
  const Selection sel = select("model_hessian_matrix", model, o);
  RequestScope scope(model, sel);
  Tensor h;
  std::unique_ptr<MatrixWriter> writer;
  model_hessians(
      "model_hessian_matrix", model, inputs, sel, o,
      [&](const Shape& out_shape) {
        h = Tensor::empty(detail::concat_shape(out_shape, {sel.n, sel.n}));
        writer = std::make_unique<MatrixWriter>(h.mutable_data(), numel_of(out_shape), sel, o);
      },
      [&](const Tensor& y, std::size_t base) { writer->write(y, base); });
  return h;
}

// ---- loss Hessians ----

HessianDict loss_hessian_dict(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                              const Tensor& target, const HessianOptions& o) {
  const char* api = "loss_hessian_dict";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  auto run = [&] { return scalar_loss(api, criterion, run_model(api, model, inputs), target); };
  check_memory(api, sel, 1, o);  // before any work
  HessianDict d = empty_dict(sel, {}, o.diagonal_only);
  const DictBlocks blocks = dict_blocks(d, sel);
  rows_on_threads(run, run, sel, o, dict_sink(blocks, 0, sel));
  if (!o.diagonal_only) mirror_dict_blocks(blocks, sel, 0, 1);
  return d;
}

Tensor loss_hessian_matrix(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                           const Tensor& target, const HessianOptions& o) {
  const char* api = "loss_hessian_matrix";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  auto run = [&] { return scalar_loss(api, criterion, run_model(api, model, inputs), target); };
  check_memory(api, sel, 1, o);  // before any work
  Tensor h = Tensor::empty({sel.n, sel.n});
  ReachedBlocks reached(sel.params.size());
  rows_on_threads(run, run, sel, o, matrix_sink(h.mutable_data(), sel, reached));
  complete_matrix(h.mutable_data(), sel, reached, o.diagonal_only, true);
  return h;
}

Tensor batch_loss_hessian_matrix(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                                 const Tensor& target, const HessianOptions& o) {
  const char* api = "batch_loss_hessian_matrix";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  const std::size_t batches = batch_size(api, inputs, target);
  check_memory(api, sel, batches, o);
  Tensor h = Tensor::empty({batches, sel.n, sel.n});
  const MatrixWriter writer(h.mutable_data(), batches, sel, o);
  SampleWork samples(batches, o.progress, [&](const Tensor& loss, std::size_t b) { writer.write(loss, b); });
  for (std::size_t b = 0; b < batches; ++b)
    samples.add(scalar_loss(api, criterion, run_sample(api, model, inputs, b), sample_target(target, b)), b);
  samples.finish();
  return h;
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
  const Tensor loss = scalar_loss(api, criterion, run_model(api, model, inputs), target);
  const bool batched = v.ndim() == 2;
  const Tensor vk = batched ? v : unsqueeze(v, 0);
  ColumnSum out(sel, vk.shape()[0]);
  if (loss.requires_grad()) {  // else the loss does not depend on the selection: H = 0
    const std::vector<Tensor> g = recorded_grad(loss, sel.params);
    // with diagonal_only each parameter's part of v goes through its own gradient alone: the (P, P) blocks
    for (const auto& group : parameter_groups(sel, o.diagonal_only))
      out.add(group, block_grad(pick(g, group), parts_of(vk, sel, group), pick(sel.params, group)), 1.0);
  }
  const Tensor hv = out.result();
  return batched ? hv : reshape(hv, Shape{sel.n});
}

Tensor loss_hessian_diagonal(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                             const Tensor& target, const HessianOptions& options) {
  const char* api = "loss_hessian_diagonal";
  HessianOptions o = options;
  o.diagonal_only = true;  // only (P, P) rows are needed
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  const Tensor loss = scalar_loss(api, criterion, run_model(api, model, inputs), target);
  Tensor diag = zeros({sel.n});
  double* d = diag.mutable_data();
  hessian_rows(loss, 0, 1, sel, o, [&](const RowBlock& b) {
    b.each_row(sel, [&](std::size_t, std::size_t row, const double* v) { d[sel.offsets[b.p] + row] = v[row]; });
  });
  return diag;
}

}  // namespace hesse
