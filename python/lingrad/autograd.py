"""torch.autograd.Functions over lingrad's kernels (CPU float32/float64 tensors, zero-copy).

    LinearFunction.apply(x, weight, bias)                    y (B, out) = x (B, in) @ weight.T + bias
    MSELossFunction.apply(pred, target, reduction)           mean/sum (0-d) or elementwise ("none") squared error
    LinearMSEFunction.apply(x, weight, bias, target, reduction)
                                                             mse(x @ weight.T + bias, target): the fused step

Arguments are 2-D as in the kernels (pred and target may be 1-D); bias may be None.
:mod:`lingrad.functional` adds torch.nn.functional's shape rules (leading dimensions, 1-D input)
and the fallback to PyTorch for tensors lingrad does not handle.

Each Function's derivative is the one registered for its operator in :mod:`lingrad._ops`, so
eager code, torch.compile and direct operator calls share one formula. Backward computes only
what ``ctx.needs_input_grad`` asks for, and LinearFunction's backward is itself differentiable
(double backward runs on lingrad's kernels too).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops

__all__ = ["LinearFunction", "MSELossFunction", "LinearMSEFunction"]


class LinearFunction(torch.autograd.Function):
    """y = x @ weight.T + bias. x (B, in), weight (out, in), bias (out,) or None."""

    # forward(ctx, ...) rather than a separate setup_context: with one, Function.apply binds the
    # arguments with inspect.signature on every call (about 35 us, more than the whole step).
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        y = _ops.linear(x, weight, bias)
        _ops.linear.setup_context(ctx, (x, weight, bias), y)
        return y

    backward = staticmethod(_ops.linear.backward)


class MSELossFunction(torch.autograd.Function):
    """Squared error of pred against target (one shape, 1-D or 2-D); reduction "mean", "sum" or
    "none", as torch.nn.functional.mse_loss. Gradients flow to both pred and target."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, reduction: str) -> Tensor:
        loss = _ops.mse_loss(pred, target, reduction)
        _ops.mse_loss.setup_context(ctx, (pred, target, reduction), loss)
        return loss

    backward = staticmethod(_ops.mse_loss.backward)


class LinearMSEFunction(torch.autograd.Function):
    """loss = mse(x @ weight.T + bias, target), reduction "mean" or "sum", as a 0-d tensor.

    The forward pass is the whole training step: one call of the fused kernel computes the loss
    and, while dY = 2 (y - target) / N is at hand, the gradients of x (only if needed), weight
    and bias. Backward multiplies them by the incoming gradient of the loss. When no input
    requires grad it runs only the forward GEMM and the loss (``ctx.needs_input_grad`` follows
    requires_grad, not torch.no_grad: :func:`lingrad.functional.linear_mse_loss` detaches the
    inputs under no_grad). A target that requires grad, or double backward, takes an unfused
    path (see _ops.linear_mse_backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, reduction: str):
        need_x, need_weight, need_bias, need_target = ctx.needs_input_grad[:4]
        if reduction not in ("mean", "sum"):  # mse_loss below would also accept "none"
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if (need_x or need_weight or need_bias) and not need_target:
            loss, *grads = _ops.linear_mse(x, weight, bias, target, reduction, need_x)
        else:  # nothing for the fused kernel to do but the loss; the target's gradient needs dY itself
            loss, grads = _ops.mse_loss(_ops.linear(x, weight, bias), target, reduction), (None, None, None)
        _ops.save_linear_mse(ctx, (x, weight, bias, target), grads, reduction)
        return loss

    backward = staticmethod(_ops.linear_mse_backward)
