// The shared machinery of Hessian requests (see request.hpp). hessian_rows is
// the engine: the gradient is taken once with create_graph; then chunks of
// one-hot seeds go through its graph as one batched backward pass each.
#include "request.hpp"

#include <cblas.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>

#include "../progress.hpp"

namespace hesse::detail {

Selection select(const char* api, const nn::Module& model, const std::vector<std::string>& names) {
  const auto all = model.named_parameters();
  Selection sel;
  auto add = [&sel](const std::string& name, const Tensor& t) {
    sel.names.push_back(name);
    sel.params.push_back(t);
    sel.offsets.push_back(sel.n);
    sel.sizes.push_back(t.numel());
    sel.n += t.numel();
  };
  if (names.empty()) {
    for (const auto& [name, t] : all)
      if (t.requires_grad()) add(name, t);
    if (sel.n == 0) throw ValueError(message(api, "the model has no trainable parameters"));
    return sel;
  }
  for (const auto& [name, t] : all) {  // keep registration order whatever order the user listed
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      if (t.requires_grad()) sel.left_out.push_back(t);
      continue;
    }
    if (!t.requires_grad())
      throw ValueError(message(api, "parameter '", name, "' is frozen (requires_grad is false)"));
    add(name, t);
  }
  for (const std::string& want : names)
    if (std::find(sel.names.begin(), sel.names.end(), want) == sel.names.end()) {
      std::string known;
      for (const auto& p : all) known += (known.empty() ? "" : ", ") + p.first;
      throw ValueError(message(api, "unknown parameter '", want, "' (parameters: ", known, ")"));
    }
  if (sel.n == 0) throw ValueError(message(api, "the selected parameters hold no entries"));
  return sel;
}

RequestScope::RequestScope(nn::Module& model, const Selection& sel) : eval_(model), frozen_(sel.left_out) {
  for (Tensor& t : frozen_) t.requires_grad_(false);
}

RequestScope::~RequestScope() {
  for (Tensor& t : frozen_) t.requires_grad_(true);
}

std::size_t Selection::param_of(std::size_t r) const {
  return std::size_t(std::upper_bound(offsets.begin(), offsets.end(), r) - offsets.begin()) - 1;
}

std::size_t saturating_mul(std::size_t a, std::size_t b) {
  std::size_t r;
  return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
}

std::size_t saturating_add(std::size_t a, std::size_t b) {
  std::size_t r;
  return __builtin_add_overflow(a, b, &r) ? SIZE_MAX : r;
}

std::size_t limit_of(const HessianOptions& o) { return o.max_bytes ? o.max_bytes : hessian_memory_limit(); }

// Bytes of the dense result: `count` Hessians of the selection (saturating
// at SIZE_MAX, so that an overflow is refused rather than wrapped).
std::size_t dense_bytes(const Selection& sel, std::size_t count, bool diagonal_only) {
  std::size_t per = 0;
  if (diagonal_only)
    for (std::size_t sz : sel.sizes) per = saturating_add(per, saturating_mul(sz, sz));
  else
    per = saturating_mul(sel.n, sel.n);
  return saturating_mul(saturating_mul(per, count), sizeof(double));
}

void check_memory(const char* api, const Selection& sel, std::size_t count, const HessianOptions& o) {
  check_bytes(api, "the dense result", dense_bytes(sel, count, o.diagonal_only), sel, count, o);
}

TapeFacts tape_facts(const Tensor& y) {
  TapeFacts facts;
  walk_tape(
      {y},
      [&facts](const Node& n) {
        facts.elements += numel_of(n.output_shape);
        facts.oldest = std::min(facts.oldest, n.sequence);
      },
      [](const TensorImpl*) {});
  return facts;
}

NewTape new_tape(const Tensor& y, std::uint64_t since) {
  NewTape tape;
  walk_tape(
      {y}, [&tape](const Node& n) { tape.elements += numel_of(n.output_shape); }, [](const TensorImpl*) {},
      [&tape, since](const Node& n) {
        if (n.sequence >= since) return false;
        tape.shared = true;
        return true;
      });
  return tape;
}

std::size_t tape_elements(const Tensor& y) { return std::max<std::size_t>(tape_facts(y).elements, 1); }

