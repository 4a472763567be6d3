#!/usr/bin/env python3
"""Ensemble the two view models on a split and score it with the official ODIR metric."""

import argparse
import sys

from fundus_ensemble.cli import check_run_folder, import_keras, run
from fundus_ensemble.errors import FundusError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="run folder of scripts/train_pair.py")
    parser.add_argument("prep_dir", help="output folder of scripts/preprocess.py")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument(
        "--ensemble-weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="weight of each view model the run holds, in the order color gray_eq (default: equal)",
    )
    parser.add_argument("--out", help="folder for predictions.csv and score.json (default: RUN_DIR/score_SPLIT)")
    parser.add_argument("--force", action="store_true", help="replace an earlier score in that folder")
    parser.add_argument("--flip-tta", action="store_true", help="also predict the mirrored eyes and average")
    parser.add_argument(
        "--calibrate-on",
        choices=["train", "val", "test", "out-of-fold"],
        help="fit per-class calibration on this split's predictions (not the scored split; usually val); "
        "out-of-fold: a cross-fitted run's own calibration, fitted on every train and val patient",
    )
    parser.add_argument(
        "--operating-point",
        metavar="MEASURE=T",
        help="set each class's threshold for this sensitivity or specificity on the --calibrate-on predictions "
        "(e.g. sensitivity=0.90) instead of the official score's best; predict and the station then decide with it",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="also write report.html there: curves, calibration, training curves, a gallery with heatmaps",
    )
    parser.add_argument(
        "--gallery",
        type=int,
        default=3,
        metavar="N",
        help="with --report: patients per class and group (true/false positives, false negatives)",
    )
    args = parser.parse_args(argv)
    if args.gallery < 0:
        raise FundusError(f"--gallery must be 0 or more, got {args.gallery}")
    from fundus_ensemble.evaluation.calibration import parse_operating_point

    operating_point = parse_operating_point(args.operating_point) if args.operating_point else None
    from pathlib import Path

    # before Keras starts (seconds to minutes): the folders exist, --out is not a file
    check_run_folder(args.run_dir)
    if not Path(args.prep_dir).is_dir():
        raise FundusError(
            f"{args.prep_dir}: {'is a file' if Path(args.prep_dir).exists() else 'no such folder'}; give "
            "the output folder of scripts/preprocess.py"
        )
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise FundusError(f"--out {args.out} is a file; a score needs a folder")
    import_keras()
    from fundus_ensemble.evaluation.ensemble import format_score_table, run_views, score_run

    views = run_views(args.run_dir)
    weights = None
    if args.ensemble_weights is not None:
        if len(args.ensemble_weights) != len(views):
            raise FundusError(
                f"--ensemble-weights takes one number per view model of the run ({', '.join(views)}), "
                f"got {len(args.ensemble_weights)}"
            )
        weights = dict(zip(views, args.ensemble_weights))
    report = score_run(
        args.run_dir,
        args.prep_dir,
        args.split,
        weights,
        args.out,
        views=views,
        force=args.force,
        flip_tta=args.flip_tta,
        calibrate_on=args.calibrate_on,
        operating_point=operating_point,
    )
    print(format_score_table(report))
    print(f"wrote {report['out_dir']}/predictions.csv, predictions_detail.csv and score.json")
    if args.report:
        from fundus_ensemble.inference.report import write_score_report

        print(f"wrote {write_score_report(args.run_dir, args.prep_dir, report['out_dir'], gallery=args.gallery)}")


if __name__ == "__main__":
    sys.exit(run(main))
