// The GEMM engine's plan: every decision for one product, made before it computes, from the shape,
// the strides, the element size, the extras asked for and a build's table (IsaTraits) alone. Compiled
// once for every build (plain flags: integer arithmetic only); each build's stages only read it.
// Block sizes never depend on the thread count (only `threads` and the scratch do), so each element
// of C is summed in the same order whatever the team (see gemm/engine.inc).
#include "gemm.hpp"

namespace lingrad {
namespace {

constexpr index_t imin(index_t a, index_t b) { return a < b ? a : b; }
constexpr index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
constexpr index_t round_up(index_t a, index_t b) { return ceil_div(a, b) * b; }

// The loss's partial sums (doubles), one per work unit of the path, or none.
index_t partial_squares(const GemmProblem& q, index_t units) { return q.loss ? units : 0; }

void finish_scratch(const GemmProblem& q, GemmPlan& p) {
  p.scratch_bytes = (p.b_slab + p.threads * p.per_thread + p.row_sums_copy + p.kept_sums) * q.elem_bytes +
                    p.partial_squares * static_cast<index_t>(sizeof(double));
}

// Narrow path (N <= kNarrowN, gemm/narrow.inc), blocks of kNarrowRows rows. A short K (at most
// kNarrowColumnK) takes the column form: each thread packs its block of A k-major (kNarrowRows x K).
// Else dot products: a block's rows are packed for each chunk of K where A's k stride is not 1, and
// B's columns copied where theirs is not.
void plan_narrow(const GemmProblem& q, GemmPlan& p) {
  p.path = GemmPath::narrow;
  // Its time is reading A (M x K), at N <= 4 multiply-adds per value: a team pays from a quarter of
  // kSerialWork values (measured on Zen 4: (5000, 50, 1), 250,000 multiply-adds, took 34 us alone).
  if (q.threads > 1 && static_cast<double>(q.m) * static_cast<double>(q.k) >= kSerialWork / 4) p.threads = q.threads;
  p.columns = q.k <= kNarrowColumnK;
  p.copy_a = !p.columns && q.a_cs != 1;
  p.copy_b = !p.columns && q.b_rs != 1;
  p.items = ceil_div(q.m, kNarrowRows);
  p.threads = static_cast<int>(imin(p.threads, p.items));
  p.per_thread = p.columns ? kNarrowRows * (q.k > 0 ? q.k : 1)
                           : ((p.copy_a ? kNarrowPackRows : 0) + (p.copy_b ? kNarrowN : 0)) * kNarrowChunk;
  p.partial_squares = partial_squares(q, p.items);
}

// Small-M path (gemm/small_m.inc), L lanes.
void plan_small(const GemmProblem& q, int lanes, GemmPlan& p) {
  // Strips of at most kMaxStrip columns (the chains of a strip stay in L1), and at least
  // kMinStrips of them (for the threads) while strips stay kMinStrip or wider; equal, in whole vectors.
  // (kMinStrip 32: a forward pass of (8, 784, 50) is two strips, for two threads: 10.2 -> 7.8 us on Zen 4.)
  constexpr index_t kMaxStrip = 512, kMinStrip = 32, kMinStrips = 8;
  p.path = GemmPath::small_m;
  p.lanes = lanes;
  p.dot = q.b_rs == 1;
  p.chain = p.dot ? 0 : small_axpy_chain(static_cast<int>(q.m));
  p.copy_a = p.dot && q.a_cs != 1;
  p.copy_b = !p.dot && q.b_cs != 1;
  const index_t strips = imin(ceil_div(q.n, lanes), imin(kMinStrips, ceil_div(q.n, kMinStrip)));
  const index_t want = strips > ceil_div(q.n, kMaxStrip) ? strips : ceil_div(q.n, kMaxStrip);
  p.strip = ceil_div(ceil_div(q.n, want), lanes) * lanes;
  p.items = ceil_div(q.n, p.strip);
  p.threads = static_cast<int>(imin(p.threads, p.items));
  // Each thread's part: the chains of one strip (rows a line longer than the strip), A's pass
  // (dot: copied rows; axpy: one block packed by class) and B's block (axpy: copied, and its last
  // columns padded).
  const index_t line = 64 / q.elem_bytes;
  const index_t chains = q.m * (p.strip + line) * p.lanes;
  const index_t block = small_axpy_chain(static_cast<int>(q.m)) * p.lanes;
  const index_t a_pass = p.dot ? (p.copy_a ? q.m * kSmallCopyK : 0) : q.m * block;
  const index_t b_block = p.dot ? 0 : block * ((p.copy_b ? p.strip : 0) + p.lanes);
  p.per_thread = round_up(chains + a_pass + b_block, 16);
  p.row_sums_copy = q.row_sums && q.a_cs != 1 ? kSmallCopyK : 0;
  p.partial_squares = partial_squares(q, p.items);
}

// Unpacked path (gemm/unpacked.inc): items of kUnpackedRows rows by kUnpackedStrip columns; a B
// whose columns are not contiguous is copied, kUnpackedChunk k of the item's strip at a time, into
// the thread's buffer (else only the strip's right edge).
void plan_unpacked(const GemmProblem& q, const GemmBlocking& b, GemmPlan& p) {
  p.path = GemmPath::unpacked;
  p.mr = b.mr;
  p.nr = b.nr;
  p.copy_b = q.b_cs != 1;
  p.strip = imin(q.n, kUnpackedStrip);
  p.items = ceil_div(q.m, kUnpackedRows) * ceil_div(q.n, kUnpackedStrip);
  p.threads = static_cast<int>(imin(p.threads, p.items));
  // A B to copy is packed into NR-wide k-major panels (the packed path's routine): whole, once,
  // where that is at most kUnpackedCopyBytes (pack_b; every item reads it), else by each item, a
  // chunk of K of its strip. A B read in place: each item copies its strip's right edge, a chunk
  // of K of one vector.
  const index_t panels = ceil_div(q.n, b.nr) * b.nr;  // (NR-wide k-major panels, as the packed path's)
  p.pack_b = p.copy_b && q.k * panels * q.elem_bytes <= kUnpackedCopyBytes;
  p.b_slab = p.pack_b ? q.k * panels : 0;
  p.per_thread = p.pack_b ? 0 : imin(q.k, kUnpackedChunk) * (p.copy_b ? ceil_div(p.strip, b.nr) * b.nr : b.vl);
  p.partial_squares = partial_squares(q, p.items);
}

// Packed path (gemm/packed.inc), with block sizes b.
void plan_packed(const IsaTraits& t, const GemmProblem& q, const GemmBlocking& b, GemmPlan& p) {
  const index_t M = q.m, N = q.n, K = q.k, MR = b.mr, NR = b.nr;
  const index_t size = q.elem_bytes;
  p.path = GemmPath::packed;
  p.mr = b.mr;
  p.nr = b.nr;
  // K in equal slices of at most KC (no short last slice); K == 0 still writes C = 0 (+ bias).
  p.k_slices = K > 0 ? ceil_div(K, b.kc) : 1;
  p.kc = ceil_div(K, p.k_slices);
  if (q.bf16 && p.kc % t.bf16_k_step) {  // bfloat16: slices of whole K pairs or tiles (the last one padded)
    p.kc = ceil_div(p.kc, t.bf16_k_step) * t.bf16_k_step;
    p.k_slices = K > 0 ? ceil_div(K, p.kc) : 1;
  }
  // M in equal blocks of at most MC rows (threads get equal work). When N is too narrow to share
  // out (N = 50: four column panels, one work item per row block), the rows are cut into more blocks,
  // down to 2 MR rows, until there are kMinItems work items: else one thread could wait for another
  // (781 rows in 5 blocks: 3 to 2). Row blocks change who computes a row, not how it is summed.
  constexpr index_t kMinItems = 16;
  const bool rows_fit_one_block = M <= b.mc;
  p.panels_per_item = q.bf16 ? t.bf16_panels_per_item : kPanelsPerItem;
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
  p.slices_per_slab = q.bf16 ? 1 : imin(p.k_slices, fit > 1 ? fit : 1);
  p.slabs = ceil_div(p.k_slices, p.slices_per_slab);
  p.items = p.row_blocks * parts;
  // Rows of A with unit k stride (X in the forward pass, dY for dX) are read in place: packing
  // them would cost a copy of A per thread. Other layouts, the bias gradient's row sums and the
  // zero-padded edge panels go through the packed path, and so do rows a multiple of kAliasBytes
  // apart: they would fall into the same L1 cache sets.
  // AMX tiles read bfloat16 rows so too (a short last K tile packed), where their 64-byte tile rows
  // do not straddle cache lines (a stride of whole lines, and an aligned base: NumPy's arrays are
  // often 16 bytes off) or A serves few column panels (N <= 128; measured on an Intel Xeon: forward
  // 5000 x 784 x 50 1.3x faster in place, 512 x 1000 x 1000 1.1x packed). Other bfloat16 products
  // pack A. (The same bits either way.)
  const index_t a_row_bytes = q.a_rs * static_cast<index_t>(sizeof(bfloat16));
  const bool few_panels = N <= 4 * NR;
  const bool amx_in_place = t.bf16_kind == ProductKind::bf16_amx && q.a16 && q.a_cs == 1 && !q.row_sums &&
                            a_row_bytes % kAliasBytes != 0 &&
                            (few_panels || (a_row_bytes % 64 == 0 && q.a16_line_aligned));
  p.pack_a =
      q.bf16 ? !amx_in_place : !(q.a_cs == 1 && !q.row_sums && !q.col_scale && (q.a_rs * size) % kAliasBytes != 0);
  // B is packed to be reused by many row blocks; when the rows fit one block (dW = dY^T X for up to
  // MC outputs: the tall-skinny layers) packing would copy all of X for one or two uses, so rows of
  // B with unit n stride are read in place instead (edge panels still packed). Aliasing rows matter
  // only when a B micro-panel is reused, by more than one row panel.
  p.pack_b = q.bf16 || !(rows_fit_one_block && q.b_cs == 1 && (M <= MR || (q.b_rs * size) % kAliasBytes != 0));
  // C rows that one row block updates in each K slice: beyond kCacheBytes they are gone from L2 by
  // the next slice, so they are prefetched before each tile's update.
  p.prefetch_c = p.mc * p.nc * size > kCacheBytes;
  const index_t last_panel =
      (N - (p.column_blocks - 1) * b.nc) - (ceil_div(N - (p.column_blocks - 1) * b.nc, NR) - 1) * NR;
  p.last_tile = static_cast<int>(last_panel <= NR / 4 ? NR / 4 : last_panel <= NR / 2 ? NR / 2 : NR);
  // Scratch: the slab, each thread's A block (whole 64-byte lines of floats), the M x N float32 sums
  // of a bfloat16 result alone where the kernel needs them in memory (the partial sums of several K
  // slices, or the tiles that a micro-kernel stores before the epilogue rounds them; the AMX kernel
  // rounds each finished block straight from L1 when K is one slice), and a square sum per tile.
  p.b_slab = p.slices_per_slab * slice;
  p.per_thread = round_up((p.kc > 0 ? p.kc : 1) * p.mc, 16);
  p.kept_sums = q.result16_only && !(t.bf16_kind == ProductKind::bf16_amx && p.k_slices == 1) ? M * N : 0;
  p.partial_squares = partial_squares(q, ceil_div(M, MR) * ceil_div(N, NR));
}

}  // namespace

GemmPlan make_plan(const IsaTraits& t, const GemmProblem& q) {
  // A bfloat16 product (float32 sums) takes the table's bfloat16 blocks: AMX's own, or a copy of
  // the float column.
  const GemmBlocking& b = q.bf16 ? t.bf16 : q.elem_bytes == static_cast<index_t>(sizeof(double)) ? t.d : t.f;
  GemmPlan p;
  if (q.m == 0 || q.n == 0) return p;  // empty (dW's row sums, if asked for, still computed)
  // Below kSerialWork multiply-adds a thread team costs more than it saves.
  const bool small = static_cast<double>(q.m) * static_cast<double>(q.n) * static_cast<double>(q.k) < kSerialWork;
  p.threads = small || q.threads < 1 ? 1 : q.threads;
  // A product the small-M path can take stays there: where B must be copied (W^T in the forward
  // pass), the copy costs as much as the few rows' product (forward of (1, 784, 50): 33 us unpacked,
  // 2.6 us small M; (8, 784, 30): 8.2 and 6.6 us), and the small-M path reads B in place either way.
  // (dX of such shapes, B in place, would run 2-4x faster unpacked: (8, 9, 734) 2.4 us, 5.6 small M.)
  const bool small_m = q.m <= kSmallM && q.k >= kSmallMinK * q.m * q.m;
  if (q.bf16) {
    plan_packed(t, q, b, p);                     // (the narrow and small-M paths read their operands in place)
  } else if (q.n <= kNarrowN && !q.col_scale) {  // (scaled A: only the packed path scales it)
    plan_narrow(q, p);
  } else if (!small_m && q.n <= 2 * b.nr && q.m * q.k <= kUnpackedArea && (q.k <= 2 * b.kc || q.m <= kUnpackedRows) &&
             !q.col_scale) {
    // One or two tiles of columns over a small A: a short K, or few rows (each row tile streams
    // B's K rows from L2, where the packed path keeps a KC slice in L1: a forward pass of
    // (64, 784, 50) ran 0.85x OpenBLAS unpacked alone, 0.4x among other thread pools).
    plan_unpacked(q, b, p);
  } else if (small_m && !q.col_scale) {
    plan_small(q, b.vl, p);
  } else if (q.k <= kUnpackedK && !q.col_scale) {  // a tiny reduction
    plan_unpacked(q, b, p);
  } else {
    plan_packed(t, q, b, p);
  }
  finish_scratch(q, p);
  return p;
}

}  // namespace lingrad
