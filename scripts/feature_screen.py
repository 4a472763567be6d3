#!/usr/bin/env python3
"""The feature screen: backbones x sizes and the features-first levers, on a real label table,
scored on the benchmark's held-out test patients of each split seed; writes screen.md and screen.json."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run


def build_parser() -> argparse.ArgumentParser:
    from fundus_ensemble.evaluation.feature_screen import ScreenConfig

    d = ScreenConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("table", help="per-image label table (odir5k-256-dev/labels.csv)")
    p.add_argument("--image-root", required=True, help="folder holding the image folder")
    p.add_argument("--image-dir", default="images", help="sub-folder of --image-root with the images")
    p.add_argument("--out", required=True, help="screen folder (views per size, the feature store, results)")
    p.add_argument("--backbones", nargs="+", default=list(d.backbones))
    p.add_argument("--sizes", nargs="+", type=int, default=list(d.sizes))
    p.add_argument("--no-levers", action="store_true", help="the backbone x size table only")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="split seeds (the benchmark's)")
    p.add_argument("--folds", type=int, default=d.folds)
    p.add_argument(
        "--reference",
        nargs=2,
        default=list(d.reference),
        metavar=("BACKBONE", "SIZE"),
        help="where the levers are measured",
    )
    p.add_argument("--flips", action="store_true", help="also the mirrored photos' features (a lever)")
    p.add_argument("--prepare-only", action="store_true", help="preprocess and extract, then stop")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fundus_ensemble.cli import import_keras

    import_keras()
    from fundus_ensemble.evaluation.feature_screen import ScreenConfig, format_screen, prepare, run_screen

    config = ScreenConfig(
        tuple(args.backbones),
        tuple(args.sizes),
        tuple(args.seeds),
        args.folds,
        (args.reference[0], int(args.reference[1])),
        args.flips,
        levers=not args.no_levers,
    )
    prepare(args.table, args.image_root, args.out, config, args.image_dir)
    if args.prepare_only:
        return
    print(format_screen(run_screen(args.out, config)))
    print(f"written: {args.out}/screen.md and {args.out}/screen.json")


if __name__ == "__main__":
    sys.exit(run(main))
