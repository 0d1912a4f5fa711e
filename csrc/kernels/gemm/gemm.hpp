// The GEMM engine's interface, shared by its per-ISA builds (gemm/isa_<name>.cpp, each including engine.inc).
//
//   C (M, N) = A (M, K) * B (K, N), then a fused epilogue on each finished tile of C.
//
// A and B are strided views, so the three products of a training step need no transposes:
//   forward      A = X  (B x in),   B[k, n] = W[n, k],   C = Y
//   input grad   A = dY (B x out),  B = W,               C = dX
//   weight grad  A[m, k] = dY[k, m], B = X,              C = dW   (row sums of A give db)
#pragma once
#include "lingrad.hpp"
#include "plan.hpp"

namespace lingrad {

// Applied to each tile of C once its K sum is complete, in this order:
//   z = c + bias[n];   pre[m, n] = z if pre is set;   h = act(z);
//   with a target: r = h - target[m, n], loss += r*r (in double), c = grad_scale * r * act'(z);  else c = h;
//   with `at` (a backward product): c *= grad_act'(at[m, n]), at being the saved pre-activation or output.
template <typename T>
struct Epilogue {
  VectorView<T> bias;         // (N), or absent
  const T* target = nullptr;  // (M, N) at target[m*target_rs + n*target_cs], or absent
  index_t target_rs = 0, target_cs = 0;
  T grad_scale = 0;
  double* loss = nullptr;  // out: sum of r*r, summed in a fixed order
  Activation act = Activation::identity;
  T slope = 0;       // LeakyReLU's negative slope (of act and of grad_act)
  T* pre = nullptr;  // (M, N), rows saved_ld apart: receives z, if set
  Activation grad_act = Activation::identity;
  const T* at = nullptr;  // (M, N), rows saved_ld apart: what grad_act' is computed from, if set
  bool at_is_pre = false;
  index_t saved_ld = 0;
  bfloat16* out16 = nullptr;  // (M, N), rows out16_ld apart: receives c rounded to bfloat16, if set (last)
  index_t out16_ld = 0;

