// The AVX-512 builds' block sizes (gemm_avx512.cpp, and gemm_avx512_bf16.cpp, which adds the
// AVX512-BF16 pairs kernel for bfloat16 products to the same float32 and float64 engine).
#pragma once
#include "gemm.hpp"

namespace lingrad {
// Block sizes (BLIS names), float | double, and why. 32 zmm registers of 16 floats or 8 doubles.
//   MR   6 |   6   rows of the register tile: 6 broadcasts of A per k
//   NR  32 |  16   two vectors: 12 accumulators (room to spare of 32 registers)
//   MC 144 |  72   a packed A block of MC x KC: 144 KB | 144 KB, inside a 1 MB L2 (Zen 4, Intel)
//   KC 256 | 256   a B micro-panel of KC x NR: 32 KB, as large as a 32-48 KB L1 allows
//   NC 4096| 4096  a packed KC x NC slice of B: 4 MB | 8 MB (L3)
//   VL  16 |   8   one vector: the lanes of the small-M path
// From the cache sizes above; bfloat16 products use the float column (their panels hold K pairs).
constexpr GemmTable avx512_table(const char* name) {
  return {name, /* float  */ {6, 32, 144, 256, 4096, 16}, /* double */ {6, 16, 72, 256, 4096, 8}};
}
}  // namespace lingrad
