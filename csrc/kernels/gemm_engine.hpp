// gemm_engine.hpp: the GEMM engine of gemm.hpp, as a plan and the stages that run it.
//
// Not a normal header: each gemm_<isa>.cpp defines its block sizes (kBlocking, a labelled table)
// and LINGRAD_ISA (its namespace), then includes this file once; that file's compile flags choose
// the instructions. Everything here lives in that namespace (and an anonymous one), so two builds
// never share a symbol: a shared inline function could otherwise run AVX-512 code on a CPU without
// AVX-512. For the same reason this file uses no standard-library templates.
//
// A product is first planned (make_plan: a pure function of the shape, the strides and the build's
// blocking, reported to tests by gemm_plan() in lingrad.hpp), then run by one of three paths:
//   narrow   N <= kNarrowN (a layer with a handful of outputs): vectorised dot products.
//   small M  M <= kSmallM and K >= kSmallMinK M^2 (a batch of 1-8; dW of 1-8 outputs): B streamed
//            once, in place.
//   packed   everything else: the Goto/BLIS loops around a register-tile micro-kernel.
// The packed path's loops, outermost first (BLIS names), and the stage that runs each:
//   jc  over N in NC columns        gemm_packed: B packed a slab of K slices at a time (pack_b_slab),
//                                   shared by all threads, between two barriers
//   ic  over M in MC rows           macro_kernel: each thread takes a fixed range of (row block,
//   pc  over K in KC slices           group of column panels) items; per K slice, the block of A is
//                                     packed (per thread, stays in L2) or read in place
//   jr, ir over NR x MR tiles       micro_kernel, then apply_epilogue on tiles whose sum is complete
//                                   (AMX: each column panel's slice in chunks of K tiles over the
//                                   block's row panels, C blocks kept in a buffer: see kAmxRows)
// The pc loop is the only loop over the reduction and is never split across threads, so each
// element of C is summed in the same order (pc ascending, k ascending within a slice) whatever
// thread computes it; block sizes follow from the shape and the build's table, never from the
// thread count. The small-M and narrow paths keep the same rule (see their comments).
#ifndef LINGRAD_ISA
#error "define LINGRAD_ISA before including gemm_engine.hpp"
#endif

#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <type_traits>

#include "gemm.hpp"
#if defined(__AVX512F__) || defined(__AVX2__)  // (every build with bfloat16 instructions too)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lingrad {
namespace LINGRAD_ISA {
namespace {

constexpr index_t imin(index_t a, index_t b) { return a < b ? a : b; }
constexpr index_t kNarrowN = 4;             // at most this many columns: dot products (gemm_narrow)
constexpr index_t kCacheBytes = 256 << 10;  // a C block larger than this is prefetched (see micro_kernel)
constexpr index_t kAliasBytes = 2048;       // row strides that are multiples of this are packed (see pack_a)
constexpr index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

// 64-byte aligned scratch memory, freed on scope exit.
template <typename U>
class Scratch {
 public:
  explicit Scratch(index_t count) {
    const std::size_t bytes = (static_cast<std::size_t>(count > 0 ? count : 1) * sizeof(U) + 63) / 64 * 64;
    ptr_ = static_cast<U*>(std::aligned_alloc(64, bytes));
    if (!ptr_) throw std::bad_alloc();
  }
  ~Scratch() { std::free(ptr_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  U* get() const { return ptr_; }

 private:
  U* ptr_;
};

// An operand value as a bfloat16 product sees it: rounded, and a denormal flushed to (signed) zero.
inline bfloat16 flush_denormal(bfloat16 h) {
  return {static_cast<std::uint16_t>((h.bits & 0x7f80u) == 0 ? h.bits & 0x8000u : h.bits)};
}
inline bfloat16 bf16_operand(const bfloat16* p) { return flush_denormal(*p); }
inline bfloat16 bf16_operand(const float* p) { return flush_denormal(float_to_bf16(*p)); }

// The value a packed micro-panel holds for the source value *p: T's own, or (kWidened: the widened
// form of a bfloat16 product) the bfloat16 operand it stands for, widened back to float32.
template <typename T, bool kWidened, typename S>
inline T panel_value(const S* p) {
  if constexpr (kWidened)
    return bf16_to_float(bf16_operand(p));
  else
    return *p;
}

#if defined(__AVX512F__)
// Vector packing for the AVX-512 builds (all with AVX-512 F and BW).
// 32 bfloat16 lanes as bf16_operand sees them: a denormal (exponent 0) to its signed zero.
inline __m512i flush_denormals(__m512i v) {
  const __mmask32 denormal = _mm512_testn_epi16_mask(v, _mm512_set1_epi16(0x7f80));
  return _mm512_mask_mov_epi16(v, denormal, _mm512_and_si512(v, _mm512_set1_epi16(static_cast<short>(0x8000))));
}
// 16 floats rounded as float_to_bf16 rounds them (to nearest even; a NaN stays a quiet NaN).
inline __m256i round_to_bf16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f), high = _mm512_srli_epi32(u, 16);
  const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40))));
}
// k .. k + 31 of a row with unit k stride (n of them, zero beyond) as 16 K-pair words.
inline __m512i operand_words(const bfloat16* row, index_t n) {
  const __mmask32 in = n >= 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
  return flush_denormals(_mm512_maskz_loadu_epi16(in, row));
}
inline __m512i operand_words(const float* row, index_t n) {
  auto part = [&](index_t from) {
    const index_t m = n - from;
    const __mmask16 in = m >= 16 ? __mmask16{0xffff} : m <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << m) - 1);
    return round_to_bf16(_mm512_maskz_loadu_ps(in, row + from));
  };
  return flush_denormals(_mm512_inserti64x4(_mm512_castsi256_si512(part(0)), part(16), 1));
}
// v[i] lane j = v[j] lane i: the 16 x 16 transpose of 32-bit words.
inline void transpose_words(__m512i (&v)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// The pieces of pack_rows_transposed (below) in zmm registers: 16 lanes of 32-bit words.
using WordVector = __m512i;
constexpr index_t kWordLanes = 16;

// k .. k + 15 of a row with unit k stride (n of them, zero beyond) as pack_micro_panel holds them:
// T's own float32 bits, or (kWidened) the bfloat16 operand widened back to float32.
template <bool kWidened, typename S>
inline WordVector row_words(const S* row, index_t n) {
  const __mmask16 in = n >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << n) - 1);
  if constexpr (!kWidened) {
    return _mm512_castps_si512(_mm512_maskz_loadu_ps(in, row));
  } else {
    __m256i h;
    if constexpr (std::is_same_v<S, float>)
      h = round_to_bf16(_mm512_maskz_loadu_ps(in, row));
    else
      h = _mm256_maskz_loadu_epi16(in, row);
    h = _mm512_castsi512_si256(flush_denormals(_mm512_castsi256_si512(h)));
    return _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
  }
}

// The first min(R, 16) words of v to `to` (a panel of 8 rows keeps the low half).
template <int R>
inline void store_words(float* to, WordVector v) {
  static_assert(R % 16 == 0 || R == 8, "whole groups of 16 rows, or 8");
  if constexpr (R < 16)
    _mm256_storeu_ps(to, _mm512_castps512_ps256(_mm512_castsi512_ps(v)));
  else
    _mm512_storeu_ps(to, _mm512_castsi512_ps(v));
}
#elif defined(__AVX2__)
// The same pieces in ymm registers: 8 lanes, the 8 x 8 transpose; kWidened values are rounded,
// flushed and widened in 32-bit lanes.
using WordVector = __m256i;
constexpr index_t kWordLanes = 8;

inline void transpose_words(__m256i (&v)[8]) {  // v[i] lane j = v[j] lane i
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(_mm256_castsi256_ps(v[i]), _mm256_castsi256_ps(v[i + 1]));
    t[i + 1] = _mm256_unpackhi_ps(_mm256_castsi256_ps(v[i]), _mm256_castsi256_ps(v[i + 1]));
  }
  for (int i = 0; i < 8; i += 4) {
    u[i / 4 * 4 + 0] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i / 4 * 4 + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i / 4 * 4 + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i / 4 * 4 + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_castps_si256(_mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    v[i + 4] = _mm256_castps_si256(_mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

// 8 values of a row (all there) as 32-bit words, as row_words below gives them.
template <bool kWidened, typename S>
inline WordVector full_row_words(const S* row) {
  if constexpr (!kWidened) {
    return _mm256_castps_si256(_mm256_loadu_ps(row));
  } else {
    __m256i h;  // each lane: the bfloat16 bits (float_to_bf16's rounding of a float)
    if constexpr (std::is_same_v<S, float>) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(row)), high = _mm256_srli_epi32(u, 16);
      const __m256i odd = _mm256_and_si256(high, _mm256_set1_epi32(1));
      const __m256i rounded =
          _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
      const __m256i nan =
          _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
      h = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
    } else {
      h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
    }
    const __m256i denormal = _mm256_cmpeq_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x7f80)), _mm256_setzero_si256());
    h = _mm256_blendv_epi8(h, _mm256_and_si256(h, _mm256_set1_epi32(0x8000)), denormal);
    return _mm256_slli_epi32(h, 16);
  }
}

// k .. k + 7 of a row with unit k stride (n of them, zero beyond): a short last group through a zeroed copy.
template <bool kWidened, typename S>
inline WordVector row_words(const S* row, index_t n) {
  if (n >= 8) return full_row_words<kWidened>(row);
  alignas(32) S part[8] = {};
  for (index_t i = 0; i < n; ++i) part[i] = row[i];
  return full_row_words<kWidened>(part);
}

// The first min(R, 8) words of v to `to` (the 6-row A panels: lanes masked).
template <int R>
inline void store_words(float* to, WordVector v) {
  static_assert(R % 8 == 0 || R < 8, "whole groups of 8 rows, or fewer");
  if constexpr (R < 8)
    _mm256_maskstore_ps(to, _mm256_cmpgt_epi32(_mm256_set1_epi32(R), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                        _mm256_castsi256_ps(v));
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), v);
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// pack_micro_panel's k-major panel from rows with unit k stride (W^T as B in the forward pass; X and
// dY as A where packed): kWordLanes rows x kWordLanes k at a time, read as vectors and transposed in
// registers, instead of one scattered store per value. kWidened: the values as panel_value gives
// them (rounded, flushed, widened), at slots k ^ 1. A panel of fewer rows than a vector's lanes
// transposes zeros for the rest and stores its own. Writes slots [0, kc + (kc & 1)) of all R rows
// (zero beyond rows and kc).
template <int R, bool kWidened, typename S>
void pack_rows_transposed(float* __restrict panel, const S* src, index_t rs, index_t rows, index_t kc) {
  constexpr index_t L = kWordLanes, kGroups = R < L ? 1 : R / L;
  const index_t slots = kWidened ? kc + (kc & 1) : kc;
  for (index_t k0 = 0; k0 < slots; k0 += L) {
    for (index_t g = 0; g < kGroups; ++g) {
      WordVector v[L];
      for (index_t i = 0; i < L; ++i) {
        const index_t r = g * L + i;
        v[i] = r < rows && i < R && k0 < kc ? row_words<kWidened>(src + r * rs + k0, kc - k0) : WordVector{};
      }
      transpose_words(v);  // v[j]: k0 + j of the L rows
      for (index_t j = 0; j < L && k0 + j < slots; ++j)
        store_words<R>(panel + (kWidened ? (k0 + j) ^ 1 : k0 + j) * R + g * L, v[j]);
    }
  }
}
#endif

