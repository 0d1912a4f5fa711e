"""lingrad's kernels as PyTorch operators (``torch.ops.lingrad.*``), with every derivative rule.

Shapes as in the kernels: x (B, in), weight (out, in), bias (out,), y / target / grad_out (B, out).

    linear(x, weight, bias?)                      -> y = x @ weight.T + bias
    linear_backward_input(grad_out, weight)       -> grad_x = grad_out @ weight
    linear_backward_weight(grad_out, x, bias)     -> (grad_weight = grad_out.T @ x, grad_bias = grad_out.sum(0) or None)
    mse_loss(pred, target, reduction)             -> loss: 0-d for "mean"/"sum", pred's shape for "none"
    mse_backward(pred, target, reduction)         -> grad_pred = 2 (pred - target) / N
    linear_mse(x, weight, bias?, target, reduction, input_grad)
                                                  -> (loss, grad_x or None, grad_weight, grad_bias or None, grad_y)

Each operator keeps its parts together here:
  * the implementation: tensors -> NumPy views -> kernel -> tensors allocated by torch (zero-copy
    on the way in; outputs are ordinary, resizable tensors);
  * a fake implementation (shapes only: what torch.compile and torch.export trace);
  * its derivative rules: ``setup_context`` and ``backward`` (reverse mode), ``jvp`` (forward mode:
    torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) and ``vmap`` (torch.func.vmap: a
    batch of inputs in one kernel call where the kernels can take it, PyTorch's batched matmul
    where the weight itself is batched).
The rules are written with these same operators, so every order of derivative, and any nesting of
torch.func transforms, runs on lingrad's kernels.

From the rules each operator builds one ``torch.autograd.Function`` (``Operator.function``;
``lingrad.autograd`` re-exports them) and registers it as the operator's Autograd kernel, so the
dispatcher path (torch.compile, torch.export, torch.func, tensor subclasses) and eager code share
one formula. Calling an operator object (``linear(x, weight, bias)``) routes by what the call
needs (see ``Operator.__call__``): with no graph to record, straight to the kernel; in eager
autograd, to the Function through its C-level apply (Python's ``Function.apply`` binds the
arguments with inspect.signature and walks them for functorch wrappers: over 10 us a call); under
torch.func, tracing or a tensor subclass, through the dispatcher.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.utils.dlpack
from torch import Tensor
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad
from torch.autograd.function import _SingleLevelFunction

from . import _require_supported_torch, kernels

_require_supported_torch(torch.__version__)  # an ImportError naming the versions, before the newer APIs below

# The library that defines the operators; it must stay alive as long as they are used.
_LIB = torch.library.Library("lingrad", "DEF")  # noqa: TOR901 (a fragment would need a DEF elsewhere)

# ---------------------------------------------------------------------------------------------
# The bridge between tensors and the kernels: a CPU tensor goes over as a DLPack capsule, which the
# bindings read as an array sharing its memory, with the same strides (transposed or sliced views
# stay views). Tensor.numpy() would do the same but mark the tensor's storage as not resizable for
# good (nn.Linear never does that to a tensor), and it costs more. The kernels validate the arrays.

_to_dlpack = torch.utils.dlpack.to_dlpack


def _array(t: Tensor):
    return _to_dlpack(t.resolve_neg() if t.is_neg() else t)  # (DLPack carries no negative bit)


def _optional_array(t: Tensor | None):
    return None if t is None else _array(t)


def _empty(like: Tensor, *shape: int) -> tuple[Tensor, object]:
    """A new tensor of like's dtype (allocated by torch) and the capsule through which a kernel fills it."""
    t = like.new_empty(*shape)  # (half the cost of torch.empty(shape, dtype=...))
    return t, _to_dlpack(t)


