#pragma once
// Every exception hesse throws derives from hesse::Error; messages start with
// "hesse::<op>: " and name the shapes, axes, indices or names involved.
#include <stdexcept>
#include <string>

namespace hesse {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Shapes that do not fit the op (broadcasting, matmul, reshape, ...).
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// An axis or an index outside its range.
class IndexError : public Error {
 public:
  using Error::Error;
};

/// Misuse of the tape: freed graphs, unused inputs, missing seeds.
class AutogradError : public Error {
 public:
  using Error::Error;
};

/// A value that is not allowed (negative count, non-integer index, ...).
class ValueError : public Error {
 public:
  using Error::Error;
};

/// Reading or writing files.
class IoError : public Error {
 public:
  using Error::Error;
};

}  // namespace hesse

namespace hesse {

/// A request whose result would not fit the memory limit set for it.
class MemoryLimitError : public Error {
 public:
  using Error::Error;
};

}  // namespace hesse
