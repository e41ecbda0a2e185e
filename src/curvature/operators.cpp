// Curvature operators of a model and a loss: the loss Hessian, the contracted
// model Hessian, the generalized Gauss-Newton matrix and the empirical Fisher,
// applied to blocks of k vectors without forming a matrix.
//
// Every operator has the same two stages. A batch's first-level graph is
// recorded once (create_graph): g = ∇θ s for a scalar s (Hessians), or
// g(u) = Jᵀ u for a dummy cotangent u of the model output z (GGN, Fisher; g is
// linear in u). A product is then batched backward passes through that graph
// with the k vectors as seeds:
//   Hessian   H V      = ∂/∂θ <g, V>
//   GGN       Jᵀ H_z J V:  J V = ∂/∂u <g(u), V>,  H_z (J V) through ∇_z ℓ,  Jᵀ (…) through z
//   Fisher    Jᵀ D J V     with D = Σ_n s_n s_nᵀ, s_n = ∇_{z_n} ℓ_n (per-sample loss gradients)
// so the empirical Fisher Σ_n ∇ℓ_n ∇ℓ_nᵀ = Σ_n Jᵀ s_n s_nᵀ J never needs a
// per-sample pass through the model.
//
// Lifetime and state: an operator holds the model by reference (the model must
// outlive it) and its batches by value (shared handles: changing an input in
// place is not noticed). Graphs are recorded in eval mode with the unselected
// parameters cut from the tape (RequestScope); the model's mode and flags are
// restored before the constructor returns and after every product. With
// keep_graph, each product first compares θ with the values the graphs were
// recorded at (n doubles, cheap beside a product) and records them again when
// they differ, so products always use the model's current parameters.
#include <algorithm>
#include <cstring>

#include "hesse/curvature.hpp"
#include "../hessian/request.hpp"
#include "../progress.hpp"

namespace hesse {

using namespace detail;

namespace {

enum class Kind { hessian, ggn, fisher };

// ---- small helpers (the batched-gradient ones are in request.hpp) ----

Shape trailing(const Tensor& t) { return Shape(t.shape().begin() + 1, t.shape().end()); }

/// Checks a dataset (batches agree on everything but the leading batch dimension)
/// and returns the batch sizes.
std::vector<std::size_t> batch_sizes(const char* api, const std::vector<Batch>& data) {
  if (data.empty()) throw ValueError(message(api, "the dataset is empty (no batches)"));
  std::vector<std::size_t> sizes;
  const Batch& first = data[0];
  for (std::size_t b = 0; b < data.size(); ++b) {
    const Batch& d = data[b];
    try {
      sizes.push_back(batch_size(api, d.inputs, d.target));
    } catch (const ShapeError& e) {
      throw ShapeError(std::string(e.what()) + " [batch " + std::to_string(b) + "]");
    } catch (const ValueError& e) {
      throw ValueError(std::string(e.what()) + " [batch " + std::to_string(b) + "]");
    }
    if (d.inputs.size() != first.inputs.size())
      throw ShapeError(message(api, "batch ", b, " has ", d.inputs.size(), " inputs but batch 0 has ",
                               first.inputs.size()));
    for (std::size_t i = 0; i < d.inputs.size(); ++i)
      if (trailing(d.inputs[i]) != trailing(first.inputs[i]))
        throw ShapeError(message(api, "input ", i, " of batch ", b, " has shape ", to_string(d.inputs[i].shape()),
                                 " but in batch 0 it has shape ", to_string(first.inputs[i].shape()),
                                 "; batches may differ only in their leading (batch) dimension"));
    if (d.target.defined() != first.target.defined() ||
        (d.target.defined() && trailing(d.target) != trailing(first.target)))
      throw ShapeError(message(api, "the target of batch ", b, " has shape ",
                               d.target.defined() ? to_string(d.target.shape()) : "undefined",
                               " but in batch 0 it has shape ",
                               first.target.defined() ? to_string(first.target.shape()) : "undefined",
                               "; batches may differ only in their leading (batch) dimension"));
  }
  return sizes;
}

// ---- one batch's first-level graph ----

struct Graph {
  /// Per parameter: ∇θ s (Hessians) or Jᵀ u (GGN, Fisher), recorded; empty when
  /// the batch's matrix is zero (nothing depends on the selection).
  std::vector<Tensor> g;
  Tensor u;          // the dummy cotangent of z (a leaf of z's shape)
  Tensor z;          // the model output
  Tensor zleaf, gz;  // GGN: z cut from the tape as a leaf, and ∇_z ℓ recorded at it
  Tensor s;          // Fisher: s_n = ∇_{z_n} ℓ_n, one row per sample (values, [B, ...])

