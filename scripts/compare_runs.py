#!/usr/bin/env python3
"""Compare two finished benchmarks row by row on the test patients they share (paired intervals)."""

import argparse
import sys

from fundus_ensemble.cli import run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("first", help="--out folder of one scripts/benchmark.py run")
    parser.add_argument("second", help="--out folder of another run of the same label table and --seed")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="rows to compare (default: every row both runs have)")
    parser.add_argument("--resamples", type=int, default=500, help="bootstrap resamples of the test patients")
    parser.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    args = parser.parse_args(argv)
    from fundus_ensemble.evaluation.benchmark import compare_runs

    table = compare_runs(args.first, args.second, tuple(args.rows) if args.rows else None, args.seed, args.resamples)
    first, second = table[0]["budgets"] if table else ("first", "second")
    print(f"first: {args.first} (budget {first}); second: {args.second} (budget {second})\n")
    print("| row | final, first | final, second | second minus first (95% paired interval) | kappa | AUC |")
    print("|---|---:|---:|---|---|---|")
    for r in table:
        low, high = r["interval"] or (float("nan"), float("nan"))
        print(
            f"| {r['row']} | {r['final'][0]:.3f} | {r['final'][1]:.3f} | {r['margin']:+.3f} [{low:+.3f}, {high:+.3f}] "
            f"| {r['kappa'][0]:.3f} / {r['kappa'][1]:.3f} | {r['auc'][0]:.3f} / {r['auc'][1]:.3f} |"
        )


if __name__ == "__main__":
    sys.exit(run(main))
