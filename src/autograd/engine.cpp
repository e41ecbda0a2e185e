// The engine: replays the tape in reverse creation order. No recursion, so
// graphs of any depth work; gradients of gradients work because rules are
// written with differentiable ops and run with recording on under create_graph.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "../detail.hpp"

namespace hesse {
namespace {

thread_local bool grad_enabled HESSE_FAST_TLS = true;
std::atomic<std::uint64_t> next_sequence{1};
std::atomic<std::uint64_t> next_epoch{1};

// HESSE_PROFILE=1: time spent in each op's backward rule, printed at exit.
struct RuleProfile {
  std::mutex mutex;  // per-sample Hessians run rules on several threads
  std::unordered_map<std::string, std::pair<double, std::size_t>> seconds_calls;
  ~RuleProfile() {
    std::vector<std::pair<std::string, std::pair<double, std::size_t>>> rows(seconds_calls.begin(), seconds_calls.end());
    std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.first > b.second.first; });
    std::fprintf(stderr, "hesse backward rules (HESSE_PROFILE):\n");
    for (auto& [name, v] : rows) std::fprintf(stderr, "  %-20s %10.4f s %9zu calls\n", name.c_str(), v.first, v.second);
  }
};
// set once, at load (a function-local static reads its guard at every rule)
RuleProfile* const rule_profile = std::getenv("HESSE_PROFILE") ? new RuleProfile() : nullptr;
struct ProfileAtExit {
  ~ProfileAtExit() { delete rule_profile; }
} profile_at_exit;

class RuleTimer {
 public:
  explicit RuleTimer(const char* name) : name_(name) {
    if (rule_profile) start_ = std::chrono::steady_clock::now();
  }
  void stop() {
    if (!rule_profile) return;
    std::lock_guard<std::mutex> lock(rule_profile->mutex);
    auto& entry = rule_profile->seconds_calls[name_];
    entry.first += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    entry.second += 1;
  }

 private:
  const char* name_;
  std::chrono::steady_clock::time_point start_;
};

// sum's buffer has one owner (accumulate checks), so it never overlaps term:
// __restrict spares the loop its overlap tests.
HESSE_AVX2_CLONE void add_into(double* __restrict sum, const double* __restrict term, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) sum[i] += term[i];
}

// Sums a node's incoming gradients. When nothing records and the running sum
// is the only reference to its buffer, the next gradient is added in place: no
// new buffer, and one pass less over memory.
void accumulate(Tensor& into, const Tensor& g) {
  if (!into.defined()) {
    into = g;
  } else if (!grad_enabled && !into.requires_grad() && detail::held_alone(into) && into.shape() == g.shape()) {
    add_into(into.mutable_data(), g.data(), g.numel());
  } else {
    into = into + g;
  }
}

// A node list whose buffer is reused by the next pass on this thread (passes
// can nest: a rule may take a gradient), so that a pass's traversal allocates nothing.
struct SpareNodeLists {
  std::vector<std::vector<Node*>> lists;
  ~SpareNodeLists();
};
thread_local bool spare_gone HESSE_FAST_TLS = false;  // trivially destructible: readable during thread exit
thread_local SpareNodeLists spare;
SpareNodeLists::~SpareNodeLists() { spare_gone = true; }

struct NodeList {
  std::vector<Node*> nodes;
  NodeList() {
    if (!spare_gone && !spare.lists.empty()) nodes = std::move(spare.lists.back()), spare.lists.pop_back();
  }
  ~NodeList() {
    nodes.clear();  // (a list grown by a huge graph is not kept)
    if (!spare_gone && spare.lists.size() < 8 && nodes.capacity() <= (std::size_t(1) << 16))
      spare.lists.push_back(std::move(nodes));
  }
  NodeList(const NodeList&) = delete;
  NodeList& operator=(const NodeList&) = delete;
};

}  // namespace

