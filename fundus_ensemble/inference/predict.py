"""A trained run on new photos: find the patients, make their views exactly as preprocessing
does (:func:`..data.imaging.make_views`), predict with every view model of the run, average
as the ensemble does, and write what a person and the ODIR format need.

Inputs: a folder of photos paired by name (``<id>_left.<ext>`` / ``<id>_right.<ext>`` by
default; a photo that pairs with nothing is one patient with one eye), a manifest whose label
and split columns may be absent, or one patient's ``left``/``right`` photos. Patients are
streamed in batches, so memory does not grow with the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import keras
import numpy as np
from tqdm.auto import tqdm

from ..data.dicom import DICOM_SUFFIXES, DicomHeader, check_laterality, is_dicom, read_dicom_header
from ..data.imaging import (
    DEFAULT_MAX_PIXELS,
    crop_to_fov,
    decode_image,
    encode_png,
    make_views,
    view_to_model_input,
    views_of,
)
from ..data.manifest import (
    check_image_file,
    check_relative_path,
    claim_patient_id,
    read_csv_rows,
    read_text_file,
)
from ..errors import FundusError, ImageError, warn_once
from ..evaluation.calibration import (
    Calibration,
    load_calibration_file,
    load_eye_calibration,
    load_operating_point,
    load_referral,
    raw_thresholds,
    referral_scores,
    run_calibration,
)
from ..evaluation.ensemble import (
    average_probabilities,
    card_fingerprints,
    exact,
    load_view_model,
    predictions_csv,
    run_views,
)
from ..fileio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    claim_folder,
    csv_for_people,
    folder_lock,
    natural_key,
    read_json_file,
    remove_owned,
    sha256_file,
)
from ..labels import LABELS
from ..models.forward import accelerator_count, forward
from ..models.gate import INPUT_SIZE as GATE_SIZE
from ..models.gate import FundusLikeness, image_checks, network_checks
from ..training.hardware import cpu_backend_advice
from ..training.heads import LinearHead, SideHead, fuse
from ..training.train import SIDE_HEAD, load_eye_heads, load_references
from .bundle import card_summary, model_card_path
from .explain import GradCam, ensemble_heatmaps, overlay
from .referral import KINDS, Referral, refer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", *DICOM_SUFFIXES)
DEFAULT_PATTERN = r"(?P<id>.+)_(?P<eye>left|right)"
THRESHOLD = 0.5
HEATMAP_DIR = "heatmaps"
RECORDS_DIR = "records"  # with --report: record-<patient>.pdf, one file per patient to file in its chart
OWNED_FOLDERS = {HEATMAP_DIR: "heatmaps", RECORDS_DIR: "records"}  # folder -> the purpose it is claimed for
RECORD_FILE = "predict.json"  # the job (run, cards, patients, shard) and its counts: what merging checks
# moved in in this order
OUTPUT_FILES = ("report.html", "report.pdf", RECORD_FILE, "worklist.csv", "decisions.csv", "predictions.csv")
STAGING = ".unfinished"  # the run in progress: its job, finished batches and heatmaps
JOB_FILE = "job.json"
BATCH_DIR = "batches"
DISPLAY_SIZE = 256  # overlays are drawn on a crop of the photo at least this large, to be readable
REPORT_MAX_PATIENTS = 200
REPORT_THUMB = 160


@dataclass(frozen=True)
class PatientPhotos:
    """One patient's photos (one may be missing)."""

    patient_id: str
    left: Path | None
    right: Path | None


def patients_in_folder(
    folder: str | os.PathLike, pattern: str = DEFAULT_PATTERN, unnamed_eye: str | None = None
) -> list[PatientPhotos]:
    """Pair the photos of a folder by ``pattern`` (a regex on the file stem with groups ``id`` and ``eye``).

    A DICOM photo whose name does not match is paired by its header (PatientID and
    ImageLaterality); one whose name matches must not contradict its header's laterality. Any
    other photo whose name says no eye is refused, naming it, unless ``unnamed_eye`` (``left`` or
    ``right``) says which eye such photos show: an answer is about one eye, and the line names it.
    """
    if unnamed_eye not in (None, "left", "right"):
        raise FundusError(f"--unnamed-eye {unnamed_eye!r}: expected left or right")
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
        pid, eye = (match["id"], match["eye"].lower()) if match else (path.stem, unnamed_eye)
        if match and eye not in ("left", "right"):
            raise FundusError(f"{path}: --pattern matched eye {match['eye']!r}; expected left or right")
        header = _dicom_header(path)
        if header is not None and header.laterality is not None and not match:
            pid, eye = (
                header.patient_id or path.stem,
                header.laterality,
            )  # a camera's file: its header says whose and which eye
        if eye is None:
            raise FundusError(
                f"{path}: its name says no eye (--pattern {pattern}); name it <id>_left or <id>_right, or say "
                "which eye such photos show with --unnamed-eye left|right"
            )
        slot = eyes.setdefault(pid, {})
        if eye in slot:
            raise FundusError(f"{folder}: patient {pid!r} has two {eye} photos ({slot[eye].name} and {path.name})")
        slot[eye] = path
    if not eyes:
        raise FundusError(f"{folder}: no photos ({', '.join(IMAGE_SUFFIXES)})")
    # patients in the order a person reads ids (23, 992, 1258), in decisions, the worklist and the report
    ordered = sorted(eyes.items(), key=lambda item: natural_key(item[0]))
    return check_sides([PatientPhotos(pid, e.get("left"), e.get("right")) for pid, e in ordered])


def check_sides(patients: list[PatientPhotos], max_pixels: int | None = None) -> list[PatientPhotos]:
    """``patients``, once every DICOM agrees with the eye it is given as (:func:`..data.dicom.check_laterality`):
    the job is refused, naming the file, as the station refuses the request and preprocess the photo.
    A damaged DICOM passes here and is rejected with its reason when decoded."""
    for patient in patients:
        for eye in ("left", "right"):
            path = getattr(patient, eye)
            if path is None:
                continue
            try:
                check_laterality(path, eye, max_pixels)
            except ImageError as exc:
                if "ImageLaterality" in str(exc):
                    raise FundusError(f"{path}: {exc}") from None
    return patients


def _dicom_header(path: Path) -> DicomHeader | None:
    """The header of a DICOM photo; None for other photos and for a damaged DICOM (whose decoding
    rejects it later with the reason, as for any unreadable photo)."""
    if not is_dicom(path):
        return None
    try:
        return read_dicom_header(path)
    except ImageError:
        return None


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
        pid = claim_patient_id(fields[column["patient_id"]], path, index, seen)
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
    return check_sides(patients)


