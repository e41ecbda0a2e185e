#pragma once
// Counters for benchmarks: the floating-point work done by matrix products.
#include <cstdint>

namespace hesse::profile {

/// Floating-point operations (2·m·n·k per product) issued to BLAS so far.
std::uint64_t gemm_flops();
void reset_gemm_flops();

}  // namespace hesse::profile
