"""Run the interleaved benchmark sweep and print (and optionally save) the table and chart.

python bench/sweep.py                 # the full sweep, float32 + float64 + odd sizes + batch 1, 2, 8
python bench/sweep.py --quick         # six shapes
python bench/sweep.py --cliff 48      # and 48 random shapes of the cliff finder (worst and median ratios)
python bench/sweep.py --plot bench/sweep.png --markdown bench/RESULTS.md
python bench/sweep.py --lock /tmp/lingrad-bench.lock ...   # on a shared machine: one shape at a time

This process runs NumPy with OpenBLAS's own kernel choice for the CPU: OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, which force it, are removed from its environment before NumPy is imported (the
header names the kernel NumPy runs, through threadpoolctl). The tests and CI never do this.
"""

import os

REMOVED = {name: os.environ.pop(name) for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if name in os.environ}

import argparse  # noqa: E402
import datetime  # noqa: E402
import fcntl  # noqa: E402
import sys  # noqa: E402

from lingrad import benchmark  # noqa: E402  (imports NumPy: after the environment is cleaned)


def locked(function, lock_file):
    """function, called under an exclusive flock on lock_file."""

    def call(*args, **kwargs):
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            return function(*args, **kwargs)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)

    return call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="six small and medium shapes only")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparisons")
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of timing per comparison")
    parser.add_argument("--cliff", type=int, default=0, metavar="N", help="also N random shapes (cliff finder)")
    parser.add_argument("--only-cliff", action="store_true", help="the cliff finder's shapes only")
    parser.add_argument(
        "--lock", metavar="FILE", help="hold an exclusive flock on FILE while each shape (and the peak) is timed"
    )
    parser.add_argument("--plot", metavar="PNG", help="write a chart of GFLOP/s per shape")
    parser.add_argument("--markdown", metavar="MD", help="write the table with the machine's description")
    args = parser.parse_args(argv)

    progress = None
    if args.lock:
        lock_file = open(args.lock, "a")

        def progress(shapes):  # the lock is held while each shape is timed, released between shapes
            for shape in shapes:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    yield shape
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)

        benchmark.peak_gflops = locked(benchmark.peak_gflops, lock_file)
    results, peak = benchmark.sweep(
        not args.quick,
        torch_baseline=not args.no_torch,
        budget=args.budget,
        cliff=args.cliff,
        progress=progress,
        sweep_shapes=not args.only_cliff,
    )
    header = benchmark.describe_machine(peak)
    if REMOVED:
        removed = ", ".join(f"{k}={v}" for k, v in REMOVED.items())
        header += f"\n(removed from this process's environment: {removed})"
    sweep_results = [r for r in results if not r.case.endswith("(cliff)")]
    cliff_results = [r for r in results if r.case.endswith("(cliff)")]
    text = header + "\n\n" + benchmark.table(sweep_results, peak)
    text += "\n\nWorst and median ratios over the sweep:\n\n" + benchmark.summary(sweep_results)
    if cliff_results:
        shapes = sorted({r.shape for r in cliff_results})
        text += (
            f"\n\nCliff finder: {len(shapes)} random shapes (seed 12, log-uniform in 1..4096):\n\n"
            + benchmark.table(cliff_results, peak)
            + "\n\n"
            + benchmark.summary(cliff_results)
        )
    print(text)
    if args.plot:
        print("chart written to", benchmark.plot(sweep_results, args.plot, peak))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(
                "# Benchmark results\n\nWritten by `python bench/sweep.py "
                f"--budget {args.budget:g} --cliff {args.cliff} --markdown bench/RESULTS.md` on "
                f"{datetime.date.today()}. Ratios are baseline time / lingrad time "
                "(> 1: lingrad is faster), medians of interleaved runs in one process; GFLOP/s count "
                "2 B in out per product (three per training step, one for a forward pass), and both sides are "
                "given as a percentage of the FMA peak measured in the same process. README.md, section "
                "Benchmark, says what limits each result.\n\n" + text + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
