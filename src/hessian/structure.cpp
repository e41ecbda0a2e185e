// Which blocks of a Hessian can be nonzero, read off the tape. H = ∂g/∂θ for
// the recorded gradient g = ∂y/∂θ, so block (P, Q) = ∂g[P]/∂θ_Q is zero, exactly,
// when θ_Q is not a leaf of g[P]'s graph: no path means no dependence. (The
// converse is structural only: a path whose values happen to cancel still
// counts as nonzero.)
#include <algorithm>
#include <iomanip>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "hesse/curvature.hpp"
#include "request.hpp"

namespace hesse {

using namespace detail;

namespace detail {

void walk_tape(const std::vector<Tensor>& roots, const std::function<void(const Node&)>& on_node,
               const std::function<void(const TensorImpl*)>& on_leaf) {
  std::vector<const Node*> stack;
  std::unordered_set<const Node*> seen;
  for (const Tensor& r : roots) {
    if (!r.defined() || !r.requires_grad()) continue;
    if (r.grad_fn())
      stack.push_back(r.grad_fn().get());
    else
      on_leaf(r.impl().get());  // a gradient that is a parameter itself
  }
  while (!stack.empty()) {  // iterative: tapes can be deep
    const Node* n = stack.back();
    stack.pop_back();
    if (!seen.insert(n).second) continue;
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
  GradOptions o;
  o.create_graph = true;
  o.allow_unused = true;
  o.batched_grad_outputs = seeds.defined() && seeds.ndim() > y.ndim();
  return grad({y}, sel.params, {seeds.defined() ? seeds : ones(y.shape())}, o);
}

std::vector<bool> structure_of(const Selection& sel, const Outputs& outputs) {
  const std::size_t P = sel.params.size();
  std::unordered_map<const TensorImpl*, std::size_t> index;  // leaf -> selected parameter
  for (std::size_t q = 0; q < P; ++q) index[sel.params[q].impl().get()] = q;
  std::vector<bool> nonzero(P * P, false);
  outputs([](const Shape&) {},
          [&](const Tensor& y, std::size_t) {
            // ones seed every entry at once: the graph's shape does not depend
            // on the seed's values, so this is the union over entries
            const std::vector<Tensor> g = first_gradient(y, sel);
            for (std::size_t p = 0; p < P; ++p)
              walk_tape(
                  {g[p]}, [](const Node&) {},
                  [&](const TensorImpl* leaf) {
                    if (auto it = index.find(leaf); it != index.end())
                      nonzero[p * P + it->second] = nonzero[it->second * P + p] = true;  // H is symmetric
                  });
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