  bool active() const { return bias.data || target || act != Activation::identity || pre || at || out16; }
};

template <typename T>
struct GemmArgs {
  index_t m = 0, n = 0, k = 0;
  const T* a = nullptr;
  index_t a_rs = 0, a_cs = 0;  // A[m, k] = a[m*a_rs + k*a_cs]
  const T* b = nullptr;
  index_t b_rs = 0, b_cs = 0;  // B[k, n] = b[k*b_rs + n*b_cs]
  T* c = nullptr;
  index_t ldc = 0;  // C[m, n] = c[m*ldc + n], never read before written
  // (c may be null in a bfloat16 product whose result is epilogue.out16 alone: the engine then keeps
  // the float32 sums where it needs them, with rows n apart; ldc unused.)
  Epilogue<T> epilogue;
  T* a_row_sums = nullptr;  // (M): if set, receives sum_k A[m, k] (computed while packing A)
  // (K): if set, A[m, k] is read as A[m, k] * a_col_scale[k], rounded once, as A is packed (and so
  // are the row sums): dW = (s * dY)^T X with per-sample weights s. Such a product always takes the
  // packed path (A packed), whatever its shape.
  const T* a_col_scale = nullptr;
  int num_threads = 1;
  // A bfloat16 product (T = float): A's and B's values rounded to bfloat16 (see lingrad.hpp). An
  // operand is read from a16 (b16), bfloat16 with the strides above, when that is set, else from a
  // (b), float rounded as it is packed. Such products always take the packed path, A and B packed.
  bool bf16 = false;
  const bfloat16* a16 = nullptr;
  const bfloat16* b16 = nullptr;
};

// Choices shared by every build of the engine and its plan (the first four reported by
// build_info(); the tests read them there).
constexpr double kSerialWork = 1 << 18;           // multiply-adds (M*N*K) below which one thread runs (measured)
constexpr index_t kSlabBytes = index_t(8) << 20;  // packed B between two barriers: at most this, or one K slice
constexpr index_t kSmallM = 8;                    // at most this many rows: the small-M path,
constexpr index_t kSmallMinK = 8;                 // if K >= kSmallMinK * M^2 (else packed): see gemm/small_m.inc
constexpr index_t kNarrowN = 4;                   // at most this many columns: the narrow path (gemm/narrow.inc)
constexpr index_t kNarrowRows = 64;               // narrow: rows per work block, and per partial sum of the loss
constexpr index_t kNarrowChunk = 2048;            // narrow dot products: k per pass,
constexpr index_t kNarrowPackRows = 16;           //   packed this many rows at a time (128 KB of floats)
constexpr index_t kNarrowColumnK = 128;           // narrow: at most this K, the column form (measured on Zen 4)
constexpr index_t kUnpackedK = 16;                // at most this K, or at most two register tiles of columns
constexpr index_t kUnpackedArea = 1 << 17;        //   and M * K at most this: the unpacked path (gemm/unpacked.inc),
constexpr index_t kUnpackedRows = 32;             // in work items of this many rows
constexpr index_t kUnpackedStrip = 512;           // by this many columns,
constexpr index_t kUnpackedChunk = 256;           // B copied (its columns not contiguous) this many k at a time,
constexpr index_t kUnpackedCopyBytes = 1 << 20;   //   or whole, once, if it takes at most this
constexpr index_t kSmallCopyK = 2048;             // small M, dot form: k per pass when A's rows must be copied
constexpr index_t kPanelsPerItem = 4;             // packed: column panels per work item (bfloat16: the table's)
constexpr index_t kCacheBytes = 256 << 10;        // packed: a C block larger than this is prefetched
constexpr index_t kAliasBytes = 2048;             // packed: row strides that are multiples of this are packed
// Small M, axpy form: rows of each lane class that a tile chains in registers (the block is this
// times L rows): more rows of A share each load and store of the chains. (static: internal linkage,
// so that no ISA build shares a copy compiled for another: see gemm/engine.inc.)
static constexpr int small_axpy_chain(int rows) { return rows <= 2 ? 4 : rows <= 4 ? 2 : 4; }

// What a product computes, as the engine's stages see it: T's own values (plain), or a bfloat16
// product run one of three ways (gemm/pack_bf16.inc): widened to float32 panels, vdpbf16ps pairs, AMX
// tiles. Each build runs its bfloat16 products one way, its IsaTraits::bf16_kind.
enum class ProductKind { plain, bf16_widened, bf16_pairs, bf16_amx };
// How bf16_kernel() (lingrad.hpp) names each kind.
constexpr const char* kProductKindNames[] = {"plain", "widened", "vdpbf16ps", "amx"};
static_assert(sizeof kProductKindNames / sizeof *kProductKindNames == int(ProductKind::bf16_amx) + 1);

// One instruction set's facts: the labelled table at the top of each gemm/isa_<name>.cpp, with the
// reasons for its numbers. Nothing per-ISA is decided in the engine's shared code but from this.
struct IsaTraits {
  const char* name;   // the ISA, as get_isa() reports it
  GemmBlocking f, d;  // float, double
  // bfloat16 products (GemmArgs::bf16, T = float):
  ProductKind bf16_kind;         // how they run
  index_t bf16_k_step;           // K slices are multiples of this: whole pairs (2), whole AMX K tiles (32)
  GemmBlocking bf16;             // their block sizes: the float column, or AMX's own
  index_t bf16_panels_per_item;  // column panels in one work item of the packed path
  index_t bf16_k_chunk;          // AMX: K tiles per chunk of a column panel's slice (0: not AMX)
};

// The float32 and float64 products of one build, with their table. The AVX-512 builds share one
// (isa_avx512.cpp's): the builds with AVX512-BF16 or AMX differ only in their bfloat16 products, so
// they compile only those (the float engine is the file's most compile work, and the same code).
struct FloatEngine {
  void (*sgemm)(const GemmArgs<float>&);  // products with GemmArgs::bf16 unset
  void (*dgemm)(const GemmArgs<double>&);
  // The epilogue alone over a dense (M, N) matrix c (its loss, if asked for, summed row by row).
  void (*sepilogue)(const Epilogue<float>&, float* c, index_t m, index_t n);
  void (*depilogue)(const Epilogue<double>&, double* c, index_t m, index_t n);
  double (*fma_probe)(index_t iterations, float seed);   // peak-rate probe (see measure_fma_peak)
  int fma_probe_flops;                                   // float flops per probe iteration
  double (*tile_probe)(index_t iterations, float seed);  // the float micro-kernel in L1 (measure_tile_rate)
  int tile_probe_flops;
  GemmBlocking blocking_float, blocking_double;
};

// What the plan reads of a product: GemmArgs without its pointers, but for the facts about them
// that change a decision.
struct GemmProblem {
  index_t m = 0, n = 0, k = 0;
  index_t a_rs = 0, a_cs = 0, b_rs = 0, b_cs = 0;
  index_t elem_bytes = 4;        // sizeof(T): 4 (float32, and bfloat16 products) or 8
  bool row_sums = false;         // A's row sums wanted (GemmArgs::a_row_sums)
  bool col_scale = false;        // A scaled by columns (GemmArgs::a_col_scale)
  bool loss = false;             // the epilogue sums squares (Epilogue::loss)
  bool bf16 = false;             // a bfloat16 product
  bool a16 = false;              // A read from bfloat16 memory (GemmArgs::a16)
  bool a16_line_aligned = true;  // ... at a 64-byte aligned address
  bool result16_only = false;    // a bfloat16 result alone (GemmArgs::c null)
  int threads = 1;               // the team asked for (GemmArgs::num_threads)
};

// Every decision for one product, from its problem and a build's table alone (gemm/plan.cpp:
// compiled once, for every build; no ISA flag changes it).
GemmPlan make_plan(const IsaTraits& traits, const GemmProblem& problem);

// One instruction set's build of the engine: its functions and its table, for run-time dispatch.
struct IsaBuild {
  const char* name;
  const IsaTraits* traits;                               // its table (make_plan)
  const FloatEngine* floats;                             // its own, or (avx512_bf16, amx_bf16) isa_avx512's
  void (*bf16gemm)(const GemmArgs<float>&);              // bfloat16 products (GemmArgs::bf16 set)
  const char* bf16_kernel;                               // how they run (lingrad.hpp)
  double (*bf16_probe)(index_t iterations, float seed);  // bfloat16 peak probe, or null
  int bf16_probe_flops;
};

namespace isa_generic { extern const IsaBuild build; }
#if defined(LINGRAD_X86)
namespace isa_avx2 { extern const IsaBuild build; }
namespace isa_avx512 {
extern const IsaBuild build;
extern const FloatEngine float_engine;
}  // namespace isa_avx512
namespace isa_avx512_bf16 { extern const IsaBuild build; }
namespace isa_amx_bf16 { extern const IsaBuild build; }
#endif

// The build chosen at run time (cpu.cpp).
const IsaBuild& active_build();

inline void gemm(const GemmArgs<float>& g) {
  const IsaBuild& build = active_build();
  g.bf16 ? build.bf16gemm(g) : build.floats->sgemm(g);
}
inline void gemm(const GemmArgs<double>& g) { active_build().floats->dgemm(g); }
inline void epilogue(const Epilogue<float>& e, float* c, index_t m, index_t n) {
  active_build().floats->sepilogue(e, c, m, n);
}
inline void epilogue(const Epilogue<double>& e, double* c, index_t m, index_t n) {
  active_build().floats->depilogue(e, c, m, n);
}

}  // namespace lingrad