// Seeds per backward pass: as many as keep one seed's copies of the whole tape
// near 64k entries (512 KB: elementwise passes stay in cache), but at least 8 so that
// products stay GEMM-sized; small problems take all their rows in one pass,
// since there the per-op overhead dominates. The user may choose instead.
std::size_t chunk_of(const HessianOptions& o, std::size_t rows, std::size_t per_seed) {
  const std::size_t k = o.chunk_size ? o.chunk_size : std::max<std::size_t>((std::size_t(1) << 16) / per_seed, 8);
  return std::max<std::size_t>(1, std::min(rows, k));
}

namespace {

thread_local ReuseScope* active_reuse = nullptr;
// Batches a scope keeps alive: the shapes of a request are few (the entry
// seeds; per parameter, whole chunks and a last partial one), and what is
// kept is memory held until the scope ends.
constexpr std::size_t kKeptSeedBatches = 8;

}  // namespace

ReuseScope::ReuseScope() : outermost_(active_reuse == nullptr) {
  if (outermost_) active_reuse = this;
}

ReuseScope::~ReuseScope() {
  if (outermost_) active_reuse = nullptr;
}

// The batch of this shape that no one else holds; else a new one, in a free
// slot or in place of the least recently used batch no one holds.
ReuseScope::Batch* ReuseScope::batch_for(const Shape& shape) {
  Batch* oldest_free = nullptr;
  for (Batch& b : batches_) {
    if (!held_alone(b.values)) continue;
    if (b.values.shape() == shape) {
      b.last_use = ++uses_;
      return &b;
    }
    if (!oldest_free || b.last_use < oldest_free->last_use) oldest_free = &b;
  }
  if (batches_.size() < kKeptSeedBatches) {
    if (batches_.empty()) batches_.reserve(kKeptSeedBatches);
    oldest_free = &batches_.emplace_back();
  }
  if (oldest_free) *oldest_free = Batch{zeros(shape), {}, ++uses_};
  return oldest_free;
}

Tensor one_hot_seeds(const Shape& shape, const std::vector<std::size_t>& ones) {
  ReuseScope::Batch* kept = active_reuse ? active_reuse->batch_for(shape) : nullptr;
  Tensor values = kept ? kept->values : zeros(shape);
  double* v = values.mutable_data();
  if (kept) {
    for (std::size_t i : kept->ones) v[i] = 0.0;
    kept->ones = ones;
  }
  for (std::size_t i : ones) v[i] = 1.0;
  return values;
}

