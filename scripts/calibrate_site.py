#!/usr/bin/env python3
"""Fit a site's per-class thresholds from a small labelled sample of its own photos, for the
calibration.json that predict, the station and the export take (--calibration). A class the
sample labels too rarely keeps the run's threshold, and the console says which."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run_dir", help="run folder of scripts/train_pair.py, a bundle folder, or 'bundled'")
    p.add_argument(
        "labels",
        help="CSV with patient_id, left_image, right_image and any of N D G C A H M O (1, 0, or empty: unknown)",
    )
    p.add_argument("--image-root", help="folder the image paths are relative to (default: the table's folder)")
    p.add_argument("--out", required=True, help="the calibration.json to write")
    p.add_argument("--work", help="folder for predict's output on the sample (default: beside --out)")
    p.add_argument(
        "--operating-point",
        help="sensitivity=T or specificity=T per fitted class (default: the most sensitive + specific threshold)",
    )
    p.add_argument(
        "--min-positives", type=int, default=5, help="labelled positives a class needs for its own threshold"
    )
    p.add_argument(
        "--min-negatives", type=int, default=5, help="labelled negatives a class needs for its own threshold"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-quality-gate", action="store_true", help="use every photo, gradable or not")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from fundus_ensemble.cli import import_keras
    from fundus_ensemble.errors import FundusError
    from fundus_ensemble.evaluation.calibration import parse_operating_point

    operating = parse_operating_point(args.operating_point) if args.operating_point else None
    if args.min_positives < 1 or args.min_negatives < 1:
        raise FundusError("--min-positives and --min-negatives must be at least 1")
    import_keras()
    from fundus_ensemble.inference.bundle import resolve_run
    from fundus_ensemble.inference.site import calibrate_site
    from fundus_ensemble.labels import LABEL_NAMES

    out = Path(args.out)
    record = calibrate_site(
        resolve_run(args.run_dir),
        args.labels,
        args.image_root,
        out,
        args.work or out.with_name(out.stem + "_sample"),
        operating,
        args.min_positives,
        args.min_negatives,
        args.batch_size,
        False if args.no_quality_gate else None,
    )
    for title, key in (("patients with both eyes", "site"), ("patients answered from one eye", "site_one_eye")):
        if key not in record:
            continue
        print(f"{title}:")
        for c, what in record[key].items():
            if what["source"] == "site":
                print(
                    f"  {c} ({LABEL_NAMES[c]}): site threshold {what['threshold']:.3f} on the raw probability "
                    f"({what['positives']} positives, {what['negatives']} negatives)"
                )
            else:
                print(f"  {c} ({LABEL_NAMES[c]}): kept the run's threshold ({what['why']})")
    changed = record.get("sample_before_after") or {}
    if changed:
        print("on the sample it was fitted on (optimistic: no held-out patients), patients with both eyes:")

        def pct(x):
            return "n/a" if x is None else f"{x:.0%}"

        for c, r in changed.items():
            b, a = r["before"], r["after"]
            print(
                f"  {c} ({LABEL_NAMES[c]}): sensitivity {pct(b['sensitivity'])} -> {pct(a['sensitivity'])} of "
                f"{r['positives']}, specificity {pct(b['specificity'])} -> {pct(a['specificity'])} of {r['negatives']}"
            )
    print(f"wrote {out}; use it with predict.py / serve.py / export.py --calibration {out}")


if __name__ == "__main__":
    sys.exit(run(main))
