"""`lingrad check`: a self-test of the installed build, without pytest.

On every SIMD code path this CPU can run (``lingrad.available_isas()``), in float32 and float64,
each kernel of :mod:`lingrad.kernels` is compared with the float64 reference of
:mod:`lingrad.reference` (errors must stay within its rigorous bounds), on shapes that cover a
single neuron, tile edges and a product large enough to run on several threads, and so are the
bfloat16 products (bfloat16 activations with a float32 weight) where ml_dtypes is installed; the fused step
must give bitwise identical results with one thread and with all of them. With PyTorch installed,
``torch.autograd.gradcheck`` checks the autograd Functions (in float64) and ``lingrad.Linear`` is
compared with ``torch.nn.Linear``. One line per check; the SIMD path and the thread count are
restored afterwards.
"""

from __future__ import annotations

import sys
from typing import IO, Callable

import numpy as np

import lingrad
from lingrad import kernels
from lingrad import reference as ref

# (batch, in, out): one neuron; smaller than a register tile; odd sizes over several register tiles,
# with enough multiply-adds for the threaded path (lingrad.config()["gemm_serial_work"]) and more
# than one KC-long slice of the reduction over the input features (forward) or over the batch
# (weight gradient).
SHAPES = [(1, 3, 1), (5, 7, 3), (129, 515, 33), (515, 129, 33)]
THREADED_SHAPE = (515, 129, 33)
DTYPES = (np.float32, np.float64)


# Each kernel check returns the worst error / bound ratio over its outputs at one shape (<= 1 passes).
# Kernels are looked up in lingrad.kernels at call time, so a replaced kernel is the one checked.


def _linear_forward(shape, dtype):
    x, w, b, _, _ = ref.arrays(shape, dtype)
    want, bound = ref.linear_forward(x, w, b)
    worst = ref.error_ratio(kernels.linear_forward(x, w, b), want, bound)
    want, bound = ref.linear_forward(x.T.copy().T, w)  # a column-major x, read in place, no bias
    return max(worst, ref.error_ratio(kernels.linear_forward(np.asfortranarray(x), w), want, bound))


def _linear_backward_input(shape, dtype):
    _, w, _, _, dy = ref.arrays(shape, dtype)
    want, bound = ref.linear_backward_input(dy, w)
    return ref.error_ratio(kernels.linear_backward_input(dy, w), want, bound)


def _linear_backward_weight(shape, dtype):
    x, _, _, _, dy = ref.arrays(shape, dtype)
    dw, dw_bound, db, db_bound = ref.linear_backward_weight(dy, x)
    got_dw, got_db = kernels.linear_backward_weight(dy, x)
    return max(ref.error_ratio(got_dw, dw, dw_bound), ref.error_ratio(got_db, db, db_bound))


def _mse_check(kernel_name, reductions, result):
    """A check of an MSE kernel: `result` picks (value, bound) out of ref.mse's four results.
    The kernel is looked up at each call, so that a replaced one is the one checked."""

    def check(shape, dtype):
        _, _, _, t, y = ref.arrays(shape, dtype)
        kernel = getattr(kernels, kernel_name)
        return max(
            ref.error_ratio(kernel(y, t, reduction), *result(ref.mse(y, t, reduction))) for reduction in reductions
        )

    return check


_mse_loss = _mse_check("mse_loss", ("mean", "sum", "none"), lambda r: (r[0], r[1]))
_mse_backward = _mse_check("mse_backward", ("mean", "sum"), lambda r: (r[2], r[3]))


def _linear_mse(shape, dtype):
    x, w, b, t, _ = ref.arrays(shape, dtype)
    worst = 0.0
    for reduction in ("mean", "sum"):
        wants = ref.linear_mse(x, w, b, t, reduction)
        gots = kernels.linear_mse(x, w, b, t, reduction)
        for got, (want, bound) in zip(gots, wants):
            worst = max(worst, ref.error_ratio(got, want, bound))
    return worst


KERNEL_CHECKS: dict[str, Callable] = {
    "linear_forward": _linear_forward,
    "linear_backward_input": _linear_backward_input,
    "linear_backward_weight": _linear_backward_weight,
    "mse_loss": _mse_loss,
    "mse_backward": _mse_backward,
    "linear_mse": _linear_mse,
}