def _tensor(a: np.ndarray) -> Tensor:
    """A kernel's NumPy result as a tensor sharing its memory (a bfloat16 array through its bits:
    torch.from_numpy knows no ml_dtypes)."""
    if a.dtype.kind == "V":  # ml_dtypes.bfloat16
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _scalar(loss: float, like: Tensor) -> Tensor:
    # The kernels return mean/sum losses as Python floats (accumulated in double); torch wants a
    # 0-d tensor of the input's dtype. A float32 loss beyond float32's range is inf, as PyTorch's
    # own float32 sum gives (scalar_tensor would raise on the overflow).
    if like.dtype == torch.float32 and math.isfinite(loss) and abs(loss) > _FLOAT32_MAX:
        loss = math.copysign(math.inf, loss)
    return torch.scalar_tensor(loss, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------
# Which path a call takes


_PLAIN = (Tensor, torch.nn.Parameter)
_profiling = torch.autograd._profiler_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor  # jacobian(vectorize=True), is_grads_batched
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
any_requires_grad = getattr(torch._C, "_any_requires_grad", None) or (  # (C-level from torch 2.8 on)
    lambda *args: any(a.requires_grad for a in args if isinstance(a, Tensor))
)


def _transforming() -> bool:
    """True while torch.func transforms or forward-mode AD are active, or torch.compile traces:
    tensors may carry tangents or batch dimensions, or have no data; only the dispatcher (or a
    Function's rules) treats them right."""
    return _functorch_active() or forward_ad._current_level >= 0 or torch.compiler.is_compiling()


# The classes of arguments with which a call may skip the dispatcher: real tensors and the
# operators' other argument types.
_PLAIN_ARGS = frozenset({Tensor, torch.nn.Parameter, type(None), str, bool, torch.dtype})


class Operator:
    """A lingrad kernel registered as ``torch.ops.lingrad.<name>``, with its derivative rules."""

    def __init__(self, schema: str, impl: Callable) -> None:
        self.name = schema.split("(", 1)[0]
        self.qualname = f"lingrad::{self.name}"
        _LIB.define(schema)
        _LIB.impl(self.name, impl, "CPU")
        self.impl = impl
        self.overload = getattr(torch.ops.lingrad, self.name).default
        self.function: type[torch.autograd.Function] | None = None
        self._apply: Callable | None = None

    def __call__(self, *args):
        # The common cases first, with as few checks as possible (each costs 50-150 ns).
        if not (_functorch_active() or torch.compiler.is_compiling()) and _PLAIN_ARGS.issuperset(map(type, args)):
            if forward_ad._current_level < 0 and not (torch.is_grad_enabled() and any_requires_grad(*args)):
                return self._run(args)  # no graph, no tangents: the kernel
            # eager autograd or forward AD: the Function, without Function.apply's Python layer
            return self._apply(*args)
        return self.overload(*args)  # torch.func, tracing, tensor subclasses: the dispatcher

    def _run(self, args):
        try:
            if _profiling():  # named in torch.profiler's trace, as aten::linear is
                with torch.profiler.record_function(self.qualname):
                    return self.impl(*args)
            return self.impl(*args)
        except RuntimeError:  # tensors with no data for DLPack
            tensors = [a for a in args if a.__class__ in _PLAIN]
            if any(_legacy_batched(t) for t in tensors):
                # The legacy vmap (jacobian(vectorize=True), grad(is_grads_batched=True)) batches only
                # PyTorch's own operators: the same formula in them.
                return self.composite(*args)
            if any(_functorch_wrapped(t) for t in tensors):  # wrappers that outlived their transform
                return self(*(_unwrap_if_dead(a) if a.__class__ in _PLAIN else a for a in args))
            raise

    def register_fake(self, fake: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fake, lib=_LIB)
        return fake

    def register_rules(
        self, setup_context: Callable, backward: Callable, jvp: Callable, vmap: Callable, composite: Callable
    ) -> None:
        """Builds the operator's autograd.Functions from its rules: ``self.function`` for calls from
        Python, and a single-level one for the dispatcher's Autograd kernel; registers the vmap rule.
        ``composite`` is the operator written with PyTorch's operators (for the legacy vmap)."""
        name, overload, impl = self.name, self.overload, self.impl
        self.composite = composite

        def forward(*args):
            if _functorch_active():  # the next lower torch.func level (Function.apply under torch.func)
                return overload(*args)
            if not torch.compiler.is_compiling() and _PLAIN_ARGS.issuperset(map(type, args)):
                return impl(*args)
            with torch._C._AutoDispatchBelowAutograd():  # FakeTensor, FunctionalTensor: their kernels
                return overload(*args)

        class_name = "".join(part.capitalize() for part in name.split("_")) + "Function"  # e.g. LinearFunction
        self.function = _function(class_name, forward, setup_context, backward, jvp, vmap)
        self._apply = super(torch.autograd.Function, self.function).apply  # the C-level apply

        # In the dispatcher (torch.compile, torch.export, a direct call of torch.ops.lingrad.*), the
        # Autograd kernel records this level only and hands the rest of the dispatch on, as PyTorch's
        # own operators do: a Function whose forward redispatches below autograd with the key set.
        def dispatch_forward(*args):
            *args, keyset = args
            # A Function's forward runs with gradients off; the levels below this one (an outer
            # torch.func.grad or jvp) must still record, as they do for PyTorch's own operators.
            with torch.enable_grad(), forward_ad._set_fwd_grad_enabled(True):
                return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

        dispatch_function = _function(
            class_name + "Dispatch",
            dispatch_forward,
            lambda ctx, inputs, output: setup_context(ctx, inputs[:-1], output),
            lambda ctx, *grads: (*_as_tuple(backward(ctx, *grads)), None),
            lambda ctx, *tangents: jvp(ctx, *tangents[:-1]),
            None,
        )
        dispatch_apply = dispatch_function.apply  # (a single-level Function's apply is the C-level one)

        def autograd_kernel(keyset, *args):
            with enable_single_level_autograd_function():
                return dispatch_apply(*args, keyset)

        _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)
        torch.library.register_vmap(self.qualname, vmap, lib=_LIB)

    def __repr__(self) -> str:
        return f"<lingrad operator {self.overload}>"


