"""Functions with torch.nn.functional's semantics, computed by lingrad's kernels.

    linear(input (*, in), weight (out, in), bias (out,) = None)        -> (*, out)
    mse_loss(input, target, reduction="mean")                          -> 0-d ("mean", "sum") or the broadcast shape
    linear_mse_loss(input (*, in), weight, bias, target (*, out), reduction="mean")
                                           -> 0-d: mse_loss(linear(input, weight, bias), target, reduction)

They agree with torch.nn.functional wherever it works: leading dimensions, 1-D input, empty
batches, any strides; mse_loss promotes mixed dtypes and broadcasts (with PyTorch's warning) as
F.mse_loss does; autograd, torch.func transforms, forward-mode AD and torch.compile all apply.

lingrad's kernels run on CPU float32, float64 and bfloat16 tensors with ordinary strided storage
(a negative view is resolved first; bfloat16 needs the ml_dtypes package). Anything else goes to
PyTorch's own implementation: float16 and complex tensors, other devices, other layouts (sparse,
nested, MKL-DNN), and calls under ``torch.autocast`` to float16, with one :class:`FallbackWarning`
per process (none while torch.compile traces). Integer tensors go there without a warning and fail
(or compute) exactly as they do in PyTorch.

bfloat16: linear and linear_mse_loss run lingrad's bfloat16 products (float32 sums). Under
``torch.autocast("cpu", dtype=torch.bfloat16)`` linear does what autocast does to F.linear, on
lingrad's kernels: the input is cast to bfloat16 and the output is bfloat16; a float32 weight and
bias are rounded to bfloat16 as the kernels pack them (not copied), and receive float32 gradients
summed in float32 (PyTorch rounds them to bfloat16 on the way). mse_loss of bfloat16 tensors is
PyTorch's (an elementwise loss; autocast computes it in float32). The fused linear_mse_loss keeps y
in float32 for the loss, where the unfused pair rounds it to bfloat16 first.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from lingrad.torch import ops_linear, ops_mse
from lingrad.torch._bridge import (
    KERNEL_DTYPES,
    UNSUPPORTED,
    FallbackWarning,
    autocast_bf16,
    kernels_or_pytorch,
    kernels_take,
    rows,
)
from lingrad.torch.ops import PLAIN, any_requires_grad, functorch_active

__all__ = ["linear", "mse_loss", "linear_mse_loss", "FallbackWarning"]

_autocast = torch.is_autocast_enabled
_compiling = torch.compiler.is_compiling


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = input @ weight.T + bias, as torch.nn.functional.linear.

    input (*, in_features): any number of leading dimensions, or none (1-D); an empty batch is
    fine. A 2-D input of any strides (e.g. transposed) is read in place; leading dimensions that
    cannot be merged into one without a copy are copied, as in torch.matmul.
    weight (out_features, in_features), bias (out_features,) or None. Returns (*, out_features).
    """
    # The common case first, in one pass: plain tensors of one dtype the kernels compute in, eager,
    # no autocast. The kernels refuse what they cannot read (another device or layout), and only then
    # is the fallback decided. (Each check costs 50-150 ns; the general path below makes them all.)
    if (
        input.__class__ in PLAIN
        and weight.__class__ in PLAIN
        and (bias is None or bias.__class__ in PLAIN)
        and input.dtype is weight.dtype
        and input.dtype in KERNEL_DTYPES
        and not _autocast("cpu")
        and not _compiling()
        and not functorch_active()
    ):
        try:
            if input.dim() == 2:
                return ops_linear.linear.eager((input, weight, bias))  # (Operator.__call__'s checks made here)
            return _linear(input, weight, bias)
        except UNSUPPORTED:
            if kernels_take(input, weight, bias):
                raise  # tensors the kernels take: a real error
        return F.linear(input, weight, bias)
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)):
        return F.linear(input, weight, bias)  # PyTorch's TypeError for what is not a tensor
    if autocast_bf16(input, weight, bias):
        input = input.to(torch.bfloat16)  # as autocast casts F.linear's input (weight and bias: see the top)
    elif input.dtype != weight.dtype and torch.bfloat16 in (input.dtype, weight.dtype):
        # (the kernels mix float32 and bfloat16; nn.Linear outside autocast does not)
        raise TypeError(
            f"weight has dtype {weight.dtype} but input has dtype {input.dtype}: a Linear layer computes in "
            "one dtype (mix float32 parameters with bfloat16 inputs under torch.autocast)"
        )
    return kernels_or_pytorch(
        lambda: _linear(input, weight, bias), lambda: F.linear(input, weight, bias), input, weight, bias
    )


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if input.dim() == 2:  # the common case, straight to the kernel (or the Function, with a graph)
        return ops_linear.linear(input, weight, bias)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (*, in_features), got a 0-d tensor")
    y = ops_linear.linear(rows(input), weight, bias)
    return y.reshape(*input.shape[:-1], y.shape[-1])


