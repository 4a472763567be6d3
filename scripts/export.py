#!/usr/bin/env python3
"""Export a trained run as ONE model (two cropped colour eyes in, the ensemble's 8 probabilities out;
the gray-eq view is made inside it) for TensorFlow Serving (saved_model) or phones (tflite)."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run
from fundus_ensemble.errors import FundusError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "run_dir", help="run folder of scripts/train_pair.py, a bundle folder, or 'bundled' (the package's own model)"
    )
    parser.add_argument("--format", default="tflite", choices=["tflite", "saved_model"])
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "float16", "int8"],
        help="tflite weights: float32, float16, or int8 with float activations (dynamic range)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="the .tflite file or the SavedModel folder to write (a .json beside it describes the inputs)",
    )
    parser.add_argument(
        "--ensemble-weights",
        type=float,
        nargs="+",
        metavar="W",
        help="weight of each view model, in the order color gray_eq (default: equal)",
    )
    parser.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    parser.add_argument(
        "--calibration",
        help="calibration.json whose thresholds the export's record carries (default: the run's own, as predict.py)",
    )
    parser.add_argument("--no-calibration", action="store_true", help="record 0.5 for every class")
    parser.add_argument("--site", help="site.json of scripts/adapt_site.py: this camera's alignment, folded in")
    parser.add_argument(
        "--check-on",
        metavar="PREP_DIR",
        help="after exporting, run the export and the Keras ensemble on the val split's colour views of "
        "this preprocessing folder and report how many decisions (at the thresholds it carries) the export changes",
    )
    args = parser.parse_args(argv)
    if args.format == "tflite" and not args.out.endswith(".tflite"):
        raise FundusError(f"--out {args.out}: a TFLite model's file name ends in .tflite")
    if args.format == "saved_model" and args.quantize != "none":
        raise FundusError("--quantize applies to --format tflite; a SavedModel keeps float32 weights")
    from fundus_ensemble.cli import import_keras

    import_keras()
    from fundus_ensemble.evaluation.ensemble import run_views
    from fundus_ensemble.inference.bundle import resolve_run
    from fundus_ensemble.inference.export import export_run

    args.run_dir = resolve_run(args.run_dir)

    weights = None
    if args.ensemble_weights is not None:
        views = run_views(args.run_dir)
        if len(args.ensemble_weights) != len(views):
            raise FundusError(
                f"--ensemble-weights takes one number per view model ({', '.join(views)}), "
                f"got {len(args.ensemble_weights)}"
            )
        weights = dict(zip(views, args.ensemble_weights))
    from fundus_ensemble.inference.export import AUTO

    if args.calibration and args.no_calibration:
        raise FundusError("--calibration and --no-calibration: choose one")
    calibration = None if args.no_calibration else (args.calibration or AUTO)
    record = export_run(args.run_dir, args.out, args.format, args.quantize, weights, args.force, calibration, args.site)
    print(
        f"wrote {args.out} ({record['bytes'] / 1e6:.1f} MB, {args.format}, weights {args.quantize}); inputs left_eye and "
        f"right_eye: uint8 RGB (1, {record['input_size']}, {record['input_size']}, 3), the eye cropped by "
        "fundus_ensemble.data.imaging.crop_to_fov; output: 8 probabilities N,D,G,C,A,H,M,O"
    )
    if args.check_on:
        from fundus_ensemble.inference.export import check_export_on_split

        check = check_export_on_split(args.run_dir, args.out, args.check_on)
        print(
            f"check on {check['of_patients']} {check['split']} patients: largest probability difference from Keras "
            f"{check['max_abs_diff']:.1e}; {check['cells']} of {check['of_cells']} decisions changed "
            f"({check['patients']} patients)"
        )
        if check["cells"]:
            print(
                f"warning: this export decides {check['cells']} class(es) differently from the Keras model on "
                f"{check['split']}; prefer a float export if that matters",
                file=sys.stderr,
            )


if __name__ == "__main__":
    sys.exit(run(main))
