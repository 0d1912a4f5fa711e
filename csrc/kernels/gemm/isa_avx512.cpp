// AVX-512 build of the GEMM engine (compiled with -mavx512f/vl/bw/dq -mfma): blocking in avx512_traits.hpp.
#include "avx512_traits.hpp"

namespace lingrad::isa_avx512 {
constexpr IsaTraits kTraits = {
    "avx512",
    /* float  */ kAvx512Float,
    /* double */ kAvx512Double,
    // bfloat16 products widened to float32 panels (rounded and flushed as they are packed), run by the
    // float32 micro-kernel: whole K pairs, the float column's blocks, 4 column panels per work item.
    ProductKind::bf16_widened,
    /* K step */ 2,
    kAvx512Float,
    /* panels per item */ 4,
    /* AMX K chunk */ 0,
};
}  // namespace lingrad::isa_avx512

#define LINGRAD_ISA isa_avx512
#include "engine.inc"
