#!/usr/bin/env python3
"""Score a trained pair on a partly labelled table (another dataset, a clinic's sample): per
labelled class, AUC and sensitivity / specificity at the thresholds in use, with 95 % intervals.
Class columns may be missing and cells empty (unknown, not negative); one-eyed rows are fine.
The ODIR final score is not defined there and is not given."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run
from fundus_ensemble.errors import FundusError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run_dir", help="run folder of scripts/train_pair.py, a bundle folder, or 'bundled'")
    p.add_argument(
        "table",
        help="CSV with patient_id, left_image, right_image (either may be empty) and any of the columns "
        "N D G C A H M O holding 1, 0 or nothing",
    )
    p.add_argument("--image-root", help="folder the image paths are relative to (default: the table's folder)")
    p.add_argument("--out", required=True, help="folder for evaluation.json, evaluation.md and predict's output")
    p.add_argument("--calibration", help="decide with this calibration.json (default: the run's own)")
    p.add_argument("--no-calibration", action="store_true", help="decide at 0.5")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-quality-gate", action="store_true", help="score every photo, gradable or not")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.calibration and args.no_calibration:
        raise FundusError("--calibration and --no-calibration: choose one")
    from fundus_ensemble.cli import import_keras

    import_keras()
    from fundus_ensemble.inference.bundle import resolve_run
    from fundus_ensemble.inference.site import evaluate_table, format_partial

    result = evaluate_table(
        resolve_run(args.run_dir),
        args.table,
        args.image_root,
        args.out,
        False if args.no_calibration else args.calibration,
        args.batch_size,
        False if args.no_quality_gate else None,
    )
    print(format_partial(result))
    print(f"wrote {args.out}/evaluation.json, evaluation.md and evaluation.html (ROC curves, operating points)")


if __name__ == "__main__":
    sys.exit(run(main))
