"""A trained pair on another site's photos: scored where they are labelled, and its thresholds
fitted to a small labelled sample of them (:mod:`..evaluation.partial`).

Both run predict's own code path (:func:`.predict.predict_photos`: the same crop, views, gate)
on the table's photos without a calibration, so that what is fitted and scored is the raw
ensemble probability; the thresholds then say what decides.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data.manifest import read_csv_rows, read_text_file
from ..errors import FundusError
from ..evaluation.calibration import load_calibration_file, load_eye_calibration, raw_thresholds, run_calibration
from ..evaluation.ensemble import card_fingerprints, run_views
from ..evaluation.partial import (
    FINAL_UNDEFINED,
    PartialLabels,
    auc_text,
    fit_site_calibration,
    percent_text,
    rates_at_points,
    read_partial_labels,
    score_partial,
)
from ..fileio import (
    atomic_write_json,
    atomic_write_text,
    claim_folder,
    claim_output_file,
    neutralise_cell,
    refuse_overlap,
)
from ..labels import LABEL_NAMES, LABELS
from .predict import ANSWERED_FROM_PAIR, SITE_FORMAT, patients_in_manifest, predict_photos

RAW = "raw_predictions"  # the sub-folder holding predict's output, at no calibration


def predict_table(
    run_dir: str | os.PathLike,
    table: str | os.PathLike,
    image_root: str | os.PathLike | None,
    out: str | os.PathLike,
    batch_size: int = 16,
    gate: bool | None = None,
    progress: bool = True,
) -> tuple[PartialLabels, np.ndarray, dict, np.ndarray]:
    """The table's labels, the raw ensemble probabilities of its patients in the same order (NaN rows
    for patients predict rejected), predict's summary, and which patients were answered from one eye
    (their probabilities are the one-eye heads', on their own scale)."""
    labels = read_partial_labels(table)
    photos = patients_in_manifest(table, image_root)
    summary = predict_photos(
        run_dir, photos, Path(out) / RAW, batch_size, force=True, progress=progress, calibration=None, gate=gate
    )
    path = Path(out) / RAW / "predictions.csv"
    header, rows = read_csv_rows(read_text_file(path, "predictions file"), str(path))
    by_id = {fields[0]: np.array([float(fields[header.index(c)]) for c in LABELS]) for _, fields in rows}
    probs = np.array([by_id.get(neutralise_cell(pid), np.full(len(LABELS), np.nan)) for pid in labels.patient_ids])
    path = Path(out) / RAW / "decisions.csv"
    header, rows = read_csv_rows(read_text_file(path, "decisions file"), str(path))
    column = header.index("answered_from")
    single = {fields[0] for _, fields in rows if fields[column] not in ("", ANSWERED_FROM_PAIR)}
    one_eye = np.array([neutralise_cell(pid) in single for pid in labels.patient_ids])
    return labels, probs, summary, one_eye


def _eye_thresholds(run_dir, calibration, pair: list[float]) -> tuple[list[float], object]:
    """The one-eye answers' raw thresholds as predict sets them (:meth:`.predict.Predictor._eye_calibration`)."""
    from ..training.train import load_eye_heads

    if calibration is False or not load_eye_heads(run_dir, run_views(run_dir)):
        return pair, None
    for path in (calibration, run_calibration(run_dir)):
        fitted = load_eye_calibration(path) if path is not None else None
        if fitted is not None:
            return raw_thresholds(fitted), fitted
    return [0.5] * len(LABELS), None


def _thresholds(run_dir, calibration) -> tuple[list[float], str, object]:
    """The raw thresholds in use: ``calibration`` (a path; None: the run's own; False: 0.5)."""
    if calibration is False:
        return [0.5] * len(LABELS), "default 0.5", None
    path = calibration if calibration is not None else run_calibration(run_dir)
    if path is None:
        return [0.5] * len(LABELS), "default 0.5 (the run has no calibration)", None
    fitted, source = load_calibration_file(path)
    return raw_thresholds(fitted), source, fitted


def _is_site_calibration(record) -> bool:
    return (
        isinstance(record, dict)
        and str(record.get("fitted_on", "")).startswith("site sample")
        and ("run_fingerprint" in record)
    )


def _check_work_folder(out, run_dir, table, image_root, purpose: str) -> None:
    """Before predicting: ``out`` is a folder this command may own, outside the run and the photos."""
    if Path(out).exists() and not Path(out).is_dir():
        raise FundusError(f"--out {out} is a file; {purpose} needs a folder")
    if Path(out).resolve().is_relative_to(Path(run_dir).resolve()):
        raise FundusError(f"--out {out} is inside the run folder {run_dir}; write {purpose} outside it")
    inputs = {"label table": table, **({"image root": image_root} if image_root is not None else {})}
    refuse_overlap(out, inputs)
    claim_folder(out, purpose, adopt_if=(RAW, "evaluation.json"))  # folders written before the marker


def evaluate_table(
    run_dir: str | os.PathLike,
    table: str | os.PathLike,
    image_root: str | os.PathLike | None,
    out: str | os.PathLike,
    calibration: str | os.PathLike | None | bool = None,
    batch_size: int = 16,
    gate: bool | None = None,
    progress: bool = True,
) -> dict:
    """Score the run on a partly labelled table; writes ``evaluation.json``, ``evaluation.md`` and
    ``evaluation.html`` (ROC curves with the thresholds in use and the run's operating points)."""
    _check_work_folder(out, run_dir, table, image_root, "evaluation")
    thresholds, source, _ = _thresholds(run_dir, calibration)
    eye_thresholds, _ = _eye_thresholds(run_dir, calibration, thresholds)
    labels, probs, summary, one_eye = predict_table(run_dir, table, image_root, out, batch_size, gate, progress)
    scored = ~np.isnan(probs).any(axis=1)
    if not scored.any():
        raise FundusError(f"{table}: no patient could be predicted (reasons in {Path(out) / RAW / 'decisions.csv'})")
    # each patient at the thresholds that decided it: a pair at the pair thresholds, one eye at the one-eye ones
    per_patient = np.where(one_eye[:, None], eye_thresholds, thresholds)
    result = score_partial(labels.y[scored], probs[scored], per_patient[scored])
    result.update(
        {
            "table": str(table),
            "one_eye": int((one_eye & scored).sum()),
            "rejected": int((~scored).sum()),
            "thresholds_from": source,
            "run_fingerprint": card_fingerprints(run_dir),
        }
    )
    points = {f"in use ({source})": per_patient, **_stored_points(run_dir, one_eye)}
    result["operating_points"] = rates_at_points(
        labels.y[scored], probs[scored], {k: v[scored] for k, v in points.items()}
    )
    atomic_write_json(Path(out) / "evaluation.json", result)
    atomic_write_text(Path(out) / "evaluation.md", format_partial(result))
    from .report import write_evaluation_page

    write_evaluation_page(
        Path(out) / "evaluation.html",
        result,
        labels.y[scored],
        probs[scored],
        {k: v[scored] for k, v in points.items()},
    )
    return result


def _stored_points(run_dir, one_eye: np.ndarray) -> dict[str, np.ndarray]:
    """The run's own operating points (its out-of-fold ``sensitivity=0.90`` and ``specificity=0.90``)
    as raw thresholds per patient: a patient answered from one eye at the one-eye heads' point."""
    from ..evaluation.calibration import OPERATING_POINTS, load_operating_point, operating_point_name

    path = run_calibration(run_dir)
    points = {}
    for measure, target in OPERATING_POINTS if path is not None else ():
        name = operating_point_name(measure, target)
        pair = load_operating_point(path, name)
        if pair is None:
            continue
        eye = load_operating_point(path, name, "eye_operating_points") or pair
        rows = np.where(one_eye[:, None], raw_thresholds(eye), raw_thresholds(pair))
        points[f"the run's {name}"] = rows
    return points


def format_partial(result: dict) -> str:
    """The per-class table of :func:`evaluate_table`, in Markdown."""

    lines = [
        f"{result['patients']} patients scored ({result['rejected']} rejected by predict; "
        f"{result.get('one_eye', 0)} answered from one eye, at the one-eye thresholds); thresholds: "
        f"{result['thresholds_from']}. Only the labelled cells count: an empty cell is unknown.",
        "",
        "| class | labelled | positives | AUC (95 % interval) | threshold | sensitivity | specificity |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, s in result["classes"].items():
        lines.append(
            f"| {c} ({LABEL_NAMES[c]}) | {s['labelled']} | {s['positives']} | {auc_text(s)} | {s['threshold']:.3f} | "
            f"{percent_text(s['sensitivity'], s['sensitivity_95'])} | "
            f"{percent_text(s['specificity'], s['specificity_95'])} |"
        )
    return "\n".join([*lines, "", f"Note: {FINAL_UNDEFINED}.", ""])


def calibrate_site(
    run_dir: str | os.PathLike,
    table: str | os.PathLike,
    image_root: str | os.PathLike | None,
    out: str | os.PathLike,
    work: str | os.PathLike,
    operating_point: tuple[str, float] | None = None,
    min_positives: int = 5,
    min_negatives: int = 5,
    batch_size: int = 16,
    gate: bool | None = None,
    progress: bool = True,
) -> dict:
    """Fit a site's thresholds on its labelled sample and write them as a ``calibration.json`` that
    predict, the station and the export take (``--calibration``); returns what was done per class."""
    claim_output_file(out, "site calibration", _is_site_calibration, {"run folder": run_dir})
    _check_work_folder(work, run_dir, table, image_root, "site sample predictions")
    pair_thresholds, _, run_fit = _thresholds(run_dir, None)
    _, run_eye_fit = _eye_thresholds(run_dir, None, pair_thresholds)
    labels, probs, _, one_eye = predict_table(run_dir, table, image_root, work, batch_size, gate, progress)
    scored = ~np.isnan(probs).any(axis=1)
    pairs, singles = scored & ~one_eye, scored & one_eye
    # pairs and single eyes are answered by different heads, on different scales: each gets its own thresholds
    fitted, report = fit_site_calibration(
        labels.y[pairs], probs[pairs], run_fit, operating_point, min_positives, min_negatives
    )
    eye = {}
    if run_eye_fit is not None:
        eye_fitted, eye_report = fit_site_calibration(
            labels.y[singles], probs[singles], run_eye_fit, operating_point, min_positives, min_negatives
        )
        eye = {"eye": eye_fitted.to_dict(), "site_one_eye": eye_report}
    # what the fitted thresholds do on the sample they were fitted on (optimistic: no held-out patients)
    changed = {}
    if pairs.any():
        before = score_partial(labels.y[pairs], probs[pairs], pair_thresholds, resamples=0)["classes"]
        after = score_partial(labels.y[pairs], probs[pairs], raw_thresholds(fitted), resamples=0)["classes"]
        keys = ("sensitivity", "sensitivity_95", "specificity", "specificity_95")
        changed = {
            c: {
                "positives": before[c]["positives"],
                "negatives": before[c]["negatives"],
                "before": {k: before[c][k] for k in keys},
                "after": {k: after[c][k] for k in keys},
            }
            for c in before
        }
    record = {
        "ensemble": fitted.to_dict(),
        **eye,
        "fitted_on": f"site sample {Path(table).name} ({int(scored.sum())} patients)",
        "flip_tta": False,
        "site": report,
        "objective": "sensitivity + specificity"
        if operating_point is None
        else f"{operating_point[0]} {operating_point[1]:g}",
        "run_fingerprint": card_fingerprints(run_dir),
        "sample_before_after": changed,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, record)
    load_calibration_file(out)  # what predict will read, checked now
    return record


def adapt_site(
    run_dir: str | os.PathLike,
    patients: list,
    out: str | os.PathLike,
    batch_size: int = 16,
    gate: bool | None = None,
    progress: bool = True,
) -> dict:
    """Align a camera's photos to the run's training photos without a label
    (:func:`..training.adaptation.fit_alignment`, per view) and write ``out`` (``site.json``), which
    predict, the station and the export take (``--site``); it names the model it was made for."""
    claim_output_file(
        out,
        "site file",
        lambda record: (
            isinstance(record, dict)
            and "views" in record
            and "run_fingerprint" in record
            and "unlike_training" in record
        ),
        {"run folder": run_dir},
    )
    from tqdm.auto import tqdm

    from ..training.adaptation import MIN_SITE_PHOTOS, fit_alignment
    from .predict import UNLIKE_VIEW, Predictor

    predictor = Predictor(run_dir, gate=gate)
    if not predictor.references or not predictor.eye_heads:
        raise FundusError(
            f"{run_dir} has no feature references or one-eye heads (a cross-fitted run trained before them): "
            "retrain it with train_pair.py --head-fit cross-fit, or use the bundled model"
        )
    features = {v: [] for v in predictor.views}
    refused = []
    bar = tqdm(total=len(patients), desc="site photos", unit="patient", disable=None if progress else True)
    for first in range(0, len(patients), batch_size):
        chunk = patients[first : first + batch_size]
        got, read = predictor.photo_features(chunk)
        refused += [(p.patient_id, note) for p, _, note in read.rejected]
        if read.usable:
            for v in predictor.views:
                features[v].append(got[v])
        bar.update(len(chunk))
    bar.close()
    photos = sum(len(f) for f in features[predictor.views[0]])
    if photos < MIN_SITE_PHOTOS:
        raise FundusError(
            f"{photos} usable photos of the site ({len(refused)} patients refused by the gate); adapting needs "
            f"{MIN_SITE_PHOTOS} or more"
        )
    stacked = {v: np.concatenate(f) for v, f in features.items()}
    alignments = {
        v: fit_alignment(stacked[v], predictor.references[v], predictor.eye_heads[v]) for v in predictor.views
    }
    ref = predictor.references[UNLIKE_VIEW]
    before = float(np.mean(ref.distance(stacked[UNLIKE_VIEW]) > ref.warn_distance))
    after = float(np.mean(ref.distance(alignments[UNLIKE_VIEW].apply(stacked[UNLIKE_VIEW])) > ref.warn_distance))
    record = {
        "format": SITE_FORMAT,
        "run_fingerprint": card_fingerprints(run_dir),
        "photos": photos,
        "patients_refused": len(refused),
        "method": "aligned on the site's most normal-looking photos (training.adaptation)",
        "unlike_training": {"before": before, "after": after},
        "views": {v: a.to_dict() for v, a in alignments.items()},
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, record)
    return record
