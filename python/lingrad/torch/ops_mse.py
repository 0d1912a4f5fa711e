"""The MSE operators and the fused Linear + MSE step, each with its fake implementation and
derivative rules (see ops.py):

    mse_loss(pred, target, reduction)       -> loss: 0-d for "mean"/"sum", pred's shape for "none"
    mse_backward(pred, target, reduction)   -> grad_pred = 2 (pred - target) / N
    linear_mse(x (B, in), weight (out, in), bias (out,)?, target (B, out), reduction, input_grad)
        -> (loss, grad_x (B, in) or None, grad_weight, grad_bias or None, grad_y (B, out))
    linear_mse_loss(x, weight, bias, target, reduction, input_grad) -> loss
        the fused step for eager autograd: the loss alone as its output, linear_mse's backward

pred and target have one shape, 1-D or 2-D. The scale 2 / N (N = numel for "mean") or 2 ("sum") of
the loss gradient is _mse_backward_scale, wherever a rule needs it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lingrad import kernels
from lingrad.torch._bridge import as_tensor, empty_out, optional_array, scalar, to_array
from lingrad.torch.ops import c_level_apply, expand_front, operator, save_for_forward, sum_terms
from lingrad.torch.ops_linear import linear, linear_backward_input, linear_grads, linear_tangent

# ---------------------------------------------------------------------------------------------
# mse_loss and mse_backward: pred and target of one shape, 1-D or 2-D


@operator("mse_loss(Tensor pred, Tensor target, str reduction) -> Tensor")
def mse_loss(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        loss, out = empty_out(pred, *pred.shape)
        kernels.mse_loss(to_array(pred), to_array(target), reduction, out=out)
        return loss
    return scalar(kernels.mse_loss(to_array(pred), to_array(target), reduction), pred)


@mse_loss.register_fake
def _(pred, target, reduction):
    return pred.new_empty(pred.shape if reduction == "none" else ())


def _mse_loss_setup(ctx, inputs, output):
    pred, target, reduction = inputs
    ctx.save_for_backward(pred, target)
    save_for_forward(ctx, pred, target)
    ctx.reduction = reduction


def _mse_loss_backward(ctx, grad_loss):
    # grad_loss is 0-d for "mean"/"sum", pred's shape for "none".
    pred, target = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[:2]
    grad_pred = grad_loss * mse_backward(pred, target, ctx.reduction)
    return (grad_pred if need_pred else None, -grad_pred if need_target else None, None)


def _mse_loss_jvp(ctx, t_pred, t_target, _):
    pred, target = ctx.saved_tensors
    t_residual = sum_terms(t_pred, None if t_target is None else -t_target)
    product = mse_backward(pred, target, ctx.reduction) * t_residual  # d (r^2) = 2 r dr, scaled by 1/N
    return product if ctx.reduction == "none" else product.sum()


def _mse_loss_vmap(info, in_dims, pred, target, reduction):
    pred_dim, target_dim, _ = in_dims
    p = expand_front(pred, pred_dim, info.batch_size)
    t = expand_front(target, target_dim, info.batch_size)
    squares = mse_loss(p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1), "none")  # the kernel, all at once
    if reduction == "none":
        return squares.reshape(p.shape), 0
    return (squares.mean(1) if reduction == "mean" else squares.sum(1)), 0


@operator("mse_backward(Tensor pred, Tensor target, str reduction) -> Tensor")
def mse_backward(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    grad, out = empty_out(pred, *pred.shape)
    kernels.mse_backward(to_array(pred), to_array(target), reduction, out=out)
    return grad


@mse_backward.register_fake
def _(pred, target, reduction):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _mse_backward_scale(pred: Tensor, reduction: str) -> float:
    # grad_pred = scale (pred - target): linear in both, scale = 2 / N for "mean" (N = numel), else 2.
    return 2.0 / max(pred.numel(), 1) if reduction == "mean" else 2.0


def _mse_backward_setup(ctx, inputs, output):
    pred, _, reduction = inputs
    ctx.scale = _mse_backward_scale(pred, reduction)


def _mse_backward_backward(ctx, g):
    need_pred, need_target = ctx.needs_input_grad[:2]
    grad_pred = g * ctx.scale
    return (grad_pred if need_pred else None, -grad_pred if need_target else None, None)


def _mse_backward_jvp(ctx, t_pred, t_target, _):
    return ctx.scale * sum_terms(t_pred, None if t_target is None else -t_target)


def _mse_backward_vmap(info, in_dims, pred, target, reduction):
    pred_dim, target_dim, _ = in_dims
    p = expand_front(pred, pred_dim, info.batch_size)
    t = expand_front(target, target_dim, info.batch_size)
    # each sample's own N: the kernel's "sum" (2 r), divided by N per sample (2 r / N, where the
    # kernel's "mean" computes r * _mse_backward_scale: equal to within a rounding)
    grad = mse_backward(p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1), "sum").reshape(p.shape)
    return (grad / max(p[0].numel(), 1) if reduction == "mean" else grad), 0


mse_loss.register_rules(
    _mse_loss_setup,
    _mse_loss_backward,
    _mse_loss_jvp,
    _mse_loss_vmap,
    lambda pred, target, reduction: torch.nn.functional.mse_loss(pred, target, reduction=reduction),
)
mse_backward.register_rules(
    _mse_backward_setup,
    _mse_backward_backward,
    _mse_backward_jvp,
    _mse_backward_vmap,
    lambda pred, target, reduction: _mse_backward_scale(pred, reduction) * (pred - target),
)


# ---------------------------------------------------------------------------------------------
# linear_mse: the fused training step. Its gradients are outputs (computed in the forward pass
# while dY is at hand); backward only scales them by the incoming gradient of the loss.


@operator(
    "linear_mse(Tensor x, Tensor weight, Tensor? bias, Tensor target, str reduction, bool input_grad)"
    " -> (Tensor, Tensor?, Tensor, Tensor?, Tensor)"
)
def linear_mse(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, reduction: str, input_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor]:
    grad_y, grad_y_out = empty_out(_grad_y_like(x, weight), x.shape[0], weight.shape[0])
    loss, grad_x, grad_weight, grad_bias = kernels.linear_mse(
        to_array(x),
        to_array(weight),
        optional_array(bias),
        to_array(target),
        reduction,
        input_grad=input_grad,
        grad_output=grad_y_out,
    )
    # The gradients stay inside the Function (backward returns scaled copies): NumPy's memory is fine.
    grad_x, grad_weight, grad_bias = (None if g is None else as_tensor(g) for g in (grad_x, grad_weight, grad_bias))
    return scalar(loss, _loss_like(x, target)), grad_x, grad_weight, grad_bias, grad_y


def _grad_y_like(x: Tensor, weight: Tensor) -> Tensor:
    """grad_y's dtype: x's, but float32 in a bfloat16 step (the kernel keeps dY in float32)."""
    return x.new_empty(0, dtype=torch.float32) if x.dtype == torch.bfloat16 else x  # (a float32 x: float32)


def _loss_like(x: Tensor, target: Tensor) -> Tensor:
    """The loss's dtype: that of F.mse_loss(y, target), y having x's dtype."""
    return x if target.dtype == x.dtype else target.new_empty(0, dtype=torch.promote_types(x.dtype, target.dtype))


@linear_mse.register_fake
def _(x, weight, bias, target, reduction, input_grad):
    return (
        _loss_like(x, target).new_empty(()),
        x.new_empty(x.shape) if input_grad else None,
        weight.new_empty(weight.shape),
        None if bias is None else bias.new_empty(bias.shape),
        _grad_y_like(x, weight).new_empty(x.shape[0], weight.shape[0]),
    )


def _linear_mse_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*(g for g in output[1:] if g is not None))
    _save_linear_mse(ctx, inputs, output)


def _save_linear_mse(ctx, inputs, output) -> None:
    x, weight, bias, target, reduction, _ = inputs
    _, grad_x, grad_weight, grad_bias, grad_y = output
    need_x, need_weight, need_bias, need_target = ctx.needs_input_grad[:4]
    # As nn.Linear + F.mse_loss keep: x if the weight needs a gradient, the weight if x does, and
    # (instead of y) grad_y = 2 (y - target) / N. The target is saved too, never read: as F.mse_loss,
    # backward then refuses a target changed in place since forward ("modified by an inplace
    # operation"), instead of the gradient of values it no longer holds.
    ctx.save_for_backward(x if need_weight else None, weight if need_x else None, grad_y, target)
    # The gradients the kernel made, handed out by the first backward (later ones recompute them).
    ctx.made = (grad_x, grad_weight, grad_bias)
    # The inputs that need gradients, for double backward only: their values are never read there.
    ctx.inputs = tuple(t if need else None for t, need in zip((x, weight, bias, target), ctx.needs_input_grad))
    ctx.scale = _mse_backward_scale(grad_y, reduction)
    ctx.weight_dtype = weight.dtype
    save_for_forward(ctx, x, weight, grad_y)


def _differentiable_grad_y(ctx, x, weight, grad_y) -> Tensor:
    """grad_y = scale (x @ weight.T + bias - target) as a function of the inputs that need gradients,
    for double backward: its value is the saved grad_y; its derivatives, to every order, are those of
    the formula. Each input appears as `t - t.detach()` (or, for the bilinear term, a product minus
    its detached copy): zero-valued, so no input's current value matters, only its place in the graph."""
    x_in, weight_in, bias_in, target_in = ctx.inputs
    xs = x if x is not None else x_in  # the saved value where backward needs it, else the input itself
    ws = weight if weight is not None else weight_in
    delta = [None, None, None]
    if x_in is not None or weight_in is not None:
        delta[0] = linear(xs, ws, None) - linear(xs.detach(), ws.detach(), None)
    if bias_in is not None:
        delta[1] = bias_in - bias_in.detach()
    if target_in is not None:
        delta[2] = target_in.detach() - target_in
    return grad_y + ctx.scale * sum_terms(*delta)


