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

// Choices shared by every build of the engine (reported by build_info(); the tests read them there).
constexpr double kSerialWork = 1 << 18;           // multiply-adds (M*N*K) below which one thread runs (measured)
constexpr index_t kSlabBytes = index_t(8) << 20;  // packed B between two barriers: at most this, or one K slice
constexpr index_t kSmallM = 8;                    // at most this many rows: the small-M path,
constexpr index_t kSmallMinK = 8;                 // if K >= kSmallMinK * M^2 (else packed): see gemm/small_m.inc

// One build's block sizes, per dtype: the labelled table at the top of each gemm/isa_<name>.cpp.
struct GemmTable {
  const char* name;   // the ISA, as get_isa() reports it
  GemmBlocking f, d;  // float, double
};

// One instruction set's build of the engine.
struct GemmKernels {
  const char* name;
  void (*sgemm)(const GemmArgs<float>&);
  void (*dgemm)(const GemmArgs<double>&);
  GemmPlan (*splan)(const GemmArgs<float>&);  // the plan each would run (no pointer is read)
  GemmPlan (*dplan)(const GemmArgs<double>&);
  // The epilogue alone over a dense (M, N) matrix c (its loss, if asked for, summed row by row).
  void (*sepilogue)(const Epilogue<float>&, float* c, index_t m, index_t n);
  void (*depilogue)(const Epilogue<double>&, double* c, index_t m, index_t n);
  double (*fma_probe)(index_t iterations, float seed);  // peak-rate probe (see measure_fma_peak)
  int fma_probe_flops;                                  // float flops per probe iteration
  GemmBlocking blocking_float, blocking_double;
  const char* bf16_kernel;                               // how bfloat16 products run (lingrad.hpp)
  double (*bf16_probe)(index_t iterations, float seed);  // bfloat16 peak probe, or null
  int bf16_probe_flops;
};

namespace isa_generic { extern const GemmKernels kernels; }
#if defined(LINGRAD_X86)
namespace isa_avx2 { extern const GemmKernels kernels; }
namespace isa_avx512 { extern const GemmKernels kernels; }
namespace isa_avx512_bf16 { extern const GemmKernels kernels; }
namespace isa_amx_bf16 { extern const GemmKernels kernels; }
#endif

// The build chosen at run time (cpu.cpp).
const GemmKernels& active_kernels();

inline void gemm(const GemmArgs<float>& g) { active_kernels().sgemm(g); }
inline void gemm(const GemmArgs<double>& g) { active_kernels().dgemm(g); }
inline void epilogue(const Epilogue<float>& e, float* c, index_t m, index_t n) {
  active_kernels().sepilogue(e, c, m, n);
}
inline void epilogue(const Epilogue<double>& e, double* c, index_t m, index_t n) {
  active_kernels().depilogue(e, c, m, n);
}

}  // namespace lingrad
