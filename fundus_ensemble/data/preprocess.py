"""The preprocessing job: every manifest image to both views, in parallel, resumable.

Output layout under ``out_dir``::

    color/<image path>.png      gray_eq/<image path>.png
    color/manifest.csv          gray_eq/manifest.csv      (valid manifests of each view)
    rejects.csv                 preprocess.json           (what was refused, and how it was made)
    acquisition/copy-<k>/...    the same layout for the k-th shifted copy of each train and val
                                photo (:func:`preprocess_acquisition_copies`), when asked

A view's file is up to date when it exists, is newer than its source, and was made with the
same settings (recorded in ``preprocess.json`` before any work); up-to-date files are not
redone; rejected images are retried on every run (their file may have been fixed). Views made
with other settings are deleted only when asked (``force``). Every file is written
atomically, so a killed run leaves no truncated image behind (its temporary files are removed
by the next run; run one job per output folder at a time).

The output folder is the project's own (:func:`..fileio.claim_folder`): it may not contain the
image root or any source photo, and only folders the project made are ever cleared. Photos
are processed in worker processes that die with their parent; a worker killed mid-photo
(the out-of-memory killer) costs that photo only, which is rejected with the reason.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
from tqdm.auto import tqdm

from .. import __version__
from ..errors import FundusError, ImageError
from ..fileio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    claim_folder,
    csv_for_people,
    remove_owned,
    sha256_file,
)
from ..labels import VIEWS
from .dicom import check_laterality
from .imaging import DEFAULT_MAX_PIXELS, crop_to_fov, decode_image, encode_png, make_views, views_of
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


SHARDS = "shards"


def _settings(size: int, acquisition: tuple[int, int] | None = None) -> dict:
    settings = {"size": size, "views": list(VIEWS), "crop": "largest-bright-region/pad-square", "version": __version__}
    if acquisition is not None:
        from .acquisition import ACQUISITION_RANGES

        settings["acquisition"] = {"seed": acquisition[0], "copy": acquisition[1], "ranges": ACQUISITION_RANGES}
    return json.loads(json.dumps(settings))  # tuples as lists, as preprocess.json reads back


def _manifest_hash(manifest: Manifest) -> str | None:
    return sha256_file(manifest.source) if Path(manifest.source).is_file() else None


def view_relative_path(image: str) -> str:
    """Where a source image's view lands inside a view folder (same sub-path, ``.png``)."""
    return posixpath.splitext(image)[0] + ".png"


WORKER_DIED = "the process working on this image died (killed by the system, e.g. out of memory)"


def _process_one(task: tuple) -> tuple[str, str | None]:
    relative, source, targets, size, max_pixels, eye, acquisition = task
    try:
        if eye is not None:
            check_laterality(source, eye, max_pixels)
        if acquisition is None:
            views = make_views(source, size, tuple(targets), max_pixels)
        else:  # the photo as another camera might have taken it, before the crop, where a camera acts
            from .acquisition import acquisition_rng, random_acquisition

            seed, copy = acquisition
            photo = random_acquisition(decode_image(source, max_pixels), acquisition_rng(seed, copy, relative))
            views = views_of(crop_to_fov(photo, size), tuple(targets))
        for view, image in views.items():
            atomic_write_bytes(targets[view], encode_png(image))
    except ImageError as exc:
        return relative, str(exc)
    except cv2.error as exc:  # OpenCV's own failures on pathological input
        return relative, f"OpenCV could not process the image ({str(exc).strip().splitlines()[-1]})"
    except MemoryError:
        return relative, "image too large to decode in memory"
    return relative, None