bool is_grad_enabled() { return grad_enabled; }
NoGradGuard::NoGradGuard() : previous_(grad_enabled) { grad_enabled = false; }
NoGradGuard::~NoGradGuard() { grad_enabled = previous_; }
EnableGradGuard::EnableGradGuard() : previous_(grad_enabled) { grad_enabled = true; }
EnableGradGuard::~EnableGradGuard() { grad_enabled = previous_; }

namespace detail {
std::uint64_t new_epoch() { return next_epoch++; }
std::uint64_t next_node_sequence() { return next_sequence; }
}  // namespace detail

Node::~Node() {
  for (auto& e : edges)
    if (e.node) detail::release_node(std::move(e.node));
}

namespace detail {

void release_node(std::shared_ptr<Node>&& node) {
  thread_local std::vector<std::shared_ptr<Node>> pending HESSE_FAST_TLS;
  thread_local bool draining HESSE_FAST_TLS = false;
  pending.push_back(std::move(node));
  if (draining) return;
  draining = true;
  while (!pending.empty()) {
    std::shared_ptr<Node> last = std::move(pending.back());
    pending.pop_back();
    last.reset();  // may push this node's inputs onto `pending`
  }
  draining = false;
}

bool any_requires_grad(const Tensor* inputs, std::size_t count) {
  if (!grad_enabled) return false;
  for (std::size_t i = 0; i < count; ++i)
    if (inputs[i].defined() && inputs[i].requires_grad()) return true;
  return false;
}

Tensor record_node(const char* name, Tensor result, const Tensor* inputs, std::size_t count, BackwardRule rule,
                   bool save_output) {
  if (!result.defined())
    throw Error(message(name, "recorded an undefined result"));
  // a bug in an op, not in user code: recording onto an input (or onto a
  // tensor another op made) would make a cycle or cut that tensor's history
  if (result.grad_fn())
    throw Error(message(name, "result is already the output of '", result.grad_fn()->name,
                        "'; an op must record a fresh tensor"));
  for (std::size_t i = 0; i < count; ++i)
    if (inputs[i].defined() && inputs[i].impl() == result.impl())
      throw Error(message(name, "result is one of its own inputs; an op must record a fresh tensor"));
  auto node = detail::make_cached<Node>();
  node->name = name;
  node->sequence = next_sequence++;
  node->output_shape = result.shape();
  node->edges.resize(count);
  for (std::size_t i = 0; i < count; ++i) {
    const Tensor& in = inputs[i];
    if (!in.defined() || !in.requires_grad()) continue;
    if (in.grad_fn()) node->edges[i].node = in.grad_fn();
    else node->edges[i].leaf = in.impl();
  }
  node->rule = std::move(rule);
  node->save_output = save_output;
  if (save_output) {
    node->saved_output = result.impl()->storage;
    node->saved_offset = result.impl()->offset;
  }
  result.impl()->grad_fn = std::move(node);
  result.impl()->requires_grad = true;
  return result;
}

}  // namespace detail

namespace {

const Shape& shape_of(const Edge& e) { return e.node ? e.node->output_shape : e.leaf->shape; }

// One run of the engine. `inputs` empty means backward(): gradients go into
// every leaf's .grad(). Otherwise they are captured per input and returned.
class Pass {
 public:
  Pass(const char* api, const std::vector<Tensor>& inputs, const GradOptions& options)
      : api_(api), inputs_(inputs), options_(options), epoch_(next_epoch++) {
    captured_.resize(inputs.size());
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      const Tensor& in = inputs[i];
      if (!in.defined()) throw ValueError(detail::message(api_, "input ", i, " is an undefined tensor"));
      if (!in.requires_grad())
        throw AutogradError(detail::message(api_, "input ", i, " (shape ", to_string(in.shape()),
                                            ") does not require grad"));
      targets_.push_back({in.grad_fn() ? static_cast<const void*>(in.grad_fn().get()) : in.impl().get(), i});
    }
    std::sort(targets_.begin(), targets_.end(), Target::by_key);
  }

