"""The linear operators, each with its fake implementation and derivative rules (see ops.py):

    linear(x (B, in), weight (out, in), bias (out,)?)           -> y (B, out) = x @ weight.T + bias
    linear_backward_input(grad_out (B, out), weight (out, in))  -> grad_x (B, in) = grad_out @ weight
    linear_backward_weight(grad_out (B, out), x (B, in), bias, dtype?)
                                                                -> (grad_weight (out, in), grad_bias (out,) or None)

Also for ops_mse.py's fused step: ``linear_grads`` (the three gradients of y for grad_y) and
``linear_tangent`` (y's tangent). ``LINEAR_NODE`` is the graph node of ``linear`` (lingrad.Linear,
lingrad.functional.linear), whose backward follows the capture protocol of lingrad.privacy (_bridge).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lingrad import kernels
from lingrad.torch._bridge import capture_list, empty_out, optional_array, to_array
from lingrad.torch.ops import front, operator, save_for_forward, sum_terms

# linear: y (B, out) = x (B, in) @ weight.T (out, in) + bias (out,)


@operator("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    y, out = empty_out(x, x.shape[0], weight.shape[0])
    kernels.linear_forward(to_array(x), to_array(weight), optional_array(bias), out=out)
    return y


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_setup(ctx, inputs, output):
    x, weight, _ = inputs
    need_x, need_weight, _ = ctx.needs_input_grad[:3]
    # grad_x needs the weight, grad_weight needs x: keep only what backward will read (as nn.Linear).
    ctx.save_for_backward(x if need_weight else None, weight if need_x else None)
    ctx.weight_dtype = weight.dtype
    save_for_forward(ctx, x, weight)


def linear_grads(grad_y, x, weight, need_x, need_weight, need_bias, weight_dtype) -> tuple:
    """(grad_x, grad_weight, grad_bias) of y = x @ weight.T + bias for grad_y, each None unless needed
    (the weight itself is saved only if grad_x is needed; weight_dtype is its dtype)."""
    grad_x = linear_backward_input(grad_y, weight) if need_x else None
    grad_weight = grad_bias = None
    if need_weight:
        if weight_dtype == grad_y.dtype:
            grad_weight, grad_bias = linear_backward_weight(grad_y, x, need_bias)
        else:  # bfloat16 activations, float32 master weight: its gradient summed and made in float32
            grad_weight, grad_bias = linear_backward_weight(grad_y, x, need_bias, weight_dtype)
    elif need_bias:  # a frozen weight: only the column sums
        grad_bias = grad_y.sum(0)
    return grad_x, grad_weight, grad_bias


def _linear_backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    capture = capture_list(ctx)
    if capture is not None:  # lingrad.privacy: keep (grad_y, x) for per-sample gradients, skip dW and db
        capture.append((grad_y, x))
        return linear_backward_input(grad_y, weight) if ctx.needs_input_grad[0] else None, None, None
    return linear_grads(grad_y, x, weight, *ctx.needs_input_grad[:3], ctx.weight_dtype)


def _linear_jvp(ctx, t_x, t_weight, t_bias):
    x, weight = ctx.saved_tensors
    t_y = linear_tangent(x, weight, t_x, t_weight, t_bias)
    return t_y if t_y is not None else x.new_zeros(x.shape[0], weight.shape[0])


def linear_tangent(x, weight, t_x, t_weight, t_bias) -> Tensor | None:
    """The tangent of y = x @ weight.T + bias (None if no input has one)."""
    return sum_terms(
        None if t_x is None else linear(t_x, weight, None),
        None if t_weight is None else linear(x, t_weight, None),
        t_bias,
    )


def _linear_vmap(info, in_dims, x, weight, bias):
    x_dim, weight_dim, bias_dim = in_dims
    if weight_dim is None and bias_dim is None:  # a batch of inputs: one kernel call on all its rows
        xs = x.movedim(x_dim, 0)
        y = linear(xs.reshape(-1, xs.shape[-1]), weight, bias)
        return y.reshape(*xs.shape[:-1], y.shape[-1]), 0
    # a batch of weights (model ensembles, jacobians with respect to the weight): batched matmul
    y = torch.matmul(front(x, x_dim), front(weight, weight_dim).mT)
    if bias is not None:
        y = y + front(bias, bias_dim).unsqueeze(-2)
    return y, 0


linear.register_rules(_linear_setup, _linear_backward, _linear_jvp, _linear_vmap, torch.nn.functional.linear)

# linear's graph node, as lingrad.privacy finds it in a graph (its backward captures: see _bridge).
LINEAR_NODE = linear.function._backward_cls


# ---------------------------------------------------------------------------------------------
# linear_backward_input: grad_x (B, in) = grad_out (B, out) @ weight (out, in)


@operator("linear_backward_input(Tensor grad_out, Tensor weight) -> Tensor")
def linear_backward_input(grad_out: Tensor, weight: Tensor) -> Tensor:
    grad_x, out = empty_out(grad_out, grad_out.shape[0], weight.shape[1])
    kernels.linear_backward_input(to_array(grad_out), to_array(weight), out=out)
    return grad_x


@linear_backward_input.register_fake
def _(grad_out, weight):
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1])


def _linear_backward_input_setup(ctx, inputs, output):
    grad_out, weight = inputs
    need_grad_out, need_weight = ctx.needs_input_grad[:2]
    ctx.save_for_backward(grad_out if need_weight else None, weight if need_grad_out else None)
    save_for_forward(ctx, grad_out, weight)


def _linear_backward_input_backward(ctx, g):
    # g (B, in) is the gradient of grad_x.
    grad_out, weight = ctx.saved_tensors
    need_grad_out, need_weight = ctx.needs_input_grad[:2]
    return (
        linear(g, weight, None) if need_grad_out else None,  # g @ weight.T
        linear_backward_weight(grad_out, g, False)[0] if need_weight else None,  # grad_out.T @ g
    )


def _linear_backward_input_jvp(ctx, t_grad_out, t_weight):
    grad_out, weight = ctx.saved_tensors
    return sum_terms(
        None if t_grad_out is None else linear_backward_input(t_grad_out, weight),
        None if t_weight is None else linear_backward_input(grad_out, t_weight),
    )


def _linear_backward_input_vmap(info, in_dims, grad_out, weight):
    grad_dim, weight_dim = in_dims
    if weight_dim is None:
        gs = grad_out.movedim(grad_dim, 0)
        grad_x = linear_backward_input(gs.reshape(-1, gs.shape[-1]), weight)
        return grad_x.reshape(*gs.shape[:-1], grad_x.shape[-1]), 0
    return torch.matmul(front(grad_out, grad_dim), front(weight, weight_dim)), 0


linear_backward_input.register_rules(
    _linear_backward_input_setup,
    _linear_backward_input_backward,
    _linear_backward_input_jvp,
    _linear_backward_input_vmap,
    torch.matmul,
)


# ---------------------------------------------------------------------------------------------
# linear_backward_weight: grad_weight (out, in) = grad_out.T @ x, grad_bias (out,) = grad_out.sum(0)


# dtype: the results' dtype, if not grad_out's (a float32 master weight's gradient from bfloat16
# activations and output gradients).
@operator("linear_backward_weight(Tensor grad_out, Tensor x, bool bias, ScalarType? dtype=None) -> (Tensor, Tensor?)")
def linear_backward_weight(
    grad_out: Tensor, x: Tensor, bias: bool, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor | None]:
    out_features = grad_out.shape[1]
    like = grad_out if dtype is None or dtype == grad_out.dtype else grad_out.new_empty(0, dtype=dtype)
    grad_weight, out = empty_out(like, out_features, x.shape[1])
    grad_bias, bias_out = empty_out(like, out_features) if bias else (None, None)
    kernels.linear_backward_weight(to_array(grad_out), to_array(x), bias=bias, out=out, bias_out=bias_out)
    return grad_weight, grad_bias


@linear_backward_weight.register_fake
def _(grad_out, x, bias, dtype=None):
    out_features, dtype = grad_out.shape[1], dtype or grad_out.dtype
    grad_bias = grad_out.new_empty(out_features, dtype=dtype) if bias else None
    return grad_out.new_empty(out_features, x.shape[1], dtype=dtype), grad_bias


def _linear_backward_weight_setup(ctx, inputs, output):
    grad_out, x, bias = inputs[:3]
    need_grad_out, need_x = ctx.needs_input_grad[:2]
    ctx.save_for_backward(grad_out if need_x else None, x if need_grad_out else None)
    save_for_forward(ctx, grad_out, x)
    ctx.bias = bias


def _linear_backward_weight_backward(ctx, g_weight, g_bias):
    # g_weight (out, in) and g_bias (out,) are the gradients of grad_weight and grad_bias.
    grad_out, x = ctx.saved_tensors
    need_grad_out, need_x = ctx.needs_input_grad[:2]
    return (
        linear(x, g_weight, g_bias) if need_grad_out else None,  # x @ g_weight.T + g_bias
        linear_backward_input(grad_out, g_weight) if need_x else None,  # grad_out @ g_weight
        None,
        None,  # (dtype, when given)
    )


def _linear_backward_weight_jvp(ctx, t_grad_out, t_x, *_):
    grad_out, x = ctx.saved_tensors
    t_weight = sum_terms(
        None if t_grad_out is None else linear_backward_weight(t_grad_out, x, False)[0],
        None if t_x is None else linear_backward_weight(grad_out, t_x, False)[0],
    )
    t_bias = None
    if ctx.bias:
        t_bias = t_grad_out.sum(0) if t_grad_out is not None else grad_out.new_zeros(grad_out.shape[1])
    return t_weight, t_bias


def _linear_backward_weight_vmap(info, in_dims, grad_out, x, bias, dtype=None):
    grad_dim, x_dim = in_dims[:2]
    n = info.batch_size
    if x_dim is None:  # a batch of output gradients, one x: (n*out, in) = grad_out' (B, n*out).T @ x
        gs = grad_out.movedim(grad_dim, 1)  # (B, n, out)
        grad_weight, grad_bias = linear_backward_weight(gs.reshape(gs.shape[0], -1), x, bias, dtype)
        grad_weight = grad_weight.reshape(n, -1, x.shape[-1])
        return (grad_weight, None if grad_bias is None else grad_bias.reshape(n, -1)), (
            0,
            None if grad_bias is None else 0,
        )
    if grad_dim is None:  # one output gradient, a batch of x: (out, n*in) = grad_out.T @ x' (B, n*in)
        xs = x.movedim(x_dim, 1)  # (B, n, in)
        grad_weight, grad_bias = linear_backward_weight(grad_out, xs.reshape(xs.shape[0], -1), bias, dtype)
        return (grad_weight.reshape(grad_weight.shape[0], n, -1), grad_bias), (1, None)
    # both batched (per-sample gradients): batched matmul
    gs, xs = grad_out.movedim(grad_dim, 0), x.movedim(x_dim, 0)
    grad_bias = gs.sum(-2) if bias else None
    grad_weight = torch.matmul(gs.mT, xs)
    if dtype is not None:
        grad_weight, grad_bias = grad_weight.to(dtype), None if grad_bias is None else grad_bias.to(dtype)
    return (grad_weight, grad_bias), (0, None if grad_bias is None else 0)


linear_backward_weight.register_rules(
    _linear_backward_weight_setup,
    _linear_backward_weight_backward,
    _linear_backward_weight_jvp,
    _linear_backward_weight_vmap,
    lambda grad_out, x, bias, dtype=None: (grad_out.mT @ x, grad_out.sum(-2) if bias else None),
)