Tensor staging_buffer(std::size_t size) {
  if (!active_reuse) return Tensor::empty({size});
  Tensor& kept = active_reuse->staging_;
  if (!kept.defined() || kept.numel() < size) kept = Tensor::empty({size});
  return kept;
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

void hessian_rows(const Tensor& y, std::size_t first, std::size_t count, const Selection& sel,
                  const HessianOptions& o, const RowSink& sink, const std::vector<bool>* wanted_blocks,
                  RowQueue* queue) {
  if (!y.requires_grad()) return;  // constant in θ: the Hessians are zero
  ReuseScope reuse;  // across the chunks below (and the samples of an enclosing scope)
  const std::size_t per_seed = count * tape_elements(y);
  std::vector<std::size_t> ones(count);
  for (std::size_t e = 0; e < count; ++e) ones[e] = e * y.numel() + first + e;
  const Tensor entry_seeds = one_hot_seeds(concat_shape({count}, y.shape()), ones);
  const std::vector<Tensor> g = recorded_grad(y, sel.params, entry_seeds, true);  // g[p]: [count, P.shape]

  GradOptions second_level;
  second_level.retain_graph = true;
  second_level.allow_unused = true;
  second_level.batched_grad_outputs = true;
  auto live = [&](std::size_t p) { return g[p].defined() && g[p].requires_grad(); };
  const std::size_t P = sel.params.size();
  auto wanted = [&](std::size_t p, std::size_t q) { return !wanted_blocks || (*wanted_blocks)[p * P + q]; };

  // Full rows, one parameter p at a time: a chunk of (entry, row of p) pairs
  // seeds g[p] alone, and one backward pass gives the blocks (p, q >= p) of
  // those rows (by symmetry the rest are their transposes); with
  // diagonal_only, the (P, P) blocks only. Seeding one g[p] per pass keeps
  // seeds free of all-zero rows for the other parameters, and the pass never
  // reaches the parts of the tape that only lead to q < p. Rows of parameters
  // that enter linearly (g[p] constant) are zero.
  struct Chunk {
    std::size_t p, t0, k;
  };
  std::vector<Chunk> chunks;
  std::vector<std::vector<std::size_t>> wrt_index(P);  // the blocks (p, q) each p's passes give
  std::vector<std::vector<Tensor>> wrt(P);
  std::size_t total_rows = 0;
  for (std::size_t p = 0; p < P; ++p) {
    if (!live(p)) continue;
    for (std::size_t q = p; q < (o.diagonal_only ? p + 1 : P); ++q)
      if (wanted(p, q)) wrt_index[p].push_back(q), wrt[p].push_back(sel.params[q]);
    if (wrt[p].empty()) continue;
    const std::size_t total = count * sel.sizes[p], k_max = chunk_of(o, total, per_seed);
    for (std::size_t t0 = 0; t0 < total; t0 += k_max) chunks.push_back({p, t0, std::min(k_max, total - t0)});
    total_rows += total;
  }
  Progress progress(count == 1 ? "Hessian rows" : "Hessian rows of " + std::to_string(count) + " outputs", total_rows,
                    o.progress);
  std::atomic<std::size_t> rows_here{0};
  std::atomic<std::size_t>& rows_done = queue ? queue->rows_done : rows_here;

  // Alone, this thread takes every chunk in turn; with a queue, the next one no thread has taken.
  std::size_t next = 0;
  auto take = [&] { return queue ? queue->take() : next++; };
  for (std::size_t c = take(); c < chunks.size(); c = take()) {
    const auto start = queue ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
    const auto [p, t0, k] = chunks[c];
    ones.resize(k);
    each_seed(sel.sizes[p], t0, k, [&](std::size_t i, std::size_t entry, std::size_t row) {
      ones[i] = (i * count + entry) * sel.sizes[p] + row;
    });
    const Tensor seeds = one_hot_seeds(concat_shape({k, count}, sel.params[p].shape()), ones);
    const std::vector<Tensor> rows = grad({g[p]}, wrt[p], {seeds}, second_level);
    for (std::size_t j = 0; j < rows.size(); ++j)
      if (rows[j].defined()) sink({p, wrt_index[p][j], t0, k, rows[j]});
    progress.update(rows_done += k);
    if (queue) queue->chunk_done(seconds_since(start), chunks.size() - std::min(chunks.size(), c + 1));
  }
  if (queue) queue->wait_for_helpers([&] { progress.update(rows_done); });  // the report runs to the end
}

namespace {

std::atomic<std::size_t> requested_threads{0};  // 0: automatic

// By default the rest of the work goes to threads only when it would take
// this long on one: starting a thread costs tens of microseconds, and a
// helper computing one output's rows needs its own forward pass and gradient.
constexpr double kPartsWorthThreads = 200e-6, kRowsWorthThreads = 2e-3;

/// The threads to spread `left` pieces of work over, after the first took `seconds`.
std::size_t threads_for(double seconds, std::size_t left, double worth) {
  const bool worth_it = requested_threads != 0 || seconds * double(left) >= worth;
  return worth_it ? std::min(num_threads(), left) : 1;
}

}  // namespace

// OpenBLAS's own threads would compete with ours for the cores: it runs on one
// while any request runs work in parallel, and gets its count back after the
// last one (requests may overlap on the user's threads).
class OneBlasThread {
 public:
  OneBlasThread() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (active_++ == 0) {
      previous_ = openblas_get_num_threads();
      openblas_set_num_threads(1);
    }
  }
  ~OneBlasThread() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--active_ == 0) openblas_set_num_threads(previous_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  static inline std::mutex mutex_;
  static inline std::size_t active_ = 0;
  static inline int previous_ = 1;
};

namespace {

// Helper threads, kept between requests: starting one costs tens of
// microseconds, and a new thread starts with empty caches of tensor blocks.
// A task goes to an idle helper or to a new one, never behind another
// request's task. Idle helpers wait for work until the process ends.
class Helpers {
 public:
  static Helpers& all() {
    static Helpers* helpers = new Helpers();  // never destroyed: idle helpers outlive static destruction
    return *helpers;
  }

