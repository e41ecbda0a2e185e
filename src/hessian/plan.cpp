// The planner: what a Hessian request will cost, from the forward pass and the
// recorded first-level gradient alone (no Hessian row is computed).
//
// Memory model. The gradient graph g = ∂y/∂θ (which reaches back into the
// forward tape) lives for the whole request: first = 8 · E bytes, E = entries
// of every tensor on it. A backward pass over it with k seeds carries, for
// each seed, a gradient of every tensor it visits, plus the temporaries of
// the rules that make them, plus its one-hot seed rows: about
// 8 · (kLiveCopies · E + entries · n) bytes per seed. Working memory at chunk k
// is first + k · per_seed.
#include <algorithm>
#include <sstream>

#include "hesse/curvature.hpp"
#include "request.hpp"

namespace hesse {

using namespace detail;

namespace {

// Copies of the tape a seed keeps alive at once: the incoming gradient, the
// outgoing one, and a rule's temporaries.
constexpr std::size_t kLiveCopies = 3;

const char* storage_name(const char* api, hesse::Storage s) {
  switch (s) {
    case hesse::Storage::dense:
      return "dense";
    case hesse::Storage::diagonal_only:
      return "diagonal_only";
    case hesse::Storage::packed:
      return "packed";
    case hesse::Storage::block_sparse:
      return "block_sparse";
  }
  throw ValueError(message(api, "unknown Storage value ", int(s), " (dense, diagonal_only, packed or block_sparse)"));
}

std::string request_name(const char* api, const char* kind, hesse::Storage s, bool diagonal_only) {
  const char* call = s == hesse::Storage::packed         ? "_hessian_packed"
                     : s == hesse::Storage::block_sparse ? "_hessian_block_sparse"
                                                         : "_hessian_matrix";
  return std::string(kind) + call + " (" + storage_name(api, s) +
         (diagonal_only && s != hesse::Storage::diagonal_only ? ", diagonal_only" : "") + ")";
}

HessianPlan plan(const char* api, const char* kind, const Selection& sel, const HessianOptions& options,
                 hesse::Storage storage, std::size_t budget, const Outputs& outputs) {
  if (budget == 0)  // as max_bytes, 0 would mean the default limit: the plan's options would not hold to it
    throw ValueError(message(api, "the budget must be positive, got 0 bytes"));
  HessianOptions o = options;
  o.diagonal_only = o.diagonal_only || storage == hesse::Storage::diagonal_only;
  HessianPlan plan;
  plan.request = request_name(api, kind, storage, o.diagonal_only);
  plan.storage = storage;
  plan.diagonal_only = o.diagonal_only;
  const std::size_t P = sel.params.size();
  std::vector<bool> blocks(P * P, true);  // the blocks the request computes
  if (storage == hesse::Storage::block_sparse)
    blocks = stored_blocks(sel, outputs, o.diagonal_only);
  else if (o.diagonal_only)
    for (std::size_t i = 0; i < P * P; ++i) blocks[i] = i / P == i % P;

  plan.n = sel.n;
  plan.budget = budget;
  std::size_t group = 1, forward = 1, gradient = 0, rows = 0;
  outputs([&](const Shape& lead) { plan.matrices = numel_of(lead); },
          [&](const Tensor& y, std::size_t) {  // the first output (sample) stands for all
            group = std::min(kEntryGroup, y.numel());
            forward = tape_elements(y);
            if (!y.requires_grad()) return false;  // constant in θ: nothing to push
            // the first level as hessian_rows takes it: one-hot seeds for a group of entries
            Tensor seeds = zeros(concat_shape({group}, y.shape()));
            for (std::size_t e = 0; e < group; ++e) seeds.mutable_data()[e * y.numel() + e] = 1.0;
            const std::vector<Tensor> g = first_gradient(y, sel, seeds);
            walk_tape(
                g, [&](const Node& n) { gradient += numel_of(n.output_shape); }, [](const TensorImpl*) {});
            // rows computed: those of parameters whose gradient depends on θ and
            // that have a wanted block (P, Q ≥ P). (A chunk that mixes them with
            // rows that have nothing to compute carries those too.)
            for (std::size_t p = 0; p < P; ++p) {
              bool any = false;
              for (std::size_t q = p; q < P; ++q) any = any || blocks[p * P + q];
              if (any && g[p].defined() && g[p].requires_grad()) rows += sel.sizes[p];
            }
            return false;
          });

  switch (storage) {
    case hesse::Storage::dense:
    case hesse::Storage::diagonal_only:
      plan.result_bytes = dense_bytes(sel, plan.matrices, o.diagonal_only);
      break;
    case hesse::Storage::packed:
      plan.result_bytes = packed_bytes(sel.n, plan.matrices);
      break;
    case hesse::Storage::block_sparse:
      plan.result_bytes = block_bytes(sel, blocks, plan.matrices);
      break;
  }
  plan.products = saturating_mul(rows, plan.matrices);

  // the largest chunk whose working memory fits what the result leaves of the
  // budget, capped where the request would cap it
  std::size_t engine_rows = group * sel.n;  // rows one backward pass may take
  if (o.diagonal_only) engine_rows = group * *std::max_element(sel.sizes.begin(), sel.sizes.end());
  const std::size_t cap = chunk_of(o, engine_rows, group * forward);
  const std::size_t first = saturating_mul(gradient, sizeof(double));
  const std::size_t per_seed =
      saturating_mul(saturating_add(saturating_mul(kLiveCopies, gradient), group * sel.n), sizeof(double));
  const std::size_t used = saturating_add(plan.result_bytes, first);
  const std::size_t room = budget > used ? budget - used : 0;
  plan.chunk_size = std::max<std::size_t>(1, std::min(cap, room / per_seed));
  plan.working_bytes = saturating_add(first, saturating_mul(plan.chunk_size, per_seed));
  plan.fits = saturating_add(plan.result_bytes, plan.working_bytes) <= budget;
  return plan;
}

}  // namespace

std::string HessianPlan::str() const {
  std::ostringstream os;
  os << request << ": n = " << n << ", " << matrices << " matri" << (matrices == 1 ? "x" : "ces") << "\n"
     << "  result    " << result_bytes << " bytes\n"
     << "  working   " << working_bytes << " bytes at " << chunk_size << " seed" << (chunk_size == 1 ? "" : "s")
     << " per backward pass\n"
     << "  products  " << products << "\n"
     << "  budget    " << budget << " bytes: " << (fits ? "fits" : "does not fit") << "\n";
  return os.str();
}

void HessianPlan::require() const {
  if (fits) return;
  throw MemoryLimitError(message(
      "HessianPlan::require", request, " needs ", saturating_add(result_bytes, working_bytes), " bytes (result ",
      result_bytes, " + working ", working_bytes, " at ", chunk_size, " seed", chunk_size == 1 ? "" : "s",
      " per pass) but the budget is ", budget,
      " bytes; try diagonal_only, a smaller params selection, packed or block_sparse storage, or the matrix-free "
      "operators (loss_hessian_operator with lanczos or hutchinson_trace)"));
}

HessianOptions HessianPlan::options(HessianOptions base) const {
  base.chunk_size = chunk_size;
  base.max_bytes = budget;
  base.diagonal_only = diagonal_only;
  return base;
}

HessianPlan plan_loss_hessian(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                              const Tensor& target, hesse::Storage storage, std::size_t budget_bytes,
                              const HessianOptions& o) {
  const char* api = "plan_loss_hessian";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return plan(api, "loss", sel, o, storage, budget_bytes, loss_outputs(api, model, criterion, inputs, target));
}

HessianPlan plan_model_hessian(nn::Module& model, const std::vector<Tensor>& inputs, hesse::Storage storage,
                               std::size_t budget_bytes, const HessianOptions& o) {
  const char* api = "plan_model_hessian";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return plan(api, "model", sel, o, storage, budget_bytes, model_outputs(api, model, inputs, o));
}

}  // namespace hesse
