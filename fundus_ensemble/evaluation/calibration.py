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

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from ..errors import FundusError, warn_once
from ..fileio import atomic_write_json, read_json_file
from ..labels import LABELS
from ..metrics import check_prediction_arrays, odir_score

THRESHOLD_GRID: tuple[float, ...] = tuple(np.round(np.linspace(0.05, 0.95, 19), 2))
_EPS = 1e-6
RUN_CALIBRATION = "calibration.json"  # a cross-fitted run's own, beside its view folders


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
    def from_dict(cls, data: dict) -> Calibration:
        """Read :meth:`to_dict`'s form, checked: every class needs a finite ``slope`` above 0 (a
        calibration keeps each class's order), a finite ``intercept`` and a ``threshold`` in (0, 1)."""
        classes = data.get("classes") if isinstance(data, dict) else None
        if not isinstance(classes, list) or not classes:
            raise FundusError("no list of per-class calibrations under 'classes'")
        out = []
        for j, entry in enumerate(classes):
            name = f"class {LABELS[j] if j < len(LABELS) else j}"
            if not isinstance(entry, dict):
                raise FundusError(f"{name}: expected an object with slope, intercept and threshold, got {entry!r}")
            unknown = sorted(set(entry) - {"slope", "intercept", "threshold"})
            if unknown:
                raise FundusError(f"{name}: unknown key(s) {', '.join(map(repr, unknown))}")
            values = {}
            for key in ("slope", "intercept", "threshold"):
                if key not in entry:
                    raise FundusError(f"{name}: {key!r} is missing")
                value = entry[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                    raise FundusError(f"{name}: {key!r} is {value!r}; expected a finite number")
                values[key] = float(value)
            if values["slope"] <= 0:
                raise FundusError(
                    f"{name}: 'slope' is {values['slope']!r}; it must be above 0 (a calibration keeps the "
                    "order of a class's probabilities)"
                )
            if not 0 < values["threshold"] < 1:
                raise FundusError(f"{name}: 'threshold' is {values['threshold']!r}; expected a number in (0, 1)")
            out.append(ClassCalibration(**values))
        return cls(tuple(out))


def _platt(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    z = _logit(p).reshape(-1, 1)
    model = LogisticRegression(C=100.0).fit(z, y)  # light regularization: a handful of positives per class
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def fit_calibration(
    y_true: np.ndarray, y_prob: np.ndarray, grid: tuple[float, ...] = THRESHOLD_GRID, passes: int = 2
) -> Calibration:
    """Fit Platt scaling, then per-class thresholds by coordinate ascent on the ODIR final score.

    A class with only one value among these patients is left as it is (with a warning):
    there is nothing to fit it on. So is a class whose Platt fit comes out reversed (slope
    not above 0: the model ranks these patients the wrong way round): such a map would turn
    the decision rule upside down, so the class keeps its raw probability and threshold 0.5.
    """
    y_true, y_prob = check_prediction_arrays(y_true, y_prob)
    classes = []
    skipped, reversed_ = [], []
    for j in range(y_true.shape[1]):
        column = y_true[:, j]
        if column.min() == column.max():
            skipped.append(j)
            classes.append(ClassCalibration())
            continue
        slope, intercept = _platt(column, y_prob[:, j])
        if not (np.isfinite(slope) and np.isfinite(intercept) and slope > 0):
            skipped.append(j)
            reversed_.append(j)
            classes.append(ClassCalibration())
        else:
            classes.append(ClassCalibration(slope, intercept))
    names = [LABELS[j] if j < len(LABELS) else str(j) for j in skipped if j not in reversed_]
    if names:
        warn_once(
            f"calibration: class(es) {', '.join(names)} have a single value on the fitting patients; left uncalibrated"
        )
    if reversed_:
        names = [LABELS[j] if j < len(LABELS) else str(j) for j in reversed_]
        warn_once(
            f"calibration: class(es) {', '.join(names)} fitted a reversed slope on the fitting patients (the "
            "model ranks them the wrong way round there); left uncalibrated, at the raw threshold 0.5"
        )
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


def load_calibration_file(
    path: str | os.PathLike, option: str = "--calibration", fingerprint: dict | None = None
) -> tuple[Calibration, str]:
    """The ensemble's calibration from a ``calibration.json`` of ``score.py --calibrate-on``,
    checked (:meth:`Calibration.from_dict`), and words saying where it came from. With ``fingerprint``
    (the model's :func:`.ensemble.card_fingerprints`), a file that records the model it was fitted
    for (a site calibration does) must name this one.

    Refuses one fitted on flip-TTA predictions: predict does not flip, so its thresholds
    would not fit."""
    path = Path(path)
    if path.is_dir():
        raise FundusError(f"{option} {path}: is a folder; give the calibration.json in it")
    if not path.exists():
        raise FundusError(f"{option} {path}: file not found")
    try:
        data = read_json_file(path, "a calibration.json of score.py --calibrate-on")
    except FundusError as exc:
        raise FundusError(f"{option} {exc}") from None
    if not isinstance(data, dict) or "ensemble" not in data:
        raise FundusError(
            f"{option} {path}: no 'ensemble' calibration; not a calibration.json of score.py --calibrate-on"
        )
    try:
        fitted = Calibration.from_dict(data["ensemble"])
    except FundusError as exc:
        raise FundusError(f"{option} {path}, ensemble, {exc}") from None
    if data.get("flip_tta"):
        raise FundusError(
            f"{option} {path} was fitted on flip-TTA predictions; predict does not flip, so its "
            "thresholds would not fit: calibrate with score.py --calibrate-on val without --flip-tta"
        )
    if len(fitted.classes) != len(LABELS):
        raise FundusError(f"{option} {path}: {len(fitted.classes)} classes, expected {len(LABELS)}")
    if fingerprint is not None and "run_fingerprint" in data and data["run_fingerprint"] != fingerprint:
        raise FundusError(
            f"{option} {path} was fitted for another model (its run fingerprint differs from the model's); "
            "fit a site calibration for this model with scripts/calibrate_site.py"
        )
    return fitted, f"{path.name} (fitted on {data.get('fitted_on', '?')})"


def run_calibration(run_dir: str | os.PathLike) -> Path | None:
    """The calibration a run decides with unless told otherwise: its own ``calibration.json`` (a
    cross-fitted run's, fitted on out-of-fold predictions) or the one ``score.py --calibrate-on``
    wrote into it (``score_*/calibration.json``); None when it has none. Copies with the same
    content count once; different ones are refused as ambiguous."""
    import hashlib

    run_dir = Path(run_dir)
    found = sorted(p for p in [run_dir / RUN_CALIBRATION, *run_dir.glob("score_*/calibration.json")] if p.is_file())
    distinct = {hashlib.sha256(_fit_of(p)).hexdigest(): p for p in reversed(found)}
    if len(distinct) > 1:
        raise FundusError(
            f"{run_dir} has {len(distinct)} different calibrations ({', '.join(str(p) for p in found)}); "
            "choose one with --calibration, or --no-calibration"
        )
    return next(iter(distinct.values()), None)


def _fit_of(path: Path) -> bytes:
    """What decides: the ensemble's fit (score.py's copy of a run's calibration adds nothing else)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return json.dumps([data.get("ensemble"), bool(data.get("flip_tta"))], sort_keys=True).encode()
    except (OSError, UnicodeDecodeError, ValueError):
        return path.read_bytes()


def load_out_of_fold(run_dir: str | os.PathLike, views: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A cross-fitted run's out-of-fold predictions of every train and val patient: their labels,
    and each view's probabilities and their mean (``ensemble``)."""
    from ..training.train import OUT_OF_FOLD

    run_dir = Path(run_dir)
    folds = {}
    for view in views:
        path = run_dir / view / OUT_OF_FOLD
        if not path.is_file():
            raise FundusError(f"{path} not found: {run_dir} was not cross-fitted (train_pair --head-fit cross-fit)")
        with np.load(path) as data:
            folds[view] = {k: data[k] for k in data.files}
    first = folds[views[0]]
    if any(not np.array_equal(data["patient_id"], first["patient_id"]) for data in folds.values()):
        raise FundusError(f"{run_dir}: the views' out-of-fold predictions are of different patients")
    probs = {view: data["probabilities"] for view, data in folds.items()}
    probs["ensemble"] = np.mean([probs[v] for v in views], axis=0)
    return first["labels"], probs


def write_out_of_fold_calibration(run_dir: str | os.PathLike, views: tuple[str, ...]) -> Path:
    """A cross-fitted run's calibration (Platt and per-class thresholds, as :func:`fit_calibration`), fitted
    on the out-of-fold predictions of every train and val patient: each view's, and their mean
    (the ensemble's), in ``score.py``'s ``calibration.json`` form, as ``RUN/calibration.json``, which
    predict and the station use by default (:func:`run_calibration`)."""
    y, probs = load_out_of_fold(run_dir, views)
    eyes = load_eye_out_of_fold(run_dir, views)
    path = Path(run_dir) / RUN_CALIBRATION
    atomic_write_json(
        path,
        {
            "fitted_on": "out-of-fold",
            "flip_tta": False,
            "patients": int(len(y)),
            **{name: fit_calibration(y, p).to_dict() for name, p in probs.items()},
            **_referral_entry("referral", y, probs["ensemble"]),
            **({"eye": fit_calibration(*eyes).to_dict(), "eyes": int(len(eyes[0]))} if eyes else {}),
            **(_referral_entry("eye_referral", *eyes) if eyes else {}),
            "operating_points": fit_operating_points(y, probs["ensemble"]),
            **({"eye_operating_points": fit_operating_points(*eyes)} if eyes else {}),
        },
    )
    return path


def _referral_entry(key: str, y: np.ndarray, p: np.ndarray) -> dict:
    """``{key: fit_referral(y, p)}``, or nothing (with a warning) when these patients are all
    referable or none is: the line then rests on the class decisions alone."""
    try:
        return {key: fit_referral(y, p)}
    except FundusError as exc:
        warn_once(f"calibration: no {key.replace('_', ' ')} threshold ({exc})")
        return {}


def load_eye_out_of_fold(run_dir: str | os.PathLike, views: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """A cross-fitted run's one-eye heads' out-of-fold predictions: the eyes' own labels and the
    views' mean probability, one row per eye that was a row (:func:`..training.heads.eye_mask`);
    None when a view has no one-eye head."""
    from ..training.train import EYE_OUT_OF_FOLD

    folds = []
    for view in views:
        path = Path(run_dir) / view / EYE_OUT_OF_FOLD
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            folds.append({k: data[k] for k in data.files})
    first = folds[0]
    if any(
        not np.array_equal(f["patient_id"], first["patient_id"]) or not np.array_equal(f["mask"], first["mask"])
        for f in folds
    ):
        raise FundusError(f"{run_dir}: the views' one-eye out-of-fold predictions are of different eyes")
    mask = first["mask"].astype(bool)
    return first["labels"][mask], np.mean([f["probabilities"] for f in folds], axis=0)[mask]


def _stored_calibration(entry, where: str) -> Calibration:
    """A :class:`Calibration` kept inside a ``calibration.json`` (``where`` names the file and key),
    checked as :meth:`Calibration.from_dict` does, with one class per label."""
    try:
        fitted = Calibration.from_dict(entry)
    except FundusError as exc:
        raise FundusError(f"{where}, {exc}") from None
    if len(fitted.classes) != len(LABELS):
        raise FundusError(f"{where}: {len(fitted.classes)} classes, expected {len(LABELS)}")
    return fitted


def load_eye_calibration(path: str | os.PathLike) -> Calibration | None:
    """The one-eye answers' calibration (``eye``) of a ``calibration.json``; None when it has none
    (a site's file, or a run made before one-eye heads)."""
    data = read_json_file(path, "a calibration.json")
    if not isinstance(data, dict) or "eye" not in data:
        return None
    return _stored_calibration(data["eye"], f"{path}, eye")


OPERATING_MEASURES = ("sensitivity", "specificity")
REFERRAL_SENSITIVITY = 0.90  # the referral score's threshold: this share of referable patients referred, out of fold


def referral_scores(y_prob: np.ndarray) -> np.ndarray:
    """The "any referable finding" score of (patients, classes) raw probabilities: 1 - p(Normal)."""
    return 1.0 - np.asarray(y_prob, np.float64)[..., LABELS.index("N")]


def fit_referral(y_true: np.ndarray, y_prob: np.ndarray, sensitivity: float = REFERRAL_SENSITIVITY) -> dict:
    """The referral score's threshold (:func:`referral_scores`): the highest at which ``sensitivity``
    of the referable patients here (labelled not Normal) score above it, with the sensitivity and
    specificity it gave on these (out-of-fold) patients."""
    y_true, y_prob = check_prediction_arrays(y_true, y_prob)
    referable = y_true[:, LABELS.index("N")] == 0
    score = referral_scores(y_prob)
    if referable.all() or not referable.any():
        raise FundusError("a referral threshold needs patients with and without a referable finding")
    fitted = fit_operating_point(referable[:, None].astype(float), score[:, None], "sensitivity", sensitivity)
    t = fitted.classes[0].threshold
    return {
        "score": "1 - p(N)",
        "threshold": float(t),
        "target_sensitivity": float(sensitivity),
        "sensitivity": float((score[referable] > t).mean()),
        "specificity": float((score[~referable] <= t).mean()),
        "patients": int(len(score)),
    }


def load_referral(path: str | os.PathLike | None, key: str = "referral") -> dict | None:
    """The referral score's threshold (``referral`` for pairs, ``eye_referral`` for one eye) of a
    ``calibration.json``, checked; None when it has none."""
    if path is None:
        return None
    data = read_json_file(path, "a calibration.json")
    entry = data.get(key) if isinstance(data, dict) else None
    if entry is None:
        return None
    t = entry.get("threshold") if isinstance(entry, dict) else None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
        raise FundusError(f"{path}, {key}: threshold {t!r}; expected a number in (0, 1)")
    return entry


def parse_operating_point(value: str) -> tuple[str, float]:
    """``sensitivity=0.90`` or ``specificity=0.95`` to ``(measure, target)``, checked."""
    measure, _, target = (value or "").partition("=")
    measure = measure.strip().lower()
    try:
        number = float(target)
    except ValueError:
        number = float("nan")
    if measure not in OPERATING_MEASURES or not 0 < number < 1:
        raise FundusError(
            f"--operating-point {value!r}: expected sensitivity=T or specificity=T with T in (0, 1), e.g. sensitivity=0.90"
        )
    return measure, number


def fit_operating_point(y_true: np.ndarray, y_prob: np.ndarray, measure: str, target: float) -> Calibration:
    """Per class, the threshold a screening programme asks for instead of the metric's best: the
    highest threshold whose sensitivity on these patients is at least ``target`` (or the lowest
    whose specificity is), as a calibration that moves it to 0.5 (no Platt scaling: the
    probabilities keep their scale). A class with one value among these patients keeps 0.5."""
    y_true, y_prob = check_prediction_arrays(y_true, y_prob)
    if measure not in OPERATING_MEASURES:
        raise FundusError(f"operating point measure {measure!r}: expected one of {', '.join(OPERATING_MEASURES)}")
    classes = []
    for j in range(y_true.shape[1]):
        column, p = y_true[:, j].astype(bool), y_prob[:, j]
        if column.min() == column.max():
            classes.append(ClassCalibration())
            continue
        # decisions are p > t; t lies halfway to the next probability any patient has, so that the
        # calibration's logit arithmetic cannot move a patient across it
        values = np.unique(p)
        if measure == "sensitivity":  # the k-th largest positive, and all above it, decided positive
            edge = np.sort(p[column])[::-1][int(np.ceil(target * column.sum())) - 1]
            below = values[values < edge]
            t = (edge + below[-1]) / 2 if below.size else edge / 2
        else:  # the k-th smallest negative, and all below it, decided negative
            edge = np.sort(p[~column])[int(np.ceil(target * (~column).sum())) - 1]
            above = values[values > edge]
            t = (edge + above[0]) / 2 if above.size else (edge + 1) / 2
        classes.append(ClassCalibration(1.0, 0.0, float(np.clip(t, 1e-6, 1 - 1e-6))))
    return Calibration(tuple(classes))


OPERATING_POINTS = (("sensitivity", 0.90), ("specificity", 0.90))  # what a run's calibration.json carries


def operating_point_name(measure: str, target: float) -> str:
    """An operating point as ``--operating-point`` takes it: ``sensitivity=0.90``."""
    return f"{measure}={target:.2f}"


def fit_operating_points(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, dict]:
    """Each of :data:`OPERATING_POINTS` fitted on these (out-of-fold) predictions, by name, in
    :meth:`Calibration.to_dict` form (:func:`fit_operating_point`: per class, the threshold)."""
    return {
        operating_point_name(m, t): fit_operating_point(y_true, y_prob, m, t).to_dict() for m, t in OPERATING_POINTS
    }


def load_operating_point(path: str | os.PathLike, name: str, key: str = "operating_points") -> Calibration | None:
    """The operating point ``name`` (``sensitivity=0.90``) of a ``calibration.json``'s ``key``
    (``eye_operating_points`` for one-eye answers), checked; None when the file has no ``key``
    (a run made before operating points, a site's file); an unknown name is a FundusError naming
    the ones it has."""
    measure, target = parse_operating_point(name)
    name = operating_point_name(measure, target)
    data = read_json_file(path, "a calibration.json")
    points = data.get(key) if isinstance(data, dict) else None
    if points is None:
        return None
    if not isinstance(points, dict) or name not in points:
        have = ", ".join(sorted(points)) if isinstance(points, dict) else "none"
        raise FundusError(f"{path}, {key}: no operating point {name} (it has: {have})")
    return _stored_calibration(points[name], f"{path}, {key}, {name}")


def raw_thresholds(calibration: Calibration) -> list[float]:
    """Per class, the raw probability at which the calibrated one crosses 0.5: what decides (the
    calibration is increasing: :meth:`Calibration.from_dict` and the fits allow no other)."""
    out = []
    for c in calibration.classes:
        z = (np.log(c.threshold) - np.log1p(-c.threshold) - c.intercept) / c.slope
        out.append(float(1.0 / (1.0 + np.exp(-z))))
    return out
