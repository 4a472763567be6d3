#!/usr/bin/env python3
"""Run a trained pair on new photos: a folder (paired by <id>_left/<id>_right), a manifest, or --left/--right."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run
from fundus_ensemble.errors import FundusError

SHOWN = 5  # rejected patients named on the console; decisions.csv has them all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "paths",
        nargs="*",
        metavar="[RUN] [INPUT]",
        help="RUN: run folder of scripts/train_pair.py (default: the model bundled with the package); INPUT: folder "
        "of photos, or a manifest CSV (label and split columns may be absent)",
    )
    p.add_argument("--model", help="the model: 'bundled' (the package's own), a run folder or a bundle folder")
    p.add_argument(
        "--model-card",
        action="store_true",
        help="print the model's card (intended use, training data, test results, failure modes) and stop",
    )
    p.add_argument("--left", help="one patient's left photo (instead of INPUT)")
    p.add_argument("--right", help="one patient's right photo (instead of INPUT)")
    p.add_argument("--id", default="patient", help="patient id for --left/--right")
    p.add_argument(
        "--pattern",
        default=r"(?P<id>.+)_(?P<eye>left|right)",
        help="regex on a photo's file name without extension, with groups id and eye, to pair a folder's photos",
    )
    p.add_argument(
        "--unnamed-eye",
        choices=["left", "right"],
        help="the eye shown by a folder's photos whose name says none (without it such a photo is an error)",
    )
    p.add_argument(
        "--image-root", help="folder a manifest's image paths are relative to (default: the manifest's folder)"
    )
    p.add_argument("--out", help="folder for predictions.csv and decisions.csv (required unless --model-card)")
    p.add_argument("--batch-size", type=int, default=16, help="patients per batch (memory stays bounded by it)")
    p.add_argument(
        "--max-megapixels", type=float, default=100.0, help="reject larger photos before decoding (0: no limit)"
    )
    p.add_argument(
        "--calibration",
        help="calibration.json of score.py --calibrate-on or a cross-fitted run: per-class "
        "thresholds (default: the run's own, RUN/calibration.json or "
        "RUN/score_*/calibration.json, as the station; else 0.5 for every class)",
    )
    p.add_argument("--no-calibration", action="store_true", help="decide at 0.5 even if the run has a calibration")
    p.add_argument(
        "--operating-point",
        help="decide every class at an operating point fitted out of fold and kept in the calibration: "
        "sensitivity=0.90 or specificity=0.90 (the model card gives what each did on held-back patients)",
    )
    p.add_argument(
        "--site",
        help="site.json of scripts/adapt_site.py: this camera's alignment to the training photos, made for this "
        "model from 50 or more of the camera's unlabelled photos",
    )
    p.add_argument(
        "--no-quality-gate",
        action="store_true",
        help="decide on every photo that can be read, even one the gradability gate refuses (too dark, "
        "blurred, cut off, not a fundus photo ...; docs/inference.md)",
    )
    p.add_argument(
        "--explain",
        nargs="?",
        const="",
        metavar="CLASSES",
        help="write Grad-CAM heatmaps (PNG overlays and .npy) to OUT/heatmaps: for the comma-separated CLASSES "
        "(e.g. D,G; 'all'), or without a value for each patient's classes decided positive",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="also write OUT/report.html (prints a patient per page), OUT/report.pdf and OUT/records/record-ID.pdf "
        "(one PDF per patient): one record per patient "
        "with both eyes, heatmaps and decisions (implies --explain; the first 200 patients)",
    )
    p.add_argument("--force", action="store_true", help="replace earlier predictions in --out")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run of the same job in --out from its last finished batch",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="predict only shard I of N (1 <= I <= N, as preprocess.py --shard; by a hash of the patient id); "
        "join the N outputs with scripts/merge_predictions.py",
    )
    return p


def print_model_card(model: str) -> None:
    from fundus_ensemble.inference.bundle import model_card_of

    card = model_card_of(model)
    if card is None:
        raise FundusError(f"{model}: no model card (a run of train_pair has its cards and score report instead)")
    print(card.read_text(encoding="utf-8"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fundus_ensemble.cli import run_and_input

    args.run_dir, args.input = run_and_input(args.paths, args.model, bool(args.left or args.right or args.model_card))
    if args.model_card:
        return print_model_card(args.run_dir)
    if args.out is None:
        raise FundusError("--out is required: the folder for predictions.csv and decisions.csv")
    if (args.input is None) == (args.left is None and args.right is None):
        raise FundusError("give either INPUT (a folder or a manifest) or --left/--right, not both or neither")
    if args.batch_size < 1:
        raise FundusError(f"--batch-size must be at least 1, got {args.batch_size}")
    from pathlib import Path

    from fundus_ensemble.cli import check_run_folder, import_keras
    from fundus_ensemble.data.preprocess import parse_shard
    from fundus_ensemble.labels import parse_classes

    explain_classes = parse_classes(args.explain, "--explain")
    shard = parse_shard(args.shard) if args.shard else None
    # paths and the calibration are checked before Keras starts (which takes seconds to minutes)
    if args.run_dir != "bundled":
        check_run_folder(args.run_dir)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise FundusError(f"--out {args.out} is a file; predictions need a folder")
    photos = {eye: Path(p) for eye, p in (("left", args.left), ("right", args.right)) if p}
    for eye, path in photos.items():
        if not path.is_file():
            raise FundusError(f"--{eye} {path}: {'is a folder' if path.is_dir() else 'file not found'}")
    if args.input is not None and not Path(args.input).exists():
        raise FundusError(f"{args.input}: no such folder or manifest")
    from fundus_ensemble.evaluation.calibration import load_calibration_file, run_calibration

    if args.calibration is not None and args.no_calibration:
        raise FundusError("--calibration and --no-calibration: choose one")
    if args.operating_point is not None:
        from fundus_ensemble.evaluation.calibration import operating_point_name, parse_operating_point

        if args.no_calibration:
            raise FundusError(
                "--operating-point and --no-calibration: choose one (an operating point is a calibration's)"
            )
        args.operating_point = operating_point_name(*parse_operating_point(args.operating_point))
    bundled = args.run_dir == "bundled" or Path(args.run_dir, "bundle.json").is_file()
    own = not args.no_calibration and args.calibration is None  # the run's own, unless told otherwise
    if own and not bundled:
        args.calibration = run_calibration(args.run_dir)
    if args.calibration is not None:
        load_calibration_file(args.calibration)
        if args.operating_point is not None:  # a name the file does not keep: said before Keras starts
            from fundus_ensemble.evaluation.calibration import load_operating_point

            load_operating_point(args.calibration, args.operating_point)
    import_keras()
    from fundus_ensemble.inference.bundle import resolve_run

    if bundled:
        print(
            f"model: {'the bundled model' if args.run_dir == 'bundled' else args.run_dir} (checked against its "
            "bundle.json)",
            flush=True,
        )
    args.run_dir = resolve_run(args.run_dir)
    if own and bundled:
        args.calibration = run_calibration(args.run_dir)  # the bundle's, in the run built from it
    if args.operating_point is not None:
        print(f"deciding at the operating point {args.operating_point} of {args.calibration}", flush=True)
    elif own and args.calibration is not None:
        print(f"deciding with the run's calibration {args.calibration} (--no-calibration: at 0.5)", flush=True)
    from fundus_ensemble.inference.predict import (
        UNLIKE_SHARE,
        PatientPhotos,
        check_sides,
        patients_in_folder,
        patients_in_manifest,
        predict_photos,
    )
    from fundus_ensemble.inference.referral import counts_text

    if args.input is None:
        patients = check_sides([PatientPhotos(args.id, photos.get("left"), photos.get("right"))])
    elif Path(args.input).is_dir():
        patients = patients_in_folder(args.input, args.pattern, args.unnamed_eye)
    else:
        patients = patients_in_manifest(args.input, args.image_root)
    max_pixels = round(args.max_megapixels * 1e6) if args.max_megapixels > 0 else None
    summary = predict_photos(
        args.run_dir,
        patients,
        args.out,
        args.batch_size,
        args.force,
        max_pixels,
        calibration=args.calibration,
        operating_point=args.operating_point,
        explain=args.explain is not None,
        explain_classes=explain_classes,
        report=args.report,
        resume=args.resume,
        shard=shard,
        gate=False if args.no_quality_gate else None,
        site=args.site,
    )
    one_eyed = summary["eyes_rejected"]
    print(
        f"{summary['predicted']} of {summary['patients']} patients predicted"
        f"{f' ({len(one_eyed)} from one eye: the other photo unusable)' if one_eyed else ''}, "
        f"{summary['rejected']} rejected; {summary['images']} photos in {summary['seconds']:.1f} s "
        f"({summary['images_per_s'] or 0:.1f} images/s at {summary['input_size']} px)"
    )
    for what, cases in (("rejected", summary["rejections"]), ("predicted from one eye", one_eyed)):
        for patient_id, note in cases[:SHOWN]:
            print(f"  {what}: {patient_id}: {note}")
        if len(cases) > SHOWN:
            print(f"  ... and {len(cases) - SHOWN} more {what} (decisions.csv gives every reason)")
    if summary["unlike_training"] > UNLIKE_SHARE * max(1, summary["photos_screened"]):
        print(
            f"warning: {summary['unlike_training']} of {summary['photos_screened']} photos look unlike the training "
            f"photos (1 % of held-back training photos do; decisions.csv, column unlike_training, names them)"
            + (
                f". Photos of another camera? Run scripts/adapt_site.py {args.run_dir} on 50 or more of them "
                "and predict with --site"
                if summary["site"] is None
                else f", even with --site {summary['site']}"
            ),
            file=sys.stderr,
            flush=True,
        )
    print(f"referral: {counts_text(summary['counts'])}")
    print(f"wrote {summary['out_dir']}/worklist.csv (one row per patient), predictions.csv and decisions.csv")
    if not summary["predicted"]:
        raise FundusError(
            f"none of the {summary['patients']} patients could be predicted (reasons above and in "
            f"{summary['out_dir']}/decisions.csv)"
        )
    if args.report:
        print(
            f"wrote {summary['out_dir']}/report.html, report.pdf (a page per patient, to print) and records/ (a PDF per patient)"
        )
    if args.explain is not None or args.report:
        print(f"wrote {summary['heatmaps']} heatmaps to {summary['out_dir']}/heatmaps (listed in heatmaps.csv)")


if __name__ == "__main__":
    sys.exit(run(main))
