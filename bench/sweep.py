"""Run the interleaved benchmark sweep and print (and optionally save) the table and chart.

    python bench/sweep.py                 # the full sweep, float32 + float64 + odd sizes
    python bench/sweep.py --quick         # five shapes
    python bench/sweep.py --plot bench/sweep.png --markdown bench/RESULTS.md
"""
import argparse
import platform
import sys

import numpy as np

import lingrad
from lingrad import benchmark


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="five small and medium shapes only")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparisons")
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of timing per comparison")
    parser.add_argument("--plot", metavar="PNG", help="write a chart of GFLOP/s per shape")
    parser.add_argument("--markdown", metavar="MD", help="write the table with the machine's description")
    args = parser.parse_args(argv)

    shapes = benchmark.QUICK if args.quick else benchmark.SWEEP + benchmark.ODD
    peak = benchmark.peak_gflops()
    results = benchmark.run(shapes, np.float32, torch_baseline=not args.no_torch, budget=args.budget)
    if not args.quick:
        results += benchmark.run(benchmark.FLOAT64, np.float64, torch_baseline=not args.no_torch, budget=args.budget)
    header = describe_machine(peak)
    text = header + "\n\n" + benchmark.table(results, peak)
    print(text)
    if args.plot:
        print("chart written to", benchmark.plot(results, args.plot, peak))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Benchmark results\n\nWritten by `python bench/sweep.py --markdown bench/RESULTS.md`. "
                    "Ratios are baseline time / lingrad time (> 1: lingrad is faster), medians of interleaved "
                    "runs in one process.\n\n" + text + "\n")
    return 0


def describe_machine(peak):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = lingrad.config()
    versions = f"lingrad {info['version']} ({info['isa']}, {info['num_threads']} threads), numpy {np.__version__}"
    try:
        import torch
        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        pass
    return f"CPU: {cpu}; measured float32 FMA peak {peak:.0f} GFLOP/s\n{versions}"


if __name__ == "__main__":
    sys.exit(main())
