#pragma once
// Mini-batches of (X, Y) along axis 0, shuffled per epoch from a seed: epoch e
// of a loader with seed s has the same order on every run and platform, and
// can be replayed alone (batches(e)) without running the epochs before it.
#include <cstdint>
#include <memory>
#include <vector>

#include "hesse/tensor.hpp"

namespace hesse::nn {

struct Batch {
  Tensor x, y;  // y is undefined when the loader has no targets
};

struct DataLoaderOptions {
  std::size_t batch_size = 1;
  bool shuffle = false;
  std::uint64_t seed = 0;
  /// Drops the last batch when it is smaller than batch_size (kept by default).
  bool drop_last = false;
};

class DataLoader {
 public:
  /// X [N, ...] and Y [N, ...] (Y may be undefined); N is the number of samples.
  DataLoader(Tensor x, Tensor y, DataLoaderOptions options);
  DataLoader(Tensor x, Tensor y, std::size_t batch_size, bool shuffle = false, std::uint64_t seed = 0);

  std::size_t num_samples() const { return n_; }
  /// Batches per epoch.
  std::size_t size() const;

  /// The sample order of an epoch: 0, 1, ..., N-1 without shuffling, else a
  /// permutation drawn from (seed, epoch) alone.
  std::vector<std::int64_t> order(std::size_t epoch) const;
  /// Batch b of an epoch.
  Batch batch(std::size_t epoch, std::size_t b) const;

  /// Walks the batches of one epoch; holds the epoch's order, not a copy of the data.
  class Iterator {
   public:
    Batch operator*() const { return loader_->take(*order_, b_); }
    Iterator& operator++() { return ++b_, *this; }
    bool operator!=(const Iterator& o) const { return b_ != o.b_; }
    bool operator==(const Iterator& o) const { return b_ == o.b_; }

   private:
    friend class DataLoader;
    Iterator(const DataLoader* loader, std::shared_ptr<const std::vector<std::int64_t>> order, std::size_t b)
        : loader_(loader), order_(std::move(order)), b_(b) {}
    const DataLoader* loader_;
    std::shared_ptr<const std::vector<std::int64_t>> order_;
    std::size_t b_;
  };

  /// The batches of one epoch, as a range.
  class Epoch {
   public:
    Iterator begin() const { return Iterator(loader_, order_, 0); }
    Iterator end() const { return Iterator(loader_, nullptr, loader_->size()); }
    std::size_t size() const { return loader_->size(); }
    std::size_t index() const { return epoch_; }

   private:
    friend class DataLoader;
    Epoch(const DataLoader* loader, std::size_t epoch)
        : loader_(loader), epoch_(epoch),
          order_(std::make_shared<const std::vector<std::int64_t>>(loader->order(epoch))) {}
    const DataLoader* loader_;
    std::size_t epoch_;
    std::shared_ptr<const std::vector<std::int64_t>> order_;
  };

  /// The batches of the given epoch.
  Epoch batches(std::size_t epoch) const { return Epoch(this, epoch); }
  /// The batches of the next epoch (then counts it): `for (const Batch& b : loader)`
  /// does the same, so the first loop is epoch 0, the next epoch 1, and so on.
  Epoch next_epoch() { return Epoch(this, epoch_++); }
  Iterator begin() { return next_epoch().begin(); }
  Iterator end() const { return Iterator(this, nullptr, size()); }
  /// The epoch the next loop over the loader runs; set_epoch moves it.
  std::size_t epoch() const { return epoch_; }
  void set_epoch(std::size_t epoch) { epoch_ = epoch; }

 private:
  Batch take(const std::vector<std::int64_t>& order, std::size_t b) const;
  Tensor x_, y_;
  DataLoaderOptions options_;
  std::size_t n_ = 0;
  std::size_t epoch_ = 0;
};

}  // namespace hesse::nn
