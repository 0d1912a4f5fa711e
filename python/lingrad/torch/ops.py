"""lingrad's kernels as PyTorch operators (``torch.ops.lingrad.*``): the machinery every operator
shares. The operators themselves, each with its rules, are in ops_linear.py and ops_mse.py:

    linear(x, weight, bias?)                      -> y = x @ weight.T + bias
    linear_backward_input(grad_out, weight)       -> grad_x = grad_out @ weight
    linear_backward_weight(grad_out, x, bias)     -> (grad_weight = grad_out.T @ x, grad_bias = grad_out.sum(0) or None)
    mse_loss(pred, target, reduction)             -> loss: 0-d for "mean"/"sum", pred's shape for "none"
    mse_backward(pred, target, reduction)         -> grad_pred = 2 (pred - target) / N
    linear_mse(x, weight, bias?, target, reduction, input_grad)
                                                  -> (loss, grad_x or None, grad_weight, grad_bias or None, grad_y)

Shapes as in the kernels: x (B, in), weight (out, in), bias (out,), y / target / grad_out (B, out).

Each operator keeps its parts together in its module:
  * the implementation: tensors -> arrays (lingrad.torch._bridge) -> kernel -> tensors allocated by
    torch (zero-copy on the way in; outputs are ordinary, resizable tensors);
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

Also here, for the rules of both operator modules: ``sum_terms``, ``save_for_forward``, ``front``
and ``expand_front``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad
from torch.autograd.function import _SingleLevelFunction

# The library that defines the operators; it must stay alive as long as they are used.
_LIB = torch.library.Library("lingrad", "DEF")  # noqa: TOR901 (a fragment would need a DEF elsewhere)

# ---------------------------------------------------------------------------------------------
# Which path a call takes

PLAIN = (Tensor, torch.nn.Parameter)
_profiling = torch.autograd._profiler_enabled
_grad_enabled = torch.is_grad_enabled
_compiling = torch.compiler.is_compiling
functorch_active = torch._C._are_functorch_transforms_active
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor  # jacobian(vectorize=True), is_grads_batched
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
any_requires_grad = getattr(torch._C, "_any_requires_grad", None) or (  # (C-level from torch 2.8 on)
    lambda *args: any(a.requires_grad for a in args if isinstance(a, Tensor))
)

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
        if not (functorch_active() or _compiling()) and _PLAIN_ARGS.issuperset(map(type, args)):
            return self.eager(args)
        return self.overload(*args)  # torch.func, tracing, tensor subclasses: the dispatcher

    def eager(self, args: tuple):
        """The call in eager code with plain arguments (no torch.func transform, no tracing: the
        caller has checked, as __call__ does; lingrad.functional.linear's fast path calls this)."""
        if forward_ad._current_level >= 0 or (_grad_enabled() and any_requires_grad(*args)):
            # eager autograd or forward AD: the Function, without Function.apply's Python layer
            return self._apply(*args)
        # no graph, no tangents: the kernel
        try:
            if _profiling():  # named in torch.profiler's trace, as aten::linear is
                with torch.profiler.record_function(self.qualname):
                    return self.impl(*args)
            return self.impl(*args)
        except RuntimeError as error:  # tensors with no data for DLPack
            return self._recover(args, error)

    def _recover(self, args: tuple, error: RuntimeError):
        """The no-graph call whose tensors DLPack could not hand over: functorch's tensors seen
        outside their transform, or else the error."""
        tensors = [a for a in args if a.__class__ in PLAIN]
        if any(_legacy_batched(t) for t in tensors):
            # The legacy vmap (jacobian(vectorize=True), grad(is_grads_batched=True)) batches only
            # PyTorch's own operators: the same formula in them.
            return self.composite(*args)
        if any(_functorch_wrapped(t) for t in tensors):  # wrappers that outlived their transform
            return self(*(_unwrap_if_dead(a) if a.__class__ in PLAIN else a for a in args))
        raise error

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
            if functorch_active():  # the next lower torch.func level (Function.apply under torch.func)
                return overload(*args)
            if not torch.compiler.is_compiling() and _PLAIN_ARGS.issuperset(map(type, args)):
                return impl(*args)
            with torch._C._AutoDispatchBelowAutograd():  # FakeTensor, FunctionalTensor: their kernels
                return overload(*args)

        class_name = "".join(part.capitalize() for part in name.split("_")) + "Function"  # e.g. LinearFunction
        self.function = _function(class_name, forward, setup_context, backward, jvp, vmap)
        self._apply = c_level_apply(self.function)

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
    """A decorator: the function below it is the implementation of the operator of this schema."""
    return lambda impl: Operator(schema, impl)


def c_level_apply(function: type[torch.autograd.Function]) -> Callable:
    """A Function's apply without Python's layer over it (``Function.apply`` binds the arguments with
    inspect.signature and walks them for functorch wrappers: over 10 us a call). For eager calls
    with plain tensors only: under torch.func the Function's Python apply (or the dispatcher) is needed."""
    return super(torch.autograd.Function, function).apply


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


# ---------------------------------------------------------------------------------------------
# Helpers of the rules (ops_linear.py, ops_mse.py).


def sum_terms(*terms: Tensor | None) -> Tensor | None:
    """The sum of the terms that are not None (None if all are)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


def save_for_forward(ctx, *tensors) -> None:
    """ctx.save_for_forward(*tensors), only where a jvp can follow (forward AD or torch.func active):
    otherwise the references would keep the tensors alive."""
    if forward_ad._current_level >= 0 or functorch_active():
        ctx.save_for_forward(*tensors)


def front(t: Tensor | None, dim: int | None) -> Tensor | None:
    """t with its vmap dimension first; an unbatched t gets a leading dimension of 1 (broadcast)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0)


def expand_front(t: Tensor, dim: int | None, size: int) -> Tensor:
    """t with its vmap dimension first, an unbatched t expanded to the batch (a view)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
