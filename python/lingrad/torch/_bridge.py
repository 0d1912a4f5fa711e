"""The bridge between tensors and lingrad's kernels: the one module of the layer that turns tensors
into the kernels' arrays and their results back into tensors, that decides when PyTorch computes
instead, and that states the per-sample capture protocol of lingrad.privacy.

    to_array(t) / optional_array(t) / to_arrays(ts)   tensor -> what a kernel reads (itself, or a DLPack capsule)
    empty_out(like, *shape) -> (tensor, capsule)       a new tensor and the capsule a kernel fills
    as_tensor(a)                                       a kernel's NumPy result -> tensor (same memory)
    scalar(loss, like)                                 a kernel's float loss -> 0-d tensor
    rows(t)                                            (*, n) -> the 2-D (rows, n) the kernels take
    kernels_or_pytorch(kernels, pytorch, *tensors)     the fallback decision (see FallbackWarning)
    start_capture / capture_list / end_capture         the capture protocol (bottom of the file)
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
import torch.utils.dlpack
from torch import Tensor

from lingrad import _C

# ---------------------------------------------------------------------------------------------
# Tensors to arrays and back. The bindings read a CPU tensor in place, with its memory and strides
# (transposed or sliced views stay views):
# - torch >= 2.10 publishes DLPack's C exchange API on torch.Tensor (__dlpack_c_exchange_api__): the
#   tensor itself is handed over, and the bindings view it through that API (tens of nanoseconds;
#   they also read a negative view, PyTorch's neg bit, through its resolve_neg() copy).
# - older torch: as a DLPack capsule (torch.utils.dlpack.to_dlpack), which the bindings consume;
#   a negative view is resolved here first (DLPack carries no negative bit).
# Tensor.numpy() would do the same but mark the tensor's storage as not resizable for good
# (nn.Linear never does that to a tensor), and it costs more. The kernels validate the arrays.

EXCHANGE = hasattr(Tensor, "__dlpack_c_exchange_api__")
to_dlpack = torch.utils.dlpack.to_dlpack  # (looked up at each call: tests spy on it)


def to_array(t: Tensor):
    """t as a kernel argument: the tensor itself (EXCHANGE), or a DLPack capsule of its memory (a
    negative view resolved first)."""
    if EXCHANGE:
        return t
    return to_dlpack(t.resolve_neg() if t.is_neg() else t)


def optional_array(t: Tensor | None):
    """to_array(t), or None for an absent tensor (a bias)."""
    return t if EXCHANGE or t is None else to_array(t)


def to_arrays(tensors) -> list:
    """[optional_array(t) for t in tensors]: a network's weights or biases."""
    return list(tensors) if EXCHANGE else [optional_array(t) for t in tensors]


def empty_out(like: Tensor, *shape: int) -> tuple[Tensor, object]:
    """A new tensor of like's dtype (allocated by torch) and what a kernel fills it through (out=)."""
    t = like.new_empty(*shape)  # (half the cost of torch.empty(shape, dtype=...))
    return t, (t if EXCHANGE else to_dlpack(t))


def as_tensor(a: np.ndarray) -> Tensor:
    """A kernel's NumPy result as a tensor sharing its memory (a bfloat16 array through its bits:
    torch.from_numpy knows no ml_dtypes)."""
    if a.dtype.kind == "V":  # ml_dtypes.bfloat16
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def scalar(loss: float, like: Tensor) -> Tensor:
    """A kernel's mean/sum loss as a 0-d tensor of like's dtype."""
    # The kernels return mean/sum losses as Python floats (accumulated in double); torch wants a
    # 0-d tensor of the input's dtype. A float32 loss beyond float32's range is inf, as PyTorch's
    # own float32 sum gives (scalar_tensor would raise on the overflow).
    if like.dtype == torch.float32 and math.isfinite(loss) and abs(loss) > _FLOAT32_MAX:
        loss = math.copysign(math.inf, loss)
    return torch.scalar_tensor(loss, dtype=like.dtype)


def rows(t: Tensor) -> Tensor:
    """(*, n) as the 2-D (rows, n) the kernels take: a view when the leading dimensions allow."""
    return t.unsqueeze(0) if t.dim() == 1 else t.flatten(0, -2)


# ---------------------------------------------------------------------------------------------
# The one fallback decision: the kernels, or PyTorch's own implementation.


class FallbackWarning(UserWarning):
    """lingrad could not run its kernels on these tensors and used PyTorch's implementation."""


# bfloat16 crosses to the kernels as an ml_dtypes.bfloat16 array: offered when ml_dtypes is there.
BF16 = bool(_C.build_info()["bf16_numpy"])
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16) if BF16 else (torch.float32, torch.float64)
_STRIDED = torch.strided
fallback_warned = False  # the FallbackWarning is shown once per process; tests reset this


