#pragma once
// .npy files (layer 6 of DESIGN.md), so results open in numpy, Julia or MATLAB.
// Files are written as float64 ('<f8'), C order, format version 1.0. Loading
// accepts versions 1.0-3.0, either byte order, C or Fortran order, and the
// dtypes float64, float32, int8/16/32/64, uint8/16/32/64 and bool, all
// converted to double (integers beyond 2^53 lose precision, as in numpy).
// Every failure throws hesse::IoError naming the path.
#include <string>

#include "hesse/tensor.hpp"

namespace hesse {

/// Writes the tensor's values (not its autograd state) to `path`.
void save_npy(const std::string& path, const Tensor& t);
void save_npy(const std::string& path, const xt::xarray<double>& a);

/// Reads a .npy file into a fresh leaf tensor (requires_grad false).
Tensor load_npy(const std::string& path);
/// The same values as an xtensor array (row-major).
xt::xarray<double> load_npy_array(const std::string& path);

}  // namespace hesse
