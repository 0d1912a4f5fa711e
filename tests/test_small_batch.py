"""The GEMM engine's small-M path: a batch of 1 to 8 in the forward pass and dX, and dW of a layer
with 1 to 8 outputs; and the unpacked path (gemm/unpacked.inc) under the same checks. B (the
weight, or X for dW) is streamed in place along whichever of its dimensions is contiguous, by one
of two forms of the same summation order (gemm/small_m.inc, "Small M"): results must match the
float64 reference within bounds that grow with the reduction length, and be bitwise the same for
every memory layout of every operand and every thread count. The shapes: cases.SMALL_M_SHAPES and
cases.UNPACKED_SHAPES."""

import itertools

import numpy as np
import pytest

from lingrad import kernels
from lingrad import reference as ref

from cases import SMALL_M_SHAPES, UNPACKED_SHAPES, shape_id

DTYPES = [np.float32, np.float64]


def layouts(rng, a):
    """The same values as C order, Fortran order, a strided view and a negative-stride view."""
    r, c = a.shape
    big = np.full((2 * r + 1, 3 * c + 2), np.nan, a.dtype)
    strided = big[1::2, 2::3][:r, :c]
    strided[...] = a
    negative = np.full((r, c), np.nan, a.dtype)[::-1, ::-1]
    negative[...] = a
    return [a, np.asfortranarray(a), strided, negative]


def products(rng, dtype, m, k, n):
    """Inputs of the three products with m rows of A (batch m; dW with m outputs), as callables
    taking the operands, and their references."""
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    dy = rng.standard_normal((m, n)).astype(dtype)
    dy_t = rng.standard_normal((k, m)).astype(dtype)  # dW of a layer with m outputs and batch k
    x_w = rng.standard_normal((k, n)).astype(dtype)
    return [
        ("forward", lambda x, w: kernels.linear_forward(x, w, b), (x, w), ref.linear_forward(x, w, b)),
        ("dX", lambda dy, w: kernels.linear_backward_input(dy, w), (dy, w), ref.linear_backward_input(dy, w)),
        ("dW", lambda dy, x: kernels.linear_backward_weight(dy, x), (dy_t, x_w), ref.linear_backward_weight(dy_t, x_w)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_M_SHAPES, ids=shape_id)
def test_small_m_products(isa, num_threads, rng, dtype, shape):
    check_products(num_threads, rng, dtype, shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", UNPACKED_SHAPES, ids=shape_id)
def test_unpacked_products(isa, num_threads, rng, dtype, shape):
    """The unpacked path (gemm/unpacked.inc) under the same checks: A and B read in place or copied,
    by layout, with the same chains."""
    check_products(num_threads, rng, dtype, shape)


def check_products(num_threads, rng, dtype, shape):
    """The three products of `shape` (rows, K, N) against the float64 reference, then bitwise the
    same with 3 threads for every layout of each operand."""
    for name, call, operands, want in products(rng, dtype, *shape):
        num_threads(1)
        first = call(*operands)
        if name == "dW":
            want_dw, dw_bound, want_db, db_bound = want
            ref.assert_within(first[0], want_dw, dw_bound, "dw")
            ref.assert_within(first[1], want_db, db_bound, "db")
            first = np.concatenate([first[0].ravel(), first[1]])
        else:
            ref.assert_within(first, *want, name)
        num_threads(3)
        a_layouts, b_layouts = (layouts(rng, o) for o in operands)
        for i, j in itertools.chain(zip(range(4), range(4)), zip(range(4), [1, 2, 3, 0])):  # each B form, each A
            got = call(a_layouts[i], b_layouts[j])
            got = np.concatenate([got[0].ravel(), got[1]]) if name == "dW" else got
            strides = [a_layouts[i].strides, b_layouts[j].strides]
            assert got.tobytes() == first.tobytes(), f"{name}: other bytes with 3 threads, strides {strides}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_small_batch_fused_step(rng, num_threads, dtype, batch):
    """The fused step at a small batch: its forward product (with the loss in the epilogue) and dX
    run the small-M path; all of it matches the reference and is the same for any thread count."""
    n_in, n_out = 520, 1030  # K >= 8 batch^2 for the forward (520) and dX (1030): the small-M path
    x, w, b, t, _ = ref.arrays((batch, n_in, n_out), dtype, rng)
    num_threads(1)
    first = kernels.linear_mse(x, w, b, t)
    for got, (want, bound), name in zip(first, ref.linear_mse(x, w, b, t, "mean"), ["loss", "dx", "dw", "db"]):
        ref.assert_within(got, want, bound, name)
    for threads in (2, 3):
        num_threads(threads)
        again = kernels.linear_mse(x, np.asfortranarray(w), b, t)
        for a, c in zip(first, again):
            assert np.asarray(a).tobytes() == np.asarray(c).tobytes()


def test_small_m_nan_and_inf_propagate():
    """NaN and Inf in the weight reach exactly the outputs they feed, in both forms."""
    w = np.ones((70, 300), np.float32)
    w[3, 17] = np.nan
    w[5, 200] = np.inf
    x = np.ones((2, 300), np.float32)
    for weight in (w, np.asfortranarray(w)):
        y = kernels.linear_forward(x, weight)
        assert np.isnan(y[:, 3]).all() and np.isposinf(y[:, 5]).all()
        assert np.isfinite(np.delete(y, [3, 5], axis=1)).all()
    dy = np.ones((2, 70), np.float32)
    dx = kernels.linear_backward_input(dy, w)
    assert np.isnan(dx[:, 17]).all() and np.isposinf(dx[:, 200]).all()
