"""How fast each part of training runs on this machine, measured in one process.

Four numbers, all in eye images per second (a patient is two images):

- **input pipeline**: batches made (take from the cache, or with ``cache=False`` decode from
  disk, then augment, stack) by ``w`` threads, the model not running, for each worker count asked;
- **model step**: ``model.fit`` on batches already in memory: the most training can reach;
- **training**: ``model.fit`` on the real, augmented :class:`~..data.batches.PatientBatches`
  with ``w`` workers; **training / model step** is the share of the model's speed the input
  pipeline lets training keep (1.0: the model never waits for data);
- **prediction**: ``model.predict`` on unaugmented batches.

Each timing is the fastest of ``PASSES`` passes over the same batches, after compilation and
after the images are cached (unless ``cache=False``: then every pass decodes every view again,
from the operating system's file cache once read); the model step is timed with ``train_on_batch`` on one batch
already in memory, the same compiled step that ``fit`` runs.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import keras

from ..data.augment import training_augmentation
from ..data.batches import FastMalloc, PatientBatches
from ..data.manifest import Manifest, load_manifest
from ..labels import LABELS
from ..models import build_patient_model
from ..models.losses import WeightedBinaryCrossentropy
from .hardware import accelerator_count, data_parallel, precision, resolve_jit_compile

PASSES = 2


@dataclass
class SpeedReport:
    settings: dict
    machine: dict
    input_pipeline: dict[int, float] = field(default_factory=dict)  # workers -> images/s
    model_step: float = 0.0
    training: dict[int, float] = field(default_factory=dict)  # workers -> images/s
    prediction: float = 0.0
    compile_s: float = 0.0

    def ratio(self, workers: int) -> float:
        return self.training[workers] / self.model_step

    def table(self) -> str:
        s = self.settings
        lines = [
            f"{s['backbone']} at {s['size']} px, batch {s['batch_size']} patients, {s['precision']}, "
            f"views {'kept in memory' if s.get('cache', True) else 'decoded from disk every batch'}, "
            f"{s['devices']} device(s), XLA {'on' if s['jit_compile'] else 'off'}; Keras {s['backend']} backend; "
            f"{self.machine['cpus']} CPU cores, {self.machine['accelerators']} accelerator(s)",
            "",
            "| measured | workers | images/s | training / model step |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| input pipeline alone | {w} | {v:.1f} | |" for w, v in self.input_pipeline.items()]
        lines.append(f"| model step alone (in-memory batches) | | {self.model_step:.1f} | |")
        lines += [
            f"| training (real batches) | {w} | {v:.1f} | {self.ratio(w):.2f} |" for w, v in self.training.items()
        ]
        lines.append(f"| prediction | {max(self.training, default=1)} | {self.prediction:.1f} | |")
        lines.append(f"\nfirst step (compilation included): {self.compile_s:.0f} s")
        return "\n".join(lines)


class _EpochTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def synthetic_views(folder: Path, patients: int, size: int) -> Manifest:
    """``patients`` synthetic patients' colour views at ``size`` px, for a machine without data."""
    from ..data.preprocess import preprocess_manifest
    from ..data.synthetic import write_synthetic_dataset

    source = write_synthetic_dataset(
        folder / "data", patients, seed=0, diameter=max(96, size), fractions={"train": 1.0}
    )
    preprocess_manifest(load_manifest(source), folder / "prep", size=size, progress=False)
    return load_manifest(folder / "prep" / "color" / "manifest.csv")


def measure_speed(
    manifest: Manifest | None = None,
    size: int = 128,
    backbone: str = "efficientnet_b3",
    batch_size: int = 15,
    steps: int = 10,
    workers: tuple[int, ...] = (1, 2, 4),
    precision_name: str = "float32",
    jit_compile: bool | None = None,
    devices: int = 1,
    progress: bool = True,
    cache: bool = True,
) -> SpeedReport:
    """Measure the four speeds (module doc) on ``manifest``'s views (synthetic ones when None)."""

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    with tempfile.TemporaryDirectory(prefix="fundus-speed-") as tmp:
        if manifest is None:
            say(f"making {batch_size * steps} synthetic patients at {size} px ...")
            manifest = synthetic_views(Path(tmp), batch_size * steps, size)
        if len(manifest) < batch_size * steps:
            steps = max(1, len(manifest) // batch_size)
        manifest = manifest.with_patients(manifest.patients[: batch_size * steps])
        images_per_batch = 2 * batch_size
        jit = resolve_jit_compile(jit_compile)
        report = SpeedReport(
            settings={
                "backbone": backbone,
                "size": size,
                "batch_size": batch_size,
                "steps": steps,
                "precision": precision_name,
                "jit_compile": jit,
                "devices": devices,
                "backend": keras.backend.backend(),
                "patients": len(manifest),
                "cache": cache,
            },
            machine={
                "cpus": os.cpu_count(),
                "accelerators": accelerator_count(),
                "processor": platform.processor() or platform.machine(),
            },
        )
        augment = training_augmentation()

        def batches(w: int, augmented: bool = True) -> PatientBatches:
            made = PatientBatches(
                manifest,
                size,
                batch_size,
                augment if augmented else None,
                shuffle=augmented,
                workers=w,
                ragged_last="drop",
                cache=cache,
            )
            if cache:
                made._image = cached._image
            return made

        cached = PatientBatches(manifest, size, batch_size, ragged_last="drop")
        for i in range(len(cached)):  # decode once: training keeps the decoded views in memory too
            cached[i]
        for w in workers:
            source = batches(w)
            with ThreadPoolExecutor(w) as pool:  # what PyDataset's worker threads do
                list(pool.map(source.__getitem__, range(len(source))))  # warm each thread's augmentation copy
                start = time.perf_counter()
                list(pool.map(source.__getitem__, range(len(source))))
            report.input_pipeline[w] = len(source) * images_per_batch / (time.perf_counter() - start)
            say(f"input pipeline, {w} worker(s): {report.input_pipeline[w]:.1f} images/s")

        with data_parallel(devices, batch_size), precision(precision_name):
            model = build_patient_model(backbone, size, None)
            model.compile(keras.optimizers.Adam(1e-4), WeightedBinaryCrossentropy([1.0] * len(LABELS)), jit_compile=jit)
            x, y = cached[0]
            say("model step alone: compiling and running ...")
            start = time.perf_counter()
            model.train_on_batch(x, y)
            report.compile_s = time.perf_counter() - start
            passes = []
            for _ in range(PASSES):
                start = time.perf_counter()
                for _ in range(steps):
                    model.train_on_batch(x, y)
                passes.append(time.perf_counter() - start)
            report.model_step = steps * images_per_batch / min(passes)
            say(f"model step alone: {report.model_step:.1f} images/s (first step {report.compile_s:.0f} s)")
            for w in workers:
                source = batches(w)
                timer = _EpochTimes()
                model.fit(source, epochs=1 + PASSES, verbose=0, callbacks=[FastMalloc(), timer])
                report.training[w] = len(source) * images_per_batch / min(timer.seconds[1:])
                say(
                    f"training, {w} worker(s): {report.training[w]:.1f} images/s ({report.ratio(w):.2f} of the model step)"
                )
            best = max(report.training, key=report.training.get)
            source = batches(best, augmented=False)
            model.predict(source, verbose=0, callbacks=[FastMalloc()])
            start = time.perf_counter()
            model.predict(source, verbose=0, callbacks=[FastMalloc()])
            report.prediction = len(source) * images_per_batch / (time.perf_counter() - start)
            say(f"prediction: {report.prediction:.1f} images/s")
    return report
