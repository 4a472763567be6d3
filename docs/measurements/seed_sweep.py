"""How much the lever screen's numbers move when only the seed changes (issue 12).

The paired bootstrap intervals of the lever screen resample val patients; they say nothing
about training noise (initialisation, batch order, augmentation draws). This reruns the
library row, the asymmetric row and the plain per-eye row with several seeds on the same split
and prints each seed's val scores, the mean and standard deviation over seeds, each row's
margin over the library row seed by seed, and what each model's images are worth: its final
minus the final of an image-blind constant, its own mean probability per class given to every
patient. A row is summarised when every seed folder has it.

    python scripts/preprocess.py runs/bench-cpu128-asl/manifest.csv \
        --image-root ../shared/data/odir5k-256-dev --out runs/odir96/prep --size 96
    for s in 0 1 2 3 4; do
        python scripts/levers.py runs/odir96/prep --out runs/seeds96/s$s --rows library asymmetric plain --seed $s
    done
    PYTHONPATH=. python docs/measurements/seed_sweep.py runs/seeds96
"""

import json
import sys
from pathlib import Path

import numpy as np

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.labels import LABELS
from fundus_ensemble.metrics import bootstrap_margin, odir_score

ROWS = ("library", "asymmetric", "plain")
COLUMNS = ("final", "kappa", "f1", "auc")


def main(sweep: Path) -> None:
    y = load_manifest("runs/odir96/prep/color/manifest.csv").select("val").label_matrix()
    results: dict[int, dict[str, dict]] = {}
    for folder in sorted(sweep.glob("s[0-9]*/"), key=lambda f: int(f.name[1:])):
        results[int(folder.name[1:])] = {r["row"]: r for r in json.loads((folder / "levers.json").read_text())["rows"]}
    # a row is summarised when every seed has it, so means and margins cover the same seeds
    names = [name for name in ROWS if results and all(name in rows for rows in results.values())]
    if "library" not in names:
        sys.exit(f"no row of {ROWS} with the library row in every seed folder under {sweep}")

    print(
        "| seed | row | val final | kappa | F1 | AUC | " + " | ".join(f"AUC {c}" for c in LABELS) + " | train img/s |"
    )
    print("|---|---|---:|---:|---:|---:|" + "---:|" * len(LABELS) + "---:|")
    for seed, rows in results.items():
        for name in names:
            r = rows[name]
            print(
                f"| {seed} | {name} | "
                + " | ".join(f"{r[c]:.3f}" for c in COLUMNS)
                + " | "
                + " | ".join(f"{r['auc_per_class'][c]:.2f}" for c in LABELS)
                + f" | {r['train_images_per_s']:.1f} |"
            )

    print(f"\nMean and sample standard deviation over {len(results)} seeds:\n")
    print("| row | " + " | ".join(COLUMNS) + " | " + " | ".join(f"AUC {c}" for c in LABELS) + " |")
    print("|---|" + "---|" * (len(COLUMNS) + len(LABELS)))
    for name in names:
        cells = [np.array([rows[name][c] for rows in results.values()]) for c in COLUMNS]
        cells += [np.array([rows[name]["auc_per_class"][c] for rows in results.values()]) for c in LABELS]
        print(f"| {name} | " + " | ".join(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" for v in cells) + " |")

    for name in names[1:]:
        print(f"\n{name} minus library, per seed (95% paired bootstrap interval over val patients):\n")
        margins = []
        for seed in results:
            ours = np.load(sweep / f"s{seed}" / name / "val_probabilities.npy")
            ref = np.load(sweep / f"s{seed}" / "library" / "val_probabilities.npy")
            margin = results[seed][name]["final"] - results[seed]["library"]["final"]
            auc_margin = results[seed][name]["auc"] - results[seed]["library"]["auc"]
            low, high = bootstrap_margin(y, ours, ref, seed=0, resamples=500)
            margins.append(margin)
            print(f"- seed {seed}: final {margin:+.3f} [{low:+.3f}, {high:+.3f}], pooled AUC {auc_margin:+.3f}")
        margins = np.array(margins)
        print(
            f"- mean over seeds: {margins.mean():+.3f} ± {margins.std(ddof=1):.3f} (sample sd); "
            f"above zero in {int((margins > 0).sum())} of {len(margins)} seeds"
        )

    # The official score thresholds at 0.5, so a model whose probabilities sit on the same side
    # of 0.5 for every patient scores like a constant: this separates what it read in the images
    # from where its outputs sit.
    print("\nWhat the images are worth: val final minus that of the row's own per-class mean given to every patient:\n")
    print("| row | image-blind final (mean ± sd) | image-blind kappa | final minus image-blind, per seed | mean |")
    print("|---|---:|---:|---|---:|")
    for name in names:
        blind, kappas, gains = [], [], []
        for seed, rows in results.items():
            p = np.load(sweep / f"s{seed}" / name / "val_probabilities.npy")
            score = odir_score(y, np.tile(p.mean(axis=0), (len(y), 1)))
            blind.append(score["final"])
            kappas.append(score["kappa"])
            gains.append(rows[name]["final"] - score["final"])
        blind, gains = np.array(blind), np.array(gains)
        print(
            f"| {name} | {blind.mean():.3f} ± {blind.std(ddof=1):.3f} | {np.mean(kappas):.3f} | "
            + ", ".join(f"{g:+.3f}" for g in gains)
            + f" | {gains.mean():+.3f} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/seeds96"))
