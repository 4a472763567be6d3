#!/usr/bin/env python3
"""Measure, on this machine, images/s of the input pipeline alone (per worker count), of the
model step alone, of real training and of prediction, and the ratio training / model step."""

import argparse
import json
import sys

from fundus_ensemble.cli import AUTO_ON_OFF, HelpFormatter, run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--prep", help="a view folder of scripts/preprocess.py (e.g. PREP/color); default: synthetic patients"
    )
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--backbone", default="efficientnet_b3")
    p.add_argument("--batch-size", type=int, default=15, help="patients per batch")
    p.add_argument("--steps", type=int, default=10, help="batches per timed pass")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker threads to try")
    p.add_argument("--precision", default="float32", choices=["float32", "mixed_float16", "mixed_bfloat16"])
    p.add_argument("--jit-compile", default="auto", choices=list(AUTO_ON_OFF), help="XLA under TensorFlow")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="decode the views from disk for every batch, as training does when they do not fit in memory",
    )
    p.add_argument("--json", help="also write the measurements to this file")
    args = p.parse_args(argv)
    from fundus_ensemble.cli import import_keras

    import_keras()
    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.training.speed import measure_speed

    manifest = load_manifest(f"{args.prep}/manifest.csv") if args.prep else None
    report = measure_speed(
        manifest,
        args.size,
        args.backbone,
        args.batch_size,
        args.steps,
        tuple(args.workers),
        args.precision,
        AUTO_ON_OFF[args.jit_compile],
        args.devices,
        cache=not args.no_cache,
    )
    print(report.table())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.__dict__, handle, indent=2)


if __name__ == "__main__":
    sys.exit(run(main))