// Packs rows (<= R) rows of a strided rows x kc block into one k-major micro-panel:
//   panel[k*R + r] = src[r*rs + k*cs], and zero for r >= rows, so that edge tiles run the same
// micro-kernel (float rows with unit k stride: by pack_rows_transposed, in the AVX2 and AVX-512 builds). kWidened (a
// bfloat16 product's widened form; src float or bfloat16): the values as panel_value gives them, each at slot k ^ 1
// (every K pair odd k first), a missing last odd k as zero: kc + (kc & 1) slots. If sums is set, sums[r] += the row's
// slots summed in order (the bias gradient).
template <typename T, int R, bool kWidened = false, typename S = T>
void pack_micro_panel(T* __restrict panel, const S* src, index_t rs, index_t cs, index_t rows, index_t kc, T* sums) {
  const index_t slots = kWidened ? kc + (kc & 1) : kc;
  auto slot = [](index_t k) { return kWidened ? k ^ 1 : k; };
#if defined(__AVX512F__)
  constexpr bool kTransposed = std::is_same_v<T, float> && (R % 16 == 0 || R == 8);
#elif defined(__AVX2__)
  constexpr bool kTransposed = std::is_same_v<T, float> && (R % 8 == 0 || R < 8);
#else
  constexpr bool kTransposed = false;
#endif
  if (kTransposed && cs == 1 && rs != 1) {  // k contiguous, rows apart (W^T as B): in registers
#if defined(__AVX512F__) || defined(__AVX2__)
    if constexpr (kTransposed) pack_rows_transposed<R, kWidened>(panel, src, rs, rows, kc);
#endif
  } else if (cs == 1) {  // k contiguous (X in the forward pass, dY for dX): stream along each row
    for (index_t r = 0; r < rows; ++r) {
      const S* s = src + r * rs;
      for (index_t k = 0; k < kc; ++k) panel[slot(k) * R + r] = panel_value<T, kWidened>(s + k);
    }
  } else if (rs == 1 && rows == R) {  // rows contiguous (dY^T for dW, W and X as B): R elements per k
    for (index_t k = 0; k < kc; ++k) {
      const S* s = src + k * cs;
      T* p = panel + slot(k) * R;
      for (int r = 0; r < R; ++r) p[r] = panel_value<T, kWidened>(s + r);
    }
  } else {  // general strides
    for (index_t k = 0; k < kc; ++k) {
      const S* s = src + k * cs;
      T* p = panel + slot(k) * R;
      for (index_t r = 0; r < rows; ++r) p[r] = panel_value<T, kWidened>(s + r * rs);
    }
  }
  if (slots > kc) {
    for (index_t r = 0; r < rows; ++r) panel[slot(kc) * R + r] = T(0);
  }
  if (rows < R) {
    for (index_t k = 0; k < slots; ++k)
      for (index_t r = rows; r < R; ++r) panel[k * R + r] = T(0);
  }
  if (sums) {
    for (index_t r = 0; r < rows; ++r) {
      T s = 0;
      for (index_t k = 0; k < slots; ++k) s += panel[k * R + r];
      sums[r] += s;
    }
  }
}

// Scales a packed micro-panel's k-th column by scale[k] (GemmArgs::a_col_scale), then adds the
// rows' sums to sums if set, in pack_micro_panel's order (of the scaled values).
template <typename T, int R>
void scale_micro_panel(T* __restrict panel, const T* scale, index_t rows, index_t kc, T* sums) {
  for (index_t k = 0; k < kc; ++k)
    for (int r = 0; r < R; ++r) panel[k * R + r] *= scale[k];
  if (sums) {
    for (index_t r = 0; r < rows; ++r) {
      T s = 0;
      for (index_t k = 0; k < kc; ++k) s += panel[k * R + r];
      sums[r] += s;
    }
  }
}

// L elements of T as one SIMD register (GCC/Clang vector extension), loaded and stored unaligned.
// The compiler keeps an array of these, indexed by constants, in registers more reliably than an
// array of scalars that it must vectorise itself.
template <typename T, int L>
struct Vector {
  typedef T type __attribute__((vector_size(L * sizeof(T)), aligned(sizeof(T)), may_alias));
};
template <typename T, int L>
inline typename Vector<T, L>::type load_vector(const T* p) {
  return *reinterpret_cast<const typename Vector<T, L>::type*>(p);
}
template <typename T, int L>
inline void store_vector(T* p, typename Vector<T, L>::type v) {
  *reinterpret_cast<typename Vector<T, L>::type*>(p) = v;
}

// Fetches the mr rows of C's nr-wide tile (rows ldc apart) now: the caller asks for it when they are
// likely far away (too many to stay in L2 between K slices), so that the update after the K loop
// does not wait for memory.
template <typename T>
inline void prefetch_tile(const T* c, index_t ldc, index_t mr, index_t nr) {
  for (index_t i = 0; i < mr; ++i) {
    __builtin_prefetch(c + i * ldc, 1);
    __builtin_prefetch(c + i * ldc + nr - 1, 1);
  }
}

// A finished MR x NR register tile (NR / V vectors per row) into C's mr x nr corner: C = (or +=) acc.
template <typename T, int MR, int NR, int V>
inline void store_tile(const typename Vector<T, V>::type (&acc)[MR][NR / V], T* __restrict c, index_t ldc, index_t mr,
                       index_t nr, bool accumulate) {
  constexpr int NV = NR / V;
  if (mr == MR && nr == NR) {
    for (int i = 0; i < MR; ++i) {
      T* ci = c + i * ldc;
      for (int v = 0; v < NV; ++v)
        store_vector<T, V>(ci + v * V, accumulate ? load_vector<T, V>(ci + v * V) + acc[i][v] : acc[i][v]);
    }
  } else {  // edge tile: spill the registers to a buffer, copy what is valid
    alignas(64) T tile[MR * NR];
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) store_vector<T, V>(tile + i * NR + v * V, acc[i][v]);
    for (index_t i = 0; i < mr; ++i) {
      T* ci = c + i * ldc;
      if (accumulate) {
        for (index_t j = 0; j < nr; ++j) ci[j] += tile[i * NR + j];
      } else {
        for (index_t j = 0; j < nr; ++j) ci[j] = tile[i * NR + j];
      }
    }
  }
}

