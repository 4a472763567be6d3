#!/usr/bin/env python3
"""Crop every manifest image to the retina and write its two views (color, gray_eq)."""

import argparse
import sys

from fundus_ensemble.cli import run
from fundus_ensemble.data.imaging import DEFAULT_MAX_PIXELS
from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import (
    DEFAULT_SIZE,
    merge_shards,
    parse_shard,
    preprocess_acquisition_copies,
    preprocess_manifest,
    preprocess_shard,
)
from fundus_ensemble.errors import FundusError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", help="patient manifest (data_manifest.csv)")
    parser.add_argument("--out", required=True, help="output folder (re-runs skip up-to-date images)")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"output side in pixels (default {DEFAULT_SIZE}, the paper's)"
    )
    parser.add_argument("--image-root", help="folder image paths are relative to (default: the manifest's folder)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument(
        "--max-reject-fraction",
        type=float,
        default=1.0,
        help="exit with status 2 if more than this fraction of images is rejected (default 1: never)",
    )
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=DEFAULT_MAX_PIXELS / 1e6,
        help="reject photos larger than this before decoding them, to bound memory per photo "
        f"(default {DEFAULT_MAX_PIXELS / 1e6:.0f}; 0: no limit)",
    )
    parser.add_argument("--force", action="store_true", help="delete views made earlier in --out with other settings")
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="process only shard I of N (1 <= I <= N; every N-th patient) into OUT/shards/I-of-N, "
        "for N copies of this command in a batch scheduler; then run --merge-shards N",
    )
    parser.add_argument(
        "--merge-shards",
        type=int,
        metavar="N",
        help="move the N finished shards' views into --out and write its manifests, as one run would",
    )
    parser.add_argument(
        "--acquisition-copies",
        type=int,
        default=0,
        metavar="K",
        help="also K randomly shifted copies of every train and val photo (blur, JPEG, resolution, exposure, "
        "white balance, framing: as other cameras take photos) into OUT/acquisition/copy-<k>, for "
        "train_pair.py --acquisition-copies K (docs/evaluation.md#another-clinics-camera)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the acquisition copies' shifts")
    args = parser.parse_args(argv)
    if args.acquisition_copies and (args.shard or args.merge_shards):
        raise FundusError("--acquisition-copies runs without --shard / --merge-shards: make the copies in one run")
    if args.shard and args.merge_shards:
        raise FundusError("--shard processes one shard and --merge-shards joins them: run them as separate steps")
    manifest = load_manifest(args.manifest, image_root=args.image_root)
    max_pixels = round(args.max_megapixels * 1e6) if args.max_megapixels > 0 else None
    options = dict(size=args.size, workers=args.workers, force=args.force, max_pixels=max_pixels)
    if args.merge_shards:
        if args.merge_shards < 1:
            raise FundusError(f"--merge-shards takes the number of shards (1 or more), got {args.merge_shards}")
        summary = merge_shards(manifest, args.out, args.merge_shards, size=args.size)
    elif args.shard:
        summary = preprocess_shard(manifest, args.out, *parse_shard(args.shard), **options)
    else:
        summary = preprocess_manifest(manifest, args.out, **options)
    print(summary.describe())
    if summary.rejected:
        print(f"rejected images and reasons: {summary.out_dir}/rejects.csv")
    for copy in preprocess_acquisition_copies(manifest, args.out, args.acquisition_copies, args.seed, **options):
        print(f"acquisition copy: {copy.describe()}")
    if summary.reject_fraction > args.max_reject_fraction:
        raise FundusError(
            f"{summary.reject_fraction:.1%} of images rejected, more than --max-reject-fraction {args.max_reject_fraction:.1%}"
        )


if __name__ == "__main__":
    sys.exit(run(main))
