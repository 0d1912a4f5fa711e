"""The command line: `lingrad SUBCOMMAND` or `python -m lingrad SUBCOMMAND`.

    info    the version, the build (compiler, flags, OpenMP), threads, the SIMD code path chosen at
            run time, and the versions of NumPy and PyTorch
    demo    784 -> 50 -> ReLU -> 1 trained on real MNIST digits with lingrad and with torch.nn.Linear
            side by side: both losses, the time per step, and a PNG of the weight gradients
    bench   the interleaved benchmark sweep against PyTorch and NumPy (quick by default)
    check   a self-test of the installed build; exit code 1 on failure

Exit codes: 0 success, 1 a failed check (or a demo whose two models disagree), 2 a usage error
or a missing optional dependency (the message says which extra to install).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence

import numpy as np

import lingrad

EXIT_OK, EXIT_FAILED, EXIT_UNAVAILABLE = 0, 1, 2


def _torch_version() -> str:
    try:
        import torch
    except ImportError:
        return 'not installed (pip install "lingrad[torch]")'
    return f"{torch.__version__} ({torch.get_num_threads()} threads)"


def cmd_info(args: argparse.Namespace) -> int:
    lingrad.show_config()
    env = os.environ.get("LINGRAD_ISA")
    if env:
        print(f"  LINGRAD_ISA     {env}")
    from .benchmark import cpu_name

    print(f"  CPU             {cpu_name()}")
    print(f"  Python          {platform.python_version()} ({sys.executable})")
    print(f"  NumPy           {np.__version__}")
    print(f"  PyTorch         {_torch_version()}")
    missing = [name for name in ("tqdm", "matplotlib", "mlxtend") if _missing(name)]
    demo = "ready" if not missing else f'needs {", ".join(missing)}: pip install "lingrad[demo]"'
    print(f"  demo            {demo}")
    return EXIT_OK


def _missing(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    try:
        return demo.main(
            steps=args.steps,
            images=args.images,
            out_png=args.out,
            seed=args.seed,
            lr=args.lr,
            threads=args.threads,
            progress=not args.no_progress,
        )
    except demo.MissingDependency as e:
        print(f"lingrad demo: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark

    use_torch = not args.no_torch
    if use_torch and _missing("torch"):
        print('PyTorch is not installed: comparing with NumPy only (pip install "lingrad[torch]" to add it)')
        use_torch = False
    if args.plot and _missing("matplotlib"):
        print('lingrad bench: --plot needs matplotlib: pip install "lingrad[demo]"', file=sys.stderr)
        return EXIT_UNAVAILABLE
    progress = None
    if not args.no_progress and not _missing("tqdm"):
        from functools import partial

        from tqdm import tqdm

        progress = partial(tqdm, desc="shapes", unit="shape", file=sys.stderr)

    n_shapes = len(benchmark.SWEEP + benchmark.ODD + benchmark.FLOAT64) if args.full else len(benchmark.QUICK)
    print(
        f"{'full' if args.full else 'quick'} sweep: {n_shapes} shapes (batch, in, out), "
        f"{args.budget:g} s of interleaved timing per comparison; ratio = baseline time / lingrad time"
    )
    sys.stdout.flush()
    results, peak = benchmark.sweep(args.full, torch_baseline=use_torch, budget=args.budget, progress=progress)
    print()
    print(benchmark.describe_machine(peak))
    print()
    print(benchmark.table(results, peak))
    if args.plot:
        print(f"\nchart written to {os.path.abspath(benchmark.plot(results, args.plot, peak))}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from . import check

    return EXIT_OK if check.run(use_torch=not args.no_torch) else EXIT_FAILED


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="lingrad",
        description="lingrad: fast, deterministic CPU kernels for training a Linear layer with an MSE loss.",
        epilog='Start with "lingrad demo". "lingrad COMMAND --help" describes each command.',
    )
    top.add_argument("--version", action="version", version=f"lingrad {lingrad.__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "info",
        help="version, build, threads, SIMD code path, NumPy and PyTorch versions",
        description="Print the version, the build (compiler, flags, OpenMP), the threads, the SIMD "
        "code path chosen at run time and the versions of NumPy and PyTorch.",
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "demo",
        help="train 784 -> 50 -> ReLU -> 1 on MNIST with lingrad and with PyTorch; draw the gradients",
        description="Train the MLP of the fast.ai backprop lesson (784 -> 50 -> ReLU -> 1, MSE on the digit's "
        "label) on real MNIST digits with lingrad and with torch.nn.Linear, side by side from the "
        "same initial weights. Prints both final losses and the time per step of each, and writes a "
        "PNG of the loss curves and of the first layer's weight gradient as 28x28 images. "
        'Needs the demo extra: pip install "lingrad[demo]".',
    )
    p.add_argument("--steps", type=_positive, default=300, help="full-batch gradient-descent steps (default 300)")
    p.add_argument(
        "--images",
        type=_positive,
        default=5000,
        help="how many of the 5000 digits to train on, a seeded random sample (default 5000)",
    )
    p.add_argument(
        "--out",
        default="lingrad-demo.png",
        metavar="PNG",
        help="where to write the picture (default lingrad-demo.png in the current directory)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the sample (default 0)")
    p.add_argument("--lr", type=float, default=0.008, help="learning rate (default 0.008)")
    p.add_argument("--threads", type=_positive, help="threads for lingrad and PyTorch alike (default: their own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench",
        help="benchmark against PyTorch and NumPy (interleaved sweep; quick by default)",
        description="Time lingrad against PyTorch's CPU path (whole training steps) and NumPy "
        "(each product), interleaved in one process, and print a table of medians, "
        "ratios, GFLOP/s and percent of the measured FMA peak.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="five small and medium shapes (the default)")
    size.add_argument("--full", action="store_true", help="the whole sweep: large and odd shapes, and float64")
    p.add_argument("--plot", metavar="PNG", help="also write a chart of GFLOP/s per shape")
    p.add_argument("--budget", type=float, default=0.6, help="seconds of timing per comparison (default 0.6)")
    p.add_argument("--no-torch", action="store_true", help="compare with NumPy only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "check",
        help="self-test of the installed build on every SIMD path; exit code 1 on failure",
        description="Check every kernel against a float64 reference with rigorous error bounds on "
        "every SIMD code path this CPU can run, thread determinism, and (with PyTorch) "
        "gradcheck of the autograd Functions. One line per check; exit code 1 if any "
        "fails.",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch checks")
    p.set_defaults(func=cmd_check)
    return top


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command is None:  # bare `lingrad`: say what there is to run
        top.print_help()
        return EXIT_UNAVAILABLE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
