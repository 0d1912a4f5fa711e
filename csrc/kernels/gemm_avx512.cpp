// AVX-512 build of the GEMM engine (compiled with -mavx512f/vl/bw/dq -mfma): blocking in gemm_avx512.hpp.
#include "gemm_avx512.hpp"

namespace lingrad::isa_avx512 {
constexpr GemmTable kBlocking = avx512_table("avx512");
}  // namespace lingrad::isa_avx512

#define LINGRAD_ISA isa_avx512
#include "gemm_engine.hpp"
