"""Scores and site thresholds on partly labelled data: tables that label one class, or a few.

Other datasets, and a clinic's own sample, rarely grade all eight ODIR labels. Here a label
table's class columns may be absent, and a cell may be empty: **unknown, never negative**.
Each class is scored on the patients that label it (AUC with a bootstrap interval,
sensitivity and specificity at the thresholds in use with Wilson intervals); the ODIR final
score needs all eight labels of every patient and is not defined here.

A site calibration (:func:`fit_site_calibration`) moves the threshold of each class the sample
labels often enough, on the model's raw ensemble probabilities, and keeps the run's own
calibration for the others.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ..data.manifest import claim_patient_id, read_csv_rows, read_text_file, unknown_columns
from ..errors import FundusError
from ..labels import LABEL_NAMES, LABELS
from ..metrics import wilson_interval
from .calibration import Calibration, ClassCalibration, fit_operating_point

FINAL_UNDEFINED = (
    "the ODIR final score is not defined here: it needs all eight labels of every patient; "
    "each labelled class is scored on its own"
)
MIN_POSITIVES = 5  # per class, for a site threshold; fewer keep the run's
MIN_NEGATIVES = 5
RESAMPLES = 1000


@dataclass(frozen=True)
class PartialLabels:
    """Patients' labels where known: ``y`` is (patients, 8) with NaN for unknown."""

    patient_ids: tuple[str, ...]
    y: np.ndarray
    source: str

    def labelled(self) -> dict[str, int]:
        """How many patients label each class (only classes labelled at least once)."""
        counts = (~np.isnan(self.y)).sum(axis=0)
        return {c: int(n) for c, n in zip(LABELS, counts) if n}


def read_partial_labels(path: str | os.PathLike) -> PartialLabels:
    """A label table with ``patient_id`` and any of the class columns (``N`` .. ``O``); each cell
    ``1``, ``0`` or empty (unknown). Rows without photos' columns are fine here; predicting needs them."""
    path = Path(path)
    header, rows = read_csv_rows(read_text_file(path, "label table"), str(path))
    if "patient_id" not in header:
        raise FundusError(f"{path}, row 1: missing column 'patient_id'")
    classes = [c for c in LABELS if c in header]
    for name in header:
        if name not in LABELS and name.strip().upper() in LABELS:
            raise FundusError(
                f"{path}, row 1, column {name!r}: class columns are named {', '.join(LABELS)} exactly "
                f"(upper case, no spaces); rename it {name.strip().upper()!r}"
            )
    ignored = unknown_columns(header)
    if ignored:
        warnings.warn(f"{path}: ignoring unknown column(s) {', '.join(ignored)}", stacklevel=2)
    if not classes:
        raise FundusError(
            f"{path}, row 1: none of the class columns {', '.join(LABELS)}; a table must label at least one class"
        )
    column = {name: i for i, name in enumerate(header)}
    ids, y, seen = [], [], {}
    for index, fields in rows:
        pid = claim_patient_id(fields[column["patient_id"]], path, index, seen)
        row = np.full(len(LABELS), np.nan)
        for c in classes:
            value = fields[column[c]].strip()
            if value == "":
                continue  # unknown: this patient says nothing about the class
            if value not in ("0", "1"):
                raise FundusError(
                    f"{path}, row {index}, column {c!r}, value {value!r}: expected 1, 0 or empty (unknown)"
                )
            row[LABELS.index(c)] = float(value)
        ids.append(pid)
        y.append(row)
    if not ids:
        raise FundusError(f"{path}: no patients")
    y = np.array(y)
    if np.isnan(y).all():
        raise FundusError(f"{path}: every class cell is empty; nothing is labelled")
    return PartialLabels(tuple(ids), y, str(path))


def _auc_interval(y: np.ndarray, p: np.ndarray, rng: np.random.Generator, resamples: int) -> list[float] | None:
    aucs = []
    for _ in range(resamples):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            aucs.append(roc_auc_score(y[i], p[i]))
    return [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))] if aucs else None


