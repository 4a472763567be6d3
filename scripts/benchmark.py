#!/usr/bin/env python3
"""Benchmark on a real ODIR label table: baselines, both views, the ensemble and the levers,
all trained and scored in one run; writes results.json and results.md to --out."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run


def build_parser() -> argparse.ArgumentParser:
    from fundus_ensemble.evaluation.benchmark import BUDGETS, DEFAULT_BUDGET, MODELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("table", help="per-image label table (odir5k-256-dev/labels.csv) or Kaggle full_df.csv")
    p.add_argument("--format", choices=["image-table", "kaggle"], default="image-table", help="layout of the table")
    p.add_argument("--image-root", required=True, help="folder holding the image folder")
    p.add_argument("--image-dir", default="images", help="sub-folder of --image-root with the images")
    p.add_argument("--out", required=True, help="benchmark folder (manifest, views, models, predictions, results)")
    p.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default=DEFAULT_BUDGET,
        help="; ".join(
            f"{b.name}: {b.size} px, {b.epochs}+{b.fine_tune_epochs} epochs ({b.note})" for b in BUDGETS.values()
        ).replace("%", "%%"),
    )  # argparse formats help with %
    p.add_argument("--paper", action="store_const", const="paper", dest="budget", help="same as --budget paper")
    p.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        metavar="MODEL",
        help="train and score only these of baseline, color, gray_eq (the ensemble rows need both views)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="none (from scratch) | imagenet | PATH to a local backbone weights file (default: the budget's)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the initialization and the augmentation")
    p.add_argument(
        "--feature-store",
        help="a feature store to read and fill (e.g. a feature screen's OUT/store): photos already in it are "
        "not passed through the backbone again (default: one beside the benchmark's views)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted benchmark in --out")
    p.add_argument("--force", action="store_true", help="delete a benchmark already in --out and start over")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fundus_ensemble.cli import import_keras

    import_keras()
    from fundus_ensemble.evaluation.benchmark import BUDGETS, format_results_markdown, run_benchmark
    from fundus_ensemble.models.backbone import parse_weights

    results = run_benchmark(
        args.table,
        args.image_root,
        args.out,
        BUDGETS[args.budget],
        weights=BUDGETS[args.budget].weights if args.weights is None else parse_weights(args.weights),
        seed=args.seed,
        table_format=args.format,
        image_dir=args.image_dir,
        resume=args.resume,
        force=args.force,
        models=tuple(args.models),
        feature_store=args.feature_store,
    )
    print(format_results_markdown(results))
    print(f"written: {args.out}/results.md and {args.out}/results.json")


if __name__ == "__main__":
    sys.exit(run(main))
