"""A digest of every kernel's outputs, to show that a change moved code without changing a bit.

    python scripts/kernel_digest.py            one SHA-256 per ISA this machine runs, and their total
    python scripts/kernel_digest.py --quick    fewer shapes (about a quarter of the time)

Run it before a refactor and after it (same machine): equal digests mean every output of every
kernel below is bitwise the same. It covers, for each ISA in lingrad.available_isas() and for 1 and
2 threads (whose results must agree anyway; a difference is reported):
- the three products (forward with bias, dX, dW with db) and the fused linear_mse, float32 and
  float64 (and bfloat16 operands with float32 and bfloat16 results where ml_dtypes is installed),
  C-ordered and transposed (F-ordered) inputs, over shapes that reach every path of the engine's
  plan (narrow N <= 4, small M in both forms, packed with several K slices, column blocks and edges);
- mse_loss and mse_backward (every reduction);
- the fused networks (mlp_forward with saved activations, mlp_backward, mlp_mse) with each activation;
- the privacy kernels (per-sample gradient norms, per-sample gradients, the weighted dW).
Inputs come from a fixed seed; values include exact zeros (ReLU kinks, the pair order of bfloat16).
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np

import lingrad
from lingrad import kernels

# (B, in, out): one Linear layer's shape; forward is (B x in) @ (in x out), dX (B x out) @ (out x in),
# dW (out x B) @ (B x in).
SHAPES = [
    (1, 784, 50),
    (1, 3, 1),
    (2, 5, 3),
    (3, 300, 1030),
    (8, 1024, 1024),
    (9, 3000, 800),
    (11, 257, 65),
    (64, 784, 50),
    (300, 257, 70),
    (2000, 100, 3),
    (777, 1000, 257),
    (5, 3, 4100),
    (9, 5, 4100),
    (36, 1, 249),
    (14, 14, 327),
    (141, 12, 37),
    (963, 17, 42),
    (512, 1024, 1024),
    (1000, 777, 511),
    (4, 49, 205),
    (17, 4099, 9),
]
QUICK = SHAPES[:12]
ACTIVATIONS = ["identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu"]


def arrays(rng: np.random.Generator, shape: tuple[int, ...], dtype, order: str = "C") -> np.ndarray:
    a = rng.standard_normal(shape).astype(dtype)
    a[rng.random(shape) < 0.05] = 0  # exact zeros: ReLU kinks, skipped pairs
    return np.asfortranarray(a) if order == "F" else np.ascontiguousarray(a)


class Digest:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def add(self, *results) -> None:
        for r in results:
            if r is None:
                self.hash.update(b"none")
            elif isinstance(r, (list, tuple)):
                self.add(*r)
            elif isinstance(r, float):
                self.hash.update(np.float64(r).tobytes())
            else:
                a = np.asarray(r)
                self.hash.update(str(a.dtype).encode() + str(a.shape).encode())
                self.hash.update(np.ascontiguousarray(a).view(np.uint8).tobytes())


def linear_layer(d: Digest, rng, shape, dtype, order: str, result_dtype=None) -> None:
    b, n_in, n_out = shape
    x, w = arrays(rng, (b, n_in), dtype, order), arrays(rng, (n_out, n_in), dtype, order)
    bias, t = arrays(rng, (n_out,), np.float32 if result_dtype else dtype), arrays(rng, (b, n_out), dtype)
    dy = arrays(rng, (b, n_out), dtype, order)
    out = None if result_dtype is None else np.empty((b, n_out), result_dtype)
    d.add(kernels.linear_forward(x, w, bias, out=out))
    d.add(kernels.linear_backward_input(dy, w))
    d.add(kernels.linear_backward_weight(dy, x, bias=True))
    for reduction in ("mean", "sum"):
        d.add(kernels.linear_mse(x, w, bias, t, reduction, input_grad=True))
    if result_dtype is None:
        d.add(kernels.linear_mse(x, w, None, t, "mean", input_grad=False))


def losses(d: Digest, rng, dtype) -> None:
    for shape in [(7,), (33, 5), (1000, 17)]:
        p, t = arrays(rng, shape, dtype), arrays(rng, shape, dtype)
        for reduction in ("mean", "sum", "none"):
            d.add(kernels.mse_loss(p, t, reduction), kernels.mse_backward(p, t, reduction))


def networks(d: Digest, rng, dtype) -> None:
    for widths, batch in [([8, 64, 64, 2], 64), ([784, 50, 1], 100), ([32, 128, 128, 1], 256), ([5, 3, 7], 3)]:
        ws = [arrays(rng, (o, i), dtype) for i, o in zip(widths[:-1], widths[1:])]
        bs = [arrays(rng, (o,), dtype) for o in widths[1:]]
        x, t = arrays(rng, (batch, widths[0]), dtype), arrays(rng, (batch, widths[-1]), dtype)
        for act in ACTIVATIONS:
            acts = [act] * (len(ws) - 1) + ["identity"]
            y, hidden, pre = kernels.mlp_forward(x, ws, bs, acts, save=True)
            d.add(y, hidden, pre)
            d.add(kernels.mlp_backward(t, x, ws, bs, acts, y, hidden, pre))
            d.add(kernels.mlp_mse(x, ws, bs, acts, t, "mean"))


def privacy(d: Digest, rng, dtype) -> None:
    for b, n_in, n_out in [(64, 784, 50), (5, 3, 7), (256, 128, 10)]:
        dy, x = arrays(rng, (b, n_out), dtype), arrays(rng, (b, n_in), dtype)
        weights = rng.random(b).astype(dtype)
        d.add(kernels.linear_per_sample_grad_norms(dy, x), kernels.linear_per_sample_grad_norms(dy, x, bias=False))
        d.add(kernels.linear_per_sample_grads(dy, x))
        d.add(kernels.linear_backward_weight(dy, x, sample_weights=weights, bias=True))


def run(shapes, threads: int) -> str:
    lingrad.set_num_threads(threads)
    d = Digest()
    rng = np.random.default_rng(20261206)
    dtypes = [np.float32, np.float64]
    for shape in shapes:
        for dtype in dtypes:
            for order in "CF":
                linear_layer(d, rng, shape, dtype, order)
    try:
        import ml_dtypes
    except ImportError:
        print("(ml_dtypes not installed: no bfloat16 products)", file=sys.stderr)
    else:
        for shape in shapes:
            linear_layer(d, rng, shape, ml_dtypes.bfloat16, "C", result_dtype=np.float32)
            linear_layer(d, rng, shape, ml_dtypes.bfloat16, "C", result_dtype=ml_dtypes.bfloat16)
    for dtype in dtypes:
        losses(d, rng, dtype)
        networks(d, rng, dtype)
        privacy(d, rng, dtype)
    return d.hash.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args()
    shapes = QUICK if args.quick else SHAPES
    total = hashlib.sha256()
    differs = False
    for isa in lingrad.available_isas():
        with lingrad.settings(isa=isa):  # (and the thread count, which run sets)
            per_thread = {t: run(shapes, t) for t in (1, 2)}
        if len(set(per_thread.values())) != 1:
            differs = True
            print(f"{isa}: RESULTS DIFFER BETWEEN 1 AND 2 THREADS: {per_thread}")
        print(f"{isa:12s} {per_thread[1]}")
        total.update(per_thread[1].encode())
    print(f"{'total':12s} {total.hexdigest()}  ({'quick' if args.quick else 'full'}, lingrad {lingrad.__version__})")
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