  /// Runs task() on a helper; throws when no thread can be started.
  void start(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!idle_.empty()) {
        Helper* h = idle_.back();
        idle_.pop_back();
        h->task = std::move(task);
        h->woken.notify_one();
        return;
      }
    }
    auto h = std::make_unique<Helper>();
    h->task = std::move(task);
    std::thread([this, h = h.get()] { serve(h); }).detach();
    h.release();  // the thread's from now on
  }

 private:
  struct Helper {
    std::function<void()> task;  // empty while idle
    std::condition_variable woken;
  };

  void serve(Helper* h) {
    for (;;) {
      h->task();  // tasks keep their own exceptions (Crew::run)
      std::unique_lock<std::mutex> lock(mutex_);
      h->task = nullptr;
      idle_.push_back(h);
      h->woken.wait(lock, [h] { return static_cast<bool>(h->task); });
    }
  }

  std::mutex mutex_;
  std::vector<Helper*> idle_;
};

}  // namespace

Crew::Crew() = default;
Crew::~Crew() {
  failed_ = true;  // helpers still at work stop taking parts (an exception on the calling thread)
  join();
}

bool Crew::add(std::function<void()> work) {
  try {
    if (!blas_) blas_ = std::make_unique<OneBlasThread>();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++running_;
    }
    Helpers::all().start([this, work = std::move(work)]() mutable {
      {
        MutedProgress muted;  // the calling thread reports
        run(work);
      }
      work = nullptr;  // what it holds goes before the crew counts it done
      std::lock_guard<std::mutex> lock(mutex_);
      --running_;
      helper_returned_.notify_all();
    });
    return true;
  } catch (...) {  // no thread to be had: the running ones do its part
    std::lock_guard<std::mutex> lock(mutex_);
    --running_;
    return false;
  }
}

void Crew::run(const std::function<void()>& work) {
  try {
    work();
  } catch (...) {
    keep(std::current_exception());
  }
}

void Crew::wait(const std::function<void()>& meanwhile) {
  std::unique_lock<std::mutex> lock(mutex_);
  while (running_ > 0) {
    if (helper_returned_.wait_for(lock, std::chrono::milliseconds(200), [this] { return running_ == 0; })) break;
    lock.unlock();
    meanwhile();
    lock.lock();
  }
  lock.unlock();
  meanwhile();  // once more, for the helpers' last work
}

void Crew::keep(std::exception_ptr error) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!error_) error_ = std::move(error);
  failed_ = true;
}

void Crew::join() noexcept {
  std::unique_lock<std::mutex> lock(mutex_);
  helper_returned_.wait(lock, [this] { return running_ == 0; });
  lock.unlock();
  blas_.reset();
}

void Crew::finish() {
  join();
  if (error_) std::rethrow_exception(error_);
}

namespace {

// work(i) for i in [first, count) on `threads` threads, the calling one among
// them: each takes the next part not yet taken, until none is left or one
// failed. The calling thread, out of parts, calls `meanwhile` (when given) a
// few times a second until the helpers are done.
void spread(std::size_t first, std::size_t count, std::size_t threads,
            const std::function<void(std::size_t)>& work, const std::function<void()>& meanwhile = nullptr) {
  if (threads <= 1) {
    for (std::size_t i = first; i < count; ++i) work(i);
    return;
  }
  Crew crew;
  std::atomic<std::size_t> next{first};
  auto parts = [&] {
    ReuseScope reuse_here;
    for (std::size_t i; !crew.failed() && (i = next++) < count;) work(i);
  };
  for (std::size_t t = 1; t < threads && crew.add(parts); ++t) {
  }
  crew.run(parts);
  if (meanwhile) crew.wait(meanwhile);
  crew.finish();
}

}  // namespace

void for_each_part(std::size_t count, const std::function<void(std::size_t)>& work) {
  if (count == 0) return;
  const auto start = std::chrono::steady_clock::now();
  work(0);
  spread(1, count, threads_for(seconds_since(start), count - 1, kPartsWorthThreads), work);
}

SampleWork::SampleWork(std::size_t count, bool progress, std::function<void(const Tensor& y, std::size_t i)> work)
    : count_(count),
      work_(std::move(work)),
      progress_(count > 1 ? std::make_unique<Progress>("per-sample Hessians", count, progress) : nullptr),
      since_(next_node_sequence()) {}

SampleWork::~SampleWork() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }
  changed_.notify_all();
}

void SampleWork::run(const Tensor& y, std::size_t i) {
  if (!progress_) return work_(y, i);
  {
    MutedProgress quiet;  // one report for the whole batch
    work_(y, i);
  }
  const std::size_t done = ++done_;
  if (std::this_thread::get_id() == caller_) progress_->update(done);
}

