"""Train one patient model per view, the paper's way, and save it with its card.

Two phases, both on the ``train`` split, both validated on ``val`` each epoch:

1. **train** (``epochs``, Adam at ``learning_rate``): with pretrained weights the backbone is
   frozen and only the fusion head learns (the backbone's features are already useful and
   a fresh head's large gradients would wreck them); from scratch every layer learns.
2. **fine-tune** (``fine_tune_epochs``): starting from phase 1's best checkpoint, every layer
   learns at ``learning_rate * fine_tune_lr_factor``.

Callbacks: ReduceLROnPlateau on ``val_final_score`` (factor 0.2, patience 4, min_delta 0.001,
mode max), EarlyStopping on ``val_loss`` (patience 5, per phase), ModelCheckpoint keeping the
weights with the best ``val_final_score`` across both phases, TerminateOnNaN, CSV history and
TensorBoard logs. Before anything evaluates or saves the model at an epoch's end, BatchNorm
statistics are recomputed with the current weights (:class:`.callbacks.RecalibrateBatchNorm`).
The saved model is the best checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from .. import __version__
from ..data.augment import DEFAULT_ROTATION, training_augmentation
from ..data.batches import PatientBatches
from ..data.manifest import load_manifest
from ..errors import FundusError
from ..fileio import atomic_write_json, atomic_write_text, claim_folder, remove_owned, sha256_file
from ..labels import LABELS, VIEWS
from ..models import build_patient_model
from ..models.losses import DEFAULT_POWER, WeightedBinaryCrossentropy, positive_weights
from .callbacks import RecalibrateBatchNorm, ValidationScore

CARD_NAME = "card.json"
MODEL_NAME = "model.keras"
BEST_WEIGHTS = "best.weights.h5"
HISTORY = "history.csv"
STATE = "state.json"
CARD_FORMAT = "fundus-ensemble model card 1"
RUN_FILES = ("run.json", CARD_NAME, HISTORY, STATE, "color", "gray_eq")  # what marks a run of this project


@dataclass
class TrainConfig:
    """Everything that decides a training run; the defaults are the paper's configuration."""

    backbone: str = "efficientnet_b3"
    size: int = 448
    weights: str | None = None  # "imagenet", None (from scratch) or a local weights file
    batch_size: int = 15
    epochs: int = 30
    fine_tune_epochs: int = 10
    learning_rate: float = 1e-3
    fine_tune_lr_factor: float = 0.1
    dropout: float = 0.5
    rotation: float = DEFAULT_ROTATION
    pos_weight_power: float = DEFAULT_POWER
    lr_factor: float = 0.2
    lr_patience: int = 4
    lr_min_delta: float = 0.001
    early_stopping_patience: int = 5
    bn_recalibration_patients: int = 128
    seed: int = 0
    cache_images: bool = True

    def check(self) -> "TrainConfig":
        for name in ("size", "batch_size"):
            if getattr(self, name) < 1:
                raise FundusError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epochs < 1 or self.fine_tune_epochs < 0:
            raise FundusError(f"need epochs >= 1 and fine_tune_epochs >= 0, got {self.epochs} and {self.fine_tune_epochs}")
        if not 0 <= self.dropout < 1:
            raise FundusError(f"dropout must lie in [0, 1), got {self.dropout}")
        return self


def library_versions() -> dict[str, str]:
    import albumentations
    import cv2
    import sklearn

    versions = {
        "fundus_ensemble": __version__, "keras": keras.__version__, "keras_backend": keras.backend.backend(),
        "numpy": np.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__,
        "albumentations": albumentations.__version__, "python": platform.python_version(),
    }
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    return versions


def _callbacks(out: Path, train: PatientBatches, val: PatientBatches, loss, config: TrainConfig, best: float | None, phase: str) -> list:
    return [
        RecalibrateBatchNorm(train, config.bn_recalibration_patients),  # before anything evaluates or saves
        ValidationScore(val, loss),  # before the callbacks that read what it adds
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(
            str(out / BEST_WEIGHTS), monitor="val_final_score", mode="max",
            save_best_only=True, save_weights_only=True, initial_value_threshold=best,
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_final_score", mode="max", factor=config.lr_factor,
            patience=config.lr_patience, min_delta=config.lr_min_delta, verbose=1,
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience, verbose=1),
        keras.callbacks.CSVLogger(str(out / HISTORY), append=True),
        # after the CSV row: a kill between the two repeats that row, which resuming drops
        keras.callbacks.BackupAndRestore(str(out / f"backup_{phase}"), double_checkpoint=True),
        keras.callbacks.TensorBoard(str(out / "tensorboard"), write_graph=False),
    ]


