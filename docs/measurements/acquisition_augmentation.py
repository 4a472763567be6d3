"""Acquisition augmentation against the camera-shift protocol, before and after, on one benchmark split.

For the development (train + val) patients of a finished features-first benchmark, COPIES more
photos of each eye are made as other cameras might take them
(fundus_ensemble.data.acquisition.random_acquisition), cropped and turned into both views by the
preprocessing every run uses, and passed through the frozen backbone into a feature store. Then,
per view, the benchmark's heads are cross-fitted twice over the same patient folds: on the
unshifted photos only (before) and on those plus the copies (after,
training.heads.cross_fit(augmented=...)); each pair of views is averaged and calibrated on its
out-of-fold predictions, as train_pair does. Both are scored on the test patients' photos under
every shift of the protocol (data.acquisition.SHIFTS): pooled and per-class AUC, and sensitivity
at their own calibrated thresholds, against their own unshifted scores.

    PYTHONPATH=. python docs/measurements/acquisition_augmentation.py runs/bench380-s0 \
        --image-root $DATA --out runs/acq380-s0 --feature-store runs/ff/store > docs/measurements/acquisition.md

The random shifts' ranges cover every shift of the protocol (data.acquisition.ACQUISITION_RANGES),
so this measures robustness to the shifts a head has seen examples of; a new camera may differ.
Test patients take no part in any fit.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from fundus_ensemble.cli import import_keras
from fundus_ensemble.data.acquisition import SHIFTS, acquisition_rng, random_acquisition


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", type=Path, help="a finished features-first scripts/benchmark.py folder")
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="shifted photos, their views and the results")
    p.add_argument("--feature-store", type=Path, help="default: the benchmark's own, beside its views")
    p.add_argument("--copies", type=int, default=1, help="shifted copies of each development photo")
    p.add_argument(
        "--shifts",
        nargs="+",
        type=int,
        help="only these shifts, by their index in data.acquisition.SHIFTS (0: none, always scored)",
    )
    args = p.parse_args()
    import_keras()
    from fundus_ensemble.data.acquisition import shifted_copies
    from fundus_ensemble.data.manifest import load_manifest, write_manifest
    from fundus_ensemble.data.preprocess import preprocess_manifest
    from fundus_ensemble.evaluation.calibration import fit_calibration, raw_thresholds
    from fundus_ensemble.labels import LABELS, VIEWS
    from fundus_ensemble.metrics import odir_score
    from fundus_ensemble.models import build_backbone
    from fundus_ensemble.training.features import FeatureSpec, FeatureStore, default_store, preprocessing_settings
    from fundus_ensemble.training.heads import cross_fit

    card = json.loads((args.bench / "models" / "color" / "card.json").read_text())
    backbone, size, seed = card["backbone"], int(card["input_size"]), int(card["config"]["seed"])
    folds, fusion = int(card["config"]["folds"]), card["config"].get("head_fusion", "max_mean")
    store = FeatureStore(args.feature_store or default_store(args.bench / "prep" / "color"))
    spec = FeatureSpec(backbone, "imagenet", size, False)
    encoder_cache = {}

    def encoder():
        if "model" not in encoder_cache:
            encoder_cache["model"] = build_backbone(backbone, size, "imagenet")
        return encoder_cache["model"]

    manifest = load_manifest(args.bench / "manifest.csv", image_root=args.image_root)
    dev = [q for q in manifest.patients if q.split != "test"]
    test = [q for q in manifest.patients if q.split == "test"]
    y_dev = np.array([q.labels for q in dev])
    y_test = np.array([q.labels for q in test])
    seconds = {}

    def features(patients, folder: Path, transform) -> dict[str, dict[str, np.ndarray]]:
        """view -> patient id -> (2, F): the patients' photos through ``transform(photo, name)``,
        cropped and made into views as every run does; patients preprocessing refused are absent."""
        began = time.perf_counter()
        write_manifest(shifted_copies(patients, args.image_root, folder, transform), folder / "manifest.csv")
        shifted = load_manifest(folder / "manifest.csv", image_root=folder)
        preprocess_manifest(shifted, folder / "prep", size, progress=False)
        out = {}
        for view in VIEWS:
            views = load_manifest(folder / "prep" / view / "manifest.csv")
            f = store.patient_features(
                spec,
                view,
                views,
                encoder,
                preprocessing=preprocessing_settings(folder / "prep" / view),
                progress=False,
            )
            out[view] = {q.patient_id: f[i] for i, q in enumerate(views.patients)}
        seconds[folder.name] = time.perf_counter() - began
        print(f"[acquisition] {folder.name}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        return out

    clean = features(dev, args.out / "dev-clean", lambda a, name: a)
    copies = [
        features(
            dev,
            args.out / f"dev-copy-{k}",
            lambda a, name, k=k: random_acquisition(a, acquisition_rng(seed, k, name)),
        )
        for k in range(args.copies)
    ]

    def stack(by_id, patients, fallback=None):
        return np.stack(
            [by_id.get(q.patient_id, None if fallback is None else fallback[q.patient_id]) for q in patients]
        )

    models, finals, calibrations = {}, {}, {}
    for name, augmented in (("before", False), ("after", True)):
        began = time.perf_counter()
        fits = {}
        for view in VIEWS:
            x = stack(clean[view], dev)
            extra = tuple(stack(c[view], dev, clean[view]) for c in copies) if augmented else ()
            fits[view] = cross_fit(x, y_dev, folds, fusion=fusion, seed=seed, augmented=extra)
        oof = np.mean([f.out_of_fold for f in fits.values()], axis=0)
        calibration = fit_calibration(y_dev, oof)
        models[name] = (fits, np.array(raw_thresholds(calibration)))
        finals[name] = {"development out of fold, calibrated": odir_score(y_dev, calibration.apply(oof))["final"]}
        calibrations[name] = calibration
        seconds[f"heads {name}"] = time.perf_counter() - began
        print(f"[acquisition] heads {name}: {seconds[f'heads {name}']:.0f} s", file=sys.stderr, flush=True)

    results = {name: {} for name in models}
    chosen = [n for i, n in enumerate(SHIFTS) if args.shifts is None or i == 0 or i in args.shifts]
    for index, (shift_name, shift) in enumerate(SHIFTS.items()):
        if shift_name not in chosen:
            continue
        shifted = features(test, args.out / f"test-shift-{index:02d}", lambda a, name, s=shift: s(a))
        kept = [j for j, q in enumerate(test) if all(q.patient_id in shifted[v] for v in VIEWS)]
        yk = y_test[kept]
        for name, (fits, thresholds) in models.items():
            raw = np.mean([fits[v].predict(stack(shifted[v], [test[j] for j in kept])) for v in VIEWS], axis=0)
            decided = raw > thresholds
            if shift_name == "none":
                finals[name]["test, raw"] = odir_score(yk, raw)["final"]
                finals[name]["test, calibrated"] = odir_score(yk, calibrations[name].apply(raw))["final"]
            present = [j for j in range(len(LABELS)) if 0 < yk[:, j].sum() < len(yk)]
            results[name][shift_name] = {
                "rejected": len(test) - len(kept),
                "auc": float(roc_auc_score(yk.ravel(), raw.ravel())),
                "class_auc": {LABELS[j]: float(roc_auc_score(yk[:, j], raw[:, j])) for j in present},
                "sensitivity": {LABELS[j]: float(decided[yk[:, j] == 1, j].mean()) for j in present},
            }
    (args.out / "acquisition.json").write_text(
        json.dumps({"results": results, "finals": finals, "seconds": seconds}, indent=1)
    )

    print(
        f"Benchmark `{args.bench}` ({backbone}, {size} px, fusion {fusion}, split seed {seed}): heads cross-fitted over its "
        f"{len(dev)} development patients, before on their photos only, after with {args.copies} randomly "
        f"shifted cop{'y' if args.copies == 1 else 'ies'} of each photo as well; scored on its {len(test)} test "
        "patients under each shift, each against its own unshifted scores.\n"
    )
    print(
        "| shift | pooled AUC before (change) | after (change) | worst class AUC change before / after | "
        "largest sensitivity change before / after | meets both targets before / after |"
    )
    print("|---|---|---|---|---|---|")
    for shift_name in chosen:
        cells = {}
        for name in models:
            base, r = results[name]["none"], results[name][shift_name]
            auc_drop = {c: r["class_auc"][c] - base["class_auc"][c] for c in base["class_auc"] if c in r["class_auc"]}
            sens = {
                c: r["sensitivity"][c] - base["sensitivity"][c] for c in base["sensitivity"] if c in r["sensitivity"]
            }
            worst_auc, worst_sens = min(auc_drop, key=auc_drop.get), max(sens, key=lambda c: abs(sens[c]))
            ok = r["auc"] - base["auc"] >= -0.02 and all(abs(v) <= 0.05 for v in sens.values())
            cells[name] = (
                f"{r['auc']:.3f} ({r['auc'] - base['auc']:+.3f})",
                f"{worst_auc} {auc_drop[worst_auc]:+.3f}",
                f"{worst_sens} {100 * sens[worst_sens]:+.0f} pts",
                "yes" if ok else "no",
            )
        b, a = cells["before"], cells["after"]
        print(f"| {shift_name} | {b[0]} | {a[0]} | {b[1]} / {a[1]} | {b[2]} / {a[2]} | {b[3]} / {a[3]} |")
    print(
        "\nSensitivity at the calibrated thresholds on the unshifted test photos, before / after: "
        + ", ".join(
            f"{c} {100 * results['before']['none']['sensitivity'][c]:.0f}% / "
            f"{100 * results['after']['none']['sensitivity'][c]:.0f}%"
            for c in results["before"]["none"]["sensitivity"]
        )
    )
    print(
        "\nODIR final on the unshifted photos, before / after: "
        + ", ".join(f"{k} {finals['before'][k]:.3f} / {finals['after'][k]:.3f}" for k in finals["before"])
    )
    print("\nSeconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
