"""What each gray view is worth at the lever screen's budget (issue 12): CLAHE against global
equalization alone, and each averaged 1:1 with the colour model (the paper's ensemble), on the
same 378 val patients, with 95% paired bootstrap intervals (500 resamples).

Needs the library rows of three screens (docs/results-history.md, "Lever screen"):

    python scripts/levers.py runs/odir96/prep --out runs/levers96 --rows library
    python scripts/levers.py runs/odir96/prep --view gray_eq --out runs/levers96-gray --rows library
    PYTHONPATH=. python docs/measurements/clahe_view.py runs/odir96/prep runs/odir96/prep_clahe
    python scripts/levers.py runs/odir96/prep_clahe --view gray_eq --out runs/levers96-clahe --rows library
    PYTHONPATH=. python docs/measurements/view_margins.py
"""

import numpy as np

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.labels import LABELS
from fundus_ensemble.metrics import bootstrap_margin, odir_score, per_class_scores

y = load_manifest("runs/odir96/prep/color/manifest.csv").select("val").label_matrix()
probs = {
    name: np.load(f"runs/{folder}/library/val_probabilities.npy")
    for name, folder in (("color", "levers96"), ("gray_eq", "levers96-gray"), ("gray_clahe", "levers96-clahe"))
}
probs["color + gray_eq"] = (probs["color"] + probs["gray_eq"]) / 2
probs["color + gray_clahe"] = (probs["color"] + probs["gray_clahe"]) / 2

print("| model | val final | kappa | AUC | mean per-class AUC | " + " | ".join(f"AUC {c}" for c in LABELS) + " |")
print("|---|---:|---:|---:|---:|" + "---:|" * len(LABELS))
for name, p in probs.items():
    s, classes = odir_score(y, p), per_class_scores(y, p)
    aucs = [classes[c]["auc"] for c in LABELS]
    print(
        f"| {name} | {s['final']:.3f} | {s['kappa']:.3f} | {s['auc']:.3f} | {np.mean(aucs):.3f} | "
        + " | ".join(f"{a:.2f}" for a in aucs)
        + " |"
    )

print()
for ours, other in (
    ("gray_clahe", "gray_eq"),
    ("color + gray_eq", "color"),
    ("color + gray_clahe", "color"),
    ("color + gray_clahe", "color + gray_eq"),
):
    margin = odir_score(y, probs[ours])["final"] - odir_score(y, probs[other])["final"]
    low, high = bootstrap_margin(y, probs[ours], probs[other])
    print(f"- {ours} minus {other}: {margin:+.3f} [{low:+.3f}, {high:+.3f}]")