def _mse_operands(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor] | None:
    """input and target as the kernels take them, with F.mse_loss's type promotion and
    broadcasting; None if they go to PyTorch."""
    dtype = torch.result_type(input, target) if input.dtype != target.dtype else input.dtype
    if dtype == torch.bfloat16:  # no bfloat16 MSE kernel: PyTorch's elementwise loss, no warning
        return None
    if dtype not in KERNEL_DTYPES:
        kernels_take(input, target)  # the warning, for floating-point tensors
        return None
    if input.dtype != dtype:  # differentiable casts, as PyTorch's promotion
        input = input.to(dtype)
    if target.dtype != dtype:
        target = target.to(dtype)
    if not kernels_take(input, target):
        return None
    if input.shape != target.shape:
        warnings.warn(  # F.mse_loss's own warning, word for word
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
        input, target = torch.broadcast_tensors(input, target)  # zero-stride views, read in place
    return input, target


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean-squared error, as torch.nn.functional.mse_loss: "mean" (0-d), "sum" (0-d) or "none"
    (the broadcast shape). Mixed dtypes are promoted and different shapes broadcast (with
    PyTorch's warning), as F.mse_loss does."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean' or 'sum' or 'none', got {reduction!r}")
    operands = _mse_operands(input, target) if isinstance(input, Tensor) and isinstance(target, Tensor) else None
    if operands is None:
        return F.mse_loss(input, target, reduction=reduction)
    input, target = operands
    shape = input.shape
    if input.dim() == 0:  # the kernels take 1-D or 2-D
        input, target = input.reshape(1), target.reshape(1)
    elif input.dim() > 2:
        input, target = rows(input), rows(target)
    loss = ops_mse.mse_loss(input, target, reduction)
    return loss.reshape(shape) if reduction == "none" else loss


def linear_mse_loss(
    input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, reduction: str = "mean"
) -> Tensor:
    """mse_loss(linear(input, weight, bias), target, reduction), reduction "mean" or "sum", fused:
    one kernel call computes the loss and, for backward, every gradient needed.

    input (*, in_features), target (*, out_features) with the same leading dimensions. A target of
    another dtype or shape takes the unfused path with F.mse_loss's promotion and broadcasting.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    to_bf16 = isinstance(target, Tensor) and autocast_bf16(input, weight, bias, target)
    if to_bf16:
        input = input.to(torch.bfloat16)  # autocast's F.linear; its mse_loss runs in float32
    fusable = (
        isinstance(target, Tensor)
        and (target.dtype == input.dtype or to_bf16)
        and target.shape[:-1] == input.shape[:-1]
        and input.dim() > 0
        and not torch._C._are_functorch_transforms_active()  # torch.func: the per-operator rules
    )
    unfused = lambda: mse_loss(linear(input, weight, bias), target, reduction)  # noqa: E731 (falls back in turn)
    if not fusable:
        return unfused()
    return kernels_or_pytorch(
        lambda: _linear_mse_loss(input, weight, bias, target, reduction), unfused, input, weight, bias, target
    )


def _linear_mse_loss(input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, reduction: str) -> Tensor:
    x, t = (input, target) if input.dim() == 2 else (rows(input), rows(target))
    if torch.compiler.is_compiling() or forward_ad._current_level >= 0:  # the operator and its rules
        if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (x, weight, bias, t)):
            return ops_mse.linear_mse(x, weight, bias, t, reduction, x.requires_grad)[0]
    elif torch.is_grad_enabled() and any_requires_grad(x, weight, bias, t):
        return ops_mse.linear_mse_loss(x, weight, bias, t, reduction, x.requires_grad)  # the gradients wait inside
    # No graph: the forward GEMM and the loss only (the fused kernel would also make dW).
    return ops_mse.mse_loss(ops_linear.linear(x, weight, bias), t, reduction)
