// Pooled storage. Freshly mapped memory costs ~2.7 ms/MB to fault in on the
// machines hesse targets, so released buffers are kept in a free list keyed by
// capacity and handed out again; capacities are rounded up to powers of two
// (small buffers) or 1/16 steps (large ones) so that sizes meet again. Each
// capacity has its own stack, so taking and returning a buffer allocates nothing.
//
// Deferred values: a storage may be created with a computation instead of
// values (a first-level gradient whose value nobody may ever read). It takes a
// buffer and runs the computation on the first read() or write(); and since
// the computation reads other storages, a write() to one of those first runs
// every computation still waiting to read it.
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "hesse/tensor.hpp"

namespace hesse::detail {
namespace {

constexpr std::size_t kMaxPooledBytes = std::size_t(2) << 30;  // keep at most 2 GiB cached

struct Pool {
  std::mutex mutex;
  std::unordered_map<std::size_t, std::vector<double*>> free_lists;  // by capacity
  std::size_t cached_bytes = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may outlive static destruction
  return *p;
}

std::size_t round_capacity(std::size_t n) {
  // rounding up and the byte count must not wrap around
  if (n > std::numeric_limits<std::size_t>::max() / (2 * sizeof(double))) throw std::bad_alloc();
  if (n <= 8) return 8;
  std::size_t p = 8;
  while (p < n) p <<= 1;
  if (p <= (std::size_t(1) << 16)) return p;  // powers of two up to 512 KiB
  std::size_t step = p / 16;                  // then steps of 1/16 of the power
  return (n + step - 1) / step * step;
}

double* take_buffer(std::size_t capacity) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_lists.find(capacity);
    if (it != p.free_lists.end() && !it->second.empty()) {
      double* data = it->second.back();  // the most recently freed: still in cache
      it->second.pop_back();
      p.cached_bytes -= capacity * sizeof(double);
      return data;
    }
  }
  auto* data = static_cast<double*>(std::aligned_alloc(64, capacity * sizeof(double)));
  if (data == nullptr) throw std::bad_alloc();
  return data;
}

void give_back(double* data, std::size_t capacity) {
  Pool& p = pool();
  const std::size_t bytes = capacity * sizeof(double);
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.cached_bytes + bytes <= kMaxPooledBytes) {
      p.free_lists[capacity].push_back(data);
      p.cached_bytes += bytes;
      return;
    }
  }
  std::free(data);
}

// The deferred storages still waiting to read a storage, keyed by that storage.
// Only deferral and writes to its operands come here: rare events.
struct Readers {
  std::mutex mutex;
  std::unordered_map<const Storage*, std::vector<std::weak_ptr<Storage>>> of;
};

Readers& readers() {
  static Readers* r = new Readers();  // never destroyed, like the pool
  return *r;
}

}  // namespace

struct Storage::Pending {
  std::function<void(double*)> fill;
  std::once_flag once;  // two threads reading at once compute the values once
};

Storage::Storage(std::size_t n) : capacity(round_capacity(n)), data_(take_buffer(capacity)) {}

Storage::Storage(std::size_t n, std::unique_ptr<Pending> pending)
    : capacity(round_capacity(n)), pending_values_(std::move(pending)), pending_(true) {}

Storage::~Storage() {
  if (has_readers_.load(std::memory_order_acquire)) {
    Readers& r = readers();
    std::lock_guard<std::mutex> lock(r.mutex);
    r.of.erase(this);
  }
  if (data_) give_back(data_, capacity);  // deferred values never read took no buffer
}

std::shared_ptr<Storage> Storage::deferred(std::size_t n, std::function<void(double*)> fill,
                                           const std::vector<Storage*>& reads) {
  auto pending = std::make_unique<Pending>();
  pending->fill = std::move(fill);
  std::shared_ptr<Storage> s(new Storage(n, std::move(pending)));
  std::vector<std::shared_ptr<Storage>> dropped;  // released after the lock: freeing one takes it
  Readers& r = readers();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (Storage* operand : reads) {
    auto& list = r.of[operand];
    // drop readers that have run or died, so that lists stay short
    list.erase(std::remove_if(list.begin(), list.end(),
                              [&dropped](const std::weak_ptr<Storage>& w) {
                                auto reader = w.lock();
                                if (reader && reader->pending_.load(std::memory_order_acquire)) return false;
                                dropped.push_back(std::move(reader));
                                return true;
                              }),
               list.end());
    list.push_back(s);
    operand->has_readers_.store(true, std::memory_order_release);
  }
  return s;
}

double* Storage::materialize() {
  std::call_once(pending_values_->once, [this] {
    double* data = take_buffer(capacity);
    try {
      pending_values_->fill(data);
    } catch (...) {
      give_back(data, capacity);
      throw;  // still pending: the next access tries again
    }
    data_ = data;
    pending_.store(false, std::memory_order_release);
    pending_values_->fill = nullptr;  // lets the operands go
  });
  return data_;
}

// Runs the deferred computations that read this storage, one at a time and
// outside the lock (each reads storages, and letting its operands go may free
// storages, which takes the lock). A reader leaves the list only once it has
// run, so an exception leaves the rest registered.
void Storage::settle_readers() {
  Readers& r = readers();
  for (;;) {
    std::shared_ptr<Storage> next;
    std::vector<std::shared_ptr<Storage>> dropped;  // released after the lock: freeing one takes it
    {
      std::lock_guard<std::mutex> lock(r.mutex);
      auto it = r.of.find(this);
      while (it != r.of.end() && !it->second.empty() && !next) {
        next = it->second.back().lock();
        if (next && next->pending_.load(std::memory_order_acquire)) break;
        dropped.push_back(std::move(next));
        it->second.pop_back();
      }
      if (!next) {
        if (it != r.of.end()) r.of.erase(it);
        has_readers_.store(false, std::memory_order_release);
        return;
      }
    }
    next->read();
  }
}

}  // namespace hesse::detail