def _worker_init(parent: int) -> None:
    cv2.setNumThreads(1)  # one image per process already uses every core
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """End this worker when its parent (the pid the job passed, not the one read here: a worker still
    starting when the job was killed would read its new parent's and outlive the job) is gone: a
    ``kill -9`` of the job must not leave workers writing views."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def map_in_processes(
    func: Callable[[Any], Any],
    tasks: Iterable[Any],
    workers: int,
    on_result: Callable[[Any, Any], None],
    on_crash: Callable[[Any], None],
    initializer: Callable[[int], None] | None = _worker_init,
) -> None:
    """Call ``on_result(task, func(task))`` for every task, computed in ``workers`` spawned processes.

    A worker that dies (SIGKILL, the out-of-memory killer) breaks the whole pool; the tasks in
    flight then are run again one at a time, each in a fresh process, and the one that kills
    its process too is handed to ``on_crash``; the others carry on in a new pool. ``initializer`` runs in
    each worker with this process's pid.
    """
    # spawn, not fork: the caller may hold TensorFlow's threads, which fork can deadlock
    context = multiprocessing.get_context("spawn")
    initargs = (os.getpid(),) if initializer is not None else ()  # the parent, as the job knows it
    pending = list(tasks)[::-1]
    while pending:
        suspects = []
        with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
            in_flight: dict = {}
            try:
                while pending or in_flight:
                    while pending and len(in_flight) < 4 * workers:
                        task = pending.pop()
                        in_flight[pool.submit(func, task)] = task
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        result = future.result()
                        on_result(in_flight.pop(future), result)
            except BrokenProcessPool:
                suspects = list(in_flight.values())
        for task in suspects:  # alone, so a crash names its task
            with ProcessPoolExecutor(1, mp_context=context, initializer=initializer, initargs=initargs) as alone:
                try:
                    on_result(task, alone.submit(func, task).result())
                except BrokenProcessPool:
                    on_crash(task)


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
    force: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    acquisition: tuple[int, int] | None = None,
) -> PreprocessSummary:
    """Write both views of every image in ``manifest`` under ``out_dir``; see the module doc.

    ``force`` deletes views made earlier with other settings (refused otherwise);
    ``max_pixels`` rejects larger photos before decoding them; ``acquisition`` ``(seed, copy)``
    makes the views of each photo's ``copy``-th randomly shifted copy instead
    (:func:`.acquisition.random_acquisition`, recorded in the settings).
    """
    if size < 32:
        raise FundusError(f"size must be at least 32 pixels (the backbones' minimum), got {size}")
    out = Path(out_dir)
    settings = _settings(size, acquisition)
    record_path = out / "preprocess.json"

    images = sorted({img for p in manifest.patients for img in (p.left_image, p.right_image) if img})
    _refuse_unsafe_output(out, manifest, images)
    targets = {img: {v: str(out / v / view_relative_path(img)) for v in VIEWS} for img in images}
    _refuse_clashes(manifest, targets)

    claim_folder(out, "preprocessed views", adopt_if=("preprocess.json",))
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    same_settings = previous.get("settings") == settings
    has_views = any((out / v).is_dir() and any((out / v).iterdir()) for v in VIEWS)
    if not same_settings and has_views:
        old = previous.get("settings", {})
        if not force:
            raise FundusError(
                f"{out} holds views made with other settings (size {old.get('size', '?')}, version "
                f"{old.get('version', '?')}; now size {size}, version {__version__}); pass --force to delete them, "
                "or choose another --out"
            )
        print(f"deleting the views in {out} made with other settings (size {old.get('size', '?')})", flush=True)
    for view in VIEWS:
        if not same_settings and (out / view).exists():  # views made with other settings must not pass as up to date
            claim_folder(out / view, f"the {view} views", adopt_if=("manifest.csv",))
            remove_owned(out / view, f"the {view} views")
        claim_folder(out / view, f"the {view} views")
        for stale in (out / view).rglob(".*.tmp"):
            stale.unlink(missing_ok=True)  # temporaries of a killed run (fileio's ".<name>.<random>.tmp")
    # Recorded before any work, so that a killed run's finished images count as done.
    record = {
        "settings": settings,
        "source_manifest": manifest.source,
        "source_manifest_sha256": _manifest_hash(manifest),
    }
    atomic_write_json(record_path, record)

    summary = PreprocessSummary(images=len(images), out_dir=str(out))
    todo = []
    eye_of = {}
    for p in manifest.patients:
        for eye in ("left", "right"):
            image = getattr(p, f"{eye}_image")
            if image:
                eye_of[image] = None if eye_of.get(image, eye) != eye else eye  # one file as both eyes: no check
    for img in images:
        source = manifest.image_path(img)
        if same_settings and _is_fresh(source, targets[img]):
            summary.up_to_date += 1
        else:
            todo.append((img, str(source), targets[img], size, max_pixels, eye_of[img], acquisition))

    failures: dict[str, str] = {}
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    # disable=None: no bar when stderr is not a terminal (a log file would fill with redraws)
    bar = tqdm(total=len(todo), desc="preprocess", unit="img", disable=None if progress and todo else True)
    if workers == 1:
        for relative, reason in map(_process_one, todo):
            _tally(relative, reason, failures, summary, bar)
    else:
        map_in_processes(
            _process_one,
            todo,
            workers,
            on_result=lambda task, result: _tally(*result, failures, summary, bar),
            on_crash=lambda task: _tally(task[0], WORKER_DIED, failures, summary, bar),
        )
    bar.close()

    summary.rejected = sorted(failures.items())
    _write_outputs(manifest, out, summary, record)
    return summary


ACQUISITION_DIR = "acquisition"


def acquisition_copy_dir(out_dir: str | os.PathLike, copy: int) -> Path:
    """Where :func:`preprocess_acquisition_copies` puts the ``copy``-th copies' views of ``out_dir``."""
    return Path(out_dir) / ACQUISITION_DIR / f"copy-{copy}"


