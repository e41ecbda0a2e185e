// Symmetric packed and block-sparse Hessians. Both are filled from the row
// engine's rows, which are those of the blocks (P, Q ≥ P): the upper triangle.
#include <algorithm>
#include <cstring>

#include "hesse/curvature.hpp"
#include "request.hpp"

namespace hesse {

using namespace detail;

std::size_t detail::packed_bytes(std::size_t n, std::size_t count) {
  return saturating_mul(saturating_mul(saturating_mul(n, saturating_add(n, 1)) / 2, count), sizeof(double));
}

std::size_t detail::block_bytes(const Selection& sel, const std::vector<bool>& blocks, std::size_t count) {
  const std::size_t P = sel.params.size();
  std::size_t per = 0;
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t q = p; q < P; ++q)
      if (blocks[p * P + q]) per = saturating_add(per, saturating_mul(sel.sizes[p], sel.sizes[q]));
  return saturating_mul(saturating_mul(per, count), sizeof(double));
}

std::vector<bool> detail::stored_blocks(const Selection& sel, const Outputs& outputs, bool diagonal_only) {
  const std::size_t P = sel.params.size();
  std::vector<bool> blocks = structure_of(sel, outputs);
  if (diagonal_only)
    for (std::size_t i = 0; i < P * P; ++i) blocks[i] = blocks[i] && i / P == i % P;
  return blocks;
}

namespace {

/// The outputs a storage request visits: a loss's one Hessian, or `count` model outputs.
struct Visit {
  Outputs outputs;
  std::size_t count;
  bool loss;
};

// Every output's Hessian rows, to sink_from(the first entry they are for),
// after start(lead): a model's samples may be spread over threads
// (work_on_outputs), and a loss's one Hessian shares its chunks of rows
// between threads, each with its own copy of the loss's graph (rows_on_threads).
void rows_of_outputs(const Visit& visit, const Selection& sel, const HessianOptions& o, const StartFn& start,
                     const std::function<RowSink(std::size_t first)>& sink_from,
                     const std::vector<bool>* wanted_blocks = nullptr) {
  if (!visit.loss) {
    work_on_outputs(visit.outputs, visit.count, o, start, [&](const Tensor& y, std::size_t base) {
      hessians_of_entries(y, sel, o, [&](std::size_t first) { return sink_from(base + first); }, wanted_blocks);
    });
    return;
  }
  auto run = [&](const StartFn& on_start) {
    Tensor loss;
    visit.outputs(on_start, [&](const Tensor& y, std::size_t) {
      loss = y;
      return false;
    });
    return loss;
  };
  rows_on_threads([&] { return run(start); }, [&] { return run([](const Shape&) {}); }, sel, o, sink_from(0),
                  wanted_blocks);
}

// ---- packed ----

// Row i of the packed upper triangle starts at i n − i (i − 1) / 2 and holds columns i..n−1.
std::size_t packed_index(std::size_t n, std::size_t count, std::size_t i, std::size_t j, std::size_t entry) {
  if (i >= n || j >= n || entry >= count)
    throw IndexError(message("PackedHessian::at", "index (", i, ", ", j, ", entry ", entry, ") out of range for ",
                             count, " matrices of size ", n, " x ", n));
  if (i > j) std::swap(i, j);  // symmetric: (i, j) and (j, i) share one value
  return entry * (n * (n + 1) / 2) + i * n - i * (i - 1) / 2 + (j - i);
}

// Rows may arrive on several threads, each writing values of its own.
PackedHessian packed(const char* api, const Selection& sel, const HessianOptions& o, const Visit& visit) {
  PackedHessian h;
  rows_of_outputs(
      visit, sel, o,
      [&](const Shape& lead) {
        check_bytes(api, "the packed result", packed_bytes(sel.n, numel_of(lead)), sel, numel_of(lead), o);
        h = PackedHessian(sel.n, numel_of(lead));
      },
      [&](std::size_t first) -> RowSink {
        return [&h, &sel, first](const RowBlock& b) {
          b.each_row(sel, [&](std::size_t e, std::size_t row, const double* v) {
            const std::size_t i = sel.offsets[b.p] + row;
            const std::size_t skip = b.q == b.p ? row : 0;  // a (P, P) row: only columns j ≥ i
            std::memcpy(&h.at(i, sel.offsets[b.q] + skip, first + e), v + skip,
                        (sel.sizes[b.q] - skip) * sizeof(double));
          });
        };
      });
  return h;
}

// ---- block-sparse ----

BlockSparseHessian block_sparse(const char* api, const Selection& sel, const HessianOptions& o, const Visit& visit) {
  const std::size_t P = sel.params.size();
  const std::vector<bool> wanted = stored_blocks(sel, visit.outputs, o.diagonal_only);
  BlockSparseHessian h;
  h.names = sel.names;
  h.diagonal_only = o.diagonal_only;
  for (const Tensor& t : sel.params) h.shapes.push_back(t.shape());
  // each stored block's values, [p * P + q]: taken here, since rows may arrive on several threads
  std::vector<double*> values(P * P, nullptr);
  rows_of_outputs(
      visit, sel, o,
      [&](const Shape& lead) {
        check_bytes(api, "the block-sparse result", block_bytes(sel, wanted, numel_of(lead)), sel, numel_of(lead), o);
        h.lead = lead;
        for (std::size_t p = 0; p < P; ++p)
          for (std::size_t q = p; q < P; ++q)
            if (wanted[p * P + q]) {
              Tensor& block = h.blocks[{p, q}] = zeros(concat_shape(concat_shape(lead, h.shapes[p]), h.shapes[q]));
              values[p * P + q] = block.mutable_data();
            }
      },
      [&](std::size_t first) -> RowSink {
        // block (q, p) is not stored: block() transposes (p, q)
        // a block's rows of consecutive seeds are consecutive rows of its values
        return [&values, &sel, P, first](const RowBlock& b) {
          const std::size_t cols = sel.sizes[b.q];
          std::memcpy(values[b.p * P + b.q] + (first * sel.sizes[b.p] + b.first) * cols, b.values.data(),
                      b.k * cols * sizeof(double));
        };
      },
      &wanted);
  return h;
}

}  // namespace

