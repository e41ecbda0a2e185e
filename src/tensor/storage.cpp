// Pooled storage. Freshly mapped memory costs ~2.7 ms/MB to fault in on the
// machines hesse targets, so released buffers are kept in a free list keyed by
// capacity and handed out again; capacities are rounded up to powers of two
// (small buffers) or 1/8 steps (large ones) so that sizes meet again.
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <new>

#include "hesse/tensor.hpp"

namespace hesse::detail {
namespace {

constexpr std::size_t kMaxPooledBytes = std::size_t(2) << 30;  // keep at most 2 GiB cached

struct Pool {
  std::mutex mutex;
  std::multimap<std::size_t, double*> free_list;
  std::size_t cached_bytes = 0;

  ~Pool() {
    for (auto& [capacity, ptr] : free_list) std::free(ptr);
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may outlive static destruction
  return *p;
}

std::size_t round_capacity(std::size_t n) {
  if (n <= 8) return 8;
  std::size_t p = 8;
  while (p < n) p <<= 1;
  if (p <= (std::size_t(1) << 16)) return p;  // powers of two up to 512 KiB
  std::size_t step = p / 16;                  // then steps of 1/16 of the power
  return (n + step - 1) / step * step;
}

}  // namespace

Storage::Storage(std::size_t n) {
  // rounding up and the byte count must not wrap around
  if (n > std::numeric_limits<std::size_t>::max() / (2 * sizeof(double))) throw std::bad_alloc();
  const std::size_t want = round_capacity(n);
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_list.lower_bound(want);
    if (it != p.free_list.end() && it->first <= want + want / 4) {
      capacity = it->first;
      data = it->second;
      p.cached_bytes -= capacity * sizeof(double);
      p.free_list.erase(it);
      return;
    }
  }
  capacity = want;
  data = static_cast<double*>(std::aligned_alloc(64, capacity * sizeof(double)));
  if (data == nullptr) throw std::bad_alloc();
}

Storage::~Storage() {
  Pool& p = pool();
  const std::size_t bytes = capacity * sizeof(double);
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.cached_bytes + bytes <= kMaxPooledBytes) {
      // in front of its equals: the most recently freed (cache-warm) buffer goes out first
      p.free_list.emplace_hint(p.free_list.lower_bound(capacity), capacity, data);
      p.cached_bytes += bytes;
      return;
    }
  }
  std::free(data);
}

}  // namespace hesse::detail
