"""Every kernel against the float64 reference, on every SIMD path, over many shapes (cases.KERNEL_SHAPES,
with what each one covers)."""

import numpy as np
import pytest

from lingrad import kernels
from lingrad import reference as ref

from cases import KERNEL_SHAPES, shape_id

DTYPES = [np.float32, np.float64]


def make(rng, dtype, *shapes):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_linear_forward(isa, rng, dtype, shape):
    batch, n_in, n_out = shape
    x, w, b = make(rng, dtype, (batch, n_in), (n_out, n_in), (n_out,))
    for bias in (b, None):
        y = kernels.linear_forward(x, w, bias)
        assert y.dtype == dtype and y.shape == (batch, n_out)
        want, bound = ref.linear_forward(x, w, bias)
        ref.assert_within(y, want, bound, "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_linear_backward_input(isa, rng, dtype, shape):
    batch, n_in, n_out = shape
    dy, w = make(rng, dtype, (batch, n_out), (n_out, n_in))
    dx = kernels.linear_backward_input(dy, w)
    assert dx.dtype == dtype and dx.shape == (batch, n_in)
    ref.assert_within(dx, *ref.linear_backward_input(dy, w), "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_linear_backward_weight(isa, rng, dtype, shape):
    batch, n_in, n_out = shape
    dy, x = make(rng, dtype, (batch, n_out), (batch, n_in))
    want_dw, dw_bound, want_db, db_bound = ref.linear_backward_weight(dy, x)
    dw, db = kernels.linear_backward_weight(dy, x)
    assert dw.dtype == dtype and dw.shape == (n_out, n_in) and db.shape == (n_out,)
    ref.assert_within(dw, want_dw, dw_bound, "dw")
    ref.assert_within(db, want_db, db_bound, "db")
    dw2, none = kernels.linear_backward_weight(dy, x, bias=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_linear_mse(isa, rng, dtype, shape, reduction):
    batch, n_in, n_out = shape
    x, w, b, t = make(rng, dtype, (batch, n_in), (n_out, n_in), (n_out,), (batch, n_out))
    for bias in (b, None):
        (loss_ref, dx_ref, dw_ref, db_ref) = ref.linear_mse(x, w, bias, t, reduction)
        loss, dx, dw, db = kernels.linear_mse(x, w, bias, t, reduction)
        assert isinstance(loss, float)
        ref.assert_within(loss, *loss_ref, "loss")
        ref.assert_within(dx, *dx_ref, "dx")
        ref.assert_within(dw, *dw_ref, "dw")
        if bias is None:
            assert db is None
        else:
            ref.assert_within(db, *db_ref, "db")
        # without the input gradient, the rest is bitwise the same
        loss2, dx2, dw2, db2 = kernels.linear_mse(x, w, bias, t, reduction, input_grad=False)
        assert dx2 is None and loss2 == loss or (np.isnan(loss2) and np.isnan(loss))
        np.testing.assert_array_equal(dw2, dw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 50), (300, 129), (0, 4), (5,)], ids=shape_id)
def test_mse(rng, dtype, shape, reduction):
    pred, target = make(rng, dtype, shape, shape)
    want, bound, want_grad, grad_bound = ref.mse(pred, target, reduction)
    loss = kernels.mse_loss(pred, target, reduction)
    if reduction == "none":
        assert loss.dtype == dtype and loss.shape == shape
    else:
        assert isinstance(loss, float)
    ref.assert_within(loss, want, bound, "loss")
    grad = kernels.mse_backward(pred, target, reduction)
    assert grad.dtype == dtype and grad.shape == shape
    ref.assert_within(grad, want_grad, grad_bound, "grad")


def test_fused_step_matches_separate_kernels(rng):
    """linear_mse equals forward -> mse_backward -> backward kernels, to rounding."""
    x, w, b, t = make(rng, np.float64, (37, 29), (11, 29), (11,), (37, 11))
    loss, dx, dw, db = kernels.linear_mse(x, w, b, t)
    y = kernels.linear_forward(x, w, b)
    dy = kernels.mse_backward(y, t)
    np.testing.assert_allclose(loss, kernels.mse_loss(y, t), rtol=1e-13)
    np.testing.assert_allclose(dx, kernels.linear_backward_input(dy, w), rtol=1e-12, atol=1e-15)
    dw2, db2 = kernels.linear_backward_weight(dy, x)
    np.testing.assert_allclose(dw, dw2, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(db, db2, rtol=1e-12, atol=1e-15)


def test_single_neuron_example():
    """The README's example, exactly: prediction 2.5, loss 6.25, dW = [-5, -10, -15], db = -5."""
    x = np.array([[1.0, 2.0, 3.0]])
    t = np.array([[5.0]])
    w = np.array([[0.5, 0.5, 0.5]])
    b = np.array([-0.5])
    assert kernels.linear_forward(x, w, b).tolist() == [[2.5]]
    loss, dx, dw, db = kernels.linear_mse(x, w, b, t)
    assert loss == 6.25
    assert dw.tolist() == [[-5.0, -10.0, -15.0]]
    assert db.tolist() == [-5.0]
    assert dx.tolist() == [[-2.5, -2.5, -2.5]]


def test_weight_gradient_is_sum_of_outer_products(rng, isa):
    """dW[o, i] = sum_b dY[b, o] X[b, i]: one outer product per sample, summed (NumPy broadcasting)."""
    dy, x = make(rng, np.float64, (9, 4), (9, 6))
    outer_products = dy[:, :, None] * x[:, None, :]  # (batch, out, in): fine at this size only
    dw, db = kernels.linear_backward_weight(dy, x)
    np.testing.assert_allclose(dw, outer_products.sum(axis=0), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(db, dy.sum(axis=0), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_input_columns_get_exactly_zero_gradient(rng, isa, dtype):
    """Pixels that are black in every image get exactly zero weight gradient."""
    x, w, b, t = make(rng, dtype, (300, 40), (7, 40), (7,), (300, 7))
    dead = [0, 1, 17, 39]
    x[:, dead] = 0
    _, _, dw, _ = kernels.linear_mse(x, w, b, t)
    assert np.all(dw[:, dead] == 0)
    assert np.all(dw[:, [2, 3]] != 0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_tall_skinny(rng, dtype):
    """A whole dataset in one batch: B = 60000, out = 1 and 50."""
    for n_out in (1, 50):
        x, w, b, t = make(rng, dtype, (60000, 33), (n_out, 33), (n_out,), (60000, n_out))
        (loss_ref, dx_ref, dw_ref, db_ref) = ref.linear_mse(x, w, b, t)
        loss, dx, dw, db = kernels.linear_mse(x, w, b, t)
        ref.assert_within(loss, *loss_ref, "loss")
        ref.assert_within(dx, *dx_ref, "dx")
        ref.assert_within(dw, *dw_ref, "dw")
        ref.assert_within(db, *db_ref, "db")


def test_strided_inputs_are_read_in_place(rng, isa):
    """Transposed, sliced, negative-step and broadcast views give the same answer as copies."""
    base = rng.standard_normal((40, 30))
    views = {
        "transposed": base.T[:25, :17],  # column-major
        "sliced": base[::3, 1::2][:, :13][:7],  # row and column steps
        "negative": base[::-2, ::-1][:9, :11],  # negative strides
        "broadcast": np.broadcast_to(base[0], (6, 30)),  # zero row stride
    }
    for name, x in views.items():
        w = rng.standard_normal((5, x.shape[1]))
        b = rng.standard_normal(5)[::-1]
        t = rng.standard_normal((x.shape[0], 5))
        dense = np.ascontiguousarray(x)
        np.testing.assert_array_equal(
            kernels.linear_forward(x, w, b), kernels.linear_forward(dense, w, b), err_msg=name
        )
        np.testing.assert_array_equal(
            kernels.linear_forward(x.T.T, w.T.copy().T, b), kernels.linear_forward(dense, w, b)
        )
        for got, want in zip(kernels.linear_mse(x, w, b, t), kernels.linear_mse(dense, w, b.copy(), t)):
            np.testing.assert_array_equal(got, want, err_msg=name)
        dy = rng.standard_normal((x.shape[0], 5)).T.copy().T  # column-major gradient
        for got, want in zip(
            kernels.linear_backward_weight(dy, x), kernels.linear_backward_weight(np.ascontiguousarray(dy), dense)
        ):
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_out_arguments_are_filled_and_returned(rng):
    x, w, b = make(rng, np.float32, (8, 5), (3, 5), (3,))
    y = np.empty((8, 3), np.float32)
    assert kernels.linear_forward(x, w, b, out=y) is y
    np.testing.assert_array_equal(y, kernels.linear_forward(x, w, b))
    dy = make(rng, np.float32, (8, 3))[0]
    dx = np.full((8, 5), np.nan, np.float32)
    assert kernels.linear_backward_input(dy, w, out=dx) is dx
    np.testing.assert_array_equal(dx, kernels.linear_backward_input(dy, w))
    dw, db = np.full((3, 5), np.nan, np.float32), np.full(3, np.nan, np.float32)
    got_dw, got_db = kernels.linear_backward_weight(dy, x, out=dw, bias_out=db)
    assert got_dw is dw and got_db is db
    np.testing.assert_array_equal(dw, kernels.linear_backward_weight(dy, x)[0])
    grad = np.empty((8, 3), np.float32)
    assert kernels.mse_backward(y, dy, out=grad) is grad


def test_empty_batch(rng):
    x, w, b, t = make(rng, np.float32, (0, 4), (3, 4), (3,), (0, 3))
    assert kernels.linear_forward(x, w, b).shape == (0, 3)
    loss, dx, dw, db = kernels.linear_mse(x, w, b, t)
    assert np.isnan(loss)  # the mean of nothing, as in torch
    assert kernels.linear_mse(x, w, b, t, "sum")[0] == 0.0
    assert dx.shape == (0, 4)
    assert np.all(dw == 0) and dw.shape == (3, 4) and np.all(db == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(rng, isa, dtype):
    x, w, b, t = make(rng, dtype, (20, 9), (4, 9), (4,), (20, 4))
    x[3, 2] = np.nan
    x[5, 1] = np.inf
    y = kernels.linear_forward(x, w, b)
    assert np.all(np.isnan(y[3])) and np.all(~np.isfinite(y[5]))
    assert np.all(np.isfinite(np.delete(y, [3, 5], axis=0)))
    loss, dx, dw, db = kernels.linear_mse(x, w, b, t)
    assert np.isnan(loss)
    assert np.all(np.isnan(db))


def test_length_one_dimensions_ignore_their_strides(rng):
    """NumPy may leave any stride on a dimension of length 1 (it is never used): such arrays are
    valid, even when that stride is not a multiple of the element size."""
    x, w, b, _, dy = ref.arrays((1, 5, 3), np.float32, rng)
    odd_x = np.lib.stride_tricks.as_strided(x, shape=(1, 5), strides=(3, 4))
    odd_b = np.lib.stride_tricks.as_strided(b[:1], shape=(1,), strides=(7,))
    assert odd_x.flags.c_contiguous
    np.testing.assert_array_equal(kernels.linear_forward(odd_x, w, b), kernels.linear_forward(x, w, b))
    np.testing.assert_array_equal(kernels.linear_forward(odd_x, w[:1], odd_b), kernels.linear_forward(x, w[:1], b[:1]))
    odd_dy = np.lib.stride_tricks.as_strided(dy, shape=(1, 3), strides=(1, 4))
    for got, want in zip(kernels.linear_backward_weight(odd_dy, odd_x), kernels.linear_backward_weight(dy, x)):
        np.testing.assert_array_equal(got, want)
    assert kernels.mse_loss(odd_x, odd_x) == 0.0
