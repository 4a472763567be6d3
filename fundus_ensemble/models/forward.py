"""Inference over many images at the batch size the hardware computes fastest.

On a CPU a convolutional network runs faster per image in small batches: EfficientNet-Lite2 at
380 px, TensorFlow on this project's 2-core machine, 0.055-0.066 s per image in calls of 2-4
images and 0.098 s in calls of 32; the gate's Lite0 at 224 px 0.016 s at 4 and 0.018 at 32
(``docs/measurements/forward_slices.py``): a small batch's activations stay in the processor's
cache. A GPU wants the opposite. :func:`forward` cuts a batch into slices of :func:`slice_size`
images and pads the last one, so that every call has the same shape and the backend traces (or
compiles) the model once.
"""

from __future__ import annotations

import keras
import numpy as np

CPU_SLICE = 4  # images per call on a CPU: Lite2 fastest at 2, the gate's Lite0 at 4-16 (measured)
ACCELERATOR_SLICE = 64


def accelerator_count() -> int:
    """GPUs (or TPUs) the backend sees; 0 on a CPU-only machine."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return sum(1 for d in jax.devices() if d.platform != "cpu")
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_logical_devices("GPU"))
    return 0


def slice_size() -> int:
    """Images per model call for inference: :data:`CPU_SLICE` on a CPU, else :data:`ACCELERATOR_SLICE`."""
    return ACCELERATOR_SLICE if accelerator_count() else CPU_SLICE


def forward(model: keras.Model, images: np.ndarray, size: int | None = None) -> np.ndarray:
    """``model`` (one input, one output) on ``images`` in slices of ``size`` (default
    :func:`slice_size`) images, the last padded with zeros to the same shape; float32, one row
    per image, the same numbers one call on the whole batch gives (inference mode)."""
    images = np.asarray(images, np.float32)
    n = len(images)
    size = size or slice_size()
    if n == 0:
        raise ValueError("forward needs at least one image")
    out = []
    for start in range(0, n, size):
        part = images[start : start + size]
        if len(part) < size:  # one shape for every call: one trace
            part = np.concatenate([part, np.zeros((size - len(part), *part.shape[1:]), np.float32)])
        out.append(np.asarray(model.predict_on_batch(part), np.float32)[: min(size, n - start)])
    return np.concatenate(out)