  /// The output-space curvature applied to w [k, z.shape]: H_z w (GGN) or D w (Fisher).
  Tensor output_curvature(const Tensor& w) const {
    if (gz.defined()) return block_grad({gz}, {w}, {zleaf})[0];
    // (D w)_n = s_n <s_n, w_n> for every vector of the block
    const std::size_t k = w.shape()[0], B = s.shape()[0], m = s.numel() / B;
    Tensor out = zeros(w.shape());
    for (std::size_t i = 0; i < k; ++i)
      for (std::size_t n = 0; n < B; ++n) {
        const double* sn = s.data() + n * m;
        const double* wn = w.data() + (i * B + n) * m;
        double dot = 0.0;
        for (std::size_t c = 0; c < m; ++c) dot += sn[c] * wn[c];
        double* on = out.mutable_data() + (i * B + n) * m;
        for (std::size_t c = 0; c < m; ++c) on[c] = sn[c] * dot;
      }
    return out;
  }
};

/// ∇_{z_n} ℓ_n for ℓ_n = criterion(z[n:n+1], target[n:n+1]), each sample on its
/// own leaf, stacked: [B, ...] (the gradients of the per-sample losses by the output).
Tensor per_sample_output_grads(const char* api, const Criterion& criterion, const Tensor& z, const Batch& batch) {
  const Tensor& target = batch.target;
  const std::size_t B = batch_size(api, batch.inputs, target);
  if (z.ndim() == 0 || z.shape()[0] != B)
    throw ShapeError(message(api, "per-sample losses need a model output whose leading dimension is the batch (",
                             B, "); the model returned shape ", to_string(z.shape())));
  Tensor s = zeros(z.shape());
  const std::size_t m = z.numel() / B;
  for (std::size_t n = 0; n < B; ++n) {
    Tensor zn = slice(z, 0, std::int64_t(n), std::int64_t(n) + 1).detach();
    zn.requires_grad_(true);
    const Tensor tn = sample_target(target, n);
    const std::string context =
        message(api, "the criterion cannot be evaluated on sample ", n, " alone (output ", to_string(zn.shape()),
                ", target ", tn.defined() ? to_string(tn.shape()) : "undefined", "): ");
    Tensor loss;
    try {
      loss = scalar_loss(api, criterion, zn, tn);
    } catch (const ShapeError& e) {
      throw ShapeError(context + e.what());
    } catch (const Error& e) {
      throw ValueError(context + e.what());
    }
    if (!loss.requires_grad()) continue;  // ℓ_n does not depend on the output
    GradOptions o;
    o.allow_unused = true;
    const Tensor gn = grad(loss, zn, Tensor(), o);
    if (gn.defined()) std::copy(gn.data(), gn.data() + m, s.mutable_data() + n * m);
  }
  return s;
}

// ---- the operator ----

// Everything a product needs, held by value (tensors are shared handles); the
// model by pointer: it must outlive the operator.
struct CurvatureOperator {
  const char* api;
  Kind kind;
  nn::Module* model;
  Criterion criterion;  // undefined for the model Hessian
  Tensor weights;       // the model Hessian's contraction
  std::vector<Batch> data;
  std::vector<double> scale;  // per batch
  Selection sel;
  OperatorOptions options;
  std::vector<std::vector<std::size_t>> groups;
  std::vector<Graph> graphs;  // keep_graph: one per batch
  std::vector<double> theta;  // the parameter values the graphs were recorded at
  // and each parameter's storage with its write count then: an unchanged count
  // proves the values unchanged without comparing n doubles per product
  using WriteStamps = std::vector<std::pair<std::shared_ptr<detail::Storage>, std::uint64_t>>;
  WriteStamps theta_writes;

