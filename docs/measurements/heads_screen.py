"""The heads on frozen features, screened: a wider C grid, how the two views are averaged, and a
small MLP, each cross-fitted like the recipe's logistic heads, on both benchmark splits.

On a prepared feature screen folder (its store holds every photo's features), per split seed:

- per view, the recipe's logistic heads cross-fitted over C in GRID (wider than training.heads.C_GRID)
  and the C chosen by out-of-fold pooled AUC, as train_pair chooses it; the out-of-fold AUC per C;
- the raw ensemble of the two views: probabilities averaged (the recipe), logits averaged, and the
  views weighted by their out-of-fold final (weights from the development patients only), each
  against the better single view on test (raw and calibrated out of fold);
- a small MLP per view (scikit-learn, one hidden layer, on the standardised fused features),
  cross-fitted over the same folds, averaged with the other view.

    PYTHONPATH=. python docs/measurements/heads_screen.py runs/ff --seeds 0 1 > runs/heads_screen.md
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

GRID = (0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01)


def logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--backbone", default="efficientnet_lite2")
    p.add_argument("--size", type=int, default=380)
    p.add_argument("--fusion", default="max_mean_diff")
    p.add_argument("--out", type=Path)
    p.add_argument("--no-mlp", action="store_true")
    args = p.parse_args()
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from fundus_ensemble.evaluation.calibration import fit_calibration
    from fundus_ensemble.evaluation.feature_screen import ScreenConfig, _Data, _Screen
    from fundus_ensemble.labels import VIEWS
    from fundus_ensemble.metrics import odir_score
    from fundus_ensemble.training.heads import cross_fit, fuse

    data = _Data(args.screen)
    results = {}
    for seed in args.seeds:
        began = time.perf_counter()
        screen = _Screen(data, ScreenConfig(seeds=(seed,), folds=5), seed)
        dev, test, y_dev, y_test = screen.dev, screen.test, screen.y_dev, screen.y_test
        fits, mlp = {}, {}
        for view in VIEWS:
            f = data.features(args.backbone, args.size, view)
            fits[view] = cross_fit(f[dev], y_dev, 5, GRID, args.fusion, seed)
            fits[view].test = fits[view].predict(f[test])
            if args.no_mlp:
                continue
            x_dev, x_test = fuse(f[dev], args.fusion), fuse(f[test], args.fusion)
            oof, tests = np.zeros(y_dev.shape), []
            for fold in range(5):
                held = fits[view].folds == fold
                scaler = StandardScaler().fit(x_dev[~held])
                net = MLPClassifier((256,), alpha=1.0, max_iter=200, early_stopping=True, random_state=seed)
                net.fit(scaler.transform(x_dev[~held]), y_dev[~held])
                oof[held] = net.predict_proba(scaler.transform(x_dev[held]))
                tests.append(net.predict_proba(scaler.transform(x_test)))
            mlp[view] = (oof, np.mean(tests, axis=0))
        r = {"C": {v: fits[v].c for v in VIEWS}, "oof_auc_by_C": {v: fits[v].scores for v in VIEWS}}

        def row(dev_p, test_p):
            calibration = fit_calibration(y_dev, dev_p)
            return {
                "raw": odir_score(y_test, test_p)["final"],
                "calibrated": odir_score(y_test, calibration.apply(test_p))["final"],
                "auc": odir_score(y_test, test_p)["auc"],
                "dev_calibrated": odir_score(y_dev, calibration.apply(dev_p))["final"],
            }

        dev_p = {v: fits[v].out_of_fold for v in VIEWS}
        test_p = {v: fits[v].test for v in VIEWS}
        rows = {f"{v} alone": row(dev_p[v], test_p[v]) for v in VIEWS}
        rows["probabilities averaged (the recipe)"] = row(
            np.mean(list(dev_p.values()), 0), np.mean(list(test_p.values()), 0)
        )
        sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
        rows["logits averaged"] = row(
            sig(np.mean([logit(a) for a in dev_p.values()], 0)), sig(np.mean([logit(a) for a in test_p.values()], 0))
        )
        finals = {v: odir_score(y_dev, dev_p[v])["final"] for v in VIEWS}
        w = {v: finals[v] / sum(finals.values()) for v in VIEWS}
        rows["weighted by out-of-fold final"] = row(
            sum(w[v] * dev_p[v] for v in VIEWS), sum(w[v] * test_p[v] for v in VIEWS)
        )
        if mlp:
            rows["MLP per view, averaged"] = row(
                np.mean([mlp[v][0] for v in VIEWS], 0), np.mean([mlp[v][1] for v in VIEWS], 0)
            )
        r["rows"] = rows
        r["seconds"] = round(time.perf_counter() - began, 1)
        results[seed] = r
        print(f"[heads] split {seed}: {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=float))
    seeds = list(results)
    print(
        f"Feature screen `{args.screen}`, {args.backbone} {args.size} px (pretrained, frozen), split seeds {seeds}.\n"
    )
    for seed in seeds:
        r = results[seed]
        print(
            f"Split {seed}: C chosen {r['C']}; out-of-fold pooled AUC by C: "
            + "; ".join(f"{v}: " + ", ".join(f"{c:g} {a:.4f}" for c, a in r["oof_auc_by_C"][v].items()) for v in r["C"])
        )
    print("\n| row | test raw final | test calibrated final | pooled AUC | development calibrated final |")
    print("|---|---|---|---|---|")
    for name in results[seeds[0]]["rows"]:
        cells = [
            " / ".join(f"{results[s]['rows'][name][k]:.3f}" for s in seeds)
            for k in ("raw", "calibrated", "auc", "dev_calibrated")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
