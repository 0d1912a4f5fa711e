"""One SGD step of small MLPs: lingrad.train_step and lingrad.fuse against PyTorch eager, the drop-in,
torch.compile and JAX.

    python bench/mlp_step.py [--repeat 9] [--seconds 0.2] [--no-compile] [--no-jax] [--models rl-policy,...]

A step is the forward pass, the MSE loss, backward and the SGD update (lr 0.01), on the same
initial weights and batch for every variant. Each model's variants are timed interleaved in one
process (A, B, C, A, B, C, ...): each cell is the median over the repeats of the mean time of a
step within a timed batch of about --seconds, in microseconds.

    torch eager     nn.Sequential + F.mse_loss, loss.backward(), torch.optim.SGD.step()
    drop-in         the same model after lingrad.swap_linear
    fused           lingrad.fuse(model, loss="mse"): one native call per step (forward and backward)
    train_step      lingrad.train_step(model, SGD): one native call for the whole step, update included
    train_step Adam the same with torch.optim.Adam (lr 1e-3): its cost over SGD's is the last column
    torch.compile   torch.compile of the forward and loss (Inductor); backward and step as eager
    jax.jit         the same network and step written in JAX, jitted (if JAX is installed)

and batch-1 inference (no_grad) of each model: nn.Sequential against the fused model.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import lingrad
from lingrad.benchmark import time_interleaved

MODELS = {  # name: (batch, widths)
    "rl-policy": (64, [8, 64, 64, 2]),
    "tabular": (256, [32, 128, 128, 1]),
    "lesson": (64, [784, 50, 1]),
    "lesson full batch": (5000, [784, 50, 1]),
    "wide": (512, [1024, 1024, 1024, 10]),
}
LR = 0.01


def mlp(widths) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def torch_step(model, loss_of):
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step(x, t):
        opt.zero_grad(set_to_none=True)
        loss_of(x, t).backward()
        opt.step()

    return step


def jax_step(widths, state_dict):
    import jax
    import jax.numpy as jnp

    params = [
        (jnp.asarray(state_dict[f"{2 * i}.weight"].numpy()), jnp.asarray(state_dict[f"{2 * i}.bias"].numpy()))
        for i in range(len(widths) - 1)
    ]

    def loss(params, x, t):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w.T + b
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        return jnp.mean((h - t) ** 2)

    @jax.jit
    def update(params, x, t):
        grads = jax.grad(loss)(params, x, t)
        return [(w - LR * gw, b - LR * gb) for (w, b), (gw, gb) in zip(params, grads)]

    state = {"params": params}

    def step(x, t):
        state["params"] = update(state["params"], x, t)
        jax.block_until_ready(state["params"])

    return step, jnp


def measure(fns: dict, repeat: int, seconds: float) -> dict[str, float]:
    """Median microseconds per call of each step, over `repeat` rounds of batches of about `seconds`
    timed in alternation (lingrad.benchmark.time_interleaved); each side first runs untimed for an
    eighth of that (thread pools spin between them)."""
    s = time_interleaved(fns, budget=0.0, min_rounds=repeat, batch=seconds, settle=seconds / 8)
    return {name: t * 1e6 for name, t in s.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-jax", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    jax_note = "off (--no-jax)"
    if not args.no_jax:
        try:
            import jax

            jax_note = f"{jax.__version__} ({jax.devices()[0].platform})"
        except ImportError:
            args.no_jax = True
            jax_note = "not installed (pip install jax): its column is left out"
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), lingrad {lingrad.__version__} "
        f"({lingrad.get_num_threads()} threads, {lingrad.get_isa()}), JAX {jax_note}; median step time, us"
    )
    names = ["torch eager", "drop-in", "fused", "train_step", "train_step Adam"]
    names += ([] if args.no_compile else ["torch.compile"]) + ([] if args.no_jax else ["jax.jit"])
    ratios = ["fused vs eager", "train_step vs eager", "train_step vs torch.compile"]
    ratios += ([] if args.no_jax else ["train_step vs jax.jit"]) + ["Adam / SGD"]
    print("\n| model (batch; widths) | " + " | ".join(names + ratios) + " |")
    print("| --- |" + " ---: |" * (len(names) + len(ratios)))
    inference = []
    for name in args.models.split(","):
        batch, widths = MODELS[name]
        torch.manual_seed(0)
        base = mlp(widths)
        x, t = torch.randn(batch, widths[0]), torch.randn(batch, widths[-1])
        eager, swapped, fused = copy.deepcopy(base), lingrad.swap_linear(copy.deepcopy(base)), copy.deepcopy(base)
        fused = lingrad.fuse(fused, loss="mse")
        steps = {
            "torch eager": torch_step(eager, lambda x, t, m=eager: F.mse_loss(m(x), t)),
            "drop-in": torch_step(swapped, lambda x, t, m=swapped: F.mse_loss(m(x), t)),
            "fused": torch_step(fused, lambda x, t, m=fused: m(x, t)),
        }
        one_call = copy.deepcopy(base)
        steps["train_step"] = lingrad.train_step(one_call, torch.optim.SGD(one_call.parameters(), lr=LR))
        adam = copy.deepcopy(base)
        steps["train_step Adam"] = lingrad.train_step(adam, torch.optim.Adam(adam.parameters(), lr=1e-3))
        if not args.no_compile:
            compiled_model = copy.deepcopy(base)
            compiled = torch.compile(lambda x, t, m=compiled_model: F.mse_loss(m(x), t))
            steps["torch.compile"] = torch_step(compiled_model, compiled)
        if not args.no_jax:
            step, jnp = jax_step(widths, base.state_dict())
            xj, tj = jnp.asarray(x.numpy()), jnp.asarray(t.numpy())
            steps["jax.jit"] = lambda step=step, xj=xj, tj=tj: step(xj, tj)
        fns = {k: (v if k == "jax.jit" else (lambda v=v, x=x, t=t: v(x, t))) for k, v in steps.items()}
        m = measure(fns, args.repeat, args.seconds)
        cells = [f"{m[n]:.0f}" for n in names]
        cells += [f"{m['torch eager'] / m['fused']:.2f}x", f"{m['torch eager'] / m['train_step']:.2f}x"]
        cells += [f"{m['torch.compile'] / m['train_step']:.2f}x" if "torch.compile" in m else "-"]
        cells += [] if args.no_jax else [f"{m['jax.jit'] / m['train_step']:.2f}x"]
        cells += [f"{m['train_step Adam'] / m['train_step']:.2f}"]
        label = f"{name} ({batch}; {'-'.join(map(str, widths))})"
        print(f"| {label} | " + " | ".join(cells) + " |")

        inference_model = lingrad.fuse(copy.deepcopy(base))
        one = torch.randn(1, widths[0])
        with torch.no_grad():
            fns = {
                "nn": lambda m=eager, x=one: m(x),
                "fused": lambda m=inference_model, x=one: m(x),
            }
            r = measure(fns, args.repeat, args.seconds / 2)
        inference.append((name, r))

    print("\nbatch-1 inference under torch.no_grad(), us")
    print("| model | nn.Sequential | fused | fused vs nn |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in inference:
        print(f"| {name} | {r['nn']:.1f} | {r['fused']:.1f} | {r['nn'] / r['fused']:.2f}x |")


if __name__ == "__main__":
    main()
