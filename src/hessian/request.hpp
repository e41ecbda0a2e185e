#pragma once
// What every Hessian and curvature request shares (internal, not installed):
// the parameter selection, the scope that prepares the model, input checks,
// memory accounting, and the batched row engine behind every dense result.
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "hesse/hessian.hpp"
#include "../detail.hpp"

namespace hesse::detail {

// The parameters a request differentiates by, and where each starts in the
// flattened vector θ.
struct Selection {
  std::vector<std::string> names;
  std::vector<Tensor> params;
  std::vector<std::size_t> offsets, sizes;
  std::size_t n = 0;
  std::vector<Tensor> left_out;  // the trainable parameters not selected (RequestScope freezes them)

  /// The parameter holding flat index r.
  std::size_t param_of(std::size_t r) const;
};

/// options.params (or every trainable parameter) in registration order; unknown,
/// frozen or empty selections throw, naming `api`.
Selection select(const char* api, const nn::Module& model, const std::vector<std::string>& names);
inline Selection select(const char* api, const nn::Module& model, const HessianOptions& o) {
  return select(api, model, o.params);
}

// For the duration of a request: eval mode, recording on (a request made inside
// a user's NoGradGuard still needs its tape), and parameters outside the
// selection cut from the tape (their derivatives are never needed).
class RequestScope {
 public:
  RequestScope(nn::Module& model, const Selection& sel);
  ~RequestScope();
  RequestScope(const RequestScope&) = delete;
  RequestScope& operator=(const RequestScope&) = delete;

 private:
  nn::EvalModeGuard eval_;
  EnableGradGuard recording_;
  std::vector<Tensor> frozen_;
};

/// a * b and a + b, saturating at SIZE_MAX (an overflow is refused, not wrapped).
std::size_t saturating_mul(std::size_t a, std::size_t b);
std::size_t saturating_add(std::size_t a, std::size_t b);

std::size_t limit_of(const HessianOptions& o);
/// Bytes of `count` dense Hessians of the selection (only (P, P) blocks with diagonal_only).
std::size_t dense_bytes(const Selection& sel, std::size_t count, bool diagonal_only);
/// A MemoryLimitError naming the bytes, unless they fit the limit.
void check_memory(const char* api, const Selection& sel, std::size_t count, const HessianOptions& o);

/// What a walk over y's tape finds: the entries of all its tensors (what one
/// seed carries through a backward pass), and the oldest node's sequence number.
struct TapeFacts {
  std::size_t elements = 0;
  std::uint64_t oldest = UINT64_MAX;
};
TapeFacts tape_facts(const Tensor& y);
/// Whether every node on y's tape was made at or after node sequence `since`
/// (detail::next_node_sequence() before y's forward pass): then no other
/// output's passes reach them. Inputs with a history, or tensors a model
/// keeps between calls, are shared; threads must not run passes over them,
/// since a pass writes into the nodes it runs through.
inline bool owns_its_tape(const Tensor& y, std::uint64_t since) { return tape_facts(y).oldest >= since; }
/// tape_facts of y's nodes made at or after `since`, and whether y reaches an
/// older one; older nodes are left alone (see walk_tape), so that the walk may
/// run while helpers' passes run through earlier outputs' graphs.
struct NewTape {
  std::size_t elements = 0;
  bool shared = false;
};
NewTape new_tape(const Tensor& y, std::uint64_t since);

/// Entries of every tensor on y's tape: what one seed carries through a backward pass.
std::size_t tape_elements(const Tensor& y);
/// Seeds per backward pass for `rows` rows when one seed carries `per_seed` entries.
std::size_t chunk_of(const HessianOptions& o, std::size_t rows, std::size_t per_seed);

/// f(i, entry, row) for the seeds first, first + 1, ... (i counting from 0)
/// of `k` for a parameter of `rows` rows, where seed t is row t % rows of
/// output entry t / rows: counted on, not divided (per seed, that showed).
template <class F>
void each_seed(std::size_t rows, std::size_t first, std::size_t k, F&& f) {
  std::size_t entry = first / rows, row = first % rows;
  for (std::size_t i = 0; i < k; ++i) {
    f(i, entry, row);
    if (++row == rows) row = 0, ++entry;
  }
}

// k consecutive Hessian rows from one backward pass: those of the seeds
// first, first + 1, ... of parameter p (each_seed), and their part against
// parameter q, k × sizes[q] values row-major. The Hessian is symmetric, so
// only blocks q >= p are computed and reported: a result that stores blocks
// q < p fills them by transposing afterwards.
struct RowBlock {
  std::size_t p, q, first, k;
  Tensor values;  // a sink may keep it

