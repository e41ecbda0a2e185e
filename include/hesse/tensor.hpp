#pragma once
// hesse::Tensor: a cheap-to-copy handle to an evaluated, contiguous, row-major
// array of doubles plus its autograd metadata (layer 1 of DESIGN.md).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <iosfwd>
#include <memory>
#include <random>
#include <string>
#include <vector>

// Shape is an xtensor small vector; xt::xarray is only declared here (the
// full header costs ~0.7 s per file that includes it): include
// <xtensor/xarray.hpp> to call Tensor(xt::xarray) or value().
#include <xtensor/xstorage.hpp>
#include <xtensor/xtensor_forward.hpp>

#include "hesse/error.hpp"

namespace hesse {

/// A shape: stored inline for up to 6 dimensions (no heap allocation).
using Shape = xt::svector<std::size_t, 6>;

/// "[2, 3]"
std::string to_string(const Shape& shape);

/// Number of elements of a shape (1 for the empty shape of a scalar).
std::size_t numel_of(const Shape& shape);

class Node;
class Tensor;

namespace detail {

/// Pooled storage: released buffers go back to a size-keyed free list, since
/// first-touching fresh memory is slow on the machines hesse runs on.
/// The values may be deferred, computed on first access (a gradient whose
/// value may never be read). Every access goes through read() or write(), and
/// a write first computes the deferred values that read this storage, so
/// deferral never changes a result.
struct Storage {
  explicit Storage(std::size_t n);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  /// Storage for n values that fill(data) computes on first access. `reads`:
  /// the storages fill reads (it must keep them alive until it has run).
  static std::shared_ptr<Storage> deferred(std::size_t n, std::function<void(double*)> fill,
                                           const std::vector<Storage*>& reads);
  /// The values, computed first if they are deferred.
  double* read() { return pending_.load(std::memory_order_acquire) ? materialize() : data_; }
  /// The values for writing.
  double* write() {
    if (has_readers_.load(std::memory_order_acquire)) settle_readers();
    ++writes_;
    return read();
  }
  /// How many times write() was called: unchanged means the values are unchanged.
  std::uint64_t writes() const { return writes_; }
  std::size_t capacity = 0;

 private:
  // Deferred values live in deferred.cpp, away from the pool's hot path (a raw
  // pointer, so that ~Storage needs no definition of Pending).
  struct Pending;
  Storage() = default;  // deferred: no buffer until the values are computed
  double* materialize();
  void settle_readers();
  void forget_deferral();  // ~Storage's part for deferred values and their operands
  double* data_ = nullptr;
  std::uint64_t writes_ = 0;
  Pending* pending_values_ = nullptr;     // owned
  std::atomic<bool> pending_{false};      // the values are still to be computed
  std::atomic<bool> has_readers_{false};  // some deferred values still have to read these
};

struct TensorImpl {
  ~TensorImpl();
  Shape shape;
  std::size_t numel = 0;
  std::shared_ptr<Storage> storage;
  std::size_t offset = 0;  // where the values start in storage (contiguous slices share it)
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;      // the op that made this tensor; null for leaves
  std::shared_ptr<TensorImpl> grad;   // what backward() accumulated into a leaf
};

}  // namespace detail

/// A seedable source of random numbers (64-bit Mersenne twister).
class Generator {
 public:
  explicit Generator(std::uint64_t seed = 0) : engine_(seed) {}
  void seed(std::uint64_t s) { engine_.seed(s); }
  double uniform(double lo = 0.0, double hi = 1.0);
  double normal(double mean = 0.0, double stddev = 1.0);
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
};

/// The generator used when none is passed; `manual_seed` reseeds it.
Generator& default_generator();
void manual_seed(std::uint64_t seed);

class Tensor {
 public:
  /// An undefined tensor (like a null handle); `defined()` is false.
  Tensor() = default;
  /// A 0-d tensor holding `value`.
  Tensor(double value);  // NOLINT(google-explicit-constructor): scalars mix freely
  /// A copy of an xtensor array.
  Tensor(const xt::xarray<double>& value, bool requires_grad = false);
  /// Nested initializer lists: Tensor{1, 2}, Tensor{{1, 2}, {3, 4}}, ...
  /// C++ reads a single innermost value as either depth, so Tensor{{3.0}} does
  /// not compile: write reshape(Tensor{3.0}, {1, 1}) for a 1 × 1 matrix.
  Tensor(std::initializer_list<double> values);
  Tensor(std::initializer_list<std::initializer_list<double>> values);
  Tensor(std::initializer_list<std::initializer_list<std::initializer_list<double>>> values);