// The micro-kernel: C[0:mr, 0:nr] = (or +=) A (MR x kc) * B (kc x NR).
// A is a packed micro-panel (a[k*MR + i]) or, read in place, MR rows with unit k stride
// (a[i*a_rs + k]); B is read as rows of NR contiguous elements b_rs apart (b[k*b_rs + j]): a packed
// micro-panel as wide as the tile or wider, or B in place. The tile is MR x NR / V vectors of V
// elements (V: the build's vector length, or NR if narrower), indexed only by constants, so it
// lives in registers; each element is a chain of multiply-adds in ascending k, from 0.
template <typename T, int MR, int NR, bool kPackedA, int VL>
void micro_kernel(index_t kc, const T* __restrict a, index_t a_rs, const T* __restrict b, index_t b_rs, T* __restrict c,
                  index_t ldc, index_t mr, index_t nr, bool accumulate, bool prefetch_c) {
  constexpr int V = NR < VL ? NR : VL, NV = NR / V;
  using vec = typename Vector<T, V>::type;
  if (prefetch_c) prefetch_tile(c, ldc, mr, nr);
  vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vec{};

  for (index_t k = 0; k < kc; ++k) {
    const T* __restrict bk = b + k * b_rs;
    vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load_vector<T, V>(bk + v * V);
    for (int i = 0; i < MR; ++i) {
      const T ai = kPackedA ? a[k * MR + i] : a[i * a_rs + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
    }
  }

  store_tile<T, MR, NR, V>(acc, c, ldc, mr, nr, accumulate);
}

// One tile through the micro-kernel, its A panel packed (a_rs unused) or in place; B is read as rows
// of W contiguous elements b_rs apart, which covers a packed micro-panel of width NR >= W (b_rs = NR)
// as well as B in place. Each element of C is summed in the same order whatever W is.
template <typename T, int MR, int W, int VL>
void run_tile(bool packed_a, index_t kc, const T* a, index_t a_rs, const T* b, index_t b_rs, T* c, index_t ldc,
              index_t mr, index_t nr, bool accumulate, bool prefetch_c) {
  if (packed_a)
    micro_kernel<T, MR, W, true, VL>(kc, a, 0, b, b_rs, c, ldc, mr, nr, accumulate, prefetch_c);
  else
    micro_kernel<T, MR, W, false, VL>(kc, a, a_rs, b, b_rs, c, ldc, mr, nr, accumulate, prefetch_c);
}

// ---------------------------------------------------------------------------------------------
// bfloat16 products (GemmArgs::bf16). Every operand value is rounded to bfloat16 (or read as one),
// a denormal flushed to zero, and K is taken in pairs (k, k + 1) from an even k, a missing k + 1
// being zero. Each pair updates each element of the tile in two float32 roundings, odd k first:
//   c = c + A[i, k+1] B[k+1, j];   c = c + A[i, k] B[k, j]
// which is what one step of vdpbf16ps does with one pair (Intel's manual: the odd element first,
// denormal inputs and outputs flushed, round to nearest even). A product of two bfloat16 values is
// exact in float32, so an FMA or a multiply and an add give the same bits, and two forms compute
// the same result:
//   widened  float32 panels with each pair stored odd k first, run by the float32 micro-kernel
//            (every build; this is also the portable emulation of the instruction);
//   pairs    bfloat16 panels of K pairs, run by bf16_pair_kernel (the avx512_bf16 build).
// They differ only where a partial sum is a float32 denormal, which vdpbf16ps flushes to zero.
//   amx      the amx_bf16 build: AMX tiles (tdpbf16ps, 16 x 16 float32 blocks of C, K in tiles of 32).
//            Its additions follow the hardware's own order, not the pairs above: its results differ
//            from the other paths in the last bits, and are bitwise the same for any thread count.
enum class Kind { plain, bf16_widened, bf16_pairs, bf16_amx };

#if defined(LINGRAD_AMX)
constexpr Kind kBf16Kind = Kind::bf16_amx;
#elif defined(LINGRAD_BF16_DOT)
constexpr Kind kBf16Kind = Kind::bf16_pairs;
#else
constexpr Kind kBf16Kind = Kind::bf16_widened;
#endif
// K slices of bfloat16 products are multiples of this (AMX: whole K tiles; else whole pairs).
constexpr index_t kBf16KStep = kBf16Kind == Kind::bf16_amx ? 32 : 2;

// The sum of a row's kc values (k stride cs) as a bfloat16 product sees them, from the source, in the
// widened order (each pair's odd k first): the bias gradient, the same bits on every path.
template <typename S>
float bf16_row_sum(const S* row, index_t cs, index_t kc) {
  float acc = 0;
  for (index_t j = 0; j < kc; j += 2) {
    acc += j + 1 < kc ? bf16_to_float(bf16_operand(row + (j + 1) * cs)) : 0.0f;
    acc += bf16_to_float(bf16_operand(row + j * cs));
  }
  return acc;
}

// sums[r] += bf16_row_sum of each of rows (<= R) rows; rows next to each other (rs == 1: dY^T for dW)
// all at once, k after k, in the same order for each row (the same bits).
template <int R, typename S>
void add_bf16_row_sums(float* sums, const S* src, index_t rs, index_t cs, index_t rows, index_t kc) {
  if (rs != 1) {
    for (index_t r = 0; r < rows; ++r) sums[r] += bf16_row_sum(src + r * rs, cs, kc);
    return;
  }
  float acc[R] = {};
  for (index_t j = 0; j < kc; j += 2) {
    const S *k0 = src + j * cs, *k1 = k0 + cs;
    if (j + 1 < kc) {
      for (index_t r = 0; r < rows; ++r) acc[r] += bf16_to_float(bf16_operand(k1 + r));
    } else {
      for (index_t r = 0; r < rows; ++r) acc[r] += 0.0f;
    }
    for (index_t r = 0; r < rows; ++r) acc[r] += bf16_to_float(bf16_operand(k0 + r));
  }
  for (index_t r = 0; r < rows; ++r) sums[r] += acc[r];
}

#if defined(LINGRAD_BF16_DOT) || defined(LINGRAD_AMX)
// pack_bf16_panel's pairs and AMX forms from rows with unit k stride (W^T in the forward pass, and
// X there as the pairs kernel's A): 16 rows x 16 K pairs at a time, read as vectors and transposed in
// registers (the words pair_words would give, 4 to 8 times faster than gathering them). A panel of 8
// rows (the pairs kernel's A) transposes 8 rows and 8 zero rows, and keeps the low half.
template <int R, Kind kKind, typename S>
void pack_pairs_transposed(bfloat16* half, const S* src, index_t rs, index_t rows, index_t kc, index_t kc_padded) {
  static_assert(R % 16 == 0 || (R == 8 && kKind == Kind::bf16_pairs), "whole groups of 16 rows, or 8 for pairs");
  constexpr index_t kGroups = R < 16 ? 1 : R / 16;
  std::uint32_t* const out = reinterpret_cast<std::uint32_t*>(half);
  const index_t pairs = ceil_div(kc_padded, 2);
  for (index_t p0 = 0; p0 < pairs; p0 += 16) {
    for (index_t g = 0; g < kGroups; ++g) {
      __m512i v[16];
      for (index_t i = 0; i < 16; ++i) {
        const index_t r = g * 16 + i;
        v[i] = r < rows && i < R && 2 * p0 < kc ? operand_words(src + r * rs + 2 * p0, kc - 2 * p0)
                                                : _mm512_setzero_si512();
      }
      transpose_words(v);  // v[j]: pair p0 + j of the 16 rows
      for (index_t j = 0; j < 16 && p0 + j < pairs; ++j) {
        const index_t p = p0 + j;
        std::uint32_t* to =
            kKind == Kind::bf16_amx ? out + (((p / 16) * (R / 16) + g) * 16 + p % 16) * 16 : out + p * R + g * 16;
        if constexpr (R < 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm512_castsi512_si256(v[j]));
        else
          _mm512_storeu_si512(to, v[j]);
      }
    }
  }
}
#endif

// K pair p (k = 2p and 2p + 1) of rows (<= R) rows of a strided rows x kc block of a bfloat16
// product's operand (src float or bfloat16) as 32-bit words, the even k in the low half: words[r],
// zero beyond rows and kc. Rows next to each other (rs == 1: W for dX, X and dY^T for dW) are read
// as vectors, 32 rows of two k at a time, in the builds with bfloat16 instructions.
template <int R, typename S>
inline void pair_words(std::uint32_t (&words)[R], const S* src, index_t rs, index_t cs, index_t rows, index_t kc,
                       index_t p) {
  auto word = [](bfloat16 v0, bfloat16 v1) {
    return static_cast<std::uint32_t>(v0.bits) | static_cast<std::uint32_t>(v1.bits) << 16;
  };
  const S *k0 = src + 2 * p * cs, *k1 = k0 + cs;
#if defined(LINGRAD_BF16_DOT) || defined(LINGRAD_AMX)
  if constexpr (R % 32 == 0) {
    if (rs == 1) {
      // word j of 16 from lanes j of the even and odd k's vectors (lanes 32 + j: the odd k's)
      alignas(64) static constexpr std::uint16_t kLow[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                             37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                             11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
      const __m512i low = _mm512_load_si512(kLow), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
      for (index_t g = 0; g < R; g += 32) {
        const index_t n = rows - g;
        // (the rows of k are far apart, beyond the hardware's stride prefetch: 8 pairs ahead; dW of
        // 5000 x 784 x 50 measured about 5% faster)
        if (n > 0 && 2 * p + 17 < kc) {
          _mm_prefetch(reinterpret_cast<const char*>(k0 + 16 * cs + g), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(k1 + 16 * cs + g), _MM_HINT_T0);
        }
        const __m512i even = n > 0 && 2 * p < kc ? operand_words(k0 + g, n) : _mm512_setzero_si512();
        const __m512i odd = n > 0 && 2 * p + 1 < kc ? operand_words(k1 + g, n) : _mm512_setzero_si512();
        _mm512_storeu_si512(words + g, _mm512_permutex2var_epi16(even, low, odd));
        _mm512_storeu_si512(words + g + 16, _mm512_permutex2var_epi16(even, high, odd));
      }
      return;
    }
  }
#endif
  index_t r = 0;
  if (2 * p + 1 < kc) {
    if (rs == 1) {
      for (; r < rows; ++r) words[r] = word(bf16_operand(k0 + r), bf16_operand(k1 + r));
    } else {
      for (; r < rows; ++r) words[r] = word(bf16_operand(k0 + r * rs), bf16_operand(k1 + r * rs));
    }
  } else if (2 * p < kc) {  // a last half pair
    for (; r < rows; ++r) words[r] = word(bf16_operand(k0 + r * rs), bfloat16{0});
  }
  for (; r < R; ++r) words[r] = 0;
}

// Packs rows (<= R) rows of a strided rows x kc block of a bfloat16 product's operand (src float or
// bfloat16) into one micro-panel of ceil(kc_padded / 2) K pairs, zero beyond rows and kc:
//   pairs:    bfloat16 panel[(p*R + r)*2 + t] = v(r, 2p + t)
//   amx:      the same, in AMX B tiles of 16 pairs x 16 rows, each 1 KB contiguous
//   widened:  float panel[(2p + 1 - t)*R + r] = v(r, 2p + t)   (odd k first)
// If sums is set, sums[r] += the row's values summed in the widened order (the bias gradient).
template <int R, Kind kKind, typename S>
void pack_bf16_panel(float* panel, const S* src, index_t rs, index_t cs, index_t rows, index_t kc, float* sums,
                     index_t kc_padded) {
  if constexpr (kKind == Kind::bf16_widened) {
    (void)kc_padded;
    pack_micro_panel<float, R, true>(panel, src, rs, cs, rows, kc, sums);
    return;
  }
  bfloat16* const half = reinterpret_cast<bfloat16*>(panel);
#if defined(LINGRAD_BF16_DOT) || defined(LINGRAD_AMX)
  if constexpr (R % 16 == 0 || (R == 8 && kKind == Kind::bf16_pairs)) {
    if (cs == 1 && rs != 1) {
      pack_pairs_transposed<R, kKind>(half, src, rs, rows, kc, kc_padded);
      if (sums) add_bf16_row_sums<R>(sums, src, rs, cs, rows, kc);
      return;
    }
  }
#endif
  std::uint32_t words[R];
  for (index_t p = 0; p < ceil_div(kc_padded, 2); ++p) {
    pair_words<R>(words, src, rs, cs, rows, kc, p);
    if constexpr (kKind == Kind::bf16_amx) {
      static_assert(R % 16 == 0, "AMX B panels hold whole tiles of 16 columns");
      for (index_t g = 0; g < R / 16; ++g)
        __builtin_memcpy(half + (((p / 16) * (R / 16) + g) * 16 + p % 16) * 32, words + g * 16, 16 * sizeof *words);
    } else {
      __builtin_memcpy(half + p * R * 2, words, sizeof words);
    }
  }
  if (sums) add_bf16_row_sums<R>(sums, src, rs, cs, rows, kc);
}

// The AMX form of an A panel: for each K tile of 32, R rows of 32 bfloat16 values (row r of K tile
// t at (t R + r) 32: a tile's 16 rows are 64 bytes apart, 1 KB contiguous, so that no two share an
// L1 set), zero beyond rows and kc (kc_padded: whole K tiles); sums as pack_bf16_panel's. Rows next
// to each other (dY^T for dW) go through pair_words, one K pair of all rows at a time.
template <int R, typename S>
void pack_bf16_rows(float* panel, const S* src, index_t rs, index_t cs, index_t rows, index_t kc, float* sums,
                    index_t kc_padded) {
  bfloat16* const half = reinterpret_cast<bfloat16*>(panel);
  if (rs == 1 && cs != 1) {
    std::uint32_t* const out = reinterpret_cast<std::uint32_t*>(panel);
    std::uint32_t words[R];
    for (index_t p = 0; p < kc_padded / 2; ++p) {
      pair_words<R>(words, src, rs, cs, rows, kc, p);
      for (index_t r = 0; r < R; ++r) out[((p / 16) * R + r) * 16 + p % 16] = words[r];
    }
#if defined(LINGRAD_AMX)
  } else if (cs == 1) {  // rows with unit k stride (X, dY for dX): 32 k of a row are one tile row
    for (index_t r = 0; r < R; ++r)
      for (index_t t = 0; t < kc_padded / 32; ++t) {
        const index_t n = r < rows ? kc - t * 32 : 0;
        _mm512_storeu_si512(half + (t * R + r) * 32,
                            n > 0 ? operand_words(src + r * rs + t * 32, n) : _mm512_setzero_si512());
      }
#endif
  } else {
    for (index_t r = 0; r < R; ++r) {
      for (index_t t = 0; t < kc_padded / 32; ++t) {
        bfloat16* __restrict out = half + (t * R + r) * 32;
        const index_t k0 = t * 32, n = r < rows ? imin(32, kc - k0) : 0;
        index_t j = 0;
        if (n > 0) {
          const S* __restrict row = src + r * rs + k0 * cs;
          if (cs == 1) {
#pragma omp simd
            for (index_t i = 0; i < n; ++i) out[i] = bf16_operand(row + i);
          } else {
            for (index_t i = 0; i < n; ++i) out[i] = bf16_operand(row + i * cs);
          }
          j = n;
        }
        for (; j < 32; ++j) out[j] = bfloat16{0};
      }
    }
  }
  if (sums) add_bf16_row_sums<R>(sums, src, rs, cs, rows, kc);
}

// An operand panel of a product of kind kKind: plain (T's own values) or bfloat16 (from a16/b16 when
// set), kc values of K padded with zeros to kc_padded (see padded_k); rows_form: an AMX A panel.
template <typename T, int R, Kind kKind, bool kRowsForm = false>
void pack_operand_panel(T* panel, const T* src, const bfloat16* src16, index_t offset, index_t rs, index_t cs,
                        index_t rows, index_t kc, T* sums, index_t kc_padded) {
  if constexpr (kKind == Kind::plain) {
    (void)src16, (void)kc_padded;
    pack_micro_panel<T, R>(panel, src + offset, rs, cs, rows, kc, sums);
  } else if constexpr (kRowsForm) {
    if (src16)
      pack_bf16_rows<R>(panel, src16 + offset, rs, cs, rows, kc, sums, kc_padded);
    else
      pack_bf16_rows<R>(panel, src + offset, rs, cs, rows, kc, sums, kc_padded);
  } else if (src16) {
    pack_bf16_panel<R, kKind>(panel, src16 + offset, rs, cs, rows, kc, sums, kc_padded);
  } else {
    pack_bf16_panel<R, kKind>(panel, src + offset, rs, cs, rows, kc, sums, kc_padded);
  }
}

#if defined(LINGRAD_AMX)
// AMX: eight tiles of 16 rows x 64 bytes (palette 1): C in tiles 0-3 (a 32 x 32 float32 block), A in
// 4-5 (32 rows x 32 k), B in 6-7 (16 K pairs x 32 columns). Each thread of a product loads this
// configuration before its first tile and releases it after its last.
struct alignas(64) AmxConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  std::uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// The AMX blocking: a 32 x 32 block of C in tiles 0-3; row blocks of kAmxRows rows (MC: a 512 KB A
// block of K 1024, in L2); each column panel's K in chunks of kAmxChunk tiles (a 16 KB B chunk, in L1
// while the row block's A panels stream from L2), its C blocks accumulating in a contiguous buffer.
constexpr index_t kAmxRows = 256, kAmxChunk = 8;

// block (a contiguous 32 x 32 float32 block; zero first unless load) += A B over K tiles [t0, t1):
// B an AMX pairs panel of 32 columns (each tile 1 KB contiguous); A an AMX rows panel of 32 rows
// (a_ld 0), or 32 rows of bfloat16 read in place (a_ld elements apart, K tile t at a + 32 t; a short
// last K tile, t = ktiles - 1, from the rows panel a_tail if set). Each A or B tile is loaded just
// before its first product, after its last use by the previous K tile's (tiles are not renamed).
void amx_tiles(index_t t0, index_t t1, index_t ktiles, const bfloat16* a, index_t a_ld, const bfloat16* a_tail,
               const bfloat16* b, float* block, bool load) {
  if (load) {
    _tile_loadd(0, block, 128);
    _tile_loadd(1, block + 16, 128);
    _tile_loadd(2, block + 16 * 32, 128);
    _tile_loadd(3, block + 16 * 32 + 16, 128);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  auto k_tile = [&](const bfloat16* a0, const bfloat16* a1, int a_stride, const bfloat16* bt) {
    _tile_loadd(4, a0, a_stride);
    _tile_loadd(6, bt, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, bt + 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1, a_stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  };
  if (a_ld == 0) {  // (see pack_bf16_rows and pack_bf16_panel)
    for (index_t t = t0; t < t1; ++t) k_tile(a + t * 1024, a + t * 1024 + 512, 64, b + t * 1024);
  } else {
    const int stride = static_cast<int>(a_ld * sizeof(bfloat16));
    const index_t in_place = imin(t1, a_tail ? ktiles - 1 : ktiles);
    for (index_t t = t0; t < in_place; ++t) k_tile(a + t * 32, a + 16 * a_ld + t * 32, stride, b + t * 1024);
    if (a_tail && t1 == ktiles) k_tile(a_tail, a_tail + 512, 64, b + (ktiles - 1) * 1024);
  }
  _tile_stored(0, block, 128);
  _tile_stored(1, block + 16, 128);
  _tile_stored(2, block + 16 * 32, 128);
  _tile_stored(3, block + 16 * 32 + 16, 128);
}

// C[0:mr, 0:nr] = (or +=) a finished 32 x 32 block, by vectors: tile stores straight to C's rows
// (4 KB apart for 1024 outputs) cost more than the products. With into_block, the other way: the
// block += C's partial sums of the earlier K slices (for the epilogue to run on the block, in L1).
void amx_store_block(float* block, float* c, index_t ldc, index_t mr, index_t nr, bool accumulate,
                     bool into_block = false) {
  if (mr == 32 && nr == 32) {
    for (index_t i = 0; i < 32; ++i)
      for (index_t v = 0; v < 32; v += 16) {
        __m512 sum = _mm512_load_ps(block + i * 32 + v);
        if (accumulate) sum = _mm512_add_ps(_mm512_loadu_ps(c + i * ldc + v), sum);
        _mm512_storeu_ps(into_block ? block + i * 32 + v : c + i * ldc + v, sum);
      }
  } else {
    for (index_t i = 0; i < mr; ++i)
      for (index_t j = 0; j < nr; ++j)
        (into_block ? block[i * 32 + j] : c[i * ldc + j]) =
            accumulate ? c[i * ldc + j] + block[i * 32 + j] : block[i * 32 + j];
  }
}

// The AMX peak probe: four independent tile products on fixed tiles; 4 * 16 * 16 * 32 * 2 flops.
double amx_probe(index_t iterations, float seed) {
  static const AmxConfig config;
  alignas(64) static bfloat16 ones[16 * 32];
  for (auto& v : ones) v = float_to_bf16(1.0f + 1e-3f * seed);
  _tile_loadconfig(&config);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  for (index_t it = 0; it < iterations; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float c[16 * 16];
  _tile_stored(0, c, 64);
  _tile_release();
  return c[0];
}
#endif

#if defined(LINGRAD_BF16_DOT)
// The pairs micro-kernel: C[0:mr, 0:nr] = (or +=) A B over `pairs` K pairs, A a pairs panel of MR rows,
// B rows of NV * 16 columns of a pairs panel b_ps bfloat16 apart per pair. NV x 16 float32 lanes per
// row of the tile, in registers like micro_kernel's; each vdpbf16ps adds one pair (see above).
template <int MR, int NV>
void bf16_pair_kernel(index_t pairs, const bfloat16* __restrict a, const bfloat16* __restrict b, index_t b_ps,
                      float* __restrict c, index_t ldc, index_t mr, index_t nr, bool accumulate, bool prefetch_c) {
  using vec = typename Vector<float, 16>::type;
  if (prefetch_c) prefetch_tile(c, ldc, mr, nr);
  vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vec{};
  for (index_t p = 0; p < pairs; ++p) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * b_ps + v * 32);
    for (int i = 0; i < MR; ++i) {
      int pair;
      __builtin_memcpy(&pair, a + (p * MR + i) * 2, sizeof pair);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[i][v] = (vec)_mm512_dpbf16_ps((__m512)acc[i][v], av, bv[v]);
    }
  }
  store_tile<float, MR, NV * 16, 16>(acc, c, ldc, mr, nr, accumulate);
}

// The bfloat16 peak probe: 12 independent chains of vdpbf16ps (the pairs kernel without memory);
// 12 * 16 lanes * 2 pairs * 2 flops per iteration.
double bf16_probe(index_t iterations, float seed) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(seed * static_cast<float>(i + 1));  // distinct chains
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x33d633d6);
  for (index_t it = 0; it < iterations; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  double sum = 0;
  for (int i = 0; i < 12; ++i) sum += _mm512_reduce_add_ps(acc[i]);
  return sum;
}
#endif

// ---------------------------------------------------------------------------------------------
// Activations and their derivatives, elementwise, as PyTorch defines them (ReLU' and LeakyReLU' at
// 0 are 0 and the slope; GELU exact or with the tanh approximation).

// Each function takes the activation as a compile-time constant, so that a row's loop has no
// branch on it (with_activation below makes the one switch per row): ReLU and its kin vectorise.
template <Activation A, typename T>
T activate(T z, T slope) {
  if constexpr (A == Activation::relu) return z > T(0) ? z : T(0);
  if constexpr (A == Activation::leaky_relu) return z > T(0) ? z : slope * z;
  if constexpr (A == Activation::tanh) return std::tanh(z);
  if constexpr (A == Activation::sigmoid) return T(1) / (T(1) + std::exp(-z));
  if constexpr (A == Activation::gelu) return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440)));
  if constexpr (A == Activation::gelu_tanh)
    return T(0.5) * z * (T(1) + std::tanh(T(0.79788456080286535588) * (z + T(0.044715) * z * z * z)));
  if constexpr (A == Activation::silu) return z / (T(1) + std::exp(-z));
  (void)slope;
  return z;  // identity
}

