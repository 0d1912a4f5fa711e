// Portable build of the GEMM engine: baseline x86-64 (SSE2), and the build for CPUs other than x86.
#include "gemm.hpp"

namespace lingrad::isa_generic {
// Block sizes (BLIS names), float | double, and why. 16 xmm registers of 4 floats or 2 doubles.
//   MR   6 |   6   rows of the register tile
//   NR   8 |   4   two vectors: 12 accumulators + 2 of B + 1 of A
//   MC  96 |  96   a packed A block of MC x KC: 96 KB | 192 KB (L2)
//   KC 256 | 256   a B micro-panel of KC x NR: 8 KB (L1)
//   NC 4096| 4096  a packed KC x NC slice of B: 4 MB | 8 MB (L3)
//   VL   4 |   2   one vector: the lanes of the small-M path
constexpr GemmBlocking kFloat = {6, 8, 96, 256, 4096, 4}, kDouble = {6, 4, 96, 256, 4096, 2};
constexpr IsaTraits kTraits = {
    "generic",
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
}  // namespace lingrad::isa_generic

#define LINGRAD_ISA isa_generic
#include "engine.inc"
