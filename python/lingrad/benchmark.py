"""The benchmark sweep: lingrad against PyTorch's CPU path and NumPy, measured in one process.

Each comparison runs its contestants interleaved (A, B, A, B, ...) so that both see the same
machine load, and reports medians and the ratio of medians (> 1 means lingrad is faster). GFLOP/s
count 2*B*in*out per product: a forward pass is one product, a training step with the input
gradient three (the mixed MLP's second layer, out -> 1, is not counted). The peak is measured here,
with an FMA loop on the same threads, and every rate is also given as a percentage of it.

The cliff finder (``cliff_shapes``, ``summary``) times a seeded set of random shapes, log-uniform in
each of batch, in and out from 1 to 4096, and reports the worst and the median ratio per case.

NumPy's BLAS is named as threadpoolctl reports it (``blas_description``). OpenBLAS chooses its
kernel for the CPU when it is loaded, unless OPENBLAS_CORETYPE (or OPENBLAS_L2_SIZE) forces it:
``bench/sweep.py`` removes both from its own environment before NumPy is imported, so that NumPy
runs its best kernel; the tests and CI never do.

Used by ``python -m lingrad bench`` and ``bench/sweep.py``.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import lingrad
from lingrad import _C, kernels
from lingrad import reference as ref

# (batch, in_features, out_features)
SMALL_BATCH = [(1, 784, 50), (1, 4096, 1024), (1, 1024, 4096), (2, 4096, 4096), (8, 1024, 1024)]
SWEEP = [
    (1, 3, 1),
    *SMALL_BATCH,
    (32, 64, 64),
    (64, 784, 50),
    (256, 784, 256),
    (512, 1024, 1024),
    (5000, 784, 50),
    (60000, 784, 50),
    (8192, 1024, 1),
    (1024, 4096, 1024),
    (4096, 1024, 1024),
]
ODD = [(257, 511, 1000), (777, 1000, 257), (1000, 777, 511)]  # no power of two, no tile multiple
FLOAT64 = [(64, 784, 50), (512, 1024, 1024)]
QUICK = [(1, 3, 1), (1, 4096, 1024), (32, 64, 64), (64, 784, 50), (256, 784, 256), (512, 1024, 1024)]
OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # what forces OpenBLAS's kernel choice
# The cases the cliff finder times at each random shape (the mixed MLP and the drop-in step add
# nothing the products and the fused step do not show, at up to 4096^3 multiply-adds a product).
CLIFF = ("forward", "grad input", "grad weight", "forward no-grad", "step fused")


def cliff_shapes(count: int = 48, seed: int = 12, low: int = 1, high: int = 4096) -> list[tuple]:
    """`count` random shapes (batch, in, out), each dimension log-uniform in [low, high] (seeded:
    the same shapes every run), to find the shapes where lingrad falls behind."""
    rng = np.random.default_rng(seed)
    logs = rng.uniform(math.log(low), math.log(high + 1), size=(count, 3))
    return [tuple(int(min(high, max(low, math.floor(math.exp(v))))) for v in row) for row in logs]


# NumPy's OpenBLAS runs its own thread pool, whose idle threads keep spinning on the cores for about
# 0.1 s after each call (and lingrad's OpenMP threads for a few ms): timed right after the other,
# each side would run with the other's spinning threads in its way (1024^3 forward: 2x slower after
# a NumPy call; a small product up to 16 ms a call). Sleeping instead is no cure on a virtual
# machine: its idle vCPUs can take milliseconds to get a core back. So in NumPy comparisons each
# contestant runs untimed for NUMPY_SETTLE seconds before each timed batch, and batches are longer:
# each side is timed as it runs on its own, in alternation.
NUMPY_SETTLE = 0.2
NUMPY_BATCH = 0.02


@dataclass
class Result:
    case: str  # "step fused", "step drop-in", "mlp mixed", "forward", "grad input", "grad weight"
    shape: tuple
    dtype: str
    flops: float
    seconds: dict = field(default_factory=dict)  # contestant -> median seconds per call

    def ratio(self, baseline: str) -> float:
        return self.seconds[baseline] / self.seconds["lingrad"]

    def gflops(self, contestant: str) -> float:
        return self.flops / self.seconds[contestant] * 1e-9


def time_interleaved(
    contestants: dict[str, Callable[[], object]],
    budget: float = 0.6,
    min_rounds: int = 5,
    max_rounds: int = 200,
    batch: float = 1e-3,
    settle: float = 0.0,
) -> dict[str, float]:
    """Median seconds per call of each contestant, timed in alternation.

    A round calls each contestant `inner` times in a row (enough for about `batch` seconds), then
    the next one; rounds repeat until `budget` seconds are spent (at least `min_rounds`). With
    `settle`, each batch follows that many seconds of untimed calls of the same contestant: the
    time another thread pool keeps spinning after its last call (see NUMPY_SETTLE)."""
    for f in contestants.values():  # warm up: first-touch allocations, thread pools, caches
        f()
        f()
    slowest = max(_once(f) for f in contestants.values())
    inner = max(1, int(batch / max(slowest, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in contestants}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget and rounds < max_rounds):
        for name, f in contestants.items():
            settled = time.perf_counter() + settle
            while time.perf_counter() < settled:
                f()
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            samples[name].append((time.perf_counter() - t0) / inner)
        rounds += 1
    return {name: statistics.median(s) for name, s in samples.items()}


def _once(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def numpy_cases(shape, dtype) -> dict[str, dict[str, Callable[[], object]]]:
    """lingrad's NumPy kernels against NumPy's own expressions, each writing into a preallocated
    output where NumPy can (so neither side pays for allocation)."""
    x, w, b, t, dy = ref.arrays(shape, dtype, scale_weight=True)
    y, dx, dw, db = np.empty_like(t), np.empty_like(x), np.empty_like(w), np.empty_like(b)

    def np_forward():
        np.matmul(x, w.T, out=y)
        np.add(y, b, out=y)

    def np_grad_weight():
        np.matmul(dy.T, x, out=dw)
        dy.sum(axis=0, out=db)

    return {
        "forward": {"lingrad": lambda: kernels.linear_forward(x, w, b, out=y), "numpy": np_forward},
        "grad input": {
            "lingrad": lambda: kernels.linear_backward_input(dy, w, out=dx),
            "numpy": lambda: np.matmul(dy, w, out=dx),
        },
        "grad weight": {
            "lingrad": lambda: kernels.linear_backward_weight(dy, x, out=dw, bias_out=db),
            "numpy": np_grad_weight,
        },
    }


def torch_cases(shape, dtype) -> dict[str, dict[str, Callable[[], object]]]:
    """Whole training steps (forward, loss, backward with the input gradient) through PyTorch's
    autograd: lingrad's fused block and drop-in Linear against nn.Linear + F.mse_loss."""
    import torch
    import torch.nn.functional as F

    x_np, w_np, b_np, t_np, _ = ref.arrays(shape, dtype, scale_weight=True)
    x = torch.from_numpy(x_np).requires_grad_(True)
    t = torch.from_numpy(t_np)
    n_out, n_in = w_np.shape

    reference = torch.nn.Linear(n_in, n_out, dtype=x.dtype)
    drop_in = lingrad.Linear(n_in, n_out, dtype=x.dtype)
    fused = lingrad.LinearMSELoss(n_in, n_out, dtype=x.dtype)
    for module in (reference, drop_in, fused):
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w_np))
            module.bias.copy_(torch.from_numpy(b_np))
    # A mixed model: lingrad layers around a PyTorch ReLU, against the same model in plain PyTorch
    # (they share one OpenMP runtime, so they must not fight over the cores).
    torch_mlp = torch.nn.Sequential(
        torch.nn.Linear(n_in, n_out, dtype=x.dtype), torch.nn.ReLU(), torch.nn.Linear(n_out, 1, dtype=x.dtype)
    )
    mixed_mlp = torch.nn.Sequential(
        lingrad.Linear(n_in, n_out, dtype=x.dtype), torch.nn.ReLU(), lingrad.Linear(n_out, 1, dtype=x.dtype)
    )
    mixed_mlp.load_state_dict(torch_mlp.state_dict())
    t1 = t[:, :1].contiguous()
    params = [
        x,
        *reference.parameters(),
        *drop_in.parameters(),
        *fused.parameters(),
        *torch_mlp.parameters(),
        *mixed_mlp.parameters(),
    ]

    def step(loss):
        """A training step: the gradients cleared, the loss computed, backward."""

        def run():
            for p in params:
                p.grad = None
            loss().backward()

        return run

    torch_step = step(lambda: F.mse_loss(reference(x), t))
    x_data = x.detach()

    def no_grad(module):
        def run():
            with torch.no_grad():
                return module(x_data)

        return run

    return {
        "forward no-grad": {"lingrad": no_grad(drop_in), "torch": no_grad(reference)},
        "step fused": {"lingrad": step(lambda: fused(x, t)), "torch": torch_step},
        "step drop-in": {"lingrad": step(lambda: F.mse_loss(drop_in(x), t)), "torch": torch_step},
        "mlp mixed": {
            "lingrad": step(lambda: F.mse_loss(mixed_mlp(x), t1)),
            "torch": step(lambda: F.mse_loss(torch_mlp(x), t1)),
        },
    }