MIN_FOR_AUC = 5  # positives and negatives each, below which no AUC is given


def percent_text(value: float | None, interval: list[float] | None = None) -> str:
    """A rate as the evaluation table shows it: ``81.2% [70.1%, 89.0%]``, or ``n/a``."""
    if value is None:
        return "n/a"
    return f"{value:.1%}" + (f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else "")


def auc_text(scores: dict) -> str:
    """A class's AUC with its interval, or why there is none (:func:`score_partial`'s entry)."""
    text = scores.get("auc_note") or "n/a" if scores["auc"] is None else f"{scores['auc']:.3f}"
    if scores["auc_95"]:
        text += f" [{scores['auc_95'][0]:.3f}, {scores['auc_95'][1]:.3f}]"
    return text


def operating_rates(truth: np.ndarray, p: np.ndarray, thresholds: np.ndarray | float) -> tuple[float, float]:
    """(sensitivity, specificity) of deciding positive above ``thresholds`` (one, or one per patient);
    NaN for a rate with nobody to measure it on."""
    truth = np.asarray(truth, bool)
    decided = np.asarray(p) > thresholds
    sensitivity = float(decided[truth].mean()) if truth.any() else float("nan")
    specificity = float((~decided[~truth]).mean()) if (~truth).any() else float("nan")
    return sensitivity, specificity


