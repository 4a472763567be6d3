"""Batches for Keras: patients ``({"left_eye", "right_eye"}, labels)`` for the library's
model, and single eyes ``(images, patient labels)`` for the per-eye baseline.

Images are preprocessed views (see :mod:`fundus_ensemble.preprocess`), decoded once and kept in
memory as 8-bit RGB when they fit (:func:`choose_cache`; a 448 px ODIR-5K view set is about
4 GB, a 128 px one 350 MB), else decoded from disk for every batch.
A patient with one eye gets that eye in both inputs (see :mod:`.models.patient_classifier`).

Batches may be made by several threads at once (``workers``, Keras's ``PyDataset`` workers):
threads, not processes, so the decoded images are held once, and OpenCV, which does the
work, runs outside Python's lock. Each epoch's order comes from the run's seed and the epoch,
and each patient's augmentation from its own seed (the run's seed, the epoch, the batch, its
place in the batch), so a run is the same whatever the number of workers, whichever process
of a multi-process run makes which rows, and whether it was resumed.

In a run over several processes each process makes its share of every batch
(:meth:`_FixedShapeBatches.shard`): the same global batches in the same order, split in
contiguous rows, which Keras puts together again as one global batch.

Every batch has the same shape: a batch of another size makes TensorFlow retrace the step
(over a minute for B3 on two CPU cores). Training therefore drops the ragged last batch (it
reshuffles every epoch, so each patient is still seen) and prediction pads it and trims the
output (:func:`predict_patients`).
"""

from __future__ import annotations

import copy
import ctypes
import math
import random
import sys
import threading
from pathlib import Path

import albumentations as A
import keras
import numpy as np

from ..labels import INPUT_NAMES
from .imaging import load_view
from .manifest import Manifest

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
FAST_MALLOC = {_M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20, _M_MMAP_THRESHOLD: 32 << 20}


def restore_fast_malloc() -> bool:
    """Undo the allocator setting that TensorFlow makes when Keras feeds it a ``PyDataset``.

    TensorFlow's generator dataset (which Keras builds for every ``PyDataset`` under the
    TensorFlow backend) sets glibc's ``M_TRIM_THRESHOLD`` to 128 KB, once per process, against
    a memory leak of ``from_generator``. Setting it also freezes glibc's mmap threshold at
    128 KB, so every tensor above 128 KB is mapped from the kernel, zeroed page by page and
    unmapped again, each step. Measured on this project's 2-core machine, B3 training at
    96 px: 11 images/s with 53 s of system time per 600 images, 28 images/s and 2 s after
    this (``docs/results-history.md``). Returns whether it applied (glibc and TensorFlow only).
    """
    if keras.backend.backend() != "tensorflow" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all(mallopt(param, value) == 1 for param, value in FAST_MALLOC.items())


class FastMalloc(keras.callbacks.Callback):
    """Applies :func:`restore_fast_malloc` at the first batch of every fit, evaluate and predict:
    by then TensorFlow has made its generator dataset, and with it its own setting."""

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            restore_fast_malloc()

    on_test_batch_begin = on_train_batch_begin
    on_predict_batch_begin = on_train_batch_begin


CACHE_SHARE = 0.5  # the decoded views may take this share of the memory available when training starts


def memory_available() -> int | None:
    """Bytes this process can still take: the machine's available memory (``MemAvailable``), or
    its control group's limit less its usage when that is smaller; None where neither is known."""
    found = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: a container's own limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def cached_bytes(images: int, size: int) -> int:
    """Memory the decoded views of ``images`` images take at ``size`` px (8-bit RGB)."""
    return images * size * size * 3


