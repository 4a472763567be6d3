"""The camera-shift protocol: a trained pair on its benchmark's held-out test patients, each photo
shifted the way another clinic's camera would shift it; per shift, pooled and per-class AUC and
per-class sensitivity at the run's own thresholds, against the unshifted photos. Then the site
calibration curve: thresholds fitted on 20, 50 and 100 labelled patients of a shifted site
(evaluation.partial.fit_site_calibration), sensitivity measured on the other patients.

    PYTHONPATH=. python docs/measurements/camera_shift.py runs/bench-xfit-s0 --image-root $DATA \
        --out runs/shift-s0 > docs/measurements/camera_shift.md

Photos go through predict's own path (scripts/predict.py: crop, views, the run's calibration) with
the gradability gate off: this measures the model, not the gate. Nothing is fitted on these
patients except in the site-calibration curve, where each draw's labelled sample is held apart
from the patients its sensitivity is counted on.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from fundus_ensemble.cli import import_keras
from fundus_ensemble.data.acquisition import SHIFTS


def test_patients(bench: Path) -> list[dict]:
    with open(bench / "manifest.csv", newline="") as handle:
        return [r for r in csv.DictReader(handle) if r["split"] == "test"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", type=Path, help="a finished scripts/benchmark.py folder (its models/ and manifest.csv)")
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--draws", type=int, default=30, help="random labelled samples per sample size")
    p.add_argument(
        "--computed-only", action="store_true", help="tabulate the shifts already predicted in --out, compute none"
    )
    args = p.parse_args()
    import_keras()
    from fundus_ensemble.evaluation.calibration import load_calibration_file, raw_thresholds, run_calibration
    from fundus_ensemble.evaluation.partial import fit_site_calibration
    from fundus_ensemble.inference.predict import PatientPhotos, predict_photos
    from fundus_ensemble.labels import LABELS

    run = args.bench / "models"
    calibration = run_calibration(run)
    fitted, _ = load_calibration_file(calibration)
    thresholds = np.array(raw_thresholds(fitted))
    patients = test_patients(args.bench)
    y = np.array([[int(r[c]) for c in LABELS] for r in patients])
    results = {}
    for name, shift in SHIFTS.items():
        folder = args.out / f"shift-{list(SHIFTS).index(name):02d}"
        done = folder / "raw.npy"
        if not done.is_file() and args.computed_only:
            continue
        if not done.is_file():
            photos = []
            for r in patients:
                eyes = {}
                for eye in ("left", "right"):
                    if not r[f"{eye}_image"]:
                        continue  # one-eyed patients (low-quality photos left out of the release)
                    target = folder / "photos" / f"{r['patient_id']}_{eye}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(target), shift(cv2.imread(str(args.image_root / r[f"{eye}_image"]))))
                    eyes[eye] = target
                photos.append(PatientPhotos(r["patient_id"], eyes.get("left"), eyes.get("right")))
            predict_photos(run, photos, folder / "predicted", force=True, progress=False, calibration=None, gate=False)
            with open(folder / "predicted" / "predictions.csv", newline="") as handle:
                by_id = {row["ID"]: [float(row[c]) for c in LABELS] for row in csv.DictReader(handle)}
            # a patient predict rejected (no usable eye after the shift) is a NaN row, counted below
            missing = [np.nan] * len(LABELS)
            np.save(done, np.array([by_id.get(r["patient_id"], missing) for r in patients]))
        all_raw = np.load(done)
        kept = ~np.isnan(all_raw).any(axis=1)
        raw, yk = all_raw[kept], y[kept]
        decided = raw > thresholds
        present = [j for j in range(len(LABELS)) if 0 < yk[:, j].sum() < len(yk)]
        results[name] = {
            "rejected": int((~kept).sum()),
            "auc": float(roc_auc_score(yk.ravel(), raw.ravel())),
            "class_auc": {LABELS[j]: float(roc_auc_score(yk[:, j], raw[:, j])) for j in present},
            "sensitivity": {LABELS[j]: float(decided[yk[:, j] == 1, j].mean()) for j in present},
            "specificity": {LABELS[j]: float((~decided[yk[:, j] == 0, j]).mean()) for j in present},
        }
        print(
            f"[shift] {name}: pooled AUC {results[name]['auc']:.3f} ({results[name]['rejected']} patients rejected)",
            file=sys.stderr,
            flush=True,
        )

    base = results["none"]
    print(f"Run `{run}` (calibrated thresholds of `{calibration.name}`), {len(patients)} test patients, gate off.\n")
    print(
        "| shift | pooled AUC (change) | worst class AUC change | sensitivity change, worst class | "
        + " | ".join(f"sens {c}" for c in base["sensitivity"])
        + " | meets both targets |"
    )
    print("|---|---|---|---|" + "---|" * len(base["sensitivity"]) + "---|")
    for name, r in results.items():
        d_auc = r["auc"] - base["auc"]
        auc_drop = {c: r["class_auc"][c] - base["class_auc"][c] for c in base["class_auc"]}
        sens = {c: r["sensitivity"][c] - base["sensitivity"][c] for c in base["sensitivity"]}
        worst_auc, worst_sens = min(auc_drop, key=auc_drop.get), max(sens, key=lambda c: abs(sens[c]))
        ok = d_auc >= -0.02 and all(abs(v) <= 0.05 for v in sens.values())
        print(
            f"| {name} | {r['auc']:.3f} ({d_auc:+.3f}) | {worst_auc} {auc_drop[worst_auc]:+.3f} | "
            f"{worst_sens} {100 * sens[worst_sens]:+.0f} pts | "
            + " | ".join(f"{100 * r['sensitivity'][c]:.0f}%" for c in base["sensitivity"])
            + f" | {'yes' if ok else 'no'} |"
        )

    # the site-calibration curve on the shift that moved sensitivity most
    def spread(r):
        return max(abs(r["sensitivity"][c] - base["sensitivity"][c]) for c in base["sensitivity"])

    worst = max((n for n in results if n != "none"), key=lambda n: spread(results[n]))
    raw = np.load(args.out / f"shift-{list(SHIFTS).index(worst):02d}" / "raw.npy")
    usable = ~np.isnan(raw).any(axis=1)
    raw, y = raw[usable], y[usable]
    rng = np.random.default_rng(0)
    print(
        f"\nSite calibration on '{worst}' (the shift that moved a class's sensitivity most): per draw, "
        f"thresholds fitted on N labelled patients of the shifted site (fit_site_calibration, classes with "
        f"fewer than 5 positives keep the run's), sensitivity / specificity counted on the other "
        f"{len(patients)} - N; mean over {args.draws} draws.\n"
    )
    classes = list(base["sensitivity"])
    print(
        "| labelled patients | " + " | ".join(f"sens {c}" for c in classes) + " | mean spec | classes refitted (mean) |"
    )
    print("|---|" + "---|" * len(classes) + "---|---|")
    decided = raw > thresholds
    print(
        "| 0 (the run's thresholds) | "
        + " | ".join(f"{100 * decided[y[:, LABELS.index(c)] == 1, LABELS.index(c)].mean():.0f}%" for c in classes)
        + f" | {100 * np.mean([(~decided[y[:, j] == 0, j]).mean() for j in range(len(LABELS))]):.0f}% | 0 |"
    )
    curve = {}
    for n in (20, 50, 100):
        sens, spec, refit = {c: [] for c in classes}, [], []
        for _ in range(args.draws):
            order = rng.permutation(len(y))
            sample, rest = order[:n], order[n:]
            site, report = fit_site_calibration(y[sample].astype(float), raw[sample], fitted)
            refit.append(sum(v["source"] == "site" for v in report.values()))
            t = np.array(raw_thresholds(site))
            d = raw[rest] > t
            for c in classes:
                j = LABELS.index(c)
                if y[rest, j].sum():
                    sens[c].append(d[y[rest, j] == 1, j].mean())
            spec.append(np.mean([(~d[y[rest, j] == 0, j]).mean() for j in range(len(LABELS))]))
        curve[n] = {"sensitivity": {c: float(np.mean(v)) for c, v in sens.items()}, "specificity": float(np.mean(spec))}
        print(
            f"| {n} | "
            + " | ".join(f"{100 * np.mean(sens[c]):.0f}%" for c in classes)
            + f" | {100 * np.mean(spec):.0f}% | {np.mean(refit):.1f} |"
        )
    (args.out / "camera_shift.json").write_text(
        json.dumps(
            {"shifts": results, "site_curve": {"shift": worst, **{str(k): v for k, v in curve.items()}}}, indent=1
        )
    )


if __name__ == "__main__":
    main()
