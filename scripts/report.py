#!/usr/bin/env python3
"""Write the HTML report of a scored split (score.py's output): scores beside the trivial rows,
ROC and precision-recall curves, reliability, decisions, training curves and a gallery with heatmaps."""

import argparse
import sys
from pathlib import Path

from fundus_ensemble.cli import run
from fundus_ensemble.errors import FundusError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="run folder of scripts/train_pair.py")
    parser.add_argument("prep_dir", help="output folder of scripts/preprocess.py (the gallery shows its views)")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--score-dir", help="folder of score.py's output (default: RUN_DIR/score_SPLIT)")
    parser.add_argument("--out", help="HTML file to write (default: report.html in the score folder)")
    parser.add_argument("--force", action="store_true", help="replace an existing report at --out")
    parser.add_argument(
        "--gallery",
        type=int,
        default=3,
        metavar="N",
        help="patients per class and group (true/false positives, false negatives); 0: no gallery",
    )
    args = parser.parse_args(argv)
    if args.gallery < 0:
        raise FundusError(f"--gallery must be 0 or more, got {args.gallery}")
    score_dir = Path(args.score_dir or Path(args.run_dir) / f"score_{args.split}")
    if not (score_dir / "score.json").is_file():
        raise FundusError(
            f"{score_dir}: no score.json; run scripts/score.py {args.run_dir} {args.prep_dir} "
            f"--split {args.split} first (or add --report to it)"
        )
    from fundus_ensemble.fileio import check_output_file

    check_output_file(args.out or score_dir / "report.html", [score_dir / "score.json"], args.force)
    from fundus_ensemble.cli import import_keras

    import_keras()
    from fundus_ensemble.inference.report import write_score_report

    print(f"wrote {write_score_report(args.run_dir, args.prep_dir, score_dir, args.out, args.gallery)}")


if __name__ == "__main__":
    sys.exit(run(main))
