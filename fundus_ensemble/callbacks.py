"""Per-epoch validation on patients with the official metric, for the other callbacks to read."""

from __future__ import annotations

import keras

from .data import PatientBatches, predict_batches
from .metrics import odir_score


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
