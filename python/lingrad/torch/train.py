"""A whole training step in one native call: lingrad.train_step.

    step = lingrad.train_step(model, optimizer, loss="mse", reduction="mean")
    loss = step(input, target)     # forward, loss, backward and optimizer.step(), in place

model is what lingrad.fuse takes (a torch.nn.Sequential of Linear layers and elementwise
activations, or a FusedMLP); optimizer a torch.optim.SGD, Adam or AdamW over (some of) its
parameters. The step is one call of lingrad.kernels.MlpTrainStep, which updates each layer's weight
and bias as soon as their gradients are complete, with torch.optim's rules and roundings. The loss
returned is the loss before the update, a 0-d tensor without a graph; ``.grad`` is left as it was.

The optimizer's state is its own (optimizer.state, in torch's layout), updated in place, so
optimizer.step() and the step can alternate and optimizer.state_dict() checkpoints load both ways.
Per call the step reads the hyperparameters of optimizer.param_groups (schedulers apply), checks
that the parameters and state tensors are still the ones it holds (else, after load_state_dict or
model.to(...), it binds the new ones), and makes one native call.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import increment_version as _increment_version

from lingrad import kernels
from lingrad.torch._bridge import scalar, to_array
from lingrad.torch.mlp import _network_of

__all__ = ["train_step", "TrainStep"]

_LOSSES = ("mse", "cross_entropy", "huber", "bce_with_logits")
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
_ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _scalar_dtype() -> torch.dtype:
    """The dtype of Adam's step count, as torch.optim makes it (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _sgd_hyper(g: dict) -> tuple:
    return (g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], g["maximize"])


def _adam_hyper(g: dict, decoupled: bool = False) -> tuple:
    """decoupled: the optimizer's own rule where its groups do not say (torch < 2.7: AdamW's groups have no
    decoupled_weight_decay; AdamW decouples by its class)."""
    beta1, beta2 = g["betas"]
    return (
        g["lr"],
        beta1,
        beta2,
        g["eps"],
        g["weight_decay"],
        g["amsgrad"],
        g["maximize"],
        g.get("decoupled_weight_decay", decoupled),
    )


def _kind_of(optimizer) -> str:
    """'sgd' or 'adam' (Adam and AdamW) by the optimizer's exact type: a subclass may step otherwise."""
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return "sgd"
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    raise TypeError(
        f"lingrad.train_step takes torch.optim.SGD, Adam or AdamW, got {kind.__module__}.{kind.__qualname__}"
    )


def _check_group(group: dict, index: int) -> None:
    """A ValueError naming an option of param_groups[index] that the native step does not run."""
    for option in ("fused", "capturable", "differentiable"):
        if group.get(option):
            raise ValueError(
                f"lingrad.train_step runs torch.optim's single-tensor CPU rule; param_groups[{index}] "
                f"has {option}={group[option]!r}"
            )


