#!/usr/bin/env python3
"""Run the whole pipeline on the embedded demo data: preprocess -> train_pair -> score."""

import argparse
import sys

from fundus_ensemble.cli import run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo; replaced on each run)")
    parser.add_argument("--split", default="test", choices=["val", "test"], help="split to score (default: test)")
    args = parser.parse_args(argv)
    from fundus_ensemble.cli import import_keras

    import_keras()
    from fundus_ensemble.demo import run_demo

    return 0 if run_demo(".", args.out, args.split)["healthy"] else 1


if __name__ == "__main__":
    sys.exit(run(main))
