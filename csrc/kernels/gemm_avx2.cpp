// AVX2 + FMA build of the GEMM engine (compiled with -mavx2 -mfma): 16 ymm registers hold a
// 6x16 float or 6x8 double tile (12 accumulators, 2 B vectors, 1 broadcast of A).
#define LINGRAD_ISA isa_avx2
#include "gemm_engine.hpp"

namespace lingrad::isa_avx2 {
const GemmKernels kernels = make_kernels</*float*/ 6, 16, 168, /*double*/ 6, 8, 72, /*KC*/ 256, /*NC*/ 4080>("avx2");
}
