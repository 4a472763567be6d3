"""A trained run on new photos: find the patients, make their views exactly as preprocessing
does (:func:`..data.imaging.make_views`), predict with every view model of the run, average
as the ensemble does, and write what a person and the ODIR format need.

Inputs: a folder of photos paired by name (``<id>_left.<ext>`` / ``<id>_right.<ext>`` by
default; a photo that pairs with nothing is one patient with one eye), a manifest whose label
and split columns may be absent, or one patient's ``left``/``right`` photos. Patients are
streamed in batches, so memory does not grow with the folder.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.imaging import DEFAULT_MAX_PIXELS, make_views, view_to_model_input
from ..data.manifest import check_image_file, check_relative_path, read_csv_rows, read_text_file
from ..errors import FundusError, ImageError
from ..evaluation.calibration import Calibration, ClassCalibration
from ..evaluation.ensemble import average_probabilities, load_view_model, predictions_csv, run_views
from ..fileio import atomic_write_text, claim_folder, csv_for_people
from ..labels import INPUT_NAMES, LABELS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
DEFAULT_PATTERN = r"(?P<id>.+)_(?P<eye>left|right)"
THRESHOLD = 0.5


@dataclass(frozen=True)
class PatientPhotos:
    """One patient's photos (one may be missing)."""

    patient_id: str
    left: Path | None
    right: Path | None


