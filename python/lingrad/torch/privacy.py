"""Per-sample gradient clipping and DP-SGD for models made of lingrad Linear layers.

    per_sample_loss = loss_fn(model(x), target)        # (B,): the caller's one forward pass
    norms = clip_and_accumulate(model, per_sample_loss, max_grad_norm=1.0, noise_multiplier=1.1,
                                generator=torch.Generator().manual_seed(0))
    optimizer.step()                                    # every parameter's .grad is the DP-SGD gradient

One backward pass, in which each lingrad Linear layer (and each layer of a lingrad.fuse / FusedMLP
network) computes only its input gradient and hands over its output gradient dY (B, out) and its
input X (B, in). Then, per layer, with lingrad's kernels (lingrad.kernels):

    ||g_b||^2 = sum over layers of linear_per_sample_grad_norms(dY, X)^2    (B,), in float64
    c_b       = min(1, C / ||g_b||)                                          one factor per sample, all layers
    .grad     = (linear_backward_weight(dY, X, sample_weights=c / B) + N(0, (noise_multiplier C / B)^2))

that is (sum_b c_b g_b + noise) / B, the noise drawn from ``generator``. No per-sample gradient
tensor is made: the norms come from ||dY[b]|| ||X[b]|| (2-D), and the weighted sum is one GEMM
whose packing of dY^T scales it by the weights. For inputs with leading dimensions (B, T, in),
layer inputs are read as T steps per sample (linear_per_sample_grad_norms's 3-D form).

For the privacy budget (epsilon for a given delta, noise and sampling rate), use Opacus's
accountant (``opacus.accountants.RDPAccountant``), an optional dependency; lingrad has none of its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lingrad import kernels
from lingrad.torch._bridge import as_tensor, empty_out, end_capture, start_capture, to_array
from lingrad.torch.mlp import MLP_NODE, FusedMLP
from lingrad.torch.nn import Linear
from lingrad.torch.ops_linear import LINEAR_NODE

__all__ = ["clip_and_accumulate", "add_noise"]


NOISE_CHUNK = 1 << 16  # elements of noise drawn at a time (bounded extra memory for any layer)


def add_noise(grad: Tensor, std: float, generator: torch.Generator | None) -> None:
    """grad += std * N(0, 1), drawn from `generator` in chunks of NOISE_CHUNK elements of grad's
    flattened order (a draw of at most 256 KiB in float32 at a time, whatever the layer's size)."""
    flat = grad.view(-1)
    for start in range(0, flat.numel(), NOISE_CHUNK):
        part = flat[start : start + NOISE_CHUNK]
        part.add_(torch.randn(part.shape, generator=generator, dtype=grad.dtype), alpha=std)


def _check_model(model: torch.nn.Module) -> list[Tensor]:
    """The trainable parameters, after checking each belongs to a lingrad Linear layer or a FusedMLP."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inside_fused: set[int] = set()
    for module in model.modules():
        if isinstance(module, FusedMLP):
            if module.loss is not None:
                raise TypeError(
                    "clip_and_accumulate needs per-sample losses; a FusedMLP with loss='mse' returns their mean "
                    "(use loss=None and compute the per-sample loss from its output)"
                )
            inside_fused.update(id(m) for m in module.modules())
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and not isinstance(module, Linear) and id(module) not in inside_fused:
            raise TypeError(
                f"clip_and_accumulate computes per-sample gradients of lingrad Linear layers (lingrad.Linear, "
                f"lingrad.fuse / FusedMLP) only; module {name or '(the model)'!r} ({type(module).__name__}) has "
                "trainable parameters (freeze them with requires_grad_(False), or use lingrad.swap_linear)"
            )
    return [p for p in model.parameters() if p.requires_grad]


def _graph_nodes(root) -> list:
    """lingrad's Linear and FusedMLP nodes in the graph that produced per_sample_loss."""
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node) in (LINEAR_NODE, MLP_NODE):
            found.append(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def _leaf(node, index: int) -> Tensor | None:
    """The leaf tensor (a Parameter) behind input `index` of a graph node, or None."""
    edges = node.next_functions  # one per tensor input (None, a non-tensor argument, has none)
    return getattr(edges[index][0], "variable", None) if index < len(edges) else None


def _per_sample(t: Tensor, batch: int, what: str) -> Tensor:
    """(rows, features) as (batch, rows / batch, features): the steps of each sample."""
    rows = t.shape[0]
    if batch == 0 or rows % batch:
        raise ValueError(
            f"{what} has {rows} rows, not a multiple of the batch size {batch} of per_sample_loss: "
            "each sample must feed its layers the same number of rows"
        )
    return t if rows == batch else t.reshape(batch, rows // batch, t.shape[1])


def _steps(uses: list[Tensor], batch: int, what: str) -> Tensor:
    """One layer's rows, per sample: (batch, features), or (batch, steps, features) when the layer
    saw several rows per sample (leading dimensions, or a layer used more than once in the forward
    pass, whose uses then add up as more steps: G_b = sum over all its rows of outer products)."""
    if len(uses) == 1:
        return _per_sample(uses[0], batch, what)
    parts = [_per_sample(t, batch, what) for t in uses]
    return torch.cat([t if t.dim() == 3 else t.unsqueeze(1) for t in parts], 1)


def clip_and_accumulate(
    model: torch.nn.Module,
    per_sample_loss: Tensor,
    max_grad_norm: float,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Set every trainable parameter's ``.grad`` to the DP-SGD gradient and return the per-sample
    gradient norms (B,) float64, before clipping.

    ``per_sample_loss`` (B,) comes from the caller's forward pass of ``model``; every trainable
    parameter must belong to a lingrad.Linear layer or a lingrad.fuse / FusedMLP network (loss=None),
    anything else is a TypeError naming the module. The gradient of each sample b over all layers,
    g_b, is clipped jointly by c_b = min(1, max_grad_norm / ||g_b||); ``.grad`` is set (not added) to
    (sum_b c_b g_b + noise) / B, with Gaussian noise of standard deviation noise_multiplier *
    max_grad_norm drawn from ``generator`` (torch's default generator if None) for each parameter in
    ``model.parameters()`` order (see :func:`add_noise`). One backward pass; no per-sample gradient is materialised. A
    parameter that no sample's loss reached gets the noise alone.
    """
    params = _validate(model, per_sample_loss, max_grad_norm, noise_multiplier)
    batch = per_sample_loss.shape[0]
    norms, per_layer = _per_sample_norms(_capture_backward(per_sample_loss, params), batch)
    with np.errstate(divide="ignore"):
        clip = np.minimum(1.0, max_grad_norm / norms)  # a zero gradient: 1
    grads = _clipped_sum(per_layer, clip, batch)
    # The noise, over the batch size.
    std = noise_multiplier * max_grad_norm / batch if batch else 0.0
    for p in params:
        g = grads.get(id(p))
        if g is None:
            g = torch.zeros_like(p)
        if std > 0:
            add_noise(g, std, generator)
        p.grad = g
    return as_tensor(norms)


def _validate(
    model: torch.nn.Module, per_sample_loss: Tensor, max_grad_norm: float, noise_multiplier: float
) -> list[Tensor]:
    """clip_and_accumulate's arguments checked; the trainable parameters."""
    params = _check_model(model)
    if not isinstance(per_sample_loss, Tensor) or per_sample_loss.dim() != 1:
        shape = tuple(per_sample_loss.shape) if isinstance(per_sample_loss, Tensor) else type(per_sample_loss).__name__
        raise ValueError(f"per_sample_loss must be a 1-D tensor (batch,) of per-sample losses, got {shape}")
    if per_sample_loss.grad_fn is None:
        raise ValueError("per_sample_loss has no graph: compute it from the model's output with gradients enabled")
    if not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be a positive number, got {max_grad_norm!r}")
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    return params


def _capture_backward(per_sample_loss: Tensor, params: list[Tensor]) -> dict[int, tuple[Tensor, Tensor | None, list]]:
    """The one backward pass, in which each lingrad node captures what it saw instead of making
    weight gradients (the capture protocol of lingrad.torch._bridge). Returns, per layer with a
    trainable parameter, (weight, bias or None: each None unless trainable, [(grad_out, x) per use]).
    A TypeError if a parameter got a gradient outside lingrad's Linear kernels (.grad restored)."""
    owner = {id(p): p for p in params}
    nodes = _graph_nodes(per_sample_loss.grad_fn)
    captures = [start_capture(node) for node in nodes]
    saved_grads = {id(p): p.grad for p in params}
    for p in params:
        p.grad = None
    try:
        per_sample_loss.backward(torch.ones_like(per_sample_loss))
    finally:
        for node in nodes:
            end_capture(node)
    leaked = [p for p in params if p.grad is not None]
    if leaked:
        for p in params:
            p.grad = saved_grads[id(p)]
        raise TypeError(
            f"{len(leaked)} trainable parameter(s) of shape {tuple(leaked[0].shape)} got gradients outside lingrad's "
            "Linear kernels (a fallback to PyTorch, e.g. float16 or autocast, or the parameter used by another "
            "operation): their per-sample gradients cannot be computed"
        )

    # (weight, bias or None, [(grad_out, x) per use]) per layer.
    layers: dict[int, tuple[Tensor, Tensor | None, list]] = {}

    def add(weight: Tensor | None, bias: Tensor | None, grad_out: Tensor, x: Tensor) -> None:
        trainable_weight = weight is not None and id(weight) in owner
        trainable_bias = bias is not None and id(bias) in owner
        if not (trainable_weight or trainable_bias):
            return
        key = id(weight) if weight is not None else id(bias)
        layers.setdefault(key, (weight if trainable_weight else None, bias if trainable_bias else None, []))[2].append(
            (grad_out, x)
        )

    for node, capture in zip(nodes, captures):
        if type(node) is LINEAR_NODE:
            for grad_out, x in capture:
                add(_leaf(node, 1), _leaf(node, 2), grad_out, x)
        else:
            _, _, has_bias = node.spec
            n = len(has_bias)
            bias_index = iter(range(1 + n, 1 + n + sum(has_bias)))  # (x, *weights, *biases): spec has no edge
            leaves = [
                (_leaf(node, 1 + i), _leaf(node, next(bias_index)) if b else None) for i, b in enumerate(has_bias)
            ]
            for layer, grad_out, x in capture:
                add(*leaves[layer], grad_out, x)
    return layers


def _per_sample_norms(layers: dict, batch: int) -> tuple[np.ndarray, list]:
    """The per-sample gradient norms (B,) float64 over all layers (summed in squares), and per layer
    (weight, bias, grad_out, x) with each sample's rows (see _steps). Empties ``layers``, so that
    only the returned list keeps the layers' tensors."""
    squares = np.zeros(batch)
    per_layer = []
    for weight, bias, uses in layers.values():
        grad_out = _steps([g for g, _ in uses], batch, "a layer's output gradient")
        x = _steps([x for _, x in uses], batch, "a layer's input") if weight is not None else None
        if weight is None:  # a frozen weight, a trainable bias: its norm is ||sum_t dY_b[t]||
            bias_norm = grad_out.sum(1) if grad_out.dim() == 3 else grad_out
            squares += (bias_norm.double() ** 2).sum(1).numpy()
        else:
            norms = kernels.linear_per_sample_grad_norms(to_array(grad_out), to_array(x), bias=bias is not None)
            squares += norms * norms
        per_layer.append((weight, bias, grad_out, x))
    layers.clear()
    return np.sqrt(squares), per_layer


def _clipped_sum(per_layer: list, clip: np.ndarray, batch: int) -> dict[int, Tensor]:
    """{id(parameter): sum_b clip[b] g_b / batch} from _per_sample_norms's layers, one weighted
    weight-gradient kernel call per layer. Empties ``per_layer``: each layer's tensors are dropped
    once its gradient is made."""
    grads: dict[int, Tensor] = {}
    while per_layer:
        weight, bias, grad_out, x = per_layer.pop(0)
        like = grad_out
        steps = grad_out.shape[1] if grad_out.dim() == 3 else 1
        rows_g = grad_out.reshape(-1, grad_out.shape[-1])
        s = np.repeat(clip / batch, steps).astype(np.float32 if like.dtype == torch.float32 else np.float64)
        if weight is None:  # a frozen weight, a trainable bias
            grads[id(bias)] = as_tensor(s) @ rows_g
            continue
        rows_x = x.reshape(-1, x.shape[-1])
        dw, out = empty_out(like, rows_g.shape[1], rows_x.shape[1])
        db, bias_out = empty_out(like, rows_g.shape[1]) if bias is not None else (None, None)
        has_bias = bias is not None
        g, a = to_array(rows_g), to_array(rows_x)
        kernels.linear_backward_weight(g, a, sample_weights=s, bias=has_bias, out=out, bias_out=bias_out)
        grads[id(weight)] = dw
        if bias is not None:
            grads[id(bias)] = db
    return grads
