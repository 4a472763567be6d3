"""Screening levers: train one view at one cheap budget, changing one thing per row.

Every row trains on the same preprocessed views, split and seed, and is scored on the
``val`` split with the official metric and per-class AUC, so rows differ by their lever
alone. Each row keeps its folder and ``result.json``: a second call skips finished rows
and redoes an interrupted one, and ``levers.md`` / ``levers.json`` gather what is done.
The checkpoint of each library row is chosen on val (as train_pair does), which flatters
every row by the same selection; the plain baseline keeps its best val loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.manifest import load_manifest
from ..errors import FundusError
from ..fileio import atomic_write_json, atomic_write_text, claim_folder
from ..labels import LABELS
from ..metrics import bootstrap_margin, odir_score, per_class_scores
from .config import TrainConfig

RESULT = "result.json"
PROBABILITIES = "val_probabilities.npy"  # kept so rows can be compared patient by patient
BOOTSTRAP = 500


@dataclass(frozen=True)
class Lever:
    """One row: what changes against the library's defaults, as TrainConfig fields."""

    what: str
    changes: dict = field(default_factory=dict)
    plain: bool = False  # the plain per-eye model (training.baseline) instead of the patient model


LEVERS: dict[str, Lever] = {
    "library": Lever(
        "library defaults: patient fusion, weighted BCE (power 0.5), +-30 deg rotation, plateau + fine-tune lr x0.1"
    ),
    "plain": Lever("plain per-eye model: one B3 per eye, plain BCE, flips only, eyes averaged", plain=True),
    "no_rotation": Lever("no rotation (flips kept)", {"rotation": 0.0}),
    "plain_bce": Lever("unweighted BCE (pos-weight power 0)", {"pos_weight_power": 0.0}),
    "no_cut": Lever("no fine-tune phase: all epochs at lr 1e-3", {"fine_tune_epochs": 0}),
    "cosine": Lever("cosine decay over all epochs instead of plateau + fine-tune cut", {"schedule": "cosine"}),
    "cosine_warmup": Lever("cosine with 1 warm-up epoch", {"schedule": "cosine", "warmup_epochs": 1}),
    "prior_bias": Lever("output bias at the training prior's log-odds", {"output_bias": "prior"}),
    "asymmetric": Lever("asymmetric loss (gamma- 4, margin 0.05) instead of weighted BCE", {"loss": "asymmetric"}),
    "eye_head": Lever("auxiliary per-eye head on the keywords' eye labels (weight 0.5)", {"eye_head_weight": 0.5}),
    "no_bn_recal": Lever("no BatchNorm recalibration", {"bn_recalibration_patients": 0}),
    "batch_32": Lever("batch 32 patients", {"batch_size": 32}),
    "lr_3e-4": Lever("learning rate 3e-4", {"learning_rate": 3e-4}),
}


def lever_config(base: TrainConfig, name: str) -> TrainConfig:
    """``base`` with row ``name``'s change; the row's whole budget stays the base's."""
    if name not in LEVERS:
        raise FundusError(f"unknown lever {name!r}; choose from {', '.join(LEVERS)}")
    changes = dict(LEVERS[name].changes)
    if changes.get("fine_tune_epochs") == 0:  # the same number of epochs, all in phase 1
        changes["epochs"] = base.epochs + base.fine_tune_epochs
    return dataclasses.replace(base, **changes).check()


def run_row(prep_dir: Path, out_dir: Path, base: TrainConfig, name: str, view: str = "color") -> dict:
    """Train and score one row (or read its finished result)."""
    import keras  # here, so that the row list (and levers.py --help) loads without Keras

    from ..data.batches import predict_eye_average, predict_patients
    from .baseline import train_plain_baseline
    from .train import MODEL_NAME, train_view

    folder = out_dir / name
    config = lever_config(base, name)
    lever = LEVERS[name]
    val = load_manifest(prep_dir / view / "manifest.csv").select("val")

    def predict(model) -> np.ndarray:
        if lever.plain:
            return predict_eye_average(model, val, config.size)
        return predict_patients(model, val, config.size, config.batch_size)

    if (folder / RESULT).is_file():
        if not (folder / PROBABILITIES).is_file():  # a row finished before probabilities were kept
            np.save(folder / PROBABILITIES, predict(keras.saving.load_model(str(folder / MODEL_NAME), compile=False)))
        return json.loads((folder / RESULT).read_text())
    start = time.perf_counter()
    if lever.plain:
        if folder.exists():  # the plain model cannot resume: start the row over
            shutil.rmtree(folder)
        plain = dataclasses.replace(config, rotation=0.0, pos_weight_power=0.0)
        info = train_plain_baseline(prep_dir / view, folder, plain)
        train_s = time.perf_counter() - start
        images_per_s = info["epochs_run"] * info["train_images_per_epoch"] / train_s
        probs = predict(keras.saving.load_model(str(folder / MODEL_NAME), compile=False))
        best_epoch = info["best_epoch"]
    else:
        card = train_view(prep_dir / view, folder, config, view, resume=True)
        train_s, images_per_s = card["train_wall_s"], card["train_images_per_s"]
        probs = predict(keras.saving.load_model(str(folder / MODEL_NAME), compile=False))
        best_epoch = card["best_val"]["epoch"]
    y = val.label_matrix()
    score = odir_score(y, probs)
    classes = per_class_scores(y, probs)
    result = {
        "row": name,
        "what": lever.what,
        "view": view,
        "val_patients": len(val),
        **score,
        "auc_per_class": {c: classes[c]["auc"] for c in LABELS},
        "best_epoch": best_epoch,
        "train_s": round(float(train_s), 1),
        "train_images_per_s": round(float(images_per_s), 2) if images_per_s else None,
        "wall_s": round(time.perf_counter() - start, 1),
        "config": dataclasses.asdict(config),
    }
    np.save(folder / PROBABILITIES, probs)
    atomic_write_json(folder / RESULT, result)
    return result


