"""lingrad's kernels as PyTorch operators (``torch.ops.lingrad.*``), with their derivatives.

Shapes as in the kernels: x (B, in), weight (out, in), bias (out,), y / target / grad_out (B, out).

    linear(x, weight, bias?)                      -> y = x @ weight.T + bias
    linear_backward_input(grad_out, weight)       -> grad_x = grad_out @ weight
    linear_backward_weight(grad_out, x, bias)     -> (grad_weight = grad_out.T @ x, grad_bias = grad_out.sum(0) or None)
    mse_loss(pred, target, reduction)             -> loss: 0-d for "mean"/"sum", pred's shape for "none"
    mse_backward(pred, target, reduction)         -> grad_pred = 2 (pred - target) / N
    linear_mse(x, weight, bias?, target, reduction, input_grad)
                                                  -> (loss, grad_x or None, grad_weight, grad_bias or None)

Each operator has three parts, kept together here: its implementation (tensors -> NumPy views ->
kernel -> tensors, zero-copy on CPU), a fake implementation (shapes only: what torch.compile
traces) and its derivative. Derivatives are written with these same operators, and the three
linear operators are closed under differentiation, so every order of derivative runs on lingrad's
kernels:

    d linear                 : grad_x = linear_backward_input(g, weight),
                               (grad_weight, grad_bias) = linear_backward_weight(g, x)
    d linear_backward_input  : grad_grad_out = linear(g, weight),
                               grad_weight = linear_backward_weight(grad_out, g)[0]
    d linear_backward_weight : grad_grad_out = linear(x, g_weight, g_bias),
                               grad_x = linear_backward_input(grad_out, g_weight)

Calling an operator object here (``linear(x, weight, bias)``) goes straight to its implementation
in plain eager code: the dispatcher path of a Python custom operator (autograd kernel, redispatch,
checks) measured about 45 us per call against 7 us for the implementation itself, half of
PyTorch's whole step at a tiny shape. The dispatcher is used only when it is needed: while
torch.compile traces, while autograd records (a backward run with create_graph=True, for double
backward), and for tensor subclasses (FakeTensor, FunctionalTensor: AOTAutograd's tracing).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import kernels

# ---------------------------------------------------------------------------------------------
# The one bridge between tensors and arrays: a CPU tensor and its array share memory, with the
# same strides (transposed or sliced views stay views). The kernels validate the arrays.


def _array(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _optional_array(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _tensor(a: np.ndarray | None) -> Tensor | None:
    return None if a is None else torch.from_numpy(a)


def _scalar(loss: float, like: Tensor) -> Tensor:
    # The kernels return mean/sum losses as Python floats (accumulated in double); torch wants a
    # 0-d tensor of the input's dtype.
    return torch.scalar_tensor(loss, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------
# An operator: implementation, fake implementation, derivative.


def _eager(t: Tensor) -> bool:
    """True for a real tensor in plain eager code; False while torch.compile or AOTAutograd
    traces (FakeTensor, FunctionalTensor and other subclasses, which have no data to read)."""
    return type(t) in (Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()


def _scale(grad: Tensor, *tensors: Tensor | None) -> tuple:
    """grad (0-d) times each tensor. ``loss.backward()`` passes grad = 1: then, unless autograd
    records (create_graph=True differentiates with respect to grad too), the tensors are
    returned as they are. That is safe for gradients a backward saved: autograd takes over a
    returned tensor only when nothing else holds it (retain_graph=False frees the saved ones
    first), and otherwise copies it, so a second backward still finds them unchanged."""
    if not torch.is_grad_enabled() and _eager(grad) and grad.item() == 1.0:
        return tensors
    return tuple(None if t is None else grad * t for t in tensors)


class Operator:
    """A lingrad kernel registered as ``torch.ops.lingrad.<name>``."""

    def __init__(self, schema: str, impl: Callable) -> None:
        name, signature = schema.split("(", 1)
        self.impl = impl
        self.custom_op = torch.library.custom_op(f"lingrad::{name}", impl, mutates_args=(), schema="(" + signature)
        self.overload = getattr(torch.ops.lingrad, name).default
        self.setup_context: Callable | None = None
        self.backward: Callable | None = None

    def __call__(self, *args):
        # See the module docstring: the dispatcher only when tracing, recording or wrapping.
        if torch.is_grad_enabled() or not _eager(args[0]):
            return self.overload(*args)
        return self.impl(*args)

    def register_fake(self, fake: Callable) -> Callable:
        self.custom_op.register_fake(fake)
        return fake

    def register_derivative(self, setup_context: Callable, backward: Callable) -> None:
        # Kept on the object too: lingrad.autograd's Functions reuse the very same formulas.
        self.setup_context, self.backward = setup_context, backward
        self.custom_op.register_autograd(backward, setup_context=setup_context)

    def __repr__(self) -> str:
        return f"<lingrad operator {self.overload}>"


def operator(schema: str) -> Callable[[Callable], Operator]:
    return lambda impl: Operator(schema, impl)


# ---------------------------------------------------------------------------------------------
# linear: y (B, out) = x (B, in) @ weight.T (out, in) + bias (out,)


@operator("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.from_numpy(kernels.linear_forward(_array(x), _array(weight), _optional_array(bias)))


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_setup(ctx, inputs, output):
    x, weight, _ = inputs
    need_x, need_weight, _ = ctx.needs_input_grad[:3]
    # grad_x needs the weight, grad_weight needs x: keep only what backward will read.
    ctx.save_for_backward(x if need_weight else None, weight if need_x else None)


def _linear_grads(grad_y, x, weight, need_x, need_weight, need_bias) -> tuple:
    """(grad_x, grad_weight, grad_bias) of y = x @ weight.T + bias for grad_y, each None unless needed."""
    grad_x = linear_backward_input(grad_y, weight) if need_x else None
    grad_weight = grad_bias = None
    if need_weight:
        grad_weight, grad_bias = linear_backward_weight(grad_y, x, need_bias)
    elif need_bias:  # a frozen weight: only the column sums
        grad_bias = grad_y.sum(0)
    return grad_x, grad_weight, grad_bias


def _linear_backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    return _linear_grads(grad_y, x, weight, *ctx.needs_input_grad[:3])


# ---------------------------------------------------------------------------------------------
# linear_backward_input: grad_x (B, in) = grad_out (B, out) @ weight (out, in)


@operator("linear_backward_input(Tensor grad_out, Tensor weight) -> Tensor")
def linear_backward_input(grad_out: Tensor, weight: Tensor) -> Tensor:
    return torch.from_numpy(kernels.linear_backward_input(_array(grad_out), _array(weight)))


@linear_backward_input.register_fake
def _(grad_out, weight):
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1])


def _linear_backward_input_setup(ctx, inputs, output):
    grad_out, weight = inputs
    need_grad_out, need_weight = ctx.needs_input_grad[:2]
    ctx.save_for_backward(grad_out if need_weight else None, weight if need_grad_out else None)


def _linear_backward_input_backward(ctx, g):
    # g (B, in) is the gradient of grad_x.
    grad_out, weight = ctx.saved_tensors
    need_grad_out, need_weight = ctx.needs_input_grad[:2]
    return (
        linear(g, weight, None) if need_grad_out else None,  # g @ weight.T
        linear_backward_weight(grad_out, g, False)[0] if need_weight else None,  # grad_out.T @ g
    )


# ---------------------------------------------------------------------------------------------
# linear_backward_weight: grad_weight (out, in) = grad_out.T @ x, grad_bias (out,) = grad_out.sum(0)


@operator("linear_backward_weight(Tensor grad_out, Tensor x, bool bias) -> (Tensor, Tensor?)")
def linear_backward_weight(grad_out: Tensor, x: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    grad_weight, grad_bias = kernels.linear_backward_weight(_array(grad_out), _array(x), bias=bias)
    return torch.from_numpy(grad_weight), _tensor(grad_bias)


@linear_backward_weight.register_fake
def _(grad_out, x, bias):
    out_features = grad_out.shape[1]
    return grad_out.new_empty(out_features, x.shape[1]), (grad_out.new_empty(out_features) if bias else None)


def _linear_backward_weight_setup(ctx, inputs, output):
    grad_out, x, _ = inputs
    need_grad_out, need_x = ctx.needs_input_grad[:2]
    ctx.save_for_backward(grad_out if need_x else None, x if need_grad_out else None)


def _linear_backward_weight_backward(ctx, g_weight, g_bias):
    # g_weight (out, in) and g_bias (out,) are the gradients of grad_weight and grad_bias.
    grad_out, x = ctx.saved_tensors
    need_grad_out, need_x = ctx.needs_input_grad[:2]
    return (
        linear(x, g_weight, g_bias) if need_grad_out else None,  # x @ g_weight.T + g_bias
        linear_backward_input(grad_out, g_weight) if need_x else None,  # grad_out @ g_weight
        None,
    )


# ---------------------------------------------------------------------------------------------
# mse_loss and mse_backward: pred and target of one shape, 1-D or 2-D


@operator("mse_loss(Tensor pred, Tensor target, str reduction) -> Tensor")
def mse_loss(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    loss = kernels.mse_loss(_array(pred), _array(target), reduction)
    return torch.from_numpy(loss) if reduction == "none" else _scalar(loss, pred)


@mse_loss.register_fake
def _(pred, target, reduction):
    return pred.new_empty(pred.shape if reduction == "none" else ())


def _mse_loss_setup(ctx, inputs, output):
    pred, target, reduction = inputs
    ctx.save_for_backward(pred, target)
    ctx.reduction = reduction


def _mse_loss_backward(ctx, grad_loss):
    # grad_loss is 0-d for "mean"/"sum", pred's shape for "none".
    pred, target = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[:2]
    grad_pred = mse_backward(pred, target, ctx.reduction)
    grad_pred = grad_loss * grad_pred if ctx.reduction == "none" else _scale(grad_loss, grad_pred)[0]
    return (grad_pred if need_pred else None, -grad_pred if need_target else None, None)


@operator("mse_backward(Tensor pred, Tensor target, str reduction) -> Tensor")
def mse_backward(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    return torch.from_numpy(kernels.mse_backward(_array(pred), _array(target), reduction))


@mse_backward.register_fake
def _(pred, target, reduction):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _mse_backward_setup(ctx, inputs, output):
    pred, _, reduction = inputs
    # grad_pred = (2 / N) (pred - target): linear in both, with N = numel for "mean", else 1.
    ctx.scale = 2.0 / max(pred.numel(), 1) if reduction == "mean" else 2.0


def _mse_backward_backward(ctx, g):
    need_pred, need_target = ctx.needs_input_grad[:2]
    grad_pred = g * ctx.scale
    return (grad_pred if need_pred else None, -grad_pred if need_target else None, None)


# ---------------------------------------------------------------------------------------------
# linear_mse: the fused training step. Its gradients are outputs (computed in the forward pass
# while dY is at hand); autograd only scales them by the incoming gradient of the loss.


@operator(
    "linear_mse(Tensor x, Tensor weight, Tensor? bias, Tensor target, str reduction, bool input_grad)"
    " -> (Tensor, Tensor?, Tensor, Tensor?)"
)
def linear_mse(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, reduction: str, input_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    loss, grad_x, grad_weight, grad_bias = kernels.linear_mse(
        _array(x), _array(weight), _optional_array(bias), _array(target), reduction, input_grad=input_grad
    )
    return _scalar(loss, x), _tensor(grad_x), torch.from_numpy(grad_weight), _tensor(grad_bias)


@linear_mse.register_fake
def _(x, weight, bias, target, reduction, input_grad):
    return (
        x.new_empty(()),
        x.new_empty(x.shape) if input_grad else None,
        weight.new_empty(weight.shape),
        None if bias is None else bias.new_empty(bias.shape),
    )


def save_linear_mse(ctx, inputs, grads, reduction) -> None:
    """Shared by the operator and lingrad.autograd.LinearMSEFunction: keep the inputs (x, weight,
    bias, target) for the unfused backward and the gradients (grad_x, grad_weight, grad_bias,
    each None if not computed) that the forward pass produced."""
    grad_x, grad_weight, _ = grads
    need_x, _, _, need_target = ctx.needs_input_grad[:4]
    # The saved gradients answer backward if they were computed (grad_bias is, whenever there
    # is a bias) and the target needs none (its gradient is -dY, which the kernel does not keep).
    ctx.fused = grad_weight is not None and (grad_x is not None or not need_x) and not need_target
    ctx.save_for_backward(*inputs, *grads)
    ctx.reduction = reduction


def _linear_mse_setup(ctx, inputs, output):
    x, weight, bias, target, reduction, _ = inputs
    _, *grads = output
    ctx.mark_non_differentiable(*(g for g in grads if g is not None))
    save_linear_mse(ctx, (x, weight, bias, target), grads, reduction)


def linear_mse_backward(ctx, grad_loss, *_):
    """The backward of the fused step, shared by the operator and LinearMSEFunction.

    Usually grad_loss (0-d) times the gradients saved by the forward pass. When they cannot
    answer (the target needs a gradient, or create_graph=True asks for differentiable gradients),
    the unfused path recomputes dY = 2 (x W^T + b - t) / N and calls the differentiable linear
    operators."""
    x, weight, bias, target, grad_x, grad_weight, grad_bias = ctx.saved_tensors
    need_x, need_weight, need_bias, need_target = ctx.needs_input_grad[:4]
    extra = (None,) * (len(ctx.needs_input_grad) - 4)  # the non-tensor arguments
    if ctx.fused and not torch.is_grad_enabled():
        grad_x, grad_weight, grad_bias = _scale(
            grad_loss,
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias if need_bias else None,
        )
        return (grad_x, grad_weight, grad_bias, None, *extra)
    grad_y = grad_loss * mse_backward(linear(x, weight, bias), target, ctx.reduction)
    grad_x, grad_weight, grad_bias = _linear_grads(grad_y, x, weight, need_x, need_weight, need_bias)
    return (grad_x, grad_weight, grad_bias, -grad_y if need_target else None, *extra)


# ---------------------------------------------------------------------------------------------

linear.register_derivative(_linear_setup, _linear_backward)
linear_backward_input.register_derivative(_linear_backward_input_setup, _linear_backward_input_backward)
linear_backward_weight.register_derivative(_linear_backward_weight_setup, _linear_backward_weight_backward)
mse_loss.register_derivative(_mse_loss_setup, _mse_loss_backward)
mse_backward.register_derivative(_mse_backward_setup, _mse_backward_backward)
linear_mse.register_derivative(_linear_mse_setup, linear_mse_backward)
