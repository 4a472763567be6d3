"""Load the two view models, predict a split, average, optionally calibrate, and score with the ODIR metric."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import keras
import numpy as np

from ..data.batches import predict_patients
from ..data.manifest import load_manifest
from ..errors import FundusError, ModelCardError
from ..fileio import atomic_write_json, atomic_write_text, claim_folder, csv_for_people, read_json_file, refuse_overlap
from ..labels import LABEL_NAMES, LABELS, VIEWS
from ..metrics import THRESHOLD, odir_score, per_class_scores, sensitivity_specificity
from ..training.train import CARD_NAME, MODEL_NAME
from .calibration import Calibration, fit_calibration, fit_operating_point, load_out_of_fold

# files an earlier score in the folder may hold that this one might not rewrite
STALE_SCORE_FILES = ("calibration.json", "report.html")


def exact(p: float) -> str:
    """A probability as the shortest text that reads back as the same float: rounding to a few
    decimals ties patients whose order the model kept, and changes an AUC computed from the file."""
    return repr(float(p))


def load_view_model(run_dir: str | os.PathLike, view: str) -> tuple[keras.Model, dict]:
    """Load ``run_dir/<view>/model.keras`` (Keras safe mode) and its card; refuse a mismatch."""
    folder = Path(run_dir) / view
    card_path, model_path = folder / CARD_NAME, folder / MODEL_NAME
    if not model_path.is_file() or not card_path.is_file():
        raise ModelCardError(
            f"{folder}: no trained {view} model ({MODEL_NAME} and {CARD_NAME}); run scripts/train_pair.py first"
        )
    try:
        card = read_json_file(card_path, "a model card")
    except FundusError as exc:
        raise ModelCardError(str(exc)) from None
    if not isinstance(card, dict):
        raise ModelCardError(f"{card_path}: not a model card (a JSON object)")
    if card.get("view") != view:
        raise ModelCardError(
            f"{card_path}: card says view {card.get('view')!r}, but it was loaded as the {view!r} model"
        )
    if card.get("labels") != list(LABELS):
        raise ModelCardError(f"{card_path}: card labels {card.get('labels')} differ from this library's {list(LABELS)}")
    model = load_keras_file(model_path)
    size = int(model.inputs[0].shape[1])
    if size != card.get("input_size"):
        raise ModelCardError(f"{model_path}: model input is {size} px but its card says {card.get('input_size')}")
    return model, card


def load_keras_file(path: str | os.PathLike) -> keras.Model:
    """Load a ``.keras`` file in Keras' safe mode (no code in it runs); a truncated, foreign or
    code-carrying file is one line naming the file, not a Keras traceback."""
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile and h5py errors, TypeError...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "safe_mode" in str(exc) or "lambda" in str(exc).lower():
            reason = "it holds code (a Lambda layer or custom function) that safe mode refuses to run"
        raise ModelCardError(f"{path}: cannot load this model file: {reason[:300]}") from None


def check_views_match_card(card: dict, prep_dir: str | os.PathLike) -> None:
    """Refuse views preprocessed at another size than the model was trained on."""
    record = Path(prep_dir) / "preprocess.json"
    if not record.is_file():
        raise FundusError(f"{record} not found; score needs the output folder of scripts/preprocess.py")
    size = json.loads(record.read_text())["settings"]["size"]
    if size != card["input_size"]:
        raise ModelCardError(
            f"the {card['view']} model was trained on {card['input_size']} px views but {prep_dir} holds "
            f"{size} px views; preprocess with --size {card['input_size']} into another folder"
        )


def predict_manifest_split(
    model: keras.Model,
    card: dict,
    view_dir: str | os.PathLike,
    split: str,
    batch_size: int = 16,
    flip_tta: bool = False,
):
    """(patient ids, labels, probabilities) for one split of a preprocessed view folder."""
    check_views_match_card(card, Path(view_dir).parent)
    manifest = load_manifest(Path(view_dir) / "manifest.csv").select(split)
    probs = predict_patients(model, manifest, int(card["input_size"]), batch_size, flip_tta=flip_tta)
    return manifest.patient_ids, manifest.label_matrix(), probs


def average_probabilities(probs: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> np.ndarray:
    """Weighted mean of per-view probability arrays (equal weights by default)."""
    weights = weights or {view: 1.0 for view in probs}
    if set(weights) != set(probs):
        raise FundusError(f"ensemble weights name {sorted(weights)} but the models are {sorted(probs)}")
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise FundusError(f"ensemble weights must be non-negative with a positive sum, got {weights}")
    return sum(weights[v] * probs[v] for v in probs) / total


def _scores(y_true: np.ndarray, y_prob: np.ndarray) -> dict:
    return {**odir_score(y_true, y_prob), "per_class": per_class_scores(y_true, y_prob)}


def predictions_csv(ids: list[str], probs: np.ndarray) -> str:
    """The official ODIR submission format: ``ID,N,D,G,C,A,H,M,O`` with probabilities.

    Ids that a spreadsheet would run as a formula are neutralised; numeric ODIR ids are unchanged.
    """
    return csv_for_people(["ID", *LABELS], [[pid, *(exact(p) for p in row)] for pid, row in zip(ids, probs)])


def card_fingerprints(run_dir: str | os.PathLike, views: tuple[str, ...] | None = None) -> dict[str, str | None]:
    """The run's fingerprint: the SHA-256 of each view model's card file as it is on disk (None where
    missing), what predict records and the export records, so the two name one model alike."""
    out = {}
    for view in views or run_views(run_dir):
        card = Path(run_dir) / view / CARD_NAME
        out[view] = hashlib.sha256(card.read_bytes()).hexdigest() if card.is_file() else None
    return out


def run_views(run_dir: str | os.PathLike) -> tuple[str, ...]:
    """The view models a training run holds, in :data:`VIEWS` order (a run may hold one)."""
    held = tuple(v for v in VIEWS if (Path(run_dir) / v / MODEL_NAME).is_file())
    if not held:
        raise ModelCardError(
            f"{run_dir}: no trained view model ({', '.join(f'{v}/{MODEL_NAME}' for v in VIEWS)}); "
            "run scripts/train_pair.py first"
        )
    return held


def trivial_rows(train_labels: np.ndarray, y_true: np.ndarray) -> dict[str, dict]:
    """Scores of two predictors that never look at a photo, to read the models' scores against.

    ``all-zero`` predicts no finding; ``class prior`` predicts each class's training-split rate
    for every patient. The pooled F1 and AUC of these are far from zero (F1 0.85 for all-zero on
    ODIR), so a model is only as good as its margin over them.
    """
    prior = np.broadcast_to(train_labels.mean(axis=0), y_true.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the models' rows already warned about undefined classes
        return {"all-zero": _scores(y_true, np.zeros(y_true.shape)), "class prior (train)": _scores(y_true, prior)}


def predictions_detail_csv(ids: list[str], probs: dict[str, np.ndarray], labels: np.ndarray | None = None) -> str:
    """Per patient: the ensemble's and each view model's probabilities, and the labels when known."""
    header = ["ID", *(f"{name}_{c}" for name in probs for c in LABELS)]
    if labels is not None:
        header += [f"label_{c}" for c in LABELS]
    rows = []
    for i, pid in enumerate(ids):
        row = [pid, *(exact(p[i, j]) for p in probs.values() for j in range(len(LABELS)))]
        rows.append(row + ([str(int(v)) for v in labels[i]] if labels is not None else []))
    return csv_for_people(header, rows)


def score_run(
    run_dir: str | os.PathLike,
    prep_dir: str | os.PathLike,
    split: str = "val",
    weights: dict[str, float] | None = None,
    out_dir: str | os.PathLike | None = None,
    views: tuple[str, ...] | None = None,
    force: bool = False,
    flip_tta: bool = False,
    calibrate_on: str | None = None,
    operating_point: tuple[str, float] | None = None,
) -> dict:
    """Score each view model and their average on ``split``; write predictions.csv and score.json.

    ``flip_tta`` also predicts the mirrored eyes and averages. ``calibrate_on`` names another
    split whose predictions fit a per-class calibration (:mod:`.calibration`) for each model
    and for the ensemble; it is written to ``calibration.json``. ``operating_point``
    (``("sensitivity", 0.9)``) sets each class's threshold on those predictions for that
    sensitivity (or specificity) instead of the metric's best. The score gives, per class,
    sensitivity and specificity with 95% intervals at the thresholds in use, and the ensemble's
    scores by sex and age band. Refuses to replace an earlier score in ``out_dir`` unless ``force``.
    """
    views = views or run_views(run_dir)  # one view: that model alone is the ensemble
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / f"score_{split}"
    if (out / "score.json").exists() and not force:
        raise FundusError(f"{out} already holds a score; pass --force to replace it or --out to write elsewhere")
    cross_fitted = any(_head_fit(run_dir, view) == "cross_fit" for view in views)
    if cross_fitted and split in ("train", "val"):
        raise FundusError(
            f"{run_dir}'s heads were cross-fitted on every train and val patient: scoring {split} would "
            "grade patients they learned from; score test"
        )
    if calibrate_on == OUT_OF_FOLD:
        if not cross_fitted:
            raise FundusError(
                f"{run_dir} was not cross-fitted (train_pair --head-fit cross-fit): it has no out-of-fold "
                "predictions; calibrate on val"
            )
        if weights is not None:
            raise FundusError(
                "the run's out-of-fold calibration is of the equal-weight ensemble; drop --ensemble-weights"
            )
    if operating_point is not None and calibrate_on is None:
        raise FundusError(
            "an operating point is set on other patients' predictions: give --calibrate-on (val, or "
            "out-of-fold for a cross-fitted run) with --operating-point"
        )
    if calibrate_on == split:
        raise FundusError(
            f"calibrating on the scored split {split!r} would grade patients the calibration has seen; "
            "calibrate on another split (val when scoring test)"
        )
    # before the models run: a folder of the user's files (or a file) is refused at once, not after predicting
    refuse_overlap(out, {"run": run_dir, "preprocessed views": prep_dir})
    claim_folder(out, "a score", adopt_if=("score.json",))
    splits = (split,) if calibrate_on in (None, OUT_OF_FOLD) else (split, calibrate_on)
    probs: dict[str, dict[str, np.ndarray]] = {s: {} for s in splits}
    ids: dict[str, list[str]] = {}
    y_true: dict[str, np.ndarray] = {}
    for view in views:
        model, card = load_view_model(run_dir, view)
        for s in splits:
            view_ids, labels, probs[s][view] = predict_manifest_split(
                model, card, Path(prep_dir) / view, s, flip_tta=flip_tta
            )
            if ids.setdefault(s, view_ids) != view_ids:
                raise FundusError(f"the views' manifests hold different {s} patients; preprocess them together")
            y_true[s] = labels
    for s in splits:
        probs[s]["ensemble"] = average_probabilities(probs[s], weights)
    scored = probs[split]
    fit_y, fit_probs = None, {}
    if calibrate_on == OUT_OF_FOLD and operating_point is not None:
        fit_y, fit_probs = load_out_of_fold(run_dir, views)
    elif calibrate_on == OUT_OF_FOLD:
        fitted = json.loads((Path(run_dir) / "calibration.json").read_text())
        calibrations = {name: Calibration.from_dict(fitted[name]) for name in scored}
    elif calibrate_on is not None:
        fit_y, fit_probs = y_true[calibrate_on], probs[calibrate_on]
    if fit_y is not None:
        if operating_point is not None:
            calibrations = {name: fit_operating_point(fit_y, p, *operating_point) for name, p in fit_probs.items()}
        else:
            calibrations = {name: fit_calibration(fit_y, p) for name, p in fit_probs.items()}
    if calibrate_on is not None:
        scored = {name: calibrations[name].apply(p) for name, p in scored.items()}
        record = {"fitted_on": calibrate_on, "flip_tta": flip_tta, **{n: c.to_dict() for n, c in calibrations.items()}}
        if operating_point is not None:
            measure, target = operating_point
            record["operating_point"] = {
                "measure": measure,
                "target": target,
                "on_fitting_patients": sensitivity_specificity(
                    fit_y, calibrations["ensemble"].apply(fit_probs["ensemble"]) > 0.5
                ),
            }
        atomic_write_json(out / "calibration.json", record)
    train_labels = (
        load_manifest(Path(prep_dir) / views[0] / "manifest.csv", check_files=False).select("train").label_matrix()
    )
    report = {
        "split": split,
        "patients": len(ids[split]),
        "ensemble_weights": weights or {v: 1.0 for v in views},
        "flip_tta": flip_tta,
        "calibrated_on": calibrate_on,
        "operating_point": None if operating_point is None else dict(zip(("measure", "target"), operating_point)),
        "ensemble": _scores(y_true[split], scored["ensemble"]),
        "decisions": sensitivity_specificity(y_true[split], scored["ensemble"] > THRESHOLD),
        "subgroups": subgroup_scores(
            load_manifest(Path(prep_dir) / views[0] / "manifest.csv", check_files=False).select(split),
            y_true[split],
            scored["ensemble"],
        ),
        "models": {view: _scores(y_true[split], scored[view]) for view in views},
        "trivial": trivial_rows(train_labels, y_true[split]),
    }
    for stale in STALE_SCORE_FILES:  # an earlier score's calibration or page must not pass for this one's
        if stale != "calibration.json" or calibrate_on is None:
            (out / stale).unlink(missing_ok=True)
    atomic_write_text(out / "predictions.csv", predictions_csv(ids[split], scored["ensemble"]))
    detail = {"ensemble": scored["ensemble"], **{v: scored[v] for v in views}}
    atomic_write_text(out / "predictions_detail.csv", predictions_detail_csv(ids[split], detail, y_true[split]))
    atomic_write_json(out / "score.json", report)
    report["out_dir"] = str(out)
    return report


OUT_OF_FOLD = "out-of-fold"  # score_run's calibrate_on for a cross-fitted run: the run's own calibration


def _head_fit(run_dir: str | os.PathLike, view: str) -> str:
    card = Path(run_dir) / view / CARD_NAME
    return json.loads(card.read_text()).get("config", {}).get("head_fit", "epochs") if card.is_file() else "epochs"


AGE_BANDS = ((0, 40, "under 40"), (40, 60, "40-59"), (60, 200, "60 and over"))
MIN_SUBGROUP = 30  # patients a subgroup needs for a bootstrap interval


def subgroup_scores(manifest, y_true: np.ndarray, y_prob: np.ndarray, resamples: int = 200, seed: int = 0) -> dict:
    """The ensemble's final and pooled AUC (95% bootstrap intervals over the subgroup's patients)
    and per-class AUC by sex and by age band, from the manifest's ``sex`` and ``age`` columns (ODIR
    gives both); a subgroup under :data:`MIN_SUBGROUP` patients says it is too small for an interval."""
    ages, sexes = [], []
    for p in manifest.patients:
        try:
            ages.append(float(p.extra.get("age", "")))
        except ValueError:
            ages.append(np.nan)
        sexes.append(str(p.extra.get("sex", "")).strip().lower())
    ages = np.array(ages)
    groups = {f"sex: {s}": np.array([x == s for x in sexes]) for s in ("female", "male")}
    groups.update({f"age: {name}": (ages >= lo) & (ages < hi) for lo, hi, name in AGE_BANDS})
    rng = np.random.default_rng(seed)
    out = {}
    for name, member in groups.items():
        n = int(member.sum())
        if n == 0:
            continue
        y, p = y_true[member], y_prob[member]
        row = {"patients": n}
        if y.min() == y.max():
            out[name] = {**row, "note": "one label value only: no score"}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.update({k: float(v) for k, v in odir_score(y, p).items()})
            row["per_class_auc"] = {c: v["auc"] for c, v in per_class_scores(y, p).items()}
        if n < MIN_SUBGROUP:
            row["note"] = f"too small for an interval ({n} patients; {MIN_SUBGROUP} needed)"
        else:
            boot = []
            for _ in range(resamples):
                i = rng.integers(0, n, n)
                if y[i].min() != y[i].max():
                    s = odir_score(y[i], p[i])
                    boot.append((s["final"], s["auc"]))
            boot = np.array(boot)
            row["final_95"] = [float(v) for v in np.percentile(boot[:, 0], [2.5, 97.5])]
            row["auc_95"] = [float(v) for v in np.percentile(boot[:, 1], [2.5, 97.5])]
        out[name] = row
    return out


def format_score_table(report: dict) -> str:
    """The score report as a plain-text table (pooled metrics, then per-class AUC)."""
    rows = [
        *report.get("trivial", {}).items(),
        *((f"{v} model", s) for v, s in report["models"].items()),
        ("ensemble", report["ensemble"]),
    ]
    extras = [
        x
        for x in (
            "flip TTA" if report.get("flip_tta") else "",
            f"calibrated on {report['calibrated_on']}" if report.get("calibrated_on") else "",
        )
        if x
    ]
    lines = [
        f"ODIR score on split '{report['split']}' ({report['patients']} patients)"
        + (f", {', '.join(extras)}" if extras else ""),
        f"{'model':<21}{'kappa':>8}{'f1':>8}{'auc':>8}{'final':>8}",
    ]
    lines += [f"{name:<21}{s['kappa']:>8.4f}{s['f1']:>8.4f}{s['auc']:>8.4f}{s['final']:>8.4f}" for name, s in rows]
    lines.append(
        "per-class AUC (positives): "
        + "  ".join(
            f"{c}={'n/a' if v['auc'] is None else format(v['auc'], '.3f')}({v['positives']})"
            for c, v in report["ensemble"]["per_class"].items()
        )
    )
    if report.get("decisions"):
        point = report.get("operating_point")
        lines.append(
            "the ensemble's decisions"
            + (
                f" (thresholds for {point['measure']} {point['target']:g} on {report['calibrated_on']})"
                if point
                else ""
            )
            + ": sensitivity / specificity per class, 95% intervals"
        )
        for c, v in report["decisions"].items():
            lines.append(
                f"  {c} ({LABEL_NAMES[c]}): {_proportion(v['sensitivity'], v['sensitivity_95'])} of "
                f"{v['positives']} / {_proportion(v['specificity'], v['specificity_95'])} of {v['negatives']}"
            )
    for name, g in (report.get("subgroups") or {}).items():
        if "final" not in g:
            lines.append(f"  {name}: {g['patients']} patients, {g['note']}")
            continue
        spread = f" [{g['final_95'][0]:.3f}, {g['final_95'][1]:.3f}]" if "final_95" in g else f" ({g['note']})"
        lines.append(f"  {name}: {g['patients']} patients, final {g['final']:.3f}{spread}, AUC {g['auc']:.3f}")
    return "\n".join(lines)


def _proportion(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" + (f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else "")