def predict_photos(
    run_dir: str | os.PathLike,
    patients: list[PatientPhotos],
    out_dir: str | os.PathLike,
    batch_size: int = 16,
    force: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    calibration: str | os.PathLike | None = None,
    explain: bool = False,
    explain_classes: list[str] | None = None,
    report: bool = False,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    gate: bool | None = None,
    site: str | os.PathLike | None = None,
    operating_point: str | None = None,
) -> dict:
    """Predict every patient; write ``predictions.csv`` and ``decisions.csv`` to ``out_dir``.

    Returns counts and the throughput. A patient whose photos are all unusable gets
    ``status=rejected`` with the reasons in ``decisions.csv``, never an exception.
    ``calibration`` is a ``calibration.json`` of ``score.py --calibrate-on``: its ensemble fit
    sets the per-class thresholds and the probabilities of ``predictions.csv``, as in score.
    ``explain`` writes Grad-CAM heatmaps (:mod:`.explain`) to ``out_dir/heatmaps`` for
    ``explain_classes``, or for each patient's classes decided positive when it is None.
    ``report`` (implies ``explain``) writes ``report.html`` and ``report.pdf``, one record per patient (the first
    :data:`REPORT_MAX_PATIENTS`, so the page stays readable and memory bounded).

    Each batch's results are kept in ``out_dir`` as it finishes; ``resume`` continues a killed
    run of the same job from its last finished batch (no patient predicted twice, none lost).
    ``gate`` (None: :func:`gate_default`, on) refuses the photos that are not gradable
    (:mod:`..data.quality`, :mod:`..models.gate`): such an eye gets no decision and its reason; a
    patient with none is "Not gradable: retake ...".
    ``site`` is a ``site.json`` of ``scripts/adapt_site.py``: the camera's alignment, folded into the heads.
    ``operating_point`` (``sensitivity=0.90``, ``specificity=0.90``) decides at that operating point of
    the calibration (the run's own unless ``calibration`` is given), fitted out of fold.
    ``shard`` ``(i, n)`` predicts only the patients whose id hashes to shard ``i`` (from 1) of ``n``, so
    ``n`` machines split a folder without talking to each other; :mod:`.merge` joins them.
    """
    explain = explain or report
    out = Path(out_dir)
    if resume and report:
        raise FundusError("--report is made in one pass; run without --resume (or without --report)")
    if shard is not None:
        patients = [p for p in patients if in_shard(p.patient_id, *shard)]
    _, source = load_calibration_file(calibration) if calibration is not None else (None, "default 0.5")
    if site is not None and not Path(site).is_file():
        raise FundusError(
            f"--site {site}: {'is a folder; give the site.json in it' if Path(site).is_dir() else 'not found'}"
        )
    claim_folder(out, "predictions")
    with folder_lock(out, "predictions"):
        if (out / "predictions.csv").exists() and not force:  # under the lock: no other run can write here now
            raise FundusError(f"{out} already holds predictions; pass --force to replace them or choose another --out")
        gate = gate_default() if gate is None else gate
        job = {
            **_job(run_dir, patients, batch_size, max_pixels, source, explain, explain_classes, shard),
            "gate": gate,
            "site": None if site is None else sha256_file(site),
            "operating_point": operating_point,
        }
        staging = out / STAGING
        if resume and (staging / JOB_FILE).is_file():
            earlier = json.loads((staging / JOB_FILE).read_text(encoding="utf-8"))
            if earlier != job:
                differ = sorted(k for k in job if job[k] != earlier.get(k))
                raise FundusError(
                    f"{out} holds an unfinished run of another job (it differs in {', '.join(differ)}); "
                    "run it as it was, or without --resume to start over"
                )
        else:
            for leftover in out.glob(f"{STAGING}*"):  # a killed run's: the lock says it is not running
                remove_owned(leftover, "unfinished predictions")
        claim_folder(staging, "unfinished predictions")
        atomic_write_json(staging / JOB_FILE, job)
        summary = _predict_into(
            staging,
            run_dir,
            patients,
            batch_size,
            max_pixels,
            progress,
            calibration,
            explain,
            explain_classes,
            report,
            gate,
            site,
            operating_point,
        )
        atomic_write_json(
            staging / RECORD_FILE, {**job, "predicted": summary["predicted"], "rejected": summary["rejected"]}
        )
        _move_in(staging, out)
        remove_owned(staging, "unfinished predictions")
    summary["out_dir"] = str(out)
    return summary


def in_shard(patient_id: str, index: int, count: int) -> bool:
    """Whether ``patient_id`` belongs to shard ``index`` (from 1) of ``count``: by a hash of the id,
    so the split is the same on every machine whatever order it lists the photos in."""
    if not 1 <= index <= count:
        raise FundusError(f"--shard {index}/{count}: need 1 <= i <= n")
    return int(hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:12], 16) % count == index - 1


def _job(run_dir, patients, batch_size, max_pixels, source, explain, explain_classes, shard) -> dict:
    """What decides a prediction run's outputs: a resumed run must be the same job."""
    listing = hashlib.sha256("\n".join(f"{p.patient_id}\t{p.left}\t{p.right}" for p in patients).encode()).hexdigest()
    return {
        "run": str(Path(run_dir).resolve()),
        "cards_sha256": card_fingerprints(run_dir),
        "patients": len(patients),
        "patients_sha256": listing,
        "batch_size": batch_size,
        "max_pixels": max_pixels,
        "thresholds": source,
        "explain": bool(explain),
        "explain_classes": explain_classes,
        "shard": list(shard) if shard else None,
    }


GATE_VARIABLE = "FUNDUS_QUALITY_GATE"


def gate_default() -> bool:
    """Whether the gradability gate runs when nobody says: on, unless ``FUNDUS_QUALITY_GATE=off``
    (the test suite's synthetic photos are no real fundus photos for it to judge)."""
    value = os.environ.get(GATE_VARIABLE, "on").strip().lower()
    if value not in ("on", "off"):
        raise FundusError(f"{GATE_VARIABLE}={value!r}: expected on or off")
    return value == "on"