// act'(z) from the pre-activation z.
template <Activation A, typename T>
T activation_grad_at_pre(T z, T slope) {
  if constexpr (A == Activation::relu) return z > T(0) ? T(1) : T(0);
  if constexpr (A == Activation::leaky_relu) return z > T(0) ? T(1) : slope;
  if constexpr (A == Activation::tanh) {
    const T h = std::tanh(z);
    return T(1) - h * h;
  }
  if constexpr (A == Activation::sigmoid) {
    const T h = T(1) / (T(1) + std::exp(-z));
    return h * (T(1) - h);
  }
  if constexpr (A == Activation::gelu)
    return T(0.5) * (T(1) + std::erf(z * T(0.70710678118654752440))) +
           z * T(0.39894228040143267794) * std::exp(T(-0.5) * z * z);
  if constexpr (A == Activation::gelu_tanh) {
    const T beta = T(0.79788456080286535588), kappa = T(0.044715);
    const T t = std::tanh(beta * (z + kappa * z * z * z));
    return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * beta * (T(1) + T(3) * kappa * z * z);
  }
  if constexpr (A == Activation::silu) {
    const T s = T(1) / (T(1) + std::exp(-z));
    return s * (T(1) + z * (T(1) - s));
  }
  (void)z, (void)slope;
  return T(1);  // identity
}

// act'(z) from the output h = act(z), for the activations where h determines it.
template <Activation A, typename T>
T activation_grad_at_output(T h, T slope) {
  if constexpr (A == Activation::relu) return h > T(0) ? T(1) : T(0);
  if constexpr (A == Activation::leaky_relu) return h > T(0) ? T(1) : slope;  // (a positive slope)
  if constexpr (A == Activation::tanh) return T(1) - h * h;
  if constexpr (A == Activation::sigmoid) return h * (T(1) - h);
  (void)h, (void)slope;
  return T(1);
}

// f(std::integral_constant<Activation, a>{}): the one switch from a run-time activation to the above.
template <typename F>
void with_activation(Activation a, F&& f) {
  using A = Activation;
  switch (a) {
    case A::identity:
      return f(std::integral_constant<A, A::identity>{});
    case A::relu:
      return f(std::integral_constant<A, A::relu>{});
    case A::leaky_relu:
      return f(std::integral_constant<A, A::leaky_relu>{});
    case A::tanh:
      return f(std::integral_constant<A, A::tanh>{});
    case A::sigmoid:
      return f(std::integral_constant<A, A::sigmoid>{});
    case A::gelu:
      return f(std::integral_constant<A, A::gelu>{});
    case A::gelu_tanh:
      return f(std::integral_constant<A, A::gelu_tanh>{});
    case A::silu:
      return f(std::integral_constant<A, A::silu>{});
  }
}

// The squared residuals are summed in kLossLanes lanes (column j of the tile into lane j % kLossLanes,
// row after row), then the lanes in order: a fixed order for every build, and loops that vectorise
// (a single double sum is a chain of dependent adds: 4 cycles an element).
constexpr int kLossLanes = 16;

// The epilogue on a finished mr x nr tile of C at (m0, n0), rows ldc apart: see Epilogue in
// gemm.hpp. Returns the tile's sum of squared residuals (0 without a target).
template <typename T>
double apply_epilogue(const Epilogue<T>& e, T* c, index_t ldc, index_t m0, index_t n0, index_t mr, index_t nr) {
  double lanes[kLossLanes] = {};
  const T slope = e.slope;
  for (index_t i = 0; i < mr; ++i) {
    T* ci = c + i * ldc;
    if (e.bias.data) {
      const T* bias = e.bias.data + n0 * e.bias.stride;
      for (index_t j = 0; j < nr; ++j) ci[j] += bias[j * e.bias.stride];
    }
    if (e.pre) {
      T* pre = e.pre + (m0 + i) * e.saved_ld + n0;
      for (index_t j = 0; j < nr; ++j) pre[j] = ci[j];
    }
    if (e.target) {
      const T* t = e.target + (m0 + i) * e.target_rs + n0 * e.target_cs;
      with_activation(e.act, [&](auto act) {
        constexpr Activation A = decltype(act)::value;
        auto residual = [&](index_t j, int lane) {  // ci[j] becomes dY; lane += r^2
          const T z = ci[j];
          const T r = activate<A>(z, slope) - t[j * e.target_cs];
          lanes[lane] += static_cast<double>(r) * static_cast<double>(r);
          ci[j] = A == Activation::identity ? e.grad_scale * r : e.grad_scale * r * activation_grad_at_pre<A>(z, slope);
        };
        index_t j = 0;
        for (; j + kLossLanes <= nr; j += kLossLanes)
#pragma omp simd
          for (int lane = 0; lane < kLossLanes; ++lane) residual(j + lane, lane);
        for (int lane = 0; j < nr; ++j, ++lane) residual(j, lane);
      });
    } else if (e.act != Activation::identity) {
      with_activation(e.act, [&](auto act) {
        constexpr Activation A = decltype(act)::value;
#pragma omp simd
        for (index_t j = 0; j < nr; ++j) ci[j] = activate<A>(ci[j], slope);
      });
    }
    if (e.at) {
      const T* at = e.at + (m0 + i) * e.saved_ld + n0;
      with_activation(e.grad_act, [&](auto act) {
        constexpr Activation A = decltype(act)::value;
        if (e.at_is_pre) {
#pragma omp simd
          for (index_t j = 0; j < nr; ++j) ci[j] *= activation_grad_at_pre<A>(at[j], slope);
        } else {
#pragma omp simd
          for (index_t j = 0; j < nr; ++j) ci[j] *= activation_grad_at_output<A>(at[j], slope);
        }
      });
    }
    if (e.out16) {
      bfloat16* out = e.out16 + (m0 + i) * e.out16_ld + n0;
#pragma omp simd
      for (index_t j = 0; j < nr; ++j) out[j] = float_to_bf16(static_cast<float>(ci[j]));
    }
  }
  double squares = 0;
  for (const double lane : lanes) squares += lane;
  return squares;
}

// The epilogue alone over a dense (M, N) matrix (GemmKernels::sepilogue): the loss in a fixed order.
template <typename T>
void epilogue_only(const Epilogue<T>& e, T* c, index_t m, index_t n) {
  double squares = 0;
  for (index_t i = 0; i < m; ++i) squares += apply_epilogue(e, c + i * n, n, i, 0, 1, n);
  if (e.loss) *e.loss = squares;
}

// ---------------------------------------------------------------------------------------------
// Narrow path (a layer with a handful of outputs): C[m, n] = dot(A[m, :], B[:, n]), and the row sums
// of A if asked for. A register tile would waste most of its columns, and the product is bound by
// reading A once anyway. Rows are split over threads in blocks of kNarrowRows. K is walked in chunks
// of kNarrowChunk; an operand whose k stride is not 1 is first copied, a chunk at a time, into a
// contiguous buffer, so every layout runs the same vectorised reductions in the same order: the
// result depends on neither the thread count nor the memory layout.
constexpr index_t kNarrowRows = 64;     // rows per work block, and per partial sum of the loss
constexpr index_t kNarrowChunk = 2048;  // k per pass

// Per-thread buffer of the narrow path (elements): runs of A and B copied when not contiguous.
template <typename T>
index_t narrow_buffer(const GemmArgs<T>& g) {
  return (g.a_cs != 1 ? 4 : 0) * kNarrowChunk + (g.b_rs != 1 ? kNarrowN : 0) * kNarrowChunk;
}

template <typename T>
void gemm_narrow(const GemmArgs<T>& g, int num_threads) {
  constexpr index_t kRows = kNarrowRows, kChunk = kNarrowChunk;
  const index_t M = g.m, N = g.n, K = g.k;
  const index_t blocks = ceil_div(M, kRows);
  const bool has_epilogue = g.epilogue.active();
  const bool copy_a = g.a_cs != 1, copy_b = g.b_rs != 1;
  const index_t buffer = narrow_buffer(g);  // per thread
  Scratch<T> buffers(num_threads * buffer);
  Scratch<double> block_squares(g.epilogue.loss ? blocks : 1);
  auto run_block = [&](index_t block) {
#if defined(_OPENMP)
    T* const a_buf = buffers.get() + omp_get_thread_num() * buffer;
#else
    T* const a_buf = buffers.get();
#endif
    T* const b_buf = a_buf + (copy_a ? 4 * kChunk : 0);
    const index_t m_begin = block * kRows, m_end = imin(M, m_begin + kRows);
    T sums[kRows][kNarrowN] = {};  // this block's dot products, summed over the chunks
    T row_sums[kRows] = {};        // and the rows' own sums, if asked for (the bias gradient)
    for (index_t k0 = 0; k0 < K; k0 += kChunk) {
      const index_t kc = imin(kChunk, K - k0);
      const T* cols[kNarrowN];
      for (index_t n = 0; n < N; ++n) {
        const T* src = g.b + k0 * g.b_rs + n * g.b_cs;
        if (copy_b) {
          for (index_t k = 0; k < kc; ++k) b_buf[n * kChunk + k] = src[k * g.b_rs];
          src = b_buf + n * kChunk;
        }
        cols[n] = src;
      }
      for (index_t m = m_begin; m < m_end; m += 4) {
        // Four rows at a time: four independent FMA chains share each load of B.
        const index_t rows = imin(4, m_end - m);
        const T* row[4];
        for (index_t r = 0; r < 4; ++r) {
          const T* src = g.a + imin(m + r, m + rows - 1) * g.a_rs + k0 * g.a_cs;  // a short group repeats its last row
          if (copy_a) {
            for (index_t k = 0; k < kc; ++k) a_buf[r * kChunk + k] = src[k * g.a_cs];
            src = a_buf + r * kChunk;
          }
          row[r] = src;
        }
        const T* __restrict a0 = row[0];
        const T* __restrict a1 = row[1];
        const T* __restrict a2 = row[2];
        const T* __restrict a3 = row[3];
        for (index_t n = 0; n < N; ++n) {
          const T* __restrict b = cols[n];
          T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (index_t k = 0; k < kc; ++k) {
            s0 += a0[k] * b[k];
            s1 += a1[k] * b[k];
            s2 += a2[k] * b[k];
            s3 += a3[k] * b[k];
          }
          const T partial[4] = {s0, s1, s2, s3};
          for (index_t r = 0; r < rows; ++r) sums[m - m_begin + r][n] += partial[r];
        }
        if (g.a_row_sums) {
          for (index_t r = 0; r < rows; ++r) {
            const T* __restrict a = row[r];
            T s = 0;
#pragma omp simd reduction(+ : s)
            for (index_t k = 0; k < kc; ++k) s += a[k];
            row_sums[m - m_begin + r] += s;
          }
        }
      }
    }
    for (index_t m = m_begin; m < m_end; ++m)
      for (index_t n = 0; n < N; ++n) g.c[m * g.ldc + n] = sums[m - m_begin][n];
    if (g.a_row_sums)
      for (index_t m = m_begin; m < m_end; ++m) g.a_row_sums[m] = row_sums[m - m_begin];
    double squares = 0;
    if (has_epilogue)
      for (index_t m = m_begin; m < m_end; ++m)
        squares += apply_epilogue(g.epilogue, g.c + m * g.ldc, g.ldc, m, 0, 1, N);
    if (g.epilogue.loss) block_squares.get()[block] = squares;
  };
  if (num_threads > 1) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (index_t block = 0; block < blocks; ++block) run_block(block);
  } else {
    for (index_t block = 0; block < blocks; ++block) run_block(block);  // no team to set up
  }
  if (g.epilogue.loss) {
    double total = 0;
    for (index_t block = 0; block < blocks; ++block) total += block_squares.get()[block];
    *g.epilogue.loss = total;
  }
}

