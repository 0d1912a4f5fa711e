"""lingrad's PyTorch layer: autograd Functions, functional, modules, operators, compile, DDP.

References are PyTorch's own nn.Linear and F.mse_loss in float64. A float32 (or float64) result
is compared element by element with a bound that follows the rounding of each reduction: a dot
product of length K is off by at most about K * eps * (|a| . |b|). A wrong answer (a missing,
doubled or misplaced term) is far above such a bound.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import lingrad  # noqa: E402
from lingrad import functional as LF  # noqa: E402
from lingrad import kernels  # noqa: E402
from lingrad.autograd import LinearFunction, LinearMSEFunction, MSELossFunction  # noqa: E402
from lingrad.torch import _bridge, ops_linear, ops_mse  # noqa: E402

FLOATS = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(20261122)


# ---------------------------------------------------------------------------------------------
# Float64 references with error bounds


def eps(dtype) -> float:
    # eps = 2u; the factor 2 also covers the float64 reference's own rounding for float64 results.
    return torch.finfo(dtype).eps


def f64(t):
    return None if t is None else t.detach().double()


def check(got, ref, bound, dtype, what):
    """got (of dtype) against the float64 ref, elementwise within bound (NaN only where ref is NaN)."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    err = (got.detach().double() - ref).abs()
    ok = (err <= bound) | (got.isnan() & ref.isnan())
    assert bool(ok.all()), f"{what}: error {err[~ok].max().item():.3g} above its bound {bound[~ok].min().item():.3g}"


def rows(t):
    """(*, n) as (rows, n), like the kernels see it."""
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def linear_bounds(x, w, b, grad_y, dtype):
    """Bounds on y, grad_x, grad_w, grad_b of y = x w^T + b backpropagating grad_y (exact)."""
    e = eps(dtype)
    ax, aw, ag = f64(x).abs(), f64(w).abs(), f64(grad_y).abs()
    y = (x.shape[-1] + 2) * e * F.linear(ax, aw, None if b is None else f64(b).abs())
    gx = (w.shape[0] + 1) * e * (ag @ aw)
    n = rows(ax).shape[0]
    gw = (n + 1) * e * (rows(ag).T @ rows(ax))
    gb = (n + 1) * e * rows(ag).sum(0)
    return y, gx, gw, gb


def linear_mse_bounds(x, w, b, t, reduction, dtype):
    """Bounds on the loss and on the gradients of mse(x w^T + b, t) ("y" is dY = -grad_target):
    the rounding of y propagates into the residual r = y - t, into dY = 2 r / N and every gradient."""
    e = eps(dtype)
    x2, t2 = rows(f64(x)), rows(f64(t))
    w64, b64 = f64(w), f64(b)
    y = F.linear(x2, w64, b64)
    r = y - t2
    n = r.numel() if reduction == "mean" else 1
    er = (x2.shape[1] + 2) * e * F.linear(x2.abs(), w64.abs(), None if b64 is None else b64.abs()) + e * r.abs()
    loss = ((2 * r.abs() + er) * er).sum() / max(n, 1) + (r.numel() + 2) * e * (r * r).sum() / max(n, 1)
    dy = 2 * r.abs() / max(n, 1)
    edy = 2 * er / max(n, 1) + e * dy
    gx = edy @ w64.abs() + (w.shape[0] + 1) * e * (dy @ w64.abs())
    gw = edy.T @ x2.abs() + (x2.shape[0] + 1) * e * (dy.T @ x2.abs())
    gb = edy.sum(0) + (x2.shape[0] + 1) * e * dy.sum(0)
    return {"loss": loss, "y": edy.reshape(t.shape), "x": gx.reshape(x.shape), "w": gw, "b": gb}