def _linear_mse_backward(ctx, grad_loss, *_):
    x, weight, grad_y, _target = ctx.saved_tensors  # (the target: its version checked, see above)
    need_x, need_weight, need_bias, need_target = ctx.needs_input_grad[:4]
    extra = (None, None)  # reduction, input_grad
    if torch.is_grad_enabled():  # create_graph=True (or torch.func): differentiable gradients
        grad_y = grad_loss * _differentiable_grad_y(ctx, x, weight, grad_y)
        grad_x, grad_weight, grad_bias = linear_grads(
            grad_y, x, weight, need_x, need_weight, need_bias, ctx.weight_dtype
        )
        return (grad_x, grad_weight, grad_bias, -grad_y if need_target else None, *extra)
    made, ctx.made = ctx.made, None  # handed out once: no returned gradient aliases saved state
    if made is None:
        made = linear_grads(grad_y, x, weight, need_x, need_weight, need_bias, ctx.weight_dtype)
    grads = made
    grad_x, grad_weight, grad_bias = grads
    if need_x and grad_x is None:  # the kernel was asked not to make it
        grad_x = linear_backward_input(grad_y, weight)
    grads = (grad_x if need_x else None, grad_weight if need_weight else None, grad_bias if need_bias else None)
    # loss.backward() passes 1: the gradients as they are (a real tensor's value is read; a traced one is not)
    if not (grad_loss.__class__ is Tensor and grad_loss.item() == 1.0):
        grads = tuple(None if g is None else grad_loss * g for g in grads)
    return (*grads, -grad_loss * grad_y if need_target else None, *extra)