def patients_in_folder(folder: str | os.PathLike, pattern: str = DEFAULT_PATTERN) -> list[PatientPhotos]:
    """Pair the photos of a folder by ``pattern`` (a regex on the file stem with groups ``id`` and ``eye``)."""
    folder = Path(folder)
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise FundusError(f"--pattern {pattern!r} is not a regular expression ({exc})") from None
    if not {"id", "eye"} <= set(regex.groupindex):
        raise FundusError(f"--pattern {pattern!r} needs the named groups (?P<id>...) and (?P<eye>left|right)")
    eyes: dict[str, dict[str, Path]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        match = regex.fullmatch(path.stem)
        pid, eye = (match["id"], match["eye"].lower()) if match else (path.stem, "left")
        if eye not in ("left", "right"):
            raise FundusError(f"{path}: --pattern matched eye {match['eye']!r}; expected left or right")
        slot = eyes.setdefault(pid, {})
        if eye in slot:
            raise FundusError(f"{folder}: patient {pid!r} has two {eye} photos ({slot[eye].name} and {path.name})")
        slot[eye] = path
    if not eyes:
        raise FundusError(f"{folder}: no photos ({', '.join(IMAGE_SUFFIXES)})")
    return [PatientPhotos(pid, e.get("left"), e.get("right")) for pid, e in eyes.items()]


def patients_in_manifest(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[PatientPhotos]:
    """Patients of a manifest; only ``patient_id``, ``left_image``, ``right_image`` are needed."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    header, rows = read_csv_rows(read_text_file(path, "manifest file"), str(path))
    missing = [c for c in ("patient_id", "left_image", "right_image") if c not in header]
    if missing:
        raise FundusError(f"{path}, row 1: missing column(s) {', '.join(map(repr, missing))}")
    column = {name: i for i, name in enumerate(header)}
    patients, seen = [], {}
    for index, fields in rows:
        pid = fields[column["patient_id"]].strip()
        if not pid:
            raise FundusError(f"{path}, row {index}, column 'patient_id', value '': patient id is empty")
        if pid in seen:
            raise FundusError(f"{path}, row {index}, column 'patient_id', value {pid!r}: duplicate (first in row {seen[pid]})")
        seen[pid] = index
        eyes = {}
        for eye in ("left", "right"):
            value = fields[column[f"{eye}_image"]].strip()
            if value:
                relative = check_relative_path(value, str(path), index, f"{eye}_image")
                check_image_file(root, relative, str(path), index, f"{eye}_image", value)
                eyes[eye] = root / relative
        if not eyes:
            raise FundusError(f"{path}, row {index}: patient {pid!r} has neither a left nor a right image")
        patients.append(PatientPhotos(pid, eyes.get("left"), eyes.get("right")))
    return patients


def predict_photos(
    run_dir: str | os.PathLike,
    patients: list[PatientPhotos],
    out_dir: str | os.PathLike,
    batch_size: int = 16,
    force: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    calibration: str | os.PathLike | None = None,
) -> dict:
    """Predict every patient; write ``predictions.csv`` and ``decisions.csv`` to ``out_dir``.

    Returns counts and the throughput. A patient whose photos are all unusable gets
    ``status=rejected`` with the reasons in ``decisions.csv``, never an exception.
    ``calibration`` is a ``calibration.json`` of ``score.py --calibrate-on``: its ensemble fit
    sets the per-class thresholds and the probabilities of ``predictions.csv``, as in score.
    """
    out = Path(out_dir)
    fitted, source = _load_calibration(calibration)
    if (out / "predictions.csv").exists() and not force:
        raise FundusError(f"{out} already holds predictions; pass --force to replace them or choose another --out")
    views = run_views(run_dir)
    models = {view: load_view_model(run_dir, view) for view in views}
    sizes = {card["input_size"] for _, card in models.values()}
    if len(sizes) != 1:
        raise FundusError(f"{run_dir}: the view models take different sizes {sorted(sizes)}")
    size = sizes.pop()
    claim_folder(out, "predictions")

    results: list[tuple[PatientPhotos, dict | None, str]] = []
    start, images = time.perf_counter(), 0
    bar = tqdm(total=sum((p.left is not None) + (p.right is not None) for p in patients), desc="predict", unit="img",
               disable=not progress)
    for first in range(0, len(patients), batch_size):
        chunk = patients[first : first + batch_size]
        inputs, usable = {v: {"left": [], "right": []} for v in views}, []
        for patient in chunk:
            made, reasons = {}, []
            for eye in ("left", "right"):
                photo = getattr(patient, eye)
                if photo is None:
                    continue
                try:
                    made[eye] = {v: view_to_model_input(a) for v, a in make_views(photo, size, views, max_pixels).items()}
                except ImageError as exc:
                    reasons.append(f"{eye}: {exc}")
                images += 1
                bar.update(1)
            if not made:
                results.append((patient, None, "; ".join(reasons) or "no photo"))
                continue
            left, right = made.get("left", made.get("right")), made.get("right", made.get("left"))
            for v in views:
                inputs[v]["left"].append(left[v])
                inputs[v]["right"].append(right[v])
            usable.append((patient, sorted(made), "; ".join(reasons)))
        if not usable:
            continue
        per_view, per_eye = {}, {}
        for v, (model, _) in models.items():
            left, right = np.stack(inputs[v]["left"]), np.stack(inputs[v]["right"])
            per_view[v] = _predict(model, left, right)
            # each eye alone: the same eye in both inputs is exactly that eye's features (max = mean)
            per_eye[v] = {"left": _predict(model, left, left), "right": _predict(model, right, right)}
        ensemble = average_probabilities(per_view)
        for k, (patient, present, note) in enumerate(usable):
            results.append((patient, {
                "ensemble": ensemble[k], "views": {v: per_view[v][k] for v in views},
                "eyes": {(v, eye): per_eye[v][eye][k] for v in views for eye in present},
            }, note))
    bar.close()
    seconds = time.perf_counter() - start

    ok = [(p, r) for p, r, _ in results if r is not None]
    probs = np.array([r["ensemble"] for _, r in ok]).reshape(-1, len(LABELS))
    if fitted is not None:
        probs = fitted.apply(probs)
    thresholds = [_raw_threshold(c) for c in fitted.classes] if fitted is not None else [THRESHOLD] * len(LABELS)
    atomic_write_text(out / "predictions.csv", predictions_csv([p.patient_id for p, _ in ok], probs))
    atomic_write_text(out / "decisions.csv", _decisions_csv(results, views, thresholds, source))
    return {"patients": len(patients), "predicted": len(ok), "rejected": len(results) - len(ok), "images": images,
            "seconds": seconds, "images_per_s": images / seconds if seconds else None, "out_dir": str(out), "input_size": size}


def _predict(model, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    batch = {INPUT_NAMES[0]: left.astype(np.float32), INPUT_NAMES[1]: right.astype(np.float32)}
    return np.asarray(model.predict_on_batch(batch), dtype=np.float64)


def _load_calibration(path: str | os.PathLike | None) -> tuple[Calibration | None, str]:
    if path is None:
        return None, "default 0.5"
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        fitted = Calibration.from_dict(data["ensemble"])
    except FileNotFoundError:
        raise FundusError(f"--calibration {path}: file not found") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FundusError(f"--calibration {path}: not a calibration.json of score.py --calibrate-on ({exc})") from None
    if data.get("flip_tta"):
        raise FundusError(f"--calibration {path} was fitted on flip-TTA predictions; predict does not flip, so its "
                          "thresholds would not fit: calibrate with score.py --calibrate-on val without --flip-tta")
    if len(fitted.classes) != len(LABELS):
        raise FundusError(f"--calibration {path}: {len(fitted.classes)} classes, expected {len(LABELS)}")
    return fitted, f"{path.name} (fitted on {data.get('fitted_on', '?')})"


def _raw_threshold(c: ClassCalibration) -> float:
    """The ensemble probability at which the calibrated one crosses 0.5 (the calibration is monotone)."""
    if c.slope <= 0:
        return float("nan")  # a reversed or flat fit has no such threshold; the calibrated value decides
    z = (np.log(c.threshold) - np.log1p(-c.threshold) - c.intercept) / c.slope
    return float(1.0 / (1.0 + np.exp(-z)))


def _decisions_csv(results, views, thresholds: list[float], source: str) -> str:
    eye_columns = [f"{v}_{eye}" for v in views for eye in ("left", "right")]
    header = ["patient_id", "status", "note", "class", "probability", "threshold", "threshold_source", "decision", *eye_columns]
    rows = []
    for patient, result, note in results:
        if result is None:
            rows.append([patient.patient_id, "rejected", note, "", "", "", "", "", *[""] * len(eye_columns)])
            continue
        for j, label in enumerate(LABELS):
            p = float(result["ensemble"][j])
            eyes = [f"{result['eyes'][(v, eye)][j]:.6f}" if (v, eye) in result["eyes"] else "" for v in views for eye in ("left", "right")]
            threshold = thresholds[j]
            decision = int(p > threshold) if np.isfinite(threshold) else ""
            rows.append([patient.patient_id, "ok", note, label, f"{p:.6f}", f"{threshold:.6f}", source, decision, *eyes])
    return csv_for_people(header, rows)
