"""A whole MLP's training step in one native call: lingrad.fuse and lingrad.FusedMLP.

    fuse(torch.nn.Sequential(Linear, act, Linear, act, ..., Linear[, act]), loss=None or "mse")
        -> FusedMLP: the same function, the very same Parameter objects and state_dict keys

    FusedMLP([784, 50, 1], activation="relu", loss="mse")       built from layer widths
    model(x)            -> output (*, out), as the Sequential
    model(x, target)    -> the MSE loss, with loss="mse" (the last layer fused with it)

One autograd node per call. The forward pass is one native call (lingrad.kernels.mlp_forward) that
keeps each hidden layer's output, and its pre-activation only where the derivative needs it
(GELU, SiLU); backward is one native call (mlp_backward) for every gradient. With loss="mse" the
forward call does the whole step at once (mlp_mse: the loss and every gradient, since the output
gradient is known there) and backward only hands the gradients out. Under no_grad or inference
mode: one native call and nothing kept.

Where the fused call does not apply, a FusedMLP runs its layers one by one, exactly as the
Sequential would (each Linear as nn.Linear or lingrad.Linear computes it): under torch.func
transforms, forward-mode AD and torch.compile (where lingrad's operators trace), for tensors the
kernels do not take (with lingrad's FallbackWarning), and for double backward (create_graph=True),
which recomputes the forward pass differentiably. Forward hooks on the inner layers run only then.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from lingrad import kernels
from lingrad.torch import functional, ops_linear, ops_mse
from lingrad.torch._bridge import (
    as_tensor,
    autocast_bf16,
    capture_list,
    empty_out,
    kernels_or_pytorch,
    rows,
    scalar,
    to_array,
    to_arrays,
)
from lingrad.torch.nn import Linear
from lingrad.torch.ops import any_requires_grad, c_level_apply

__all__ = ["fuse", "FusedMLP"]

_LINEARS = (torch.nn.Linear, Linear)


def _activation_of(module: torch.nn.Module) -> tuple[str, float] | None:
    """(name, negative slope) for an elementwise activation lingrad fuses, else None."""
    kind = type(module)
    if kind is torch.nn.ReLU:
        return "relu", 0.0
    if kind is torch.nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is torch.nn.Tanh:
        return "tanh", 0.0
    if kind is torch.nn.Sigmoid:
        return "sigmoid", 0.0
    if kind is torch.nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.0
    if kind is torch.nn.SiLU:
        return "silu", 0.0
    if kind is torch.nn.Identity:
        return "identity", 0.0
    return None


_ACTIVATION_MODULES = {
    "relu": torch.nn.ReLU,
    "leaky_relu": torch.nn.LeakyReLU,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "gelu": torch.nn.GELU,
    "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
    "silu": torch.nn.SiLU,
    "identity": torch.nn.Identity,
}


def _network_of(modules: Sequence[torch.nn.Module]) -> tuple[list[int], list[str], list[float]]:
    """The Linear layers' positions, and each layer's activation and slope, of Linear, [activations],
    Linear, ...: a TypeError naming any other module and its index."""
    linears: list[int] = []
    activations: list[str] = []
    slopes: list[float] = []
    for index, module in enumerate(modules):
        if type(module) in _LINEARS:
            linears.append(index)
            activations.append("identity")
            slopes.append(0.01)
            continue
        act = _activation_of(module)
        if act is None:
            raise TypeError(
                f"lingrad.fuse takes Linear layers and elementwise activations (ReLU, LeakyReLU, Tanh, Sigmoid, "
                f"GELU, SiLU, Identity); layer {index} is {type(module).__name__}"
            )
        if act[0] == "identity":
            continue
        if not linears:
            raise TypeError(f"layer {index} ({type(module).__name__}) comes before the first Linear layer")
        if activations[-1] != "identity":
            raise TypeError(
                f"layer {index} ({type(module).__name__}) follows another activation: "
                "lingrad.fuse takes one activation after each Linear layer"
            )
        activations[-1], slopes[-1] = act
    if not linears:
        raise TypeError("lingrad.fuse needs at least one Linear layer")
    return linears, activations, slopes


class FusedMLP(torch.nn.Sequential):
    """An MLP computed by one native call per forward and per backward (see the module docstring).

    ``FusedMLP(widths, activation="relu", *, bias=True, loss=None, reduction="mean", device=None,
    dtype=None)`` builds ``Linear(widths[0], widths[1]), act, ..., Linear(widths[-2], widths[-1])``
    (no activation after the last layer), initialised as torch.nn.Linear. ``lingrad.fuse`` makes one
    from an existing Sequential, sharing its layers. As a torch.nn.Sequential it holds the layers
    as its children, so parameters, state_dict keys, indexing and repr are the Sequential's.
    """

    def __init__(
        self,
        widths: Sequence[int],
        activation: str = "relu",
        *,
        bias: bool = True,
        loss: str | None = None,
        reduction: str = "mean",
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(widths, (str, bytes)) or not all(isinstance(w, int) and w > 0 for w in widths):
            raise TypeError(f"widths must be a list of positive ints (in, hidden..., out), got {widths!r}")
        if len(widths) < 2:
            raise ValueError(f"widths must give at least an input and an output width, got {list(widths)}")
        if activation not in _ACTIVATION_MODULES:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATION_MODULES)}, got {activation!r}")
        modules: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            modules.append(Linear(a, b, bias=bias, device=device, dtype=dtype))
            if i < len(widths) - 2 and activation != "identity":
                modules.append(_ACTIVATION_MODULES[activation]())
        super().__init__(*modules)
        self._configure(loss, reduction)

    @classmethod
    def _from_modules(cls, modules: OrderedDict, loss: str | None, reduction: str) -> FusedMLP:
        fused = cls.__new__(cls)
        torch.nn.Sequential.__init__(fused, modules)  # the same modules under the same names
        fused._configure(loss, reduction)
        return fused

    def _configure(self, loss: str | None, reduction: str) -> None:
        if loss not in (None, "mse"):
            raise ValueError(f"loss must be None or 'mse', got {loss!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.loss, self.reduction = loss, reduction
        linears, self._activations, self._slopes = _network_of(list(self))
        self._linears = [self[i] for i in linears]

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, reduction={self.reduction!r}" if self.loss else ""

    # -----------------------------------------------------------------------------------------

    def forward(self, input: Tensor, target: Tensor | None = None) -> Tensor:
        if self.loss is None and target is not None:
            raise TypeError("this FusedMLP has no loss (loss=None): call it with the input alone")
        if self.loss == "mse" and target is None:
            raise TypeError("this FusedMLP computes the MSE loss (loss='mse'): call it with (input, target)")
        weights = [m.weight for m in self._linears]
        biases = [m.bias for m in self._linears]
        tensors = (input, target, *weights, *biases)
        if input.dtype == torch.bfloat16 or autocast_bf16(input):
            return self._layer_by_layer_bf16(input, target)
        if (
            torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0
            or (target is not None and (target.requires_grad or target.dtype != input.dtype))
            or input.dim() == 0
        ):
            return self._layer_by_layer(input, target)
        return kernels_or_pytorch(
            lambda: self._fused(input, target, weights, biases), lambda: self._layer_by_layer(input, target), *tensors
        )

    def _layer_by_layer(self, input: Tensor, target: Tensor | None) -> Tensor:
        y = super().forward(input)
        return y if target is None else functional.mse_loss(y, target, self.reduction)

    def _layer_by_layer_bf16(self, input: Tensor, target: Tensor | None) -> Tensor:
        """bfloat16 (or autocast to it): the network's native calls are float32/float64 only, so each
        Linear runs lingrad's bfloat16 products (lingrad.functional.linear, whichever Linear class
        it is) and the activations PyTorch's."""
        h = input
        for module in self:
            h = functional.linear(h, module.weight, module.bias) if isinstance(module, torch.nn.Linear) else module(h)
        return h if target is None else functional.mse_loss(h, target, self.reduction)

    def _fused(self, input: Tensor, target: Tensor | None, weights: list, biases: list) -> Tensor:
        x = input if input.dim() == 2 else rows(input)
        spec = (self._activations, self._slopes, [b is not None for b in biases])
        params = [*weights, *(b for b in biases if b is not None)]
        needs_graph = torch.is_grad_enabled() and any_requires_grad(x, *params)
        if target is not None:
            t = target if target.dim() == 2 else rows(target)
            if needs_graph:
                return _mlp_mse_apply(x, t, spec, self.reduction, *params)
            y = _forward_no_graph(x, weights, biases, spec)
            return ops_mse.mse_loss(y, t, self.reduction)
        y = _mlp_apply(x, spec, *params) if needs_graph else _forward_no_graph(x, weights, biases, spec)
        return y if input.dim() == 2 else y.reshape(*input.shape[:-1], y.shape[-1])


