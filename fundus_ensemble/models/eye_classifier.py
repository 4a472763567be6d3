"""A per-eye classifier: one eye image in, eight label probabilities out.

This is the plain design a user writes by hand (backbone, pooling, dropout, sigmoid head),
used as the benchmark's baseline; the library's model is the patient classifier.
"""

from __future__ import annotations

import os

import keras

from ..labels import LABELS
from .backbone import build_backbone


def build_eye_model(
    backbone: str = "efficientnet_b3",
    input_size: int = 448,
    weights: str | os.PathLike | None = None,
    dropout: float = 0.5,
) -> keras.Model:
    """Build ``image`` RGB [0, 255] (batch, size, size, 3) -> probabilities (batch, 8)."""
    image = keras.Input((input_size, input_size, 3), name="image")
    features = build_backbone(backbone, input_size, weights)(image)
    x = keras.layers.Dropout(dropout, name="dropout")(features)
    probabilities = keras.layers.Dense(len(LABELS), activation="sigmoid", name="labels", dtype="float32")(x)
    return keras.Model(image, probabilities, name=f"eye_{backbone}")
