// AVX-512 build of the GEMM engine (compiled with -mavx512f/vl/bw/dq -mfma).
#include "gemm.hpp"

namespace lingrad::isa_avx512 {
// Block sizes (BLIS names), float | double, and why. 32 zmm registers of 16 floats or 8 doubles.
//   MR   6 |   6   rows of the register tile: 6 broadcasts of A per k
//   NR  32 |  16   two vectors: 12 accumulators (room to spare of 32 registers)
//   MC 144 |  72   a packed A block of MC x KC: 144 KB | 144 KB, inside a 1 MB L2 (Zen 4, Intel)
//   KC 256 | 256   a B micro-panel of KC x NR: 32 KB, as large as a 32-48 KB L1 allows
//   NC 4096| 4096  a packed KC x NC slice of B: 4 MB | 8 MB (L3)
//   VL  16 |   8   one vector: the lanes of the small-M path
// Not measured on this machine (no AVX-512 here); from the cache sizes above.
constexpr GemmTable kBlocking = {
    "avx512",
    /* float  */ {6, 32, 144, 256, 4096, 16},
    /* double */ {6, 16, 72, 256, 4096, 8},
};
}  // namespace lingrad::isa_avx512

#define LINGRAD_ISA isa_avx512
#include "gemm_engine.hpp"