def _amount(n: int) -> str:
    """Bytes as a person reads them: MB under a gigabyte (a small run's 0.00 GB says nothing), GB above."""
    return f"{n / 1e6:.3g} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def choose_cache(images: int, size: int, available: int | None = None) -> tuple[bool, str]:
    """Whether to keep ``images`` decoded views in memory: when they take at most
    :data:`CACHE_SHARE` of the memory available (the rest is the model's, the batches' and the
    framework's); else they are decoded from disk for every batch. Returns the choice and why."""
    need = cached_bytes(images, size)
    available = memory_available() if available is None else available
    if available is None:
        return True, f"keeping the decoded views in memory ({_amount(need)}; available memory unknown)"
    if need <= CACHE_SHARE * available:
        return True, (f"keeping the decoded views in memory: {_amount(need)} of {_amount(available)} available")
    return False, (
        f"decoding the views from disk for every batch: keeping them would take {_amount(need)}, over "
        f"{CACHE_SHARE:.0%} of the {_amount(available)} available (--cache on keeps them anyway)"
    )


class ImageStore:
    """Views of a manifest as 8-bit RGB arrays, decoded once and kept when ``cache``."""

    def __init__(self, manifest: Manifest, size: int, cache: bool = True):
        self.manifest = manifest
        self.size = size
        self._cache: dict[str, np.ndarray] | None = {} if cache else None

    def __call__(self, relative: str) -> np.ndarray:
        if self._cache is not None and relative in self._cache:
            return self._cache[relative]
        image = load_view(self.manifest.image_path(relative), self.size)
        if self._cache is not None:
            self._cache[relative] = image
        return image