class TrainStep:
    """``step(input, target)``: one training step of ``model`` with ``optimizer`` (see the module
    docstring). Made by :func:`lingrad.train_step`."""

    def __init__(
        self, model: torch.nn.Module, optimizer, loss: str = "mse", reduction: str = "mean", delta: float = 1.0
    ) -> None:
        if not isinstance(model, torch.nn.Sequential):
            raise TypeError(f"model must be a torch.nn.Sequential or a lingrad.FusedMLP, got {type(model).__name__}")
        modules = list(model)
        linears, self._activations, self._slopes = _network_of(modules)
        self._linears = [modules[i] for i in linears]
        self._kind = _kind_of(optimizer)
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, _LOSSES))}, got {loss!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self._loss, self._reduction, self._delta = loss, reduction, float(delta)
        adamw = type(optimizer) is torch.optim.AdamW
        self._hyper_of = _sgd_hyper if self._kind == "sgd" else (lambda g: _adam_hyper(g, adamw))
        self.model, self.optimizer = model, optimizer
        params = [p for m in self._linears for p in (m.weight, m.bias) if p is not None]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("lingrad.train_step needs each layer's own parameters: the model shares a weight or bias")
        self._bind()

    def __repr__(self) -> str:
        return (
            f"TrainStep(loss={self._loss!r}, reduction={self._reduction!r}, "
            f"optimizer={type(self.optimizer).__name__}, layers={len(self._linears)})"
        )

    # -----------------------------------------------------------------------------------------

    def __call__(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss of ``model(input)`` against ``target`` before the update; every trainable parameter
        updated in place. ``target``: (batch, out), or int64 class indices (batch,) for
        "cross_entropy". A bad input or target is an error that changes nothing."""
        optimizer = self.optimizer
        groups = optimizer.param_groups
        hyper = [self._hyper_of(g) for g in groups]
        if (
            groups is not self._groups
            or len(groups) != self._group_count  # (add_param_group)
            or optimizer.state is not self._state
            or [h[1] != 0 if self._kind == "sgd" else bool(h[5]) for h in hyper] != self._needs
            or not self._still_bound()
        ):
            self._bind()
        loss = self._native(to_array(input), to_array(target), hyper)
        optimizer._opt_called = True  # (what optimizer.step() tells learning-rate schedulers)
        # Changed in place, as optimizer.step() changes them: a graph that saved one refuses to run
        _increment_version(self._trained)
        if self._pending:  # the first step made these SGD momentum buffers: now torch's state
            for state, buffer in self._pending:
                state["momentum_buffer"] = buffer
                self._state_tensors.append((state, "momentum_buffer", buffer))
            self._pending = []
        return scalar(loss, input)

    def _still_bound(self) -> bool:
        """Whether the parameters (their memory and requires_grad) and the optimizer's state tensors are
        the ones bound. (Cheap checks only: hashing a tensor is a Python call, so optimizer.state is
        checked by its size, and each bound state dict by its tensors.)"""
        for p, pointer, requires_grad in self._params:
            if p.requires_grad is not requires_grad or p.data_ptr() != pointer:
                return False
        for state, key, tensor in self._state_tensors:
            if state.get(key) is not tensor:
                return False
        return len(self.optimizer.state) == self._state_size

    def _bind(self) -> None:
        """Makes the native step for the current parameters and state, creating the state that is
        missing as torch.optim's first step would (zeros and a step count for Adam; SGD's momentum
        buffer is the first gradient, so it is put in optimizer.state after the first call)."""
        optimizer = self.optimizer
        for index, group in enumerate(optimizer.param_groups):
            _check_group(group, index)
        self._groups, self._state = optimizer.param_groups, optimizer.state
        self._group_count = len(self._groups)
        self._group_of = {p: i for i, g in enumerate(self._groups) for p in g["params"]}
        hyper = [self._hyper_of(g) for g in self._groups]
        self._needs = [h[1] != 0 if self._kind == "sgd" else bool(h[5]) for h in hyper]
        self._params, self._state_tensors, self._pending = [], [], []
        self._trained: list[Tensor] = []
        weights, biases, weight_states, bias_states = [], [], [], []
        for m in self._linears:
            weights.append(to_array(m.weight))
            biases.append(None if m.bias is None else to_array(m.bias))
            weight_states.append(self._state_of(m.weight))
            bias_states.append(None if m.bias is None else self._state_of(m.bias))
        self._state_size = len(optimizer.state)  # (after _state_of made the trained parameters' entries)
        self._native = kernels.MlpTrainStep(
            weights,
            biases,
            self._activations,
            negative_slopes=self._slopes,
            loss=self._loss,
            reduction=self._reduction,
            optimizer=self._kind,
            weight_states=weight_states,
            bias_states=bias_states,
            delta=self._delta,
        )

    def _state_of(self, p: Tensor) -> dict | None:
        """The native step's state entry for p (None: frozen), from optimizer.state[p], completed."""
        trained = p.requires_grad and p in self._group_of
        self._params.append((p, p.data_ptr(), p.requires_grad))
        if not trained:
            return None
        group = self._group_of[p]
        self._trained.append(p)
        entry: dict = {"group": group}
        if self._kind == "sgd" and not self._needs[group]:
            return entry  # (plain SGD keeps no state: torch's makes no entry either)
        state = self.optimizer.state[p]
        if self._kind == "sgd":  # with momentum
            buffer = state.get("momentum_buffer")
            if buffer is None:  # torch's first step clones the gradient: the native step does
                buffer = torch.empty_like(p, memory_format=torch.contiguous_format)
                entry["fresh"] = True
                self._pending.append((state, buffer))
            else:
                self._state_tensors.append((state, "momentum_buffer", buffer))
            entry["momentum_buffer"] = to_array(buffer)
            return entry
        if len(state) == 0:  # torch.optim.Adam._init_group's lazy initialisation
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self._needs[group] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if not torch.is_tensor(state["step"]):  # (a checkpoint of an old torch: a number)
            state["step"] = torch.tensor(float(state["step"]), dtype=_scalar_dtype())
        for key in ("step", *_ADAM_STATE[: 3 if self._needs[group] else 2]):
            entry[key] = to_array(state[key])
            self._state_tensors.append((state, key, state[key]))
        return entry


def train_step(
    model: torch.nn.Module, optimizer, loss: str = "mse", *, reduction: str = "mean", delta: float = 1.0
) -> TrainStep:
    """One native call per training step: ``step = train_step(model, optimizer)``, then
    ``loss = step(input, target)`` runs the forward pass, the loss and its gradient, the backward
    pass and the optimizer's update of every trainable parameter, in place, and returns the loss
    before the update (a 0-d tensor without a graph). ``.grad`` is left as it was.

    ``model``: a torch.nn.Sequential of Linear layers and elementwise activations, or a FusedMLP
    (what :func:`lingrad.fuse` takes). Parameters with ``requires_grad=False`` or not in the
    optimizer are not updated. ``optimizer``: torch.optim.SGD (lr, momentum, dampening, nesterov,
    weight_decay, maximize), Adam or AdamW (lr, betas, eps, weight_decay, amsgrad, maximize), with
    torch's update rules; its hyperparameters are read from ``param_groups`` at every call and its
    state lives in ``optimizer.state`` in torch's layout. ``loss``: "mse", "huber" (F.huber_loss with
    ``delta``) or "bce_with_logits" (F.binary_cross_entropy_with_logits), each against a target
    (batch, out), or "cross_entropy" (int64 class indices (batch,), as F.cross_entropy);
    ``reduction``: "mean" or "sum". An unsupported layer, loss, optimizer or option is a TypeError
    or ValueError here; a bad input or target is one at the call, and then nothing is updated."""
    return TrainStep(model, optimizer, loss, reduction, delta)