def add_margins(
    results: list[dict],
    out_dir: Path,
    y_val: np.ndarray,
    reference: str = "library",
    seed: int = 0,
    resamples: int = BOOTSTRAP,
) -> None:
    """Each row's val final minus the reference row's, with the 95% paired bootstrap interval
    over val patients: a lever counts only when its interval lies above zero.

    Also each row's val final minus its own image-blind constant (its mean probability per
    class for every patient): the score thresholds at 0.5, so a lever that only moves outputs
    across 0.5 for everyone gains final without reading more from the images
    (docs/results-history.md, "Seed sweep")."""
    probs = {r["row"]: np.load(out_dir / r["row"] / PROBABILITIES) for r in results}
    finals = {name: odir_score(y_val, p)["final"] for name, p in probs.items()}
    for r in results:
        constant = np.tile(probs[r["row"]].mean(axis=0), (len(y_val), 1))
        r["vs_constant"] = float(finals[r["row"]] - odir_score(y_val, constant)["final"])
        if reference in probs and r["row"] != reference:
            r["margin"] = float(finals[r["row"]] - finals[reference])
            r["margin_interval"] = bootstrap_margin(y_val, probs[r["row"]], probs[reference], seed, resamples)


def run_levers(
    prep_dir: str | os.PathLike, out_dir: str | os.PathLike, base: TrainConfig, rows: list[str], view: str = "color"
) -> list[dict]:
    """Run ``rows`` in order (skipping finished ones); writes levers.json and levers.md after each."""
    prep, out = Path(prep_dir), Path(out_dir)
    for name in rows:
        lever_config(base, name)  # refuse a bad row list before hours of training
    claim_folder(out, "a lever screen", adopt_if=("levers.json",))
    y_val = load_manifest(prep / view / "manifest.csv").select("val").label_matrix()
    results = []
    for name in rows:
        print(f"[levers] row {name}: {LEVERS[name].what}", flush=True)
        results.append(run_row(prep, out, base, name, view))
        add_margins(results, out, y_val, seed=base.seed)
        atomic_write_json(out / "levers.json", {"base": dataclasses.asdict(base), "rows": results})
        atomic_write_text(out / "levers.md", format_levers(results, base))
    return results


def format_levers(results: list[dict], base: TrainConfig) -> str:
    head = (
        "| row | what changed | val final | vs library (95% interval) | vs own constant | kappa | F1 | AUC | "
        + " | ".join(f"AUC {c}" for c in LABELS)
        + " | best epoch | train img/s | wall s |"
    )
    lines = [
        f"{base.backbone} at {base.size} px, {base.epochs} + {base.fine_tune_epochs} epochs, batch {base.batch_size}, "
        f"seed {base.seed}, one view; scored on val.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in results:
        aucs = " | ".join("n/a" if r["auc_per_class"][c] is None else f"{r['auc_per_class'][c]:.2f}" for c in LABELS)
        lines.append(
            f"| {r['row']} | {r['what']} | **{r['final']:.3f}** | {_margin(r)} | {_vs_constant(r)} | {r['kappa']:.3f} | {r['f1']:.3f} | {r['auc']:.3f} | {aucs} | "
            f"{r['best_epoch']} | {r['train_images_per_s'] if r['train_images_per_s'] is not None else 'n/a'} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _vs_constant(row: dict) -> str:
    return f"{row['vs_constant']:+.3f}" if "vs_constant" in row else "n/a"


def _margin(row: dict) -> str:
    if "margin" not in row:
        return "-"
    interval = row.get("margin_interval")
    span = f" [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""
    return f"{row['margin']:+.3f}{span}"