void SampleWork::add(const Tensor& y, std::size_t i) {
  const std::uint64_t made_since = since_;
  if (mode_ == Mode::first) {
    const auto start = std::chrono::steady_clock::now();
    run(y, i);
    threads_ = threads_for(seconds_since(start), count_ - std::min(count_, i + 1), kPartsWorthThreads);
    mode_ = threads_ > 1 ? Mode::queued : Mode::at_once;
  } else if (mode_ == Mode::queued) {
    const NewTape tape = new_tape(y, made_since);
    if (tape.shared) {  // shares nodes with what came before it: no threads from here on
      drain();
      mode_ = Mode::at_once;
      run(y, i);
    } else {
      std::vector<Tensor> done;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        queue_.push_back({y, i, tape.elements * sizeof(double)});
        queued_bytes_ += queue_.back().bytes;
        done.swap(done_graphs_);
      }
      changed_.notify_one();
      done.clear();  // freed here, outside the lock
      if (!helpers_started_) {
        helpers_started_ = true;
        for (std::size_t t = 1; t < threads_ && crew_.add([this] { serve(); }); ++t) {
        }
      }
      Queued next;  // the queue holds enough: this thread takes its share too
      while (queued_bytes_ >= kQueuedGraphBytes && take(next, false)) run(next.y, next.i);
      if (progress_) progress_->update(done_);
    }
  } else {
    run(y, i);
  }
  if (crew_.failed()) drain();  // rethrows a helper's error
  since_ = next_node_sequence();
}

bool SampleWork::take(Queued& next, bool wait) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (wait) changed_.wait(lock, [this] { return !queue_.empty() || closed_; });
  if (queue_.empty() || crew_.failed()) return false;
  next = std::move(queue_.front());
  queue_.pop_front();
  queued_bytes_ -= next.bytes;
  return true;
}

// A sample's graph goes back to the calling thread, which made its forward
// nodes, to be freed there: memory freed on another thread stays in that
// thread's caches, or reaches the heap through its locks.
void SampleWork::serve() {
  ReuseScope reuse;  // this helper's seed batches and staging buffer, for every sample it takes
  for (Queued next; take(next, true);) {
    run(next.y, next.i);
    std::lock_guard<std::mutex> lock(mutex_);
    done_graphs_.push_back(std::move(next.y));
  }
}

void SampleWork::drain() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }
  changed_.notify_all();
  for (Queued next; take(next, false);) {
    run(next.y, next.i);
    next.y = Tensor();
  }
  crew_.wait([this] {
    if (progress_) progress_->update(done_);
  });
  done_graphs_.clear();
  crew_.finish();
}

void SampleWork::finish() { drain(); }

RowQueue::RowQueue(std::function<Tensor()> copy, std::function<void(const Tensor&)> rows, const Tensor& y,
                   std::uint64_t since)
    : copy_(std::move(copy)), rows_(std::move(rows)), y_(y), since_(since) {}

std::size_t RowQueue::take() { return crew_.failed() ? std::size_t(-1) : next_++; }

void RowQueue::chunk_done(double seconds, std::size_t left) {
  if (decided_ || std::this_thread::get_id() != caller_) return;
  decided_ = true;
  const std::size_t threads = threads_for(seconds, left, kRowsWorthThreads);
  if (threads <= 1 || !owns_its_tape(y_, since_)) return;
  // Every copy is made and checked before any helper starts: a check walks the
  // copy's tape, which must not race with a helper's pass over shared nodes.
  std::vector<Tensor> copies;
  for (std::size_t t = 1; t < threads; ++t) {
    const std::uint64_t since = next_node_sequence();
    Tensor y;
    try {
      y = copy_();  // the model runs on this thread
    } catch (const std::exception&) {  // (out of memory, say) fewer helpers
      break;
    }
    if (!owns_its_tape(y, since)) break;  // the model keeps nodes between calls
    copies.push_back(std::move(y));
  }
  for (const Tensor& y : copies)
    if (!crew_.add([this, y] { rows_(y); })) break;
}

void RowQueue::wait_for_helpers(const std::function<void()>& report) {
  if (std::this_thread::get_id() == caller_) crew_.wait(report);
}

void rows_on_threads(const std::function<Tensor()>& make, const std::function<Tensor()>& make_copy,
                     const Selection& sel, const HessianOptions& o, const RowSink& sink,
                     const std::vector<bool>* wanted_blocks) {
  const std::uint64_t since = next_node_sequence();
  const Tensor loss = make();
  RowQueue queue(
      make_copy, [&](const Tensor& loss_copy) { hessian_rows(loss_copy, 0, 1, sel, o, sink, wanted_blocks, &queue); },
      loss, since);
  hessian_rows(loss, 0, 1, sel, o, sink, wanted_blocks, &queue);
  queue.finish();
}

