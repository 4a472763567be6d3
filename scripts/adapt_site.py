#!/usr/bin/env python3
"""Adapt a trained model to another camera from 50 or more of its unlabelled photos: each view's
features are aligned to the training photos' on the photos that look most normal (so the site's
case mix is not taken for its camera), and written as a site.json that predict, the station and
the export take (--site). It records the model it was made for; another model refuses it."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run_dir", help="run folder of scripts/train_pair.py (cross-fitted), a bundle folder, or 'bundled'")
    p.add_argument("photos", help="a folder of the camera's photos (<id>_left.jpg, <id>_right.jpg, ...) or a manifest")
    p.add_argument("--out", required=True, help="the site.json to write")
    p.add_argument("--image-root", help="for a manifest: the folder its image paths are relative to")
    p.add_argument("--pattern", default=r"(?P<id>.+)_(?P<eye>left|right)", help="file name pattern of a folder")
    p.add_argument("--unnamed-eye", choices=["left", "right"], help="the eye shown by photos whose name says none")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-quality-gate", action="store_true", help="use every photo, gradable or not")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from fundus_ensemble.cli import import_keras
    from fundus_ensemble.errors import FundusError

    source = Path(args.photos)
    if not source.exists():
        raise FundusError(f"{source}: no such folder or manifest")
    out = Path(args.out)
    if out.is_dir():
        raise FundusError(f"--out {out} is a folder; give the site.json to write")
    if out.exists() and out.suffix != ".json":
        raise FundusError(f"--out {out} exists and is not a .json file; choose another --out")
    import_keras()
    from fundus_ensemble.inference.bundle import resolve_run
    from fundus_ensemble.inference.predict import patients_in_folder, patients_in_manifest
    from fundus_ensemble.inference.site import adapt_site

    patients = (
        patients_in_folder(source, args.pattern, args.unnamed_eye)
        if source.is_dir()
        else patients_in_manifest(source, args.image_root)
    )
    record = adapt_site(
        resolve_run(args.run_dir), patients, out, args.batch_size, False if args.no_quality_gate else None
    )
    unlike = record["unlike_training"]
    print(
        f"aligned on {record['photos']} photos ({record['patients_refused']} patients refused by the gate); "
        f"photos unlike the training photos: {unlike['before']:.0%} before, {unlike['after']:.0%} after"
    )
    print(f"wrote {out}; use it with predict.py / serve.py --site {out}")


if __name__ == "__main__":
    sys.exit(run(main))
