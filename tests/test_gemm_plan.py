"""The GEMM engine's plan (lingrad._C._gemm_plan, a test-only view of the decisions it makes before
it computes): each shape that claims to test a special path really takes it, the decisions that
fix the summation order depend on neither the memory layout nor the thread count, and the scratch
stays within the bound that test_memory.py measures."""

import itertools

import numpy as np
import pytest

import lingrad
from lingrad import _C

from cases import KERNEL_SHAPES, SMALL_M_SHAPES, gemm_scratch_bound


def strides(a):
    """Strides in elements as the kernels see them (0 for a dimension of length 1)."""
    return tuple(s // a.itemsize if n > 1 else 0 for n, s in zip(a.shape, a.strides))


def plan_of(product, shape, dtype=np.float32, order="C", threads=None):
    """The plan of one product of a Linear layer of shape (batch, in, out), its operands in C or
    Fortran order, as csrc/kernels/linear.cpp builds it: forward C = X W^T, dX = dY W, dW = dY^T X
    (with the row sums of dY^T: the bias gradient)."""
    batch, n_in, n_out = shape
    x, w, dy = (np.empty(s, dtype, order=order) for s in [(batch, n_in), (n_out, n_in), (batch, n_out)])
    (x_rs, x_cs), (w_rs, w_cs), (dy_rs, dy_cs) = strides(x), strides(w), strides(dy)
    name = np.dtype(dtype).name
    if product == "forward":
        args = (batch, n_out, n_in, x_rs, x_cs, w_cs, w_rs)
    elif product == "dX":
        args = (batch, n_in, n_out, dy_rs, dy_cs, w_rs, w_cs)
    else:
        args = (n_out, n_in, batch, dy_cs, dy_rs, x_rs, x_cs)
    return _C._gemm_plan(*args, name, row_sums=product == "dW", threads=threads)


# What shapes of the kernel tests claim to exercise (see the comments at cases.KERNEL_SHAPES):
# (shape, product, what the plan must say), for float32 on every ISA, operands in C order.
def packed(**want):
    return lambda p, shape: p["path"] == "packed" and all(p[k] == v for k, v in want.items())


def edge_rows(m):  # the last row panel is narrower than the tile
    return lambda p, shape: p["path"] == "packed" and m % p["tile"][0] != 0


def edge_columns(n):  # the last column panel is narrower than the tile that runs it (masked stores)
    return lambda p, shape: p["path"] == "packed" and 0 < (n % p["tile"][1]) % p["last_tile"]


def narrower_tile(p, shape):  # the last column panel runs a half or quarter width tile
    return p["path"] == "packed" and p["last_tile"] < p["tile"][1]


def path(name, **want):
    return lambda p, shape: p["path"] == name and all(p[k] == v for k, v in want.items())


def unpacked_if_narrow(p, shape):  # N within two register tiles (2 NR, the build's): unpacked, else packed
    return p["path"] == ("unpacked" if shape[2] <= 2 * p["tile"][1] else "packed")


CLAIMS = [
    ((9, 20, 4100), "forward", packed(column_blocks=2)),
    ((40, 4099, 40), "dX", packed(column_blocks=2)),
    ((40, 4099, 40), "dW", packed(column_blocks=2)),
    ((40, 4099, 40), "forward", packed(k_slices=17)),
    ((9, 3000, 800), "forward", packed(pack_b=True, slabs=2)),
    ((11, 256, 80), "forward", packed(k_slices=1, kc=256, row_blocks=1)),
    ((11, 256, 80), "forward", edge_rows(11)),
    ((17, 255, 79), "forward", edge_rows(17)),
    ((17, 255, 79), "forward", edge_columns(79)),
    ((13, 511, 65), "forward", narrower_tile),
    ((169, 100, 97), "forward", lambda p, shape: p["path"] == "packed" and p["row_blocks"] >= 2),
    ((3, 4, 600), "dX", path("narrow")),
    ((633, 11, 3), "forward", path("narrow", items=10, form="columns")),  # ten blocks of 64 rows, one short
    ((3, 4, 600), "dW", path("narrow", form="columns")),
    ((300, 2, 200), "dW", path("narrow", form="dot", copy_a=True)),  # dY^T's rows packed
    ((5, 600, 3), "forward", path("narrow", form="dot", copy_a=False)),  # X's rows in place
    ((2, 4500, 3), "forward", path("narrow", form="dot", copy_a=False)),  # three chunks of K
    ((100, 3, 70), "dW", path("narrow", form="columns")),  # K = 100 <= kNarrowColumnK, dY^T's columns
    ((100, 3, 70), "dX", path("narrow", form="columns")),  # K = 70, dY's rows transposed
    ((1, 1000, 1), "forward", path("narrow")),
    ((3, 0, 2), "forward", path("narrow")),
    ((1, 1000, 1), "dX", path("unpacked", copy_b=False)),  # one row, but K = 1 < 8: a rank-1 update
    ((6, 256, 16), "forward", unpacked_if_narrow),  # (K = 256 < 8 * 6^2: not small M)
    ((11, 256, 16), "forward", unpacked_if_narrow),
    ((17, 255, 15), "forward", unpacked_if_narrow),  # an edge row block and column vector
    ((9, 4099, 9), "forward", unpacked_if_narrow),  # W^T copied in chunks of K, the chains resumed
    ((9, 4099, 9), "dX", path("unpacked", copy_b=False, items=9)),  # K = 9: 9 strips of 512 columns
    ((9, 4099, 9), "dW", path("unpacked", items=9)),
    ((5, 255, 15), "dW", path("unpacked")),  # K = 5 (15 outputs: more than 8 rows for small M)
    ((2, 5, 3), "dW", path("unpacked")),  # 3 outputs, K = 2 < 8 * 3^2
    ((7, 13, 5), "dX", path("unpacked")),
    ((3, 5, 4100), "forward", path("unpacked", copy_b=True, items=9)),  # 9 strips of 512; W^T's rows copied
    ((3, 4099, 9), "dX", path("unpacked", copy_b=False, items=9)),
    ((7, 257, 17), "dX", path("packed")),  # K = 17, just above kUnpackedK
    ((0, 5, 3), "forward", path("empty")),
]


@pytest.mark.parametrize("shape, product, claim", CLAIMS)
def test_kernel_shapes_take_the_paths_they_claim(isa, shape, product, claim):
    assert shape in KERNEL_SHAPES, "a claim about a shape the kernel tests do not run"
    plan = plan_of(product, shape)
    assert claim(plan, shape), f"{product} of {shape} on {isa}: {plan}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_batch_shapes_take_both_forms(isa, dtype):
    """tests/test_small_batch.py: every shape runs the small-M path (K >= 8 M^2), one row of K fewer
    does not; a C-order weight gives the dot form for the forward pass and the axpy form for dX, a
    Fortran-order one the reverse, and dW (X in C order) the axpy form."""
    forms = set()
    for m, k, n in SMALL_M_SHAPES:
        if k > 8 * m * m:
            below = (m, 8 * m * m - 1, n)  # one short of the threshold
            plan = plan_of("forward", below, dtype)
            narrow = plan["path"] in ("unpacked", "packed") and n <= 2 * plan["tile"][1] and m * below[1] <= 1 << 17
            below_path = "narrow" if n <= 4 else "unpacked" if narrow or below[1] <= 16 else "packed"
            assert plan["path"] == below_path, below
        for product, order, form in [("forward", "C", "dot"), ("dX", "C", "axpy"), ("forward", "F", "axpy")]:
            shape = (m, k, n) if product == "forward" else (m, n, k)  # an m-row product of reduction k
            plan = plan_of(product, shape, dtype, order)
            if n <= 4:
                assert plan["path"] == "narrow", (product, shape, plan)
                continue
            assert plan["path"] == "small_m", (product, shape, plan)
            if k > 1:  # (a dimension of length 1 has stride 0: either form may read it)
                assert plan["form"] == form, (product, order, shape, plan)
            forms.add(plan["form"])
        dw = plan_of("dW", (k, n, m), dtype)  # dW of m outputs, batch k
        assert dw["path"] == ("narrow" if n <= 4 else "small_m") and (n <= 4 or dw["form"] == "axpy"), dw
    assert forms == {"dot", "axpy"}
    assert plan_of("dX", (2, 2049, 65), dtype)["items"] >= 4  # several strips for the threads


# Shapes across the paths, for the invariants below.
SHAPES = [
    (1, 784, 50),
    (3, 300, 1030),
    (8, 1024, 1024),
    (9, 3000, 800),
    (64, 784, 50),
    (300, 257, 70),
    (2000, 100, 3),
    (4096, 1024, 1024),
    (1024, 4096, 1024),
    (60000, 784, 50),
    (777, 1000, 257),
    (5, 3, 4100),
]
PRODUCTS = ["forward", "dX", "dW"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_summation_order_does_not_depend_on_layout_or_threads(isa, dtype):
    """The path and the decisions that fix how each element is summed (K slices for packed, lanes for
    small M) are the same for every layout and thread count; only who computes what may change.
    No block size depends on the thread count."""
    order_keys = ["path", "kc", "k_slices", "lanes"]
    block_keys = ["kc", "k_slices", "mc", "row_blocks", "nc", "column_blocks", "slices_per_slab", "strip", "items"]
    for shape, product in itertools.product(SHAPES, PRODUCTS):
        plans = {(order, t): plan_of(product, shape, dtype, order, t) for order in "CF" for t in (1, 2, 3)}
        first = plans["C", 1]
        for (order, threads), plan in plans.items():
            for key in order_keys:
                assert plan.get(key) == first.get(key), f"{product} {shape} {order} {threads}: {key}"
            if order == "C":
                for key in block_keys:
                    assert plan.get(key) == first.get(key), f"{product} {shape} threads {threads}: {key}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scratch_within_the_measured_bound(dtype):
    """Every plan's scratch is within what test_memory.py allows the GEMM (packed B slab + one A block
    per thread), whatever the path."""
    bound = gemm_scratch_bound(np.dtype(dtype).itemsize)
    for shape, product in itertools.product(SHAPES + [(8, 60000, 784), (7, 100000, 3)], PRODUCTS):
        plan = plan_of(product, shape, dtype, threads=lingrad.get_num_threads())
        assert plan["scratch_bytes"] <= bound, f"{product} {shape}: {plan}"


def test_plan_arguments_are_checked():
    with pytest.raises(ValueError, match="dtype"):
        _C._gemm_plan(1, 1, 1, 1, 1, 1, 1, "float16")
    with pytest.raises(ValueError, match=">= 0"):
        _C._gemm_plan(-1, 1, 1, 1, 1, 1, 1)
