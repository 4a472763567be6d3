"""Train Lite2's last stage on cached activations, against features first, on both
benchmark splits (paired 95 % bootstrap intervals on each split's test patients).

On the feature screen folder of the recipe (``runs/ff``: prep-380 and a store with every
photo's pooled Lite2 features), ``--prepare`` adds the activations that enter the last stage
(``blocks_19_add``, 12 x 12 x 208 per photo) to the same store; then, per split seed and view:

- features first: the recipe's logistic heads (fusion max_mean, C chosen out of fold over the
  recipe's grid, 5 folds), out of fold on development, their bag on test;
- top: :func:`fundus_ensemble.training.top.cross_fit_top`, the last stage + head convolution +
  patient head trained per fold (3 folds) from the features-first head of that fold's patients,
  out of fold on development and the fold models' mean on test;
- the two averaged (a model of each kind per view);
- with ``--mirrored``, the top trained on every photo and its mirror (the store's maps of the
  mirrored photos, ``--prepare --mirrored`` puts them there) instead of maps mirrored at random.

Every row is calibrated on its own out-of-fold predictions (as train_pair does), scored raw and
calibrated on test, with the referral score (1 - p(N)) at 90 % sensitivity out of fold.
Pretrained: ImageNet Lite2 from the PyPI wheel; nothing from scratch.

    PYTHONPATH=. python docs/measurements/top_finetune.py runs/ff --prepare
    PYTHONPATH=. python docs/measurements/top_finetune.py runs/ff --seeds 0 1 --out runs/top.json > runs/top.md
    PYTHONPATH=. python docs/measurements/top_finetune.py runs/ff --prepare --mirrored
    PYTHONPATH=. python docs/measurements/top_finetune.py runs/ff --prepare --stages 2
    PYTHONPATH=. python docs/measurements/top_finetune.py runs/ff --seeds 0 1 --epochs 1 --stages 2 \
        --out runs/top_two.json > runs/top_two.md
    PYTHONPATH=. python docs/measurements/top_finetune.py runs/ff --seeds 0 1 --epochs 1 --mirrored \
        --out runs/top_mirrored.json > runs/top_mirrored.md
"""

import argparse
import json
import time
from pathlib import Path