void hessians_of_entries(const Tensor& y, const Selection& sel, const HessianOptions& o,
                         const std::function<RowSink(std::size_t entry)>& sink_from,
                         const std::vector<bool>* wanted_blocks) {
  for (std::size_t first = 0; first < y.numel(); first += kEntryGroup)
    hessian_rows(y, first, std::min(kEntryGroup, y.numel() - first), sel, o, sink_from(first), wanted_blocks);
}

Tensor part_of(const Tensor& V, const Selection& sel, std::size_t p) {
  const auto begin = std::int64_t(sel.offsets[p]), end = std::int64_t(sel.offsets[p] + sel.sizes[p]);
  return reshape(slice(V, 1, begin, end), concat_shape({V.shape()[0]}, sel.params[p].shape()));
}

std::vector<Tensor> parts_of(const Tensor& V, const Selection& sel, const std::vector<std::size_t>& group) {
  std::vector<Tensor> parts;
  for (std::size_t p : group) parts.push_back(part_of(V, sel, p));
  return parts;
}

std::vector<Tensor> block_grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& seeds,
                               const std::vector<Tensor>& inputs, bool create_graph) {
  std::vector<Tensor> live, live_seeds;
  for (std::size_t i = 0; i < outputs.size(); ++i)
    if (outputs[i].defined() && outputs[i].requires_grad() && seeds[i].defined())
      live.push_back(outputs[i]), live_seeds.push_back(seeds[i]);
  if (live.empty()) return std::vector<Tensor>(inputs.size());
  GradOptions o;
  o.create_graph = create_graph;
  o.retain_graph = true;
  o.allow_unused = true;
  o.batched_grad_outputs = true;
  return grad(live, inputs, live_seeds, o);
}

std::vector<Tensor> recorded_grad(const Tensor& y, const std::vector<Tensor>& wrt, const Tensor& seed, bool batched) {
  GradOptions o;
  o.create_graph = true;
  o.allow_unused = true;
  o.batched_grad_outputs = batched;
  return grad({y}, wrt, {seed}, o);
}

std::vector<std::vector<std::size_t>> parameter_groups(const Selection& sel, bool block_diagonal) {
  std::vector<std::vector<std::size_t>> groups;
  for (std::size_t p = 0; p < sel.params.size(); ++p) {
    if (block_diagonal || groups.empty()) groups.emplace_back();
    groups.back().push_back(p);
  }
  return groups;
}

std::vector<Tensor> pick(const std::vector<Tensor>& all, const std::vector<std::size_t>& group) {
  std::vector<Tensor> out;
  for (std::size_t p : group) out.push_back(all[p]);
  return out;
}

ColumnSum::ColumnSum(const Selection& sel, std::size_t k) : sel_(sel), k_(k), written_(sel.params.size(), false) {}

double* ColumnSum::values() {
  if (!out_.defined()) out_ = Tensor::empty({k_, sel_.n});
  return out_.mutable_data();
}

// A single row's part for the parameter at column 0 already has the layout of
// the row's start. When its buffer is its own (no other tensor views it) and
// has room for the whole row, the row is built in it: the part, often the
// largest (a first layer's weight), is not copied. The part's own values are
// never changed: a second part for those columns first moves the row out.
bool ColumnSum::adopt(const Tensor& part) {
  part.data();  // deferred values are computed (and the buffer taken) first
  const std::shared_ptr<TensorImpl>& impl = part.impl();
  if (!held_alone(part) || impl->offset != 0 || impl->storage->capacity < sel_.n) return false;
  auto row = make_cached<TensorImpl>();
  row->shape = {1, sel_.n};
  row->numel = sel_.n;
  row->storage = impl->storage;
  out_ = Tensor(std::move(row));
  adopted_ = true;
  return true;
}

