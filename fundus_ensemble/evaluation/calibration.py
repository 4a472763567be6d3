"""Per-class probability calibration fitted on held-out patients (validation split only).

The official ODIR metric thresholds every cell at 0.5 and pools all classes into one AUC.
A model trained from scratch on a few epochs ranks patients well within a class but puts
the 0.5 threshold in the wrong place (rare classes are almost never predicted), and its
scores are not comparable across classes. Two monotone steps per class fix both without
changing how that class ranks its patients:

1. Platt scaling: ``q = sigmoid(a * logit(p) + b)``, so that probabilities mean the same in
   every class (the pooled AUC compares cells across classes);
2. a threshold ``t`` chosen on the same patients to maximize the official final score, and
   moved to 0.5: ``p' = sigmoid(logit(q) - logit(t))``.

Fit it on validation predictions, never on the patients you report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from ..errors import FundusError, warn_once
from ..labels import LABELS
from ..metrics import check_prediction_arrays, odir_score

THRESHOLD_GRID: tuple[float, ...] = tuple(np.round(np.linspace(0.05, 0.95, 19), 2))
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class ClassCalibration:
    """``p' = sigmoid(slope * logit(p) + intercept - logit(threshold))``."""

    slope: float = 1.0
    intercept: float = 0.0
    threshold: float = 0.5

    def apply(self, p: np.ndarray) -> np.ndarray:
        return _sigmoid(self.slope * _logit(p) + self.intercept - _logit(np.float64(self.threshold)))


@dataclass(frozen=True)
class Calibration:
    """One :class:`ClassCalibration` per label column."""

    classes: tuple[ClassCalibration, ...]

    def apply(self, y_prob: np.ndarray) -> np.ndarray:
        """Calibrated copy of a (patients, classes) probability array."""
        y_prob = np.asarray(y_prob, dtype=np.float64)
        if y_prob.ndim != 2 or y_prob.shape[1] != len(self.classes):
            raise FundusError(f"expected (patients, {len(self.classes)}) probabilities, got shape {y_prob.shape}")
        return np.stack([c.apply(y_prob[:, j]) for j, c in enumerate(self.classes)], axis=1)

    def to_dict(self) -> dict:
        return {"classes": [asdict(c) for c in self.classes]}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        return cls(tuple(ClassCalibration(**c) for c in data["classes"]))


def _platt(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    z = _logit(p).reshape(-1, 1)
    model = LogisticRegression(C=100.0).fit(z, y)  # light regularization: a handful of positives per class
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def fit_calibration(y_true: np.ndarray, y_prob: np.ndarray, grid: tuple[float, ...] = THRESHOLD_GRID, passes: int = 2) -> Calibration:
    """Fit Platt scaling, then per-class thresholds by coordinate ascent on the ODIR final score.

    A class with only one value among these patients is left as it is (with a warning):
    there is nothing to fit it on.
    """
    y_true, y_prob = check_prediction_arrays(y_true, y_prob)
    classes = []
    skipped = []
    for j in range(y_true.shape[1]):
        column = y_true[:, j]
        if column.min() == column.max():
            skipped.append(j)
            classes.append(ClassCalibration())
        else:
            classes.append(ClassCalibration(*_platt(column, y_prob[:, j])))
    if skipped:
        names = [LABELS[j] if j < len(LABELS) else str(j) for j in skipped]
        warn_once(f"calibration: class(es) {', '.join(names)} have a single value on the fitting patients; "
                  "left uncalibrated")
    calibration = Calibration(tuple(classes))
    best = odir_score(y_true, calibration.apply(y_prob))["final"]
    for _ in range(passes):
        improved = False
        for j in (j for j in range(y_true.shape[1]) if j not in skipped):
            for t in grid:
                trial = list(calibration.classes)
                trial[j] = ClassCalibration(trial[j].slope, trial[j].intercept, float(t))
                candidate = Calibration(tuple(trial))
                score = odir_score(y_true, candidate.apply(y_prob))["final"]
                if score > best + 1e-12:
                    best, calibration, improved = score, candidate, True
        if not improved:
            break
    return calibration
