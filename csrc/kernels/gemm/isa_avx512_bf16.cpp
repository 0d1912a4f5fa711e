// AVX-512 build with AVX512-BF16 (compiled with the AVX-512 flags and -mavx512bf16): the avx512
// engine, whose bfloat16 products run the vdpbf16ps pairs kernel (engine.inc).
#include "avx512_traits.hpp"

namespace lingrad::isa_avx512_bf16 {
constexpr GemmTable kBlocking = avx512_table("avx512_bf16");
}  // namespace lingrad::isa_avx512_bf16

#define LINGRAD_ISA isa_avx512_bf16
#define LINGRAD_BF16_DOT 1
#include "engine.inc"
