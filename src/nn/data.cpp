// Mini-batching: the order of an epoch is a Fisher–Yates shuffle driven by a
// Mersenne twister seeded from (seed, epoch). mt19937_64's output is fixed by
// the C++ standard, and the bounded draws below avoid std::uniform_int_distribution
// (whose algorithm differs between standard libraries), so an order is the
// same on every platform.
#include <algorithm>
#include <numeric>
#include <random>
#include <utility>

#include "hesse/nn/data.hpp"
#include "hesse/ops.hpp"
#include "../detail.hpp"

namespace hesse::nn {
namespace {

using detail::message;

// splitmix64's finaliser: nearby (seed, epoch) pairs give unrelated streams.
std::uint64_t mix(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Uniform on [0, k) without modulo bias: reject the 2^64 mod k lowest draws.
std::uint64_t below(std::mt19937_64& engine, std::uint64_t k) {
  const std::uint64_t threshold = (0 - k) % k;
  std::uint64_t r;
  do r = engine();
  while (r < threshold);
  return r % k;
}

}  // namespace

DataLoader::DataLoader(Tensor x, Tensor y, DataLoaderOptions options)
    : x_(std::move(x)), y_(std::move(y)), options_(options) {
  if (!x_.defined()) throw ValueError(message("DataLoader", "X is undefined"));
  if (x_.ndim() == 0 || (y_.defined() && y_.ndim() == 0))
    throw ShapeError(message("DataLoader", "X and Y need a sample axis 0, got shapes ", to_string(x_.shape()), " and ",
                             y_.defined() ? to_string(y_.shape()) : "undefined"));
  if (y_.defined() && y_.shape()[0] != x_.shape()[0])
    throw ShapeError(message("DataLoader", "X of shape ", to_string(x_.shape()), " and Y of shape ",
                             to_string(y_.shape()), " hold different numbers of samples"));
  if (options_.batch_size == 0) throw ValueError(message("DataLoader", "batch_size must be positive"));
  n_ = x_.shape()[0];
}

DataLoader::DataLoader(Tensor x, Tensor y, std::size_t batch_size, bool shuffle, std::uint64_t seed)
    : DataLoader(std::move(x), std::move(y), DataLoaderOptions{batch_size, shuffle, seed, false}) {}

std::size_t DataLoader::size() const {
  const std::size_t b = options_.batch_size;
  return options_.drop_last ? n_ / b : (n_ + b - 1) / b;
}

std::vector<std::int64_t> DataLoader::order(std::size_t epoch) const {
  std::vector<std::int64_t> order(n_);
  std::iota(order.begin(), order.end(), std::int64_t{0});
  if (!options_.shuffle) return order;
  std::mt19937_64 engine(mix(options_.seed ^ mix(std::uint64_t(epoch))));
  for (std::size_t i = n_; i > 1; --i) std::swap(order[i - 1], order[below(engine, i)]);
  return order;
}

Batch DataLoader::batch(std::size_t epoch, std::size_t b) const {
  if (b >= size())
    throw IndexError(message("DataLoader", "batch ", b, " is out of range: an epoch has ", size(), " batches"));
  return take(order(epoch), b);
}

Batch DataLoader::take(const std::vector<std::int64_t>& order, std::size_t b) const {
  const std::size_t begin = b * options_.batch_size;
  const std::size_t end = std::min(n_, begin + options_.batch_size);
  const std::vector<std::int64_t> rows(order.begin() + std::ptrdiff_t(begin), order.begin() + std::ptrdiff_t(end));
  return {index_select(x_, 0, rows), y_.defined() ? index_select(y_, 0, rows) : Tensor()};
}

}  // namespace hesse::nn
