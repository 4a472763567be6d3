"""The official ODIR-2019 metric, and per-class breakdowns.

The challenge scored a (patients x 8) probability matrix by flattening it with the ground
truth and computing, over all cells at once: Cohen's kappa and micro F1 of ``prob > 0.5``,
and the ROC AUC of the probabilities; ``final`` is their mean. Because cells are pooled,
"F1" equals cell accuracy here and an all-zero prediction already scores about 0.85 on ODIR.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from .errors import FundusError, warn_once
from .labels import LABELS

THRESHOLD = 0.5


def check_prediction_arrays(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (int labels, float probabilities) of equal (patients, classes) shape."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.shape != y_prob.shape or y_true.ndim != 2 or y_true.size == 0:
        raise FundusError(
            f"y_true and y_prob must be equal, non-empty (patients, classes) arrays; got {y_true.shape} and {y_prob.shape}"
        )
    if not np.isin(y_true, (0, 1)).all():
        raise FundusError("y_true must hold only 0 and 1")
    if not np.isfinite(y_prob).all():
        raise FundusError("y_prob holds NaN or infinite values")
    return y_true.astype(np.int64), y_prob


def _mean_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values sharing their mean rank (so a tied positive-negative pair counts one half in the AUC)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return ((last - counts + 1 + last) / 2.0)[inverse]


def odir_score(y_true: np.ndarray, y_prob: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """Official ODIR-2019 score of (patients, 8) arrays: ``{"kappa", "f1", "auc", "final"}``."""
    y_true, y_prob = check_prediction_arrays(y_true, y_prob)
    gt = y_true.ravel()
    prob = y_prob.ravel()
    predicted = (prob > threshold).astype(np.int64)
    if gt.min() == gt.max():
        raise FundusError("the pooled AUC needs both positive and negative cells in y_true")
    # The challenge's sklearn calls (cohen_kappa_score, f1_score(average="micro"), roc_auc_score)
    # in closed form: the same numbers (tests/test_metrics.py), without sklearn's input checks,
    # which took 13 ms a call; calibration's threshold search and the bootstrap call this thousands of times.
    n = gt.size
    positives, called = int(gt.sum()), int(predicted.sum())
    agree = int(np.count_nonzero(gt == predicted))
    # kappa = 1 - observed / expected disagreement, in whole numbers until the one division;
    # the expected count is above 0 because gt holds both values
    kappa = 1.0 - (n - agree) * n / (positives * (n - called) + (n - positives) * called)
    f1 = agree / n  # micro F1 over both values of a binary target is the share of cells right
    auc = float((_mean_ranks(prob)[gt == 1].sum() - positives * (positives + 1) / 2) / (positives * (n - positives)))
    return {"kappa": kappa, "f1": f1, "auc": auc, "final": (kappa + f1 + auc) / 3.0}


def per_class_scores(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float = THRESHOLD
) -> dict[str, dict[str, float | None]]:
    """AUC and F1 (of the positive class) per label; AUC is ``None`` where a class has one value only."""
    y_true, y_prob = check_prediction_arrays(y_true, y_prob)
    out: dict[str, dict[str, float | None]] = {}
    undefined = []
    for j, name in enumerate(LABELS[: y_true.shape[1]]):
        column = y_true[:, j]
        if column.min() == column.max():
            auc = None
            undefined.append(name)
        else:
            auc = float(roc_auc_score(column, y_prob[:, j]))
        f1 = float(f1_score(column, (y_prob[:, j] > threshold).astype(np.int64), zero_division=0.0))
        out[name] = {"auc": auc, "f1": f1, "positives": int(column.sum())}
    if undefined:
        warn_once(
            f"per-class AUC undefined for {', '.join(undefined)}: the evaluated patients have no positives "
            "(or no negatives) for it; the pooled score is unaffected"
        )
    return out


def bootstrap_margin(
    y_true: np.ndarray, ours: np.ndarray, other: np.ndarray, seed: int = 0, resamples: int = 500
) -> list[float] | None:
    """95% interval of final(ours) - final(other) over patients resampled with replacement,
    the same patients for both (paired); None when too few patients to resample."""
    rng = np.random.default_rng(seed)
    margins = []
    for _ in range(resamples):
        i = rng.integers(0, len(y_true), len(y_true))
        if y_true[i].min() == y_true[i].max():
            continue
        margins.append(odir_score(y_true[i], ours[i])["final"] - odir_score(y_true[i], other[i])["final"])
    if not margins:
        return None
    return [float(np.percentile(margins, 2.5)), float(np.percentile(margins, 97.5))]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> list[float] | None:
    """95% Wilson score interval of a proportion (None when there is nothing to count)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def sensitivity_specificity(y_true: np.ndarray, decisions: np.ndarray) -> dict[str, dict]:
    """Per class, at the decisions made: sensitivity and specificity with their 95% Wilson
    intervals, and the positives and negatives they were counted on."""
    y_true = np.asarray(y_true).astype(bool)
    decisions = np.asarray(decisions).astype(bool)
    out = {}
    for j, name in enumerate(LABELS[: y_true.shape[1]]):
        positive, negative = y_true[:, j], ~y_true[:, j]
        tp, tn = int((decisions[:, j] & positive).sum()), int((~decisions[:, j] & negative).sum())
        out[name] = {
            "sensitivity": tp / int(positive.sum()) if positive.any() else None,
            "sensitivity_95": wilson_interval(tp, int(positive.sum())),
            "specificity": tn / int(negative.sum()) if negative.any() else None,
            "specificity_95": wilson_interval(tn, int(negative.sum())),
            "positives": int(positive.sum()),
            "negatives": int(negative.sum()),
        }
    return out
