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

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from ..errors import FundusError
from ..evaluation.ensemble import load_view_model, run_views
from ..fileio import atomic_write_bytes, atomic_write_json
from ..labels import INPUT_NAMES, LABELS
from ..models.views import ColorView, EqualizedGray, WeightedAverage

FORMATS: tuple[str, ...] = ("saved_model", "tflite")
QUANTIZATIONS: tuple[str, ...] = ("none", "float16", "int8")
VIEW_LAYERS = {"color": ColorView, "gray_eq": EqualizedGray}


def build_ensemble_model(run_dir: str | os.PathLike, weights: dict[str, float] | None = None) -> tuple[keras.Model, dict]:
    """The run's view models as one model: ``left_eye``/``right_eye`` uint8 (1, size, size, 3) to (1, 8)."""
    views = run_views(run_dir)
    weights = weights or {v: 1.0 for v in views}
    if set(weights) != set(views) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise FundusError(f"ensemble weights {weights} do not fit the run's views {list(views)}")
    loaded = {v: load_view_model(run_dir, v) for v in views}
    sizes = {card["input_size"] for _, card in loaded.values()}
    if len(sizes) != 1:
        raise FundusError(f"{run_dir}: the view models take different sizes {sorted(sizes)}")
    size = sizes.pop()
    eyes = {name: keras.Input((size, size, 3), batch_size=1, dtype="uint8", name=name) for name in INPUT_NAMES}
    outputs = []
    for view in views:
        model = loaded[view][0]
        model.name = f"{view}_model"  # the two view models share an architecture name; the joint model needs two
        make = VIEW_LAYERS[view](name=f"{view}_view")
        outputs.append(model({name: make(eyes[name]) for name in INPUT_NAMES}))
    probabilities = WeightedAverage([weights[v] for v in views], name="ensemble")(outputs)
    info = {"views": list(views), "ensemble_weights": {v: weights[v] for v in views}, "input_size": size,
            "inputs": {name: f"uint8 RGB (1, {size}, {size}, 3): the cropped eye (data.imaging.crop_to_fov, then BGR to RGB)"
                       for name in INPUT_NAMES},
            "output": f"float32 (1, {len(LABELS)}): ensemble probabilities of {','.join(LABELS)}",
            "cards_sha256": {v: hashlib.sha256(json.dumps(loaded[v][1], sort_keys=True).encode()).hexdigest() for v in views}}
    return keras.Model(eyes, probabilities, name="fundus_ensemble"), info


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "tflite", quantize: str = "none",
               weights: dict[str, float] | None = None, force: bool = False) -> dict:
    """Write the run's ensemble as ``fmt`` to ``out`` (a ``.tflite`` file or a SavedModel folder) and ``out.json``."""
    if fmt not in FORMATS:
        raise FundusError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZATIONS:
        raise FundusError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if fmt == "saved_model" and quantize != "none":
        raise FundusError("--quantize applies to tflite; a SavedModel keeps float32 weights")
    if keras.backend.backend() != "tensorflow":
        raise FundusError(f"exporting writes TensorFlow formats and needs KERAS_BACKEND=tensorflow (now {keras.backend.backend()!r})")
    out = Path(out)
    if out.exists() and not force:
        raise FundusError(f"{out} exists; pass --force to replace it")
    if out.is_dir() and fmt == "saved_model" and not (out / "saved_model.pb").is_file():
        raise FundusError(f"{out} is a folder but not a SavedModel; refusing to replace it")
    model, info = build_ensemble_model(run_dir, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        saved = Path(work) / "saved_model"
        _save_saved_model(model, saved, info["input_size"])
        if fmt == "saved_model":
            if out.exists():
                shutil.rmtree(out)
            saved.rename(out)
        else:
            atomic_write_bytes(out, _convert_tflite(saved, quantize))
    size_bytes = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    record = {"format": fmt, "quantize": quantize, "path": out.name, "bytes": size_bytes, **info}
    atomic_write_json(out.with_name(out.name + ".json"), record)
    return record


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


def load_exported(path: str | os.PathLike, threads: int | None = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
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