  /// f(entry, row of p, its sizes[q] values) for each row, in order.
  template <class F>
  void each_row(const Selection& sel, F&& f) const {
    const double* v = values.data();
    const std::size_t cols = sel.sizes[q];
    each_seed(sel.sizes[p], first, k, [&](std::size_t i, std::size_t entry, std::size_t row) {
      f(entry, row, v + i * cols);
    });
  }
};
using RowSink = std::function<void(const RowBlock&)>;

/// One-hot seed batches: zeros of `shape` with ones at the flat positions
/// `ones`. Inside a ReuseScope a batch of the same shape is taken again
/// when no one else holds it: only the last pass's ones are wiped, where a
/// fresh batch would clear every entry (a sample's seeds for a first layer's
/// weight are k × k entries for k ones: clearing them was a tenth of a
/// per-sample Hessian's time). The engine never writes into a seed it does
/// not hold alone, and the scope holds each batch too.
Tensor one_hot_seeds(const Shape& shape, const std::vector<std::size_t>& ones);

/// A buffer of at least `size` values, holding whatever it held before. In a
/// ReuseScope it is the scope's one staging buffer: a thread that puts
/// sample after sample together in it finds it in its own core's cache (a buffer from the
/// shared pool may come hot from another core's).
Tensor staging_buffer(std::size_t size);

/// Keeps what a thread uses again and again in a request while it lives: the
/// seed batches of one_hot_seeds and the staging buffer. A scope opened inside
/// another leaves the outer one in charge.
class ReuseScope {
 public:
  ReuseScope();
  ~ReuseScope();
  ReuseScope(const ReuseScope&) = delete;
  ReuseScope& operator=(const ReuseScope&) = delete;

 private:
  friend Tensor one_hot_seeds(const Shape& shape, const std::vector<std::size_t>& ones);
  friend Tensor staging_buffer(std::size_t size);
  struct Batch {
    Tensor values;
    std::vector<std::size_t> ones;  // where values holds 1
    std::size_t last_use = 0;
  };
  Batch* batch_for(const Shape& shape);
  std::vector<Batch> batches_;
  std::size_t uses_ = 0;
  Tensor staging_;
  bool outermost_;
};

/// Output entries whose Hessians are computed together.
constexpr std::size_t kEntryGroup = 8;

class RowQueue;

/// Hessians of the entries [first, first + count) of y, reported to sink in
/// blocks of rows, with entry = index - first. Blocks listed false in `skip` (when given, P × P
/// flags, row-major) are neither computed nor reported. With a queue, this
/// thread computes only the chunks of rows it takes from it.
void hessian_rows(const Tensor& y, std::size_t first, std::size_t count, const Selection& sel,
                  const HessianOptions& o, const RowSink& sink, const std::vector<bool>* wanted_blocks = nullptr,
                  RowQueue* queue = nullptr);

class OneBlasThread;
class Progress;

/// Helper threads working beside the calling one. The first exception any
/// of them (or the caller, through run()) throws is kept, and failed() tells
/// the others to take no more work; finish() hands it to the caller once all
/// have stopped. While helpers run, OpenBLAS runs on one thread.
class Crew {
 public:
  Crew();
  ~Crew();  // stops the helpers and waits for them
  Crew(const Crew&) = delete;
  Crew& operator=(const Crew&) = delete;

  /// Starts work() on a helper thread, whose progress reports stay silent;
  /// false when no thread could be started.
  bool add(std::function<void()> work);
  /// work() on this thread, its exception kept like a helper's.
  void run(const std::function<void()>& work);
  bool failed() const { return failed_; }
  /// Until every helper has returned, calls meanwhile() a few times a second;
  /// then once more.
  void wait(const std::function<void()>& meanwhile);
  /// Waits for the helpers; rethrows the first exception.
  void finish();