  ~Pass() {
    for (Node* n : order_.nodes) n->pending = Tensor();  // also after an exception
  }

  std::vector<Tensor> run(const std::vector<Tensor>& outputs, const std::vector<Tensor>& grad_outputs) {
    if (!grad_outputs.empty() && grad_outputs.size() != outputs.size())
      throw ValueError(detail::message(api_, outputs.size(), " outputs but ", grad_outputs.size(),
                                       " grad_outputs"));
    std::vector<Tensor> seeds;
    for (std::size_t i = 0; i < outputs.size(); ++i)
      seeds.push_back(seed_for(i, outputs[i], grad_outputs.empty() ? Tensor() : grad_outputs[i]));
    // a scalar output's omitted seed is 1 for every seed of the batch
    if (options_.batched_grad_outputs && !batch_.empty())
      for (std::size_t i = 0; i < outputs.size(); ++i)
        if (grad_outputs.empty() || !grad_outputs[i].defined())
          seeds[i] = ones(detail::concat_shape(batch_, outputs[i].shape()));

    collect(outputs);
    const bool create_graph = options_.create_graph;
    const bool retain = options_.retain_graph.value_or(create_graph);
    std::optional<NoGradGuard> no_grad;
    std::optional<EnableGradGuard> with_grad;
    if (create_graph) with_grad.emplace();
    else no_grad.emplace();

    for (std::size_t i = 0; i < outputs.size(); ++i) {
      const Tensor& out = outputs[i];
      if (out.grad_fn()) accumulate(out.grad_fn()->pending, seeds[i]);
      else deliver_to_leaf(out.impl(), seeds[i]);
    }
    for (Node* node : order_.nodes) {
      if (!node->useful || !node->pending.defined()) continue;
      Tensor g = std::move(node->pending);
      node->pending = Tensor();
      for (auto [it, end] = targets_of(node); it != end; ++it) accumulate(captured_[it->input], g);
      if (!has_useful_edge(node)) continue;
      if (node->released)
        throw AutogradError(detail::message(
            api_, "trying to backward through the graph of '", node->name,
            "' a second time: its saved values were freed by an earlier backward; pass retain_graph=true to "
            "the first one"));
      RuleTimer timer(node->name);
      std::vector<Tensor> grads = node->rule(g, saved_output(node), needs_of(node));
      timer.stop();
      check_grads(node, g, grads);
      for (std::size_t k = 0; k < node->edges.size(); ++k) {
        const Edge& e = node->edges[k];
        if (!grads[k].defined() || !e.active()) continue;
        if (e.node) {
          if (e.node->useful) accumulate(e.node->pending, grads[k]);
        } else {
          deliver_to_leaf(e.leaf, grads[k]);
        }
      }
      if (!retain) {
        node->rule = nullptr;
        node->saved_output.reset();
        node->released = true;
      }
    }
    return finish();
  }

 private:
  Tensor seed_for(std::size_t i, const Tensor& out, const Tensor& seed) {
    if (!out.defined()) throw ValueError(detail::message(api_, "output ", i, " is an undefined tensor"));
    if (!out.requires_grad())
      throw AutogradError(detail::message(api_, "output ", i, " (shape ", to_string(out.shape()),
                                          ") does not require grad: nothing it depends on requires grad"));
    if (!seed.defined()) {
      if (out.numel() != 1)
        throw AutogradError(detail::message(api_, "output ", i, " has shape ", to_string(out.shape()),
                                            " and is not a scalar: pass a gradient of that shape as seed"));
      return ones(out.shape());
    }
    const Shape& s = seed.shape();
    const Shape& o = out.shape();
    bool fits = s == o;
    if (!fits && options_.batched_grad_outputs && s.size() >= o.size())
      fits = std::equal(o.begin(), o.end(), s.end() - static_cast<std::ptrdiff_t>(o.size()));
    if (!fits)
      throw ShapeError(detail::message(api_, "seed of shape ", to_string(s), " for output ", i, " of shape ",
                                       to_string(o),
                                       options_.batched_grad_outputs ? " (batched: leading dims + output shape)"
                                                                     : ""));
    if (options_.batched_grad_outputs) {
      Shape batch = detail::batch_dims(seed, o);
      if (!batch_known_) batch_ = batch, batch_known_ = true;
      else if (batch != batch_)
        throw ShapeError(detail::message(api_, "batched seeds disagree on their batch dims: ", to_string(batch_),
                                         " and ", to_string(batch)));
    }
    return seed;
  }

