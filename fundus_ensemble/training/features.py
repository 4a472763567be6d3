"""Frozen-backbone features: each eye's pooled features, computed once per view and size.

With a pretrained backbone frozen (BatchNorm in inference mode), an eye's features do not
change from epoch to epoch, so phase 1 of training (:mod:`.train`) learns the head on them
instead of passing every image through the backbone again: seconds per epoch instead of
minutes. The images are the unaugmented views (augmenting would make the features change),
which is what feature extraction in the Keras transfer-learning guide does too. The
benchmark's linear probe (:mod:`..evaluation.benchmark`) reads the same features.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import keras
import numpy as np

from ..data.batches import FLIP, PatientBatches
from ..data.manifest import Manifest
from ..fileio import atomic_write_json
from ..labels import INPUT_NAMES
from ..models.patient_classifier import SplitEyes
from . import distributed

FEATURES_FORMAT = "fundus-ensemble frozen features 1"


def pair_encoder(encoder: keras.Model, size: int) -> keras.Model:
    """``{left_eye, right_eye}`` images to their features ``(patients, 2, F)``, both eyes in one backbone call."""
    eyes = {name: keras.Input((size, size, 3), name=name) for name in INPUT_NAMES}
    stacked = keras.layers.Concatenate(axis=0)([eyes[name] for name in INPUT_NAMES])
    return keras.Model(eyes, SplitEyes()(encoder(stacked, training=False)), name="pair_encoder")


def eye_features(encoder: keras.Model, manifest: Manifest, size: int, batch_size: int, cache: bool = False,
                 flip: bool = False) -> np.ndarray:
    """Pooled features ``(patients, 2, F)`` of every patient's two eyes (a one-eyed patient's eye twice)."""
    batches = PatientBatches(manifest, size, batch_size, FLIP if flip else None, cache=cache)
    return distributed.predict(pair_encoder(encoder, size), batches).astype(np.float32)


def features_key(manifest: Manifest, backbone: str, size: int, weights: str | None) -> str:
    """What decides the features: the patients and their photos, the backbone, the size and the weights."""
    digest = hashlib.sha256()
    for p in manifest.patients:
        digest.update(f"{p.patient_id}\t{p.left_image}\t{p.right_image}\n".encode())
    digest.update(f"{backbone}\t{size}\t{weights}".encode())
    return digest.hexdigest()


def cached_eye_features(path: str | os.PathLike, encoder: keras.Model, manifest: Manifest, size: int, batch_size: int,
                        key: str, cache: bool = True) -> np.ndarray:
    """:func:`eye_features`, kept in ``path`` (.npy, with a .json naming its key) and reused while the key matches."""
    path = Path(path)
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file():
        try:
            meta = json.loads(record.read_text())
            if meta.get("format") == FEATURES_FORMAT and meta.get("key") == key:
                features = np.load(path, allow_pickle=False)
                if features.shape[:2] == (len(manifest), 2):
                    return features
        except (OSError, ValueError):
            pass
    features = eye_features(encoder, manifest, size, batch_size, cache=cache)
    if not distributed.is_chief():  # every process has them; process 0 keeps them
        return features
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, features)
    os.replace(tmp, path)
    atomic_write_json(record, {"format": FEATURES_FORMAT, "key": key, "shape": list(features.shape)})
    return features


def split_features(folder: str | os.PathLike, split: str, encoder: keras.Model, manifest: Manifest, backbone: str,
                   size: int, weights: str | None, batch_size: int) -> np.ndarray:
    """The frozen features of one split's patients, kept as ``folder/features_<split>.npy``: the
    name and key that a view model's phase 1 and the benchmark's linear probe share."""
    key = features_key(manifest, backbone, size, weights)
    return cached_eye_features(Path(folder) / f"features_{split}.npy", encoder, manifest, size, batch_size, key, cache=False)


def head_model(model: keras.Model) -> keras.Model:
    """The patient model's head on frozen features: ``{left_features, right_features}`` through the
    model's own fusion, dropout and output layers (shared: training it trains the patient model)."""
    width = model.get_layer("fuse_eyes").input.shape[-1]
    inputs = {name: keras.Input((width,), name=name) for name in ("left_features", "right_features")}
    x = keras.layers.Concatenate(axis=0)([inputs["left_features"], inputs["right_features"]])
    x = model.get_layer("fuse_eyes")(x)
    x = model.get_layer("dropout")(x)
    return keras.Model(inputs, model.get_layer("labels")(x), name="head")