def check_finite_history(history: keras.callbacks.History) -> None:
    losses = history.history.get("loss", [])
    if any(not np.isfinite(v) for v in losses):
        raise FundusError(
            f"training diverged: non-finite loss at epoch {len(losses)} (TerminateOnNaN stopped it); "
            "no model was saved from this run. Try a lower --learning-rate."
        )


def _history_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _keep_history_before(path: Path, epoch: int) -> list[dict[str, str]]:
    """Drop history rows of epochs >= ``epoch`` (they are about to be run again)."""
    rows = _history_rows(path)
    kept = [r for r in rows if int(r["epoch"]) < epoch]
    if len(kept) != len(rows):
        out = io.StringIO()
        if kept:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
        atomic_write_text(path, out.getvalue())
    return kept


def _fit_phase(model, phase: str, out: Path, train: PatientBatches, val: PatientBatches, loss, config: TrainConfig, start: int, stop: int) -> int:
    """Run epochs [start, stop) of one phase, resuming from its backup if one exists; returns the end epoch."""
    metadata = out / f"backup_{phase}" / "training_metadata.json"
    first = json.loads(metadata.read_text())["epoch"] if metadata.is_file() else start
    if first > start:
        print(f"resuming phase {phase!r} at epoch {first + 1}", flush=True)
    kept = _keep_history_before(out / HISTORY, first)
    scores = [float(r["val_final_score"]) for r in kept if r.get("val_final_score")]
    best = max(scores) if scores and (out / BEST_WEIGHTS).is_file() else None
    # BackupAndRestore sets this on restore and Keras (3.15) never clears it: a later fit in
    # the same process would start at the restored epoch of an earlier phase.
    model._initial_epoch = None
    history = model.fit(
        train, initial_epoch=start, epochs=stop, callbacks=_callbacks(out, train, val, loss, config, best, phase),
        verbose=1 if sys.stdout.isatty() else 2,
    )
    check_finite_history(history)
    return first + len(history.history.get("loss", []))


