"""Epoch-end callbacks: exact BatchNorm statistics, validation with the official metric, and
what a person and a spreadsheet read: one console line per epoch, and ``history.csv``."""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path

import keras
import numpy as np

from ..data.batches import PatientBatches
from ..metrics import odir_score
from . import distributed


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
        probs = distributed.predict(self.model, self.batches)  # every process gets every patient's
        logs["val_loss"] = float(keras.ops.convert_to_numpy(self.loss(self.labels, probs)))
        if not np.isfinite(probs).all():  # diverged: let TerminateOnNaN and the trainer report it
            logs.update(val_kappa=float("nan"), val_f1=float("nan"), val_auc=float("nan"), val_final_score=float("nan"))
            return
        if self.labels.min() == self.labels.max():
            logs.update(val_kappa=0.0, val_f1=0.0, val_auc=0.5, val_final_score=0.0)
            return
        score = odir_score(self.labels, probs)
        logs.update(val_kappa=score["kappa"], val_f1=score["f1"], val_auc=score["auc"], val_final_score=score["final"])


class EpochSeeds(keras.callbacks.Callback):
    """At each epoch's start, put the training batches at that epoch and seed the model's random
    layers (dropout) from the run's seed and the epoch number: what an epoch draws does not
    depend on the epochs run before it in this process, so a resumed run (whose dropout seeds
    Keras does not save) continues exactly as the uninterrupted run would have."""

    def __init__(self, batches, seed: int):
        super().__init__()
        self.batches, self.seed = batches, seed

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.batches.set_epoch(epoch)
        generators = [
            g
            for layer in self.model._flatten_layers(include_self=True, recursive=True)
            for g in getattr(layer, "_seed_generators", [])
        ]
        for k, generator in enumerate(generators):
            seed = int(np.random.SeedSequence([self.seed, epoch, k]).generate_state(1)[0]) >> 1  # fits int32
            generator.state.assign(np.array([seed, 0]).astype(generator.state.dtype))


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
            layer
            for layer in self.model._flatten_layers(include_self=False, recursive=True)
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
                inputs, _ = self.batches[step]  # this process's rows: the statistics are the global batch's
                self.model(distributed.to_global(inputs), training=True)  # eager: reads the momentum set above
        finally:
            for layer, momentum in zip(layers, saved):
                layer.momentum = momentum


def cosine_learning_rate(epoch: int, base: float, total: int, warmup: int = 0) -> float:
    """Learning rate of epoch ``epoch`` (from 0) of ``total``: a linear warm-up over ``warmup``
    epochs up to ``base``, then half a cosine from ``base`` towards 0 (never reaching it)."""
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    t = (epoch - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


class EpochProgress(keras.callbacks.Callback):
    """A progress bar with ETA within each epoch (on a terminal), and one line per epoch.

    Announces the first step's compilation, which takes a minute or more for B3 on a CPU.
    Must come after :class:`ValidationScore`, whose scores the epoch line shows.
    """

    def __init__(self, label: str, total_epochs: int, steps: int):
        super().__init__()
        self.label, self.total_epochs, self.steps = label, total_epochs, steps
        self._bar = None
        self._epoch_start = 0.0

    def on_train_begin(self, logs=None):
        if getattr(self.model, "_fundus_traced", None) is not self.model.train_function:
            print(
                f"{self.label} compiling the training step (its time counts in the first epoch: over a minute for B3 on 2 CPU cores) ...",
                flush=True,
            )

    def on_epoch_begin(self, epoch, logs=None):
        from tqdm.auto import tqdm

        self._epoch_start = time.perf_counter()
        self._bar = tqdm(
            total=self.steps,
            desc=f"{self.label} epoch {epoch + 1}/{self.total_epochs}",
            unit="batch",
            leave=False,
            disable=None,
        )  # disable=None: no bar when the output is not a terminal

    def on_train_batch_end(self, batch, logs=None):
        self.model._fundus_traced = self.model.train_function
        if self._bar is not None:
            self._bar.update(1)
            if logs and "loss" in logs:
                self._bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self._bar.close()
        logs = logs or {}
        scores = "  ".join(
            f"{name} {logs[key]:.3f}"
            for name, key in (
                ("val_loss", "val_loss"),
                ("kappa", "val_kappa"),
                ("f1", "val_f1"),
                ("auc", "val_auc"),
                ("final", "val_final_score"),
            )
            if key in logs
        )
        print(
            f"{self.label} epoch {epoch + 1}/{self.total_epochs}: loss {logs.get('loss', float('nan')):.4f}  {scores}  "
            f"({time.perf_counter() - self._epoch_start:.0f} s)",
            flush=True,
        )


class HistoryLog(keras.callbacks.Callback):
    """``history.csv``: one row per epoch, numbered from 1 as the console and the card number them,
    with the phase and the epoch's wall time; rewritten atomically after every epoch."""

    def __init__(self, path: str | Path, phase: str):
        super().__init__()
        self.path, self.phase = Path(path), phase
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        from ..fileio import atomic_write_text

        row = {"epoch": epoch + 1, "phase": self.phase, "wall_s": round(time.perf_counter() - self._start, 2)}
        for key, value in sorted((logs or {}).items()):
            row[key] = float(keras.ops.convert_to_numpy(value))
        rows = read_history(self.path) + [{k: str(v) for k, v in row.items()}]
        fields = list(dict.fromkeys(key for r in rows for key in r))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, out.getvalue())


def read_history(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``history.csv`` (none if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class TensorBoardScalars(keras.callbacks.Callback):
    """Each epoch's logs as TensorBoard scalars, in Keras's layout (``train/`` and
    ``validation/``, tags ``epoch_<name>``), plus the learning rate.

    Written with the ``tensorboard`` package's record writer and protos alone, so the logs
    come on every Keras backend without importing TensorFlow (Keras's own TensorBoard
    callback needs it). Without the ``tensorboard`` package it warns once and writes nothing.
    """

    _warned = False

    def __init__(self, log_dir: str | Path):
        super().__init__()
        self.log_dir = Path(log_dir)
        self._files: dict[str, tuple] = {}
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError as exc:
            self._protos = None
            if not TensorBoardScalars._warned:
                TensorBoardScalars._warned = True
                print(
                    f"warning: no TensorBoard logs ({exc}); pip install tensorboard to have them",
                    file=sys.stderr,
                    flush=True,
                )
        else:
            self._protos = (event_pb2, summary_pb2, RecordWriter)

    def _writer(self, part: str):
        if part not in self._files:
            import socket

            event_pb2, _, RecordWriter = self._protos
            folder = self.log_dir / part
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.v2", "wb")
            writer = RecordWriter(handle)
            writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
            self._files[part] = (handle, writer)
        return self._files[part][1]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._protos is None or not logs:
            return
        event_pb2, summary_pb2, _ = self._protos
        values = dict(logs)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and "learning_rate" not in values:
            values["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        parts: dict[str, list] = {"train": [], "validation": []}
        for name, value in values.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value)):
                part, tag = ("validation", name[4:]) if name.startswith("val_") else ("train", name)
                parts[part].append(summary_pb2.Summary.Value(tag=f"epoch_{tag}", simple_value=float(value)))
        for part, summary_values in parts.items():
            if summary_values:
                event = event_pb2.Event(
                    wall_time=time.time(), step=epoch, summary=summary_pb2.Summary(value=summary_values)
                )
                self._writer(part).write(event.SerializeToString())
                self._files[part][0].flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        for handle, _ in self._files.values():
            handle.close()
        self._files.clear()