  WriteStamps write_stamps() const {
    WriteStamps stamps;
    for (const Tensor& p : sel.params) stamps.emplace_back(p.impl()->storage, p.impl()->storage->writes());
    return stamps;
  }

  // The first-level graph of one batch; the caller holds a RequestScope.
  Graph record(const Batch& batch) const {
    EnableGradGuard recording;  // products run under NoGradGuard; graphs must be recorded
    Graph gr;
    const Tensor z = run_model(api, *model, batch.inputs);
    if (kind == Kind::hessian) {
      Tensor s;
      if (criterion) {
        s = scalar_loss(api, criterion, z, batch.target);
      } else {
        if (weights.shape() != z.shape())
          throw ShapeError(message(api, "weights of shape ", to_string(weights.shape()),
                                   " must have the shape of the model's output, ", to_string(z.shape())));
        s = sum(z * weights);
      }
      if (s.requires_grad()) gr.g = recorded_grad(s, sel.params);
      return gr;
    }
    if (kind == Kind::ggn) {
      gr.zleaf = z.detach();
      gr.zleaf.requires_grad_(true);
      const Tensor loss = scalar_loss(api, criterion, gr.zleaf, batch.target);
      if (loss.requires_grad()) gr.gz = recorded_grad(loss, {gr.zleaf})[0];
      if (!gr.gz.defined() || !gr.gz.requires_grad()) return gr;  // ℓ is linear in z: the GGN is zero
    } else {
      gr.s = per_sample_output_grads(api, criterion, z.detach(), batch);
    }
    if (!z.requires_grad()) return gr;  // z does not depend on the selection
    gr.z = z;
    gr.u = zeros(z.shape(), true);
    gr.g = recorded_grad(z, sel.params, gr.u);  // Jᵀ u, linear in u
    return gr;
  }

  /// out += scale · M V for one batch's graph M.
  void add_product(const Graph& gr, const Tensor& V, double w, ColumnSum& out) const {
    if (gr.g.empty()) return;
    for (const auto& group : groups) {
      const std::vector<Tensor> seeds = parts_of(V, sel, group);
      const std::vector<Tensor> outputs = pick(gr.g, group), wrt = pick(sel.params, group);
      if (kind == Kind::hessian) {
        out.add(group, block_grad(outputs, seeds, wrt), w);
        continue;
      }
      const Tensor jv = block_grad(outputs, seeds, {gr.u})[0];  // J V: [k, z.shape]
      if (!jv.defined()) continue;
      const Tensor mjv = gr.output_curvature(jv);
      if (!mjv.defined()) continue;
      out.add(group, block_grad({gr.z}, {mjv}, wrt), w);  // Jᵀ (M J V)
    }
  }

  void record_all() {
    RequestScope scope(*model, sel);
    graphs.clear();  // the old graphs go before the new ones are made
    theta.clear();   // stale until every graph is recorded
    Progress progress(std::string(api) + ": recording", data.size(), data.size() > 1);
    for (std::size_t b = 0; b < data.size(); ++b) {
      graphs.push_back(record(data[b]));
      progress.update(b + 1);
    }
    for (const Tensor& p : sel.params) theta.insert(theta.end(), p.data(), p.data() + p.numel());
    theta_writes = write_stamps();
  }