def fuse(module: torch.nn.Sequential, loss: str | None = None, reduction: str = "mean") -> FusedMLP:
    """A FusedMLP computing what ``module`` computes (and, with ``loss="mse"``, its MSE loss
    against a target), sharing its very layers: the same Parameter objects (an optimizer built
    before keeps working) and the same state_dict keys, so checkpoints load both ways.

    ``module`` is a torch.nn.Sequential of Linear layers (torch.nn.Linear or lingrad.Linear, with or
    without bias), each followed by at most one elementwise activation: ReLU, LeakyReLU, Tanh,
    Sigmoid, GELU (either approximation), SiLU or Identity. Anything else is a TypeError naming the
    layer and its index."""
    if not isinstance(module, torch.nn.Sequential):
        raise TypeError(f"module must be a torch.nn.Sequential, got {type(module).__name__}")
    return FusedMLP._from_modules(OrderedDict(module.named_children()), loss, reduction)


# ---------------------------------------------------------------------------------------------
# The native calls, and their autograd Functions


def _split(spec, params) -> tuple[list, list]:
    """(weights, biases with None where a layer has none) from the Function's flat parameters."""
    _, _, has_bias = spec
    n = len(has_bias)
    weights, rest = list(params[:n]), iter(params[n:])
    return weights, [next(rest) if b else None for b in has_bias]


