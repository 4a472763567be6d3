#!/usr/bin/env python3
"""Build a patient manifest (with stratified splits) from an ODIR label table."""

import argparse
import sys

from fundus_ensemble.cli import parse_fractions, run
from fundus_ensemble.data.importers import FORMATS, import_label_table
from fundus_ensemble.data.manifest import Manifest, write_manifest
from fundus_ensemble.data.splits import assign_splits
from fundus_ensemble.fileio import check_output_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("table", help="label table: labels.csv (one row per image) or Kaggle full_df.csv")
    parser.add_argument(
        "--format", choices=FORMATS, default="image-table", help="layout of the table (default: image-table)"
    )
    parser.add_argument("--image-root", required=True, help="folder the manifest's image paths are relative to")
    parser.add_argument(
        "--image-dir", default="images", help="sub-folder of --image-root holding the images (default: images)"
    )
    parser.add_argument("--out", required=True, help="manifest to write")
    parser.add_argument("--fractions", type=float, nargs=3, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing --out file (never the input table)")
    args = parser.parse_args(argv)
    check_output_file(args.out, [args.table], args.force)
    patients, report = import_label_table(args.table, args.format, args.image_root, args.image_dir)
    manifest = assign_splits(Manifest(tuple(patients), args.image_root), parse_fractions(args.fractions), args.seed)
    write_manifest(manifest.patients, args.out)
    counts = {s: sum(p.split == s for p in manifest.patients) for s in ("train", "val", "test")}
    print(
        f"wrote {args.out}: {len(manifest)} patients {counts}; "
        f"{len(report.missing_images)} images not found, {len(report.dropped_patients)} patients without any image dropped"
    )
    print(
        f"image paths are relative to {args.image_root}: pass --image-root {args.image_root} to scripts/preprocess.py"
    )


if __name__ == "__main__":
    sys.exit(run(main))