def rates_at_points(y: np.ndarray, probs: np.ndarray, points: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per operating point (name: raw thresholds per patient and class) and labelled class, the
    sensitivity and specificity it gives on the labelled cells (None where nobody is positive, or
    nobody negative)."""
    y, probs = np.asarray(y, float), np.asarray(probs, float)
    out = {}
    for name, thresholds in points.items():
        thresholds = np.broadcast_to(np.asarray(thresholds, float), probs.shape)
        out[name] = {}
        for j, c in enumerate(LABELS):
            known = ~np.isnan(y[:, j])
            if not known.any():
                continue
            sensitivity, specificity = operating_rates(y[known, j], probs[known, j], thresholds[known, j])
            out[name][c] = {
                "sensitivity": None if np.isnan(sensitivity) else sensitivity,
                "specificity": None if np.isnan(specificity) else specificity,
            }
    return out


def score_partial(
    y: np.ndarray, probs: np.ndarray, thresholds: list[float], seed: int = 0, resamples: int = RESAMPLES
) -> dict:
    """Per labelled class, on the patients that label it: AUC (95 % bootstrap interval) and, at
    ``thresholds`` (raw probability; decided positive above it; per class, or per patient and class
    when patients were decided at different thresholds), sensitivity and specificity with
    95 % Wilson intervals. Classes nobody labels are left out; ``final`` is never computed."""
    y, probs = np.asarray(y, dtype=float), np.asarray(probs, dtype=float)
    if y.shape != probs.shape or y.ndim != 2 or y.shape[1] != len(LABELS):
        raise FundusError(f"labels {y.shape} and probabilities {probs.shape}: expected two (patients, 8) arrays")
    thresholds = np.asarray(thresholds, dtype=float)
    if thresholds.shape not in ((len(LABELS),), probs.shape):
        raise FundusError(f"thresholds {thresholds.shape}: expected ({len(LABELS)},) or one row per patient")
    rng = np.random.default_rng(seed)
    classes = {}
    for j, c in enumerate(LABELS):
        known = ~np.isnan(y[:, j])
        if not known.any():
            continue
        truth, p = y[known, j].astype(bool), probs[known, j]
        decided = p > (thresholds[known, j] if thresholds.ndim == 2 else thresholds[j])
        tp, tn = int((decided & truth).sum()), int((~decided & ~truth).sum())
        positives, negatives = int(truth.sum()), int((~truth).sum())
        # an AUC of one positive is 0 or 1 and its bootstrap interval a point: not a number to read
        both = positives >= MIN_FOR_AUC and negatives >= MIN_FOR_AUC
        classes[c] = {
            "name": LABEL_NAMES[c],
            "labelled": int(known.sum()),
            "positives": positives,
            "negatives": negatives,
            # the threshold most of these patients were decided at (a patient answered from one eye
            # has the one-eye answers' own)
            "threshold": float(np.median(thresholds[known, j]) if thresholds.ndim == 2 else thresholds[j]),
            "auc": float(roc_auc_score(truth, p)) if both else None,
            "auc_95": _auc_interval(truth, p, rng, resamples) if both else None,
            "auc_note": None
            if both
            else f"too few to rank ({positives} positive, {negatives} negative; an AUC needs {MIN_FOR_AUC} of each)",
            "sensitivity": tp / positives if positives else None,
            "sensitivity_95": wilson_interval(tp, positives),
            "specificity": tn / negatives if negatives else None,
            "specificity_95": wilson_interval(tn, negatives),
        }
    return {"patients": int(len(y)), "classes": classes, "final": None, "final_note": FINAL_UNDEFINED}


def _youden_threshold(truth: np.ndarray, p: np.ndarray) -> float:
    """The threshold with the highest sensitivity + specificity on these patients (the lowest of
    equals: a screening programme would rather refer); halfway between neighbouring probabilities."""
    values = np.unique(p)
    candidates = np.concatenate([[values[0] / 2], (values[:-1] + values[1:]) / 2, [(values[-1] + 1) / 2]])
    best, chosen = -np.inf, candidates[0]
    positives, negatives = truth.sum(), (~truth).sum()
    for t in candidates:
        decided = p > t
        j = (decided & truth).sum() / positives + (~decided & ~truth).sum() / negatives
        if j > best + 1e-12:
            best, chosen = j, t
    return float(np.clip(chosen, 1e-6, 1 - 1e-6))


def fit_site_calibration(
    y: np.ndarray,
    raw_probs: np.ndarray,
    run: Calibration | None,
    operating_point: tuple[str, float] | None = None,
    min_positives: int = MIN_POSITIVES,
    min_negatives: int = MIN_NEGATIVES,
) -> tuple[Calibration, dict[str, dict]]:
    """Per class labelled by at least ``min_positives`` positives and ``min_negatives`` negatives of
    the sample: a new threshold on the raw ensemble probability (the most sensitive + specific one,
    or ``operating_point`` such as ``("sensitivity", 0.9)``); every other class keeps ``run``'s own
    calibration (0.5 when the run has none). Returns the calibration and, per class, what was done."""
    y, raw_probs = np.asarray(y, dtype=float), np.asarray(raw_probs, dtype=float)
    if y.shape != raw_probs.shape or y.ndim != 2 or y.shape[1] != len(LABELS):
        raise FundusError(f"labels {y.shape} and probabilities {raw_probs.shape}: expected two (patients, 8) arrays")
    base = run.classes if run is not None else tuple(ClassCalibration() for _ in LABELS)
    classes, report = list(base), {}
    for j, c in enumerate(LABELS):
        known = ~np.isnan(y[:, j])
        truth, p = y[known, j].astype(bool), raw_probs[known, j]
        positives, negatives = int(truth.sum()), int((~truth).sum())
        if positives < min_positives or negatives < min_negatives:
            report[c] = {
                "source": "run",
                "positives": positives,
                "negatives": negatives,
                "why": f"{positives} positives and {negatives} negatives labelled; a site threshold needs "
                f"{min_positives} and {min_negatives}",
            }
            continue
        if operating_point is None:
            t = _youden_threshold(truth, p)
        else:
            t = fit_operating_point(truth[:, None].astype(float), p[:, None], *operating_point).classes[0].threshold
        classes[j] = ClassCalibration(1.0, 0.0, t)
        report[c] = {"source": "site", "positives": positives, "negatives": negatives, "threshold": t}
    return Calibration(tuple(classes)), report