def _forward_no_graph(x: Tensor, weights: list, biases: list, spec) -> Tensor:
    activations, slopes, _ = spec
    y, out = empty_out(x, x.shape[0], weights[-1].shape[0])
    kernels.mlp_forward(
        to_array(x), to_arrays(weights), to_arrays(biases), activations, negative_slopes=slopes, out=out
    )
    return y


def _recompute(x: Tensor, weights: list, biases: list, spec) -> Tensor:
    """The forward pass, differentiable, with lingrad's operators (for double backward)."""
    activations, slopes, _ = spec
    h = x
    for w, b, act, slope in zip(weights, biases, activations, slopes):
        h = _apply_activation(ops_linear.linear(h, w, b), act, slope)
    return h


def _apply_activation(z: Tensor, act: str, slope: float) -> Tensor:
    F = torch.nn.functional
    if act == "relu":
        return F.relu(z)
    if act == "leaky_relu":
        return F.leaky_relu(z, slope)
    if act == "tanh":
        return torch.tanh(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act in ("gelu", "gelu_tanh"):
        return F.gelu(z, approximate="tanh" if act == "gelu_tanh" else "none")
    if act == "silu":
        return F.silu(z)
    return z


def _double_backward(ctx, inputs: tuple, outputs_of, grad_outputs: tuple) -> tuple:
    """Gradients that can be differentiated again: the forward pass recomputed with the operators."""
    with torch.enable_grad():
        leaves = [t if t is not None and need else None for t, need in zip(inputs, ctx.needs_input_grad)]
        wanted = [t for t in leaves if t is not None]
        outputs = outputs_of(*inputs)
        grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, create_graph=True, allow_unused=True))
        return tuple(None if t is None else next(grads) for t in leaves)


class _MLPFunction(torch.autograd.Function):
    """y = the network's output; backward is one call of mlp_backward."""

    @staticmethod
    def forward(ctx, x, spec, *params):
        activations, slopes, _ = spec
        weights, biases = _split(spec, params)
        y, out = empty_out(x, x.shape[0], weights[-1].shape[0])
        _, hidden, pre = kernels.mlp_forward(
            to_array(x), to_arrays(weights), to_arrays(biases), activations, negative_slopes=slopes, save=True, out=out
        )
        ctx.spec, ctx.hidden, ctx.pre = spec, hidden, pre  # the kernels' own buffers, for backward only
        ctx.save_for_backward(x, y, *params)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, y, *params = ctx.saved_tensors
        spec = ctx.spec
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
            outputs_of = lambda x, spec, *params: _recompute(x, *_split(spec, params), spec)  # noqa: E731
            return _double_backward(ctx, (x, spec, *params), outputs_of, (grad_y,))
        activations, slopes, _ = spec
        weights, biases = _split(spec, params)
        capture = capture_list(ctx)
        if capture is not None:  # lingrad.privacy: each layer's (grad_out, input), no weight gradients
            grad_x = _capture_layers(ctx, capture, grad_y, x, y, weights)
            return (grad_x, None, *(None for _ in params))
        grad_x, grad_weights, grad_biases = kernels.mlp_backward(
            to_array(grad_y),
            to_array(x),
            to_arrays(weights),
            to_arrays(biases),
            activations,
            to_array(y),
            ctx.hidden,
            ctx.pre,
            negative_slopes=slopes,
            input_grad=ctx.needs_input_grad[0],
        )
        grads = [*grad_weights, *(g for g in grad_biases if g is not None)]
        return (
            None if grad_x is None else as_tensor(grad_x),
            None,
            *(as_tensor(g) if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])),
        )


