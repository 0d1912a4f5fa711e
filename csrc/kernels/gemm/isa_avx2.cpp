// AVX2 + FMA build of the GEMM engine (compiled with -mavx2 -mfma).
#include "gemm.hpp"

namespace lingrad::isa_avx2 {
// Block sizes (BLIS names), float | double, and why. 16 ymm registers of 8 floats or 4 doubles.
//   MR   6 |   6   rows of the register tile: 6 broadcasts of A per k
//   NR  16 |   8   two vectors: 6 x 2 = 12 accumulators + 2 of B + 1 of A = 15 of 16 registers
//   MC 168 |  72   a packed A block of MC x KC: 168 KB | 144 KB, well inside a 512 KB L2 (Zen 3)
//   KC 256 | 256   a B micro-panel of KC x NR: 16 KB, half of a 32 KB L1, next to the A panel (6 KB)
//   NC 4080| 4080  a multiple of NR near 4096: a packed KC x NC slice is 4 MB | 8 MB (L3)
//   VL   8 |   4   one vector: the lanes of the small-M path
// MC, KC and NC follow from the cache sizes above; they were not re-measured on this build.
constexpr GemmBlocking kFloat = {6, 16, 168, 256, 4080, 8}, kDouble = {6, 8, 72, 256, 4080, 4};
constexpr IsaTraits kTraits = {
    "avx2",
    /* float  */ kFloat,
    /* double */ kDouble,
    // bfloat16 products widened to float32 panels (rounded and flushed as they are packed), run by the
    // float32 micro-kernel: whole K pairs, the float column's blocks, 4 column panels per work item.
    ProductKind::bf16_widened,
    /* K step */ 2,
    kFloat,
    /* panels per item */ 4,
    /* AMX K chunk */ 0,
};
}  // namespace lingrad::isa_avx2

#define LINGRAD_ISA isa_avx2
#include "engine.inc"