 private:
  void keep(std::exception_ptr error);
  void join() noexcept;
  std::unique_ptr<OneBlasThread> blas_;  // while helpers run
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::condition_variable helper_returned_;
  std::size_t running_ = 0;  // helpers not yet returned (under mutex_)
  std::exception_ptr error_;
};

/// The chunks of one output's Hessian rows, shared by the threads that
/// compute them, each on its own copy of the output's graph (a backward pass
/// keeps its state in the nodes it runs through). After its first chunk the
/// calling thread starts helpers, when the chunks left would take long enough
/// on one thread to pay for them; each helper gets a copy of the output made
/// on the calling thread (the model runs there only).
class RowQueue {
 public:
  /// copy(): the output again, on a graph of its own; rows(y): one thread's
  /// share of the rows of y (hessian_rows with this queue). Helpers are only
  /// started when y owns its tape (owns_its_tape(y, since)).
  RowQueue(std::function<Tensor()> copy, std::function<void(const Tensor&)> rows, const Tensor& y,
           std::uint64_t since);
  RowQueue(const RowQueue&) = delete;
  RowQueue& operator=(const RowQueue&) = delete;

  /// The index of the next chunk no thread has taken (none left once past the last).
  std::size_t take();
  /// A thread finished a chunk in `seconds`, with `left` chunks after it.
  void chunk_done(double seconds, std::size_t left);
  /// On the calling thread, once it has no chunk left: until the helpers
  /// are done, calls report() a few times a second (helpers report nothing).
  void wait_for_helpers(const std::function<void()>& report);
  /// Waits for the helpers; rethrows the first error any thread met.
  void finish() { crew_.finish(); }

  std::atomic<std::size_t> rows_done{0};  // over all threads, for the progress report

 private:
  std::function<Tensor()> copy_;
  std::function<void(const Tensor&)> rows_;
  Tensor y_;
  std::uint64_t since_;
  std::thread::id caller_ = std::this_thread::get_id();
  bool decided_ = false;  // whether helpers are wanted: after the caller's first chunk
  std::atomic<std::size_t> next_{0};
  Crew crew_;
};

/// hessian_rows of the scalar loss make() makes, on as many threads as pay;
/// make_copy() makes it again, on a graph of its own, for each helper.
void rows_on_threads(const std::function<Tensor()>& make, const std::function<Tensor()>& make_copy,
                     const Selection& sel, const HessianOptions& o, const RowSink& sink,
                     const std::vector<bool>* wanted_blocks = nullptr);
/// Hessians of every entry of y, in groups; entry e of y reports as sink_from(first) with first + e.
void hessians_of_entries(const Tensor& y, const Selection& sel, const HessianOptions& o,
                         const std::function<RowSink(std::size_t first)>& sink_from,
                         const std::vector<bool>* wanted_blocks = nullptr);

// ---- batched gradients over a selection (shared by the HVP and the operators) ----
/// Columns of parameter p in a block V [k, n], as seeds [k, P.shape].
Tensor part_of(const Tensor& V, const Selection& sel, std::size_t p);
/// part_of(V, sel, p) for every p in `group`.
std::vector<Tensor> parts_of(const Tensor& V, const Selection& sel, const std::vector<std::size_t>& group);
/// d(Σ_i <seeds_i, outputs_i>)/d(inputs) for seeds with a leading block dimension k,
/// keeping the graph for the next product. Outputs that are constant are skipped;
/// an input nothing depends on gets an undefined gradient.
std::vector<Tensor> block_grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& seeds,
                               const std::vector<Tensor>& inputs, bool create_graph = false);
/// ∇_wrt <seed, y> (seed omitted for a scalar y), recorded so that it can be
/// differentiated again; `batched`: the seed has extra leading dimensions.
std::vector<Tensor> recorded_grad(const Tensor& y, const std::vector<Tensor>& wrt, const Tensor& seed = Tensor(),
                                  bool batched = false);
/// The parameter groups of one product: all parameters together, or each alone
/// for the block-diagonal part (seeds and derivatives stay within P).
std::vector<std::vector<std::size_t>> parameter_groups(const Selection& sel, bool block_diagonal);
/// The entries of `all` at the positions in `group`.
std::vector<Tensor> pick(const std::vector<Tensor>& all, const std::vector<std::size_t>& group);
/// A block [k, n] summed from per-parameter parts: the first part given for a
/// parameter is copied into its columns, later ones are added, and columns no
/// part reached are zero in result(). (Filling with zeros and adding would
/// pass over every column once more.) The parts are temporaries: a single
/// row may be built in the buffer of its first columns' part.
class ColumnSum {
 public:
  ColumnSum(const Selection& sel, std::size_t k);
  /// columns of group[j] += scale · parts[j] ([k, P.shape] each; undefined = zero).
  void add(const std::vector<std::size_t>& group, const std::vector<Tensor>& parts, double scale);
  Tensor result();