def _activation_grad(grad_h: Tensor, h: Tensor, z: Tensor | None, act: str, slope: float) -> Tensor:
    """grad_h * act'(z), from the pre-activation z where the kernels kept it, else from h = act(z)."""
    if act == "identity":
        return grad_h
    if z is not None:  # GELU, SiLU (and any activation whose pre-activation was kept): autograd
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            return torch.autograd.grad(_apply_activation(z, act, slope), z, grad_h)[0]
    if act == "relu":
        return torch.where(h > 0, grad_h, 0.0)
    if act == "leaky_relu":
        return torch.where(h > 0, grad_h, grad_h * slope)
    if act == "tanh":
        return grad_h * (1 - h * h)
    if act == "sigmoid":
        return grad_h * h * (1 - h)
    raise AssertionError(f"no derivative of {act} from its output")


def _capture_layers(ctx, capture: list, grad_y: Tensor, x: Tensor, y: Tensor, weights: list) -> Tensor | None:
    """lingrad.privacy's backward of the network: appends (layer index, grad_out of the layer's
    Linear, its input) for every layer to capture, computing only the input gradients; returns
    grad_x (None unless x needs one)."""
    activations, slopes, _ = ctx.spec
    n = len(weights)
    hidden = [as_tensor(h) for h in ctx.hidden]
    pre = [None if z is None else as_tensor(z) for z in ctx.pre]
    grad_h = grad_y
    for layer in range(n - 1, -1, -1):
        out = y if layer == n - 1 else hidden[layer]
        grad_z = _activation_grad(grad_h, out, pre[layer], activations[layer], slopes[layer])
        capture.append((layer, grad_z, x if layer == 0 else hidden[layer - 1]))
        if layer > 0 or ctx.needs_input_grad[0]:
            grad_h = ops_linear.linear_backward_input(grad_z, weights[layer])
    return grad_h if ctx.needs_input_grad[0] else None


class _MLPMSEFunction(torch.autograd.Function):
    """The MSE loss of the network's output; its forward pass is the whole step (mlp_mse)."""

    @staticmethod
    def forward(ctx, x, target, spec, reduction, *params):
        ctx.spec, ctx.reduction = spec, reduction
        ctx.made = _mlp_mse_step(x, target, spec, reduction, params, x.requires_grad)[1:]
        ctx.save_for_backward(x, target, *params)  # read only by a second backward, or double backward
        return scalar(ctx.made[0], x)

    @staticmethod
    def backward(ctx, grad_loss):
        spec, reduction = ctx.spec, ctx.reduction
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
            x, target, *params = ctx.saved_tensors

            def outputs_of(x, target, spec, reduction, *params):
                return functional.mse_loss(_recompute(x, *_split(spec, params), spec), target, reduction)

            return _double_backward(ctx, (x, target, spec, reduction, *params), outputs_of, (grad_loss,))
        made, ctx.made = ctx.made, None  # handed out once: no returned gradient aliases saved state
        if made is None:  # a second backward through the same graph: the step again
            x, target, *params = ctx.saved_tensors
            made = _mlp_mse_step(x, target, spec, reduction, params, ctx.needs_input_grad[0])[1:]
        _, grad_x, grads = made
        grads = [grad_x, None, None, None, *grads]
        if not (grad_loss.__class__ is Tensor and grad_loss.item() == 1.0):
            grads = [None if g is None else grad_loss * g for g in grads]
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def _mlp_mse_step(x, target, spec, reduction, params, input_grad) -> tuple:
    """(loss, ..., grad_x or None, [grad of each param]) from one call of mlp_mse."""
    activations, slopes, _ = spec
    weights, biases = _split(spec, params)
    loss, grad_x, grad_weights, grad_biases = kernels.mlp_mse(
        to_array(x),
        to_arrays(weights),
        to_arrays(biases),
        activations,
        to_array(target),
        reduction,
        negative_slopes=slopes,
        input_grad=input_grad,
    )
    grads = [as_tensor(g) for g in (*grad_weights, *(g for g in grad_biases if g is not None))]
    return None, loss, None if grad_x is None else as_tensor(grad_x), grads


_mlp_apply = c_level_apply(_MLPFunction)
_mlp_mse_apply = c_level_apply(_MLPMSEFunction)

# A FusedMLP's graph node (loss=None), as lingrad.privacy finds it in a graph. Its backward captures
# (see _bridge); its edges are (x, spec, *weights, *biases of the layers that have one), and
# node.spec is (activations, slopes, has_bias), one entry per layer.
MLP_NODE = _MLPFunction._backward_cls
