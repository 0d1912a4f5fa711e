"""bfloat16: lingrad's bfloat16 products against its own float32 ones, and autocast training steps
against PyTorch's autocast (oneDNN), timed interleaved in one process (medians).

    python bench/bf16.py                 # all three tables (--only products, pytorch or steps: one)
    python bench/bf16.py --lock FILE     # hold an exclusive flock on FILE while timing (shared machines)
    python bench/bf16.py --only products --widened avx2   # the widened path as an AVX2-only CPU runs it

Products (NumPy level, bfloat16 x and weight, float32 results): on every bfloat16 path this CPU has
(amx_bf16: AMX tiles; avx512_bf16: vdpbf16ps; the widened float32 micro-kernel), each as a ratio to
lingrad's float32 product and as a fraction of the peaks measured here (float32 FMA, and the
path's own bfloat16 instructions). The widened path, which a CPU without bfloat16 instructions
runs, is also set against what a user would do there instead: widen the bfloat16 operands to
float32 (exactly, by a shift of their bits) and run lingrad's float32 product.

Steps: nn.Linear + F.mse_loss + backward under torch.autocast("cpu", dtype=torch.bfloat16), against
the same with lingrad.Linear (drop-in) and with lingrad.LinearMSELoss (fused), float32 parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl

import numpy as np
import torch
import torch.nn.functional as F

import lingrad
from lingrad import _C, kernels
from lingrad import reference as ref
from lingrad.benchmark import cpu_name, time_interleaved

PRODUCT_SHAPES = [(4096, 1024, 1024), (1024, 4096, 1024), (512, 1024, 1024), (256, 784, 256)]
STEP_SHAPES = [
    (256, 784, 256),
    (512, 1024, 1024),
    (4096, 1024, 1024),
    (1024, 4096, 1024),
    (5000, 784, 50),
    (257, 511, 1000),
    (777, 1000, 257),
    (1000, 777, 511),
]
PATHS = {"amx_bf16": "AMX", "avx512_bf16": "vdpbf16ps", "avx512": "widened", "avx2": "widened", "generic": "widened"}


@contextlib.contextmanager
def locked(path: str | None):
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def widen(a: np.ndarray) -> np.ndarray:
    """A bfloat16 array as float32, exactly: its bits shifted into the high half (NumPy, no ml_dtypes loop)."""
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def product_cases(x, w, dy, xb, wb, dyb) -> dict:
    """Each product as (float32 call, bfloat16 call with a float32 result, widen to float32 then the float32 call)."""
    y32 = np.empty((x.shape[0], w.shape[0]), np.float32)
    dx32, dw32 = np.empty(x.shape, np.float32), np.empty(w.shape, np.float32)
    return {
        "forward": (
            lambda: kernels.linear_forward(x, w),
            lambda: kernels.linear_forward(xb, wb, out=y32),
            lambda: kernels.linear_forward(widen(xb), widen(wb), out=y32),
        ),
        "grad input": (
            lambda: kernels.linear_backward_input(dy, w),
            lambda: kernels.linear_backward_input(dyb, wb, out=dx32),
            lambda: kernels.linear_backward_input(widen(dyb), widen(wb), out=dx32),
        ),
        "grad weight": (
            lambda: kernels.linear_backward_weight(dy, x),
            lambda: kernels.linear_backward_weight(dyb, xb, out=dw32),
            lambda: kernels.linear_backward_weight(widen(dyb), widen(xb), out=dw32),
        ),
    }


def autocast_step(model, x, t, fused: bool):
    """One SGD-free training step under autocast to bfloat16 (zero_grad, forward, loss, backward)."""

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, t) if fused else F.mse_loss(model(x), t)
        loss.backward()

    return run


def products(budget: float, lock: str | None, widened: str | None) -> None:
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    isas = [i for i in lingrad.available_isas() if i in ("amx_bf16", "avx512_bf16")]
    widened = widened or next(i for i in lingrad.available_isas() if PATHS[i] == "widened")
    with locked(lock):
        fma = _C.measure_fma_peak(lingrad.get_num_threads(), 0.5)
        peaks = {}
        for isa in isas:
            with lingrad.settings(isa=isa):
                peaks[isa] = _C.measure_bf16_peak(lingrad.get_num_threads(), 0.5)
    print(f"\nCPU: {cpu_name()}; lingrad {lingrad.__version__}, {lingrad.get_num_threads()} threads")
    print(f"peaks: float32 FMA {fma:.0f} GFLOP/s; " + "; ".join(f"{PATHS[i]} {p:.0f}" for i, p in peaks.items()))
    columns = [*isas, widened]
    print(
        "\n| product | B, in, out | float32 GF/s | "
        + " | ".join(f"{PATHS[i]} ({i})" for i in columns)
        + f" | widen, then float32 ({widened}) |"
    )
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: |")
    for shape in PRODUCT_SHAPES:
        batch, n_in, n_out = shape
        x, w, _, _, dy = ref.arrays(shape, np.float32, 0)
        xb, wb, dyb = x.astype(bf16), w.astype(bf16), dy.astype(bf16)
        flops = 2.0 * batch * n_in * n_out
        cases = product_cases(x, w, dy, xb, wb, dyb)
        for name, (f32, b16, widen_then_f32) in cases.items():
            seconds = {}
            with locked(lock):
                with lingrad.settings(isa=widened):
                    seconds["float32"] = time_interleaved({"f": f32}, budget / 4)["f"]
                for isa in isas:
                    with lingrad.settings(isa=isa):
                        seconds[isa] = time_interleaved({"b": b16}, budget / 4)["b"]
                with lingrad.settings(isa=widened):  # (the two a CPU without bfloat16 instructions chooses between)
                    both = time_interleaved({"b": b16, "w": widen_then_f32}, budget / 2)
                seconds[widened], seconds["widen"] = both["b"], both["w"]
            cells = []
            for isa in columns:
                gf = flops / seconds[isa] * 1e-9
                own = f", {gf / peaks[isa]:.0%} of its peak" if isa in peaks else ""
                ratio = seconds["float32"] / seconds[isa]
                vs_widen = f", {seconds['widen'] / seconds[isa]:.2f}x widen+float32" if isa == widened else ""
                cells.append(f"{gf:.0f} GF/s: {ratio:.2f}x float32{vs_widen}, {gf / fma:.0%} FMA{own}")
            f32_gf = flops / seconds["float32"] * 1e-9
            widen_gf = flops / seconds["widen"] * 1e-9
            print(
                f"| {name} | {batch}, {n_in}, {n_out} | {f32_gf:.0f} | "
                + " | ".join(cells)
                + f" | {widen_gf:.0f} GF/s |"
            )


def pytorch_cases(x, w, dy, y, dx, dw) -> dict:
    """Each product of bfloat16 tensors as (PyTorch's matmul, lingrad's kernel through DLPack, as
    lingrad's PyTorch layer calls it), both into the same bfloat16 result tensors."""
    from lingrad.torch._bridge import to_array as _array  # (a DLPack capsule of the tensor, used once)

    return {
        "forward": (
            lambda: torch.mm(x, w.t(), out=y),
            lambda: kernels.linear_forward(_array(x), _array(w), out=_array(y)),
        ),
        "grad input": (
            lambda: torch.mm(dy, w, out=dx),
            lambda: kernels.linear_backward_input(_array(dy), _array(w), out=_array(dx)),
        ),
        "grad weight": (
            lambda: torch.mm(dy.t(), x, out=dw),
            lambda: kernels.linear_backward_weight(_array(dy), _array(x), out=_array(dw)),
        ),
    }


def against_pytorch(budget: float, lock: str | None) -> None:
    """Each product on bfloat16 operands with a bfloat16 result, lingrad's against PyTorch's matmul
    (oneDNN: its AMX or AVX512-BF16 kernels where the CPU has them), interleaved."""
    peak = _C.measure_bf16_peak(lingrad.get_num_threads(), 0.5)
    print(f"\nbfloat16 products against PyTorch's matmul (bfloat16 results), lingrad on {lingrad.get_isa()}")
    print(f"(GFLOP/s, and the share of the {lingrad.config()['bf16_kernel']} probe's {peak:.0f} GFLOP/s)")
    print("\n| product | B, in, out | PyTorch | lingrad | lingrad vs PyTorch |")
    print("| --- | --- | ---: | ---: | ---: |")
    for batch, n_in, n_out in PRODUCT_SHAPES + [(5000, 784, 50)]:
        torch.manual_seed(0)
        x, w, dy = (torch.randn(s).bfloat16() for s in [(batch, n_in), (n_out, n_in), (batch, n_out)])
        y, dx, dw = (torch.empty(s, dtype=torch.bfloat16) for s in [(batch, n_out), (batch, n_in), (n_out, n_in)])
        cases = pytorch_cases(x, w, dy, y, dx, dw)
        flops = 2.0 * batch * n_in * n_out
        for name, (theirs, ours) in cases.items():
            with locked(lock):
                s = time_interleaved({"torch": theirs, "lingrad": ours}, budget / 2)
            gf = {k: flops / v * 1e-9 for k, v in s.items()}
            print(
                f"| {name} | {batch}, {n_in}, {n_out} | {gf['torch']:.0f} ({gf['torch'] / peak:.0%}) | "
                f"{gf['lingrad']:.0f} ({gf['lingrad'] / peak:.0%}) | {s['torch'] / s['lingrad']:.2f}x |"
            )


def steps(budget: float, lock: str | None) -> None:
    print(
        f"\nautocast bfloat16 training step (float32 parameters), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), lingrad on {lingrad.get_isa()}; median time per step"
    )
    print("\n| B, in, out | PyTorch | drop-in | fused | drop-in vs PyTorch | fused vs PyTorch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for batch, n_in, n_out in STEP_SHAPES:
        torch.manual_seed(0)
        theirs = torch.nn.Linear(n_in, n_out)
        ours = lingrad.Linear(n_in, n_out)
        fused = lingrad.LinearMSELoss(n_in, n_out)
        ours.load_state_dict(theirs.state_dict())
        fused.load_state_dict(theirs.state_dict())
        x, t = torch.randn(batch, n_in), torch.randn(batch, n_out)

        with locked(lock):
            s = time_interleaved(
                {
                    "torch": autocast_step(theirs, x, t, False),
                    "drop-in": autocast_step(ours, x, t, False),
                    "fused": autocast_step(fused, x, t, True),
                },
                budget,
            )
        us = {k: v * 1e6 for k, v in s.items()}
        print(
            f"| {batch}, {n_in}, {n_out} | {us['torch']:.0f} us | {us['drop-in']:.0f} us | {us['fused']:.0f} us | "
            f"{s['torch'] / s['drop-in']:.2f}x | {s['torch'] / s['fused']:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per comparison")
    parser.add_argument("--lock", help="hold an exclusive flock on this file while timing")
    parser.add_argument("--only", choices=["products", "pytorch", "steps"])
    parser.add_argument(
        "--widened", choices=["avx512", "avx2", "generic"], help="the widened path's ISA (default: the best)"
    )
    args = parser.parse_args()
    if args.only in (None, "products"):
        products(args.budget, args.lock, args.widened)
    if args.only in (None, "pytorch"):
        against_pytorch(args.budget, args.lock)
    if args.only in (None, "steps"):
        steps(args.budget, args.lock)


if __name__ == "__main__":
    main()