BACKBONE, SIZE = "efficientnet_lite2", 380


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path)
    p.add_argument("--prepare", action="store_true", help="only put the activations into the store")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument(
        "--stages", type=int, default=1, help="the last stages to train (1: from blocks_19_add; 2: blocks_14_add)"
    )
    p.add_argument("--mirrored", action="store_true", help="also the top trained on the mirrored photos' maps")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from fundus_ensemble.labels import VIEWS
    from fundus_ensemble.models.efficientnet_lite import last_stage_input

    cut = last_stage_input(BACKBONE, args.stages)
    if args.prepare:
        from fundus_ensemble.training.features import extract_features

        began = time.perf_counter()
        extract_features(
            args.screen / f"prep-{SIZE}",
            args.screen / "store",
            BACKBONE,
            "imagenet",
            SIZE,
            VIEWS,
            flips=(False, True) if args.mirrored else (False,),
            cut=cut,
        )
        print(f"activations of {cut} in {args.screen / 'store'}: {time.perf_counter() - began:.0f} s")
        return

    import keras

    from fundus_ensemble.errors import FundusError
    from fundus_ensemble.evaluation.feature_screen import (
        ScreenConfig,
        _Data,
        _Fit,
        _mean,
        _row,
        _Screen,
        referral_rates,
    )
    from fundus_ensemble.models.backbone import build_backbone, split_encoder
    from fundus_ensemble.training.features import FeatureSpec, FeatureStore, preprocessing_settings
    from fundus_ensemble.training.heads import C_GRID, cross_fit, patient_folds
    from fundus_ensemble.training.top import TopConfig, cross_fit_top

    data = _Data(args.screen)
    store = FeatureStore(args.screen / "store")
    spec = FeatureSpec(BACKBONE, "imagenet", SIZE, False, cut)
    mirrored_spec = FeatureSpec(BACKBONE, "imagenet", SIZE, True, cut)

    def missing():
        raise FundusError(f"the activations of {cut} are not in {store.root}; run with --prepare first")

    _, top = split_encoder(build_backbone(BACKBONE, SIZE, "imagenet"), cut)
    top_weights = top.get_weights()

    def make_top() -> keras.Model:
        fresh = keras.models.clone_model(top)
        fresh.set_weights(top_weights)
        return fresh

    results = {"cut": cut, "seconds": {}, "seeds": {}}
    for view in VIEWS:
        results["seconds"][f"activations {view}"] = store.seconds(spec, view)
        if args.mirrored:
            results["seconds"][f"mirrored activations {view}"] = store.seconds(mirrored_spec, view)
        results["seconds"][f"features {view}"] = store.seconds(FeatureSpec(BACKBONE, "imagenet", SIZE), view)
    for seed in args.seeds:
        screen = _Screen(data, ScreenConfig(seeds=(seed,), folds=5), seed)
        fits: dict[str, dict[str, _Fit]] = {"features first": {}, "top": {}}
        if args.mirrored:
            fits["top, mirrored photos"] = {}
        seconds = {}
        for view in VIEWS:
            pooled = data.features(BACKBONE, SIZE, view)
            began = time.perf_counter()
            heads = cross_fit(pooled[screen.dev], screen.y_dev, 5, C_GRID, "max_mean", seed)
            seconds[f"features first {view}"] = time.perf_counter() - began
            fits["features first"][view] = screen._fit(_Fit(heads.out_of_fold, heads.predict(pooled[screen.test])))

            def cached(which: FeatureSpec):
                return store.patient_features(
                    which,
                    view,
                    data.manifests[SIZE][view],
                    missing,
                    preprocessing=preprocessing_settings(args.screen / f"prep-{SIZE}" / view),
                    progress=False,
                )

            activations = cached(spec)
            config = TopConfig(epochs=args.epochs, learning_rate=args.learning_rate, folds=args.folds, c=heads.c)
            folds = patient_folds(int(screen.dev.sum()), config.folds, seed, screen.y_dev)
            kinds = {"top": None, **({"top, mirrored photos": mirrored_spec} if args.mirrored else {})}
            for kind, mirror in kinds.items():
                fit = cross_fit_top(
                    make_top,
                    activations[screen.dev],
                    pooled[screen.dev],
                    screen.y_dev,
                    folds,
                    config,
                    seed,
                    activations[screen.test],
                    mirrored=None if mirror is None else cached(mirror)[screen.dev],
                )
                seconds[f"{kind} {view}"] = fit.seconds
                fits[kind][view] = screen._fit(_Fit(fit.out_of_fold, fit.test))
                print(f"[seed {seed}] {view}: C {heads.c}, {kind} {fit.seconds:.0f} s", flush=True)
            del activations
        rows = []
        baseline = _mean(list(fits["features first"].values()), screen.y_dev)
        candidates = {
            **{f"features first {v}": fits["features first"][v] for v in VIEWS},
            **{f"top {v}": fits["top"][v] for v in VIEWS},
            "features first ensemble": baseline,
            "top ensemble": _mean(list(fits["top"].values()), screen.y_dev),
            "top + features first": _mean(
                [fits[k][v] for k in ("features first", "top") for v in VIEWS],
                screen.y_dev,
            ),
        }
        if args.mirrored:
            candidates["top, mirrored photos, ensemble"] = _mean(
                list(fits["top, mirrored photos"].values()), screen.y_dev
            )
        for name, fit in candidates.items():
            reference = None if name.startswith("features first") else baseline
            row = _row(name, "", screen, fit, reference)
            row["referral"] = referral_rates(fit, screen.y_dev, screen.y_test)
            rows.append(row)
        results["seeds"][str(seed)] = {"rows": rows, "seconds": seconds, "test_patients": int(screen.test.sum())}
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    lines = [
        f"Activations cached at `{results['cut']}`; seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items() if v is not None),
        "",
    ]
    for seed, r in results["seeds"].items():
        lines += [
            f"### split seed {seed} ({r['test_patients']} test patients)",
            "",
            "| model | raw final | calibrated final | AUC | AUC N | AUC D | referral spec at OOF 90 % sens (test sens) "
            "| calibrated margin vs features first [95 %] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            t, c = row["test"], row["test_calibrated"]
            margin = row.get("margin_calibrated")
            interval = row.get("interval_calibrated")
            lines.append(
                f"| {row['name']} | {t['final']:.3f} | {c['final']:.3f} | {t['auc']:.3f} | "
                f"{t['per_class_auc']['N']:.3f} | {t['per_class_auc']['D']:.3f} | "
                f"{row['referral']['test_specificity']:.1%} ({row['referral']['test_sensitivity']:.1%}) | "
                + (f"{margin:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]" if margin is not None else "")
                + " |"
            )
        lines += ["", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
