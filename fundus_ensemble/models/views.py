"""The paper's gray view inside a model: OpenCV's grayscale and global histogram equalization in ``keras.ops``.

An exported model (:mod:`..inference.export`) takes the cropped colour eyes and makes the
gray-eq view itself, so an app needs no OpenCV and cannot make the view differently than
training did. Both steps follow OpenCV's integer arithmetic (``cv2.cvtColor(BGR2GRAY)``:
``(9798 R + 19235 G + 3735 B + 2^14) >> 15``; ``cv2.equalizeHist``: the look-up table
``round((cdf - cdf_min) * 255 / (pixels - cdf_min))``), so they agree with
:func:`..data.imaging.gray_eq_view` pixel for pixel up to float rounding.
"""

from __future__ import annotations

import keras
from keras import ops

LEVELS = 256


@keras.saving.register_keras_serializable(package="fundus_ensemble")
class EqualizedGray(keras.layers.Layer):
    """uint8 RGB images (batch, h, w, 3) to their equalized gray view, replicated to 3 channels, float32 [0, 255]."""

    def call(self, images):
        x = ops.cast(images, "int32")
        gray = (x[..., 0] * 9798 + x[..., 1] * 19235 + x[..., 2] * 3735 + 16384) // 32768
        batch = ops.shape(gray)[0]
        pixels = ops.shape(gray)[1] * ops.shape(gray)[2]
        flat = ops.reshape(gray, (batch, -1))
        # one histogram per image in one segment sum: image b's level v counts in segment b * 256 + v
        ids = flat + ops.expand_dims(ops.arange(batch, dtype="int32") * LEVELS, 1)
        hist = ops.reshape(
            ops.segment_sum(
                ops.ones_like(ops.reshape(ids, (-1,)), dtype="float32"),
                ops.reshape(ids, (-1,)),
                num_segments=batch * LEVELS,
            ),
            (batch, LEVELS),
        )
        cdf = ops.cumsum(hist, axis=1)
        first = ops.argmax(ops.cast(hist > 0, "int32"), axis=1)  # the darkest level present
        first_count = ops.take_along_axis(hist, ops.expand_dims(first, 1), axis=1)
        total = ops.cast(pixels, "float32")
        scale = (LEVELS - 1.0) / ops.maximum(total - first_count, 1.0)
        lut = ops.clip(ops.round((cdf - first_count) * scale), 0, LEVELS - 1)
        # an image of one level stays that level (OpenCV's special case)
        lut = ops.where(first_count >= total, ops.cast(ops.expand_dims(first, 1), "float32") + ops.zeros_like(lut), lut)
        equalized = ops.take_along_axis(lut, flat, axis=1)
        equalized = ops.reshape(equalized, ops.shape(gray))
        return ops.repeat(ops.expand_dims(equalized, -1), 3, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)

    def compute_output_spec(self, images):
        return keras.KerasTensor((*images.shape[:-1], 3), dtype="float32")


@keras.saving.register_keras_serializable(package="fundus_ensemble")
class ColorView(keras.layers.Layer):
    """uint8 RGB images as the colour view model takes them: float32 [0, 255], unchanged."""

    def call(self, images):
        return ops.cast(images, "float32")

    def compute_output_spec(self, images):
        return keras.KerasTensor(images.shape, dtype="float32")


@keras.saving.register_keras_serializable(package="fundus_ensemble")
class WeightedAverage(keras.layers.Layer):
    """The ensemble: a weighted mean of the view models' probabilities."""

    def __init__(self, view_weights: list[float], **kwargs):
        super().__init__(**kwargs)
        self.view_weights = [float(w) for w in view_weights]

    def call(self, probabilities):
        total = sum(self.view_weights)
        return sum(w / total * p for w, p in zip(self.view_weights, probabilities))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "view_weights": self.view_weights}
