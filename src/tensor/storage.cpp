// Pooled storage. Freshly mapped memory costs ~2.7 ms/MB to fault in on the
// machines hesse targets, so released buffers are kept in a free list keyed by
// capacity and handed out again; capacities are rounded up to powers of two
// (small buffers) or 1/16 steps (large ones) so that sizes meet again. Each
// capacity has its own stack, so taking and returning a buffer allocates nothing.
// Buffers of up to 512 bytes are recycled per thread instead, with the blocks
// of tensors and nodes below: no lock; a thread's recently released larger
// ones are its own to take first. (Deferred values: deferred.cpp.)
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

// ---- a thread's recently released buffers ----

// Larger buffers freed on a thread are taken again by that thread first: one
// that another core released comes with its lines in that core's cache, and
// every write to it moves them over (per-sample Hessians on two threads ran
// 5% faster for this). A thread keeps at most kRecentBytes so; trivially
// destructible, as above; its buffers go back to the shared pool when the
// thread ends.
constexpr std::size_t kRecentBuffers = 32, kRecentBytes = std::size_t(2) << 20;  // about a core's cache

struct RecentBuffers {
  double* data[kRecentBuffers];
  std::size_t capacity[kRecentBuffers];  // in doubles
  std::size_t count;                     // oldest first
  std::size_t bytes;
};

thread_local bool recent_gone HESSE_FAST_TLS = false;
thread_local bool recent_armed HESSE_FAST_TLS = false;
thread_local RecentBuffers recent HESSE_FAST_TLS = {};

// Into the shared pool, or back to the heap when the pool holds enough.
void pool_or_free(double* data, std::size_t capacity) {
  const std::size_t bytes = capacity * sizeof(double);
  Pool& p = pool();
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

void drop_oldest_recent() {
  RecentBuffers& r = recent;
  pool_or_free(r.data[0], r.capacity[0]);
  r.bytes -= r.capacity[0] * sizeof(double);
  --r.count;
  std::copy(r.data + 1, r.data + 1 + r.count, r.data);
  std::copy(r.capacity + 1, r.capacity + 1 + r.count, r.capacity);
}

struct RecentReleaser {
  ~RecentReleaser() {
    recent_gone = true;  // buffers released later on this thread go straight to the pool
    while (recent.count > 0) drop_oldest_recent();
  }
};

double* take_recent(std::size_t capacity) {
  RecentBuffers& r = recent;
  for (std::size_t i = r.count; i-- > 0;)  // the most recent first: still in cache
    if (r.capacity[i] == capacity) {
      double* data = r.data[i];
      r.bytes -= capacity * sizeof(double);
      --r.count;
      std::copy(r.data + i + 1, r.data + 1 + r.count, r.data + i);
      std::copy(r.capacity + i + 1, r.capacity + 1 + r.count, r.capacity + i);
      return data;
    }
  return nullptr;
}

bool keep_recent(double* data, std::size_t capacity) {
  const std::size_t bytes = capacity * sizeof(double);
  if (recent_gone || bytes > kRecentBytes / 4) return false;
  if (!recent_armed) {
    thread_local RecentReleaser releaser;  // constructed (and its destructor registered) once per thread
    (void)releaser;
    recent_armed = true;
  }
  RecentBuffers& r = recent;
  while (r.count == kRecentBuffers || r.bytes + bytes > kRecentBytes) drop_oldest_recent();
  r.data[r.count] = data;
  r.capacity[r.count] = capacity;
  ++r.count;
  r.bytes += bytes;
  return true;
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
  capacity = want;
  if ((data_ = take_recent(want))) return;
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_lists.find(want);
    if (it != p.free_lists.end() && !it->second.empty()) {
      data_ = it->second.back();  // the most recently freed: still in cache
      it->second.pop_back();
      p.cached_bytes -= capacity * sizeof(double);
      return;
    }
  }
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
  if (!keep_recent(data_, capacity)) pool_or_free(data_, capacity);
}

}  // namespace hesse::detail