// ---------------------------------------------------------------------------------------------
// Small M: a batch of 1 to kSmallM rows (the forward pass and dX), or dW of a layer with that few
// outputs. Such a product does at most kSmallM multiply-adds per element of B (the weight, or X for
// dW) and is bound by how fast B streams from memory or L3, not by the FMA units; packing all of B,
// as the blocked path does, would cost more than the product. So B is read once, along whichever of
// its dimensions is contiguous, and all M rows are computed in that one pass.
//
// Each element of C is summed in one order, whatever the layout of A and B, the form that runs it
// and the thread count: lane l (0 <= l < L, L = the ISA's vector length) sums the products
// A[m, k] B[k, n] with k = l (mod L) in ascending k, starting from 0 (a chain of multiply-adds,
// fused where the ISA has FMA); then C[m, n] = lane_tree(lanes), the halving sums
// lane[l] + lane[l + L/2] down to one. A chain can be stopped and resumed (its value stored and
// loaded) without changing a bit, so how K is cut into passes does not matter. Two forms:
//   dot   B's columns contiguous (b_rs == 1: the weight in the forward pass). One vector holds L
//         consecutive k of one output: its lane l is the class k = l (mod L). A tile of outputs
//         streams whole columns of B (rows of W) in place.
//   axpy  B's rows contiguous (b_cs == 1: the weight in dX, X in dW). One vector holds L
//         consecutive outputs. B is read in place in blocks of C * L rows; class l takes the
//         block's rows k = l (mod L), whose chains for the strip live in L1 between blocks.
//         Any other B is copied a block at a time into rows.
// Threads share out column strips, sized from N alone; each output is summed by one thread. An A
// whose k stride is not 1 is copied, a pass of K at a time, for the dot form.
// The path is taken for K >= kSmallMinK * M^2 only (gemm.hpp): each output costs L lane chains and a
// tree besides its K multiply-adds, and with more rows the packed path's register tile reuses more.
// Measured on Zen 3 (one thread, N = 2048, against the packed path): the small-M path wins from
// K = 8 for one row, 32 for two, 128 for four and 512 for eight (axpy form; dot from 128), and loses
// up to 4x below (M = 8, K = 8: 0.25x).
constexpr index_t kSmallCopyK = 2048;  // dot: k per pass when A's rows must be copied

template <int N>
struct Width {  // a tile width as a type, for a generic lambda (not std::integral_constant: see the top)
  static constexpr int value = N;
};

// Register tiles of the small-M path for R rows (at most 12 accumulators, of AVX2's 16 registers):
// columns of the dot tile, and vectors of the axpy tile.
constexpr int small_dot_cols(int rows) { return rows == 1 ? 8 : rows == 2 ? 4 : rows <= 4 ? 3 : rows <= 6 ? 2 : 1; }
constexpr int small_axpy_vectors(int rows) { return rows <= 4 ? 2 : 1; }
// Rows of each lane class that an axpy tile chains in registers (the block is this times L rows):
// more rows of A share each load and store of the chains.
constexpr int small_axpy_chain(int rows) { return rows <= 2 ? 4 : rows <= 4 ? 2 : 4; }

// The fixed sum of L lanes v[0], v[stride], ..., v[(L - 1) * stride]: halving, (v[i] + v[i + L/2]).
template <typename T, int L>
inline T lane_tree(const T* v, index_t stride) {
  if constexpr (L == 1) {
    return v[0];
  } else {
    T w[L / 2];
    for (int i = 0; i < L / 2; ++i) w[i] = v[i * stride] + v[(i + L / 2) * stride];
    return lane_tree<T, L / 2>(w, 1);
  }
}

// Dot form, one tile: R rows of A (a[r][k], k contiguous) times NB columns of B (column j at
// b + j * b_cs, k contiguous), k < kc. The lanes of output (r, j) are p[(r * p_rs + j) * L + l]:
// resumed from there if `resume`, and stored there. The last kc % L products go into their lanes
// only (the other lanes are left as they are).
template <typename T, int L, int R, int NB>
void small_dot_tile(index_t kc, const T* const* a, const T* b, index_t b_cs, T* p, index_t p_rs, bool resume) {
  T acc[R][NB][L];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j)
      for (int l = 0; l < L; ++l) acc[r][j][l] = resume ? p[(r * p_rs + j) * L + l] : T(0);
  const T* ar[R];
  for (int r = 0; r < R; ++r) ar[r] = a[r];
  const T* bj[NB];
  for (int j = 0; j < NB; ++j) bj[j] = b + j * b_cs;
  const index_t kv = kc - kc % L;
  for (index_t k = 0; k < kv; k += L)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j)
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[r][j][l] += ar[r][k + l] * bj[j][k + l];
  if (const index_t tail = kc - kv) {
    T ta[R][L], tb[NB][L];  // the tail, zero beyond it
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < L; ++l) ta[r][l] = l < tail ? ar[r][kv + l] : T(0);
    for (int j = 0; j < NB; ++j)
      for (int l = 0; l < L; ++l) tb[j][l] = l < tail ? bj[j][kv + l] : T(0);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j)
#pragma omp simd
        for (int l = 0; l < L; ++l) {
          const T v = acc[r][j][l] + ta[r][l] * tb[j][l];
          acc[r][j][l] = l < tail ? v : acc[r][j][l];
        }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j)
      for (int l = 0; l < L; ++l) p[(r * p_rs + j) * L + l] = acc[r][j][l];
}

