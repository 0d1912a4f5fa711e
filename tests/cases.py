"""What several test modules share: the shapes they run and the bounds they check against (tests
import these from here, never from one another)."""

import lingrad

# (batch, in_features, out_features) of tests/test_kernels.py (and test_bf16.py). The register tiles
# are 6 x 8/16/32, KC = 256, MC = 72..168, NC = 4080/4096: sizes sit just below, on and above those,
# plus primes, ones and zeros. Products with at most 4 columns take the narrow path; with at most
# two register tiles of columns over a small A, or a reduction of at most 16, the unpacked path;
# with at most 8 rows the small-M path (a batch of up to 8; dW of up to 8 outputs): the packed
# path's tile edges need 9 rows or more and over 16 of K. What each shape claims to test is checked
# against the engine's plan in test_gemm_plan.py (CLAIMS).
KERNEL_SHAPES = [
    (1, 1, 1),
    (1, 3, 1),
    (2, 5, 3),
    (7, 13, 5),
    (5, 17, 31),
    (6, 256, 16),
    (5, 255, 15),
    (7, 257, 17),
    (11, 256, 16),  # unpacked (one tile of columns on AVX2 and AVX-512): an edge row block
    (17, 255, 15),  # and an edge column vector
    (13, 511, 33),
    (13, 511, 65),  # packed: a last column panel of one column (a quarter-width tile)
    (12, 64, 32),
    (169, 100, 47),
    (169, 100, 97),  # packed: more rows than MC (float32: 168)
    (1, 1000, 1),
    (3, 4, 600),
    (97, 61, 89),
    (9, 5, 4100),
    (9, 4099, 9),  # unpacked: dX and dW in 9 strips; the forward's W^T copied in chunks of K
    (9, 20, 4100),  # out > NC: several column blocks in the forward pass
    (40, 4099, 40),  # in > NC: several column blocks for dX and dW; K in 17 slices for the forward
    (11, 256, 80),  # packed: an edge row panel (11 = 8 + 3 or 6 + 5), K = KC in one slice
    (17, 255, 79),  # packed: edge rows, and a last column panel narrower than its tile
    (3, 5, 4100),  # unpacked (K = 5) in 9 strips of the forward pass (W^T copied)
    (3, 4099, 9),  # and of dX (W read in place)
    (9, 3000, 800),  # the forward's packed W^T (K x N = 3000 x 800) exceeds one 8 MB slab: several barriers
    (633, 11, 3),  # narrow (K = 11): ten blocks of 64 rows, the last one short
    (300, 2, 200),  # dW narrow with K = 300: dot products over dY^T's rows packed 16 at a time
    (5, 600, 3),  # the forward pass narrow, K = 600: dot products over the rows in place
    (2, 4500, 3),  # and K = 4500 > kNarrowChunk: in three chunks
    (100, 3, 70),  # narrow column form for dW (K = 100) and dX (K = 70)
    (3, 0, 2),  # no input features: y = bias
    (0, 5, 3),  # empty batch
]

# (rows, K, N) of tests/test_small_batch.py: the small-M path runs for K >= 8 rows^2 (gemm.hpp:
# kSmallMinK); K on that threshold, and off the vector lengths (2..16) and the axpy block (C * L
# rows) with tails; N wide enough for several column strips (up to 512 columns each) and threads,
# and off the vector lengths, and wider than two register tiles (N <= 2 NR: the unpacked path).
# test_gemm_plan.py checks that each takes the path.
SMALL_M_SHAPES = [(m, 8 * m * m + t, n) for m in range(1, 9) for t, n in [(0, 73), (5, 70)]]
SMALL_M_SHAPES += [(m, max(300, 8 * m * m + 3), 1030) for m in range(1, 9)]
SMALL_M_SHAPES += [(m, 1030, 517) for m in (1, 4, 8)]
SMALL_M_SHAPES += [(1, 13, 69), (1, 4099, 71), (2, 65, 2049)]

# (rows, K, N) of the unpacked path in tests/test_small_batch.py (the same checks: every layout and
# thread count bitwise the same): N <= 8 columns (a register tile on every ISA) for the forward
# pass and dW, K = N <= 16 for dX. K past a chunk of the copied W^T (chains resumed), row blocks
# with a short tile, an edge vector of half width (AVX-512), two vectors with an edge.
UNPACKED_SHAPES = [(10, 2635, 6), (37, 300, 7), (3, 100, 5), (1, 9, 8), (9, 40, 24), (40, 12, 70)]


def shape_id(s):
    """A test id for a shape: (9, 3000, 800) -> "9x3000x800"."""
    return "x".join(map(str, s))


def gemm_scratch_bound(itemsize: int) -> int:
    """The GEMM's scratch as the engine bounds it (lingrad.config()): the packed B slab, at most
    max(gemm_slab_bytes, one KC x NC slice), and one MC x KC block of A per thread. test_memory.py
    measures it; test_gemm_plan.py checks every plan against it."""
    info = lingrad.config()
    blocking = info["blocking_float32" if itemsize == 4 else "blocking_float64"]
    slab = max(info["gemm_slab_bytes"], blocking["kc"] * blocking["nc"] * itemsize)
    return slab + info["num_threads"] * blocking["mc"] * blocking["kc"] * itemsize