  /// The parameters changed since the graphs were recorded (an optimiser step, load).
  bool stale() {
    if (theta.size() != sel.n) return true;
    WriteStamps now = write_stamps();
    if (now == theta_writes) return false;
    // written to (an optimiser step, or a write of the same values): compare
    std::size_t at = 0;
    for (const Tensor& p : sel.params) {
      if (std::memcmp(p.data(), theta.data() + at, p.numel() * sizeof(double)) != 0) return true;
      at += p.numel();
    }
    theta_writes = std::move(now);
    return false;
  }

  Tensor apply(const Tensor& V) {
    ColumnSum out(sel, V.shape()[0]);
    Progress progress(std::string(api) + ": product", data.size(), data.size() > 1);
    if (options.keep_graph) {
      if (stale()) record_all();
      for (std::size_t b = 0; b < data.size(); ++b) {
        add_product(graphs[b], V, scale[b], out);
        progress.update(b + 1);
      }
      return out.result();
    }
    RequestScope scope(*model, sel);
    for (std::size_t b = 0; b < data.size(); ++b) {
      add_product(record(data[b]), V, scale[b], out);  // one graph alive at a time
      progress.update(b + 1);
    }
    return out.result();
  }
};

Batch detached(const Batch& b) {
  Batch out;
  for (const Tensor& x : b.inputs) out.inputs.push_back(x.defined() ? x.detach() : x);
  out.target = b.target.defined() ? b.target.detach() : b.target;
  return out;
}

/// The operator of `kind` over `data`. `single` marks the one-batch overloads,
/// whose inputs need no batch dimension (except for the per-sample Fisher).
LinearOperator make_operator(const char* api, const char* name, Kind kind, nn::Module& model,
                             const Criterion& criterion, const Tensor& weights, const std::vector<Batch>& data,
                             bool single, const OperatorOptions& o) {
  auto op = std::make_shared<CurvatureOperator>();
  op->api = api;
  op->kind = kind;
  op->model = &model;
  op->criterion = criterion;
  op->options = o;
  op->sel = select(api, model, o.params);
  op->groups = parameter_groups(op->sel, o.block_diagonal);
  if (weights.defined()) op->weights = weights.detach();  // the model Hessian: no criterion
  else if (!criterion) throw ValueError(message(api, "no criterion given"));
  for (const Batch& b : data) op->data.push_back(detached(b));

  // the scale of each batch's matrix M_b: Hessian and GGN M_b use the criterion's
  // own reduction, weighted B_b / N (dataset_mean) or 1; the Fisher's M_b is
  // Σ_{n ∈ b} ∇ℓ_n ∇ℓ_nᵀ, weighted 1 / N or 1
  if (single && kind != Kind::fisher) {
    op->scale = {1.0};
  } else {
    const std::vector<std::size_t> sizes = batch_sizes(api, op->data);
    std::size_t total = 0;
    for (std::size_t s : sizes) total += s;
    for (std::size_t s : sizes) {
      const double mean_weight = kind == Kind::fisher ? 1.0 / double(total) : double(s) / double(total);
      op->scale.push_back(o.dataset_mean ? mean_weight : 1.0);
    }
  }

  if (o.keep_graph) {
    op->record_all();
  } else {  // check what only a forward pass shows (output shape, criterion) now, not at the first product
    RequestScope scope(model, op->sel);
    (void)op->record(op->data[0]);
  }
  return LinearOperator(op->sel.n, [op](const Tensor& V) { return op->apply(V); }, name);
}

}  // namespace

std::vector<Batch> batches_of(const nn::DataLoader& loader, std::size_t epoch) {
  std::vector<Batch> out;
  for (const nn::Batch& b : loader.batches(epoch)) out.push_back(Batch{{b.x}, b.y});
  return out;
}

LinearOperator loss_hessian_operator(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                                     const Tensor& target, const OperatorOptions& o) {
  return make_operator("loss_hessian_operator", "loss_hessian", Kind::hessian, model, criterion, Tensor(),
                       {Batch{inputs, target}}, true, o);
}

LinearOperator loss_hessian_operator(nn::Module& model, const Criterion& criterion, const std::vector<Batch>& data,
                                     const OperatorOptions& o) {
  return make_operator("loss_hessian_operator", "loss_hessian", Kind::hessian, model, criterion, Tensor(), data,
                       false, o);
}

LinearOperator model_hessian_operator(nn::Module& model, const std::vector<Tensor>& inputs, const Tensor& weights,
                                      const OperatorOptions& o) {
  const char* api = "model_hessian_operator";
  if (!weights.defined()) throw ValueError(message(api, "weights are undefined; pass a tensor of the output's shape"));
  return make_operator(api, "model_hessian", Kind::hessian, model, Criterion(), weights, {Batch{inputs, Tensor()}},
                       true, o);
}

LinearOperator ggn_operator(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                            const Tensor& target, const OperatorOptions& o) {
  return make_operator("ggn_operator", "ggn", Kind::ggn, model, criterion, Tensor(), {Batch{inputs, target}}, true, o);
}

LinearOperator ggn_operator(nn::Module& model, const Criterion& criterion, const std::vector<Batch>& data,
                            const OperatorOptions& o) {
  return make_operator("ggn_operator", "ggn", Kind::ggn, model, criterion, Tensor(), data, false, o);
}

LinearOperator empirical_fisher_operator(nn::Module& model, const Criterion& criterion,
                                         const std::vector<Tensor>& inputs, const Tensor& target,
                                         const OperatorOptions& o) {
  return make_operator("empirical_fisher_operator", "empirical_fisher", Kind::fisher, model, criterion, Tensor(),
                       {Batch{inputs, target}}, true, o);
}

LinearOperator empirical_fisher_operator(nn::Module& model, const Criterion& criterion, const std::vector<Batch>& data,
                                         const OperatorOptions& o) {
  return make_operator("empirical_fisher_operator", "empirical_fisher", Kind::fisher, model, criterion, Tensor(),
                       data, false, o);
}

// ∇_θ (vᵀ H v): the product H v is taken with create_graph, so that the scalar
// vᵀ H v is itself on the tape and has a gradient.
Tensor third_order_directional(nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                               const Tensor& target, const Tensor& v, const OperatorOptions& o) {
  const char* api = "third_order_directional";
  const Selection sel = select(api, model, o.params);
  if (!v.defined() || v.ndim() != 1 || v.shape()[0] != sel.n)
    throw ShapeError(message(api, "v must have shape [", sel.n, "] (the selected parameters), got ",
                             v.defined() ? to_string(v.shape()) : "undefined"));
  const Tensor V = reshape(v.detach(), Shape{1, sel.n});
  RequestScope scope(model, sel);
  EnableGradGuard recording;
  const Tensor loss = scalar_loss(api, criterion, run_model(api, model, inputs), target);
  ColumnSum out(sel, 1);
  if (!loss.requires_grad()) return reshape(out.result(), Shape{sel.n});
  const std::vector<Tensor> g = recorded_grad(loss, sel.params);
  Tensor s;  // vᵀ H v (only the (P, P) blocks with block_diagonal)
  for (const auto& group : parameter_groups(sel, o.block_diagonal)) {
    const std::vector<Tensor> seeds = parts_of(V, sel, group);
    const std::vector<Tensor> hv = block_grad(pick(g, group), seeds, pick(sel.params, group), true);
    for (std::size_t j = 0; j < group.size(); ++j)
      if (hv[j].defined()) s = s.defined() ? s + sum(hv[j] * seeds[j]) : sum(hv[j] * seeds[j]);
  }
  if (s.defined() && s.requires_grad()) {
    GradOptions go;
    go.allow_unused = true;
    const std::vector<Tensor> d = grad({s}, sel.params, {}, go);
    std::vector<std::size_t> all(sel.params.size());
    for (std::size_t p = 0; p < all.size(); ++p) all[p] = p;
    out.add(all, d, 1.0);
  }
  return reshape(out.result(), Shape{sel.n});
}

}  // namespace hesse