def operator(schema: str) -> Callable[[Callable], Operator]:
    return lambda impl: Operator(schema, impl)


def _function(name: str, forward, setup_context, backward, jvp, vmap) -> type[_SingleLevelFunction]:
    """An autograd.Function from the rules. Without a vmap rule it is a single-level one (the base of
    torch.autograd.Function, as functorch's own generated Functions are): it records one level of
    autograd and never re-enters torch.func's machinery, which the dispatcher's Autograd kernel needs
    (torch >= 2.14 routes a full Function's C-level apply under an active transform to functorch's
    custom_function_call, which has no kernel at the Autograd key)."""
    rules = {"forward": forward, "setup_context": setup_context, "backward": backward, "jvp": jvp}
    if vmap is None:
        return type(name, (_SingleLevelFunction,), {k: staticmethod(f) for k, f in rules.items()})
    rules["vmap"] = vmap
    return type(name, (torch.autograd.Function,), {k: staticmethod(f) for k, f in rules.items()})


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


# Helpers of the rules.


def _sum(*terms: Tensor | None) -> Tensor | None:
    """The sum of the terms that are not None (None if all are)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


def _save_for_forward(ctx, *tensors) -> None:
    # Only where a jvp can follow: otherwise the references would keep the tensors alive.
    if forward_ad._current_level >= 0 or _functorch_active():
        ctx.save_for_forward(*tensors)


def _front(t: Tensor | None, dim: int | None) -> Tensor | None:
    """t with its vmap dimension first; an unbatched t gets a leading dimension of 1 (broadcast)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0)


