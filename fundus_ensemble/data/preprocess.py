"""The preprocessing job: every manifest image to both views, in parallel, resumable.

Output layout under ``out_dir``::

    color/<image path>.png      gray_eq/<image path>.png
    color/manifest.csv          gray_eq/manifest.csv      (valid manifests of each view)
    rejects.csv                 preprocess.json           (what was refused, and how it was made)

A view's file is up to date when it exists, is newer than its source, and was made with the
same settings (recorded in ``preprocess.json`` before any work; other settings clear the
view folders first); up-to-date files are not redone; rejected images are retried on every run (their file may
have been fixed). Every file
is written atomically, so a killed run leaves no truncated image behind (its temporary files
are removed by the next run; run one job per output folder at a time).
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import posixpath
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
from tqdm.auto import tqdm

from .. import __version__
from ..errors import FundusError, ImageError
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from ..labels import VIEWS
from .imaging import VIEW_FUNCTIONS, crop_to_fov, decode_image, encode_png
from .manifest import Manifest, write_manifest

DEFAULT_SIZE = 448  # the paper's input resolution


@dataclass
class PreprocessSummary:
    """Counts from one run of :func:`preprocess_manifest`."""

    images: int = 0
    processed: int = 0
    up_to_date: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    dropped_patients: list[str] = field(default_factory=list)
    out_dir: str = ""

    @property
    def reject_fraction(self) -> float:
        return len(self.rejected) / self.images if self.images else 0.0

    def describe(self) -> str:
        return (
            f"{self.images} images: {self.processed} processed, {self.up_to_date} already up to date, "
            f"{len(self.rejected)} rejected; {len(self.dropped_patients)} patients dropped (no usable eye). "
            f"Output: {self.out_dir}"
        )


def view_relative_path(image: str) -> str:
    """Where a source image's view lands inside a view folder (same sub-path, ``.png``)."""
    return posixpath.splitext(image)[0] + ".png"


def _process_one(task: tuple[str, str, dict[str, str], int]) -> tuple[str, str | None]:
    relative, source, targets, size = task
    try:
        square = crop_to_fov(decode_image(source), size)
        for view, target in targets.items():
            atomic_write_bytes(target, encode_png(VIEW_FUNCTIONS[view](square)))
    except ImageError as exc:
        return relative, str(exc)
    except cv2.error as exc:  # OpenCV's own failures on pathological input
        return relative, f"OpenCV could not process the image ({str(exc).strip().splitlines()[-1]})"
    except MemoryError:
        return relative, "image too large to decode in memory"
    return relative, None


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one image per process already uses every core


def _is_fresh(source: Path, targets: dict[str, str]) -> bool:
    try:
        source_time = source.stat().st_mtime
        return all(os.stat(t).st_mtime >= source_time for t in targets.values())
    except FileNotFoundError:
        return False


def preprocess_manifest(
    manifest: Manifest,
    out_dir: str | os.PathLike,
    size: int = DEFAULT_SIZE,
    workers: int | None = None,
    progress: bool = True,
) -> PreprocessSummary:
    """Write both views of every image in ``manifest`` under ``out_dir``; see the module doc."""
    if size < 32:
        raise FundusError(f"size must be at least 32 pixels (the backbones' minimum), got {size}")
    out = Path(out_dir)
    settings = {"size": size, "views": list(VIEWS), "crop": "largest-bright-region/pad-square", "version": __version__}
    record_path = out / "preprocess.json"
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    same_settings = previous.get("settings") == settings

    images = sorted({img for p in manifest.patients for img in (p.left_image, p.right_image) if img})
    targets = {img: {v: str(out / v / view_relative_path(img)) for v in VIEWS} for img in images}
    clashes = len({t["color"] for t in targets.values()}) != len(images)
    if clashes:
        raise FundusError("two source images map to the same output name (same path, different extension)")

    for view in VIEWS:
        if not same_settings:  # views made with other settings must not pass as up to date
            shutil.rmtree(out / view, ignore_errors=True)
        for stale in (out / view).rglob(".*.tmp") if (out / view).is_dir() else ():
            stale.unlink(missing_ok=True)  # temporaries of a killed run (fileio's ".<name>.<random>.tmp")
    # Recorded before any work, so that a killed run's finished images count as done.
    record = {
        "settings": settings,
        "source_manifest": manifest.source,
        "source_manifest_sha256": sha256_file(manifest.source) if Path(manifest.source).is_file() else None,
    }
    atomic_write_json(record_path, record)

    summary = PreprocessSummary(images=len(images), out_dir=str(out))
    todo = []
    for img in images:
        source = manifest.image_path(img)
        if same_settings and _is_fresh(source, targets[img]):
            summary.up_to_date += 1
        else:
            todo.append((img, str(source), targets[img], size))

    failures: dict[str, str] = {}
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=len(todo), desc="preprocess", unit="img", disable=not progress or not todo)
    if workers == 1:
        results = map(_process_one, todo)
        for relative, reason in results:
            _tally(relative, reason, failures, summary, bar)
    else:
        # spawn, not fork: the caller may hold TensorFlow's threads, which fork can deadlock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            for relative, reason in pool.map(_process_one, todo, chunksize=max(1, len(todo) // (workers * 16))):
                _tally(relative, reason, failures, summary, bar)
    bar.close()

    summary.rejected = sorted(failures.items())

    for view in VIEWS:
        patients = []
        for p in manifest.patients:
            left = view_relative_path(p.left_image) if p.left_image and p.left_image not in failures else None
            right = view_relative_path(p.right_image) if p.right_image and p.right_image not in failures else None
            if left or right:
                patients.append(replace(p, left_image=left, right_image=right))
            elif view == VIEWS[0]:
                summary.dropped_patients.append(p.patient_id)
        if not patients:
            raise FundusError(f"every image was rejected; see {out / 'rejects.csv'}")
        write_manifest(patients, out / view / "manifest.csv")
    _write_rejects(out / "rejects.csv", summary, manifest)
    record["summary"] = {k: v for k, v in asdict(summary).items() if k not in ("rejected", "dropped_patients")} | {
        "rejected": len(summary.rejected), "dropped_patients": len(summary.dropped_patients),
    }
    atomic_write_json(record_path, record)
    return summary


def _tally(relative: str, reason: str | None, failures: dict[str, str], summary: PreprocessSummary, bar: tqdm) -> None:
    if reason is None:
        summary.processed += 1
    else:
        failures[relative] = reason
    bar.update(1)


def _write_rejects(path: Path, summary: PreprocessSummary, manifest: Manifest) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["kind", "image", "patient_id", "reason"])
    owner = {img: p.patient_id for p in manifest.patients for img in (p.left_image, p.right_image) if img}
    for image, reason in summary.rejected:
        writer.writerow(["image", image, owner.get(image, ""), reason])
    for pid in summary.dropped_patients:
        writer.writerow(["patient", "", pid, "no usable image: patient left out of the view manifests"])
    atomic_write_text(path, out.getvalue())
