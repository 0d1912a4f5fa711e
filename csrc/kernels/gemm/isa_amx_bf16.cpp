// AVX-512 build with AMX (compiled with the AVX-512 flags and -mamx-tile -mamx-bf16): bfloat16
// products on AMX tiles (amx.inc); its float32 and float64 products are the avx512 build's
// (LINGRAD_FLOATS_OF below), compiled once in isa_avx512.cpp. Linux hands out AMX state to a
// process that asks for it (cpu.cpp asks before this build is chosen).
#include "avx512_traits.hpp"

namespace lingrad::isa_amx_bf16 {
// The AMX bfloat16 products' blocks (BLIS names), and why:
//   MR x NR  32 x 32  a block of C in four 16 x 16 float32 tiles (0-3); A in tiles 4-5, B in 6-7
//   MC       256      row blocks: a 512 KB A block of K 1024, in L2 (its row panels stream from L2
//                     while each column panel's chunk of B stays in L1)
//   KC       1024     32 K tiles: C is written once for K up to 1024, where each extra K slice reads
//                     and writes all of C again, from memory at large layers
//   NC       4096     as the float column
//   VL       16       (the small-M path's lanes: never used by bfloat16 products)
//   K chunk  8 tiles  each column panel's K slice in chunks of 8 K tiles (a 16 KB B chunk, in L1
//                     while the row block's A panels stream from L2), its C blocks accumulating in a
//                     contiguous buffer of MC / 32 blocks
//   panels   1        per work item, since AMX panels take longer (784 columns: 7 items of 4 panels
//                     split 4:3 between two threads, 25 of one 13:12; dW of 5000 x 784 x 50 measured
//                     about 5% faster on average, within the machine's noise)
// Tiles from L3 starve the tile unit. Measured on an Intel Xeon, 2 threads, forward 4096 x 1024 x
// 1024: MC 64, KC 512 1.0-1.2 TFLOP/s; MC 256, KC 1024 1.5-1.6 (MC 128 or 512, or KC 256, slower);
// with K in chunks of 8 tiles, 1.9-2.1.
constexpr IsaTraits kTraits = {
    "amx_bf16",
    /* float  */ kAvx512Float,
    /* double */ kAvx512Double,
    ProductKind::bf16_amx,
    /* K step: whole K tiles */ 32,
    /* bfloat16 */ {32, 32, 256, 1024, 4096, 16},
    /* panels per item */ 1,
    /* K chunk */ 8,
};
}  // namespace lingrad::isa_amx_bf16

#define LINGRAD_ISA isa_amx_bf16
#define LINGRAD_FLOATS_OF isa_avx512  // its float32 and float64 products: the avx512 build's
#define LINGRAD_AMX 1                 // (guards the AMX intrinsics)
#include "engine.inc"