def preprocess_acquisition_copies(
    manifest: Manifest, out_dir: str | os.PathLike, copies: int, seed: int = 0, **options
) -> list[PreprocessSummary]:
    """``copies`` randomly shifted copies of every train and val photo (as other cameras might take
    them: :func:`.acquisition.random_acquisition`), each copy's views preprocessed as the photos'
    are, into :func:`acquisition_copy_dir`; cross-fitted heads learn from them too
    (``train_pair.py --acquisition-copies``). Test patients get none: nothing learns from them."""
    if copies < 0:
        raise FundusError(f"acquisition copies must not be negative, got {copies}")
    development = [p for p in manifest.patients if p.split in ("train", "val")]
    if copies and not development:
        raise FundusError(f"{manifest.source}: no train or val patient to make acquisition copies of")
    part = replace(manifest, patients=tuple(development))
    return [
        preprocess_manifest(part, acquisition_copy_dir(out_dir, k), acquisition=(seed, k), **options)
        for k in range(copies)
    ]


def _write_outputs(manifest: Manifest, out: Path, summary: PreprocessSummary, record: dict) -> None:
    """The view manifests (patients with at least one usable eye, in the manifest's order),
    ``rejects.csv`` and the final ``preprocess.json``, from ``summary.rejected``."""
    failures = dict(summary.rejected)
    patients = []
    summary.dropped_patients = []
    for p in manifest.patients:
        left = view_relative_path(p.left_image) if p.left_image and p.left_image not in failures else None
        right = view_relative_path(p.right_image) if p.right_image and p.right_image not in failures else None
        if left or right:
            patients.append(replace(p, left_image=left, right_image=right))
        else:
            summary.dropped_patients.append(p.patient_id)
    _write_rejects(out / "rejects.csv", summary, manifest)  # before failing: the message points to it
    if not patients:
        raise FundusError(f"every image was rejected; see {out / 'rejects.csv'}")
    for view in VIEWS:
        write_manifest(patients, out / view / "manifest.csv")
    record["summary"] = {k: v for k, v in asdict(summary).items() if k not in ("rejected", "dropped_patients")} | {
        "rejected": len(summary.rejected),
        "dropped_patients": len(summary.dropped_patients),
    }
    record["rejected_images"] = [
        list(item) for item in summary.rejected
    ]  # rejects.csv is for people: cells neutralised
    atomic_write_json(out / "preprocess.json", record)


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/n"`` (1 <= i <= n) to ``(i, n)``; a clear error otherwise."""
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise FundusError(f"--shard takes i/n, e.g. 2/8 (the second of eight), got {value!r}") from None
    if not 1 <= index <= count:
        raise FundusError(f"--shard {value}: need 1 <= i <= n")
    return index, count


def shard_folder(out_dir: str | os.PathLike, index: int, count: int) -> Path:
    return Path(out_dir) / SHARDS / f"{index}-of-{count}"


def shard_of(manifest: Manifest, index: int, count: int) -> Manifest:
    """Shard ``index`` of ``count`` (from 1): every ``count``-th patient, so shards are disjoint,
    cover the manifest, and take a patient's two eyes together."""
    return manifest.with_patients(manifest.patients[index - 1 :: count])


def preprocess_shard(
    manifest: Manifest, out_dir: str | os.PathLike, index: int, count: int, **options: Any
) -> PreprocessSummary:
    """Preprocess one shard into ``OUT/shards/<i>-of-<n>``, a complete output folder of its own, so
    that n copies (a SLURM array, a Kubernetes job) never write the same file;
    :func:`merge_shards` then makes ``OUT`` what one run would have made."""
    out = Path(out_dir)
    claim_folder(out, "preprocessed views", adopt_if=("preprocess.json", SHARDS))
    claim_folder(out / SHARDS, "preprocessing shards")
    return preprocess_manifest(shard_of(manifest, index, count), shard_folder(out, index, count), **options)


