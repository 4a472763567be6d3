"""One model for the whole method, to carry to a server or a phone.

:func:`build_ensemble_model` joins a run's view models into one Keras model: it takes the two
cropped colour eyes (uint8 RGB, the run's size, one patient) and returns the ensemble's eight
probabilities, making the gray-eq view inside the graph (:class:`..models.views.EqualizedGray`).
The retina crop stays outside, because it searches the photo for the retina with OpenCV: call
:func:`..data.imaging.crop_to_fov` (or port its few lines) and convert BGR to RGB.

:func:`export_run` writes it as a TensorFlow SavedModel or a TFLite flat buffer (float32,
float16 weights, or int8 dynamic-range weights); :func:`load_exported` runs either.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import keras
import numpy as np

from ..errors import FundusError
from ..evaluation.ensemble import card_fingerprints, load_view_model, run_views
from ..fileio import OWNER_MARK, atomic_write_bytes, atomic_write_json, claim_folder, folder_owner, sha256_file
from ..labels import INPUT_NAMES, LABELS
from ..models.views import ColorView, EqualizedGray, WeightedAverage

FORMATS: tuple[str, ...] = ("saved_model", "tflite")
QUANTIZATIONS: tuple[str, ...] = ("none", "float16", "int8")
VIEW_LAYERS = {"color": ColorView, "gray_eq": EqualizedGray}
SAVED_MODEL_PURPOSE = "a SavedModel export"
SAVED_MODEL_FILES = {"saved_model.pb", "variables", "assets", "fingerprint.pb", OWNER_MARK}


AUTO = "auto"  # export_run's calibration: the run's own (evaluation.calibration.run_calibration)


def build_ensemble_model(
    run_dir: str | os.PathLike, weights: dict[str, float] | None = None, site: str | os.PathLike | None = None
) -> tuple[keras.Model, dict]:
    """The run's view models as one model: ``left_eye``/``right_eye`` uint8 (1, size, size, 3) to (1, 8);
    with ``site`` (a ``site.json`` of ``scripts/adapt_site.py`` made for this run) its alignment folded
    into each view's head, exactly as predict folds it."""
    views = run_views(run_dir)
    weights = weights or {v: 1.0 for v in views}
    if set(weights) != set(views) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise FundusError(f"ensemble weights {weights} do not fit the run's views {list(views)}")
    loaded = {v: load_view_model(run_dir, v) for v in views}
    sizes = {card["input_size"] for _, card in loaded.values()}
    if len(sizes) != 1:
        raise FundusError(f"{run_dir}: the view models take different sizes {sorted(sizes)}")
    size = sizes.pop()
    if site is not None:
        from ..training.heads import LinearHead, set_patient_head
        from ..training.train import load_references
        from .predict import load_site

        _, alignments = load_site(site, run_dir, load_references(run_dir, tuple(views)))
        for view, (model, _) in loaded.items():
            kernel, bias = model.get_layer("labels").get_weights()
            set_patient_head(model, alignments[view].fold(LinearHead(kernel.astype(np.float64), bias), 2))
    eyes = {name: keras.Input((size, size, 3), batch_size=1, dtype="uint8", name=name) for name in INPUT_NAMES}
    outputs = []
    for view in views:
        model = loaded[view][0]
        model.name = f"{view}_model"  # the two view models share an architecture name; the joint model needs two
        make = VIEW_LAYERS[view](name=f"{view}_view")
        outputs.append(model({name: make(eyes[name]) for name in INPUT_NAMES}))
    probabilities = WeightedAverage([weights[v] for v in views], name="ensemble")(outputs)
    info = {
        "views": list(views),
        "ensemble_weights": {v: weights[v] for v in views},
        "input_size": size,
        "inputs": {
            name: f"uint8 RGB (1, {size}, {size}, 3): the cropped eye (data.imaging.crop_to_fov, then BGR to RGB)"
            for name in INPUT_NAMES
        },
        "output": f"float32 (1, {len(LABELS)}): ensemble probabilities of {','.join(LABELS)}",
        "cards_sha256": card_fingerprints(run_dir, tuple(views)),
        "site": None if site is None else {"file": Path(site).name, "sha256": sha256_file(site)},
        "one_eye": "the model answers a pair; a photo alone put in both slots is answered by the pair heads, "
        "not by the one-eye heads predict uses",
    }
    return keras.Model(eyes, probabilities, name="fundus_ensemble"), info


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "tflite",
    quantize: str = "none",
    weights: dict[str, float] | None = None,
    force: bool = False,
    calibration: str | os.PathLike | None = AUTO,
    site: str | os.PathLike | None = None,
) -> dict:
    """Write the run's ensemble as ``fmt`` to ``out`` (a ``.tflite`` file or a SavedModel folder) and ``out.json``.

    The record beside it carries the thresholds the run decides with (``calibration``: a
    ``calibration.json``; :data:`AUTO`, the run's own as predict uses it; None, 0.5 for every class)
    and the run's fingerprint as predict records it, so a phone app decides as predict does."""
    if fmt not in FORMATS:
        raise FundusError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZATIONS:
        raise FundusError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if fmt == "saved_model" and quantize != "none":
        raise FundusError("--quantize applies to tflite; a SavedModel keeps float32 weights")
    if keras.backend.backend() != "tensorflow":
        raise FundusError(
            f"exporting writes TensorFlow formats and needs KERAS_BACKEND=tensorflow (now {keras.backend.backend()!r})"
        )
    out = Path(out)
    check_export_target(out, fmt, force)
    model, info = build_ensemble_model(run_dir, weights, site)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        saved = Path(work) / "saved_model"
        _save_saved_model(model, saved, info["input_size"])
        if fmt == "saved_model":
            claim_folder(
                saved, SAVED_MODEL_PURPOSE, adopt_if=("saved_model.pb",)
            )  # the marker, written as every folder's
            if out.exists():  # swap: the old export leaves only once the new one is complete beside it
                os.replace(out, Path(work) / "old")
            os.replace(saved, out)
        else:
            atomic_write_bytes(out, _convert_tflite(saved, quantize))
    size_bytes = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    thresholds, source = export_thresholds(run_dir, calibration)
    record = {
        "format": fmt,
        "quantize": quantize,
        "path": out.name,
        "bytes": size_bytes,
        **info,
        "thresholds": dict(zip(LABELS, thresholds)),
        "threshold_source": source,
        "decision": "class positive when its probability > its threshold",
    }
    atomic_write_json(_record_path(out), record)
    return record


