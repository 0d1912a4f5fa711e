"""Functions with torch.nn.functional's semantics, computed by lingrad's kernels.

    linear(input (*, in), weight (out, in), bias (out,) = None)        -> (*, out)
    mse_loss(input, target, reduction="mean")                          -> 0-d ("mean", "sum") or input's shape
    linear_mse_loss(input (*, in), weight, bias, target (*, out), reduction="mean")
                                           -> 0-d: mse_loss(linear(input, weight, bias), target, reduction)

lingrad's kernels run on CPU float32 and float64 tensors. Other floating-point tensors (float16,
bfloat16, complex, another device) go to PyTorch's own implementation, with one
:class:`FallbackWarning` per process (none while torch.compile traces); integer tensors go there
without a warning and fail (or compute) exactly as they do in PyTorch.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import LinearFunction, LinearMSEFunction, MSELossFunction

__all__ = ["linear", "mse_loss", "linear_mse_loss", "FallbackWarning"]


class FallbackWarning(UserWarning):
    """lingrad could not run its kernels on these tensors and used PyTorch's implementation."""


# ---------------------------------------------------------------------------------------------
# The one fallback decision.

_KERNEL_DTYPES = (torch.float32, torch.float64)
_fallback_warned = False  # once per process; tests reset it


def _kernels_handle(*tensors: Tensor | None) -> bool:
    """True if lingrad's kernels take these tensors (None is an absent bias). Otherwise the caller
    uses PyTorch's implementation, after a one-time FallbackWarning for floating-point tensors."""
    global _fallback_warned
    for t in tensors:
        if t is not None and not (isinstance(t, Tensor) and t.is_cpu and t.dtype in _KERNEL_DTYPES):
            break
    else:
        return True
    present = [t for t in tensors if t is not None]
    if (
        not torch.compiler.is_compiling()  # Dynamo cannot trace warnings.warn (a graph break)
        and not _fallback_warned
        and all(isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) for t in present)
    ):
        _fallback_warned = True
        kinds = ", ".join(sorted({f"{t.dtype} on {t.device}" for t in present}))
        warnings.warn(
            f"lingrad computes on CPU float32/float64 tensors; got {kinds}, so PyTorch's own "
            "implementation is used (this warning is shown once per process)",
            FallbackWarning,
            stacklevel=3,
        )
    return False


def _rows(t: Tensor) -> Tensor:
    """(*, n) as the 2-D (rows, n) the kernels take: a view when the leading dimensions allow."""
    return t.unsqueeze(0) if t.dim() == 1 else t.flatten(0, -2)


# ---------------------------------------------------------------------------------------------


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = input @ weight.T + bias, as torch.nn.functional.linear.

    input (*, in_features): any number of leading dimensions, or none (1-D); an empty batch is
    fine. A 2-D input of any strides (e.g. transposed) is read in place; leading dimensions that
    cannot be merged into one without a copy are copied, as in torch.matmul.
    weight (out_features, in_features), bias (out_features,) or None. Returns (*, out_features).
    """
    if not _kernels_handle(input, weight, bias):
        return F.linear(input, weight, bias)
    if input.dim() == 2:  # the common case, straight to the kernel
        return LinearFunction.apply(input, weight, bias)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (*, in_features), got a 0-d tensor")
    y = LinearFunction.apply(_rows(input), weight, bias)
    return y.reshape(*input.shape[:-1], y.shape[-1])


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean-squared error, as torch.nn.functional.mse_loss: "mean" (0-d), "sum" (0-d) or "none"
    (input's shape). input and target must have the same shape (no broadcasting)."""
    if not _kernels_handle(input, target):
        return F.mse_loss(input, target, reduction=reduction)
    if input.shape != target.shape:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but input has shape {tuple(input.shape)}; "
            "lingrad's mse_loss does not broadcast: they must match"
        )
    shape = input.shape
    if input.dim() == 0:  # the kernels take 1-D or 2-D
        input, target = input.reshape(1), target.reshape(1)
    elif input.dim() > 2:
        input, target = _rows(input), _rows(target)
    loss = MSELossFunction.apply(input, target, reduction)
    return loss.reshape(shape) if reduction == "none" else loss


def linear_mse_loss(
    input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, reduction: str = "mean"
) -> Tensor:
    """mse_loss(linear(input, weight, bias), target, reduction), reduction "mean" or "sum", fused:
    one kernel call computes the loss and, for backward, every gradient needed (see
    :class:`lingrad.autograd.LinearMSEFunction`).

    input (*, in_features), target (*, out_features) with the same leading dimensions.
    """
    if not _kernels_handle(input, weight, bias, target):
        return F.mse_loss(F.linear(input, weight, bias), target, reduction=reduction)
    if input.dim() != 2 or target.dim() != 2:
        if input.dim() == 0 or target.dim() == 0 or target.shape[:-1] != input.shape[:-1]:
            raise ValueError(
                f"input has shape {tuple(input.shape)} and target {tuple(target.shape)}: they must be "
                "(*, in_features) and (*, out_features) with the same leading dimensions *"
            )
        input, target = _rows(input), _rows(target)
    if not torch.is_grad_enabled():
        # No graph will be recorded, but the Function sees only requires_grad: detached inputs
        # tell it that no gradient is wanted (it then runs the forward GEMM and the loss only).
        input, weight, target = input.detach(), weight.detach(), target.detach()
        bias = None if bias is None else bias.detach()
    return LinearMSEFunction.apply(input, weight, bias, target, reduction)
