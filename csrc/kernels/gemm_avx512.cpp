// AVX-512 build of the GEMM engine (compiled with -mavx512f/vl/bw/dq -mfma): 32 zmm registers
// hold a 6x32 float or 6x16 double tile (12 accumulators, room to spare).
#define LINGRAD_ISA isa_avx512
#include "gemm_engine.hpp"

namespace lingrad::isa_avx512 {
const GemmKernels kernels = make_kernels</*float*/ 6, 32, 144, /*double*/ 6, 16, 72, /*KC*/ 256, /*NC*/ 4096>("avx512");
}