// Axpy form, one block of rows: B's rows k < kc (b + k * b_rs, `width` contiguous elements, a
// multiple of V * L) into the chains p[(l * R + r) * p_rs + j] of class l = k mod L, A packed by
// class (a[(l * C + i) * R + r] is A[r, l + i L]). kc is at most C * L; `full`: exactly. Class by
// class, its (up to) C rows stream together along the strip (as many as a good GEMV streams), and
// each tile of V vectors runs them on chains in registers, resumed from p if `resume`, stored back:
// one load and store of the chains per C multiply-adds.
template <typename T, int L, int R, int C, int V, bool kFull>
void small_axpy_block(index_t kc, const T* __restrict a, const T* __restrict b, index_t b_rs, T* __restrict p,
                      index_t p_rs, index_t width, bool resume, int prefetch) {
  using vec = typename Vector<T, L>::type;
  constexpr int kLine = 64 / static_cast<int>(sizeof(T));  // elements per cache line
  for (int l = 0; l < L; ++l)
    for (index_t j = 0; j < width; j += V * L) {
      const index_t count = kFull ? C : (kc > l ? ceil_div(kc - l, L) : 0);
      T* const pl = p + l * R * p_rs + j;
      vec acc[R][V];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = resume ? load_vector<T, L>(pl + r * p_rs + v * L) : vec{};
      // With `prefetch`, the same columns of the next class's rows are fetched meanwhile (after the
      // last class, of the next block's first class, if prefetch > 1: there is a next block).
      const index_t next_class = l < L - 1 ? b_rs : (C * L - (L - 1)) * b_rs;
      const bool fetch = prefetch > 1 || (prefetch == 1 && l < L - 1);
      for (index_t i = 0; i < count; ++i) {
        const T* bi = b + (l + i * L) * b_rs + j;
        if (fetch)
          for (int v = 0; v < V * L; v += kLine) __builtin_prefetch(bi + next_class + v);
        vec bv[V];
        for (int v = 0; v < V; ++v) bv[v] = load_vector<T, L>(bi + v * L);
        for (int r = 0; r < R; ++r) {
          const T ar = a[(l * C + i) * R + r];
          for (int v = 0; v < V; ++v) acc[r][v] += ar * bv[v];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) store_vector<T, L>(pl + r * p_rs + v * L, acc[r][v]);
    }
}

// Per-thread scratch of the small-M path (elements): the chains of one strip, A's pass (copied or
// packed by class), B's block (copied) and its last columns (padded).
template <typename T>
index_t small_scratch(const GemmArgs<T>& g, const GemmPlan& p) {
  const index_t line = 64 / static_cast<index_t>(sizeof(T));
  const index_t lanes = g.m * (p.strip + line) * p.lanes;
  const index_t block = small_axpy_chain(static_cast<int>(g.m)) * p.lanes;
  const index_t a_buf = p.dot ? (p.copy_a ? g.m * kSmallCopyK : 0) : g.m * block;
  const index_t b_buf = p.dot ? 0 : block * ((p.copy_b ? p.strip : 0) + p.lanes);
  return ceil_div(lanes + a_buf + b_buf, 16) * 16;
}

// The small-M path's decisions (L lanes).
template <typename T>
void plan_small(const GemmArgs<T>& g, int lanes, GemmPlan& p) {
  // Strips of at most kMaxStrip columns (the chains of a strip stay in L1), and at least
  // kMinStrips of them (for the threads) while strips stay kMinStrip or wider; equal, in whole vectors.
  constexpr index_t kMaxStrip = 512, kMinStrip = 64, kMinStrips = 4;
  p.path = GemmPath::small_m;
  p.lanes = lanes;
  p.dot = g.b_rs == 1;
  p.chain = p.dot ? 0 : small_axpy_chain(static_cast<int>(g.m));
  p.copy_a = p.dot && g.a_cs != 1;
  p.copy_b = !p.dot && g.b_cs != 1;
  const index_t strips = imin(ceil_div(g.n, lanes), imin(kMinStrips, ceil_div(g.n, kMinStrip)));
  const index_t want = strips > ceil_div(g.n, kMaxStrip) ? strips : ceil_div(g.n, kMaxStrip);
  p.strip = ceil_div(ceil_div(g.n, want), lanes) * lanes;
  p.items = ceil_div(g.n, p.strip);
  p.threads = static_cast<int>(imin(p.threads, p.items));
  p.scratch_bytes = (p.threads * small_scratch(g, p) + (g.a_row_sums && g.a_cs != 1 ? kSmallCopyK : 0)) *
                        static_cast<index_t>(sizeof(T)) +
                    (g.epilogue.loss ? p.items * static_cast<index_t>(sizeof(double)) : 0);
}

// Row sums of A (the bias gradient of dW) in the order of a product with a column of ones.
// buf: kSmallCopyK elements.
template <typename T, int L>
void small_row_sums(const GemmArgs<T>& g, T* buf) {
  static_assert(kSmallCopyK % L == 0, "passes must keep the lanes aligned");
  for (index_t m = 0; m < g.m; ++m) {
    T acc[L] = {};
    for (index_t k0 = 0; k0 < g.k; k0 += kSmallCopyK) {
      const index_t kc = imin(kSmallCopyK, g.k - k0);
      const T* a = g.a + m * g.a_rs + k0 * g.a_cs;
      if (g.a_cs != 1) {
        for (index_t k = 0; k < kc; ++k) buf[k] = a[k * g.a_cs];
        a = buf;
      }
      const index_t kv = kc - kc % L;
      for (index_t k = 0; k < kv; k += L)
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[l] += a[k + l];
      for (index_t k = kv; k < kc; ++k) acc[k - kv] += a[k];
    }
    g.a_row_sums[m] = lane_tree<T, L>(acc, 1);
  }
}

// Dot form, one column strip: C[:, n0 : n0 + cols] into lanes[(r * strip + j) * L + l].
template <typename T, int L, int R>
void small_dot_strip(const GemmArgs<T>& g, const GemmPlan& plan, index_t n0, index_t cols, T* lanes, T* a_buf) {
  constexpr int NB = small_dot_cols(R);
  const index_t K = g.k, pass = plan.copy_a ? kSmallCopyK : (K > 0 ? K : 1);
  for (index_t k0 = 0; k0 < K || k0 == 0; k0 += pass) {  // K == 0 still writes C = 0 (+ bias)
    const index_t kc = imin(pass, K - k0);
    const T* a[R];
    for (int r = 0; r < R; ++r) {
      a[r] = g.a + r * g.a_rs + k0 * g.a_cs;
      if (plan.copy_a) {
        for (index_t k = 0; k < kc; ++k) a_buf[r * kSmallCopyK + k] = a[r][k * g.a_cs];
        a[r] = a_buf + r * kSmallCopyK;
      }
    }
    const T* b = g.b + k0 + n0 * g.b_cs;  // b_rs == 1
    const bool resume = k0 > 0;
    index_t j = 0;
    for (; j + NB <= cols; j += NB)
      small_dot_tile<T, L, R, NB>(kc, a, b + j * g.b_cs, g.b_cs, lanes + j * L, plan.strip, resume);
    for (; j < cols; ++j) small_dot_tile<T, L, R, 1>(kc, a, b + j * g.b_cs, g.b_cs, lanes + j * L, plan.strip, resume);
  }
  for (index_t r = 0; r < R; ++r) {
    T* c = g.c + r * g.ldc + n0;
    for (index_t j = 0; j < cols; ++j) c[j] = lane_tree<T, L>(lanes + (r * plan.strip + j) * L, 1);
  }
}

// Axpy form, one column strip: C[:, n0 : n0 + cols], the chains in lanes[(l * R + r) * width + j]
// (width: cols rounded up to whole vectors). Blocks of C * L rows of B (C rows of each class) are
// streamed in place; B with a column stride other than 1 is copied a block at a time.
template <typename T, int L, int R>
void small_axpy_strip(const GemmArgs<T>& g, const GemmPlan& plan, index_t n0, index_t cols, T* lanes, T* a_buf,
                      T* b_buf) {
  constexpr int V = small_axpy_vectors(R), C = small_axpy_chain(R);
  constexpr index_t kBlock = C * L;
  const index_t K = g.k, width = ceil_div(cols, L) * L;
  const index_t pitch = width + 64 / static_cast<index_t>(sizeof(T));  // chain rows off power-of-two distances
  // Columns in tiles of V vectors, then single vectors; then fewer than L, copied with zeros after them.
  const index_t whole = plan.copy_b ? width : cols / L * L, tiled = whole / (V * L) * (V * L);
  for (index_t k0 = 0; k0 < K || k0 == 0; k0 += kBlock) {  // K == 0 still writes C = 0 (+ bias)
    const index_t kc = imin(kBlock, K - k0);
    const bool resume = k0 > 0;
    for (int l = 0; l < L; ++l)  // A's block by class: class l holds its k = k0 + l + i L
      pack_micro_panel<T, R>(a_buf + l * C * R, g.a + (k0 + l) * g.a_cs, g.a_rs, L * g.a_cs, R,
                             kc > l ? ceil_div(kc - l, L) : 0, nullptr);
    const T* b = g.b + k0 * g.b_rs + n0 * g.b_cs;
    index_t b_rs = g.b_rs;
    if (plan.copy_b) {
      for (index_t k = 0; k < kc; ++k)
        for (index_t j = 0; j < width; ++j) b_buf[k * width + j] = j < cols ? b[k * g.b_rs + j * g.b_cs] : T(0);
      b = b_buf;
      b_rs = width;
    }
    // Prefetch (see small_axpy_block) for up to 4 rows of A: 0.62 -> 0.55 ms for one row and
    // (K, N) = (1024, 4096) on Zen 3, one thread. With more rows the product is not bound by memory,
    // and prefetching measured slower (8 rows: 0.55 -> 0.66 ms).
    const int ahead = R > 4 || plan.copy_b || kc < kBlock ? 0 : k0 + 2 * kBlock <= K ? 2 : 1;
    auto run = [&](auto vectors, const T* bj, index_t bj_rs, index_t j, index_t w, int prefetch) {
      constexpr int kV = decltype(vectors)::value;
      if (kc == kBlock)
        small_axpy_block<T, L, R, C, kV, true>(kc, a_buf, bj, bj_rs, lanes + j, pitch, w, resume, prefetch);
      else
        small_axpy_block<T, L, R, C, kV, false>(kc, a_buf, bj, bj_rs, lanes + j, pitch, w, resume, prefetch);
    };
    if (tiled > 0) run(Width<V>{}, b, b_rs, 0, tiled, ahead);
    if (whole > tiled) run(Width<1>{}, b + tiled, b_rs, tiled, whole - tiled, ahead);
    if (width > whole) {
      T* pad = b_buf + (plan.copy_b ? kBlock * width : 0);
      for (index_t k = 0; k < kc; ++k)
        for (index_t i = 0; i < L; ++i) pad[k * L + i] = whole + i < cols ? b[k * b_rs + whole + i] : T(0);
      run(Width<1>{}, pad, L, whole, L, 0);
    }
  }
  for (index_t r = 0; r < R; ++r) {
    T* c = g.c + r * g.ldc + n0;
    for (index_t j = 0; j < cols; ++j) c[j] = lane_tree<T, L>(lanes + r * pitch + j, R * pitch);
  }
}

template <typename T, int L, int R>
void gemm_small_rows(const GemmArgs<T>& g, const GemmPlan& plan) {
  const index_t per_thread = small_scratch(g, plan);
  Scratch<T> scratch(plan.threads * per_thread);
  Scratch<double> strip_squares(g.epilogue.loss ? plan.items : 1);
  if (g.a_row_sums) {
    Scratch<T> buf(g.a_cs != 1 ? kSmallCopyK : 1);
    small_row_sums<T, L>(g, buf.get());
  }
  const Epilogue<T>& e = g.epilogue;
  const index_t line = 64 / static_cast<index_t>(sizeof(T));
  auto work_of_thread = [&](int thread, int threads) {
    T* const lanes = scratch.get() + thread * per_thread;
    T* const a_buf = lanes + g.m * (plan.strip + line) * L;
    T* const b_buf = a_buf + g.m * small_axpy_chain(R) * L;
    const index_t first = plan.items * thread / threads, last = plan.items * (thread + 1) / threads;
    for (index_t item = first; item < last; ++item) {
      const index_t n0 = item * plan.strip, cols = imin(plan.strip, g.n - n0);
      if (plan.dot)
        small_dot_strip<T, L, R>(g, plan, n0, cols, lanes, a_buf);
      else
        small_axpy_strip<T, L, R>(g, plan, n0, cols, lanes, a_buf, b_buf);
      const double squares = e.active() ? apply_epilogue(e, g.c + n0, g.ldc, 0, n0, R, cols) : 0.0;
      if (e.loss) strip_squares.get()[item] = squares;
    }
  };
  if (plan.threads > 1) {
#pragma omp parallel num_threads(plan.threads)
    {
#if defined(_OPENMP)
      work_of_thread(omp_get_thread_num(), omp_get_num_threads());
#endif
    }
  } else {
    work_of_thread(0, 1);
  }
  if (e.loss) {  // a fixed order, whatever thread computed each strip
    double total = 0;
    for (index_t item = 0; item < plan.items; ++item) total += strip_squares.get()[item];
    *e.loss = total;
  }
}

template <typename T, int L>
void gemm_small(const GemmArgs<T>& g, const GemmPlan& plan) {
  switch (g.m) {
    case 1:
      return gemm_small_rows<T, L, 1>(g, plan);
    case 2:
      return gemm_small_rows<T, L, 2>(g, plan);
    case 3:
      return gemm_small_rows<T, L, 3>(g, plan);
    case 4:
      return gemm_small_rows<T, L, 4>(g, plan);
    case 5:
      return gemm_small_rows<T, L, 5>(g, plan);
    case 6:
      return gemm_small_rows<T, L, 6>(g, plan);
    case 7:
      return gemm_small_rows<T, L, 7>(g, plan);
    default:
      return gemm_small_rows<T, L, 8>(g, plan);
  }
}

// ---------------------------------------------------------------------------------------------
// Packed path (see the loops at the top).

// Column panels in one work item: 4, and 1 for AMX products, whose panels take longer (784 columns:
// 7 items of 4 panels split 4:3 between two threads, 25 of one 13:12; dW of 5000 x 784 x 50 measured
// about 5% faster on average, within this machine's noise).
constexpr index_t kPanelsPerItem = 4, kAmxPanelsPerItem = 1;

// The packed path's decisions (block sizes of the build's table for T).
template <typename T>
void plan_packed(const GemmArgs<T>& g, const GemmBlocking& b, GemmPlan& p) {
  const index_t M = g.m, N = g.n, K = g.k, MR = b.mr, NR = b.nr;
  const index_t size = static_cast<index_t>(sizeof(T));
  p.path = GemmPath::packed;
  p.mr = b.mr;
  p.nr = b.nr;
  // K in equal slices of at most KC (no short last slice); K == 0 still writes C = 0 (+ bias).
  p.k_slices = K > 0 ? ceil_div(K, b.kc) : 1;
  p.kc = ceil_div(K, p.k_slices);
  if (g.bf16 && p.kc % kBf16KStep) {  // bfloat16: slices of whole K pairs or tiles (the last one padded)
    p.kc = ceil_div(p.kc, kBf16KStep) * kBf16KStep;
    p.k_slices = K > 0 ? ceil_div(K, p.kc) : 1;
  }
  // M in equal blocks of at most MC rows (threads get equal work). When N is too narrow to share
  // out (N = 50: four column panels, one work item per row block), the rows are cut into more blocks,
  // down to 2 MR rows, until there are kMinItems work items: else one thread could wait for another
  // (781 rows in 5 blocks: 3 to 2). Row blocks change who computes a row, not how it is summed.
  constexpr index_t kMinItems = 16;
  const bool rows_fit_one_block = M <= b.mc;
  p.panels_per_item = g.bf16 && kBf16Kind == Kind::bf16_amx ? kAmxPanelsPerItem : kPanelsPerItem;
  const index_t parts = ceil_div(ceil_div(imin(b.nc, N), NR), p.panels_per_item);
  const bool few_columns = parts < 4;
  index_t blocks = ceil_div(M, b.mc);
  if (few_columns) {
    const index_t more = imin(ceil_div(M, 2 * MR), ceil_div(kMinItems, parts));
    p.split_rows = more > blocks;
    blocks = p.split_rows ? more : blocks;
  }
  p.mc = ceil_div(ceil_div(M, blocks), MR) * MR;
  p.row_blocks = ceil_div(M, p.mc);
  // B is packed a slab (as many K slices of an NC column block as fit in kSlabBytes, at least one)
  // at a time, between two barriers: all of K at once for most layers. One slice is at most
  // KC x NC elements (8 MiB of doubles), so the slab never exceeds max(kSlabBytes, one slice).
  p.nc = imin(b.nc, ceil_div(N, NR) * NR);
  p.column_blocks = ceil_div(N, b.nc);
  const index_t slice = (p.kc > 0 ? p.kc : 1) * p.nc;
  const index_t fit = kSlabBytes / size / slice;
  // bfloat16 products: one K slice at a time (still in cache when the tiles read it; all of K at
  // once measured 1.1-1.7x slower, dW of 5000 x 784 x 50 most).
  p.slices_per_slab = g.bf16 ? 1 : imin(p.k_slices, fit > 1 ? fit : 1);
  p.slabs = ceil_div(p.k_slices, p.slices_per_slab);
  p.items = p.row_blocks * parts;
  // Rows of A with unit k stride (X in the forward pass, dY for dX) are read in place: packing
  // them would cost a copy of A per thread. Other layouts, the bias gradient's row sums and the
  // zero-padded edge panels go through the packed path, and so do rows a multiple of kAliasBytes
  // apart: they would fall into the same L1 cache sets.
  // AMX tiles read bfloat16 rows so too (a short last K tile packed), where their 64-byte tile rows
  // do not straddle cache lines (a stride of whole lines) or A serves few column panels (N <= 128;
  // measured on an Intel Xeon: forward 5000 x 784 x 50 1.3x faster in place, 512 x 1000 x 1000 1.1x
  // packed). Other bfloat16 products pack A.
  const index_t a_row_bytes = g.a_rs * static_cast<index_t>(sizeof(bfloat16));
  const bool amx_in_place = kBf16Kind == Kind::bf16_amx && g.a16 && g.a_cs == 1 && !g.a_row_sums &&
                            a_row_bytes % kAliasBytes != 0 && (a_row_bytes % 64 == 0 || N <= 4 * NR);
  p.pack_a =
      g.bf16 ? !amx_in_place : !(g.a_cs == 1 && !g.a_row_sums && !g.a_col_scale && (g.a_rs * size) % kAliasBytes != 0);
  // B is packed to be reused by many row blocks; when the rows fit one block (dW = dY^T X for up to
  // MC outputs: the tall-skinny layers) packing would copy all of X for one or two uses, so rows of
  // B with unit n stride are read in place instead (edge panels still packed). Aliasing rows matter
  // only when a B micro-panel is reused, by more than one row panel.
  p.pack_b = g.bf16 || !(rows_fit_one_block && g.b_cs == 1 && (M <= MR || (g.b_rs * size) % kAliasBytes != 0));
  // C rows that one row block updates in each K slice: beyond kCacheBytes they are gone from L2 by
  // the next slice, so they are prefetched before each tile's update.
  p.prefetch_c = p.mc * p.nc * size > kCacheBytes;
  const index_t last_panel =
      (N - (p.column_blocks - 1) * b.nc) - (ceil_div(N - (p.column_blocks - 1) * b.nc, NR) - 1) * NR;
  p.last_tile = static_cast<int>(last_panel <= NR / 4 ? NR / 4 : last_panel <= NR / 2 ? NR / 2 : NR);
  const index_t a_block = ceil_div((p.kc > 0 ? p.kc : 1) * p.mc, 16) * 16;
  p.scratch_bytes = (p.slices_per_slab * slice + p.threads * a_block) * size +
                    (g.epilogue.loss ? ceil_div(M, MR) * ceil_div(N, NR) * static_cast<index_t>(sizeof(double)) : 0);
}

// A packed panel holds kc k (plain) or ceil(kc / 2) pairs of k (bfloat16: padded_k = 2 ceil(kc / 2)
// values; AMX: whole K tiles of 32), in half as many floats' room for the kinds that keep bfloat16
// values (two to a float).
template <Kind kKind>
constexpr index_t padded_k(index_t kc) {
  return kKind == Kind::plain ? kc : kKind == Kind::bf16_amx ? ceil_div(kc, 32) * 32 : kc + (kc & 1);
}
template <Kind kKind>
constexpr index_t elements_per_slot() {
  return kKind == Kind::bf16_pairs || kKind == Kind::bf16_amx ? 2 : 1;
}

// One tile of a product of kind kKind (stage 3): the plain micro-kernel (with a narrower tile for a
// narrow last panel), or, for bfloat16 products, the widened values through the same, or the pairs
// kernel on bfloat16 panels (both operands packed: a_rs and b_rs unused). (AMX: see macro_kernel.)
template <typename T, int MR, int NR, int VL, Kind kKind>
inline void run_kind_tile(bool packed_a, index_t kc, const T* a, index_t a_rs, const T* b, index_t b_rs, T* c,
                          index_t ldc, index_t mr, index_t nr, bool accumulate, bool prefetch_c) {
#if defined(LINGRAD_BF16_DOT)
  if constexpr (kKind == Kind::bf16_pairs) {
    static_assert(NR % 32 == 0, "a pairs tile is one or more pairs of 16-float vectors");
    const bfloat16* a_pairs = reinterpret_cast<const bfloat16*>(a);
    const bfloat16* b_pairs = reinterpret_cast<const bfloat16*>(b);
    if (nr <= NR / 2)
      bf16_pair_kernel<MR, NR / 32>(kc / 2, a_pairs, b_pairs, 2 * NR, c, ldc, mr, nr, accumulate, prefetch_c);
    else
      bf16_pair_kernel<MR, NR / 16>(kc / 2, a_pairs, b_pairs, 2 * NR, c, ldc, mr, nr, accumulate, prefetch_c);
    return;
  }
#endif
  if constexpr (kKind == Kind::plain || kKind == Kind::bf16_widened) {
    if (nr <= NR / 4)  // a narrow last panel (50 outputs = 3 x 16 + 2) runs a narrower tile
      run_tile<T, MR, NR / 4, VL>(packed_a, kc, a, a_rs, b, b_rs, c, ldc, mr, nr, accumulate, prefetch_c);
    else if (nr <= NR / 2)
      run_tile<T, MR, NR / 2, VL>(packed_a, kc, a, a_rs, b, b_rs, c, ldc, mr, nr, accumulate, prefetch_c);
    else
      run_tile<T, MR, NR, VL>(packed_a, kc, a, a_rs, b, b_rs, c, ldc, mr, nr, accumulate, prefetch_c);
  }
}

// Stage 1: the slab of K slices [pc0, pc1) of the column block at jc (nc wide), packed into b_pack
// (slice after slice, slice elements apart): NR-column micro-panels, k-major. Panels read in place
// (pack_b off) are skipped, except a last panel narrower than NR, always packed with zeros. Called
// by every thread of the team: the panels are shared out, and the implicit barrier at the end
// means the slab is complete before anyone reads it.
template <typename T, int NR, Kind kKind>
void pack_b_slab(const GemmArgs<T>& g, const GemmPlan& p, index_t jc, index_t nc, index_t pc0, index_t pc1, T* b_pack,
                 index_t slice) {
  const index_t n_panels = ceil_div(nc, NR);
  if constexpr (kKind == Kind::bf16_pairs || kKind == Kind::bf16_amx) {
    if (g.b_cs == 1) {
      // K pairs of rows of B (X for dW, W for dX): each thread takes a contiguous range of panels and
      // packs them 32 k at a time, all of its panels for each 32 k, so that it reads B's rows in
      // order, as the hardware prefetchers follow, rather than a 64-byte strip of KC rows per panel
      // (rows 1568 bytes apart for 784 inputs). 32 k of a panel are 16 NR floats of it (16 pairs).
#if defined(_OPENMP)
      const index_t thread = omp_get_thread_num(), team = omp_get_num_threads();
#else
      const index_t thread = 0, team = 1;
#endif
      const index_t first = n_panels * thread / team, last = n_panels * (thread + 1) / team;
      for (index_t pc = pc0; pc < pc1; ++pc) {
        const index_t k0 = pc * p.kc, kc = imin(p.kc, g.k - k0);
        for (index_t k = 0; k < kc; k += 32)
          for (index_t panel = first; panel < last; ++panel)
            if (p.pack_b || nc - panel * NR < NR)
              pack_operand_panel<T, NR, kKind>(
                  b_pack + (pc - pc0) * slice + panel * NR * padded_k<kKind>(kc) / 2 + k / 32 * 16 * NR, g.b, g.b16,
                  (k0 + k) * g.b_rs + (jc + panel * NR), 1, g.b_rs, imin(NR, nc - panel * NR), imin(32, kc - k),
                  nullptr, padded_k<kKind>(imin(32, kc - k)));
      }
#pragma omp barrier
      return;
    }
  }
#pragma omp for schedule(static)
  for (index_t job = 0; job < (pc1 - pc0) * n_panels; ++job) {
    const index_t pc = pc0 + job / n_panels, panel = job % n_panels;
    const index_t k0 = pc * p.kc, kc = padded_k<kKind>(imin(p.kc, g.k - k0));
    if (p.pack_b || nc - panel * NR < NR)
      pack_operand_panel<T, NR, kKind>(b_pack + (pc - pc0) * slice + panel * NR * kc / elements_per_slot<kKind>(), g.b,
                                       g.b16, k0 * g.b_rs + (jc + panel * NR) * g.b_cs, g.b_cs, g.b_rs,
                                       imin(NR, nc - panel * NR), imin(p.kc, g.k - k0), nullptr, kc);
  }
}

// Stage 2: one thread's items [first, last) of the column block at jc for the slab [pc0, pc1).
// An item is a row block and a group of p.panels_per_item column panels; for each K slice, the row
// block's A is packed into a_pack (or read in place), then each MR x NR tile runs the
// micro-kernel (stage 3), and tiles whose sum is complete get the epilogue (stage 4).
template <typename T, int MR, int NR, int VL, Kind kKind>
void macro_kernel(const GemmArgs<T>& g, const GemmPlan& p, index_t jc, index_t nc, index_t first, index_t last,
                  index_t pc0, index_t pc1, const T* b_pack, index_t slice, T* a_pack, double* tile_squares) {
  constexpr index_t kSlot = elements_per_slot<kKind>();
  const index_t M = g.m, N = g.n, K = g.k;
  const index_t n_panels = ceil_div(nc, NR), parts = ceil_div(n_panels, p.panels_per_item);
  const index_t tiles_n = ceil_div(N, NR);
  const bool has_epilogue = g.epilogue.active();
  // AMX: rows the plan reads in place are packed after all where N > 128 and their base is not
  // 64-byte aligned (every tile row would straddle two lines; NumPy's arrays are often 16 bytes off),
  // which the plan, made from shapes and strides alone, cannot see. (The same bits either way.)
  const bool pack_a =
      p.pack_a || (kKind == Kind::bf16_amx && N > 4 * NR && reinterpret_cast<std::uintptr_t>(g.a16) % 64 != 0);
  for (index_t item = first; item < last;) {
    const index_t ib = item / parts, part_begin = item % parts;
    const index_t part_end = imin(parts, part_begin + (last - item));  // this block's parts here
    item += part_end - part_begin;
    const index_t i0 = ib * p.mc, mc = imin(p.mc, M - i0);
    // The bias gradient is summed by the one thread that owns the block's first part.
    T* sums = (g.a_row_sums && jc == 0 && part_begin == 0) ? g.a_row_sums + i0 : nullptr;

    for (index_t pc = pc0; pc < pc1; ++pc) {
      const index_t k0 = pc * p.kc, kc = padded_k<kKind>(imin(p.kc, K - k0));
      // AMX tiles of A read in place: a short last K tile of each full row panel is packed (zeros beyond K)
      const index_t tail_k = kKind == Kind::bf16_amx && !pack_a ? imin(p.kc, K - k0) % 32 : 0;
      for (index_t ip = 0; ip < mc; ip += MR)
        if (tail_k && mc - ip >= MR) {
          pack_operand_panel<T, MR, kKind, true>(a_pack + ip * kc / kSlot, g.a, g.a16,
                                                 (i0 + ip) * g.a_rs + k0 + (kc - 32), g.a_rs, g.a_cs, MR, tail_k,
                                                 nullptr, 32);
        } else if (pack_a || mc - ip < MR) {
          T* const panel_sums = sums ? sums + ip : nullptr;
          const bool scale = kKind == Kind::plain && g.a_col_scale;  // (never set in bfloat16 products)
          pack_operand_panel<T, MR, kKind, kKind == Kind::bf16_amx>(
              a_pack + ip * kc / kSlot, g.a, g.a16, (i0 + ip) * g.a_rs + k0 * g.a_cs, g.a_rs, g.a_cs, imin(MR, mc - ip),
              imin(p.kc, K - k0), scale ? nullptr : panel_sums, kc);
          if (scale)  // per-sample weights of dW: scaled in the packed panel, then summed
            scale_micro_panel<T, MR>(a_pack + ip * kc, g.a_col_scale + k0, imin(MR, mc - ip), kc, panel_sums);
        }
      const T* b_slice = b_pack + (pc - pc0) * slice;
      const index_t p_end = imin(n_panels, part_end * p.panels_per_item);
      const bool last_slice = pc == p.k_slices - 1;
      auto epilogue = [&](T* c, index_t ldc, index_t m0, index_t j0, index_t mr, index_t nr) {
        if (last_slice && has_epilogue) {
          const double squares = apply_epilogue(g.epilogue, c, ldc, m0, j0, mr, nr);
          if (g.epilogue.loss) tile_squares[(m0 / MR) * tiles_n + j0 / NR] = squares;
        }
      };
      for (index_t panel = part_begin * p.panels_per_item; panel < p_end; ++panel) {
        const index_t j0 = jc + panel * NR, nr = imin(NR, N - j0);
        const bool packed_b = p.pack_b || nr < NR;
        const T* b_panel = packed_b ? b_slice + panel * NR * kc / kSlot : g.b + k0 * g.b_rs + j0;
#if defined(LINGRAD_AMX)
        if constexpr (kKind == Kind::bf16_amx) {
          // The panel's K in chunks, each over every row panel of the block, into C blocks kept in
          // blocks (one block, reused in L1, when K is one chunk); after the last chunk, into C.
          static_assert(MR == 32 && NR == 32, "the AMX block is 2 x 2 tiles of 16 x 16");
          alignas(64) float blocks[kAmxRows / 32][32 * 32];
          const index_t ktiles = kc / 32;
          for (index_t t0 = 0; t0 < ktiles || t0 == 0; t0 += kAmxChunk) {  // (K = 0: zero blocks)
            const index_t t1 = imin(ktiles, t0 + kAmxChunk);
            for (index_t ip = 0; ip < mc; ip += MR) {
              const index_t m0 = i0 + ip, mr = imin(MR, mc - ip);
              const bool packed_a = pack_a || mr < MR;
              const bfloat16* a =
                  packed_a ? reinterpret_cast<const bfloat16*>(a_pack + ip * kc / kSlot) : g.a16 + m0 * g.a_rs + k0;
              const bfloat16* a_tail =
                  !packed_a && tail_k ? reinterpret_cast<const bfloat16*>(a_pack + ip * kc / kSlot) : nullptr;
              float* block = blocks[ktiles > kAmxChunk ? ip / MR : 0];
              T* c = g.c ? g.c + m0 * g.ldc + j0 : nullptr;            // (null: a bfloat16 result alone, one K slice)
              if (t1 == ktiles && c) prefetch_tile(c, g.ldc, mr, nr);  // (C's rows arrive while the tiles work)
              amx_tiles(t0, t1, ktiles, a, packed_a ? 0 : g.a_rs, a_tail, reinterpret_cast<const bfloat16*>(b_panel),
                        block, t0 > 0);
              if (t1 == ktiles && last_slice && has_epilogue) {  // the epilogue on the finished block, in L1
                if (pc > 0) amx_store_block(block, c, g.ldc, mr, nr, true, /*into_block=*/true);
                epilogue(block, 32, m0, j0, mr, nr);
                if (c) amx_store_block(block, c, g.ldc, mr, nr, false);
              } else if (t1 == ktiles) {
                amx_store_block(block, c, g.ldc, mr, nr, pc > 0);
              }
            }
          }
          continue;
        }
#endif
        for (index_t ip = 0; ip < mc; ip += MR) {
          const index_t m0 = i0 + ip, mr = imin(MR, mc - ip);
          T* c = g.c + m0 * g.ldc + j0;
          const bool packed_a = pack_a || mr < MR;
          const T* a_panel = packed_a ? a_pack + ip * kc / kSlot : g.a + m0 * g.a_rs + k0;
          const index_t a_rs = packed_a ? 0 : g.a_rs, b_rs = packed_b ? NR : g.b_rs;
          run_kind_tile<T, MR, NR, VL, kKind>(packed_a, kc, a_panel, a_rs, b_panel, b_rs, c, g.ldc, mr, nr, pc > 0,
                                              p.prefetch_c);
          epilogue(c, g.ldc, m0, j0, mr, nr);
        }
      }
    }
  }
}

// The packed path: the jc and slab loops around stages 1 and 2, on the plan's team.
template <typename T, int MR, int NR, int VL, Kind kKind>
void gemm_packed(const GemmArgs<T>& args, const GemmPlan& p, index_t NC) {
  // A bfloat16 result alone (args.c null): the float32 sums are kept in an M x N scratch where the
  // kernel needs them in memory (the partial sums of several K slices, or the tiles that a
  // micro-kernel stores before the epilogue rounds them); the AMX kernel rounds each finished block
  // straight from L1 when K is one slice.
  const bool keep_sums = !args.c && !(kKind == Kind::bf16_amx && p.k_slices == 1);
  Scratch<T> sums(keep_sums ? args.m * args.n : 1);
  GemmArgs<T> g = args;
  if (keep_sums) {
    g.c = sums.get();
    g.ldc = g.n;
  }
  const index_t N = g.n;
  const index_t slice = (p.kc > 0 ? p.kc : 1) * p.nc;  // elements of one packed K slice
  const index_t b_slab = p.slices_per_slab * slice;
  const index_t a_block = ceil_div((p.kc > 0 ? p.kc : 1) * p.mc, 16) * 16;
  Scratch<T> work(b_slab + p.threads * a_block);
  const index_t tiles = ceil_div(g.m, MR) * ceil_div(N, NR);
  Scratch<double> tile_squares(g.epilogue.loss ? tiles : 1);
  T* const b_pack = work.get();

  // The work of each thread; with one thread it runs without a team (the worksharing and barriers
  // inside then act as a team of one), which saves setting one up for small products.
  auto work_of_thread = [&] {
#if defined(_OPENMP)
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int thread = 0, team = 1;
#endif
    T* const a_pack = b_pack + b_slab + thread * a_block;
#if defined(LINGRAD_AMX)
    static const AmxConfig kAmxConfig;
    if constexpr (kKind == Kind::bf16_amx) _tile_loadconfig(&kAmxConfig);
#endif
    for (index_t jc = 0; jc < N; jc += NC) {
      const index_t nc = imin(NC, N - jc);
      // This thread's share of the (row block, part) items: a contiguous range, fixed by the team size.
      const index_t items = p.row_blocks * ceil_div(ceil_div(nc, NR), p.panels_per_item);
      const index_t first = items * thread / team, last = items * (thread + 1) / team;
      for (index_t pc0 = 0; pc0 < p.k_slices; pc0 += p.slices_per_slab) {
        const index_t pc1 = imin(p.k_slices, pc0 + p.slices_per_slab);
        pack_b_slab<T, NR, kKind>(g, p, jc, nc, pc0, pc1, b_pack, slice);
        macro_kernel<T, MR, NR, VL, kKind>(g, p, jc, nc, first, last, pc0, pc1, b_pack, slice, a_pack,
                                           tile_squares.get());
#pragma omp barrier
        // (everyone is done with the slab before it is repacked)
      }
    }
#if defined(LINGRAD_AMX)
    if constexpr (kKind == Kind::bf16_amx) _tile_release();
#endif
  };
  if (p.threads > 1) {
#pragma omp parallel num_threads(p.threads)
    work_of_thread();
  } else {
    work_of_thread();
  }

  if (g.epilogue.loss) {  // a fixed order, whatever thread computed each tile
    double total = 0;
    for (index_t t = 0; t < tiles; ++t) total += tile_squares.get()[t];
    *g.epilogue.loss = total;
  }
}

// ---------------------------------------------------------------------------------------------
// The plan and the driver.

template <typename T, const GemmTable& kTable>
constexpr const GemmBlocking& blocking_of() {
  if constexpr (sizeof(T) == sizeof(float)) {
    return kTable.f;
  } else {
    return kTable.d;
  }
}

// Every decision for one product, from g's shape and strides (and whether row sums and the loss
// are wanted) and the build's table; no pointer is read.
#if defined(LINGRAD_AMX)
// The AMX bfloat16 products' blocks: a 32 x 32 block of C in four tiles; KC 1024 (32 K tiles: C is
// written once for K up to 1024, where each extra K slice reads and writes all of C again, from
// memory at large layers); MC kAmxRows (see there). Tiles from L3 starve the tile unit. Measured on
// an Intel Xeon, 2 threads, forward 4096 x 1024 x 1024: MC 64, KC 512 1.0-1.2 TFLOP/s; MC 256, KC
// 1024 1.5-1.6 (MC 128 or 512, or KC 256, slower); with K in chunks of 8 tiles, 1.9-2.1.
constexpr GemmBlocking kAmxBlocking = {32, 32, kAmxRows, 1024, 4096, 16};
#endif

template <typename T, const GemmTable& kTable>
GemmPlan make_plan(const GemmArgs<T>& g) {
#if defined(LINGRAD_AMX)
  const GemmBlocking& b = g.bf16 ? kAmxBlocking : blocking_of<T, kTable>();
#else
  const GemmBlocking& b = blocking_of<T, kTable>();
#endif
  GemmPlan p;
  if (g.m == 0 || g.n == 0) return p;  // empty (dW's row sums, if asked for, still computed)
  // Below kSerialWork multiply-adds a thread team costs more than it saves.
  const bool small = static_cast<double>(g.m) * static_cast<double>(g.n) * static_cast<double>(g.k) < kSerialWork;
  p.threads = small || g.num_threads < 1 ? 1 : g.num_threads;
  if (g.bf16) {
    plan_packed(g, b, p);                          // (the narrow and small-M paths read their operands in place)
  } else if (g.n <= kNarrowN && !g.a_col_scale) {  // (scaled A: only the packed path scales it)
    p.path = GemmPath::narrow;
    p.copy_a = g.a_cs != 1;
    p.copy_b = g.b_rs != 1;
    p.items = ceil_div(g.m, kNarrowRows);
    p.scratch_bytes = p.threads * narrow_buffer(g) * static_cast<index_t>(sizeof(T)) +
                      (g.epilogue.loss ? p.items * static_cast<index_t>(sizeof(double)) : 0);
  } else if (g.m <= kSmallM && g.k >= kSmallMinK * g.m * g.m && !g.a_col_scale) {
    plan_small(g, b.vl, p);
  } else {
    plan_packed(g, b, p);
  }
  return p;
}

template <typename T, const GemmTable& kTable>
void gemm(const GemmArgs<T>& g) {
  constexpr const GemmBlocking& b = blocking_of<T, kTable>();
  const index_t M = g.m, K = g.k;
  if (g.a_row_sums)
    for (index_t m = 0; m < M; ++m) g.a_row_sums[m] = T(0);
  if (g.epilogue.loss) *g.epilogue.loss = 0;
  const GemmPlan plan = make_plan<T, kTable>(g);
  switch (plan.path) {
    case GemmPath::empty:
      if (g.n == 0 && g.a_row_sums)  // nothing to multiply, but the row sums are still wanted
        for (index_t m = 0; m < M; ++m)
          for (index_t k = 0; k < K; ++k) {
            const index_t at = m * g.a_rs + k * g.a_cs;
            if constexpr (std::is_same_v<T, float>)
              if (g.bf16) {
                g.a_row_sums[m] += bf16_to_float(g.a16 ? bf16_operand(g.a16 + at) : bf16_operand(g.a + at));
                continue;
              }
            g.a_row_sums[m] += g.a_col_scale ? g.a[at] * g.a_col_scale[k] : g.a[at];
          }
      return;
    case GemmPath::narrow:
      return gemm_narrow(g, plan.threads);
    case GemmPath::small_m:
      return gemm_small<T, b.vl>(g, plan);
    case GemmPath::packed:
      if constexpr (std::is_same_v<T, float>) {
#if defined(LINGRAD_AMX)
        if (g.bf16) return gemm_packed<T, kAmxBlocking.mr, kAmxBlocking.nr, b.vl, kBf16Kind>(g, plan, kAmxBlocking.nc);
#else
        if (g.bf16) return gemm_packed<T, b.mr, b.nr, b.vl, kBf16Kind>(g, plan, b.nc);
#endif
      }
      return gemm_packed<T, b.mr, b.nr, b.vl, Kind::plain>(g, plan, b.nc);
  }
}

// The peak-rate probe: 12 independent chains of VL-wide float FMAs (the micro-kernel's pattern
// without memory). Returns a checksum so nothing is optimised away; 2 * 12 * VL flops per iteration.
template <int VL>
double fma_probe(index_t iterations, float seed) {
  float acc[12][VL];
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < VL; ++j) acc[i][j] = seed * static_cast<float>(i * VL + j + 1);  // distinct chains
  const float a = 1.0f - 1e-7f * seed, b = 1e-7f * seed;
  for (index_t it = 0; it < iterations; ++it)
    for (int i = 0; i < 12; ++i)
#pragma omp simd
      for (int j = 0; j < VL; ++j) acc[i][j] = acc[i][j] * a + b;
  double sum = 0;
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < VL; ++j) sum += acc[i][j];
  return sum;
}

}  // namespace