// ---- PackedHessian ----

namespace {
std::size_t packed_values(std::size_t n, std::size_t count) {
  const std::size_t bytes = packed_bytes(n, count);
  if (bytes == SIZE_MAX)  // saturated: no multiple of 8 is SIZE_MAX
    throw ValueError(message("PackedHessian", "the size of ", count, " packed Hessians of n = ", n, " overflows"));
  return bytes / sizeof(double);
}
}  // namespace

PackedHessian::PackedHessian(std::size_t n, std::size_t count)
    : n_(n), count_(count), values_(packed_values(n, count), 0.0) {}

double PackedHessian::at(std::size_t i, std::size_t j, std::size_t entry) const {
  return values_[packed_index(n_, count_, i, j, entry)];
}

double& PackedHessian::at(std::size_t i, std::size_t j, std::size_t entry) {
  return values_[packed_index(n_, count_, i, j, entry)];
}

Tensor PackedHessian::dense() const {
  Tensor out = zeros(count_ == 1 ? Shape{n_, n_} : Shape{count_, n_, n_});
  double* d = out.mutable_data();
  const double* v = values_.data();
  for (std::size_t e = 0; e < count_; ++e, d += n_ * n_)
    for (std::size_t i = 0; i < n_; ++i)
      for (std::size_t j = i; j < n_; ++j, ++v) d[i * n_ + j] = d[j * n_ + i] = *v;
  return out;
}

// ---- BlockSparseHessian ----

