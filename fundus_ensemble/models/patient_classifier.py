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


@keras.saving.register_keras_serializable(package="fundus_ensemble")
class SplitEyes(keras.layers.Layer):
    """Per-eye rows ``[left; right]`` stacked on the batch axis to (patients, 2, ...): left first."""

    def call(self, stacked):
        half = ops.shape(stacked)[0] // 2
        return ops.stack([stacked[:half], stacked[half:]], axis=1)

    def compute_output_shape(self, input_shape):
        return (None, 2, *input_shape[1:])


def build_patient_model(
    backbone: str = "efficientnet_b3",
    input_size: int = 448,
    weights: str | os.PathLike | None = None,
    dropout: float = 0.5,
    eye_head: bool = False,
) -> keras.Model:
    """Build the patient classifier: inputs ``left_eye``/``right_eye`` RGB [0, 255], output (batch, 8).

    ``eye_head`` adds a training-only second output ``eye_labels`` (batch, 2, 8): each eye's
    own probabilities from its own features, for the per-eye labels of ODIR's keywords
    (:mod:`..data.keywords`). :func:`patient_output_only` drops it again for saving.
    """
    encoder = build_backbone(backbone, input_size, weights)
    eyes = {name: keras.Input((input_size, input_size, 3), name=name) for name in INPUT_NAMES}
    stacked = keras.layers.Concatenate(axis=0, name="stack_eyes")([eyes[name] for name in INPUT_NAMES])
    features = encoder(stacked)
    fused = EyeFusion(name="fuse_eyes")(features)
    x = keras.layers.Dropout(dropout, name="dropout")(fused)
    # float32 whatever the precision policy: probabilities near 0 and 1 need it, and so does the loss
    probabilities = keras.layers.Dense(len(LABELS), activation="sigmoid", name="labels", dtype="float32")(x)
    if not eye_head:
        return keras.Model(eyes, probabilities, name=f"patient_{backbone}")
    per_eye = keras.layers.Dropout(dropout, name="eye_dropout")(features)
    per_eye = keras.layers.Dense(len(LABELS), activation="sigmoid", name="eye_dense", dtype="float32")(per_eye)
    outputs = {"labels": probabilities, "eye_labels": SplitEyes(name="eye_labels", dtype="float32")(per_eye)}
    return keras.Model(eyes, outputs, name=f"patient_{backbone}")


def patient_output_only(model: keras.Model) -> keras.Model:
    """The patient model without a training-only eye head (the same layers and weights)."""
    if not isinstance(model.output, dict):
        return model
    return keras.Model(model.inputs, model.get_layer("labels").output, name=model.name)
