"""Batches of patients for Keras: ``({"left_eye", "right_eye"}, labels)``.

Images are preprocessed views (see :mod:`fundus_ensemble.preprocess`), decoded once and
kept in memory by default: a 448 px ODIR-5K view set is about 3 GB, a 128 px one 250 MB.
A patient with one eye gets that eye in both inputs (see :mod:`.models.patient_classifier`).

Every batch has the same shape: a batch of another size makes TensorFlow retrace the step
(over a minute for B3 on two CPU cores). Training therefore drops the ragged last batch (it
reshuffles every epoch, so each patient is still seen) and prediction pads it and trims the
output (:func:`predict_patients`).
"""

from __future__ import annotations

import math

import albumentations as A
import keras
import numpy as np

from .imaging import load_view
from .manifest import Manifest
from .models.patient_classifier import INPUT_NAMES


class ImageStore:
    """Views of a manifest as float32 RGB arrays, decoded once and kept when ``cache``."""

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


class PatientBatches(keras.utils.PyDataset):
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
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if ragged_last not in ("pad", "drop"):
            raise ValueError(f"ragged_last must be 'pad' or 'drop', got {ragged_last!r}")
        self.ragged_last = ragged_last if len(manifest) > batch_size else "pad"
        self.manifest = manifest
        self.size = size
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.labels = manifest.label_matrix().astype(np.float32)
        self._rng = np.random.default_rng(seed)
        self._image = ImageStore(manifest, size, cache)
        self._order = self._rng.permutation(len(manifest)) if shuffle else np.arange(len(manifest))

    def __len__(self) -> int:
        if self.ragged_last == "drop":
            return len(self.manifest) // self.batch_size
        return math.ceil(len(self.manifest) / self.batch_size)

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self._order = self._rng.permutation(len(self.manifest))

    def __getitem__(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        rows = np.concatenate([rows, np.repeat(rows[-1:], self.batch_size - len(rows))])  # pad: see module doc
        batch = {name: np.empty((len(rows), self.size, self.size, 3), np.float32) for name in INPUT_NAMES}
        for k, row in enumerate(rows):
            patient = self.manifest.patients[row]
            left = patient.left_image or patient.right_image
            right = patient.right_image or patient.left_image
            for name, relative in zip(INPUT_NAMES, (left, right)):
                image = self._image(relative)
                if self.augment is not None:
                    image = self.augment(image=image)["image"]
                batch[name][k] = image
        return batch, self.labels[rows]


FLIP = A.Compose([A.HorizontalFlip(p=1.0)])


def predict_patients(
    model: keras.Model, manifest: Manifest, size: int, batch_size: int = 16, cache: bool = False, flip_tta: bool = False,
) -> np.ndarray:
    """Probabilities (n_patients, 8) of ``model`` for every patient of ``manifest``, in order.

    ``flip_tta`` averages them with the probabilities of the horizontally mirrored eyes.
    """
    probs = predict_batches(model, PatientBatches(manifest, size, batch_size, cache=cache))
    if flip_tta:
        probs = 0.5 * (probs + predict_batches(model, PatientBatches(manifest, size, batch_size, FLIP, cache=cache)))
    return probs


def predict_batches(model: keras.Model, batches: PatientBatches) -> np.ndarray:
    """Predict an unshuffled :class:`PatientBatches`, dropping the padding of its last batch."""
    if batches.shuffle:
        raise ValueError("predict needs unshuffled batches")
    probs = np.asarray(model.predict(batches, verbose=0), dtype=np.float64)
    return probs[: len(batches.manifest)]


class EyeBatches(keras.utils.PyDataset):
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
    ):
        super().__init__()
        self.eyes = [(row, img) for row, p in enumerate(manifest.patients) for img in (p.left_image, p.right_image) if img]
        self.eye_patient = np.array([row for row, _ in self.eyes], dtype=np.int64)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.patient_labels = manifest.label_matrix().astype(np.float32)
        self.size, self.batch_size, self.augment, self.shuffle = size, batch_size, augment, shuffle
        self.ragged_last = ragged_last if len(self.eyes) > batch_size else "pad"
        self._image = ImageStore(manifest, size)
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(self.eyes)) if shuffle else np.arange(len(self.eyes))

    def __len__(self) -> int:
        n, b = len(self.eyes), self.batch_size
        return n // b if self.ragged_last == "drop" else math.ceil(n / b)

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self._order = self._rng.permutation(len(self.eyes))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        b = self.batch_size
        items = self._order[index * b : (index + 1) * b]
        items = np.concatenate([items, np.repeat(items[-1:], b - len(items))])  # pad: see module doc
        images = np.empty((b, self.size, self.size, 3), np.float32)
        for k, item in enumerate(items):
            image = self._image(self.eyes[item][1])
            if self.augment is not None:
                image = self.augment(image=image)["image"]
            images[k] = image
        return images, self.patient_labels[self.eye_patient[items]]


def predict_eye_average(
    model: keras.Model, manifest: Manifest, size: int, batch_size: int = 32, flip_tta: bool = False,
) -> np.ndarray:
    """Per-patient probabilities (n_patients, 8) of a per-eye model: the mean over the patient's eyes."""
    def predict(augment):
        batches = EyeBatches(manifest, size, batch_size, augment)
        return np.asarray(model.predict(batches, verbose=0), dtype=np.float64)[: len(batches.eyes)], batches.eye_patient

    eye_probs, eye_patient = predict(None)
    if flip_tta:
        eye_probs = 0.5 * (eye_probs + predict(FLIP)[0])
    sums = np.zeros((len(manifest), eye_probs.shape[1]))
    np.add.at(sums, eye_patient, eye_probs)
    return sums / np.bincount(eye_patient, minlength=len(manifest))[:, None]