Tensor BlockSparseHessian::block(const std::string& p_name, const std::string& q_name) const {
  const std::size_t p = index_of("BlockSparseHessian::block", names, p_name);
  const std::size_t q = index_of("BlockSparseHessian::block", names, q_name);
  const auto it = blocks.find({std::min(p, q), std::max(p, q)});
  if (it == blocks.end()) return zeros(concat_shape(concat_shape(lead, shapes[p]), shapes[q]));
  if (p <= q) return it->second;
  // stored as lead + Q.shape + P.shape: move P's axes in front of Q's
  std::vector<int> axes;
  const std::size_t l = lead.size(), nq = shapes[q].size(), np = shapes[p].size();
  for (std::size_t a = 0; a < l; ++a) axes.push_back(int(a));
  for (std::size_t a = 0; a < np; ++a) axes.push_back(int(l + nq + a));
  for (std::size_t a = 0; a < nq; ++a) axes.push_back(int(l + a));
  return permute(it->second, axes);
}

Tensor BlockSparseHessian::dense() const {
  const char* api = "BlockSparseHessian::dense";
  if (names.size() != shapes.size())
    throw ValueError(message(api, names.size(), " names but ", shapes.size(), " parameter shapes"));
  std::vector<std::size_t> offsets, sizes;
  std::size_t n = 0;
  for (const Shape& s : shapes) offsets.push_back(n), sizes.push_back(numel_of(s)), n += numel_of(s);
  const std::size_t count = numel_of(lead);
  for (const auto& [pq, b] : blocks)  // the fields are public: check them before writing
    if (pq.first >= shapes.size() || pq.second >= shapes.size() || !b.defined() ||
        b.shape() != concat_shape(concat_shape(lead, shapes[pq.first]), shapes[pq.second]))
      throw ShapeError(message(api, "block (", pq.first, ", ", pq.second, ") of shape ",
                               b.defined() ? to_string(b.shape()) : "undefined", " does not fit ", shapes.size(),
                               " parameters with lead ", to_string(lead)));
  Tensor out = zeros(concat_shape(lead, {n, n}));
  for (const auto& [pq, b] : blocks) {
    const auto [p, q] = pq;
    const double* v = b.data();
    for (std::size_t e = 0; e < count; ++e) {
      double* m = out.mutable_data() + e * n * n;
      for (std::size_t r = 0; r < sizes[p]; ++r)
        for (std::size_t c = 0; c < sizes[q]; ++c, ++v) {
          m[(offsets[p] + r) * n + offsets[q] + c] = *v;
          if (p != q) m[(offsets[q] + c) * n + offsets[p] + r] = *v;
        }
    }
  }
  return out;
}

HessianDict BlockSparseHessian::dict() const {
  HessianDict d;
  d.names_ = names;
  for (const std::string& p : names)
    for (const std::string& q : names)
      if (!diagonal_only || p == q) d.blocks_.emplace(std::make_pair(p, q), block(p, q));
  return d;
}

std::size_t BlockSparseHessian::bytes() const {
  std::size_t total = 0;
  for (const auto& kv : blocks) total += kv.second.numel() * sizeof(double);
  return total;
}

// ---- requests ----

PackedHessian loss_hessian_packed(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                                  const Tensor& target, const HessianOptions& o) {
  const char* api = "loss_hessian_packed";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return packed(api, sel, o, {loss_outputs(api, model, criterion, inputs, target), 1, true});
}

PackedHessian model_hessian_packed(nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& o) {
  const char* api = "model_hessian_packed";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return packed(api, sel, o, {model_outputs(api, model, inputs, o), output_count(api, inputs, o), false});
}

BlockSparseHessian loss_hessian_block_sparse(nn::Module& model, const Criterion& criterion,
                                             const std::vector<Tensor>& inputs, const Tensor& target,
                                             const HessianOptions& o) {
  const char* api = "loss_hessian_block_sparse";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return block_sparse(api, sel, o, {loss_outputs(api, model, criterion, inputs, target), 1, true});
}

BlockSparseHessian model_hessian_block_sparse(nn::Module& model, const std::vector<Tensor>& inputs,
                                              const HessianOptions& o) {
  const char* api = "model_hessian_block_sparse";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return block_sparse(api, sel, o, {model_outputs(api, model, inputs, o), output_count(api, inputs, o), false});
}

}  // namespace hesse