class Predictor:
    """A run's view models, loaded once, with the thresholds its decisions are made against: the
    one path from photos to decisions, for :func:`predict_photos` and the web app (:mod:`..serve`).

    ``calibration`` is a ``calibration.json`` of ``score.py --calibrate-on`` (None: 0.5 for
    every class). ``explain`` readies Grad-CAM for :meth:`predict_chunk`'s heatmaps.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        calibration: str | os.PathLike | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        explain: bool = False,
        gate: bool | None = None,
        site: str | os.PathLike | None = None,
        operating_point: str | None = None,
    ):
        self.run_dir = run_dir
        self.max_pixels = max_pixels
        # the gradability gate: a photo it refuses gets no decision, only "retake" and why
        self.gate = gate_default() if gate is None else gate
        self._likeness: FundusLikeness | None = None
        self.fitted, self.source = (
            load_calibration_file(calibration, fingerprint=card_fingerprints(run_dir))
            if calibration is not None
            else (None, "default 0.5")
        )
        self.operating_point = operating_point
        if operating_point is not None:
            self.fitted, self.source = self._operating_point(calibration, operating_point, "operating_points")
        self.views = tuple(run_views(run_dir))
        self.models = {view: load_view_model(run_dir, view) for view in self.views}
        sizes = {card["input_size"] for _, card in self.models.values()}
        if len(sizes) != 1:
            raise FundusError(f"{run_dir}: the view models take different sizes {sorted(sizes)}")
        self.size = sizes.pop()
        advice = cpu_backend_advice(
            keras.backend.backend(), accelerator_count(), str(self.models[self.views[0]][1].get("backbone", ""))
        )
        if advice:
            warn_once(advice)
        self.thresholds = raw_thresholds(self.fitted) if self.fitted is not None else [THRESHOLD] * len(LABELS)
        self.cams = {view: GradCam(model) for view, (model, _) in self.models.items()} if explain else {}
        # every head reads the backbone's pooled features of one photo: one pass per photo and view
        self.encoders = {view: model.get_layer("eye_encoder") for view, (model, _) in self.models.items()}
        self.heads = {view: _dense_head(model) for view, (model, _) in self.models.items()}
        self.eye_heads = load_eye_heads(run_dir, self.views)  # {} for a run without: the pair head answers
        self.eye_fitted = self._eye_calibration(calibration) if self.eye_heads else None
        if operating_point is not None and self.eye_heads:
            self.eye_fitted = self._operating_point(calibration, operating_point, "eye_operating_points")[0]
        if not self.eye_heads:
            self.eye_thresholds = self.thresholds
        elif self.eye_fitted is not None:
            self.eye_thresholds = raw_thresholds(self.eye_fitted)
        else:
            self.eye_thresholds = [THRESHOLD] * len(LABELS)
        # the "any referable finding" score's thresholds (1 - p(N)), pairs and one eye: the run's, unless
        # the calibration given carries its own; none when deciding at 0.5
        self.referral_thresholds = self._referral_thresholds(calibration)
        self.side = None
        side_file = Path(run_dir) / "color" / SIDE_HEAD
        if "color" in self.models and side_file.is_file():  # a cross-fitted run's: which eye a photo shows
            self.side = SideHead.load(side_file)
        self.references = load_references(run_dir, self.views)  # {} for a run without: no unlike-photo warning
        self.site, self.alignments, self.site_path = None, {}, site
        if site is not None:
            self.site, self.alignments = load_site(site, run_dir, self.references)
            # the site's alignment folded into every head: exact (affine per feature, positive scale)
            self.heads = {v: a.fold(self.heads[v], 2) for v, a in self.alignments.items()}
            self.eye_heads = {v: self.alignments[v].fold(h) for v, h in self.eye_heads.items()}
            if self.side is not None and "color" in self.alignments:
                self.side = dataclasses.replace(self.side, head=self.alignments["color"].fold(self.side.head))

    def _operating_point(self, calibration, name: str, key: str) -> tuple[Calibration, str]:
        """The operating point ``name`` of the calibration given, else of the run's own (fitted out of
        fold when the run was made: :func:`..evaluation.calibration.fit_operating_points`)."""
        path = calibration if calibration is not None else run_calibration(self.run_dir)
        if path is None:
            raise FundusError(
                f"--operating-point {name}: {self.run_dir} has no calibration.json to take it from (a cross-fitted "
                "run and the bundled model have one)"
            )
        fitted = load_operating_point(path, name, key)
        if fitted is None:
            raise FundusError(
                f"--operating-point {name}: {path} has no {key} (made before operating points were kept); "
                "retrain the run with train_pair.py --head-fit cross-fit, or fit one on labelled photos with "
                "calibrate_site.py --operating-point"
            )
        return fitted, f"operating point {name} ({Path(path).name}, fitted out of fold)"

    def _referral_thresholds(self, calibration) -> dict[str, float]:
        if self.fitted is None and calibration is None:
            return {}
        out = {}
        for key in ("referral", "eye_referral"):
            for path in (calibration, run_calibration(self.run_dir)):
                entry = load_referral(path, key)
                if entry is not None:
                    out[key] = float(entry["threshold"])
                    break
        return out

    def _eye_calibration(self, calibration) -> Calibration | None:
        """The calibration of the one-eye answers: the ``eye`` fit of the calibration given, else of
        the run's own (a site's thresholds are for pairs); None when neither has one (0.5 decides)."""
        if self.fitted is None and calibration is None:
            return None
        for path in (calibration, run_calibration(self.run_dir)):
            fitted = load_eye_calibration(path) if path is not None else None
            if fitted is not None:
                return fitted
        return None

    @property
    def provenance(self) -> dict:
        """Which model makes the numbers: the run, whether calibrated, and each view model's card."""
        return {
            "run": str(self.run_dir),
            "warning": self.fitness_warning,
            "calibrated": self.fitted is not None,
            "models": {view: card for view, (_, card) in self.models.items()},
            "model_card": _model_card_text(self.run_dir) and str(model_card_path(self.run_dir)),
            "model_card_summary": card_summary(_model_card_text(self.run_dir) or "") or None,
        }

    @property
    def fitness_warning(self) -> str | None:
        """Why this run should not screen anyone, when its own validation score (out of fold for a
        cross-fitted run) does not beat the image-blind class prior on the same patients (its card's
        ``image_blind``); None when it does, or when its card predates the comparison."""
        behind = []
        for view, (_, card) in self.models.items():
            best, blind = card.get("best_val") or {}, card.get("image_blind")
            if not blind or "val_final_score" not in best:
                continue
            if best["val_final_score"] <= blind["final"] or best.get("val_auc", 1.0) <= blind["auc"]:
                behind.append(
                    f"{view} (validation final {best['val_final_score']:.3f}, AUC {best.get('val_auc', float('nan')):.3f}; "
                    f"the image-blind prior's {blind['final']:.3f}, {blind['auc']:.3f})"
                )
        if not behind:
            return None
        return (
            f"this run's models do not beat a predictor that never looks at a photo: {'; '.join(behind)}. "
            "It learned nothing usable; do not screen patients with it"
        )

    def calibrated(self, ensemble: np.ndarray, one_eye: np.ndarray | None = None) -> np.ndarray:
        """The probabilities predictions.csv holds: the ensemble's, through the calibration if any;
        rows answered from one eye (``one_eye``) through the one-eye answers' own."""
        out = self.fitted.apply(ensemble) if self.fitted is not None else np.array(ensemble, np.float64)
        if one_eye is not None and np.any(one_eye) and self.eye_heads:
            single = np.asarray(one_eye, bool)
            out[single] = self.eye_fitted.apply(ensemble[single]) if self.eye_fitted is not None else ensemble[single]
        return out

    def _gradable_squares(self, chunk: list[PatientPhotos]) -> tuple[dict, dict[int, list[str]], dict]:
        """Each photo of ``chunk`` decoded, judged (:mod:`..data.quality`, then :mod:`..models.gate`,
        unless the gate is off) and cropped to its retina at the models' size: ``{(patient index,
        eye): square}``, per patient the reasons its other photos were not used, and ``{(patient
        index, eye): caution}`` for the photos screened though poor (:data:`..data.quality.POOR`)."""
        squares, reasons, gated = {}, {k: [] for k in range(len(chunk))}, {}
        for k, patient in enumerate(chunk):
            for eye in ("left", "right"):
                photo = getattr(patient, eye)
                if photo is None:
                    continue
                try:
                    image = decode_image(photo, self.max_pixels)
                    if self.gate:
                        gated[k, eye] = image_checks(image)
                        if gated[k, eye].status == "refused":
                            raise ImageError(gated[k, eye].text)
                    squares[k, eye] = crop_to_fov(image, self.size)
                except ImageError as exc:
                    reasons[k].append(f"{eye}: {exc}")
        poor = {}
        kept = [key for key in gated if key in squares]
        for (k, eye), photo in zip(kept, network_checks([gated[key] for key in kept], self._gate_classifier())):
            if photo.status == "refused":
                del squares[k, eye]
                reasons[k].append(f"{eye}: {photo.text}")
            elif photo.status == "poor":
                poor[k, eye] = photo.text
        return squares, reasons, poor

    def _side_checks(self, features: np.ndarray, usable: list) -> list[str | None]:
        """Per usable patient, a warning when a photo looks like the other eye's (the run's side head,
        its thresholds set for 1 % false warnings on held-back patients), else None. ``features``:
        the colour view's (patients, 2, F), the left slot first."""
        p_right = self.side.probability_right(features).reshape(-1, 2)
        checks = []
        for k, (_, present, _) in enumerate(usable):
            p_left_slot, p_right_slot = p_right[k]
            if present == ["left", "right"] and p_left_slot - p_right_slot > self.side.pair:
                checks.append(
                    f"the two photos look swapped: the left one like a right eye ({p_left_slot:.2f}), the right one "
                    f"like a left eye ({1 - p_right_slot:.2f}); check which is which"
                )
            elif "left" in present and p_left_slot > self.side.single:
                checks.append(f"the left photo looks like a right eye ({p_left_slot:.2f}); check which eye it is")
            elif "right" in present and 1 - p_right_slot > self.side.single:
                checks.append(f"the right photo looks like a left eye ({1 - p_right_slot:.2f}); check which eye it is")
            else:
                checks.append(None)
        return checks

    def _photo_features(self, view: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Each photo's pooled features in ``view`` (photos, F), one backbone pass each; with Grad-CAM
        readied, the pass keeps the last block's maps too (the features are their mean)."""
        if view in self.cams:
            maps = self.cams[view].feature_maps(images)
            return GradCam.pooled(maps), maps
        return forward(self.encoders[view], images), None

    def read_chunk(self, chunk: list[PatientPhotos]) -> ChunkInputs:
        """Each photo of ``chunk`` decoded, judged by the gate and made into every view's model input
        (:func:`..data.imaging.views_of`, preprocessing's own path), one row per photo."""
        squares, reasons, poor = self._gradable_squares(chunk)
        read = ChunkInputs(images=sum((p.left is not None) + (p.right is not None) for p in chunk))
        read.inputs = {v: [] for v in self.views}
        for k, patient in enumerate(chunk):
            present = [eye for eye in ("left", "right") if (k, eye) in squares]
            if not present:
                read.rejected.append((patient, None, "; ".join(reasons[k]) or "no photo"))
                continue
            rows = {}
            for eye in present:
                rows[eye] = len(read.inputs[self.views[0]])
                for v, a in views_of(squares[k, eye], self.views).items():
                    read.inputs[v].append(view_to_model_input(a))
            read.usable.append((patient, present, "; ".join(reasons[k])))
            read.cautions.append({eye: poor[k, eye] for eye in present if (k, eye) in poor})
            read.slots.append([rows[present[0]], rows[present[-1]]])  # a one-eyed patient's photo in both slots
            read.photos.append(rows)
        return read

    def warm_up(self) -> None:
        """Trace every network once on black images (each view's backbone, or its Grad-CAM maps, and
        the gate's classifier, its retina head read): a station's first patient then waits no longer
        than the next, and a broken head file stops the station before it serves anyone."""
        black = np.zeros((1, self.size, self.size, 3), np.float32)
        for view in self.views:
            self._photo_features(view, black)
        if self.gate:
            self._gate_classifier().judge([np.zeros((GATE_SIZE, GATE_SIZE, 3), np.uint8)])

    def _gate_classifier(self) -> FundusLikeness:
        """The gate's network (ImageNet classes and the retina head), built on first use (a run with the gate
        off never builds it)."""
        if self._likeness is None:
            self._likeness = FundusLikeness()
        return self._likeness

    def photo_features(self, chunk: list[PatientPhotos]) -> tuple[dict[str, np.ndarray], ChunkInputs]:
        """Every usable photo's pooled features per view ``(photos, F)``, as the heads read them, and
        what :meth:`read_chunk` found (site alignment is fitted on these: the site's own features)."""
        read = self.read_chunk(chunk)
        if not read.usable:
            return {v: np.zeros((0, 0), np.float32) for v in self.views}, read
        return {v: self._photo_features(v, np.stack(read.inputs[v]))[0] for v in self.views}, read

    def predict_chunk(
        self,
        chunk: list[PatientPhotos],
        explain_classes: list[str] | None = None,
        heatmap_folder: Path | None = None,
        stems: dict[str, str] | None = None,
        collect: dict | None = None,
    ) -> tuple[list, list[list[str]], int]:
        """One batch of patients: ``(results, heatmap rows, photos read)``.

        ``results`` holds ``(patient, result, note)`` in ``chunk``'s order, ``result`` None for a
        patient with no usable photo (``note`` says why), else the ensemble's, each view's and each
        eye's probabilities. With Grad-CAM readied, heatmaps of ``explain_classes`` (None: the
        classes decided positive) are made: written to ``heatmap_folder`` when given, and with
        the eyes' photos put in ``collect`` per patient when given.
        """
        views, size = self.views, self.size
        explained: list[list[str]] = []
        read = self.read_chunk(chunk)
        results, usable, images = read.rejected, read.usable, read.images
        if not usable:
            return results, explained, images
        inputs, cautions, slot_rows, photo_rows = read.inputs, read.cautions, read.slots, read.photos
        slots = np.array(slot_rows)
        one_eyed = np.array([len(present) == 1 for _, present, _ in usable])
        per_view, per_eye, eye_features, maps = {}, {}, {}, {}
        unlike = np.zeros(len(inputs[views[0]]), bool)
        for v in views:
            features, maps[v] = self._photo_features(v, np.stack(inputs[v]))
            if v == UNLIKE_VIEW and v in self.references:
                aligned = self.alignments[v].apply(features) if v in self.alignments else features
                unlike = self.references[v].distance(aligned) > self.references[v].warn_distance
            eye_features[v] = features[slots]  # (patients, 2, F), left slot first
            per_view[v] = self.heads[v].predict(fuse(eye_features[v], "max_mean"))
            per_eye[v] = self._each_eye(v, eye_features[v])
        pair = average_probabilities(per_view)
        alone = average_probabilities(per_eye)  # (patients, 2, classes): each eye's own answer
        # a patient with one usable photo is answered by that eye alone (the one-eye head, when the
        # run has one, with its own thresholds); a pair by the pair heads
        ensemble = np.where(one_eyed[:, None], alone[:, 0], pair) if self.eye_heads else pair
        thresholds = np.where(one_eyed[:, None], self.eye_thresholds, self.thresholds)
        side_checks = (
            self._side_checks(eye_features["color"], usable) if self.side is not None else [None] * len(usable)
        )
        if self.cams:
            explained += _explain_chunk(
                self.cams,
                {v: maps[v][slots] for v in views},
                one_eyed,
                usable,
                ensemble,
                thresholds,
                explain_classes,
                size,
                heatmap_folder,
                self.max_pixels,
                stems if stems is not None else {},
                collect,
                {v: _as_pair_head(h) for v, h in self.eye_heads.items()},
                {v: _kernel(h) for v, h in self.heads.items()},
            )
        for k, (patient, present, note) in enumerate(usable):
            results.append(
                (
                    patient,
                    {
                        "ensemble": ensemble[k],
                        "views": {v: per_view[v][k] for v in views},
                        "eyes": {
                            (v, eye): per_eye[v][k, ("left", "right").index(eye)] for v in views for eye in present
                        },
                        "side_check": side_checks[k],
                        "answered_from": ANSWERED_FROM_PAIR if len(present) == 2 else f"{present[0]} eye",
                        "thresholds": [float(t) for t in thresholds[k]],
                        "quality": cautions[k],
                        "referral_score": float(referral_scores(ensemble[k])),
                        "referral_threshold": self.referral_thresholds.get(
                            "eye_referral" if one_eyed[k] and self.eye_heads else "referral"
                        ),
                        "unlike_training": [e for e in present if unlike[photo_rows[k][e]]],
                    },
                    note,
                )
            )
        order = {id(p): i for i, p in enumerate(chunk)}  # rejected first above: back to the input's order
        results.sort(key=lambda r: order[id(r[0])])
        return results, explained, images

    def _each_eye(self, view: str, features: np.ndarray) -> np.ndarray:
        """(patients, 2, classes): each slot's photo answered alone, by the view's one-eye head, or,
        in a run without one, by the pair head with the photo in both slots."""
        if view in self.eye_heads:
            return (
                self.eye_heads[view].predict(features.reshape(-1, features.shape[-1])).reshape(*features.shape[:2], -1)
            )
        head = self.heads[view]
        return np.stack([head.predict(fuse(features[:, [k, k]], "max_mean")) for k in (0, 1)], axis=1)


@dataclass
class ChunkInputs:
    """A chunk of patients read for the models (:meth:`Predictor.read_chunk`)."""

    images: int = 0  # photos given
    rejected: list = dataclasses.field(default_factory=list)  # (patient, None, why) with no usable photo
    usable: list = dataclasses.field(default_factory=list)  # (patient, eyes used, why others were not)
    cautions: list = dataclasses.field(default_factory=list)  # per usable patient: eye -> poor-photo caution
    slots: list = dataclasses.field(default_factory=list)  # per usable patient: [left slot row, right slot row]
    photos: list = dataclasses.field(default_factory=list)  # per usable patient: eye -> row
    inputs: dict = dataclasses.field(default_factory=dict)  # view -> one model input per row


ANSWERED_FROM_PAIR = "both eyes"
UNLIKE_VIEW = "color"  # the view whose features say a photo looks unlike the training photos (a camera's colour)
UNLIKE_SHARE = 0.05  # a batch with more photos unlike the training photos than this is said so (1 % expected)
SITE_FORMAT = "fundus-ensemble site alignment 1"
SITE_MAX_BYTES = 4_000_000  # a site file is two views' 2 x F numbers: about 100 kB


def load_site(path: str | os.PathLike, run_dir, references: dict) -> tuple[dict, dict]:
    """A ``site.json`` of ``scripts/adapt_site.py``, checked: made for this run (its fingerprint),
    one alignment per view of the run; returns the record and the alignments per view."""
    from ..training.adaptation import SiteAlignment

    path = Path(path)
    if path.is_dir():
        raise FundusError(f"--site {path}: is a folder; give the site.json in it")
    record = read_json_file(path, "a site file of scripts/adapt_site.py", SITE_MAX_BYTES)
    if not isinstance(record, dict) or record.get("format") != SITE_FORMAT or not isinstance(record.get("views"), dict):
        raise FundusError(f"--site {path}: not a {SITE_FORMAT!r} file of scripts/adapt_site.py")
    if not references:
        raise FundusError(f"--site {path}: the run {run_dir} has no feature references (trained before them)")
    if record.get("run_fingerprint") != card_fingerprints(run_dir):
        raise FundusError(
            f"--site {path} was made for another model (its run fingerprint differs from {run_dir}'s); "
            "run scripts/adapt_site.py with this model"
        )
    if set(record["views"]) != set(references):
        raise FundusError(f"--site {path}: views {sorted(record['views'])}, the run's are {sorted(references)}")
    alignments = {
        v: SiteAlignment.from_dict(record["views"][v], references[v], f"--site {path}, view {v}") for v in references
    }
    return record, alignments


def _dense_head(model: keras.Model) -> LinearHead:
    """The patient model's ``labels`` layer as a head on concat(max, mean) of the eyes' features
    (its dropout is off at inference, so this is the model on those features)."""
    kernel, bias = model.get_layer("labels").get_weights()
    return LinearHead(np.asarray(kernel, np.float64), np.asarray(bias, np.float64))


def _kernel(head: LinearHead) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(head.weights, np.float32), np.asarray(head.bias, np.float32)


def _as_pair_head(head: LinearHead) -> tuple[np.ndarray, np.ndarray]:
    """A one-eye head as a head on concat(max, mean) of a photo put in both slots (max = mean = the
    photo's features): what Grad-CAM explains a one-eyed patient's decision through."""
    return (
        np.concatenate([np.zeros_like(head.weights), head.weights]).astype(np.float32),
        np.asarray(head.bias, np.float32),
    )


def _predict_into(
    out: Path,
    run_dir,
    patients,
    batch_size,
    max_pixels,
    progress,
    calibration,
    explain,
    explain_classes,
    report,
    gate,
    site=None,
    operating_point=None,
) -> dict:
    """predict_photos' work, every output written into ``out`` (the staging folder)."""
    predictor = Predictor(run_dir, calibration, max_pixels, explain, gate, site, operating_point)
    if predictor.fitness_warning:
        print(f"warning: {predictor.fitness_warning}", file=sys.stderr, flush=True)
    views, thresholds, source = predictor.views, predictor.thresholds, predictor.source
    if explain:
        claim_folder(out / HEATMAP_DIR, "heatmaps")
    stems: dict[str, str] = {}  # heatmap file stem (lower case) -> the patient id that has it
    cards: dict[str, dict] = {}
    batches = out / BATCH_DIR
    batches.mkdir(exist_ok=True)
    done = {int(f.stem) for f in batches.glob("*.json")}  # a resumed run's finished batches
    for f in sorted(batches.glob("*.json")):
        stems.update(json.loads(f.read_text(encoding="utf-8"))["stems"])
    earlier = sum(len(patients[first : first + batch_size]) for first in done)
    if earlier:
        print(f"resuming: {earlier} of {len(patients)} patients were predicted before", flush=True)

    start, images = time.perf_counter(), 0
    bar = tqdm(
        total=sum((p.left is not None) + (p.right is not None) for p in patients),
        desc="predict",
        unit="img",
        disable=None if progress else True,
    )  # None: no bar when not on a terminal
    bar.update(
        sum(
            (p.left is not None) + (p.right is not None) for first in done for p in patients[first : first + batch_size]
        )
    )
    for first in range(0, len(patients), batch_size):
        if first in done:
            continue
        before = dict(stems)
        collect = cards if report and len(cards) < REPORT_MAX_PATIENTS else None
        results, explained, read = predictor.predict_chunk(
            patients[first : first + batch_size], explain_classes, out / HEATMAP_DIR, stems, collect
        )
        images += read
        bar.update(read)
        _save_batch(
            batches / f"{first:09d}.json",
            results,
            explained,
            {k: v for k, v in stems.items() if k not in before},
            views,
        )
    bar.close()
    seconds = time.perf_counter() - start

    results, explained = [], []
    for f in sorted(batches.glob("*.json")):
        batch_results, batch_explained = _load_batch(f)
        results += batch_results
        explained += batch_explained
    ok = [(p, r) for p, r, _ in results if r is not None]
    probs = np.array([r["ensemble"] for _, r in ok]).reshape(-1, len(LABELS))
    probs = predictor.calibrated(probs, np.array([r.get("answered_from") != ANSWERED_FROM_PAIR for _, r in ok]))
    atomic_write_text(out / "predictions.csv", predictions_csv([p.patient_id for p, _ in ok], probs))
    atomic_write_text(out / "decisions.csv", _decisions_csv(results, views, thresholds, source))
    worklist = [worklist_row(p.patient_id, r, note, thresholds) for p, r, note in results]
    atomic_write_text(
        out / "worklist.csv",
        csv_for_people(list(WORKLIST_COLUMNS), [[w[c] for c in WORKLIST_COLUMNS] for w in worklist]),
    )
    if explain:
        header = ["patient_id", "eye", "class", "probability", "decision", "overlay", "array"]
        atomic_write_text(out / HEATMAP_DIR / "heatmaps.csv", csv_for_people(header, explained))
    shutil.rmtree(batches)  # inside the staging folder: every batch is in the outputs now
    counts = referral_counts(worklist)
    summary = {
        "patients": len(patients),
        "predicted": len(ok),
        "rejected": len(results) - len(ok),
        "counts": counts,
        "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "input": _input_folder(patients),
    }
    if report:
        from .report import write_prediction_report  # matplotlib only when asked for

        shown = [
            card_of(patient, result, note, thresholds, cards.get(patient.patient_id))
            for patient, result, note in results
            if result is None or patient.patient_id in cards
        ][:REPORT_MAX_PATIENTS]
        claim_folder(out / RECORDS_DIR, OWNED_FOLDERS[RECORDS_DIR])
        names = [f"record-{_file_stem(card['patient_id'], stems)}.pdf" for card in shown]
        write_prediction_report(shown, out, source, summary, predictor.provenance, (out / RECORDS_DIR, names))
    return {
        "patients": len(patients),
        "predicted": len(ok),
        "rejected": len(results) - len(ok),
        "counts": counts,
        "images": images,
        "resumed": earlier,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds else None,
        "input_size": predictor.size,
        "heatmaps": len(explained),
        "rejections": [(p.patient_id, note) for p, r, note in results if r is None],
        "eyes_rejected": [(p.patient_id, note) for p, r, note in results if r is not None and note],
        "photos_screened": sum(len({e for _, e in r["eyes"]}) for _, r in ok),
        "unlike_training": sum(len(r.get("unlike_training") or []) for _, r in ok),
        "unlike_checked": bool(predictor.references),
        "site": str(predictor.site_path) if predictor.site is not None else None,
    }


def retake_of(note: str) -> dict[str, str]:
    """The eyes whose photo was given but could not be used, and why, from a patient's note
    (:meth:`Predictor.predict_chunk` writes each as ``"<eye>: <reason>"``, joined by ``"; "``)."""
    parts = re.split(r"; (?=(?:left|right): )", note or "")
    return {eye: reason for eye, _, reason in (p.partition(": ") for p in parts) if eye in ("left", "right") and reason}


def decide(result: dict | None, note: str, thresholds: list[float]) -> tuple[list[bool] | None, Referral]:
    """A patient's eight decisions (probability above its threshold: the result's own, which a
    one-eye answer has, else ``thresholds``) and its referral line, the one rule for decisions.csv,
    the report, the station and its API. An answer from one eye says so, and which eye was not
    screened when no photo of it was given."""
    if result is None:
        return None, refer(None, retake_of(note))
    used = result.get("thresholds") or thresholds
    decision = [float(p) > t for p, t in zip(result["ensemble"], used)]
    retake = retake_of(note)
    screened = result.get("answered_from", ANSWERED_FROM_PAIR)
    missing = [e for e in ("left", "right") if screened not in (ANSWERED_FROM_PAIR, f"{e} eye") and e not in retake]
    score, threshold = result.get("referral_score"), result.get("referral_threshold")
    return decision, refer(
        decision,
        retake,
        not_screened=missing,
        poor=result.get("quality"),
        referral=(score, threshold) if threshold is not None else None,
    )


def card_of(
    patient: PatientPhotos, result: dict | None, note: str, thresholds: list[float], shown: dict | None
) -> dict:
    """What a page shows of one patient (:func:`.report.prediction_cards`): its referral line, its
    decisions, and the eyes and heatmaps ``shown`` holds (the ``collect`` of :meth:`Predictor.predict_chunk`)."""
    decision, referral = decide(result, note, thresholds)
    if result is None:
        return {"patient_id": patient.patient_id, "status": "rejected", "note": note, "referral": referral}
    return {
        "patient_id": patient.patient_id,
        "status": "ok",
        "note": note,
        "referral": referral,
        "side_check": result.get("side_check"),
        "answered_from": result.get("answered_from", ANSWERED_FROM_PAIR),
        "photo_quality": result.get("quality") or {},
        **(shown or {"eyes": {}, "heatmaps": {}}),
        "probability": [float(v) for v in result["ensemble"]],
        "threshold": list(result.get("thresholds") or thresholds),
        "decision": decision,
    }


WORKLIST_COLUMNS = (
    "patient_id",
    "referral_kind",
    "referral",
    "eyes_screened",
    "left_photo",
    "right_photo",
    "side_check",
    "classes_decided",
)


def worklist_row(patient_id: str, result: dict | None, note: str, thresholds: list[float]) -> dict[str, str]:
    """A patient's one row of the worklist (``worklist.csv``, the station's ``worklist``): the
    referral (kind and line), the eyes screened, what the gate said of each eye's photo, the side
    check and the classes decided, by the one rule :func:`decide`."""
    decision, referral = decide(result, note, thresholds)
    refused = retake_of(note)
    screened = sorted({e for _, e in result["eyes"]}) if result is not None else []
    poor = (result or {}).get("quality") or {}

    def photo(eye: str) -> str:
        if eye in refused:
            return f"refused: {refused[eye]}"
        if eye in poor:
            return f"screened, hard to read: {poor[eye]}"
        return "screened" if eye in screened else "not given"

    return {
        "patient_id": patient_id,
        "referral_kind": referral.kind,
        "referral": referral.text,
        "eyes_screened": " ".join(screened),
        "left_photo": photo("left"),
        "right_photo": photo("right"),
        "side_check": (result or {}).get("side_check") or "",
        "classes_decided": " ".join(c for c, d in zip(LABELS, decision or []) if d),
    }


def referral_counts(rows: list[dict[str, str]]) -> dict[str, int]:
    """How many patients got each referral kind, every kind named (0 when none)."""
    return {kind: sum(r["referral_kind"] == kind for r in rows) for kind in KINDS}


def _save_batch(path: Path, results, explained: list[list[str]], stems: dict[str, str], views) -> None:
    """One finished batch, written atomically: what a resumed run reads instead of predicting it again."""
    rows = []
    for patient, result, note in results:
        row = {"patient_id": patient.patient_id, "note": note}
        if result is not None:
            row.update(
                ensemble=[float(x) for x in result["ensemble"]],
                views={v: [float(x) for x in result["views"][v]] for v in views},
                eyes={f"{v}/{eye}": [float(x) for x in p] for (v, eye), p in result["eyes"].items()},
                side_check=result.get("side_check"),
                answered_from=result.get("answered_from", ANSWERED_FROM_PAIR),
                thresholds=result.get("thresholds"),
                quality=result.get("quality") or {},
                unlike_training=result.get("unlike_training") or [],
                referral_score=result.get("referral_score"),
                referral_threshold=result.get("referral_threshold"),
            )
        rows.append(row)
    atomic_write_json(path, {"patients": rows, "explained": explained, "stems": stems})


def _load_batch(path: Path) -> tuple[list, list[list[str]]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    results = []
    for row in data["patients"]:
        patient = PatientPhotos(row["patient_id"], None, None)
        if "ensemble" not in row:
            results.append((patient, None, row["note"]))
            continue
        results.append(
            (
                patient,
                {
                    "ensemble": np.array(row["ensemble"]),
                    "views": {v: np.array(p) for v, p in row["views"].items()},
                    "eyes": {tuple(k.split("/")): np.array(p) for k, p in row["eyes"].items()},
                    "side_check": row.get("side_check"),
                    "answered_from": row.get("answered_from", ANSWERED_FROM_PAIR),
                    "thresholds": row.get("thresholds"),
                    "quality": row.get("quality") or {},
                    "unlike_training": row.get("unlike_training") or [],
                    "referral_score": row.get("referral_score"),
                    "referral_threshold": row.get("referral_threshold"),
                },
                row["note"],
            )
        )
    return results, data["explained"]


def _move_in(staging: Path, out: Path) -> None:
    """Move a finished run's outputs from ``staging`` into ``out``: each file replaced atomically,
    the heatmap and record folders swapped whole, predictions.csv last; an earlier run's output this
    run did not make (a report, heatmaps, records) is removed, so the folder holds one run's outputs only."""
    for name in (*OWNED_FOLDERS, *OUTPUT_FILES):
        if not (staging / name).exists():
            if (out / name).is_dir():
                remove_owned(out / name, OWNED_FOLDERS.get(name, name))
            else:
                (out / name).unlink(missing_ok=True)
    for folder, purpose in OWNED_FOLDERS.items():
        if (staging / folder).is_dir():
            if (out / folder).exists():
                claim_folder(out / folder, purpose)  # never swap out a folder the project did not make
                os.replace(out / folder, staging / f"old-{folder}")
            os.replace(staging / folder, out / folder)
    for name in OUTPUT_FILES:
        if (staging / name).exists():
            os.replace(staging / name, out / name)


def _explain_chunk(
    cams,
    maps: dict[str, np.ndarray],
    one_eyed,
    usable,
    ensemble,
    thresholds,
    classes,
    size,
    folder: Path | None,
    max_pixels,
    stems: dict[str, str],
    collect: dict | None = None,
    eye_heads: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    pair_heads: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[list[str]]:
    """Grad-CAM of one batch of patients, averaged over the view models; writes PNG overlays and .npy arrays.

    ``maps`` per view: (patients, 2, h, w, channels), the last block's maps of the left and right
    slot, from the pass that gave the features. A one-eyed patient's heatmaps are taken through the
    head that decided it (``eye_heads`` per view, as heads on concat(max, mean); none: the pair head).
    ``collect`` receives, per patient, the eye photos and heatmaps a report card shows; with
    ``folder`` None nothing is written (the web app answers from memory).
    """
    decided = ensemble > np.asarray(thresholds)  # thresholds are finite: the calibration allows no other
    wanted = [
        [LABELS.index(c) for c in classes] if classes is not None else list(np.flatnonzero(row)) for row in decided
    ]
    needed = sorted({c for w in wanted for c in w})
    heat = None
    if needed:
        per_view = {}
        one_eyed = np.asarray(one_eyed, bool)
        for view, cam in cams.items():
            left, right = maps[view][:, 0], maps[view][:, 1]
            per_view[view] = cam.heatmaps_of_maps(left, right, needed, one_eyed, (pair_heads or {}).get(view))
            if eye_heads and view in eye_heads and one_eyed.any():
                per_view[view][:, one_eyed] = cam.heatmaps_of_maps(
                    left[one_eyed], right[one_eyed], needed, one_eyed[one_eyed], eye_heads[view]
                )
        heat = ensemble_heatmaps(per_view, size)
    display = max(size, DISPLAY_SIZE)
    rows = []
    for k, (patient, present, _) in enumerate(usable):
        card = collect.setdefault(patient.patient_id, {"eyes": {}, "heatmaps": {}}) if collect is not None else None
        for eye_index, eye in enumerate(("left", "right")):
            if eye not in present or (not wanted[k] and card is None):
                continue
            photo = make_views(getattr(patient, eye), display, ("color",), max_pixels)["color"]
            if card is not None:
                card["eyes"][eye] = cv2.resize(photo, (REPORT_THUMB, REPORT_THUMB), interpolation=cv2.INTER_AREA)
            for c in wanted[k]:
                j = needed.index(c)
                if card is not None:
                    card["heatmaps"][(eye, LABELS[c])] = heat[j, k, eye_index]
                if folder is None:
                    continue
                stem = f"{_file_stem(patient.patient_id, stems)}_{eye}_{LABELS[c]}"
                buffer = io.BytesIO()
                np.save(buffer, heat[j, k, eye_index])
                atomic_write_bytes(folder / f"{stem}.npy", buffer.getvalue())
                atomic_write_bytes(folder / f"{stem}.png", encode_png(overlay(photo, heat[j, k, eye_index])))
                rows.append(
                    [
                        patient.patient_id,
                        eye,
                        LABELS[c],
                        f"{ensemble[k, c]:.6f}",
                        str(int(decided[k, c])),
                        f"{stem}.png",
                        f"{stem}.npy",
                    ]
                )
    return rows


def _safe_name(patient_id: str) -> str:
    """A patient id as a file name part: path separators and odd characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", patient_id).lstrip(".") or "patient"


def _file_stem(patient_id: str, taken: dict[str, str]) -> str:
    """A file name part for ``patient_id`` that no other patient of the run has: ids that differ
    only in characters a file name cannot hold (``a/b``, ``a_b``), or in case (``x``, ``X`` on a
    case-blind disk), never share one. An id changed to be file-safe, or holding capitals, gets a
    short hash of itself, so its name is the same whichever patients it is predicted with."""
    base = _safe_name(patient_id)
    if base != patient_id or base != base.lower():
        base += "-" + hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:8]
    stem, n = base, 1
    while taken.setdefault(stem.lower(), patient_id) != patient_id:
        n += 1
        stem = f"{base}-{n}"
    return stem


def _decisions_csv(results, views, thresholds: list[float], source: str) -> str:
    eye_columns = [f"{v}_{eye}" for v in views for eye in ("left", "right")]
    header = [
        "patient_id",
        "referral",
        "side_check",
        "answered_from",
        "photo_quality",
        "unlike_training",
        "referral_score",
        "referral_threshold",
        "status",
        "note",
        "class",
        "probability",
        "threshold",
        "threshold_source",
        "decision",
        *eye_columns,
    ]
    rows = []
    for patient, result, note in results:
        _, referral = decide(result, note, thresholds)
        if result is None:
            rows.append(
                [
                    patient.patient_id,
                    referral.text,
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "rejected",
                    note,
                    *[""] * 5,
                    *[""] * len(eye_columns),
                ]
            )
            continue
        for j, label in enumerate(LABELS):
            p = float(result["ensemble"][j])
            eyes = [
                exact(result["eyes"][(v, eye)][j]) if (v, eye) in result["eyes"] else ""
                for v in views
                for eye in ("left", "right")
            ]
            threshold = (result.get("thresholds") or thresholds)[j]
            rows.append(
                [
                    patient.patient_id,
                    referral.text,
                    result.get("side_check") or "",
                    result.get("answered_from", ANSWERED_FROM_PAIR),
                    "; ".join(f"{e}: {r}" for e, r in sorted((result.get("quality") or {}).items())),
                    " ".join(result.get("unlike_training") or []),
                    exact(result["referral_score"]) if result.get("referral_score") is not None else "",
                    exact(result["referral_threshold"]) if result.get("referral_threshold") is not None else "",
                    "ok",
                    note,
                    label,
                    exact(p),
                    exact(threshold),
                    source,
                    int(p > threshold),
                    *eyes,
                ]
            )
    return csv_for_people(header, rows)


def _input_folder(patients: list[PatientPhotos]) -> str | None:
    """The folder every photo of the job lies under (what a record names as its input)."""
    paths = [str(Path(p).resolve().parent) for patient in patients for p in (patient.left, patient.right) if p]
    return os.path.commonpath(paths) if paths else None


def _model_card_text(run_dir) -> str | None:
    card = model_card_path(run_dir)
    return card.read_text(encoding="utf-8") if card is not None else None
