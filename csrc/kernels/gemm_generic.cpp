// Portable build of the GEMM engine (baseline x86-64 is SSE2: 16 xmm registers hold a 6x8 float
// or 6x4 double tile). Also the build for CPUs other than x86.
#define LINGRAD_ISA isa_generic
#include "gemm_engine.hpp"

namespace lingrad::isa_generic {
const GemmKernels kernels = make_kernels</*float*/ 6, 8, 96, /*double*/ 6, 4, 96, /*KC*/ 256, /*NC*/ 4096>("generic");
}