def train_view(view_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig, view: str, resume: bool = False) -> dict:
    """Train the patient model of one view folder (from preprocessing); returns its card.

    With ``resume``, a finished view is kept as it is and an interrupted one continues from
    its last completed epoch (Keras BackupAndRestore, one backup per phase).
    """
    config.check()
    view_dir, out = Path(view_dir), Path(out_dir)
    if resume and (out / CARD_NAME).is_file() and (out / MODEL_NAME).is_file():
        print(f"[{view}] already trained: {out / MODEL_NAME}", flush=True)
        return json.loads((out / CARD_NAME).read_text())
    manifest_path = view_dir / "manifest.csv"
    manifest = load_manifest(manifest_path)
    train, val = manifest.select("train"), manifest.select("val")
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads((out / STATE).read_text()) if resume and (out / STATE).is_file() else {}

    keras.utils.set_random_seed(config.seed)
    pos_weight = positive_weights(train.label_matrix(), config.pos_weight_power)
    loss = WeightedBinaryCrossentropy(pos_weight.tolist())
    train_batches = PatientBatches(
        train, config.size, config.batch_size, training_augmentation(config.rotation, config.seed),
        shuffle=True, seed=config.seed, cache=config.cache_images, ragged_last="drop",
    )
    val_batches = PatientBatches(val, config.size, config.batch_size, cache=config.cache_images)
    model = build_patient_model(config.backbone, config.size, config.weights, config.dropout)
    pretrained = config.weights is not None
    model.get_layer("eye_encoder").trainable = not pretrained
    model.compile(keras.optimizers.Adam(config.learning_rate), loss, jit_compile=False)

    if "phase1_end" in state:
        end = state["phase1_end"]
    else:
        print(f"[{view}] phase 1/2 (train): {len(train)} train / {len(val)} val patients, "
              f"{config.backbone} at {config.size} px, {'backbone frozen' if pretrained else 'all layers'}", flush=True)
        end = _fit_phase(model, "train", out, train_batches, val_batches, loss, config, 0, config.epochs)
        atomic_write_json(out / STATE, {"phase1_end": end})

    if config.fine_tune_epochs > 0:
        print(f"[{view}] phase 2/2 (fine-tune): all layers at lr x {config.fine_tune_lr_factor}", flush=True)
        model.load_weights(str(out / BEST_WEIGHTS))
        fine_lr = config.learning_rate * config.fine_tune_lr_factor
        if pretrained:
            model.get_layer("eye_encoder").trainable = True
            model.compile(keras.optimizers.Adam(fine_lr), loss, jit_compile=False)
        else:  # same trainable set: keep the compiled step, which costs a minute or more to trace
            model.optimizer.learning_rate.assign(min(fine_lr, float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))))
        end = _fit_phase(model, "fine_tune", out, train_batches, val_batches, loss, config, end, end + config.fine_tune_epochs)

    # A fresh, never-compiled model carries no optimizer state into the saved file.
    final = build_patient_model(config.backbone, config.size, None, config.dropout)
    final.load_weights(str(out / BEST_WEIGHTS))
    final.save(str(out / MODEL_NAME))
    card = {
        "format": CARD_FORMAT,
        "view": view,
        "input_size": config.size,
        "backbone": config.backbone,
        "labels": list(LABELS),
        "weights_init": "none" if config.weights is None else ("imagenet" if config.weights == "imagenet" else f"file:{Path(config.weights).name}"),
        "pos_weight": dict(zip(LABELS, map(float, pos_weight))),
        "seed": config.seed,
        "data_manifest": str(manifest_path),
        "data_manifest_sha256": sha256_file(manifest_path),
        "source_manifest_sha256": _source_hash(view_dir.parent),
        "train_patients": len(train),
        "val_patients": len(val),
        "epochs_run": end,
        "best_val": _best_history_row(out / HISTORY),
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / CARD_NAME, card)
    return card


def _source_hash(prep_dir: Path) -> str | None:
    record = prep_dir / "preprocess.json"
    return json.loads(record.read_text()).get("source_manifest_sha256") if record.is_file() else None


def _best_history_row(path: Path) -> dict:
    rows = _history_rows(path)
    best = max(rows, key=lambda r: float(r.get("val_final_score") or "-inf"))
    return {k: (float(v) if k != "epoch" else int(v) + 1) for k, v in best.items() if k == "epoch" or k.startswith("val_")}


def train_pair(
    prep_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    views: tuple[str, ...] = VIEWS,
    force: bool = False,
    resume: bool = False,
) -> dict[str, dict]:
    """Train one independent model per view of a preprocessing output folder; returns the cards.

    An existing run folder is never silently reused: ``resume`` continues it, ``force``
    deletes its view folders and starts over.
    """
    prep, out = Path(prep_dir), Path(out_dir)
    if force and resume:
        raise FundusError("--force starts over and --resume continues: choose one")
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise FundusError(f"unknown view(s) {unknown}; expected {list(VIEWS)}")
    for view in views:
        if not (prep / view / "manifest.csv").is_file():
            raise FundusError(f"{prep / view / 'manifest.csv'} not found; run scripts/preprocess.py first")
    used = [str(out / v) for v in views if (out / v).is_dir() and any((out / v).iterdir())]
    claim_folder(out, "a training run", adopt_if=RUN_FILES)
    if used and force:
        for view in views:
            claim_folder(out / view, f"the {view} model", adopt_if=RUN_FILES)  # runs from before ownership marks
            remove_owned(out / view)
    elif used and not resume:
        raise FundusError(
            f"{out} already holds a run ({', '.join(used)}); pass --resume to continue it, "
            "--force to delete it and start over, or choose a new --out"
        )
    for view in views:
        claim_folder(out / view, f"the {view} model", adopt_if=RUN_FILES)
    cards = {view: train_view(prep / view, out / view, config, view, resume=resume) for view in views}
    atomic_write_json(out / "run.json", {"views": list(views), "config": dataclasses.asdict(config), "prep_dir": str(prep)})
    return cards