class _FixedShapeBatches(keras.utils.PyDataset):
    """Order, shuffling and fixed-shape batches (see the module doc) over ``n_items`` items."""

    def __init__(
        self,
        n_items: int,
        size: int,
        batch_size: int,
        augment: A.Compose | None,
        shuffle: bool,
        seed: int,
        ragged_last: str,
        workers: int = 1,
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(10, 2 * workers))
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if ragged_last not in ("pad", "drop"):
            raise ValueError(f"ragged_last must be 'pad' or 'drop', got {ragged_last!r}")
        self.n_items = n_items
        self.ragged_last = ragged_last if n_items > batch_size else "pad"
        self.size = size
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self._local = threading.local()  # one copy of the augmentation per worker thread
        self.process_index, self.process_count = 0, 1
        self.set_epoch(0)

    def shard(self, process_index: int, process_count: int) -> None:
        """Make only process ``process_index``'s rows of every batch (``batch_size / process_count``
        contiguous rows; the order, shuffling and augmentation stay the global batch's)."""
        if self.batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(
                f"batches of {self.batch_size} cannot be split into {process_count} equal shares "
                f"(process {process_index})"
            )
        self.process_index, self.process_count = process_index, process_count

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def __len__(self) -> int:
        if self.ragged_last == "drop":
            return self.n_items // self.batch_size
        return math.ceil(self.n_items / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the batches of epoch ``epoch`` (from 0). Their order and augmentation depend on the
        seed and the epoch alone, so a resumed run makes what the uninterrupted run made."""
        self._epoch = epoch
        self._order = (
            np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
            if self.shuffle
            else np.arange(self.n_items)
        )

    def on_epoch_end(self) -> None:
        self.set_epoch(self._epoch + 1)

    def _batch_items(self, index: int) -> np.ndarray:
        """Item indices of this process's rows of batch ``index``, the last batch padded by
        repeating its last item."""
        items = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        items = np.concatenate([items, np.repeat(items[-1:], self.batch_size - len(items))])
        first = self.process_index * self.local_batch_size
        return items[first : first + self.local_batch_size]

    def _augmenter(self, index: int, row: int) -> A.Compose | None:
        """This thread's augmentation, seeded for row ``row`` (of this process's rows) of batch
        ``index`` of the current epoch."""
        if self.augment is None:
            return None
        compose = getattr(self._local, "compose", None)
        if compose is None:
            compose = self._local.compose = copy.deepcopy(self.augment)
        place = self.process_index * self.local_batch_size + row
        seed = int(np.random.SeedSequence([self.seed, self._epoch, index, place]).generate_state(1)[0])
        # One generator pair shared by all the transforms: Compose.set_random_seed gives each
        # transform its own generators from the same seed, so equal draws (the two flips' coins)
        # come out equal and a mirror never happens without the other flip.
        compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return compose

    @staticmethod
    def _augmented(image: np.ndarray, augmenter: A.Compose | None) -> np.ndarray:
        return image if augmenter is None else augmenter(image=image)["image"]


class PatientBatches(_FixedShapeBatches):
    """Keras dataset over a manifest's patients; shuffles and augments when asked."""

    def __init__(
        self,
        manifest: Manifest,
        size: int,
        batch_size: int,
        augment: A.Compose | None = None,
        shuffle: bool = False,
        seed: int = 0,
        cache: bool = True,
        ragged_last: str = "pad",
        workers: int = 1,
        eye_labels: bool = False,
    ):
        super().__init__(len(manifest), size, batch_size, augment, shuffle, seed, ragged_last, workers)
        self.manifest = manifest
        self.labels = manifest.label_matrix().astype(np.float32)
        # targets of a model with an eye head: {"labels", "eye_labels" (n, 2, 8), -1 where unknown}
        self.eye_labels = manifest_eye_labels(manifest) if eye_labels else None
        self._image = ImageStore(manifest, size, cache)

    def __getitem__(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        rows = self._batch_items(index)
        batch = {name: np.empty((len(rows), self.size, self.size, 3), np.float32) for name in INPUT_NAMES}
        for k, row in enumerate(rows):
            patient = self.manifest.patients[row]
            left = patient.left_image or patient.right_image
            right = patient.right_image or patient.left_image
            augmenter = self._augmenter(index, k)
            for name, relative in zip(INPUT_NAMES, (left, right)):
                batch[name][k] = self._augmented(self._image(relative), augmenter)
        if self.eye_labels is not None:
            return batch, {"labels": self.labels[rows], "eye_labels": self.eye_labels[rows]}
        return batch, self.labels[rows]


def manifest_eye_labels(manifest: Manifest) -> np.ndarray:
    """(patients, 2, 8) per-eye labels from the keywords, left eye first; -1 where an eye has none.

    A one-eyed patient's missing eye is fed the other eye's photo, so it gets that eye's labels.
    """
    from .keywords import eye_labels

    out = np.full((len(manifest), 2, 8), -1.0, np.float32)
    for row, p in enumerate(manifest.patients):
        left = eye_labels(p.extra.get("left_keywords", "")) if p.left_image else None
        right = eye_labels(p.extra.get("right_keywords", "")) if p.right_image else None
        left, right = (left if p.left_image else right), (right if p.right_image else left)
        for k, labels in enumerate((left, right)):
            if labels is not None:
                out[row, k] = labels
    return out


FLIP = A.Compose([A.HorizontalFlip(p=1.0)])


def predict_patients(
    model: keras.Model,
    manifest: Manifest,
    size: int,
    batch_size: int = 16,
    cache: bool = False,
    flip_tta: bool = False,
) -> np.ndarray:
    """Probabilities (n_patients, 8) of ``model`` for every patient of ``manifest``, in order.

    ``flip_tta`` averages them with the probabilities of the horizontally mirrored eyes.
    """
    probs = predict_batches(model, PatientBatches(manifest, size, batch_size, cache=cache))
    if flip_tta:
        probs = 0.5 * (probs + predict_batches(model, PatientBatches(manifest, size, batch_size, FLIP, cache=cache)))
    return probs


def predict_batches(model: keras.Model, batches: _FixedShapeBatches) -> np.ndarray:
    """Predict unshuffled patient or eye batches, dropping the padding of the last batch."""
    if batches.shuffle:
        raise ValueError("predict needs unshuffled batches")
    probs = model.predict(batches, verbose=0, callbacks=[FastMalloc()])
    if isinstance(probs, dict):  # a model with a training-only eye head: the patient output is the one scored
        probs = probs["labels"]
    return np.asarray(probs, dtype=np.float64)[: batches.n_items]


class EyeBatches(_FixedShapeBatches):
    """Keras dataset of single eye images ``(images, labels)``, each eye labelled with its
    patient's labels: the input of the plain per-eye baseline (:mod:`fundus_ensemble.baseline`).

    ``eye_patient`` maps every item back to its patient's row, to average eyes per patient.
    """

    def __init__(
        self,
        manifest: Manifest,
        size: int,
        batch_size: int,
        augment: A.Compose | None = None,
        shuffle: bool = False,
        seed: int = 0,
        ragged_last: str = "pad",
        workers: int = 1,
    ):
        eyes = [(row, img) for row, p in enumerate(manifest.patients) for img in (p.left_image, p.right_image) if img]
        super().__init__(len(eyes), size, batch_size, augment, shuffle, seed, ragged_last, workers)
        self.eyes = [img for _, img in eyes]
        self.eye_patient = np.array([row for row, _ in eyes], dtype=np.int64)
        self.patient_labels = manifest.label_matrix().astype(np.float32)
        self._image = ImageStore(manifest, size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        items = self._batch_items(index)
        images = np.empty((len(items), self.size, self.size, 3), np.float32)
        for k, item in enumerate(items):
            images[k] = self._augmented(self._image(self.eyes[item]), self._augmenter(index, k))
        return images, self.patient_labels[self.eye_patient[items]]


def predict_eye_average(
    model: keras.Model,
    manifest: Manifest,
    size: int,
    batch_size: int = 32,
    flip_tta: bool = False,
) -> np.ndarray:
    """Per-patient probabilities (n_patients, 8) of a per-eye model: the mean over the patient's eyes."""
    eyes = EyeBatches(manifest, size, batch_size)
    eye_probs = predict_batches(model, eyes)
    if flip_tta:
        eye_probs = 0.5 * (eye_probs + predict_batches(model, EyeBatches(manifest, size, batch_size, FLIP)))
    sums = np.zeros((len(manifest), eye_probs.shape[1]))
    np.add.at(sums, eyes.eye_patient, eye_probs)
    return sums / np.bincount(eyes.eye_patient, minlength=len(manifest))[:, None]


class FeatureBatches(_FixedShapeBatches):
    """Keras dataset over patients' frozen eye features ``(patients, 2, F)``, left eye first:
    ``({"left_features", "right_features"}, labels)``, for a head trained on a frozen backbone."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        ragged_last: str = "pad",
    ):
        features = np.asarray(features, np.float32)
        if features.ndim != 3 or features.shape[1] != 2 or len(features) != len(labels):
            raise ValueError(
                f"features must be (patients, 2, F) with one label row per patient, got {features.shape} "
                f"and {np.shape(labels)}"
            )
        super().__init__(len(features), 0, batch_size, None, shuffle, seed, ragged_last)
        self.features = features
        self.labels = np.asarray(labels, np.float32)

    def __getitem__(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        rows = self._batch_items(index)
        return {"left_features": self.features[rows, 0], "right_features": self.features[rows, 1]}, self.labels[rows]


class PhotoBatches(_FixedShapeBatches):
    """Keras dataset of photos named by path, ``(images, zeros)``, in order: the input of a
    frozen backbone computing each photo's features once (:mod:`..training.features`)."""

    def __init__(
        self, paths: list[Path], size: int, batch_size: int, augment: A.Compose | None = None, workers: int = 1
    ):
        super().__init__(len(paths), size, batch_size, augment, False, 0, "pad", workers)
        self.paths = [Path(p) for p in paths]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        items = self._batch_items(index)
        images = np.empty((len(items), self.size, self.size, 3), np.float32)
        for k, item in enumerate(items):
            images[k] = self._augmented(load_view(self.paths[item], self.size), self._augmenter(index, k))
        return images, np.zeros((len(items), 1), np.float32)