def reference_layer(layer, bias=True):
    """torch.nn.Linear in float64 with layer's parameters."""
    ref = torch.nn.Linear(layer.in_features, layer.out_features, bias=bias, dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    return ref


# ---------------------------------------------------------------------------------------------
# Parity with nn.Linear and F.mse_loss: forward and every gradient, float32 and float64

INPUTS = {  # input tensors with in_features = 5
    "2-D": lambda dt: torch.randn(7, 5, dtype=dt),
    "leading dims": lambda dt: torch.randn(2, 3, 5, dtype=dt),
    "1-D": lambda dt: torch.randn(5, dtype=dt),
    "empty batch": lambda dt: torch.randn(0, 5, dtype=dt),
    "empty leading dim": lambda dt: torch.randn(2, 0, 5, dtype=dt),
    "transposed": lambda dt: torch.randn(5, 7, dtype=dt).t(),
    "sliced": lambda dt: torch.randn(9, 12, dtype=dt)[::2, 3:8],
    "unmergeable leading dims": lambda dt: torch.randn(3, 2, 5, dtype=dt).transpose(0, 1),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("case", INPUTS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_linear_matches_nn_linear(dtype, case, bias):
    layer = lingrad.Linear(5, 3, bias=bias, dtype=dtype)
    ref = reference_layer(layer, bias)
    x = INPUTS[case](dtype).requires_grad_()
    x64 = f64(x).requires_grad_()
    y, y64 = layer(x), ref(x64)
    grad_y = torch.randn(y64.shape, dtype=dtype)
    y.backward(grad_y)
    y64.backward(f64(grad_y))
    by, bx, bw, bb = linear_bounds(x, layer.weight, layer.bias, grad_y, dtype)
    check(y, y64, by, dtype, "y")
    check(x.grad, x64.grad, bx, dtype, "grad_x")
    check(layer.weight.grad, ref.weight.grad, bw, dtype, "grad_weight")
    if bias:
        check(layer.bias.grad, ref.bias.grad, bb, dtype, "grad_bias")


MSE_SHAPES = {"2-D": (7, 3), "1-D": (7,), "3-D": (2, 3, 4), "0-D": (), "empty": (0, 3)}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", MSE_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_mse_loss_matches_torch(dtype, shape, reduction):
    pred = torch.randn(MSE_SHAPES[shape], dtype=dtype, requires_grad=True)
    target = torch.randn(MSE_SHAPES[shape], dtype=dtype, requires_grad=True)
    p64, t64 = f64(pred).requires_grad_(), f64(target).requires_grad_()
    loss, loss64 = LF.mse_loss(pred, target, reduction), F.mse_loss(p64, t64, reduction=reduction)
    grad = torch.rand(loss64.shape, dtype=dtype) + 0.5
    loss.backward(grad)
    loss64.backward(f64(grad))
    e = eps(dtype)
    r = f64(pred) - f64(target)
    count = max(r.numel(), 1) if reduction == "mean" else 1
    loss_bound = 3 * e * r * r if reduction == "none" else (r.numel() + 3) * e * (r * r).sum() / count
    check(loss, loss64, loss_bound, dtype, "loss")
    grad_bound = 4 * e * (f64(grad) * 2 * r / count).abs()
    check(pred.grad, p64.grad, grad_bound, dtype, "grad_input")
    check(target.grad, t64.grad, grad_bound, dtype, "grad_target")


FUSED_INPUTS = {  # (input, target) pairs, in_features 5, out_features 3
    "2-D": lambda dt: (torch.randn(7, 5, dtype=dt), torch.randn(7, 3, dtype=dt)),
    "leading dims": lambda dt: (torch.randn(2, 3, 5, dtype=dt), torch.randn(2, 3, 3, dtype=dt)),
    "1-D": lambda dt: (torch.randn(5, dtype=dt), torch.randn(3, dtype=dt)),
    "empty batch": lambda dt: (torch.randn(0, 5, dtype=dt), torch.randn(0, 3, dtype=dt)),
    "transposed": lambda dt: (torch.randn(5, 7, dtype=dt).t(), torch.randn(3, 7, dtype=dt).t()),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", FUSED_INPUTS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_linear_mse_loss_matches_torch(dtype, case, reduction, bias):
    block = lingrad.LinearMSELoss(5, 3, bias=bias, reduction=reduction, dtype=dtype)
    ref = reference_layer(block, bias)
    x, target = FUSED_INPUTS[case](dtype)
    x.requires_grad_()
    x64 = f64(x).requires_grad_()
    loss = block(x, target)
    loss64 = F.mse_loss(ref(x64), f64(target), reduction=reduction)
    loss.backward()
    loss64.backward()
    bound = linear_mse_bounds(x, block.weight, block.bias, target, reduction, dtype)
    check(loss, loss64, bound["loss"], dtype, "loss")
    check(x.grad, x64.grad, bound["x"], dtype, "grad_x")
    check(block.weight.grad, ref.weight.grad, bound["w"], dtype, "grad_weight")
    if bias:
        check(block.bias.grad, ref.bias.grad, bound["b"], dtype, "grad_bias")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_mse_loss_gradient_of_target_and_scaled_loss(reduction):
    # A target that requires grad (the unfused path) and a loss scaled before backward.
    x, w, b = torch.randn(6, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True), torch.randn(2)
    t = torch.randn(6, 2, requires_grad=True)
    (3 * LF.linear_mse_loss(x, w, b, t, reduction)).backward()
    x64, w64, t64 = (f64(a).requires_grad_() for a in (x, w, t))
    (3 * F.mse_loss(F.linear(x64, w64, f64(b)), t64, reduction=reduction)).backward()
    bound = {k: 3 * v for k, v in linear_mse_bounds(x, w, b, t, reduction, torch.float32).items()}
    check(x.grad, x64.grad, bound["x"], torch.float32, "grad_x")
    check(w.grad, w64.grad, bound["w"], torch.float32, "grad_weight")
    check(t.grad, t64.grad, bound["y"], torch.float32, "grad_target")


# ---------------------------------------------------------------------------------------------
# gradcheck (float64) of every Function and reduction, gradgradcheck, opcheck


def rand64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_linear_function_gradcheck_and_gradgradcheck(bias):
    args = (rand64(4, 3), rand64(5, 3), rand64(5) if bias else None)
    assert torch.autograd.gradcheck(LinearFunction.apply, args)
    assert torch.autograd.gradgradcheck(LinearFunction.apply, args)


def test_functional_linear_gradgradcheck_with_leading_dims():
    args = (rand64(2, 3, 4), rand64(5, 4), rand64(5))
    assert torch.autograd.gradgradcheck(LF.linear, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_function_gradcheck(reduction):
    args = (rand64(4, 3), rand64(4, 3))
    assert torch.autograd.gradcheck(lambda p, t: MSELossFunction.apply(p, t, reduction), args)
    assert torch.autograd.gradgradcheck(lambda p, t: MSELossFunction.apply(p, t, reduction), args)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_double_backward_with_a_unit_gradient_that_requires_grad(reduction):
    # loss.backward()'s unit gradient is special-cased; when it requires grad it must stay in the graph.
    grads = []
    for mse, linear in ((LF.mse_loss, LF.linear), (F.mse_loss, F.linear)):
        torch.manual_seed(0)
        x, w, t = rand64(4, 3), rand64(2, 3), torch.randn(4, 2, dtype=torch.float64)
        unit = torch.ones((), dtype=torch.float64, requires_grad=True)
        (gw,) = torch.autograd.grad(mse(linear(x, w), t, reduction=reduction), w, unit, create_graph=True)
        (gw * gw).sum().backward()
        grads.append((unit.grad, x.grad, w.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_mse_function_gradcheck(reduction):
    x, w, b, t = rand64(4, 3), rand64(2, 3), rand64(2), rand64(4, 2)
    fused = lambda *a: LinearMSEFunction.apply(*a, reduction, True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fused, (x, w, b, t.detach()))  # the fused path
    assert torch.autograd.gradcheck(fused, (x, w, None, t))  # target gradient: the unfused path
    # create_graph=True recomputes differentiable gradients: second derivatives are right too.
    assert torch.autograd.gradgradcheck(fused, (x, w, b, t.detach()))


# torch 2.14's opcheck reads .grad of the non-leaf tensors it makes for its AOT dispatch test, and
# PyTorch warns about that (it does so for torch.ops.aten.mm too); the warning is not lingrad's.
@pytest.mark.filterwarnings(r"ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
def test_opcheck_every_operator():
    x, w, b = torch.randn(5, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True), torch.randn(4)
    grad_y = torch.randn(5, 4, requires_grad=True)
    cases = [
        (ops_linear.linear, (torch.randn(3, 5).t().requires_grad_(), w, b.requires_grad_())),
        (ops_linear.linear_backward_input, (grad_y, w)),
        (ops_linear.linear_backward_weight, (grad_y, x, True)),
        (ops_linear.linear_backward_weight, (grad_y, x, False)),
        (ops_mse.mse_loss, (x, torch.randn(5, 3), "mean")),
        (ops_mse.mse_loss, (x, torch.randn(5, 3, requires_grad=True), "none")),
        (ops_mse.mse_backward, (x, torch.randn(5, 3), "mean")),
        (ops_mse.linear_mse, (x, w, b, torch.randn(5, 4), "sum", True)),
        (ops_mse.linear_mse, (x, w, None, torch.randn(5, 4), "mean", False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.overload, args)  # schema, autograd registration, fake tensor, AOT dispatch


# ---------------------------------------------------------------------------------------------
# Backward computes only what needs_input_grad asks for; inputs are read in place


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records (name, args, kwargs) of every call into lingrad.kernels."""
    calls = []

    def spy(name, kernel):
        def recorded(*args, **kwargs):
            calls.append((name, args, kwargs))
            return kernel(*args, **kwargs)

        return recorded

    for name in kernels.__all__:
        monkeypatch.setattr(kernels, name, spy(name, getattr(kernels, name)))
    return calls


@pytest.mark.parametrize(
    "needs, expected",
    [
        ((True, False, False), ["linear_forward", "linear_backward_input"]),
        ((False, True, False), ["linear_forward", "linear_backward_weight"]),
        ((False, False, True), ["linear_forward"]),  # a bias alone: column sums, no GEMM
        ((True, True, True), ["linear_forward", "linear_backward_input", "linear_backward_weight"]),
    ],
)
def test_linear_backward_computes_only_what_is_needed(kernel_calls, needs, expected):
    x, w, b = (t.requires_grad_(n) for t, n in zip((torch.randn(4, 3), torch.randn(2, 3), torch.randn(2)), needs))
    LF.linear(x, w, b).sum().backward()
    assert [name for name, _, _ in kernel_calls] == expected
    if needs[1]:
        assert kernel_calls[-1][2]["bias"] is needs[2]


def test_fused_step_is_one_kernel_call(kernel_calls):
    x, t = torch.randn(4, 3), torch.randn(4, 2)
    block = lingrad.LinearMSELoss(3, 2)
    block(x, t).backward()  # x needs no gradient
    assert [(name, kw["input_grad"]) for name, _, kw in kernel_calls] == [("linear_mse", False)]
    kernel_calls.clear()
    block(x.requires_grad_(), t).backward()
    assert [(name, kw["input_grad"]) for name, _, kw in kernel_calls] == [("linear_mse", True)]
    kernel_calls.clear()
    with torch.no_grad():  # nothing to differentiate: the forward GEMM and the loss only
        block(x, t)
    assert [name for name, _, _ in kernel_calls] == ["linear_forward", "mse_loss"]


def test_inference_mode_and_no_grad(kernel_calls):
    layer, block = lingrad.Linear(3, 2), lingrad.LinearMSELoss(3, 2)
    x, t = torch.randn(4, 3), torch.randn(4, 2)
    expected = F.mse_loss(F.linear(x, block.weight, block.bias), t)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            assert layer(x).shape == (4, 2)
            torch.testing.assert_close(block(x, t), expected)
    assert "linear_mse" not in [name for name, _, _ in kernel_calls]  # no gradients computed


HANDOVERS = ["capsule"] + (["exchange"] if _bridge.EXCHANGE else [])


@pytest.mark.parametrize("handover", HANDOVERS)
def test_non_contiguous_input_is_read_in_place(monkeypatch, handover):
    """Both ways of handing tensors to the kernels (DLPack capsules; the tensors themselves, read
    through DLPack's C exchange API, on torch >= 2.10) pass views, never contiguous copies, and the
    kernel writes the result in place."""
    monkeypatch.setattr(_bridge, "EXCHANGE", handover == "exchange")
    exported = []
    if handover == "capsule":
        to_dlpack = _bridge.to_dlpack
        monkeypatch.setattr(_bridge, "to_dlpack", lambda t: exported.append(t) or to_dlpack(t))
    else:
        forward = kernels.linear_forward
        monkeypatch.setattr(
            kernels, "linear_forward", lambda *a, **k: exported.extend([*a, *k.values()]) or forward(*a, **k)
        )
    base = torch.randn(5, 7)
    x = base.t()  # (7, 5), strides (1, 7)
    w = torch.randn(3, 5)
    y = LF.linear(x, w)
    assert any(t is x for t in exported)  # the view itself goes to the kernel, no contiguous copy
    assert any(t is y for t in exported)  # and the kernel writes the result in place
    torch.testing.assert_close(y, x @ w.t())


@pytest.mark.skipif(not _bridge.EXCHANGE, reason="torch < 2.10 has no DLPack C exchange API")
def test_kernels_read_exchange_tensors_as_views():
    """Tensors whose type publishes DLPack's C exchange API are read in place by the kernels, as
    arrays with the tensor's strides, an out tensor filled in place (and returned); the storage stays
    resizable. A negative view (PyTorch's neg bit, which DLPack does not carry) is read as its values;
    an out tensor cannot be one."""
    base, w = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    y = torch.empty(7, 3, dtype=torch.float64)
    out = kernels.linear_forward(base.t(), torch.nn.Parameter(w), out=y)
    assert out is y
    negative = torch._neg_view(base.t())
    assert negative.is_neg()
    read = torch.from_numpy(kernels.linear_forward(negative, w))  # (a new result is a NumPy array)
    torch.testing.assert_close(read, -(base.t() @ w.t()), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="out is a negative view"):
        kernels.linear_forward(base.t(), w, out=torch._neg_view(torch.empty(7, 3, dtype=torch.float64)))
    expected = base.t() @ w.t()
    base.resize_(10, 10)  # still resizable
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="x has dtype int64; lingrad computes in float32, float64 or"):
        kernels.linear_forward(torch.ones(2, 3, dtype=torch.int64), w)
    with pytest.raises(ValueError, match="out has shape"):
        kernels.linear_forward(base[:7, :5], w, out=torch.empty(7, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError):  # no data to view: the layer's fallback takes it from here
        kernels.linear_forward(torch.empty(7, 5, dtype=torch.float64, device="meta"), w)


def test_kernels_read_dlpack_capsules_as_views():
    """The bridge of the PyTorch layer: DLPack capsules are views with the tensor's strides, and an
    out capsule is filled in place; the tensors' storage stays resizable (Tensor.numpy() would not)."""
    from torch.utils.dlpack import to_dlpack

    base, w = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    y = torch.empty(7, 3, dtype=torch.float64)
    out = kernels.linear_forward(to_dlpack(base.t()), to_dlpack(w), out=to_dlpack(y))
    assert out.ctypes.data == y.data_ptr()
    expected = base.t() @ w.t()
    base.resize_(10, 10)  # still resizable
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="x has dtype int64; lingrad computes in float32, float64 or"):
        kernels.linear_forward(to_dlpack(torch.ones(2, 3, dtype=torch.int64)), w.numpy())
    with pytest.raises(TypeError, match="weight has dtype float64 but x has dtype bfloat16"):
        kernels.linear_forward(to_dlpack(torch.ones(2, 3, dtype=torch.bfloat16)), w.numpy())


# ---------------------------------------------------------------------------------------------
# Modules: drop-in, state_dict, swap_linear, accumulation


@pytest.mark.parametrize("bias", [True, False])
def test_linear_module_is_nn_linear_in_every_visible_way(bias):
    torch.manual_seed(0)
    ours = lingrad.Linear(5, 3, bias=bias, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.nn.Linear(5, 3, bias=bias, dtype=torch.float64)
    assert isinstance(ours, torch.nn.Linear)
    assert repr(ours) == repr(theirs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)  # same initialisation, same random draws


def test_linear_mse_loss_module_parameters_and_repr():
    torch.manual_seed(0)
    block = lingrad.LinearMSELoss(5, 3, reduction="sum")
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    assert repr(block) == "LinearMSELoss(in_features=5, out_features=3, bias=True, reduction='sum')"
    assert block.state_dict().keys() == layer.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(block.state_dict().values(), layer.state_dict().values()))
    assert lingrad.LinearMSELoss(5, 3, bias=False).bias is None
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        lingrad.LinearMSELoss(5, 3, reduction="none")


def test_state_dict_both_ways():
    theirs, ours, block = torch.nn.Linear(4, 2), lingrad.Linear(4, 2), lingrad.LinearMSELoss(4, 2)
    ours.load_state_dict(theirs.state_dict())
    block.load_state_dict(ours.state_dict())
    fresh = torch.nn.Linear(4, 2)
    fresh.load_state_dict(block.state_dict())
    for module in (ours, block, fresh):
        assert torch.equal(module.weight, theirs.weight) and torch.equal(module.bias, theirs.bias)


def mlp(*sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    return torch.nn.Sequential(*layers)


def test_swap_linear_keeps_parameters_and_optimizer():
    model = mlp(6, 8, 8, 2)
    reference = mlp(6, 8, 8, 2)
    reference.load_state_dict(model.state_dict())
    params_before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    hook_calls = []
    model[0].register_forward_hook(lambda *_: hook_calls.append(1))

    assert lingrad.swap_linear(model) is model
    assert [type(m) for m in model] == [lingrad.Linear, torch.nn.ReLU, lingrad.Linear, torch.nn.ReLU, lingrad.Linear]
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    x, t = torch.randn(10, 6), torch.randn(10, 2)
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, ref_optimizer)):
            opt.zero_grad()
            F.mse_loss(net(x), t).backward()
            opt.step()
    assert hook_calls == [1, 1, 1]
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)  # float32 defaults: a few steps of 8-wide layers


def test_swap_linear_leaves_subclasses_and_other_modules_alone():
    class MyLinear(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(MyLinear(3, 3), torch.nn.Linear(3, 3), torch.nn.MultiheadAttention(3, 1))
    lingrad.swap_linear(model)
    assert type(model[0]) is MyLinear and type(model[1]) is lingrad.Linear
    assert type(model[2].out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got list"):
        lingrad.swap_linear([torch.nn.Linear(2, 2)])


def test_gradients_accumulate_over_two_backward_calls():
    ours, block = lingrad.Linear(4, 3), lingrad.LinearMSELoss(4, 3)
    theirs = torch.nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    block.load_state_dict(ours.state_dict())
    batches = [(torch.randn(5, 4), torch.randn(5, 3)) for _ in range(2)]
    for x, t in batches:
        F.mse_loss(ours(x), t).backward()
        F.mse_loss(theirs(x), t).backward()
        block(x, t).backward()
    for module in (ours, block):
        torch.testing.assert_close(module.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(module.bias.grad, theirs.bias.grad)


def test_fused_backward_twice_with_retain_graph():
    # The saved gradients are scaled into new tensors, never handed out: a second backward
    # through the same graph adds the same gradient again.
    block = lingrad.LinearMSELoss(4, 3)
    loss = block(torch.randn(5, 4), torch.randn(5, 3))
    loss.backward(retain_graph=True)
    once = block.weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(block.weight.grad, 2 * once)


def test_training_parity_784_50_relu_1():
    # The same initial weights and batches, 20 SGD steps: nn.Linear, lingrad.Linear, and
    # lingrad.Linear with the fused LinearMSELoss as the last layer and loss.
    torch.manual_seed(0)
    reference = mlp(784, 50, 1)
    swapped = lingrad.swap_linear(mlp(784, 50, 1))
    swapped.load_state_dict(reference.state_dict())
    body, head = lingrad.swap_linear(mlp(784, 50)), lingrad.LinearMSELoss(50, 1)
    body.load_state_dict(reference[:1].state_dict())
    head.load_state_dict(reference[2].state_dict())
    fused = torch.nn.ModuleList([body, torch.nn.ReLU(), head])
    nets = {
        "nn.Linear": (lambda x, t: F.mse_loss(reference(x), t), reference),
        "lingrad.Linear": (lambda x, t: LF.mse_loss(swapped(x), t), swapped),
        "fused": (lambda x, t: head(torch.relu(body(x)), t), fused),
    }
    optimizers = {name: torch.optim.SGD(net.parameters(), lr=0.01) for name, (_, net) in nets.items()}
    losses = {name: [] for name in nets}
    for _ in range(20):
        x, t = torch.rand(32, 784), torch.randn(32, 1)
        for name, (step, _) in nets.items():
            optimizers[name].zero_grad()
            loss = step(x, t)
            loss.backward()
            optimizers[name].step()
            losses[name].append(loss.item())
    # float32 rounding, reductions of length 784 + 50 + 32 per step: relative 1e-4 is ~1000 eps.
    expected = np.array(losses["nn.Linear"])
    assert expected[-1] < expected[0]  # it trained
    for name in ("lingrad.Linear", "fused"):
        np.testing.assert_allclose(losses[name], expected, rtol=1e-4, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Fallback to PyTorch, errors


@pytest.fixture
def fresh_fallback_warning(monkeypatch):
    """Forget that the once-per-process FallbackWarning was shown."""
    monkeypatch.setattr(_bridge, "fallback_warned", False)


def test_float16_falls_back_with_one_warning_and_bfloat16_mse_is_pytorchs(fresh_fallback_warning):
    layer = lingrad.Linear(4, 3, dtype=torch.float16)
    reference = torch.nn.Linear(4, 3, dtype=torch.float16)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(5, 4, dtype=torch.float16)
    with pytest.warns(LF.FallbackWarning, match=r"torch.float16 on cpu.*once per process"):
        y = layer(x)
    assert torch.equal(y, reference(x))  # PyTorch's own implementation, bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        p, t = torch.randn(6, dtype=torch.bfloat16), torch.randn(6, dtype=torch.bfloat16)
        assert torch.equal(LF.mse_loss(p, t), F.mse_loss(p, t))
        block = lingrad.LinearMSELoss(4, 3, dtype=torch.float16)
        loss = block(x, torch.randn(5, 3, dtype=torch.float16))
        assert loss.dtype == torch.float16


def test_another_device_falls_back(fresh_fallback_warning):
    layer = lingrad.Linear(4, 3, device="meta")
    with pytest.warns(LF.FallbackWarning, match="on meta"):
        y = layer(torch.empty(2, 5, 4, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 5, 3)


def test_integer_inputs_fail_as_in_pytorch():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FallbackWarning for integers
        x = torch.ones(2, 4, dtype=torch.int64)
        with pytest.raises(RuntimeError, match="same dtype"):
            torch.nn.Linear(4, 3)(x)
        with pytest.raises(RuntimeError, match="same dtype"):
            lingrad.Linear(4, 3)(x)
        w = torch.ones(3, 4, dtype=torch.int64)
        assert torch.equal(LF.linear(x, w), F.linear(x, w))


def test_bad_input_raises_errors_naming_arguments_and_shapes():
    x, w = torch.randn(2, 5), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 4\) but x has shape \(2, 5\)"):
        LF.linear(x, w)
    with pytest.raises(TypeError, match="weight has dtype float64 but x has dtype float32"):
        LF.linear(x, torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias has shape \(4,\)"):
        LF.linear(x, torch.randn(3, 5), torch.randn(4))
    with pytest.raises(ValueError, match="0-d"):
        LF.linear(torch.tensor(1.0), w)
    for mse in (LF.mse_loss, F.mse_loss):  # shapes that do not broadcast: PyTorch's warning and error
        with pytest.warns(UserWarning, match=r"target size \(torch.Size\(\[2, 4\]\)\)"), pytest.raises(RuntimeError):
            mse(x, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"reduction must be 'mean' or 'sum'.*'max'"):
        LF.mse_loss(x, x, "max")
    with pytest.raises(ValueError, match=r"target has shape \(2, 4\) but must be \(batch, out_features\) = \(2, 3\)"):
        LF.linear_mse_loss(x, torch.randn(3, 5, requires_grad=True), None, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"target has shape \(2, 4\) but pred has shape \(2, 3\)"):
        LF.linear_mse_loss(x, torch.randn(3, 5), None, torch.randn(2, 4))  # no gradient: the unfused kernels
    for loss in (LF.linear_mse_loss, lambda x, w, b, t: F.mse_loss(F.linear(x, w, b), t)):  # as PyTorch: no broadcast
        with pytest.warns(UserWarning, match="target size"), pytest.raises(RuntimeError, match="must match"):
            loss(torch.randn(2, 3, 5), torch.randn(3, 5), None, torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        LF.linear_mse_loss(x, torch.randn(3, 5), None, torch.randn(2, 3), "none")
    with pytest.raises(TypeError, match="float16"):
        LinearFunction.apply(x.half(), w.half(), None)  # the Functions themselves do not fall back


# ---------------------------------------------------------------------------------------------
# torch.compile, DistributedDataParallel, import without torch


# PyTorch's own code warns while compiling: Dynamo instantiates torch.autograd.Function to trace
# ours, importing Inductor runs torch.jit.script_method (a DeprecationWarning in 2.13, a FutureWarning
# from 2.14: Warning matches both), and torch 2.6's Inductor warns about a setting of its own that it
# cannot serialise. None of them comes from lingrad.
@pytest.mark.filterwarnings(
    r"ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning"
)
@pytest.mark.filterwarnings(r"ignore:`torch.jit.script_method` is deprecated:Warning")
@pytest.mark.filterwarnings(r"ignore:Skipping serialization of skipfiles_inline_module_allowlist:UserWarning")
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = lingrad.swap_linear(mlp(8, 16, 1))
    reference = mlp(8, 16, 1)
    reference.load_state_dict(model.state_dict())
    x, t = torch.randn(32, 8), torch.randn(32, 1)

    compiled = torch.compile(model, fullgraph=True)  # Inductor; a graph break would raise
    F.mse_loss(compiled(x), t).backward()
    F.mse_loss(reference(x), t).backward()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)

    # The fused block too (AOTAutograd without Inductor's code generation, to keep this short).
    body, head = model[0], lingrad.LinearMSELoss(16, 1)
    head.load_state_dict(reference[2].state_dict())
    step = torch.compile(lambda x, t: head(torch.relu(body(x)), t), fullgraph=True, backend="aot_eager")
    loss = step(x, t)
    torch.testing.assert_close(loss, F.mse_loss(reference(x), t))
    head.zero_grad()
    loss.backward()
    torch.testing.assert_close(head.weight.grad, reference[2].weight.grad)

    # The fallback to PyTorch traces without a graph break as well, and so do bfloat16 kernels.
    half = torch.compile(lingrad.swap_linear(mlp(8, 4).to(torch.float16)), fullgraph=True, backend="aot_eager")
    assert half(x.to(torch.float16)).dtype == torch.float16
    brain = lingrad.swap_linear(mlp(8, 4).to(torch.bfloat16))
    compiled = torch.compile(brain, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x.to(torch.bfloat16)), brain(x.to(torch.bfloat16)))


@pytest.mark.filterwarnings(
    r"ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning"
)
def test_torch_export_records_lingrad_operators():
    model = lingrad.swap_linear(mlp(4, 8, 2))
    x = torch.randn(3, 4)
    program = torch.export.export(model, (x,))
    assert program.graph_module.code.count("torch.ops.lingrad.linear.default") == 2
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_gloo(tmp_path):
    worker = Path(__file__).with_name("torch_ddp_worker.py")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), "2", str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # Every rank holds the gradient of the whole batch (both shards), as nn.Linear's DDP does.
    for result in results:
        for name, grad in result["reference"].items():
            torch.testing.assert_close(result["lingrad"][name], grad)
            torch.testing.assert_close(result["fused"][name], grad)
            torch.testing.assert_close(result["whole"][name], grad)
            torch.testing.assert_close(result["lingrad"][name], results[0]["lingrad"][name], rtol=0, atol=0)


def test_the_layer_modules_are_one_object_by_either_name():
    # lingrad.nn (attribute or import), and lingrad.torch.nn, where the code is: one module each
    import importlib

    for name in ("nn", "functional", "autograd", "mlp", "privacy"):
        module = importlib.import_module(f"lingrad.torch.{name}")
        assert importlib.import_module(f"lingrad.{name}") is module
        assert getattr(lingrad, name) is module and sys.modules[f"lingrad.{name}"] is module
    assert lingrad.Linear is lingrad.nn.Linear and lingrad.fuse is lingrad.mlp.fuse


def test_import_lingrad_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "import lingrad, numpy as np\n"
        "lingrad.kernels.linear_forward(np.ones((2, 3)), np.ones((4, 3)))\n"
        "try:\n    lingrad.Linear\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "lingrad.Linear needs PyTorch: pip install 'lingrad[torch]'" in out.stdout


def test_a_torch_below_the_supported_range_is_named_and_the_kernels_still_work():
    # torch 2.5.1 as it would be installed: `import torch, lingrad` imports, the NumPy kernels run,
    # and the PyTorch layer (by attribute or by its module) says which torch it needs.
    code = (
        "import torch; torch.__version__ = '2.5.1+cu124'\n"
        "import lingrad, numpy as np\n"
        "assert 'lingrad' not in dir(torch.ops) or not hasattr(torch.ops.lingrad, 'linear')\n"
        "lingrad.kernels.linear_forward(np.ones((2, 3)), np.ones((4, 3)))\n"
        "for attempt in (lambda: lingrad.Linear, lambda: __import__('lingrad.nn')):\n"
        "    try:\n        attempt()\n    except ImportError as e:\n        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    need = ".".join(map(str, lingrad.TORCH_MIN))
    message = f"lingrad's PyTorch layer needs torch >= {need}, and torch 2.5.1+cu124 is installed"
    assert out.stdout.count(message) == 2, out.stdout


def test_the_declared_torch_range_starts_at_the_supported_floor():
    # pyproject.toml's torch extra, scripts/torch_matrix.sh's oldest torch and the layer's own check
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floors = {line.split('"torch>=')[1].split(",")[0] for line in pyproject.splitlines() if '"torch>=' in line}
    assert floors == {".".join(map(str, lingrad.TORCH_MIN))}
