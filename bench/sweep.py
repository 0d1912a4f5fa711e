"""Run the interleaved benchmark sweep and print (and optionally save) the table and chart.

python bench/sweep.py                 # the full sweep, float32 + float64 + odd sizes
python bench/sweep.py --quick         # five shapes
python bench/sweep.py --plot bench/sweep.png --markdown bench/RESULTS.md
"""

import argparse
import datetime
import sys

from lingrad import benchmark


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="five small and medium shapes only")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparisons")
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of timing per comparison")
    parser.add_argument("--plot", metavar="PNG", help="write a chart of GFLOP/s per shape")
    parser.add_argument("--markdown", metavar="MD", help="write the table with the machine's description")
    args = parser.parse_args(argv)

    results, peak = benchmark.sweep(not args.quick, torch_baseline=not args.no_torch, budget=args.budget)
    header = benchmark.describe_machine(peak)
    text = header + "\n\n" + benchmark.table(results, peak)
    print(text)
    if args.plot:
        print("chart written to", benchmark.plot(results, args.plot, peak))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(
                f"# Benchmark results\n\nWritten by `python bench/sweep.py --budget {args.budget:g} --markdown "
                f"bench/RESULTS.md` on {datetime.date.today()}. Ratios are baseline time / lingrad time "
                "(> 1: lingrad is faster), medians of interleaved runs in one process; GFLOP/s count "
                "2 B in out per product (three per training step). README.md, section Benchmark, says what "
                "limits each result.\n\n" + text + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
