// AVX-512 build of the GEMM engine (compiled with -mavx512f/vl/bw/dq -mfma): blocking in avx512_traits.hpp.
#include "avx512_traits.hpp"

namespace lingrad::isa_avx512 {
constexpr GemmTable kBlocking = avx512_table("avx512");
}  // namespace lingrad::isa_avx512

#define LINGRAD_ISA isa_avx512
#include "engine.inc"