def run(
    shapes: Iterable[tuple],
    dtype=np.float32,
    *,
    numpy_baseline: bool = True,
    torch_baseline: bool = True,
    budget: float = 0.6,
    progress: Callable[[Iterable], Iterable] | None = None,
    only: Collection[str] | None = None,
) -> list[Result]:
    """Measure every case (or those named in `only`) at every shape. `progress` may wrap the shape
    iterator (e.g. tqdm)."""
    results = []
    shapes = list(shapes)
    for shape in progress(shapes) if progress else shapes:
        batch, n_in, n_out = shape
        product = 2.0 * batch * n_in * n_out
        groups: list[tuple] = []  # PyTorch and NumPy are never timed together (see NUMPY_SETTLE)
        # (cases, flops of each case, timing options)
        if torch_baseline:
            cases = torch_cases(shape, dtype)
            groups.append((cases, {c: product if c == "forward no-grad" else 3 * product for c in cases}, {}))
        if numpy_baseline:
            cases = numpy_cases(shape, dtype)
            timing = dict(settle=NUMPY_SETTLE, batch=NUMPY_BATCH, budget=budget + 10 * NUMPY_SETTLE)
            groups.append((cases, dict.fromkeys(cases, product), timing))
        # (PyTorch's first batch at the next shape follows NumPy's last call: one slow batch of at
        # least five, which the median leaves out)
        for cases, flops, timing in groups:
            for case, contestants in cases.items():
                if only is not None and case not in only:
                    continue
                seconds = time_interleaved(contestants, **{"budget": budget, **timing})
                results.append(Result(case, shape, np.dtype(dtype).name, flops[case], seconds))
    return results


