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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from . import _C, _ops

__all__ = ["linear", "mse_loss", "linear_mse_loss", "FallbackWarning"]


class FallbackWarning(UserWarning):
    """lingrad could not run its kernels on these tensors and used PyTorch's implementation."""


# ---------------------------------------------------------------------------------------------
# The one fallback decision.

# bfloat16 crosses to the kernels as an ml_dtypes.bfloat16 array: offered when ml_dtypes is there.
_BF16 = bool(_C.build_info()["bf16_numpy"])
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16) if _BF16 else (torch.float32, torch.float64)
_STRIDED = torch.strided
_fallback_warned = False  # once per process; tests reset it


def _readable(t: Tensor | None) -> bool:
    """The kernels can read t in place (None is an absent bias). A negative view is resolved on the
    way in (lingrad._ops._array)."""
    return t is None or (
        isinstance(t, Tensor) and t.dtype in _KERNEL_DTYPES and t.is_cpu and t.layout == _STRIDED and not t.is_nested
    )


def _autocast_lowers() -> bool:
    """True under torch.autocast("cpu") to a precision lingrad has no kernels for (float16):
    nn.Linear then computes in it, and so does PyTorch's implementation here."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") not in _KERNEL_DTYPES


def _autocast_bf16(*tensors: Tensor | None) -> bool:
    """True under torch.autocast("cpu", dtype=torch.bfloat16) for float32/bfloat16 CPU tensors:
    lingrad then casts the input as autocast would and runs its bfloat16 products."""
    return (
        _BF16
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and all(
            t is None or (isinstance(t, Tensor) and t.dtype in (torch.float32, torch.bfloat16) and t.is_cpu)
            for t in tensors
        )
    )


# How the kernels (and the bridge to them) refuse tensors they cannot read: a TypeError for another
# dtype or device, a RuntimeError or BufferError from DLPack for tensors with no plain storage
# (sparse, nested, meta). The fast paths try the kernels first and ask _kernels_take only when they
# refuse, so that a call pays for no checks the kernels make anyway.
_UNSUPPORTED = (TypeError, RuntimeError, BufferError)


def _kernels_take(*tensors: Tensor | None, autocast_lowers: bool = False) -> bool:
    """True if lingrad's kernels take these tensors. Otherwise the caller uses PyTorch's
    implementation, after a one-time FallbackWarning for floating-point tensors."""
    if not autocast_lowers and all(_readable(t) for t in tensors):
        return True
    global _fallback_warned
    present = [t for t in tensors if t is not None]
    if (
        not torch.compiler.is_compiling()  # Dynamo cannot trace warnings.warn (a graph break)
        and not _fallback_warned
        and all(isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) for t in present)
    ):
        _fallback_warned = True
        if autocast_lowers:
            kinds = f"torch.autocast to {torch.get_autocast_dtype('cpu')}"
        else:
            kinds = ", ".join(sorted({_describe(t) for t in present}))
        warnings.warn(
            f"lingrad computes on CPU float32/float64/bfloat16 strided tensors; got {kinds}, so PyTorch's own "
            "implementation is used (this warning is shown once per process)",
            FallbackWarning,
            stacklevel=3,
        )
    return False


def _kernels_or_pytorch(kernels: Callable[[], Tensor], pytorch: Callable[[], Tensor], *tensors) -> Tensor:
    """kernels() where lingrad's kernels take the tensors, else pytorch() (after the one-time
    FallbackWarning). In eager code the kernels are simply tried: they refuse what they cannot
    read, and only then is _kernels_take asked. While torch.compile traces (the graph cannot fall
    back when it runs) and under autocast (PyTorch computes in the lower precision), it is asked first."""
    lowers = _autocast_lowers()
    if lowers or torch.compiler.is_compiling():
        return kernels() if _kernels_take(*tensors, autocast_lowers=lowers) else pytorch()
    try:
        return kernels()
    except _UNSUPPORTED:
        if _kernels_take(*tensors):
            raise  # tensors the kernels take: a real error (mixed dtypes, say)
    return pytorch()


def _describe(t: Tensor) -> str:
    layout = "" if t.layout == torch.strided and not t.is_nested else f" {'nested' if t.is_nested else t.layout}"
    return f"{t.dtype}{layout} on {t.device}"


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
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)):
        return F.linear(input, weight, bias)  # PyTorch's TypeError for what is not a tensor
    if _autocast_bf16(input, weight, bias):
        input = input.to(torch.bfloat16)  # as autocast casts F.linear's input (weight and bias: see the top)
    elif input.dtype != weight.dtype and torch.bfloat16 in (input.dtype, weight.dtype):
        # (the kernels mix float32 and bfloat16; nn.Linear outside autocast does not)
        raise TypeError(
            f"weight has dtype {weight.dtype} but input has dtype {input.dtype}: a Linear layer computes in "
            "one dtype (mix float32 parameters with bfloat16 inputs under torch.autocast)"
        )
    return _kernels_or_pytorch(
        lambda: _linear(input, weight, bias), lambda: F.linear(input, weight, bias), input, weight, bias
    )


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if input.dim() == 2:  # the common case, straight to the kernel (or the Function, with a graph)
        return _ops.linear(input, weight, bias)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (*, in_features), got a 0-d tensor")
    y = _ops.linear(_rows(input), weight, bias)
    return y.reshape(*input.shape[:-1], y.shape[-1])


def _mse_operands(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor] | None:
    """input and target as the kernels take them, with F.mse_loss's type promotion and
    broadcasting; None if they go to PyTorch."""
    dtype = torch.result_type(input, target) if input.dtype != target.dtype else input.dtype
    if dtype == torch.bfloat16:  # no bfloat16 MSE kernel: PyTorch's elementwise loss, no warning
        return None
    if dtype not in _KERNEL_DTYPES:
        _kernels_take(input, target)  # the warning, for floating-point tensors
        return None
    if input.dtype != dtype:  # differentiable casts, as PyTorch's promotion
        input = input.to(dtype)
    if target.dtype != dtype:
        target = target.to(dtype)
    if not _kernels_take(input, target):
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
        input, target = _rows(input), _rows(target)
    loss = _ops.mse_loss(input, target, reduction)
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
    autocast_bf16 = isinstance(target, Tensor) and _autocast_bf16(input, weight, bias, target)
    if autocast_bf16:
        input = input.to(torch.bfloat16)  # autocast's F.linear; its mse_loss runs in float32
    fusable = (
        isinstance(target, Tensor)
        and (target.dtype == input.dtype or autocast_bf16)
        and target.shape[:-1] == input.shape[:-1]
        and input.dim() > 0
        and not torch._C._are_functorch_transforms_active()  # torch.func: the per-operator rules
    )
    unfused = lambda: mse_loss(linear(input, weight, bias), target, reduction)  # noqa: E731 (falls back in turn)
    if not fusable:
        return unfused()
    return _kernels_or_pytorch(
        lambda: _linear_mse_loss(input, weight, bias, target, reduction), unfused, input, weight, bias, target
    )


def _linear_mse_loss(input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, reduction: str) -> Tensor:
    x, t = (input, target) if input.dim() == 2 else (_rows(input), _rows(target))
    if torch.compiler.is_compiling() or forward_ad._current_level >= 0:  # the operator and its rules
        if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (x, weight, bias, t)):
            return _ops.linear_mse(x, weight, bias, t, reduction, x.requires_grad)[0]
    elif torch.is_grad_enabled() and _ops.any_requires_grad(x, weight, bias, t):
        return _ops.linear_mse_loss(x, weight, bias, t, reduction, x.requires_grad)  # the gradients wait inside
    # No graph: the forward GEMM and the loss only (the fused kernel would also make dW).
    return _ops.mse_loss(_ops.linear(x, weight, bias), t, reduction)
