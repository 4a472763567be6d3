"""Features first on real photos: preprocess a label table at several sizes and put every
photo's frozen features of several backbones into one feature store.

    python docs/measurements/features_first.py extract $DATA/labels.csv --image-root $DATA \
        --out runs/ff --backbones efficientnet_lite2 --sizes 224 260 300 380 [--flip]

Everything lands under --out (prep-<size>/, store/); a second call computes only what is missing.
"""

import argparse
import sys
from pathlib import Path

from fundus_ensemble.cli import run


def extract(args) -> None:
    from fundus_ensemble.data.importers import import_label_table
    from fundus_ensemble.data.manifest import load_manifest, write_manifest
    from fundus_ensemble.data.preprocess import preprocess_manifest
    from fundus_ensemble.labels import VIEWS
    from fundus_ensemble.training.features import extract_features

    out = Path(args.out)
    manifest_path = out / "manifest.csv"
    if not manifest_path.is_file():
        patients, report = import_label_table(args.table, "image-table", args.image_root)
        write_manifest(patients, manifest_path)
    manifest = load_manifest(manifest_path, image_root=args.image_root)
    for size in args.sizes:
        prep = out / f"prep-{size}"
        print(preprocess_manifest(manifest, prep, size).describe(), flush=True)
        for backbone in args.backbones:
            extract_features(
                prep, out / "store", backbone, "imagenet", size, VIEWS, (False, True) if args.flip else (False,)
            )
            print(f"[extract] {backbone} {size} px done", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extract")
    e.add_argument("table")
    e.add_argument("--image-root", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--backbones", nargs="+", default=["efficientnet_lite2"])
    e.add_argument("--sizes", nargs="+", type=int, default=[224, 260, 300, 380])
    e.add_argument("--flip", action="store_true")
    args = p.parse_args(argv)
    from fundus_ensemble.cli import import_keras

    import_keras()
    {"extract": extract}[args.command](args)


if __name__ == "__main__":
    sys.exit(run(main))
