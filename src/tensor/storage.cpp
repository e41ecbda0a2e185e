// Pooled storage. Freshly mapped memory costs ~2.7 ms/MB to fault in on the
// machines hesse targets, so released buffers are kept in a free list keyed by
// capacity and handed out again; capacities are rounded up to powers of two
// (small buffers) or 1/16 steps (large ones) so that sizes meet again. Each
// capacity has its own stack, so taking and returning a buffer allocates nothing.
// Buffers of up to 512 bytes are recycled per thread instead, with the blocks
// of tensors and nodes below: no lock. (Deferred values: deferred.cpp.)
#include <cstdlib>
#include <limits>
#include <unordered_map>
#include <vector>
#include <mutex>
#include <new>

#include "../detail.hpp"

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
  if (n <= 8) return 8;
  std::size_t p = 8;
  while (p < n) p <<= 1;
  if (p <= (std::size_t(1) << 16)) return p;  // powers of two up to 512 KiB
  std::size_t step = p / 16;                  // then steps of 1/16 of the power
  return (n + step - 1) / step * step;
}

// ---- recycled blocks for tensors, storages and nodes (see detail.hpp) ----

// bytes; larger blocks are not recycled. Under AddressSanitizer nothing is:
// a recycled block would hide a use after free from it.
#if defined(__SANITIZE_ADDRESS__)
constexpr std::size_t kLargestCachedBlock = 0;
#else
constexpr std::size_t kLargestCachedBlock = 512;
#endif
constexpr std::size_t kMaxCachedBlocks = 4096;    // per size and thread
// cache lines: small tensors' values live in blocks too, aligned like the pool's
constexpr std::align_val_t kBlockAlignment{64};
constexpr std::size_t kSlots = kLargestCachedBlock / 16 + 1;

struct FreeBlock {
  FreeBlock* next;
};

// Trivially destructible, so that reaching it is a plain initial-exec TLS
// access: a thread_local with a destructor is reached through a guard and
// __tls_get_addr on every use. The blocks are released by a separate object,
// registered the first time a block is cached.
struct BlockCache {
  FreeBlock* head[kSlots];
  std::size_t count[kSlots];
};

thread_local bool cache_gone HESSE_FAST_TLS = false;  // readable during thread exit
thread_local bool cache_armed HESSE_FAST_TLS = false;  // its releaser is registered
thread_local BlockCache cache HESSE_FAST_TLS = {};

struct CacheReleaser {
  ~CacheReleaser() {
    cache_gone = true;  // blocks released later on this thread go straight back to the heap
    for (FreeBlock*& h : cache.head)
      while (h) {
        FreeBlock* next = h->next;
        ::operator delete(h, kBlockAlignment);
        h = next;
      }
  }
};

void arm_cache() {
  thread_local CacheReleaser releaser;  // constructed (and its destructor registered) once per thread
  (void)releaser;
  cache_armed = true;
}

}  // namespace

void* take_block(std::size_t size) {
  const std::size_t slot = (size + 15) / 16;
  if (size <= kLargestCachedBlock && !cache_gone) {
    BlockCache& c = cache;
    if (FreeBlock* b = c.head[slot]) {
      c.head[slot] = b->next;
      --c.count[slot];
      return b;
    }
  }
  return ::operator new(slot * 16, kBlockAlignment);
}

void give_block(void* block, std::size_t size) {
  const std::size_t slot = (size + 15) / 16;
  if (size <= kLargestCachedBlock && !cache_gone) {
    if (!cache_armed) arm_cache();
    BlockCache& c = cache;
    if (c.count[slot] < kMaxCachedBlocks) {
      c.head[slot] = new (block) FreeBlock{c.head[slot]};
      ++c.count[slot];
      return;
    }
  }
  ::operator delete(block, kBlockAlignment);
}

Storage::Storage(std::size_t n) {
  // rounding up and the byte count must not wrap around
  if (n > std::numeric_limits<std::size_t>::max() / (2 * sizeof(double))) throw std::bad_alloc();
  const std::size_t want = round_capacity(n);
  if (want * sizeof(double) <= kLargestCachedBlock) {  // small: this thread's blocks, no lock
    capacity = want;
    data_ = static_cast<double*>(take_block(want * sizeof(double)));
    return;
  }
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_lists.find(want);
    if (it != p.free_lists.end() && !it->second.empty()) {
      capacity = want;
      data_ = it->second.back();  // the most recently freed: still in cache
      it->second.pop_back();
      p.cached_bytes -= capacity * sizeof(double);
      return;
    }
  }
  capacity = want;
  data_ = static_cast<double*>(std::aligned_alloc(64, capacity * sizeof(double)));
  if (data_ == nullptr) throw std::bad_alloc();
}

Storage::~Storage() {
  if (pending_values_ || has_readers_.load(std::memory_order_acquire)) forget_deferral();
  if (!data_) return;  // deferred values never computed took no buffer
  const std::size_t bytes = capacity * sizeof(double);
  if (bytes <= kLargestCachedBlock) {
    give_block(data_, bytes);
    return;
  }
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.cached_bytes + bytes <= kMaxPooledBytes) {
      p.free_lists[capacity].push_back(data_);
      p.cached_bytes += bytes;
      return;
    }
  }
  std::free(data_);
}

}  // namespace hesse::detail
