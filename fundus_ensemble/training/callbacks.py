"""Epoch-end callbacks: exact BatchNorm statistics, then validation with the official metric."""

from __future__ import annotations

import math

import keras
import numpy as np

from ..data.batches import PatientBatches, predict_batches
from ..metrics import odir_score


class ValidationScore(keras.callbacks.Callback):
    """Predict the validation patients once per epoch; add ``val_loss`` and ``val_kappa``,
    ``val_f1``, ``val_auc``, ``val_final_score`` (official ODIR metric) to the epoch logs.

    Must come before the callbacks that monitor these keys. Computing ``val_loss`` here,
    from the same predictions, spares Keras a second pass over the validation set.
    """

    def __init__(self, batches: PatientBatches, loss: keras.losses.Loss):
        super().__init__()
        self.batches = batches
        self.loss = loss
        self.labels = batches.labels

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        probs = predict_batches(self.model, self.batches)
        logs["val_loss"] = float(keras.ops.convert_to_numpy(self.loss(self.labels, probs)))
        if not np.isfinite(probs).all():  # diverged: let TerminateOnNaN and the trainer report it
            logs.update(val_kappa=float("nan"), val_f1=float("nan"), val_auc=float("nan"), val_final_score=float("nan"))
            return
        if self.labels.min() == self.labels.max():
            logs.update(val_kappa=0.0, val_f1=0.0, val_auc=0.5, val_final_score=0.0)
            return
        score = odir_score(self.labels, probs)
        logs.update(val_kappa=score["kappa"], val_f1=score["f1"], val_auc=score["auc"], val_final_score=score["final"])
        print(
            f"epoch {epoch + 1}: loss {logs.get('loss', float('nan')):.4f}  val_loss {logs['val_loss']:.4f}  "
            f"val kappa {score['kappa']:.3f}  f1 {score['f1']:.3f}  auc {score['auc']:.3f}  final {score['final']:.3f}",
            flush=True,
        )


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """At each epoch end, set every trainable BatchNorm layer's moving statistics to the exact
    average of its batch statistics over ``patients`` training patients, with the current weights.

    From scratch the weights change faster than Keras' moving averages (momentum 0.99, about
    100 steps) follow, so a model evaluated or saved mid-training normalizes with statistics
    of older weights. Measured on synthetic data (MobileNet from scratch, 64 px, gray_eq view,
    the same epoch-1 weights): pooled validation AUC 0.460 with the moving statistics, 0.617
    with recalibrated ones. Runs before
    validation and checkpointing; layers in inference mode (a frozen backbone) are untouched.
    """

    def __init__(self, batches: PatientBatches, patients: int = 128):
        super().__init__()
        self.batches = batches
        self.steps = min(len(batches), math.ceil(max(0, patients) / batches.batch_size))

    def _layers(self) -> list[keras.layers.BatchNormalization]:
        return [
            layer for layer in self.model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
        ]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        layers = self._layers() if self.steps else []
        if not layers:
            return
        saved = [layer.momentum for layer in layers]
        try:
            for step in range(self.steps):
                for layer in layers:  # a running mean: batch k gets weight 1/k
                    layer.momentum = step / (step + 1)
                inputs, _ = self.batches[step]
                self.model(inputs, training=True)  # eager: reads the momentum set above
        finally:
            for layer, momentum in zip(layers, saved):
                layer.momentum = momentum