class _LinearMSELoss(torch.autograd.Function):
    """The fused step for eager code: the loss alone as its output (the operator's Function returns
    the gradients too, which autograd would wrap and track, about 30 us a call), with the
    operator's backward. No jvp or vmap: under torch.func and forward AD lingrad.functional uses the
    operators."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, reduction, input_grad):
        inputs = (x, weight, bias, target, reduction, input_grad)
        output = linear_mse.impl(*inputs)
        _save_linear_mse(ctx, inputs, output)
        return output[0]

    backward = staticmethod(_linear_mse_backward)


linear_mse_loss = c_level_apply(_LinearMSELoss)


def _linear_mse_jvp(ctx, t_x, t_weight, t_bias, t_target, *_):
    x, weight, grad_y = ctx.saved_tensors  # (in jvp: what save_for_forward kept)
    t_y = linear_tangent(x, weight, t_x, t_weight, t_bias)
    t_residual = sum_terms(t_y, None if t_target is None else -t_target)
    if t_residual is None:
        return grad_y.new_zeros(()), None, None, None, None
    return (grad_y * t_residual).sum(), None, None, None, None  # d loss = <grad_y, d (y - target)>


def _linear_mse_vmap(info, in_dims, x, weight, bias, target, reduction, input_grad):
    # Per-sample losses of the fused step: each sample has its own weight gradient, so the batch is
    # PyTorch's batched matmul over the kernels' operators' formulas.
    n = info.batch_size
    xs, ws, ts = (expand_front(t, d, n) for t, d in zip((x, weight, target), (in_dims[0], in_dims[1], in_dims[3])))
    bs = None if bias is None else expand_front(bias, in_dims[2], n)
    y = torch.matmul(xs, ws.mT) + (0 if bs is None else bs.unsqueeze(-2))
    residual = y - ts
    scale = _mse_backward_scale(residual[0], reduction)
    loss = residual.square().flatten(1).sum(1) * (scale / 2)
    grad_y = scale * residual
    grad_x = torch.matmul(grad_y, ws) if input_grad else None
    grad_weight = torch.matmul(grad_y.mT, xs)
    grad_bias = None if bias is None else grad_y.sum(-2)
    outputs = (loss, grad_x, grad_weight, grad_bias, grad_y)
    return outputs, tuple(None if o is None else 0 for o in outputs)


def _linear_mse_composite(x, weight, bias, target, reduction, input_grad):
    grad_y = _mse_backward_scale(target, reduction) * (torch.nn.functional.linear(x, weight, bias) - target)
    loss = torch.nn.functional.mse_loss(torch.nn.functional.linear(x, weight, bias), target, reduction=reduction)
    grad_weight = grad_y.mT @ x
    return loss, grad_y @ weight if input_grad else None, grad_weight, None if bias is None else grad_y.sum(-2), grad_y


linear_mse.register_rules(
    _linear_mse_setup, _linear_mse_backward, _linear_mse_jvp, _linear_mse_vmap, _linear_mse_composite
)
