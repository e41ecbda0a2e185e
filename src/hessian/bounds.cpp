// Certified bounds on the sharpness ‖H‖₂ from one streaming pass over the rows.
// Write H = D + O with D the block diagonal and O the off-diagonal blocks.
// Pinching never raises the norm, so ‖D‖₂ ≤ ‖H‖₂; and ‖H‖₂ ≤ ‖D‖₂ + ‖O‖₂ with
// ‖O‖₂ ≤ ‖N‖₂, where N[P, Q] = ‖H_PQ‖_F (zero diagonal), since for a unit x
// split into blocks x_P: |xᵀ O x| ≤ Σ ‖H_PQ‖₂ ‖x_P‖ ‖x_Q‖ ≤ ‖N‖₂.
// Only the diagonal blocks are stored; the others are reduced to their norms
// as their rows go by.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "hesse/curvature.hpp"
#include "request.hpp"

namespace hesse {

using namespace detail;

namespace {

std::vector<SharpnessBounds> bounds(const char* api, const Selection& sel, const HessianOptions& options,
                                    const Outputs& outputs) {
  if (options.diagonal_only)
    throw ValueError(message(api,
                             "the upper bound needs the off-diagonal blocks, which diagonal_only skips; "
                             "for the block-diagonal sharpness alone use loss_sharpness / model_sharpness "
                             "with diagonal_only"));
  const std::size_t P = sel.params.size();
  std::size_t count = 0;
  std::vector<Tensor> diagonal;     // D_P for every entry: [count, size_P, size_P]
  std::vector<double> off_squared;  // Σ over rows of ‖row of H_PQ‖², P < Q: [count, P, P]
  outputs(
      [&](const Shape& lead) {
        count = numel_of(lead);
        // what is stored: the (P, P) blocks only
        check_bytes(api, "storing the diagonal blocks", dense_bytes(sel, count, true), sel, count, options);
        for (std::size_t p = 0; p < P; ++p) diagonal.push_back(zeros({count, sel.sizes[p], sel.sizes[p]}));
        off_squared.assign(count * P * P, 0.0);
      },
      [&](const Tensor& y, std::size_t base) {
        hessians_of_entries(y, sel, options, [&](std::size_t first) -> RowSink {
          return [&, first](const RowBlock& b) {
            const std::size_t p = b.p, q = b.q;
            b.each_row(sel, [&](std::size_t e, std::size_t row, const double* v) {
              const std::size_t entry = base + first + e;
              if (q == p) {
                std::memcpy(diagonal[p].mutable_data() + (entry * sel.sizes[p] + row) * sel.sizes[p], v,
                            sel.sizes[p] * sizeof(double));
                return;
              }
              double s = 0;
              for (std::size_t c = 0; c < sel.sizes[q]; ++c) s += v[c] * v[c];
              off_squared[(entry * P + p) * P + q] += s;
            });
          };
        });
        return true;
      });

  std::vector<Tensor> block_sharpness;  // [count] per parameter
  for (const Tensor& d : diagonal) block_sharpness.push_back(symmetric_sharpness(d));
  std::vector<SharpnessBounds> out(count);
  Tensor n_matrix = zeros({P, P});
  for (std::size_t e = 0; e < count; ++e) {
    SharpnessBounds& b = out[e];
    b.names = sel.names;
    b.block_norms = zeros({P, P});
    double* norms = b.block_norms.mutable_data();
    for (std::size_t p = 0; p < P; ++p) {
      const double* d = diagonal[p].data() + e * sel.sizes[p] * sel.sizes[p];
      double s = 0;
      for (std::size_t i = 0; i < sel.sizes[p] * sel.sizes[p]; ++i) s += d[i] * d[i];
      norms[p * P + p] = std::sqrt(s);
      const double sharpness = block_sharpness[p].data()[e];  // NaN for a block that is not finite: keep it
      b.block_diagonal = std::isnan(sharpness) ? sharpness : std::max(b.block_diagonal, sharpness);
      for (std::size_t q = p + 1; q < P; ++q)
        norms[p * P + q] = norms[q * P + p] = std::sqrt(off_squared[(e * P + p) * P + q]);
    }
    for (std::size_t i = 0; i < P * P; ++i) n_matrix.mutable_data()[i] = i / P == i % P ? 0.0 : norms[i];
    b.lower = b.block_diagonal;
    b.upper = b.block_diagonal + (P > 1 ? symmetric_sharpness(n_matrix).item() : 0.0);
  }
  return out;
}

}  // namespace

SharpnessBounds loss_sharpness_bounds(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                                      const Tensor& target, const HessianOptions& o) {
  const char* api = "loss_sharpness_bounds";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return bounds(api, sel, o, loss_outputs(api, model, criterion, inputs, target)).at(0);
}

std::vector<SharpnessBounds> model_sharpness_bounds(nn::Module& model, const std::vector<Tensor>& inputs,
                                                    const HessianOptions& o) {
  const char* api = "model_sharpness_bounds";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return bounds(api, sel, o, model_outputs(api, model, inputs, o));
}

}  // namespace hesse