  // Every node reachable from the outputs, in reverse creation order, each
  // marked useful when a requested gradient flows through it.
  void collect(const std::vector<Tensor>& outputs) {
    NodeList to_visit;
    std::vector<Node*>& stack = to_visit.nodes;
    for (const Tensor& out : outputs)
      if (Node* n = out.grad_fn().get(); n && n->epoch != epoch_) {
        n->epoch = epoch_;
        stack.push_back(n);
      }
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      order_.nodes.push_back(n);
      for (const Edge& e : n->edges)
        if (Node* m = e.node.get(); m && m->epoch != epoch_) {
          m->epoch = epoch_;
          stack.push_back(m);
        }
    }
    std::vector<Node*>& order = order_.nodes;
    std::sort(order.begin(), order.end(), [](Node* a, Node* b) { return a->sequence > b->sequence; });
    // inputs come before their consumers on the tape: mark in creation order
    for (auto it = order.rbegin(); it != order.rend(); ++it) {
      Node* n = *it;
      n->useful = is_target(n) || has_useful_edge(n);
    }
  }

  bool wants_leaf(const detail::TensorImpl* leaf) const {
    return inputs_.empty() ? true : is_target(leaf);
  }

  // An edge whose gradient reaches a requested result (the others' are dropped).
  bool useful(const Edge& e) const { return (e.node && e.node->useful) || (e.leaf && wants_leaf(e.leaf.get())); }

  bool has_useful_edge(const Node* n) const {
    for (const Edge& e : n->edges)
      if (useful(e)) return true;
    return false;
  }

  // A rule computes only the gradients that reach a requested result. With
  // create_graph, a gradient for a requested leaf goes nowhere but to the
  // caller, who often only differentiates it again (an HVP seeds it; its value
  // is never read): such results may be deferred. backward()'s leaf .grad()
  // values, and results without a graph, are for reading: never deferred.
  Needs needs_of(const Node* n) const {
    Needs needs;
    const bool may_defer = options_.create_graph && !inputs_.empty();
    for (std::size_t k = 0; k < n->edges.size() && k < 64; ++k) {
      const Edge& e = n->edges[k];
      if (!useful(e)) continue;
      needs.bits |= std::uint64_t(1) << k;
      if (may_defer && e.leaf) needs.returned_only |= std::uint64_t(1) << k;  // a leaf grad() returns
    }
    return needs;
  }

  static Tensor saved_output(Node* n) {
    if (!n->save_output) return Tensor();
    auto impl = detail::make_cached<detail::TensorImpl>();
    impl->shape = n->output_shape;
    impl->numel = numel_of(n->output_shape);
    impl->storage = n->saved_output;
    impl->offset = n->saved_offset;
    impl->requires_grad = true;
    impl->grad_fn = n->shared_from_this();  // so that create_graph differentiates through it
    return Tensor(std::move(impl));
  }

  // Each gradient has the shape of its input behind g's leading batch dims
  // (compared in place: this runs for every rule).
  void check_grads(const Node* n, const Tensor& g, const std::vector<Tensor>& grads) const {
    if (grads.size() != n->edges.size())
      throw Error(detail::message(n->name, "backward returned ", grads.size(), " gradients for ",
                                  n->edges.size(), " inputs"));
    const Shape& gs = g.shape();
    const std::size_t batch = gs.size() - n->output_shape.size();
    for (std::size_t k = 0; k < grads.size(); ++k) {
      if (!grads[k].defined() || !n->edges[k].active()) continue;
      const Shape& got = grads[k].shape();
      const Shape& input = shape_of(n->edges[k]);
      if (got.size() != batch + input.size() || !std::equal(gs.begin(), gs.begin() + std::ptrdiff_t(batch), got.begin()) ||
          !std::equal(input.begin(), input.end(), got.begin() + std::ptrdiff_t(batch)))
        throw Error(detail::message(n->name, "backward produced a gradient of shape ", to_string(got), " for input ",
                                    k, " of shape ", to_string(input), " (batch ",
                                    to_string(detail::batch_dims(g, n->output_shape)), ")"));
    }
  }

  void deliver_to_leaf(const std::shared_ptr<detail::TensorImpl>& leaf, const Tensor& g) {
    if (!inputs_.empty()) {
      for (auto [it, end] = targets_of(leaf.get()); it != end; ++it) accumulate(captured_[it->input], g);
      return;
    }
    if (leaf->grad) {
      leaf->grad = (Tensor(leaf->grad) + (g.requires_grad() ? g.detach() : g)).impl();
    } else if (!g.requires_grad() && detail::held_alone(g)) {
      leaf->grad = g.impl();  // nobody else sees this buffer: take it
    } else {
      // a seed, or a gradient also sent elsewhere (z = a + b hands the same
      // tensor to a and b): each leaf's .grad() gets its own storage
      leaf->grad = g.clone().impl();
    }
  }

  std::vector<Tensor> finish() {
    for (std::size_t i = 0; i < captured_.size(); ++i)
      if (!captured_[i].defined() && !options_.allow_unused)
        throw AutogradError(detail::message(api_, "input ", i, " (shape ", to_string(inputs_[i].shape()),
                                            ") is not used to compute the outputs; pass allow_unused to get an "
                                            "undefined gradient instead"));
    return std::move(captured_);
  }

  const char* api_;
  const std::vector<Tensor>& inputs_;
  GradOptions options_;
  std::uint64_t epoch_;
  Shape batch_;
  bool batch_known_ = false;
  NodeList order_;
  // the requested inputs, by the node or leaf that holds each (sorted by key;
  // a few entries, where hash maps cost an allocation per entry)
  struct Target {
    const void* key;
    std::size_t input;
    static bool by_key(const Target& a, const Target& b) { return a.key < b.key; }
  };
  std::vector<Target> targets_;
  std::vector<Tensor> captured_;

  std::pair<std::vector<Target>::const_iterator, std::vector<Target>::const_iterator> targets_of(const void* key) const {
    return std::equal_range(targets_.begin(), targets_.end(), Target{key, 0}, Target::by_key);
  }
  bool is_target(const void* key) const {
    const auto [it, end] = targets_of(key);
    return it != end;
  }
};

}  // namespace

std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs, const GradOptions& options) {
  if (inputs.empty()) throw ValueError("hesse::grad: no inputs to differentiate by");
  Pass pass("grad", inputs, options);
  return pass.run(outputs, grad_outputs);
}

Tensor grad(const Tensor& output, const Tensor& input, const Tensor& grad_output, const GradOptions& options) {
  return grad(std::vector<Tensor>{output}, std::vector<Tensor>{input}, std::vector<Tensor>{grad_output},
              options)[0];
}

void backward(const std::vector<Tensor>& outputs, const std::vector<Tensor>& grad_outputs, bool retain_graph) {
  GradOptions options;
  options.retain_graph = retain_graph;
  static const std::vector<Tensor> no_inputs;
  Pass pass("backward", no_inputs, options);
  pass.run(outputs, grad_outputs);
}

}  // namespace hesse
