#!/usr/bin/env python3
"""Regenerate the embedded demo data (data/demo/images and data_manifest.csv) from its seed."""

import argparse
import sys

from fundus_ensemble.cli import run
from fundus_ensemble.demo import DEMO, write_demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    args = parser.parse_args(argv)
    path = write_demo(args.root)
    print(f"wrote {path} ({DEMO.patients} patients, seed {DEMO.seed})")


if __name__ == "__main__":
    sys.exit(run(main))
