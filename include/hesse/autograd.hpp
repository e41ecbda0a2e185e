#pragma once
// The tape (layer 2 of DESIGN.md). Every differentiable op records a Node that
// holds its inputs' edges and its backward rule; backward() and grad() replay
// the nodes in reverse creation order. Rules are written with differentiable
// ops, so with create_graph the backward pass is itself recorded and can be
// differentiated again.
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "hesse/tensor.hpp"

namespace hesse {

/// Which inputs of a node need a gradient (bit i for input i).
struct Needs {
  std::uint64_t bits = 0;
  /// Inputs whose gradient goes only to the caller of grad() with create_graph,
  /// who may never read its value (only differentiate it again): a rule may
  /// defer computing it until it is first read.
  std::uint64_t returned_only = 0;
  bool operator[](std::size_t i) const { return i >= 64 || ((bits >> i) & 1u); }
  bool may_defer(std::size_t i) const { return i < 64 && ((returned_only >> i) & 1u); }
};

namespace detail {
// Blocks recycled per thread (storage.cpp). Tensors, storages, nodes, their
// edges and their rules' closures are made and dropped by the hundred for
// every small Hessian, in bursts larger than malloc's per-thread cache (7
// blocks a size): past it, every free and malloc takes glibc's slow path.
// Blocks are 64-byte aligned; those above 512 bytes come from the heap (all
// of them under AddressSanitizer, which a recycled block would blind).
void* take_block(std::size_t bytes);
void give_block(void* block, std::size_t bytes);

/// An allocator of recycled blocks.
template <class T>
struct BlockAllocator {
  using value_type = T;
  BlockAllocator() = default;
  template <class U>
  BlockAllocator(const BlockAllocator<U>&) {}
  static_assert(alignof(T) <= 64, "recycled blocks are 64-byte aligned");
  T* allocate(std::size_t n) { return static_cast<T*>(take_block(n * sizeof(T))); }
  void deallocate(T* p, std::size_t n) { give_block(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const BlockAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const BlockAllocator<U>&) const { return false; }
};
}  // namespace detail

/// A backward rule: given the gradient of the node's output (with any number of
/// extra leading batch dimensions) and the output itself (defined only for
/// rules recorded with save_output), return one gradient per input (undefined
/// where `needs` is false). A move-only std::function whose closure lives in
/// a recycled block: a rule is made for every recorded op.
class BackwardRule {
 public:
  BackwardRule() = default;
  BackwardRule(std::nullptr_t) {}
  template <class F, class Closure = std::decay_t<F>,
            class = std::enable_if_t<!std::is_same_v<Closure, BackwardRule> &&
                                     std::is_invocable_r_v<std::vector<Tensor>, Closure&, const Tensor&,
                                                           const Tensor&, Needs>>>
  BackwardRule(F&& f) {
    static_assert(alignof(Closure) <= 64, "recycled blocks are 64-byte aligned");
    if constexpr (std::is_constructible_v<bool, const Closure&>)
      if (!static_cast<bool>(f)) return;  // a null function pointer or an empty std::function: an empty rule
    void* block = detail::take_block(sizeof(Closure));
    try {
      closure_ = new (block) Closure(std::forward<F>(f));
    } catch (...) {
      detail::give_block(block, sizeof(Closure));
      throw;
    }
    call_ = [](void* c, const Tensor& grad, const Tensor& output, Needs needs) -> std::vector<Tensor> {
      return (*static_cast<Closure*>(c))(grad, output, needs);
    };
    drop_ = [](void* c) {
      static_cast<Closure*>(c)->~Closure();
      detail::give_block(c, sizeof(Closure));
    };
  }
  BackwardRule(BackwardRule&& other) noexcept : closure_(other.closure_), call_(other.call_), drop_(other.drop_) {
    other.closure_ = nullptr;
  }
  BackwardRule& operator=(BackwardRule&& other) noexcept {
    BackwardRule taken(std::move(other));  // this rule's old closure goes with `taken`
    std::swap(closure_, taken.closure_);
    std::swap(call_, taken.call_);
    std::swap(drop_, taken.drop_);
    return *this;
  }
  BackwardRule& operator=(std::nullptr_t) { return *this = BackwardRule(); }
  ~BackwardRule() {
    if (closure_) drop_(closure_);
  }
  explicit operator bool() const { return closure_ != nullptr; }
  std::vector<Tensor> operator()(const Tensor& grad, const Tensor& output, Needs needs) const {
    if (!closure_) throw std::bad_function_call();
    return call_(closure_, grad, output, needs);
  }

