"""One DP-SGD step: lingrad.privacy against a non-private lingrad step and Opacus; peak memory.

    python bench/privacy_step.py [--repeat 7] [--seconds 0.3] [--models small,large] [--no-memory]
                                 [--memory-repeat 3]

A step is the forward pass of a ReLU MLP, the per-sample cross-entropy, the backward pass, clipping
(C = 1.0), Gaussian noise (noise_multiplier 1.0) and an SGD update (lr 0.05), on the same initial
weights and batch for every variant:

    lingrad            lingrad.Linear layers: loss.mean().backward(), SGD (not private: the baseline)
    lingrad fused      lingrad.fuse(model): the same, one native call forward and one backward
    private            lingrad.Linear layers, lingrad.privacy.clip_and_accumulate, SGD
    private fused      lingrad.fuse(model), clip_and_accumulate, SGD
    private, no noise  lingrad.Linear layers, clip_and_accumulate with noise_multiplier 0 (clipping alone:
                       what drawing the noise, one Gaussian per parameter, costs is the difference)
    opacus hooks       torch.nn.Linear in opacus.GradSampleModule (per-sample gradients materialised)
                       with opacus.optimizers.DPOptimizer
    opacus ghost       GradSampleModuleFastGradientClipping(use_ghost_clipping=True) with
                       DPOptimizerFastGradientClipping and DPLossFastGradientClipping (two backward passes)

The variants of a model are timed interleaved in one process (A, B, C, A, B, C, ...): each cell is
the median over the repeats of the mean time of a step within a timed batch of about --seconds, in
milliseconds. Memory: each variant in a fresh child process, which builds the model and the batch,
resets its peak resident set size (/proc/self/clear_refs) and runs three steps; the cell is the
peak minus the resident size before the steps (VmHWM - VmRSS, from /proc/self/status: native
allocations included, which tracemalloc would miss), the median of --memory-repeat such processes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import warnings

import torch
import torch.nn.functional as F

import lingrad
from lingrad import benchmark
from lingrad.benchmark import time_interleaved

MODELS = {  # name: (batch, widths)
    "small": (256, [784, 256, 10]),
    "large": (1024, [1024, 1024, 10]),
}
MEMORY_MODEL = (1024, [784, 512, 10])
C, NOISE, LR = 1.0, 1.0, 0.05
VARIANTS = ["lingrad", "lingrad fused", "private", "private fused", "private, no noise", "opacus hooks", "opacus ghost"]


def mlp(widths, linear=torch.nn.Linear) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def have_opacus() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def make_step(variant: str, base: torch.nn.Sequential, batch: int):
    """A function of (x, labels) running one training step of `variant` from `base`'s weights."""
    model = copy.deepcopy(base)
    if variant.startswith(("lingrad", "private")):
        lingrad.swap_linear(model)
        if variant.endswith("fused"):  # "private, no noise" is not fused
            model = lingrad.fuse(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        if variant.startswith("lingrad"):

            def step(x, y):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

            return step
        generator = torch.Generator().manual_seed(0)
        noise = 0.0 if variant.endswith("no noise") else NOISE

        def private_step(x, y):
            loss = F.cross_entropy(model(x), y, reduction="none")
            lingrad.privacy.clip_and_accumulate(model, loss, C, noise, generator)
            opt.step()

        return private_step

    import opacus
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    if variant == "opacus hooks":
        gsm = opacus.GradSampleModule(model)
        sgd = torch.optim.SGD(model.parameters(), lr=LR)
        opt = opacus.optimizers.DPOptimizer(sgd, noise_multiplier=NOISE, max_grad_norm=C, expected_batch_size=batch)

        def opacus_step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y).backward()
            opt.step()

        return opacus_step
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=C, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=NOISE, max_grad_norm=C, expected_batch_size=batch
    )
    criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss())

    def ghost_step(x, y):
        opt.zero_grad(set_to_none=True)
        criterion(gsm(x), y).backward()
        opt.step()

    return ghost_step


def measure(fns: dict, repeat: int, seconds: float) -> dict[str, float]:
    """Median milliseconds per call of each step, over `repeat` rounds of batches of about `seconds`
    timed in alternation (lingrad.benchmark.time_interleaved)."""
    s = time_interleaved(fns, budget=0.0, min_rounds=repeat, batch=seconds, settle=0.0)
    return {name: t * 1e3 for name, t in s.items()}


def data(batch: int, widths):
    torch.manual_seed(1)
    return torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(variant: str) -> None:
    """In a child process: the step's peak memory above the resident size before it, in MiB (JSON)."""
    batch, widths = MEMORY_MODEL
    torch.manual_seed(0)
    base = mlp(widths)
    x, y = data(batch, widths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = make_step(variant, base, batch)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = status_kib("VmRSS")
        for _ in range(3):
            step(x, y)
    peak = status_kib("VmHWM")
    print(json.dumps({"step_mib": (peak - before) / 1024, "peak_mib": peak / 1024}))


def memory_table(variants: list[str], repeat: int) -> None:
    batch, widths = MEMORY_MODEL
    model = f"(B={batch}; {'-'.join(map(str, widths))})"
    print(f"\npeak memory of three steps above the resident size before them, {model}")
    print("| variant | step's peak above resident, MiB | process peak, MiB | vs lingrad |")
    print("| --- | ---: | ---: | ---: |")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeat):  # interleaved, a fresh process each time: the allocator's choices vary a little
        for variant in variants:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", variant],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {v: {k: statistics.median(r[k] for r in rs) for k in ("step_mib", "peak_mib")} for v, rs in runs.items()}
    base = results["lingrad"]["step_mib"]
    for variant, r in results.items():
        print(f"| {variant} | {r['step_mib']:.1f} | {r['peak_mib']:.0f} | {r['step_mib'] / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-repeat", type=int, default=3, help="child processes per variant (median)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    variants = VARIANTS if have_opacus() else VARIANTS[:5]
    opacus_note = "not installed (pip install opacus): its columns are left out"
    if have_opacus():
        import opacus

        opacus_note = opacus.__version__
    print(f"CPU: {benchmark.cpu_name()}")
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), lingrad {lingrad.__version__} "
        f"({lingrad.get_num_threads()} threads, {lingrad.get_isa()}), Opacus {opacus_note}"
    )
    print("median step time, ms")
    print("\n| model (batch; widths) | " + " | ".join(variants) + " | private vs lingrad | vs hooks | vs ghost |")
    print("| --- |" + " ---: |" * (len(variants) + 3))
    for name in args.models.split(","):
        batch, widths = MODELS[name]
        torch.manual_seed(0)
        base = mlp(widths)
        x, y = data(batch, widths)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps = {v: make_step(v, base, batch) for v in variants}
            fns = {v: (lambda s=s, x=x, y=y: s(x, y)) for v, s in steps.items()}
            m = measure(fns, args.repeat, args.seconds)
        cells = " | ".join(f"{m[v]:.2f}" for v in variants)
        best = min(m["private"], m["private fused"])
        ratios = f"{best / m['lingrad']:.2f}x"
        if "opacus hooks" in m:
            ratios += f" | {m['opacus hooks'] / best:.2f}x | {m['opacus ghost'] / best:.2f}x"
        else:
            ratios += " | - | -"
        print(f"| {name} ({batch}; {'-'.join(map(str, widths))}) | {cells} | {ratios} |")
    print("(private vs lingrad: the faster private variant's time over the non-private lingrad step's;")
    print(" vs hooks / vs ghost: Opacus's time over the faster private variant's)")
    if not args.no_memory:
        memory_table(variants, args.memory_repeat)


if __name__ == "__main__":
    main()
