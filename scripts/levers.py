#!/usr/bin/env python3
"""Screen training levers: one view, one cheap budget, one change per row, scored on val (docs/results-history.md)."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run

DEFAULT_ROWS = ["library", "plain", "no_rotation", "plain_bce", "no_cut", "cosine", "prior_bias", "asymmetric"]


def build_parser() -> argparse.ArgumentParser:
    from fundus_ensemble.training.levers import LEVERS

    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="rows: " + "; ".join(f"{k}: {v.what}" for k, v in LEVERS.items()),
    )
    p.add_argument("prep_dir", help="output folder of scripts/preprocess.py")
    p.add_argument(
        "--out",
        required=True,
        help="folder for one sub-folder per row, levers.md and levers.json; finished rows are kept",
    )
    p.add_argument(
        "--rows", nargs="+", default=DEFAULT_ROWS, choices=list(LEVERS), metavar="ROW", help="rows to run, in order"
    )
    p.add_argument("--view", default="color", choices=["color", "gray_eq"])
    p.add_argument("--backbone", default="efficientnet_b3")
    p.add_argument("--size", type=int, default=None, help="input size (default: the views' own size)")
    p.add_argument("--epochs", type=int, default=3, help="phase 1 epochs of every row")
    p.add_argument("--fine-tune-epochs", type=int, default=1, help="phase 2 epochs of every row")
    p.add_argument("--batch-size", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="threads making batches")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fundus_ensemble.cli import import_keras

    import_keras()
    from pathlib import Path

    from fundus_ensemble.training.config import TrainConfig
    from fundus_ensemble.training.levers import run_levers
    from fundus_ensemble.training.train import with_views_size

    base = TrainConfig(
        backbone=args.backbone,
        size=args.size,
        epochs=args.epochs,
        fine_tune_epochs=args.fine_tune_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        workers=args.workers,
    )
    base = with_views_size(base, Path(args.prep_dir)).check()
    results = run_levers(args.prep_dir, args.out, base, args.rows, args.view)
    print((Path(args.out) / "levers.md").read_text())
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(run(main))