def merge_shards(
    manifest: Manifest, out_dir: str | os.PathLike, count: int, size: int = DEFAULT_SIZE
) -> PreprocessSummary:
    """Move the views of all ``count`` finished shards into ``out_dir`` and write its manifests,
    ``rejects.csv`` and ``preprocess.json`` as one run over ``manifest`` would; the shard
    folders are removed. Refuses if a shard is missing, unfinished, or made with other settings
    or from another manifest."""
    out = Path(out_dir)
    folders = [shard_folder(out, i, count) for i in range(1, count + 1)]
    settings = _settings(size)
    records = []
    for index, folder in enumerate(folders, 1):
        record_path = folder / "preprocess.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if "summary" not in record:
            raise FundusError(
                f"shard {index}/{count} is missing or unfinished ({folder}): run preprocess.py --shard {index}/{count} first"
            )
        if record["settings"] != settings:
            raise FundusError(
                f"shard {index}/{count} was made with other settings ({record['settings']}; now {settings}): "
                "run it again with the same --size"
            )
        if record.get("source_manifest_sha256") != _manifest_hash(manifest):
            raise FundusError(f"shard {index}/{count} ({folder}) was made from another manifest than {manifest.source}")
        expected = {
            img for p in shard_of(manifest, index, count).patients for img in (p.left_image, p.right_image) if img
        }
        if record["summary"]["images"] != len(expected):
            raise FundusError(
                f"shard {index}/{count} holds {record['summary']['images']} images, its share of "
                f"{manifest.source} is {len(expected)}: was it made with another shard count?"
            )
        records.append(record)

    claim_folder(out, "preprocessed views", adopt_if=("preprocess.json", SHARDS))
    previous = json.loads((out / "preprocess.json").read_text()) if (out / "preprocess.json").is_file() else {}
    if previous and previous.get("settings") != settings and any((out / v).is_dir() for v in VIEWS):
        raise FundusError(
            f"{out} holds views made with other settings ({previous.get('settings')}); "
            "delete them with a plain preprocess.py --force run, or merge into another --out"
        )
    summary = PreprocessSummary(out_dir=str(out))
    for view in VIEWS:
        claim_folder(out / view, f"the {view} views", adopt_if=("manifest.csv",))
    for folder, record in zip(folders, records):
        for view in VIEWS:
            for source in (folder / view).rglob("*.png"):
                target = out / view / source.relative_to(folder / view)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
        for key in ("images", "processed", "up_to_date"):
            setattr(summary, key, getattr(summary, key) + record["summary"][key])
        summary.rejected += [tuple(item) for item in record["rejected_images"]]
    summary.rejected.sort()
    record = {k: v for k, v in records[0].items() if k != "summary"}
    _write_outputs(manifest, out, summary, record)
    remove_owned(out / SHARDS, "preprocessing shards")
    return summary


def _refuse_unsafe_output(out: Path, manifest: Manifest, images: list[str]) -> None:
    """The output folder may neither contain the image root nor any source photo: it gets cleared."""
    out_resolved, root_resolved = out.resolve(), manifest.image_root.resolve()
    if root_resolved == out_resolved or root_resolved.is_relative_to(out_resolved):
        raise FundusError(
            f"--out {out} contains the image root {manifest.image_root}; preprocessing clears folders under --out, "
            "which could delete your photos: choose an output folder outside the image root"
        )
    for image in images:
        if manifest.image_path(image).resolve().is_relative_to(out_resolved):
            raise FundusError(
                f"--out {out} contains the source image {manifest.image_path(image)}; preprocessing clears folders "
                "under --out, which could delete your photos: choose an output folder that holds no photos"
            )


def _refuse_clashes(manifest: Manifest, targets: dict[str, dict[str, str]]) -> None:
    where = {
        img: f"{img} (row {p.row}, patient {p.patient_id})" if p.row else f"{img} (patient {p.patient_id})"
        for p in manifest.patients
        for img in (p.left_image, p.right_image)
        if img
    }
    first: dict[str, str] = {}
    for image, views in targets.items():
        other = first.setdefault(views["color"], image)
        if other != image:
            raise FundusError(
                f"{manifest.source}: two source images map to the same output name {view_relative_path(image)}: "
                f"{where[other]} and {where[image]}; rename one of them"
            )


def _tally(relative: str, reason: str | None, failures: dict[str, str], summary: PreprocessSummary, bar: tqdm) -> None:
    if reason is None:
        summary.processed += 1
    else:
        failures[relative] = reason
    bar.update(1)


def _write_rejects(path: Path, summary: PreprocessSummary, manifest: Manifest) -> None:
    owner = {img: p.patient_id for p in manifest.patients for img in (p.left_image, p.right_image) if img}
    rows = [["image", image, owner.get(image, ""), reason] for image, reason in summary.rejected]
    rows += [
        ["patient", "", pid, "no usable image: patient left out of the view manifests"]
        for pid in summary.dropped_patients
    ]
    atomic_write_text(path, csv_for_people(["kind", "image", "patient_id", "reason"], rows))