 private:
  double* values();
  bool adopt(const Tensor& part);
  const Selection& sel_;
  std::size_t k_;
  Tensor out_;           // allocated (or adopted) on the first part
  bool adopted_ = false;  // out_ is built in a part's buffer
  std::vector<bool> written_;
};

/// The batch size shared by every input (and the target, when defined).
std::size_t batch_size(const char* api, const std::vector<Tensor>& inputs, const Tensor& target = Tensor());
/// A ValueError naming `api` and the first undefined input, if any.
void check_defined(const char* api, const std::vector<Tensor>& inputs);
/// The model on the inputs, each checked to be defined.
Tensor run_model(const char* api, nn::Module& model, const std::vector<Tensor>& inputs);
/// Sample b of every input, as a batch of one.
std::vector<Tensor> sample(const std::vector<Tensor>& inputs, std::size_t b);
/// Sample b of the target; an undefined target (a criterion may ignore it) stays undefined.
Tensor sample_target(const Tensor& target, std::size_t b);
/// The model on sample b alone; a shape error says which sample it came from.
Tensor run_sample(const char* api, nn::Module& model, const std::vector<Tensor>& inputs, std::size_t b);
/// Sample b's output under is_batch: a leading batch dimension of 1, and (b > 0) the shape `first` of sample 0's.
void check_sample_output(const char* api, const Tensor& y, std::size_t b, const Shape& first);
/// criterion(output, target), checked to be a scalar.
Tensor scalar_loss(const char* api, const Criterion& criterion, const Tensor& output, const Tensor& target);

// ---- the outputs a request differentiates ----
// A loss request has one output, the scalar loss, and its result has no
// leading dims (lead []). A model request has the model's output: one Hessian
// per entry, lead = the output's shape; with is_batch every sample is run
// alone, and sample b's entries start at b * (entries per sample).
using StartFn = std::function<void(const Shape& lead)>;
/// Gets an output and the index of its first entry in the result; false stops the visit.
using OutputFn = std::function<bool(const Tensor& y, std::size_t base)>;
/// Runs the forward pass(es): start(lead) once, after the first output and before visiting it.
using Outputs = std::function<void(const StartFn& start, const OutputFn& each)>;
/// (The returned functions keep references to the arguments.)
Outputs loss_outputs(const char* api, nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                     const Tensor& target);
Outputs model_outputs(const char* api, nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& o);

/// work(i) for every part i in [0, count) (a stripe of a matrix), each on
/// one thread: the first on the calling thread, the others spread over
/// num_threads() threads when the first took long enough to pay for starting
/// them. The first exception is rethrown here, after every thread has stopped.
void for_each_part(std::size_t count, const std::function<void(std::size_t)>& work);

/// The derivative work of `count` per-sample outputs, which the calling
/// thread makes one at a time (the model runs there only) and hands to add()
/// in order. The first sample's work runs at once and is timed. When the rest
/// would take long enough to pay for threads, later samples go into a queue
/// that helpers take them from while this thread makes the next ones; it
/// takes its share too once the queue holds kQueuedGraphBytes of graphs, and
/// at finish(). A sample that reaches older nodes (new_tape) stops the
/// queue: the work queued is done first, then each sample's work runs at
/// once, on this thread, as without threads. With more than one sample, the
/// calling thread reports the samples done (`progress`), and the reports of
/// each sample's work stay silent.
class SampleWork {
 public:
  static constexpr std::size_t kQueuedGraphBytes = std::size_t(16) << 20;
  SampleWork(std::size_t count, bool progress, std::function<void(const Tensor& y, std::size_t i)> work);
  ~SampleWork();  // stops the helpers
  /// Sample i's output, just made.
  void add(const Tensor& y, std::size_t i);
  /// Does the work still queued; rethrows the first error.
  void finish();

