"""The embedded demo: synthetic patients committed under data/demo, and the whole pipeline on them.

The demo data is described by the repository's top-level ``data_manifest.csv``; a test
checks that :func:`write_demo` reproduces it. The demo run is the recommended recipe (frozen
pretrained features, cross-fitted heads), so it finishes in about a minute on two CPU cores;
its scores show the plumbing works, not what the method reaches on real photographs, and it
ends with one line saying whether the run is healthy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .labels import SPLITS, VIEWS


@dataclass(frozen=True)
class DemoData:
    patients: int = 80
    seed: int = 2019
    diameter: int = 200
    image_dir: str = "data/demo/images"
    manifest: str = "data_manifest.csv"
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)


DEMO = DemoData()


def write_demo(root: str | os.PathLike = ".") -> Path:
    """(Re)write the demo images and ``data_manifest.csv`` under ``root``."""
    from .data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        root,
        DEMO.patients,
        DEMO.seed,
        DEMO.diameter,
        DEMO.image_dir,
        DEMO.manifest,
        dict(zip(SPLITS, DEMO.fractions)),
    )


def demo_train_config():
    """The recommended CPU recipe (the README's step 3, the benchmark's default budget) on the demo:
    pretrained EfficientNet-Lite2 at 380 px, frozen, logistic heads cross-fitted over the train and
    val patients. About a minute on 2 CPU cores for the 80 demo patients."""
    from .evaluation.benchmark import BUDGETS, DEFAULT_BUDGET

    return BUDGETS[DEFAULT_BUDGET].train_config("imagenet", seed=0)


def health(report: dict) -> tuple[bool, str]:
    """One line a newcomer can check on any machine (exact numbers vary with the processor): each
    model's pooled AUC and final above the image-blind class prior's, fitted on the training split."""
    prior = report["trivial"]["class prior (train)"]
    models = {**{f"{v} model": s for v, s in report["models"].items()}, "ensemble": report["ensemble"]}
    behind = [name for name, s in models.items() if not (s["auc"] > prior["auc"] and s["final"] > prior["final"])]
    if behind:
        return False, (
            f"NOT healthy: {', '.join(behind)} did not beat the image-blind class prior (AUC {prior['auc']:.3f}, "
            f"final {prior['final']:.3f}); something in this installation is wrong"
        )
    low = min(models.items(), key=lambda item: item[1]["auc"])
    return True, (
        f"healthy: every model is above the image-blind class prior in pooled AUC (lowest {low[0]} "
        f"{low[1]['auc']:.3f} against {prior['auc']:.3f}) and in final"
    )


BUNDLED_SHOWN = 3  # demo test patients the bundled model answers for


def show_bundled_model(manifest, out: Path, patients: int = BUNDLED_SHOWN) -> Path | None:
    """The model that ships with the package (trained on real ODIR patients) answers for a few demo
    patients, through predict's own code path; prints each patient's referral line and decisions.
    The demo's photos are synthetic: this shows the model runs after install, not how well it reads."""
    import csv

    from .inference.bundle import PACKAGED, resolve_run
    from .inference.predict import PatientPhotos, predict_photos

    if not (PACKAGED / "bundle.json").is_file():
        print("bundled model: none in this checkout (scripts/release_model.py builds it); skipped")
        return None
    run = resolve_run("bundled")
    from .evaluation.calibration import run_calibration

    chosen = [p for p in manifest.patients if p.split == "test"][:patients]
    photos = [
        PatientPhotos(p.patient_id, manifest.image_root / p.left_image, manifest.image_root / p.right_image)
        for p in chosen
    ]
    # the gate off: its retina head refuses 128 of the 160 synthetic photos (painted, not photographed) and its
    # ImageNet check 23 more (measured 2026-12-06), and a refused photo would show the gate, not the model
    summary = predict_photos(run, photos, out, force=True, progress=False, calibration=run_calibration(run), gate=False)
    print(
        f"the bundled model (checked against its bundle.json; see scripts/predict.py --model-card) on "
        f"{len(photos)} demo patients, the gradability gate off (synthetic photos are no retinas to it), "
        f"{summary['seconds']:.1f} s:"
    )
    with open(out / "worklist.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        print(f"  {row['patient_id']}: {row['referral']} (decided: {row['classes_decided'] or 'none'})")
    print(
        f"  wrote {out}/worklist.csv (one row per patient) and decisions.csv; any folder of photos: "
        "python scripts/predict.py PHOTOS --out OUT"
    )
    return out


def run_demo(root: str | os.PathLike = ".", out: str | os.PathLike = "runs/demo", split: str = "test") -> dict:
    """Preprocess, train both view models and score the ensemble on the demo data, then say in one
    line whether the run is healthy (:func:`health`)."""
    from .data.manifest import load_manifest
    from .data.preprocess import preprocess_manifest
    from .evaluation.calibration import write_out_of_fold_calibration
    from .evaluation.ensemble import OUT_OF_FOLD, format_score_table, score_run
    from .training.train import train_pair

    out = Path(out)
    config = demo_train_config()
    start = time.perf_counter()
    manifest = load_manifest(Path(root) / DEMO.manifest)
    print(
        f"demo: {len(manifest)} synthetic patients; {config.backbone} ({config.weights}) at {config.size} px, "
        f"{config.folds} cross-fitted heads per view",
        flush=True,
    )
    print(preprocess_manifest(manifest, out / "prep", size=config.size).describe(), flush=True)
    train_pair(out / "prep", out / "models", config, force=True)
    write_out_of_fold_calibration(out / "models", VIEWS)
    report = score_run(out / "models", out / "prep", split, force=True, calibrate_on=OUT_OF_FOLD)
    print(format_score_table(report))
    ok, line = health(report)
    print(line)
    show_bundled_model(manifest, out / "bundled")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; outputs under {out}")
    report["healthy"] = ok
    return report