def sweep(
    full: bool,
    *,
    torch_baseline: bool = True,
    budget: float = 0.6,
    progress: Callable[[Iterable], Iterable] | None = None,
    cliff: int = 0,
    sweep_shapes: bool = True,
) -> tuple[list[Result], float]:
    """The benchmark sweep (`full`: SWEEP and ODD in float32 and FLOAT64 in float64; else QUICK;
    none without `sweep_shapes`), then `cliff` shapes of the cliff finder (cliff_shapes), and the
    FMA peak in GFLOP/s, measured before and after: a busy core during one probe halves it."""
    peak = peak_gflops()
    shapes = (SWEEP + ODD if full else QUICK) if sweep_shapes else []
    results = run(shapes, np.float32, torch_baseline=torch_baseline, budget=budget, progress=progress)
    if full and sweep_shapes:
        results += run(FLOAT64, np.float64, torch_baseline=torch_baseline, budget=budget, progress=progress)
    if cliff:
        found = run(
            cliff_shapes(cliff), np.float32, torch_baseline=torch_baseline, budget=budget, progress=progress, only=CLIFF
        )
        results += [Result(f"{r.case} (cliff)", r.shape, r.dtype, r.flops, r.seconds) for r in found]
    return results, max(peak, peak_gflops())


def summary(results: list[Result]) -> str:
    """A Markdown table per case: the worst and the median ratio against its baseline, and the shape
    of the worst (the cliff finder's verdict; also useful on the sweep)."""
    lines = [
        "| case | baseline | shapes | worst ratio | at (B, in, out) | median ratio |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    cases: dict[tuple, list[Result]] = {}
    for r in results:
        cases.setdefault((r.case, r.dtype, _baseline(r)), []).append(r)
    for (case, dtype, baseline), rows in cases.items():
        worst = min(rows, key=lambda r: r.ratio(baseline))
        median = statistics.median(r.ratio(baseline) for r in rows)
        lines.append(
            f"| {case} ({dtype}) | {baseline} | {len(rows)} | {worst.ratio(baseline):.2f}x | "
            f"{', '.join(map(str, worst.shape))} | {median:.2f}x |"
        )
    return "\n".join(lines)


def _baseline(r: Result) -> str:
    return next(name for name in r.seconds if name != "lingrad")


def cpu_name() -> str:
    """The CPU's model name, family and model (Linux), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
        return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def describe_machine(peak: float) -> str:
    """Three lines: the CPU, its measured peak and the micro-kernel's rate in L1; lingrad's, NumPy's
    and PyTorch's versions and threads; the BLAS kernel NumPy runs."""
    info = lingrad.config()
    versions = f"lingrad {info['version']} ({info['isa']}, {info['num_threads']} threads), numpy {np.__version__}"
    try:
        import torch

        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        versions += ", torch not installed"
    tile = tile_gflops()
    return (
        f"CPU: {cpu_name()}; measured float32 FMA peak {peak:.0f} GFLOP/s; lingrad's micro-kernel on panels in L1 "
        f"{tile:.0f} GFLOP/s ({100 * tile / peak:.0f}% of the peak)\n{versions}\n{blas_description()}"
    )


def blas_description() -> str:
    """The BLAS library NumPy calls and the kernel it runs (threadpoolctl), and whether the
    environment forced that kernel (OPENBLAS_ENV)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "NumPy's BLAS: unknown (pip install threadpoolctl to name it)"
    blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not blas:
        return "NumPy's BLAS: none found by threadpoolctl"
    parts = []
    for p in blas:
        kernel = p.get("architecture") or "kernel unknown"
        library = f"{p.get('internal_api', '?')} {p.get('version', '?')}"
        parts.append(f"{library} ({kernel} kernel, {p.get('num_threads')} threads)")
    forced = [f"{name}={os.environ[name]}" for name in OPENBLAS_ENV if name in os.environ]
    note = (
        f"; its kernel is forced by {', '.join(forced)} (bench/sweep.py runs without it: OpenBLAS's own choice)"
        if forced
        else "; its own choice for this CPU"
    )
    return "NumPy's BLAS: " + ", ".join(parts) + note


def peak_gflops(threads: int | None = None) -> float:
    """The float32 FMA peak of this machine with lingrad's threads (see _C.measure_fma_peak)."""
    return _C.measure_fma_peak(threads or lingrad.get_num_threads(), 0.3)


def tile_gflops(threads: int | None = None) -> float:
    """The float32 micro-kernel's rate on packed panels in L1 (see _C.measure_tile_rate): what the
    register tile reaches before packing, cache misses and the loops around it."""
    return _C.measure_tile_rate(threads or lingrad.get_num_threads(), 0.3)


def table(results: list[Result], peak: float) -> str:
    """A Markdown table: medians, ratios against the baseline, GFLOP/s and percent of peak."""
    lines = [
        "| case | dtype | B, in, out | lingrad | baseline | ratio | lingrad GF/s | baseline GF/s "
        "| lingrad % of peak | baseline % of peak |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        baseline = _baseline(r)
        lines.append(
            f"| {r.case} | {r.dtype} | {', '.join(map(str, r.shape))} | {_us(r.seconds['lingrad'])} | "
            f"{baseline} {_us(r.seconds[baseline])} | {r.ratio(baseline):.2f}x | {r.gflops('lingrad'):.1f} | "
            f"{r.gflops(baseline):.1f} | {100 * r.gflops('lingrad') / peak:.0f}% | "
            f"{100 * r.gflops(baseline) / peak:.0f}% |"
        )
    return "\n".join(lines)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def plot(results: list[Result], path: str, peak: float) -> str:
    """A PNG chart of GFLOP/s per shape for each case: lingrad against its baseline."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    cases = list(dict.fromkeys(r.case for r in results))
    fig = Figure(figsize=(11, 2.9 * len(cases)))
    axes = fig.subplots(len(cases), 1, squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        rows = [r for r in results if r.case == case]
        labels = [f"{r.shape[0]},{r.shape[1]},{r.shape[2]}" + ("" if r.dtype == "float32" else " f64") for r in rows]
        xs = np.arange(len(rows))
        contestants = list(rows[0].seconds)
        width = 0.8 / len(contestants)
        for i, name in enumerate(contestants):
            ax.bar(xs + (i - (len(contestants) - 1) / 2) * width, [r.gflops(name) for r in rows], width, label=name)
        ax.axhline(peak, color="gray", linestyle="--", linewidth=1, label=f"FMA peak {peak:.0f}")
        ax.set_title(case)
        ax.set_ylabel("GFLOP/s")
        ax.set_xticks(xs, labels, fontsize=8, rotation=30, ha="right")
        ax.legend(fontsize=8, loc="upper left")
    axes[-1, 0].set_xlabel("batch, in_features, out_features")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