void ColumnSum::add(const std::vector<std::size_t>& group, const std::vector<Tensor>& parts, double scale) {
  const std::size_t k = k_, n = sel_.n;
  for (std::size_t j = 0; j < group.size(); ++j) {
    if (!parts[j].defined()) continue;
    const std::size_t p = group[j], size = sel_.sizes[p];
    if (!out_.defined() && k == 1 && sel_.offsets[p] == 0 && scale == 1.0 && adopt(parts[j])) {
      written_[p] = true;
      continue;
    }
    if (adopted_ && sel_.offsets[p] == 0) out_ = out_.clone(), adopted_ = false;
    double* o = values();
    const double* g = parts[j].data();
    for (std::size_t i = 0; i < k; ++i) {
      double* row = o + i * n + sel_.offsets[p];
      const double* part = g + i * size;
      if (written_[p])
        for (std::size_t c = 0; c < size; ++c) row[c] += scale * part[c];
      else
        for (std::size_t c = 0; c < size; ++c) row[c] = scale * part[c];
    }
    written_[p] = true;
  }
}

Tensor ColumnSum::result() {
  const std::size_t k = k_, n = sel_.n;
  double* o = values();
  for (std::size_t p = 0; p < written_.size(); ++p)
    if (!written_[p])
      for (std::size_t i = 0; i < k; ++i) std::fill_n(o + i * n + sel_.offsets[p], sel_.sizes[p], 0.0);
  return out_;
}

void check_defined(const char* api, const std::vector<Tensor>& inputs) {
  for (std::size_t i = 0; i < inputs.size(); ++i)
    if (!inputs[i].defined()) throw ValueError(message(api, "input ", i, " is an undefined tensor"));
}

std::size_t batch_size(const char* api, const std::vector<Tensor>& inputs, const Tensor& target) {
  if (inputs.empty()) throw ValueError(message(api, "no inputs given"));
  check_defined(api, inputs);
  std::size_t b = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& x = inputs[i];
    if (x.ndim() == 0)
      throw ShapeError(message(api, "with is_batch every input needs a leading batch dimension; input ", i,
                                       " has shape ", to_string(x.shape())));
    if (i == 0) b = x.shape()[0];
    else if (x.shape()[0] != b)
      throw ShapeError(message(api, "inputs disagree on the batch size: ", to_string(inputs[0].shape()),
                                       " and ", to_string(x.shape())));
  }
  if (b == 0) throw ValueError(message(api, "the batch is empty (input 0 has shape ", to_string(inputs[0].shape()), ")"));
  if (target.defined() && (target.ndim() == 0 || target.shape()[0] != b))
    throw ShapeError(message(api, "target of shape ", to_string(target.shape()),
                                     " does not match the batch size ", b, " of the inputs"));
  return b;
}

std::vector<Tensor> sample(const std::vector<Tensor>& inputs, std::size_t b) {
  std::vector<Tensor> out;
  for (const Tensor& x : inputs) out.push_back(slice(x, 0, std::int64_t(b), std::int64_t(b) + 1));
  return out;
}

Tensor sample_target(const Tensor& target, std::size_t b) {
  return target.defined() ? slice(target, 0, std::int64_t(b), std::int64_t(b) + 1) : target;
}

namespace {

std::string shapes_of(const std::vector<Tensor>& inputs) {
  std::string s;
  for (const Tensor& x : inputs) s += (s.empty() ? "" : ", ") + to_string(x.shape());
  return s;
}

// f(), a shape error from the user's model or criterion told where it came
// from: the hesse call and what it passed (their own errors name only the op).
template <class F>
Tensor called_from(const char* api, const std::string& what, F&& f) {
  try {
    return f();
  } catch (const ShapeError& e) {
    throw ShapeError(std::string(e.what()) + " [in hesse::" + api + ", " + what + "]");
  }
}

}  // namespace

Tensor run_model(const char* api, nn::Module& model, const std::vector<Tensor>& inputs) {
  check_defined(api, inputs);
  return called_from(api, "the model on inputs of shapes " + shapes_of(inputs), [&] { return model(inputs); });
}

Tensor run_sample(const char* api, nn::Module& model, const std::vector<Tensor>& inputs, std::size_t b) {
  return called_from(api, "is_batch: sample " + std::to_string(b) + " of inputs of shapes " + shapes_of(inputs),
                     [&] { return model(sample(inputs, b)); });
}

Tensor scalar_loss(const char* api, const Criterion& criterion, const Tensor& output, const Tensor& target) {
  if (!criterion) throw ValueError(message(api, "no criterion given"));
  Tensor loss = called_from(api,
                            "the criterion on an output of shape " + to_string(output.shape()) +
                                " and a target of shape " + (target.defined() ? to_string(target.shape()) : "undefined"),
                            [&] { return criterion(output, target); });
  if (!loss.defined() || loss.numel() != 1)
    throw ShapeError(message(api, "the criterion returned shape ",
                                     loss.defined() ? to_string(loss.shape()) : "undefined",
                                     " where a scalar loss is needed (use reduction sum or mean)"));
  return loss;
}

