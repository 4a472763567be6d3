"""Per-backbone input scaling, inside the model so every saved model takes RGB in [0, 255]."""

from __future__ import annotations

import keras
from keras import ops

MODES: tuple[str, ...] = ("none", "tf", "torch", "caffe", "lite")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="fundus_ensemble")
class BackbonePreprocess(keras.layers.Layer):
    """Map RGB pixels in [0, 255] to what a Keras application backbone was trained on.

    ``none``: unchanged (EfficientNet rescales internally); ``tf``: [-1, 1];
    ``torch``: [0, 1] then ImageNet mean/std; ``caffe``: RGB to BGR then ImageNet mean removed;
    ``lite``: ``(x - 127) / 128``, as Google's EfficientNet-Lite checkpoints were trained.
    """

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - ops.array(_IMAGENET_MEAN, x.dtype)) / ops.array(_IMAGENET_STD, x.dtype)
        if self.mode == "lite":
            return (x - 127.0) / 128.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.array(_CAFFE_MEAN_BGR, x.dtype)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
