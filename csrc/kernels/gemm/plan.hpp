// The GEMM engine's plan (made in gemm/plan.cpp) and its introspection: the active build's block
// sizes and thresholds, and the plan it makes for a product. The introspection is for the tests
// (lingrad._C._gemm_plan, lingrad.config()) and tuning; the layer kernels need none of it
// (lingrad.hpp). Defined in cpu.cpp, from the active IsaBuild.
#pragma once
#include "lingrad.hpp"

namespace lingrad {

// The block sizes of the GEMM engine in use (Goto/BLIS names): an MR x NR register tile, MC rows
// of A and KC of the reduction per packed block, NC columns of B per packed panel; VL, the vector
// length, is the number of lanes of the small-M path.
struct GemmBlocking {
  int mr, nr, mc, kc, nc, vl;
};
GemmBlocking get_blocking(bool double_);  // for float (double_=false) or double
double gemm_serial_work();                // multiply-adds below which a product runs on one thread
index_t gemm_slab_bytes();                // the packed B panels' scratch: at most this, or one KC x NC slice
int gemm_small_m();                       // products with at most this many rows take the small-M path,
int gemm_small_min_k();                   // if K >= this times M^2

// The plan of one product C (m x n) = A (m x k) B (k x n), A[i, p] at a[i*a_rs + p*a_cs] and B[p, j]
// at b[p*b_rs + j*b_cs]: every decision the engine makes before it computes, from the shape, the
// strides and the build's blocking alone (see gemm/engine.inc). For tests and tuning: which path a
// shape takes, and how it is cut.
enum class GemmPath { empty, narrow, unpacked, small_m, packed };
constexpr const char* kGemmPathNames[] = {"empty", "narrow", "unpacked", "small_m", "packed"};
struct GemmPlan {
  GemmPath path = GemmPath::empty;  // empty: m == 0 or n == 0 (only the row sums, if asked, are computed)
  int threads = 1;                  // the team that runs it (1: no team is started)
  index_t items = 0;                // work items shared out to the team (per column block for packed)
  // narrow, small M and unpacked: an operand whose reduction stride is not 1 is copied in contiguous runs
  bool copy_a = false, copy_b = false;
  bool columns = false;  // narrow: the column form (a short K), else dot products
  // small M
  bool dot = false;   // the dot form (B's columns contiguous); else the axpy form
  int lanes = 0;      // lane classes of the summation order
  int chain = 0;      // axpy: rows of one class chained in registers
  index_t strip = 0;  // columns per work item
  // packed: the blocked GEMM
  int mr = 0, nr = 0;                   // register tile
  bool pack_a = false, pack_b = false;  // else read in place
  bool split_rows = false;              // rows that fit one block cut in two, to share few columns between threads
  bool prefetch_c = false;              // C's rows fetched ahead of each tile's update
  index_t kc = 0, k_slices = 0;         // the reduction in k_slices equal slices of kc
  index_t mc = 0, row_blocks = 0;       // rows in row_blocks equal blocks of mc
  index_t nc = 0, column_blocks = 0;
  index_t panels_per_item = 0;             // column panels in one work item (with a row block)
  index_t slices_per_slab = 0, slabs = 0;  // K slices packed between two barriers, and how many times
  int last_tile = 0;                       // width of the tile that runs the last column panel: nr, nr/2 or nr/4
  // The scratch memory, in elements of the product's type (float for bfloat16 products), as the
  // stages allocate it: B's packed slab (packed: slices_per_slab K slices of kc x nc), each thread's
  // own part (packed: its block of A; small M: its strip's lanes and copies; narrow: its panel of A;
  // unpacked: a chunk of its strip of B), a copy of A's rows for the row sums (small M), the float32 sums that a
  // bfloat16 result alone keeps in memory (M x N, or 0), and the loss's partial sums (doubles: per
  // tile, strip or block).
  index_t b_slab = 0, per_thread = 0, row_sums_copy = 0, kept_sums = 0, partial_squares = 0;
  index_t scratch_bytes = 0;  // all of the above, all threads
};
// The plan for a float (double_=false) or double product, with the active build's blocking;
// row_sums: the row sums of A are wanted (the bias gradient), loss: the epilogue sums squares.
GemmPlan gemm_plan(bool double_, index_t m, index_t n, index_t k, index_t a_rs, index_t a_cs, index_t b_rs,
                   index_t b_cs, bool row_sums, bool loss, int threads);

}  // namespace lingrad
