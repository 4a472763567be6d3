"""Weighted binary cross-entropy for imbalanced multi-label targets (``keras.ops`` only).

For class c with ``n_pos`` positive and ``n_neg`` negative training patients the positive
weight is ``w_c = (n_neg / n_pos) ** power`` and the loss of one patient is

    L = -(1/8) * sum_c [ w_c * y_c * log(p_c) + (1 - y_c) * log(1 - p_c) ]

``power = 1`` fully balances each class's positives against its negatives, ``power = 0`` is
plain BCE, and the default ``0.5`` sits between: ODIR's rarest class (H, 3 %) gets a weight of
5.7 instead of 32.3 on the odir5k-256-dev training split, which keeps rare classes learnable without making the model call
them at the fixed 0.5 threshold of the official metric whenever it is unsure.

:class:`AsymmetricLoss` (Ridnik et al., ICCV 2021) is the alternative made for imbalanced
multi-label data: easy negatives are down-weighted by a focusing power and a probability
margin, so the many patients without a class stop dominating its gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from ..errors import FundusError

DEFAULT_POWER = 0.5


def positive_weights(labels: np.ndarray, power: float = DEFAULT_POWER) -> np.ndarray:
    """Per-class positive weights ``(n_neg / n_pos) ** power`` from an (n, k) 0/1 array.

    A class with no positives (or no negatives) gets weight 1: there is nothing to balance.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise FundusError(f"labels must be a non-empty (patients, classes) array, got shape {labels.shape}")
    positives = labels.sum(axis=0).astype(np.float64)
    negatives = labels.shape[0] - positives
    ratio = np.where((positives > 0) & (negatives > 0), negatives / np.maximum(positives, 1), 1.0)
    return (ratio**power).astype(np.float32)


@keras.saving.register_keras_serializable(package="fundus_ensemble")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy with a per-class weight on the positive term (see module doc)."""

    def __init__(self, pos_weight: Sequence[float], epsilon: float = 1e-7, name: str = "weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = [float(w) for w in pos_weight]
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        p = ops.clip(ops.convert_to_tensor(y_pred), self.epsilon, 1.0 - self.epsilon)
        y = ops.cast(y_true, p.dtype)
        w = ops.convert_to_tensor(self.pos_weight, dtype=p.dtype)
        per_class = -(w * y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p))
        return ops.mean(per_class, axis=-1)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="fundus_ensemble")
class AsymmetricLoss(keras.losses.Loss):
    """Asymmetric loss (Ridnik et al. 2021), averaged over classes like the weighted BCE.

    Per class: ``-y (1 - p)^gamma_pos log(p) - (1 - y) q^gamma_neg log(1 - q)`` with the shifted
    probability ``q = max(p - margin, 0)``: a negative predicted below ``margin`` costs nothing.
    ``gamma_pos = gamma_neg = margin = 0`` is plain binary cross-entropy.
    """

    def __init__(
        self,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        margin: float = 0.05,
        epsilon: float = 1e-7,
        name: str = "asymmetric",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if gamma_pos < 0 or gamma_neg < 0 or not 0 <= margin < 1:
            raise FundusError(
                f"asymmetric loss needs gammas >= 0 and margin in [0, 1), got {gamma_pos}, {gamma_neg}, {margin}"
            )
        self.gamma_pos, self.gamma_neg, self.margin, self.epsilon = (
            float(gamma_pos),
            float(gamma_neg),
            float(margin),
            float(epsilon),
        )

    def call(self, y_true, y_pred):
        p = ops.clip(ops.convert_to_tensor(y_pred), self.epsilon, 1.0 - self.epsilon)
        y = ops.cast(y_true, p.dtype)
        q = ops.maximum(p - self.margin, 0.0)
        positive = ops.power(1.0 - p, self.gamma_pos) * ops.log(p)
        negative = ops.power(q, self.gamma_neg) * ops.log(ops.clip(1.0 - q, self.epsilon, 1.0))
        return ops.mean(-(y * positive + (1.0 - y) * negative), axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "gamma_pos": self.gamma_pos,
            "gamma_neg": self.gamma_neg,
            "margin": self.margin,
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package="fundus_ensemble")
class MaskedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy over the known cells only: a target below 0 means unknown (an eye
    without keywords) and costs nothing. Each sample's loss is the mean over its known cells."""

    def __init__(self, epsilon: float = 1e-7, name: str = "masked_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        p = ops.clip(ops.convert_to_tensor(y_pred), self.epsilon, 1.0 - self.epsilon)
        y = ops.cast(y_true, p.dtype)
        known = ops.cast(y >= 0, p.dtype)
        cells = -(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p)) * known
        axes = tuple(range(1, len(p.shape)))
        return ops.sum(cells, axis=axes) / ops.maximum(ops.sum(known, axis=axes), 1.0)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
