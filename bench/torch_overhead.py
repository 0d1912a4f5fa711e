"""Per-call cost of lingrad's PyTorch layer at small shapes, against an empty autograd.Function.

    python bench/torch_overhead.py [--repeat 15] [--number 2000]

One training step each (forward, loss, backward, gradients set to None between steps), timed in
one process with the variants interleaved; the median over repeats is printed in microseconds:

    empty Function     a torch.autograd.Function that does nothing (forward returns a 0-d tensor,
                       backward returns None): the floor of any Python autograd.Function
    empty + grads      the same, but backward returns ready-made gradients for weight and bias,
                       so autograd also accumulates them into .grad as in a real step
    kernel only        lingrad.kernels.linear_mse on NumPy arrays: the native call alone
    fused Function     lingrad.autograd.LinearMSEFunction.apply(...).backward()
    fused module       lingrad.LinearMSELoss(in, out)(x, target).backward()
    lingrad unfused    lingrad.Linear + lingrad.functional.mse_loss, backward
    torch              torch.nn.Linear + torch.nn.functional.mse_loss, backward

Python-layer overhead of the fused step = fused Function - empty Function - kernel only
(and the same against "empty + grads", which leaves out the gradient accumulation every step has).
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch

import lingrad
from lingrad import kernels
from lingrad.autograd import LinearMSEFunction


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


def variants(batch: int, in_features: int, out_features: int) -> dict:
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
        "kernel only": lambda: kernels.linear_mse(xa, wa, ba, ta, input_grad=False),
        "fused Function": lambda: step(fused, LinearMSEFunction.apply(x, w, b, target, "mean", False)[0]),
        "fused module": lambda: step(fused, fused(x, target)),
        "lingrad unfused": lambda: step(plain, lingrad.functional.mse_loss(plain(x), target)),
        "torch": lambda: step(ref, torch.nn.functional.mse_loss(ref(x), target)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"lingrad {lingrad.__version__} ({lingrad.get_num_threads()} threads, {lingrad.get_isa()}); "
        f"median of {args.repeat} x {args.number} steps, us"
    )
    for shape in [(1, 3, 1), (32, 64, 64)]:
        fns = variants(*shape)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():  # warm up
            fn()
        for _ in range(args.repeat):  # interleaved, so that drift hits every variant alike
            for name, fn in fns.items():
                times[name].append(timeit.timeit(fn, number=args.number) / args.number * 1e6)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n(batch, in, out) = {shape}")
        for name, t in med.items():
            print(f"  {name:16s} {t:8.1f}")
        for base in ("empty Function", "empty + grads"):
            overhead = med["fused Function"] - med[base] - med["kernel only"]
            print(f"  fused Function - {base} - kernel only = {overhead:5.1f} us")


if __name__ == "__main__":
    main()
