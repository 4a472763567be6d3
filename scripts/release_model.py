#!/usr/bin/env python3
"""Rebuild the bundled screening model: the recommended recipe trained on every patient of a
label table, written as a bundle (heads, side head, calibration, cards, MODEL_CARD.md) to --out."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run


def build_parser() -> argparse.ArgumentParser:
    from fundus_ensemble.evaluation.benchmark import BUDGETS, DEFAULT_BUDGET
    from fundus_ensemble.training.heads import FUSIONS

    recipe = BUDGETS[DEFAULT_BUDGET].train_config("imagenet", 0)  # the recommended recipe, as the benchmark runs it
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("table", help="per-image label table (odir5k-256-dev/labels.csv)")
    p.add_argument("--image-root", required=True, help="folder holding the image folder")
    p.add_argument("--image-dir", default="images", help="sub-folder of --image-root with the images")
    p.add_argument("--out", required=True, help="the bundle's folder (fundus_ensemble/bundled for the package's own)")
    p.add_argument("--work", default="runs/release", help="views, feature store and run (kept: a rebuild reuses them)")
    p.add_argument(
        "--benchmarks",
        nargs="*",
        default=[],
        help="finished benchmark folders of the same recipe, for the model card's held-out rows",
    )
    p.add_argument("--gradability", help="JSON of docs/measurements/gradability.py, for the model card")
    p.add_argument("--gate-by-class", help="JSON of docs/measurements/gate_by_class.py, for the model card")
    p.add_argument("--one-eye", help="JSON of docs/measurements/one_eye.py, for the model card")
    p.add_argument("--adaptation", help="adaptation.json of docs/measurements/site_adaptation.py, for the model card")
    p.add_argument("--backbone", default=recipe.backbone)
    p.add_argument("--size", type=int, default=recipe.size, help="the feature screen's choice (docs/results.md)")
    p.add_argument("--head-fusion", default=recipe.head_fusion, choices=FUSIONS)
    p.add_argument(
        "--feature-store",
        help="a feature store to read and fill instead of the one under --work (a screen's OUT/store)",
    )
    p.add_argument("--folds", type=int, default=recipe.folds)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fundus_ensemble.cli import import_keras

    import_keras()
    from fundus_ensemble.inference.bundle import rebuild_command, release

    command = rebuild_command(argv or sys.argv[1:], args.image_root)
    record = release(
        args.table,
        args.image_root,
        args.out,
        args.work,
        tuple(args.benchmarks),
        args.gradability,
        args.backbone,
        args.size,
        args.folds,
        args.seed,
        args.image_dir,
        command,
        args.feature_store,
        args.head_fusion,
        {"one_eye": args.one_eye, "gate_by_class": args.gate_by_class, "adaptation": args.adaptation},
    )
    print(f"wrote the bundle to {args.out}: {', '.join(record['files'])} ({record['patients']} patients)")


if __name__ == "__main__":
    sys.exit(run(main))
