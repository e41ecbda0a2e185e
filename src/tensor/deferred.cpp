// Deferred values. A storage may be created with a computation instead of
// values, for a result nobody may ever read (a first-level gradient that is
// only differentiated again). It takes a pooled buffer and runs the
// computation on its first read() or write(). The computation reads other
// storages (its operands); a write() to one of those first runs every
// computation still waiting to read it, so a deferred value is always the one
// an eager computation would have given.
#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "hesse/tensor.hpp"

namespace hesse::detail {

struct Storage::Pending {
  std::size_t n;
  std::function<void(double*)> fill;
  std::once_flag once;  // two threads reading at once compute the values once
};

namespace {

// The deferred storages still waiting to read a storage, keyed by that storage.
// Only deferral, writes to its operands and their end come here: rare events.
struct Readers {
  std::mutex mutex;
  std::unordered_map<const Storage*, std::vector<std::weak_ptr<Storage>>> of;
};

Readers& readers() {
  static Readers* r = new Readers();  // never destroyed, like the pool: storages may outlive statics
  return *r;
}

}  // namespace

std::shared_ptr<Storage> Storage::deferred(std::size_t n, std::function<void(double*)> fill,
                                           const std::vector<Storage*>& reads) {
  std::shared_ptr<Storage> s(new Storage());
  s->pending_values_ = new Pending{n, std::move(fill), {}};
  s->pending_ = true;
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
    Storage buffer(pending_values_->n);  // pooled; goes back if fill throws (the values stay pending)
    pending_values_->fill(buffer.data_);
    std::swap(data_, buffer.data_);
    std::swap(capacity, buffer.capacity);
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

void Storage::forget_deferral() {
  if (has_readers_.load(std::memory_order_acquire)) {
    Readers& r = readers();
    std::lock_guard<std::mutex> lock(r.mutex);
    r.of.erase(this);
  }
  delete pending_values_;  // (outside the lock: it may free operands)
}

}  // namespace hesse::detail
