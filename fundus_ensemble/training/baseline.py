"""The plain baseline of the benchmark: what a user would write by hand from the paper.

One backbone on the colour view, trained per eye with the patient's labels (ODIR gives no
per-eye labels), unweighted binary cross-entropy, the same augmentation, optimizer, epochs
and batch size (in images) as the library's models, and the checkpoint with the best
validation loss. At prediction the two eyes' probabilities are averaged per patient
(:func:`.data.predict_eye_average`). Nothing of the library's recipe: no class weights, no
patient-level fusion, no BatchNorm recalibration, no scheduling on the ODIR score.

With pretrained weights it is the fine-tune a user writes by hand: every layer learns from
the first epoch, at the library's fine-tune rate (``learning_rate * fine_tune_lr_factor``:
the full rate would wreck the pretrained features), for ``epochs`` epochs when given.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras

from ..data.augment import training_augmentation
from ..data.batches import EyeBatches, FastMalloc
from ..data.manifest import load_manifest
from ..errors import FundusError
from ..models import build_eye_model
from .callbacks import EpochProgress, HistoryLog
from .hardware import data_parallel, precision, resolve_jit_compile, synchronize_batch_norm
from .train import BEST_WEIGHTS, HISTORY, MODEL_NAME, TrainConfig, check_finite_history


def train_plain_baseline(
    view_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig, epochs: int | None = None
) -> dict:
    """Train the per-eye baseline on ``view_dir`` (a preprocessed view folder); returns a summary.

    ``epochs`` defaults to the library's ``epochs + fine_tune_epochs``.
    """
    config.check()
    out = Path(out_dir)
    if (out / MODEL_NAME).exists():
        raise FundusError(f"{out} already holds a baseline model; choose another folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(Path(view_dir) / "manifest.csv")
    train, val = manifest.select("train"), manifest.select("val")
    keras.utils.set_random_seed(config.seed)
    eyes_per_batch = 2 * config.batch_size  # the patient models see 2 images per patient
    train_eyes = EyeBatches(
        train,
        config.size,
        eyes_per_batch,
        training_augmentation(config.rotation, config.seed),
        shuffle=True,
        seed=config.seed,
        ragged_last="drop",
        workers=config.workers,
    )
    val_eyes = EyeBatches(val, config.size, eyes_per_batch, workers=config.workers)
    epochs = config.epochs + config.fine_tune_epochs if epochs is None else epochs
    if epochs < 1:
        raise FundusError(f"the baseline needs at least one epoch, got {epochs}")
    learning_rate = config.learning_rate * (config.fine_tune_lr_factor if config.weights is not None else 1.0)
    # the same hardware settings as the library's models, so the benchmark compares methods, not machines
    with data_parallel(config.devices, eyes_per_batch), precision(config.precision):
        model = build_eye_model(config.backbone, config.size, config.weights, config.dropout)
        synchronize_batch_norm(model, config.devices)
        model.compile(
            keras.optimizers.Adam(learning_rate),
            keras.losses.BinaryCrossentropy(),
            jit_compile=resolve_jit_compile(config.jit_compile),
        )
        print(
            f"[baseline] {len(train_eyes.eyes)} train eyes / {len(val_eyes.eyes)} val eyes, "
            f"{config.backbone} at {config.size} px, {epochs} epochs at lr {learning_rate:g}",
            flush=True,
        )
        history = model.fit(
            train_eyes,
            validation_data=val_eyes,
            epochs=epochs,
            verbose=0,
            shuffle=False,  # the batches shuffle themselves
            callbacks=[
                FastMalloc(),
                EpochProgress("[baseline]", epochs, len(train_eyes)),
                keras.callbacks.TerminateOnNaN(),
                keras.callbacks.ModelCheckpoint(
                    str(out / BEST_WEIGHTS), monitor="val_loss", save_best_only=True, save_weights_only=True
                ),
                HistoryLog(out / HISTORY, "train"),
            ],
        )
    check_finite_history(history)
    model = build_eye_model(config.backbone, config.size, None, config.dropout)  # float32, on no particular device
    model.load_weights(str(out / BEST_WEIGHTS))
    model.save(str(out / MODEL_NAME))
    (out / BEST_WEIGHTS).unlink()  # model.keras holds these weights; this copy carried optimizer state
    losses = history.history["val_loss"]
    return {
        "epochs_run": len(losses),
        "best_epoch": int(min(range(len(losses)), key=losses.__getitem__)) + 1,
        "train_images_per_epoch": len(train_eyes) * eyes_per_batch,
        "learning_rate": learning_rate,
    }