def _record_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def check_export_target(out: Path, fmt: str, force: bool) -> None:
    """Refuse an ``--out`` the export may not write: an existing export without ``force``, a file
    where a folder goes or the reverse, a folder or a ``.json`` beside it that the project did not write."""
    record = _record_path(out)
    if fmt == "saved_model" and out.exists() and not out.is_dir():
        raise FundusError(f"--out {out} is a file; a SavedModel is a folder")
    if fmt == "tflite" and out.is_dir():
        raise FundusError(f"--out {out} is a folder; a TFLite model is a file")
    for path in (out, record):
        if path.exists() and not force:
            raise FundusError(f"{path} exists; pass --force to replace it")
    if fmt == "saved_model" and out.is_dir() and folder_owner(out) != SAVED_MODEL_PURPOSE:
        entries = {p.name for p in out.iterdir()}
        # an export made before ownership marks holds the SavedModel's own files and nothing else
        if not (entries and entries <= SAVED_MODEL_FILES and record.is_file()):
            raise FundusError(
                f"{out} is a folder fundus-ensemble did not export (it holds "
                f"{', '.join(sorted(entries)[:3]) or 'nothing'}); refusing to replace it: choose another --out"
            )
    if record.exists():
        try:
            previous = json.loads(record.read_text(encoding="utf-8"))
            ours = isinstance(previous, dict) and previous.get("path") == out.name and "format" in previous
        except (OSError, UnicodeDecodeError, ValueError):
            ours = False
        if not ours:
            raise FundusError(
                f"{record} exists and is not the record of an export to {out.name}; refusing to "
                "replace it: move it or choose another --out"
            )


def decision_changes(reference: np.ndarray, probs: np.ndarray, thresholds: float | np.ndarray = 0.5) -> dict:
    """How many decisions an export changes against the model it came from: (patients, classes)
    probabilities of both, each cell decided ``p > threshold``. A small probability difference
    (int8 weights: 0.1) can still move a patient's decision across the threshold, which AUC hides."""
    reference, probs = np.asarray(reference, np.float64), np.asarray(probs, np.float64)
    if reference.shape != probs.shape or reference.ndim != 2:
        raise FundusError(f"need two (patients, classes) arrays of one shape, got {reference.shape} and {probs.shape}")
    changed = (reference > thresholds) != (probs > thresholds)
    return {
        "cells": int(changed.sum()),
        "of_cells": int(changed.size),
        "patients": int(changed.any(axis=1).sum()),
        "of_patients": int(changed.shape[0]),
        "agreement": float(1 - changed.mean()) if changed.size else 1.0,
    }


def export_thresholds(
    run_dir: str | os.PathLike, calibration: str | os.PathLike | None = AUTO
) -> tuple[list[float], str]:
    """The per-class thresholds predict would decide this run with, and where they come from."""
    from ..evaluation.calibration import load_calibration_file, raw_thresholds, run_calibration

    path = run_calibration(run_dir) if calibration == AUTO else calibration
    if path is None:
        return [0.5] * len(LABELS), "default 0.5"
    fitted, source = load_calibration_file(path, fingerprint=card_fingerprints(run_dir))
    return raw_thresholds(fitted), source