# bfloat16 products (with ml_dtypes installed): bfloat16 x and dY with a float32 weight, the mix that
# torch.autocast makes, against the float64 product of the rounded operands (reference.bf16_values);
# a bfloat16 result's bound adds its rounding.


def _bf16_arrays(shape):
    import ml_dtypes

    x, w, b, t, dy = ref.arrays(shape, np.float32)
    return x.astype(ml_dtypes.bfloat16), w, b, t, dy.astype(ml_dtypes.bfloat16)


def _bf16_forward(shape, dtype=None):
    x, w, b, _, _ = _bf16_arrays(shape)
    want, bound = ref.linear_forward(ref.bf16_values(x), ref.bf16_values(w), b)
    y = kernels.linear_forward(x, w, b, out=np.empty((x.shape[0], w.shape[0]), x.dtype))  # a bfloat16 result
    return ref.error_ratio(y.astype(np.float32), want, ref.bf16_output_bound(want, bound))


def _bf16_backward_input(shape, dtype=None):
    _, w, _, _, dy = _bf16_arrays(shape)
    want, bound = ref.linear_backward_input(ref.bf16_values(dy), ref.bf16_values(w))
    return ref.error_ratio(kernels.linear_backward_input(dy, w), want, bound)  # a float32 result


def _bf16_backward_weight(shape, dtype=None):
    x, w, _, _, dy = _bf16_arrays(shape)
    dw, dw_bound, db, db_bound = ref.linear_backward_weight(ref.bf16_values(dy), ref.bf16_values(x))
    got_dw, got_db = kernels.linear_backward_weight(dy, x, out=np.empty(w.shape, np.float32))  # master weight's grad
    db_bound = ref.bf16_output_bound(db, db_bound) if got_db.dtype != np.float32 else db_bound
    return max(ref.error_ratio(got_dw, dw, dw_bound), ref.error_ratio(got_db.astype(np.float32), db, db_bound))


BF16_CHECKS: dict[str, Callable] = {
    "linear_forward": _bf16_forward,
    "linear_backward_input": _bf16_backward_input,
    "linear_backward_weight": _bf16_backward_weight,
}


def _threads_bitwise(dtype) -> str | None:
    """None if the fused step is bitwise identical with 1 thread and with all; else what differs."""
    threads = lingrad.get_num_threads()
    if np.prod(THREADED_SHAPE) < lingrad.config()["gemm_serial_work"]:
        return f"{THREADED_SHAPE} is below the threaded path's threshold: the check would compare one thread with one"
    x, w, b, t, _ = ref.arrays(THREADED_SHAPE, dtype)
    with lingrad.settings(threads=1):
        one = kernels.linear_mse(x, w, b, t)
    many = kernels.linear_mse(x, w, b, t)
    for name, a, c in zip(("loss", "grad_input", "grad_weight", "grad_bias"), one, many):
        if not np.array_equal(np.asarray(a), np.asarray(c)):
            return f"{name} differs between 1 and {threads} threads"
    return None


def _torch_checks() -> list[tuple[str, Callable[[], str | None]]]:
    """gradcheck of the autograd Functions (float64) and the drop-in Linear against nn.Linear."""
    import torch

    from lingrad.autograd import LinearFunction, LinearMSEFunction

    def _param(shape, generator):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    def gradcheck_linear():
        g = torch.Generator().manual_seed(0)
        x, w, b = (_param(shape, g) for shape in ((5, 7), (3, 7), (3,)))
        torch.autograd.gradcheck(LinearFunction.apply, (x, w, b), raise_exception=True)
        return None

    def gradcheck_linear_mse():
        g = torch.Generator().manual_seed(1)
        x, w, b = (_param(shape, g) for shape in ((5, 7), (3, 7), (3,)))
        t = torch.randn(5, 3, generator=g, dtype=torch.float64)
        for reduction in ("mean", "sum"):
            torch.autograd.gradcheck(
                lambda x, w, b, r=reduction: LinearMSEFunction.apply(x, w, b, t, r, True)[0],
                (x, w, b),
                raise_exception=True,
            )
        return None

    def drop_in_linear():
        torch.manual_seed(0)
        theirs = torch.nn.Linear(257, 33)
        ours = lingrad.Linear(257, 33)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(129, 257)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ours(x1).square().sum().backward()
        theirs(x2).square().sum().backward()
        pairs = [
            ("output", ours(x), theirs(x)),
            ("grad_input", x1.grad, x2.grad),
            ("grad_weight", ours.weight.grad, theirs.weight.grad),
            ("grad_bias", ours.bias.grad, theirs.bias.grad),
        ]
        for name, a, c in pairs:
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        return None

    return [
        ("gradcheck LinearFunction (float64)", gradcheck_linear),
        ("gradcheck LinearMSEFunction mean, sum (float64)", gradcheck_linear_mse),
        ("lingrad.Linear matches torch.nn.Linear (float32, forward and gradients)", drop_in_linear),
    ]


