#!/usr/bin/env python3
"""Compare a manifest's patient labels with the labels its eyes' ODIR keywords give (data/keywords.py)."""

import argparse
import sys

from fundus_ensemble.cli import run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", help="manifest with left_keywords/right_keywords (make_manifest.py keeps them)")
    args = parser.parse_args(argv)
    from fundus_ensemble.data.keywords import compare_with_patient_labels
    from fundus_ensemble.data.manifest import load_manifest

    report = compare_with_patient_labels(load_manifest(args.manifest, check_files=False).patients)  # keywords only
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
