"""The task model: one patient (two eyes) in, eight label probabilities out.

Both eyes pass through the same backbone in one call (stacked along the batch axis, which
halves the traced graph against two calls and keeps the batch large). Their pooled features
are fused symmetrically by :class:`EyeFusion`: element-wise maximum (a finding in either eye
makes the patient positive, as ODIR's labels do) concatenated with the mean, so the model
does not depend on which eye came first. A patient with one eye is fed that eye twice: max
and mean are then that eye's own features, exactly what a one-eyed patient should get.
"""

from __future__ import annotations

import os

import keras
from keras import ops

from ..labels import INPUT_NAMES, LABELS
from .backbone import build_backbone


@keras.saving.register_keras_serializable(package="fundus_ensemble")
class EyeFusion(keras.layers.Layer):
    """Features of ``[left; right]`` stacked on the batch axis to ``concat(max, mean)`` per patient."""

    def call(self, stacked):
        half = ops.shape(stacked)[0] // 2
        left, right = stacked[:half], stacked[half:]
        return ops.concatenate([ops.maximum(left, right), (left + right) * 0.5], axis=-1)

    def compute_output_shape(self, input_shape):
        return (None, 2 * input_shape[-1])


def build_patient_model(
    backbone: str = "efficientnet_b3",
    input_size: int = 448,
    weights: str | os.PathLike | None = None,
    dropout: float = 0.5,
) -> keras.Model:
    """Build the patient classifier: inputs ``left_eye``/``right_eye`` RGB [0, 255], output (batch, 8)."""
    encoder = build_backbone(backbone, input_size, weights)
    eyes = {name: keras.Input((input_size, input_size, 3), name=name) for name in INPUT_NAMES}
    stacked = keras.layers.Concatenate(axis=0, name="stack_eyes")([eyes[name] for name in INPUT_NAMES])
    fused = EyeFusion(name="fuse_eyes")(encoder(stacked))
    x = keras.layers.Dropout(dropout, name="dropout")(fused)
    # float32 whatever the precision policy: probabilities near 0 and 1 need it, and so does the loss
    probabilities = keras.layers.Dense(len(LABELS), activation="sigmoid", name="labels", dtype="float32")(x)
    return keras.Model(eyes, probabilities, name=f"patient_{backbone}")
