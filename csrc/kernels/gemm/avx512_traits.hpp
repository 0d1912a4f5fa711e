// The AVX-512 builds' block sizes (isa_avx512.cpp, and isa_avx512_bf16.cpp and isa_amx_bf16.cpp, which add
// bfloat16 kernels, vdpbf16ps pairs or AMX tiles, to isa_avx512.cpp's float32 and float64 engine:
// their bfloat16 plans use the float column too).
#pragma once
#include "gemm.hpp"

namespace lingrad {
// Block sizes (BLIS names), float | double, and why. 32 zmm registers of 16 floats or 8 doubles.
//   MR   8 |   6   rows of the register tile: 8 broadcasts of A per k (float: 16 accumulators, 2 B
//                  vectors and a broadcast of 32 registers; measured on an Intel Xeon with AVX-512,
//                  2 threads, against 6 rows: large layers' products 55-66% -> 60-70% of the FMA peak;
//                  12 rows were no faster and fell to 2% on X read in place at (256, 784, 256))
//   NR  32 |  16   two vectors
//   MC 144 |  72   a packed A block of MC x KC: 144 KB | 144 KB, inside a 1-2 MB L2 (Zen 4, Intel)
//   KC 256 | 256   a B micro-panel of KC x NR: 32 KB, as large as a 32-48 KB L1 allows
//   NC 4096| 4096  a packed KC x NC slice of B: 4 MB | 8 MB (L3)
//   VL  16 |   8   one vector: the lanes of the small-M path
// From the cache sizes above; bfloat16 products that are not AMX's use the float column (their
// panels hold K pairs).
constexpr GemmBlocking kAvx512Float = {8, 32, 144, 256, 4096, 16};
constexpr GemmBlocking kAvx512Double = {6, 16, 72, 256, 4096, 8};
}  // namespace lingrad
