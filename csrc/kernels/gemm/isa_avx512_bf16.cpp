// AVX-512 build with AVX512-BF16 (compiled with the AVX-512 flags and -mavx512bf16): bfloat16
// products on the vdpbf16ps pairs kernel (microkernel.inc, pack_bf16.inc); its float32 and float64
// products are the avx512 build's (LINGRAD_FLOATS_OF below), compiled once in isa_avx512.cpp.
#include "avx512_traits.hpp"

namespace lingrad::isa_avx512_bf16 {
constexpr IsaTraits kTraits = {
    "avx512_bf16",
    /* float  */ kAvx512Float,
    /* double */ kAvx512Double,
    // bfloat16 products on bfloat16 panels of K pairs, one vdpbf16ps per pair and 16 columns: whole K
    // pairs, the float column's blocks (a pairs panel of KC k is KC / 2 words per row), 4 column
    // panels per work item.
    ProductKind::bf16_pairs,
    /* K step */ 2,
    kAvx512Float,
    /* panels per item */ 4,
    /* AMX K chunk */ 0,
};
}  // namespace lingrad::isa_avx512_bf16

#define LINGRAD_ISA isa_avx512_bf16
#define LINGRAD_FLOATS_OF isa_avx512  // its float32 and float64 products: the avx512 build's
#define LINGRAD_BF16_DOT 1            // (guards the AVX512-BF16 intrinsics)
#include "engine.inc"
