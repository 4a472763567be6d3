"""One Markdown table of a budget's benchmark on two splits, from their results.json files.

Each row gives final, kappa and pooled AUC on split A / split B, and every class's AUC on
both; then the targets of the raw and the calibrated ensemble on each split.

    PYTHONPATH=. python docs/measurements/two_split_table.py runs/bench-lite2-s0 runs/bench-lite2-s1
"""

import json
import sys
from pathlib import Path

from fundus_ensemble.evaluation.benchmark import _fmt_check as _cell
from fundus_ensemble.labels import LABELS


def main(first: Path, second: Path) -> None:
    runs = [json.loads((folder / "results.json").read_text()) for folder in (first, second)]
    rows = [{r["name"]: r for r in run["rows"]} for run in runs]
    print(
        f"Budget `{runs[0]['budget']['name']}`, split seeds {runs[0]['seed']} / {runs[1]['seed']} "
        f"({runs[0]['held_out_patients']} / {runs[1]['held_out_patients']} test patients); wall time "
        f"{runs[0]['total_wall_s'] / 60:.1f} / {runs[1]['total_wall_s'] / 60:.1f} min.\n"
    )
    print("| row (test) | final | kappa | pooled AUC | " + " | ".join(f"AUC {c}" for c in LABELS) + " |")
    print("|---|---|---|---|" + "---|" * len(LABELS))
    for name in (n for n in rows[0] if n in rows[1]):
        a, b = rows[0][name], rows[1][name]

        def pair(key, digits=3):
            return f"{a[key]:.{digits}f} / {b[key]:.{digits}f}"

        classes = " | ".join(
            "/".join("n/a" if r["per_class_auc"][c] is None else f"{r['per_class_auc'][c]:.2f}" for r in (a, b))
            for c in LABELS
        )
        print(f"| {name} | **{pair('final')}** | {pair('kappa')} | {pair('auc')} | {classes} |")
    for ours in runs[0]["checks"]:
        print(f"\nTargets of **{ours}** (split {runs[0]['seed']} / split {runs[1]['seed']}):\n")
        print("| check | " + " | ".join(f"split {run['seed']}" for run in runs) + " |")
        print("|---|---|---|")
        for key in runs[0]["checks"][ours]:
            print(f"| {key} | " + " | ".join(_cell(run["checks"][ours].get(key)) for run in runs) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
