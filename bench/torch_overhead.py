"""Per-call cost of lingrad's PyTorch layer at small shapes: no-grad inference and training steps.

    python bench/torch_overhead.py [--repeat 15] [--number 1000]

Every variant of one table is timed in one process, interleaved (A, B, C, A, B, C, ...) so that
drift hits all alike; each cell is the median over the repeats, in microseconds per call.

Inference under torch.no_grad(), (batch, in, out) with batch 1, 2 and 8:
    nn.Linear          torch.nn.Linear(x)
    lingrad.Linear     lingrad.Linear(x): the module, its checks, the bridge, the kernel
    kernel             lingrad.kernels.linear_forward on NumPy arrays with out=: the native call alone
    lingrad's cost     lingrad.Linear - kernel: what the PyTorch layer adds (the nn.Module call included)
    module call        nn.Linear - F.linear: what any nn.Module call costs, lingrad's or PyTorch's

One training step (forward, loss, backward, gradients set to None between steps):
    empty Function     a torch.autograd.Function that does nothing: the floor of any Python Function
    empty + grads      the same, returning ready-made weight and bias gradients (accumulated into .grad)
    kernel             lingrad.kernels.linear_mse on NumPy arrays: the fused native call alone
    fused              lingrad.LinearMSELoss(x, target).backward()
    drop-in            lingrad.Linear + F.mse_loss, backward
    torch              torch.nn.Linear + F.mse_loss, backward
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import numpy as np
import torch
import torch.nn.functional as F

import lingrad
from lingrad import kernels


class Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target):
        return x.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, None


class EmptyWithGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target):
        ctx.grads = (torch.zeros_like(weight), torch.zeros_like(bias))  # made outside the timed backward
        return x.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        return None, *ctx.grads, None


def inference_variants(batch: int, in_features: int, out_features: int) -> dict:
    torch.manual_seed(0)
    ours, theirs = lingrad.Linear(in_features, out_features), torch.nn.Linear(in_features, out_features)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(batch, in_features)
    xa, wa, ba = x.numpy(), ours.weight.detach().numpy(), ours.bias.detach().numpy()
    ya = np.empty((batch, out_features), np.float32)
    return {
        "nn.Linear": lambda: theirs(x),
        "lingrad.Linear": lambda: ours(x),
        "kernel": lambda: kernels.linear_forward(xa, wa, ba, out=ya),
        "F.linear": lambda: F.linear(x, theirs.weight, theirs.bias),
    }


def step_variants(batch: int, in_features: int, out_features: int) -> dict:
    torch.manual_seed(0)
    x, target = torch.randn(batch, in_features), torch.randn(batch, out_features)
    fused = lingrad.LinearMSELoss(in_features, out_features)
    plain = lingrad.Linear(in_features, out_features)
    ref = torch.nn.Linear(in_features, out_features)
    w, b = fused.weight, fused.bias
    xa, wa, ba, ta = x.numpy(), w.detach().numpy(), b.detach().numpy(), target.numpy()

    def step(module, loss):
        loss.backward()
        for p in module.parameters():
            p.grad = None

    return {
        "empty Function": lambda: Empty.apply(x, w, b, target).backward(),
        "empty + grads": lambda: step(fused, EmptyWithGrads.apply(x, w, b, target)),
        "kernel": lambda: kernels.linear_mse(xa, wa, ba, ta, input_grad=False),
        "fused": lambda: step(fused, fused(x, target)),
        "drop-in": lambda: step(plain, F.mse_loss(plain(x), target)),
        "torch": lambda: step(ref, F.mse_loss(ref(x), target)),
    }


def measure(fns: dict, repeat: int, number: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm up
        for _ in range(50):
            fn()
    for _ in range(repeat):  # interleaved, so that drift hits every variant alike
        for name, fn in fns.items():
            times[name].append(timeit.timeit(fn, number=number) / number * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--number", type=int, default=1000)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"lingrad {lingrad.__version__} ({lingrad.get_num_threads()} threads, {lingrad.get_isa()}); "
        f"medians of {args.repeat} x {args.number} calls, us"
    )

    print("\nno-grad forward")
    columns = ["nn.Linear", "lingrad.Linear", "lingrad / nn.Linear", "kernel", "lingrad's cost", "module call"]
    print("| (batch, in, out) | " + " | ".join(columns) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with torch.no_grad():
        for shape in [(1, 784, 50), (2, 784, 50), (8, 784, 50), (1, 1024, 256), (8, 1024, 256)]:
            m = measure(inference_variants(*shape), args.repeat, args.number)
            print(
                f"| {shape} | {m['nn.Linear']:.1f} | {m['lingrad.Linear']:.1f} | "
                f"{m['nn.Linear'] / m['lingrad.Linear']:.2f}x | {m['kernel']:.1f} | "
                f"{m['lingrad.Linear'] - m['kernel']:.1f} | {m['nn.Linear'] - m['F.linear']:.1f} |"
            )

    print("\ntraining step (forward, MSE, backward)")
    names = ["empty Function", "empty + grads", "kernel", "fused", "drop-in", "torch"]
    print("| (batch, in, out) | " + " | ".join(names) + " | fused vs torch | drop-in vs torch |")
    print("| --- |" + " ---: |" * (len(names) + 2))
    for shape in [(1, 3, 1), (32, 64, 64), (100, 100, 10)]:
        m = measure(step_variants(*shape), args.repeat, max(1, args.number // 2))
        cells = " | ".join(f"{m[n]:.1f}" for n in names)
        print(f"| {shape} | {cells} | {m['torch'] / m['fused']:.2f}x | {m['torch'] / m['drop-in']:.2f}x |")


if __name__ == "__main__":
    main()