Outputs loss_outputs(const char* api, nn::Module& model, const Criterion& criterion, const std::vector<Tensor>& inputs,
                     const Tensor& target) {
  return [=, &model, &criterion, &inputs, &target](const StartFn& start, const OutputFn& each) {
    const Tensor loss = scalar_loss(api, criterion, run_model(api, model, inputs), target);
    start({});
    each(loss, 0);
  };
}

void check_sample_output(const char* api, const Tensor& y, std::size_t b, const Shape& first) {
  if (b == 0 && (y.ndim() == 0 || y.shape()[0] != 1))
    throw ShapeError(message(api, "with is_batch the model's output needs a leading batch dimension; one sample gave shape ",
                             to_string(y.shape())));
  if (b > 0 && y.shape() != first)
    throw ShapeError(message(api, "with is_batch every sample's output needs the same shape: sample 0 gave ",
                             to_string(first), ", sample ", b, " gave ", to_string(y.shape())));
}

Outputs model_outputs(const char* api, nn::Module& model, const std::vector<Tensor>& inputs, const HessianOptions& o) {
  return [=, &model, &inputs](const StartFn& start, const OutputFn& each) {
    ReuseScope reuse;  // every sample's (and entry group's) passes take seed batches of the same shapes
    const std::size_t batches = output_count(api, inputs, o);
    Shape first;
    for (std::size_t b = 0; b < batches; ++b) {
      const Tensor y = o.is_batch ? run_sample(api, model, inputs, b) : run_model(api, model, inputs);
      if (o.is_batch) check_sample_output(api, y, b, first);
      if (b == 0) {
        first = y.shape();
        Shape lead = first;
        if (o.is_batch) lead[0] = batches;
        start(lead);
      }
      if (!each(y, b * y.numel())) return;
    }
  };
}

std::size_t output_count(const char* api, const std::vector<Tensor>& inputs, const HessianOptions& o) {
  return o.is_batch ? batch_size(api, inputs) : 1;
}

void work_on_outputs(const Outputs& outputs, std::size_t count, const HessianOptions& o, const StartFn& start,
                     const std::function<void(const Tensor& y, std::size_t base)>& work) {
  SampleWork samples(count, o.progress, [&](const Tensor& y, std::size_t i) { work(y, i * y.numel()); });
  outputs(start, [&, i = std::size_t(0)](const Tensor& y, std::size_t) mutable {
    samples.add(y, i++);  // entries start at i * y.numel()
    return true;
  });
  samples.finish();
}

void check_bytes(const char* api, const std::string& what, std::size_t bytes, const Selection& sel,
                 std::size_t count, const HessianOptions& o) {
  if (bytes > limit_of(o))
    throw MemoryLimitError(message(
        api, what, " needs ", bytes, " bytes (", count, " Hessian", count == 1 ? "" : "s", " of n = ", sel.n,
        " parameters) but the limit is ", limit_of(o),
        " bytes; use diagonal_only, a smaller params selection, packed or block-sparse storage, or the matrix-free "
        "routes (hessian_vector_product, loss_hessian_diagonal, loss_hessian_operator with lanczos), or raise "
        "HessianOptions::max_bytes"));
}

std::size_t index_of(const char* api, const std::vector<std::string>& names, const std::string& name) {
  const auto it = std::find(names.begin(), names.end(), name);
  if (it != names.end()) return std::size_t(it - names.begin());
  std::string known;
  for (const std::string& n : names) known += (known.empty() ? "" : ", ") + n;
  throw ValueError(message(api, "unknown parameter '", name, "' (selected: ", known, ")"));
}

}  // namespace hesse::detail

namespace hesse {

void set_num_threads(std::size_t threads) { detail::requested_threads = threads; }

std::size_t num_threads() {
  if (const std::size_t t = detail::requested_threads) return t;
  static const std::size_t cores = [] {  // the cores this process may run on (reads the kernel: once)
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0) return std::max<std::size_t>(1, CPU_COUNT(&allowed));
    return std::max<std::size_t>(1, std::thread::hardware_concurrency());
  }();
  return cores;
}

}  // namespace hesse
