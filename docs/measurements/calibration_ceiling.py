"""How far thresholds can carry a benchmark's models (issue 12): each model's test final with
the library's calibration (per-class Platt + threshold) fitted on val, as the benchmark
reports it, and fitted on the test patients themselves.

The second is not a result: it is fitted on the patients it scores (with a threshold grid
five times finer and more passes than the benchmark's), so it is optimistic, a practical
ceiling of what per-class scales and thresholds could make of those models' rankings. It is
not a proven bound (Platt is fitted by likelihood, the thresholds one class at a time), but
where it stays below the issue's 0.66, moving where the outputs sit (a loss that pushes them
over 0.5, other thresholds, another calibration fit) is unlikely to reach the target; better
ranking would have to.

    PYTHONPATH=. python docs/measurements/calibration_ceiling.py runs/bench-cpu128-b runs/bench-cpu96 ...
"""

import json
import sys
from pathlib import Path

import numpy as np

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.evaluation.benchmark import _load_predictions
from fundus_ensemble.evaluation.calibration import fit_calibration
from fundus_ensemble.metrics import odir_score

TARGET = 0.66
FINE_GRID = tuple(np.round(np.arange(0.01, 1.0, 0.01), 2))
MEMBERS = {
    "class prior": [],
    "plain baseline": ["baseline"],
    "color": ["color"],
    "gray_eq": ["gray_eq"],
    "ensemble": ["color", "gray_eq"],
}


def main(folders: list[str]) -> None:
    print(
        "| run | model | raw final | calibrated on val: final | on test (ceiling): final | kappa | F1 | AUC "
        "| ceiling minus 0.66 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for folder in map(Path, folders):
        results = json.loads((folder / "results.json").read_text())
        budget, seed = results["budget"]["name"], results.get("seed", "?")
        manifest = load_manifest(folder / "prep" / "color" / "manifest.csv")
        y = {s: manifest.select(s).label_matrix() for s in ("train", "val", "test")}
        stored = _load_predictions(folder / "predictions.npz")
        for name, members in MEMBERS.items():
            for tta in (False, True) if name == "ensemble" else (False,):

                def probs(split: str) -> np.ndarray:
                    if not members:
                        return np.tile(y["train"].mean(axis=0), (len(y[split]), 1))
                    return np.mean([stored.probs[stored.key(m, split, tta)] for m in members], axis=0)

                test = probs("test")
                on_val = fit_calibration(y["val"], probs("val")).apply(test)
                on_test = fit_calibration(y["test"], test, grid=FINE_GRID, passes=4).apply(test)
                raw, val_s, ceiling = (
                    odir_score(y["test"], test),
                    odir_score(y["test"], on_val),
                    odir_score(y["test"], on_test),
                )
                label = name + (" + flip TTA" if tta else "")
                print(
                    f"| {budget}, seed {seed} | {label} | {raw['final']:.3f} | {val_s['final']:.3f} | "
                    f"**{ceiling['final']:.3f}** | {ceiling['kappa']:.3f} | {ceiling['f1']:.3f} | {ceiling['auc']:.3f} | "
                    f"{ceiling['final'] - TARGET:+.3f} |"
                )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
