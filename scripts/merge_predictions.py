#!/usr/bin/env python3
"""Join the N outputs of predict.py --shard i/N (from several machines) into one predictions folder."""

import argparse
import sys

from fundus_ensemble.cli import HelpFormatter, run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("shards", nargs="+", help="the --out folders of the N shard runs")
    parser.add_argument(
        "--out", required=True, help="folder for the merged predictions.csv, decisions.csv, predict.json"
    )
    parser.add_argument("--force", action="store_true", help="replace earlier merged predictions in --out")
    args = parser.parse_args(argv)
    from fundus_ensemble.inference.merge import merge_predictions

    record = merge_predictions(args.shards, args.out, args.force)
    print(
        f"merged {len(record['merged_from'])} shards: {record['predicted']} of {record['patients']} patients predicted, "
        f"{record['rejected']} rejected; wrote {args.out}/predictions.csv and decisions.csv"
    )


if __name__ == "__main__":
    sys.exit(run(main))