// The table this build exports (declared in gemm.hpp), from its file's kBlocking.
template <const GemmTable& kTable>
constexpr GemmKernels make_kernels() {
  static_assert(kTable.f.mc % kTable.f.mr == 0 && kTable.f.nc % kTable.f.nr == 0, "blocks must hold whole tiles");
  static_assert(kTable.d.mc % kTable.d.mr == 0 && kTable.d.nc % kTable.d.nr == 0, "blocks must hold whole tiles");
  static_assert(kTable.f.nr % 4 == 0 && kTable.d.nr % 4 == 0, "the last column panel may run an NR/4 tile");
  return GemmKernels{kTable.name,
                     &gemm<float, kTable>,
                     &gemm<double, kTable>,
                     &make_plan<float, kTable>,
                     &make_plan<double, kTable>,
                     &epilogue_only<float>,
                     &epilogue_only<double>,
                     &fma_probe<kTable.f.vl>,
                     2 * 12 * kTable.f.vl,
                     kTable.f,
                     kTable.d,
#if defined(LINGRAD_AMX)
                     "amx",
                     &amx_probe,
                     4 * 16 * 16 * 32 * 2};
#elif defined(LINGRAD_BF16_DOT)
                     "vdpbf16ps",
                     &bf16_probe,
                     12 * 16 * 2 * 2};
#else
                     "widened",
                     nullptr,
                     0};
#endif
}

const GemmKernels kernels = make_kernels<kBlocking>();

}  // namespace LINGRAD_ISA
}  // namespace lingrad
