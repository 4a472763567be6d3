"""The linear probe: the cheapest honest use of a pretrained backbone, as a benchmark anchor.

The backbone stays frozen as loaded; each patient is its eyes' pooled features fused as the
library's model fuses them, ``concat(max, mean)`` (:class:`..models.patient_classifier.EyeFusion`),
standardized on the training patients; one logistic regression per class learns on the
training patients, its regularization chosen on the validation patients by the official
score. Nothing of the test patients is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

C_GRID: tuple[float, ...] = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0)


def fuse(features: np.ndarray) -> np.ndarray:
    """``(patients, 2, F)`` eye features to ``(patients, 2F)``: ``concat(max, mean)`` of the two eyes."""
    return np.concatenate([features.max(axis=1), features.mean(axis=1)], axis=1)


@dataclass
class LinearProbe:
    mean: np.ndarray
    scale: np.ndarray
    models: list  # one LogisticRegression per class, or a float (the training prevalence) for a one-valued class
    c: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = (fuse(features) - self.mean) / self.scale
        cols = [np.full(len(x), m) if isinstance(m, float) else m.predict_proba(x)[:, 1] for m in self.models]
        return np.stack(cols, axis=1)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> list:
    from sklearn.linear_model import LogisticRegression

    models = []
    for k in range(y.shape[1]):
        if y[:, k].min() == y[:, k].max():
            models.append(float(y[:, k].mean()))
        else:
            models.append(LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y[:, k]))
    return models


def fit_linear_probe(
    train_features: np.ndarray,
    y_train: np.ndarray,
    val_features: np.ndarray,
    y_val: np.ndarray,
    grid: tuple[float, ...] = C_GRID,
    seed: int = 0,
) -> LinearProbe:
    """Per-class logistic regressions on the training patients, ``C`` the best of ``grid`` by val final."""
    from ..metrics import odir_score

    x = fuse(train_features)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    best = None
    for c in grid:
        probe = LinearProbe(mean, scale, _fit((x - mean) / scale, y_train, c, seed), c)
        score = odir_score(y_val, probe.predict(val_features))["final"]
        if best is None or score > best[0]:
            best = (score, probe)
    return best[1]
