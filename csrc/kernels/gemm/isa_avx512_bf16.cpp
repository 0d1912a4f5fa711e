// AVX-512 build with AVX512-BF16 (compiled with the AVX-512 flags and -mavx512bf16): the avx512
// engine, whose bfloat16 products run the vdpbf16ps pairs kernel (microkernel.inc, pack_bf16.inc).
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
#define LINGRAD_BF16_DOT 1  // (guards the AVX512-BF16 intrinsics)
#include "engine.inc"
