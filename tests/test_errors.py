"""Bad input raises TypeError or ValueError naming the argument: never a crash, copy or cast."""

import re

import numpy as np
import pytest

import lingrad
from lingrad import kernels
from lingrad import reference as ref

f32 = np.float32


def arrays(dtype=f32):
    """x, weight, bias and target of a layer of 3 inputs and 2 outputs, for a batch of 4."""
    return ref.arrays((4, 3, 2), dtype, 0)[:4]


def raises(exc, *words):
    """pytest.raises whose message must contain every word (argument names, shapes)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


# -- types and dtypes ------------------------------------------------------------------------


def test_not_an_array():
    x, w, b, t = arrays()
    with raises(TypeError, "x", "numpy.ndarray", "list"):
        kernels.linear_forward(x.tolist(), w)
    with raises(TypeError, "weight", "ndarray"):
        kernels.linear_backward_input(x[:, :2], "w")
    with raises(TypeError, "target"):
        kernels.linear_mse(x, w, b, None)


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex64, np.bool_, object])
def test_unsupported_dtype(dtype):
    x, w, _, _ = arrays()
    with raises(TypeError, "x", "float32, float64 or"):
        kernels.linear_forward(x.astype(dtype), w)


def test_non_native_byte_order():
    x, w, _, _ = arrays()
    with raises(TypeError, "weight", "byte order"):
        kernels.linear_forward(x, w.astype(w.dtype.newbyteorder()))


def test_mixed_dtypes():
    x, w, b, t = arrays()
    with raises(TypeError, "weight", "float64", "x", "float32"):
        kernels.linear_forward(x, w.astype(np.float64))
    with raises(TypeError, "bias", "float64"):
        kernels.linear_forward(x, w, b.astype(np.float64))
    with raises(TypeError, "target"):
        kernels.linear_mse(x, w, b, t.astype(np.float64))
    with raises(TypeError, "target"):
        kernels.mse_loss(t, t.astype(np.float64))


# -- ranks and shapes ------------------------------------------------------------------------


def test_wrong_rank():
    x, w, b, t = arrays()
    with raises(ValueError, "x", "2-D", "(3,)"):
        kernels.linear_forward(x[0], w)
    with raises(ValueError, "weight", "2-D", "(1, 2, 3)"):
        kernels.linear_forward(x, w[None])
    with raises(ValueError, "bias", "1-D", "(2, 1)"):
        kernels.linear_forward(x, w, b[:, None])
    with raises(ValueError, "grad_out", "2-D"):
        kernels.linear_backward_weight(t[0], x)
    with raises(ValueError, "pred", "2-D"):
        kernels.mse_loss(t[None], t[None])


def test_mismatched_shapes():
    x, w, b, t = arrays()
    with raises(ValueError, "weight", "(2, 3)", "x", "(4, 2)"):
        kernels.linear_forward(x[:, :2], w)
    with raises(ValueError, "weight", "grad_out"):
        kernels.linear_backward_input(t[:, :1], w)
    with raises(ValueError, "x", "(3, 3)", "grad_out", "(4, 2)"):
        kernels.linear_backward_weight(t, x[:3])
    with raises(ValueError, "target", "(4, 1)", "pred", "(4, 2)"):
        kernels.mse_loss(t, t[:, :1])
    with raises(ValueError, "target", "(3, 2)", "(4, 2)"):
        kernels.linear_mse(x, w, b, t[:3])


def test_bias_length():
    x, w, b, t = arrays()
    with raises(ValueError, "bias", "(3,)", "must be (2,)"):
        kernels.linear_forward(x, w, np.zeros(3, f32))
    with raises(ValueError, "bias", "(1,)"):
        kernels.linear_mse(x, w, b[:1], t)


# -- layout ----------------------------------------------------------------------------------


def test_misaligned_input():
    x, w, _, _ = arrays()
    raw = np.zeros(x.nbytes + 1, np.uint8)[1:]
    misaligned = raw.view(f32).reshape(x.shape)
    misaligned[...] = x
    with raises(ValueError, "x", "aligned"):
        kernels.linear_forward(misaligned, w)


def test_out_errors():
    x, w, b, t = arrays()
    with raises(ValueError, "out", "(3, 2)", "(4, 2)"):
        kernels.linear_forward(x, w, out=np.empty((3, 2), f32))
    with raises(ValueError, "out", "float64", "float32"):
        kernels.linear_forward(x, w, out=np.empty((4, 2), np.float64))
    with raises(ValueError, "out", "C-contiguous"):
        kernels.linear_forward(x, w, out=np.empty((2, 4), f32).T)
    read_only = np.empty((4, 2), f32)
    read_only.flags.writeable = False
    with raises(ValueError, "out", "read-only"):
        kernels.linear_forward(x, w, out=read_only)
    with raises(TypeError, "out", "ndarray"):
        kernels.linear_forward(x, w, out=[[0.0] * 2] * 4)
    with raises(ValueError, "bias_out", "(2,)"):
        kernels.linear_backward_weight(t, x, bias_out=np.empty(3, f32))
    with raises(ValueError, "bias_out", "bias=False"):
        kernels.linear_backward_weight(t, x, bias=False, bias_out=np.empty(2, f32))


def test_out_overlapping_an_input():
    rng = np.random.default_rng(1)
    square = rng.standard_normal((4, 4)).astype(f32)
    w = rng.standard_normal((4, 4)).astype(f32)
    with raises(ValueError, "out", "overlaps", "x"):
        kernels.linear_forward(square, w, out=square)
    with raises(ValueError, "out", "overlaps", "weight"):
        kernels.linear_backward_input(square, w, out=w)
    both = np.empty(4 * 4 + 4, f32)
    with raises(ValueError, "bias_out", "overlaps", "out"):
        kernels.linear_backward_weight(square, w, out=both[:16].reshape(4, 4), bias_out=both[12:16])
    with raises(ValueError, "out", "overlaps", "pred"):
        kernels.mse_backward(square, w, out=square)


# -- reductions and settings -----------------------------------------------------------------


def test_reduction():
    x, w, b, t = arrays()
    with raises(ValueError, "reduction", "'avg'"):
        kernels.mse_loss(t, t, "avg")
    with raises(ValueError, "reduction", "'none'"):
        kernels.linear_mse(x, w, b, t, "none")
    with raises(TypeError, "reduction", "str"):
        kernels.mse_backward(t, t, 1)


def test_settings():
    with raises(ValueError, "n", "0"):
        lingrad.set_num_threads(0)
    with raises(TypeError, "n", "int"):
        lingrad.set_num_threads(2.0)
    with raises(ValueError, "isa", "sse9"):
        lingrad.set_isa("sse9")


def test_failed_calls_leave_outputs_untouched():
    x, w, _, _ = arrays()
    y = np.full((4, 2), 7.0, f32)
    with pytest.raises(TypeError):
        kernels.linear_forward(x, w, np.zeros(2), out=y)
    assert np.all(y == 7.0)


# -- found by the fuzzing of issue 6 ---------------------------------------------------------


def test_misaligned_single_element_out():
    """A one-element out whose data is not aligned is rejected like any other misaligned out."""
    x, w, _, _ = arrays()
    out = np.zeros(16, np.uint8)[1:5].view(f32).reshape(1, 1)
    with raises(ValueError, "out", "aligned"):
        kernels.linear_forward(x[:1], w[:1], out=out)
    with raises(ValueError, "out", "aligned"):
        kernels.mse_backward(x[:1, :1], x[1:2, :1], out=out)


def test_masked_arrays_are_rejected():
    """A numpy.ma.MaskedArray would have its mask silently ignored: TypeError instead."""
    x, w, b, t = arrays()
    masked = np.ma.masked_array(x, mask=np.zeros_like(x, bool))
    with raises(TypeError, "x", "MaskedArray"):
        kernels.linear_forward(masked, w)
    with raises(TypeError, "target", "MaskedArray"):
        kernels.mse_loss(t, np.ma.masked_array(t))
    with raises(TypeError, "out", "MaskedArray"):
        kernels.linear_forward(x, w, out=np.ma.masked_array(np.empty((4, 2), f32)))


def test_memmap_is_read_as_an_array(tmp_path):
    """An ndarray subclass without hidden semantics, such as np.memmap, is an ordinary array."""
    x, w, b, _ = arrays()
    mapped = np.memmap(tmp_path / "x.bin", dtype=f32, mode="w+", shape=x.shape)
    mapped[...] = x
    np.testing.assert_array_equal(kernels.linear_forward(mapped, w, b), kernels.linear_forward(x, w, b))
    del mapped


def test_flags_are_booleans():
    """bias= of linear_backward_weight and input_grad= of linear_mse are switches: an array (as
    for linear_forward's bias) or a string is a TypeError naming the argument, not its truth value."""
    x, w, b, t = arrays()
    for bad in (b, b[:1], "yes", 1):
        with raises(TypeError, "bias", "True or False"):
            kernels.linear_backward_weight(t, x, bias=bad)
        with raises(TypeError, "input_grad", "True or False"):
            kernels.linear_mse(x, w, b, t, input_grad=bad)
    assert kernels.linear_backward_weight(t, x, bias=np.False_)[1] is None
    assert kernels.linear_backward_weight(t, x, bias=None)[1] is None
    assert kernels.linear_mse(x, w, b, t, input_grad=np.True_)[1].shape == x.shape