 private:
  void* closure_ = nullptr;
  std::vector<Tensor> (*call_)(void*, const Tensor&, const Tensor&, Needs) = nullptr;
  void (*drop_)(void*) = nullptr;
};

/// Where a node's input gradient goes: into an earlier node, or into a leaf.
struct Edge {
  std::shared_ptr<Node> node;
  std::shared_ptr<detail::TensorImpl> leaf;
  bool active() const { return node || leaf; }
};

namespace detail {
/// Where transpose() copied its result from. A matmul handed that copy alone
/// reads the input instead, through the kernel's transpose flag (ops/linalg.cpp).
struct TransposedFrom {
  std::weak_ptr<TensorImpl> input;
  std::uint64_t input_writes = 0, output_writes = 0;  // unchanged since: the copy is still input's transpose
};
}  // namespace detail

class Node : public std::enable_shared_from_this<Node> {
 public:
  ~Node();
  const char* name = "";
  std::uint64_t sequence = 0;  // creation order on the tape
  Shape output_shape;
  std::vector<Edge, detail::BlockAllocator<Edge>> edges;
  BackwardRule rule;
  std::shared_ptr<detail::Storage> saved_output;  // kept only when the rule reads it
  std::size_t saved_offset = 0;                   // where the output starts in saved_output
  bool save_output = false;
  bool released = false;  // the rule was freed by a backward without retain_graph
  detail::TransposedFrom transposed_from;  // empty unless this node is a transpose()
  // engine scratch, valid during one backward pass
  Tensor pending;          // gradient gathered for this node's output
  std::uint64_t epoch = 0; // pass that last visited this node
  bool useful = false;     // some requested gradient flows through this node
};

/// Whether ops record nodes (thread-local; on by default).
bool is_grad_enabled();

/// Ops inside its scope record nothing.
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

/// Turns recording on inside its scope (used by create_graph).
class EnableGradGuard {
 public:
  EnableGradGuard();
  ~EnableGradGuard();
  EnableGradGuard(const EnableGradGuard&) = delete;
  EnableGradGuard& operator=(const EnableGradGuard&) = delete;

 private:
  bool previous_;
};

struct GradOptions {
  /// Record the backward pass so its result can be differentiated again.
  bool create_graph = false;
  /// Keep the graph for another backward (defaults to create_graph).
  std::optional<bool> retain_graph;
  /// Return an undefined tensor for an input the outputs do not depend on.
  bool allow_unused = false;
  /// grad_outputs carry extra leading batch dimensions: k seeds in one pass;
  /// each gradient then has the same leading dimensions.
  bool batched_grad_outputs = false;
};

/// d(sum_i <grad_outputs[i], outputs[i]>)/d(inputs); leaves .grad() alone.
/// A scalar output may omit its grad_output (it is 1).
std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs = {}, const GradOptions& options = {});

/// Single output, single input.
Tensor grad(const Tensor& output, const Tensor& input, const Tensor& grad_output = Tensor(),
            const GradOptions& options = {});

/// Accumulates d(outputs)/d(leaf) into every leaf's .grad().
void backward(const std::vector<Tensor>& outputs, const std::vector<Tensor>& grad_outputs = {},
              bool retain_graph = false);

namespace detail {
/// True when an op over these inputs would record a node.
bool any_requires_grad(const Tensor* inputs, std::size_t count);
inline bool any_requires_grad(std::initializer_list<Tensor> inputs) {
  return any_requires_grad(inputs.begin(), inputs.size());
}
/// Records `result` as the output of op `name` with the given inputs and rule
/// (record() calls it once it knows some input requires grad).
Tensor record_node(const char* name, Tensor result, const Tensor* inputs, std::size_t count, BackwardRule rule,
                   bool save_output);

// Most ops run unrecorded (no input requires grad, or under NoGradGuard):
// their inputs' list and their rule's closure are only put on the heap when
// a node is recorded.
template <class Rule>
Tensor record(const char* name, Tensor result, std::initializer_list<Tensor> inputs, Rule&& rule,
              bool save_output = false) {
  if (!any_requires_grad(inputs.begin(), inputs.size())) return result;
  return record_node(name, std::move(result), inputs.begin(), inputs.size(), BackwardRule(std::forward<Rule>(rule)),
                     save_output);
}
template <class Rule>
Tensor record(const char* name, Tensor result, const std::vector<Tensor>& inputs, Rule&& rule,
              bool save_output = false) {
  if (!any_requires_grad(inputs.data(), inputs.size())) return result;
  return record_node(name, std::move(result), inputs.data(), inputs.size(), BackwardRule(std::forward<Rule>(rule)),
                     save_output);
}
}  // namespace detail

}  // namespace hesse