  /// Uninitialised pooled storage of the given shape (write before reading).
  static Tensor empty(const Shape& shape);

  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return checked().shape; }
  std::size_t ndim() const { return shape().size(); }
  std::size_t numel() const { return checked().numel; }
  /// Size of one axis; negative axes count from the end.
  std::size_t size(int axis) const;

  /// A copy of the values as an xtensor array.
  xt::xarray<double> value() const;
  /// The single value of a one-element tensor.
  double item() const;
  const double* data() const { return checked().storage->read() + impl_->offset; }
  /// Writable storage; for optimisers and kernels, outside the tape. A graph
  /// reads the values of the tensors its ops saved when it is differentiated:
  /// write to them once their graphs are done (as an optimiser step does), and
  /// take the pointer again after other ops ran (it marks the write).
  double* mutable_data() { return checked().storage->write() + impl_->offset; }

  bool requires_grad() const { return checked().requires_grad; }
  /// Marks a leaf as a variable to differentiate by (or not).
  Tensor& requires_grad_(bool flag = true);
  /// True for tensors not made by a recorded op.
  bool is_leaf() const;
  /// The gradient accumulated by backward(); undefined until one ran.
  Tensor grad() const;
  void zero_grad();
  void set_grad(const Tensor& g);
  /// Backpropagates from this tensor into every leaf's grad(). A scalar needs
  /// no seed; any other tensor needs `gradient` of its own shape.
  void backward(const Tensor& gradient = Tensor(), bool retain_graph = false) const;
  /// The same values, cut from the tape (shares storage).
  Tensor detach() const;
  /// A copy with its own storage, cut from the tape.
  Tensor clone() const;
  const std::shared_ptr<Node>& grad_fn() const;

  const std::shared_ptr<detail::TensorImpl>& impl() const { return impl_; }
  explicit Tensor(std::shared_ptr<detail::TensorImpl> impl) : impl_(std::move(impl)) {}

 private:
  // (the accessors are inline: kernels call them per op, and often)
  const detail::TensorImpl& checked() const {
    if (!impl_) undefined();
    return *impl_;
  }
  [[noreturn]] static void undefined();
  std::shared_ptr<detail::TensorImpl> impl_;
};

/// tensor([[1, 2], [3, 4]]) with requires_grad / grad_fn noted.
std::ostream& operator<<(std::ostream& os, const Tensor& t);

// ---- creation ----
Tensor zeros(const Shape& shape, bool requires_grad = false);
Tensor ones(const Shape& shape, bool requires_grad = false);
Tensor full(const Shape& shape, double value, bool requires_grad = false);
Tensor zeros_like(const Tensor& t);
Tensor ones_like(const Tensor& t);
/// The n×n identity.
Tensor eye(std::size_t n);
/// n×m matrix with ones on the diagonal (either size may be 0).
Tensor eye(std::size_t n, std::size_t m);
/// [0, 1, ..., stop-1] and start, start+step, ... < stop.
Tensor arange(double stop);
Tensor arange(double start, double stop, double step = 1.0);
/// Uniform on [0, 1).
Tensor rand(const Shape& shape, Generator& gen = default_generator());
/// Standard normal.
Tensor randn(const Shape& shape, Generator& gen = default_generator());

}  // namespace hesse