def run(out: IO[str] | None = None, *, use_torch: bool = True) -> bool:
    """Run every check, print one line each and a summary; True if all passed."""
    out = out or sys.stdout
    failures = 0
    count = 0

    def line(ok: bool | None, isa: str, what: str, detail: str = "") -> None:
        nonlocal failures, count
        status = {True: "pass", False: "FAIL", None: "skip"}[ok]
        failures += ok is False
        count += ok is not None
        print(f"{status}  {isa:8} {what:56} {detail}".rstrip(), file=out, flush=True)

    def attempt(isa: str, what: str, check: Callable[[], str | None]) -> None:
        try:
            problem = check()
        except Exception as e:  # a crash is a failure of this check, not of the run
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        line(problem is None, isa, what, problem or "")

    default_isa = lingrad.get_isa()
    threads = lingrad.get_num_threads()
    isas = lingrad.available_isas()
    print(
        f"lingrad {lingrad.__version__} self-check: SIMD paths {', '.join(isas)} (default {default_isa}), "
        f"{threads} threads; errors are shown as a fraction of the float64 reference's rigorous bound",
        file=out,
    )
    torch_checks = []
    torch_missing = None
    if use_torch:
        try:
            torch_checks = _torch_checks()
        except ImportError as e:
            torch_missing = f'PyTorch is not installed ({e.name or e}): pip install "lingrad[torch]"'

    def bounded(isa: str, what: str, check: Callable, dtype) -> None:
        """One kernel check over SHAPES: its worst error as a fraction of the bound."""
        try:
            worst = max(check(shape, dtype) for shape in SHAPES)
        except Exception as e:  # a crash is a failure of this check, not of the run
            line(False, isa, what, f"{type(e).__name__}: {e}")
            return
        if worst <= 1.0:
            line(True, isa, what, f"worst error {worst:.2g} of the bound ({len(SHAPES)} shapes)")
        else:
            line(False, isa, what, f"an error {worst:.3g} times the bound")

    bf16 = lingrad.config()["bf16_numpy"]
    for isa in isas:
        with lingrad.settings(isa=isa):  # (and the thread count, whatever a check does to it)
            for dtype in DTYPES:
                name = np.dtype(dtype).name
                for kernel, check in KERNEL_CHECKS.items():
                    bounded(isa, f"{kernel} {name}", check, dtype)
                attempt(
                    isa,
                    f"linear_mse {name}: bitwise identical for 1 and {threads} threads",
                    lambda dtype=dtype: _threads_bitwise(dtype),
                )
            for kernel, check in BF16_CHECKS.items() if bf16 else ():
                bounded(isa, f"{kernel} bfloat16 (float32 weight)", check, None)
            if not bf16:
                line(None, isa, "bfloat16 products", "ml_dtypes is not installed: pip install ml_dtypes")
            for what, check in torch_checks:
                attempt(isa, what, check)
            if torch_missing:
                line(None, isa, "PyTorch checks", torch_missing)
    verdict = "PASS" if failures == 0 else "FAIL"
    print(
        f"{verdict}: {count - failures} of {count} checks passed" + (f", {failures} failed" if failures else ""),
        file=out,
    )
    return failures == 0
