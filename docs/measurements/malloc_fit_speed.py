"""B3 `fit` at 96 px on 300 odir5k-256-dev training patients, before and after undoing the
allocator setting TensorFlow's generator dataset makes (data.batches.restore_fast_malloc).

Run from the repository root after `scripts/preprocess.py ... --out runs/odir96/prep --size 96`.
Prints, per epoch, images/s and the user and system CPU seconds the epoch took.
"""

import dataclasses
import os
import sys
import time

import keras

sys.path.insert(0, ".")
from fundus_ensemble.data.augment import training_augmentation
from fundus_ensemble.data.batches import PatientBatches, restore_fast_malloc
from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.models import build_patient_model
from fundus_ensemble.models.losses import WeightedBinaryCrossentropy

train = load_manifest("runs/odir96/prep/color/manifest.csv").select("train")
train = dataclasses.replace(train, patients=train.patients[:300])
batches = PatientBatches(train, 96, 15, training_augmentation(30, 0), shuffle=True, ragged_last="drop", workers=2)
model = build_patient_model("efficientnet_b3", 96, None, 0.3)
model.compile(keras.optimizers.Adam(1e-3), WeightedBinaryCrossentropy([1.0] * 8))


class Clock(keras.callbacks.Callback):
    def __init__(self, name: str, fix: bool = False):
        super().__init__()
        self.name, self.fix = name, fix

    def on_train_batch_begin(self, batch, logs=None):
        if self.fix and batch == 0:
            restore_fast_malloc()

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.cpu = time.perf_counter(), os.times()

    def on_epoch_end(self, epoch, logs=None):
        cpu = os.times()
        print(
            f"{self.name}: {len(batches) * 30 / (time.perf_counter() - self.start):.1f} images/s, "
            f"user {cpu.user - self.cpu.user:.0f} s, system {cpu.system - self.cpu.system:.0f} s",
            flush=True,
        )


model.fit(batches, epochs=1, verbose=0, callbacks=[Clock("first epoch (tracing)")])
model.fit(batches, epochs=2, verbose=0, callbacks=[Clock("TensorFlow's setting")])
model.fit(batches, epochs=2, verbose=0, callbacks=[Clock("restored", fix=True)])