 private:
  struct Queued {
    Tensor y;
    std::size_t i, bytes;
  };
  void run(const Tensor& y, std::size_t i);
  bool take(Queued& next, bool wait);  // false: none (left, or to wait for)
  void serve();                        // a helper's loop
  void drain();                        // the queue emptied and the helpers stopped
  ReuseScope reuse_;  // the calling thread's, for every sample it does (also in finish())
  std::size_t count_;
  std::function<void(const Tensor&, std::size_t)> work_;
  std::unique_ptr<Progress> progress_;
  std::atomic<std::size_t> done_{0};
  std::thread::id caller_ = std::this_thread::get_id();
  std::uint64_t since_;  // the node sequence before the next sample's forward pass
  enum class Mode { first, queued, at_once } mode_ = Mode::first;
  std::size_t threads_ = 1;
  bool helpers_started_ = false;
  std::mutex mutex_;  // guards the queue
  std::condition_variable changed_;
  std::deque<Queued> queue_;
  std::vector<Tensor> done_graphs_;  // helpers' samples done, for this thread to free (it made them)
  std::atomic<std::size_t> queued_bytes_{0};
  bool closed_ = false;  // no more samples come
  Crew crew_;            // last: it waits for the helpers before the queue goes
};

/// Visits `count` outputs (the samples of a model request, or its one output)
/// and hands each one's work(y, base) to a SampleWork: start(lead) runs first,
/// on this thread; the work may run on helper threads.
void work_on_outputs(const Outputs& outputs, std::size_t count, const HessianOptions& o, const StartFn& start,
                     const std::function<void(const Tensor& y, std::size_t base)>& work);
/// The outputs model_outputs visits: the samples with is_batch, else one.
std::size_t output_count(const char* api, const std::vector<Tensor>& inputs, const HessianOptions& o);

// One Hessian per entry of the model's output. With is_batch, sample b is run
// alone (batch of one) and its entries fill row b of the result. The model
// runs on the calling thread; each output's work(y, first entry) may run on a
// helper thread (work_on_outputs), right after its forward pass, so that its
// part of the result is written while in cache.
template <class MakeResult, class Work>
void model_hessians(const char* api, nn::Module& model, const std::vector<Tensor>& inputs, const Selection& sel,
                    const HessianOptions& o, MakeResult make_result, Work work) {
  work_on_outputs(
      model_outputs(api, model, inputs, o), output_count(api, inputs, o), o,
      [&](const Shape& lead) {
        check_memory(api, sel, numel_of(lead), o);
        make_result(lead);
      },
      work);
}

/// The position of `name` in `names`, or a ValueError naming `api` and the known names.
std::size_t index_of(const char* api, const std::vector<std::string>& names, const std::string& name);

/// A MemoryLimitError naming `what` needs `bytes`, unless they fit the limit.
void check_bytes(const char* api, const std::string& what, std::size_t bytes, const Selection& sel,
                 std::size_t count, const HessianOptions& o);

// ---- structure on the tape (structure.cpp) ----
/// Calls on_node for every node on the graphs of `roots` (once each) and
/// on_leaf for every leaf they reach (possibly more than once). Nodes for
/// which keep_out(node) is true are left alone: neither marked, reported nor
/// gone through (another thread may be running a pass through them).
void walk_tape(const std::vector<Tensor>& roots, const std::function<void(const Node&)>& on_node,
               const std::function<void(const detail::TensorImpl*)>& on_leaf,
               const std::function<bool(const Node&)>& keep_out = nullptr);
/// The gradient g[p] = ∂(Σ seeds ⊙ y)/∂θ_p of every selected parameter, recorded
/// (create_graph); g[p] is undefined or constant where y does not depend on θ_p.
/// `seeds` may carry leading batch dims; undefined seeds mean ones.
std::vector<Tensor> first_gradient(const Tensor& y, const Selection& sel, const Tensor& seeds = Tensor());
/// P × P flags, symmetric: block (P, Q) is nonzero when θ_Q is a leaf of g[P]'s graph for
/// some output and random probes of the block do not vanish (see structure.cpp).
std::vector<bool> structure_of(const Selection& sel, const Outputs& outputs);

// ---- storage sizes (storage.cpp) ----
/// Bytes of `count` packed upper triangles of size n.
std::size_t packed_bytes(std::size_t n, std::size_t count);
/// The blocks a block-sparse request computes and stores: the structure; only (P, P) with diagonal_only.
std::vector<bool> stored_blocks(const Selection& sel, const Outputs& outputs, bool diagonal_only);
/// Bytes of `count` Hessians' blocks (P, Q ≥ P) flagged in `blocks` (P × P).
std::size_t block_bytes(const Selection& sel, const std::vector<bool>& blocks, std::size_t count);

}  // namespace hesse::detail