def check_export_on_split(
    run_dir: str | os.PathLike, exported: str | os.PathLike, prep_dir: str | os.PathLike, split: str = "val"
) -> dict:
    """Run the Keras ensemble and the export on the colour views of ``split`` in a preprocessing
    folder and compare them: the largest probability difference and :func:`decision_changes`."""
    from ..data.manifest import load_manifest

    model, info = build_ensemble_model(run_dir)
    manifest = load_manifest(Path(prep_dir) / "color" / "manifest.csv").select(split)
    if not len(manifest):
        raise FundusError(f"{prep_dir}: no {split} patients to check the export on")
    run = load_exported(exported)
    keras_probs, export_probs = [], []
    for patient in manifest.patients:
        paths = [patient.left_image or patient.right_image, patient.right_image or patient.left_image]
        eyes = []
        for path in paths:
            image = cv2.imread(str(manifest.image_path(path)), cv2.IMREAD_COLOR)
            if image is None or image.shape[:2] != (info["input_size"],) * 2:
                raise FundusError(f"{manifest.image_path(path)}: not a {info['input_size']} px colour view of this run")
            eyes.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        keras_probs.append(
            np.asarray(model.predict_on_batch({INPUT_NAMES[0]: eyes[0][None], INPUT_NAMES[1]: eyes[1][None]}))[0]
        )
        export_probs.append(run(*eyes))
    keras_probs, export_probs = np.array(keras_probs), np.array(export_probs)
    record = _record_path(Path(exported))
    thresholds = (
        np.array([json.loads(record.read_text())["thresholds"][c] for c in LABELS]) if record.is_file() else 0.5
    )  # the export's own thresholds: the decisions a phone app makes
    return {
        "split": split,
        "max_abs_diff": float(np.abs(keras_probs - export_probs).max()),
        **decision_changes(keras_probs, export_probs, thresholds),
    }


def _save_saved_model(model: keras.Model, path: Path, size: int) -> None:
    """A SavedModel with one ``serving_default`` signature taking ``left_eye`` and ``right_eye``.

    Not ``model.export``: in Keras 3.15 it stores every weight twice (keras-team/keras#23553).
    Tracking the raw ``tf.Variable``s the traced function captures, and not the model, stores each once.
    """
    import tensorflow as tf

    spec = [tf.TensorSpec((1, size, size, 3), tf.uint8, name=name) for name in INPUT_NAMES]

    @tf.function(input_signature=spec)
    def serve(left_eye, right_eye):
        return {"probabilities": model({INPUT_NAMES[0]: left_eye, INPUT_NAMES[1]: right_eye}, training=False)}

    module = tf.Module()
    module.model_variables = [v.value for v in model.variables]
    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})


def _convert_tflite(saved_model: Path, quantize: str) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if quantize in ("float16", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # alone: int8 weights, float activations (dynamic range)
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def load_exported(
    path: str | os.PathLike, threads: int | None = None
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function ``(left, right) -> (8,) probabilities`` running an exported model (TFLite or SavedModel)."""
    import tensorflow as tf

    path = Path(path)
    if path.suffix == ".tflite":
        try:  # LiteRT, TFLite's successor runtime, where installed; tf.lite's interpreter otherwise
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            Interpreter = tf.lite.Interpreter
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        runner = interpreter.get_signature_runner()

        def run_tflite(left: np.ndarray, right: np.ndarray) -> np.ndarray:
            result = runner(**{INPUT_NAMES[0]: _batch(left), INPUT_NAMES[1]: _batch(right)})
            return np.asarray(next(iter(result.values())), np.float64)[0]

        return run_tflite
    if not (path / "saved_model.pb").is_file():
        raise FundusError(f"{path}: neither a .tflite file nor a SavedModel folder")
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["serving_default"]

    def run_saved(left: np.ndarray, right: np.ndarray) -> np.ndarray:
        result = signature(**{INPUT_NAMES[0]: tf.constant(_batch(left)), INPUT_NAMES[1]: tf.constant(_batch(right))})
        return np.asarray(result["probabilities"], np.float64)[0]

    return run_saved


def _batch(eye: np.ndarray) -> np.ndarray:
    eye = np.asarray(eye)
    if eye.dtype != np.uint8 or eye.shape[-1] != 3:
        raise FundusError(f"an exported model takes uint8 RGB eyes, got {eye.dtype} {eye.shape}")
    return eye[None] if eye.ndim == 3 else eye