def _expand_front(t: Tensor, dim: int | None, size: int) -> Tensor:
    """t with its vmap dimension first, an unbatched t expanded to the batch (a view)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


# ---------------------------------------------------------------------------------------------
# linear: y (B, out) = x (B, in) @ weight.T (out, in) + bias (out,)


@operator("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    y, out = _empty(x, x.shape[0], weight.shape[0])
    kernels.linear_forward(_array(x), _array(weight), _optional_array(bias), out=out)
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
    _save_for_forward(ctx, x, weight)


def _linear_grads(grad_y, x, weight, need_x, need_weight, need_bias, weight_dtype) -> tuple:
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
    capture = getattr(ctx, "lingrad_capture", None)
    if capture is not None:  # lingrad.privacy: keep (grad_y, x) for per-sample gradients, skip dW and db
        capture.append((grad_y, x))
        return linear_backward_input(grad_y, weight) if ctx.needs_input_grad[0] else None, None, None
    return _linear_grads(grad_y, x, weight, *ctx.needs_input_grad[:3], ctx.weight_dtype)


def _linear_jvp(ctx, t_x, t_weight, t_bias):
    x, weight = ctx.saved_tensors
    t_y = _linear_tangent(x, weight, t_x, t_weight, t_bias)
    return t_y if t_y is not None else x.new_zeros(x.shape[0], weight.shape[0])


def _linear_tangent(x, weight, t_x, t_weight, t_bias) -> Tensor | None:
    """The tangent of y = x @ weight.T + bias (None if no input has one)."""
    return _sum(
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
    y = torch.matmul(_front(x, x_dim), _front(weight, weight_dim).mT)
    if bias is not None:
        y = y + _front(bias, bias_dim).unsqueeze(-2)
    return y, 0


linear.register_rules(_linear_setup, _linear_backward, _linear_jvp, _linear_vmap, torch.nn.functional.linear)


# ---------------------------------------------------------------------------------------------
# linear_backward_input: grad_x (B, in) = grad_out (B, out) @ weight (out, in)


@operator("linear_backward_input(Tensor grad_out, Tensor weight) -> Tensor")
def linear_backward_input(grad_out: Tensor, weight: Tensor) -> Tensor:
    grad_x, out = _empty(grad_out, grad_out.shape[0], weight.shape[1])
    kernels.linear_backward_input(_array(grad_out), _array(weight), out=out)
    return grad_x


@linear_backward_input.register_fake
def _(grad_out, weight):
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1])


def _linear_backward_input_setup(ctx, inputs, output):
    grad_out, weight = inputs
    need_grad_out, need_weight = ctx.needs_input_grad[:2]
    ctx.save_for_backward(grad_out if need_weight else None, weight if need_grad_out else None)
    _save_for_forward(ctx, grad_out, weight)


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
    return _sum(
        None if t_grad_out is None else linear_backward_input(t_grad_out, weight),
        None if t_weight is None else linear_backward_input(grad_out, t_weight),
    )


def _linear_backward_input_vmap(info, in_dims, grad_out, weight):
    grad_dim, weight_dim = in_dims
    if weight_dim is None:
        gs = grad_out.movedim(grad_dim, 0)
        grad_x = linear_backward_input(gs.reshape(-1, gs.shape[-1]), weight)
        return grad_x.reshape(*gs.shape[:-1], grad_x.shape[-1]), 0
    return torch.matmul(_front(grad_out, grad_dim), _front(weight, weight_dim)), 0


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
    grad_weight, out = _empty(like, out_features, x.shape[1])
    grad_bias, bias_out = _empty(like, out_features) if bias else (None, None)
    kernels.linear_backward_weight(_array(grad_out), _array(x), bias=bias, out=out, bias_out=bias_out)
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
    _save_for_forward(ctx, grad_out, x)
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
    t_weight = _sum(
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


# ---------------------------------------------------------------------------------------------
# mse_loss and mse_backward: pred and target of one shape, 1-D or 2-D


@operator("mse_loss(Tensor pred, Tensor target, str reduction) -> Tensor")
def mse_loss(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        loss, out = _empty(pred, *pred.shape)
        kernels.mse_loss(_array(pred), _array(target), reduction, out=out)
        return loss
    return _scalar(kernels.mse_loss(_array(pred), _array(target), reduction), pred)


@mse_loss.register_fake
def _(pred, target, reduction):
    return pred.new_empty(pred.shape if reduction == "none" else ())


def _mse_loss_setup(ctx, inputs, output):
    pred, target, reduction = inputs
    ctx.save_for_backward(pred, target)
    _save_for_forward(ctx, pred, target)
    ctx.reduction = reduction


def _mse_loss_backward(ctx, grad_loss):
    # grad_loss is 0-d for "mean"/"sum", pred's shape for "none".
    pred, target = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[:2]
    grad_pred = grad_loss * mse_backward(pred, target, ctx.reduction)
    return (grad_pred if need_pred else None, -grad_pred if need_target else None, None)


def _mse_loss_jvp(ctx, t_pred, t_target, _):
    pred, target = ctx.saved_tensors
    t_residual = _sum(t_pred, None if t_target is None else -t_target)
    product = mse_backward(pred, target, ctx.reduction) * t_residual  # d (r^2) = 2 r dr, scaled by 1/N
    return product if ctx.reduction == "none" else product.sum()


def _mse_loss_vmap(info, in_dims, pred, target, reduction):
    pred_dim, target_dim, _ = in_dims
    p = _expand_front(pred, pred_dim, info.batch_size)
    t = _expand_front(target, target_dim, info.batch_size)
    squares = mse_loss(p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1), "none")  # the kernel, all at once
    if reduction == "none":
        return squares.reshape(p.shape), 0
    return (squares.mean(1) if reduction == "mean" else squares.sum(1)), 0


@operator("mse_backward(Tensor pred, Tensor target, str reduction) -> Tensor")
def mse_backward(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    grad, out = _empty(pred, *pred.shape)
    kernels.mse_backward(_array(pred), _array(target), reduction, out=out)
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
    return ctx.scale * _sum(t_pred, None if t_target is None else -t_target)


def _mse_backward_vmap(info, in_dims, pred, target, reduction):
    pred_dim, target_dim, _ = in_dims
    p = _expand_front(pred, pred_dim, info.batch_size)
    t = _expand_front(target, target_dim, info.batch_size)
    # each sample's own N: the kernel's "sum" (2 r), scaled per sample
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
    grad_y, grad_y_out = _empty(_grad_y_like(x, weight), x.shape[0], weight.shape[0])
    loss, grad_x, grad_weight, grad_bias = kernels.linear_mse(
        _array(x),
        _array(weight),
        _optional_array(bias),
        _array(target),
        reduction,
        input_grad=input_grad,
        grad_output=grad_y_out,
    )
    # The gradients stay inside the Function (backward returns scaled copies): NumPy's memory is fine.
    grad_x, grad_weight, grad_bias = (None if g is None else _tensor(g) for g in (grad_x, grad_weight, grad_bias))
    return _scalar(loss, _loss_like(x, target)), grad_x, grad_weight, grad_bias, grad_y


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
    # (instead of y and the target) grad_y = 2 (y - target) / N.
    ctx.save_for_backward(x if need_weight else None, weight if need_x else None, grad_y)
    # The gradients the kernel made, handed out by the first backward (later ones recompute them).
    ctx.made = (grad_x, grad_weight, grad_bias)
    # The inputs that need gradients, for double backward only: their values are never read there.
    ctx.inputs = tuple(t if need else None for t, need in zip((x, weight, bias, target), ctx.needs_input_grad))
    ctx.scale = 2.0 / max(grad_y.numel(), 1) if reduction == "mean" else 2.0
    ctx.weight_dtype = weight.dtype
    _save_for_forward(ctx, x, weight, grad_y)


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
    return grad_y + ctx.scale * _sum(*delta)


def _linear_mse_backward(ctx, grad_loss, *_):
    x, weight, grad_y = ctx.saved_tensors
    need_x, need_weight, need_bias, need_target = ctx.needs_input_grad[:4]
    extra = (None, None)  # reduction, input_grad
    if torch.is_grad_enabled():  # create_graph=True (or torch.func): differentiable gradients
        grad_y = grad_loss * _differentiable_grad_y(ctx, x, weight, grad_y)
        grad_x, grad_weight, grad_bias = _linear_grads(
            grad_y, x, weight, need_x, need_weight, need_bias, ctx.weight_dtype
        )
        return (grad_x, grad_weight, grad_bias, -grad_y if need_target else None, *extra)
    made, ctx.made = ctx.made, None  # handed out once: no returned gradient aliases saved state
    if made is None:
        made = _linear_grads(grad_y, x, weight, need_x, need_weight, need_bias, ctx.weight_dtype)
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


linear_mse_loss = super(torch.autograd.Function, _LinearMSELoss).apply  # the C-level apply (as Operator._apply)


def _linear_mse_jvp(ctx, t_x, t_weight, t_bias, t_target, *_):
    x, weight, grad_y = ctx.saved_tensors
    t_y = _linear_tangent(x, weight, t_x, t_weight, t_bias)
    t_residual = _sum(t_y, None if t_target is None else -t_target)
    if t_residual is None:
        return grad_y.new_zeros(()), None, None, None, None
    return (grad_y * t_residual).sum(), None, None, None, None  # d loss = <grad_y, d (y - target)>


def _linear_mse_vmap(info, in_dims, x, weight, bias, target, reduction, input_grad):
    # Per-sample losses of the fused step: each sample has its own weight gradient, so the batch is
    # PyTorch's batched matmul over the kernels' operators' formulas.
    n = info.batch_size
    xs, ws, ts = (_expand_front(t, d, n) for t, d in zip((x, weight, target), (in_dims[0], in_dims[1], in_dims[3])))
    bs = None if bias is None else _expand_front(bias, in_dims[2], n)
    y = torch.matmul(xs, ws.mT) + (0 if bs is None else bs.unsqueeze(-2))
    residual = y - ts
    count = residual[0].numel()
    scale = 2.0 / max(count, 1) if reduction == "mean" else 2.0
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
