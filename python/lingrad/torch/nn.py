"""Modules: a drop-in for torch.nn.Linear, the fused Linear + MSE block, and swap_linear."""

from __future__ import annotations

import torch
from torch import Tensor

from lingrad.torch import functional

__all__ = ["Linear", "LinearMSELoss", "swap_linear"]


class Linear(torch.nn.Linear):
    """torch.nn.Linear computed by lingrad's kernels.

    A subclass that changes only ``forward``: the same constructor, parameters (``weight``
    (out_features, in_features), ``bias`` (out_features,)), initialisation, repr and state_dict,
    and ``isinstance(m, torch.nn.Linear)`` still holds for code that looks for Linear layers.
    """

    def forward(self, input: Tensor) -> Tensor:
        return functional.linear(input, self.weight, self.bias)


class LinearMSELoss(torch.nn.Module):
    """A Linear layer and its mean-squared-error loss in one fused training step.

    ``forward(input (*, in_features), target (*, out_features))`` returns the 0-d loss
    ``mse_loss(input @ weight.T + bias, target, reduction)``; the fused kernel computes every
    gradient in the same pass (see :class:`lingrad.autograd.LinearMSEFunction`). Parameters,
    initialisation and state_dict are those of ``torch.nn.Linear(in_features, out_features, bias)``.
    """

    __constants__ = ["in_features", "out_features", "reduction"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        reduction: str = "mean",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.reduction = reduction
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch.nn.Linear's own initialisation (it reads only self.weight and self.bias).
        torch.nn.Linear.reset_parameters(self)  # type: ignore[arg-type]

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.linear_mse_loss(input, self.weight, self.bias, target, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, reduction={self.reduction!r}"
        )


def swap_linear(module: torch.nn.Module) -> torch.nn.Module:
    """Make every ``torch.nn.Linear`` inside ``module`` (itself included) a :class:`Linear`, in
    place, and return ``module``.

    Each layer keeps its identity and so its very Parameter objects (an optimizer built before
    the swap keeps working), its hooks and its state: only its class changes, as
    ``torch.nn.LazyLinear`` does when it materialises. Only layers of exactly type
    ``torch.nn.Linear`` change; subclasses may have their own ``forward`` and are left alone. A
    ``torch.nn.LazyLinear`` that has not yet seen an input becomes a :class:`Linear` when it does.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for m in module.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = Linear
        elif type(m) is torch.nn.LazyLinear:
            m.cls_to_become = Linear  # the class it takes on at its first forward (instead of nn.Linear)
    return module