def _readable(t: Tensor | None) -> bool:
    """The kernels can read t in place (None is an absent bias). A negative view is resolved on the
    way in (to_array)."""
    return t is None or (
        isinstance(t, Tensor) and t.dtype in KERNEL_DTYPES and t.is_cpu and t.layout == _STRIDED and not t.is_nested
    )


def autocast_lowers() -> bool:
    """True under torch.autocast("cpu") to a precision lingrad has no kernels for (float16):
    nn.Linear then computes in it, and so does PyTorch's implementation here."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") not in KERNEL_DTYPES


def autocast_bf16(*tensors: Tensor | None) -> bool:
    """True under torch.autocast("cpu", dtype=torch.bfloat16) for float32/bfloat16 CPU tensors:
    lingrad then casts the input as autocast would and runs its bfloat16 products."""
    return (
        BF16
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and all(
            t is None or (isinstance(t, Tensor) and t.dtype in (torch.float32, torch.bfloat16) and t.is_cpu)
            for t in tensors
        )
    )


# How the kernels (and the bridge to them) refuse tensors they cannot read: a TypeError for another
# dtype or device, a RuntimeError or BufferError from DLPack for tensors with no plain storage
# (sparse, nested, meta). The fast paths try the kernels first and ask kernels_take only when they
# refuse, so that a call pays for no checks the kernels make anyway.
UNSUPPORTED = (TypeError, RuntimeError, BufferError)


def kernels_take(*tensors: Tensor | None, autocast_lowers: bool = False) -> bool:
    """True if lingrad's kernels take these tensors. Otherwise the caller uses PyTorch's
    implementation, after a one-time FallbackWarning for floating-point tensors (attributed to the
    caller of the function that calls this one)."""
    if not autocast_lowers and all(_readable(t) for t in tensors):
        return True
    global fallback_warned
    present = [t for t in tensors if t is not None]
    if (
        not torch.compiler.is_compiling()  # Dynamo cannot trace warnings.warn (a graph break)
        and not fallback_warned
        and all(isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) for t in present)
    ):
        fallback_warned = True
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


def kernels_or_pytorch(kernels: Callable[[], Tensor], pytorch: Callable[[], Tensor], *tensors) -> Tensor:
    """kernels() where lingrad's kernels take the tensors, else pytorch() (after the one-time
    FallbackWarning). In eager code the kernels are simply tried: they refuse what they cannot
    read, and only then is kernels_take asked. While torch.compile traces (the graph cannot fall
    back when it runs) and under autocast (PyTorch computes in the lower precision), it is asked first."""
    lowers = autocast_lowers()
    if lowers or torch.compiler.is_compiling():
        return kernels() if kernels_take(*tensors, autocast_lowers=lowers) else pytorch()
    try:
        return kernels()
    except UNSUPPORTED:
        if kernels_take(*tensors):
            raise  # tensors the kernels take: a real error (mixed dtypes, say)
    return pytorch()


def _describe(t: Tensor) -> str:
    layout = "" if t.layout == torch.strided and not t.is_nested else f" {'nested' if t.is_nested else t.layout}"
    return f"{t.dtype}{layout} on {t.device}"


# ---------------------------------------------------------------------------------------------
# The per-sample capture protocol, between lingrad.privacy and the backward rules of the graph
# nodes it reads: the linear operator's node (lingrad.Linear, lingrad.functional.linear;
# ops_linear.LINEAR_NODE) and a FusedMLP's node with loss=None (mlp.MLP_NODE).
#
#   list = start_capture(node)   privacy, before its one backward pass, on each such node
#   capture_list(ctx)            the node's backward: the list, or None when nobody captures
#   end_capture(node)            privacy, after that backward pass (also when it raises)
#
# A capturing node makes no weight or bias gradient (it returns None for them) and only its input
# gradient; it appends to the list what each layer's per-sample gradients are made of:
#   the linear node:  (grad_y (B, out), x (B, in))                        once per backward call
#   a FusedMLP node:  (layer index, grad_out (B, out) of that Linear, its input (B, in))  per layer
# The list lives on the node as the attribute below, for that backward pass only.

_CAPTURE = "lingrad_capture"


def start_capture(node) -> list:
    """Makes node's next backward capture (see above); returns the list it appends to."""
    capture: list = []
    setattr(node, _CAPTURE, capture)
    return capture


def capture_list(ctx) -> list | None:
    """In a backward rule (ctx is the graph node): the list to append to, or None if not capturing."""
    return getattr(ctx, _CAPTURE, None)


def end_capture(node) -> None:
    """Ends start_capture(node): the node's backward makes its gradients again."""
    delattr(node, _CAPTURE)
