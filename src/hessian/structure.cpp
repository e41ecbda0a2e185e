// Which blocks of a Hessian can be nonzero, read off the tape. H = ∂g/∂θ for
// the recorded gradient g = ∂y/∂θ, so block (P, Q) = ∂g[P]/∂θ_Q is zero, exactly,
// when θ_Q is not a leaf of g[P]'s graph: no path means no dependence.
//
// Tensor-level paths over-report: a loss gradient ∂L/∂y is one tensor, so
// every parameter's gradient reaches every other through it, even where each
// entry of y depends on one parameter only (MimoModel under MSE). So the
// blocks the tape cannot rule out are probed: one batched backward pass with
// random Gaussian seeds gives H_PQ v_Q for every pair. Element-level structure
// (a slice that never reads an entry, a product with a zero) produces exact
// floating-point zeros, while a nonzero block maps a random v_Q to exactly
// zero with probability 0; two probes per block make a coincidence twice as
// impossible.
#include <algorithm>
#include <iomanip>
#include <sstream>
#include <unordered_map>

#include "hesse/curvature.hpp"
#include "request.hpp"

namespace hesse {

using namespace detail;

namespace detail {

void walk_tape(const std::vector<Tensor>& roots, const std::function<void(const Node&)>& on_node,
               const std::function<void(const TensorImpl*)>& on_leaf,
               const std::function<bool(const Node&)>& keep_out) {
  const std::uint64_t visited = new_epoch();
  std::vector<Node*> stack;
  for (const Tensor& r : roots) {
    if (!r.defined() || !r.requires_grad()) continue;
    if (r.grad_fn())
      stack.push_back(r.grad_fn().get());
    else
      on_leaf(r.impl().get());  // a gradient that is a parameter itself
  }
  while (!stack.empty()) {  // iterative: tapes can be deep
    Node* n = stack.back();
    stack.pop_back();
    if (keep_out && keep_out(*n)) continue;
    if (n->epoch == visited) continue;
    n->epoch = visited;
    on_node(*n);
    for (const Edge& e : n->edges)
      if (e.node)
        stack.push_back(e.node.get());
      else if (e.leaf)
        on_leaf(e.leaf.get());
  }
}

std::vector<Tensor> first_gradient(const Tensor& y, const Selection& sel, const Tensor& seeds) {
  if (!y.requires_grad()) return std::vector<Tensor>(sel.params.size());
  return recorded_grad(y, sel.params, seeds.defined() ? seeds : ones(y.shape()),
                       seeds.defined() && seeds.ndim() > y.ndim());
}

namespace {

constexpr std::size_t kProbes = 2;

// Clears the candidate blocks (P, Q) whose random products H_PQ v_Q vanish.
// g: the first-level gradient recorded with random seeds.
void probe_blocks(const Selection& sel, const std::vector<Tensor>& g, const std::vector<bool>& candidate,
                  std::vector<bool>& seen_nonzero, Generator& gen) {
  const std::size_t P = sel.params.size();
  std::vector<Tensor> outputs, seeds;
  const std::size_t k = kProbes * P;  // seed row j probes column block q = j / kProbes
  for (std::size_t q = 0; q < P; ++q) {
    if (!g[q].defined() || !g[q].requires_grad()) continue;
    Tensor s = zeros(concat_shape({k}, sel.params[q].shape()));
    for (std::size_t r = 0; r < kProbes; ++r)
      for (std::size_t i = 0; i < sel.sizes[q]; ++i)
        s.mutable_data()[(q * kProbes + r) * sel.sizes[q] + i] = gen.normal();
    outputs.push_back(g[q]);
    seeds.push_back(s);
  }
  if (outputs.empty()) return;
  GradOptions o;
  o.allow_unused = true;
  o.retain_graph = true;
  o.batched_grad_outputs = true;
  const std::vector<Tensor> hv = grad(outputs, sel.params, seeds, o);  // hv[p]: [k, P.shape]
  for (std::size_t p = 0; p < P; ++p) {
    if (!hv[p].defined()) continue;
    for (std::size_t j = 0; j < k; ++j) {
      const std::size_t q = j / kProbes;
      if (!candidate[p * P + q]) continue;
      const double* row = hv[p].data() + j * sel.sizes[p];
      if (std::any_of(row, row + sel.sizes[p], [](double v) { return v != 0.0; }))
        seen_nonzero[p * P + q] = seen_nonzero[q * P + p] = true;
    }
  }
}

}  // namespace

std::vector<bool> structure_of(const Selection& sel, const Outputs& outputs) {
  const std::size_t P = sel.params.size();
  std::unordered_map<const TensorImpl*, std::size_t> index;  // leaf -> selected parameter
  for (std::size_t q = 0; q < P; ++q) index[sel.params[q].impl().get()] = q;
  std::vector<bool> nonzero(P * P, false);
  Generator gen(0x5eed);  // fixed: the same request gives the same structure
  outputs([](const Shape&) {},
          [&](const Tensor& y, std::size_t) {
            // random weights seed every entry at once: the graph's shape does
            // not depend on the seed's values, so this is the union over
            // entries, and the probes see a random combination of them
            const std::vector<Tensor> g = first_gradient(y, sel, randn(y.shape(), gen));
            std::vector<bool> on_tape(P * P, false);
            for (std::size_t p = 0; p < P; ++p)
              walk_tape(
                  {g[p]}, [](const Node&) {},
                  [&](const TensorImpl* leaf) {
                    if (auto it = index.find(leaf); it != index.end())
                      on_tape[p * P + it->second] = on_tape[it->second * P + p] = true;  // H is symmetric
                  });
            probe_blocks(sel, g, on_tape, nonzero, gen);
            return true;
          });
  return nonzero;
}

}  // namespace detail

namespace {

HessianStructure structure(const Selection& sel, const Outputs& outputs) {
  return HessianStructure{sel.names, structure_of(sel, outputs)};
}

}  // namespace

bool HessianStructure::nonzero(std::size_t p, std::size_t q) const {
  const std::size_t P = names.size();
  if (p >= P || q >= P || nonzero_blocks.size() != P * P)
    throw IndexError(message("HessianStructure::nonzero", "block (", p, ", ", q, ") is out of range for ", P,
                             " parameters (", nonzero_blocks.size(), " flags)"));
  return nonzero_blocks[p * P + q];
}

bool HessianStructure::nonzero(const std::string& p, const std::string& q) const {
  return nonzero(index_of("HessianStructure::nonzero", names, p), index_of("HessianStructure::nonzero", names, q));
}

std::string HessianStructure::str() const {
  // one row per parameter: 'x' a block that can be nonzero, '.' a structural zero
  std::size_t width = 0;
  for (const std::string& n : names) width = std::max(width, n.size());
  std::ostringstream os;
  os << std::setw(int(width)) << "";
  for (std::size_t q = 0; q < names.size(); ++q) os << ' ' << q;
  os << '\n';
  for (std::size_t p = 0; p < names.size(); ++p) {
    os << std::setw(int(width)) << std::left << names[p] << std::right;
    for (std::size_t q = 0; q < names.size(); ++q)
      os << ' ' << std::setw(int(std::to_string(q).size())) << (nonzero(p, q) ? 'x' : '.');
    os << "  (" << p << ")\n";
  }
  return os.str();
}

HessianStructure loss_hessian_structure(nn::Module& model, const Criterion& criterion,
                                        const std::vector<Tensor>& inputs, const Tensor& target,
                                        const HessianOptions& o) {
  const char* api = "loss_hessian_structure";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return structure(sel, loss_outputs(api, model, criterion, inputs, target));
}

HessianStructure model_hessian_structure(nn::Module& model, const std::vector<Tensor>& inputs,
                                         const HessianOptions& o) {
  const char* api = "model_hessian_structure";
  const Selection sel = select(api, model, o);
  RequestScope scope(model, sel);
  return structure(sel, model_outputs(api, model, inputs, o));
}

}  // namespace hesse
