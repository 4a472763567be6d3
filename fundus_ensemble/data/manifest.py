"""The patient manifest: one row per patient, the unit ODIR labels and scores are defined on.

Columns (required): ``patient_id, left_image, right_image, N, D, G, C, A, H, M, O, split``;
optional: ``age, sex, left_keywords, right_keywords``. Other columns are accepted, ignored
and reported in :attr:`Manifest.ignored_columns`.

Image paths are relative to the *image root*, which is the manifest's folder unless the
caller names another one. Rows are numbered as a spreadsheet shows them: the header is
row 1, the first patient row 2.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ManifestError
from ..fileio import atomic_write_text, neutralise_cell
from ..labels import LABELS, SPLITS

REQUIRED_COLUMNS: tuple[str, ...] = ("patient_id", "left_image", "right_image", *LABELS, "split")
OPTIONAL_COLUMNS: tuple[str, ...] = ("age", "sex", "left_keywords", "right_keywords")
EYES: tuple[str, ...] = ("left", "right")


@dataclass(frozen=True)
class Patient:
    """One patient: up to two eye images, eight 0/1 labels, a split."""

    patient_id: str
    left_image: str | None
    right_image: str | None
    labels: tuple[int, ...]
    split: str
    extra: dict[str, str] = field(default_factory=dict)
    row: int | None = field(default=None, compare=False)  # the source file's row, for messages


@dataclass(frozen=True)
class Manifest:
    """Validated patients plus where their images live."""

    patients: tuple[Patient, ...]
    image_root: Path
    source: str = "<memory>"
    ignored_columns: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def patient_ids(self) -> list[str]:
        return [p.patient_id for p in self.patients]

    def label_matrix(self) -> np.ndarray:
        """Labels as an (n_patients, 8) int array in :data:`LABELS` order."""
        return np.array([p.labels for p in self.patients], dtype=np.int64).reshape(-1, len(LABELS))

    def image_path(self, relative: str) -> Path:
        return self.image_root / relative

    def select(self, split: str) -> Manifest:
        """The patients of one split (raises if the split is unknown or empty)."""
        if split not in SPLITS:
            raise ManifestError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        chosen = tuple(p for p in self.patients if p.split == split)
        if not chosen:
            counts = {s: sum(p.split == s for p in self.patients) for s in SPLITS}
            raise ManifestError(f"{self.source}: split {split!r} has no patients (split sizes: {counts})")
        return replace(self, patients=chosen)

    def with_patients(self, patients: list[Patient] | tuple[Patient, ...]) -> Manifest:
        return replace(self, patients=tuple(patients))


def _problem(source: str, row: int | None, column: str | None, value: str | None, what: str) -> ManifestError:
    where = source
    if row is not None:
        where += f", row {row}"
    if column is not None:
        where += f", column {column!r}"
    if value is not None:
        where += f", value {value!r}"
    return ManifestError(f"{where}: {what}")


def check_relative_path(value: str, source: str, row: int, column: str) -> str:
    """Return the normalised relative path, or raise if it is absolute or escapes the root."""
    posix = value.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or os.path.isabs(value):
        raise _problem(source, row, column, value, "image paths must be relative to the image root, not absolute")
    normal = posixpath.normpath(posix)
    if normal == ".." or normal.startswith("../"):
        raise _problem(source, row, column, value, "image path escapes the image root ('..')")
    if normal == ".":
        raise _problem(source, row, column, value, "image path names a folder, not a file")
    return normal


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """A CSV file's text (UTF-8, a BOM dropped), or :class:`ManifestError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise ManifestError(f"{path}: {what} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8 CSV") from None
    return text[1:] if text.startswith("\ufeff") else text


def unknown_columns(header: list[str]) -> tuple[str, ...]:
    """The columns of a manifest or label table that the project does not read."""
    return tuple(name for name in header if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS)


def claim_patient_id(value: str, path: str | os.PathLike, index: int, seen: dict[str, int]) -> str:
    """A row's ``patient_id``, stripped and checked: not empty, not seen before (``seen`` maps each
    id, as the project's CSV files write it, to its first row and is updated). Ids are compared as
    written: ``=1`` and ``'=1`` become one cell once escaped for spreadsheets, so they are one id."""
    pid = value.strip()
    if not pid:
        raise ManifestError(f"{path}, row {index}, column 'patient_id', value '': patient id is empty")
    written = neutralise_cell(pid)
    if written in seen:
        same = (
            f" as the project's CSV files write ids ({written!r}: a leading = + - @ is escaped with ')"
            if pid[:1] in "'=+-@\t\r"
            else ""
        )
        raise ManifestError(
            f"{path}, row {index}, column 'patient_id', value {pid!r}: duplicate{same} (first in row {seen[written]})"
        )
    seen[written] = index
    return pid


def read_csv_rows(text: str, source: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(row number, fields)`` of CSV ``text``, validated for shape.

    Rows are numbered as a spreadsheet shows them (header = row 1); blank rows are skipped.
    Raises on unreadable CSV, an empty file, duplicate header names and rows whose field
    count differs from the header's, naming the row.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise _problem(source, None, None, None, "the file is empty; expected a header row and data rows")
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[list[str]] = []
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise _problem(source, len(records) + 1, None, None, f"not readable as CSV ({exc})") from None
        records.append(fields)
    header = [name.strip() for name in records[0]]
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise _problem(source, 1, name, None, "column appears twice in the header")
        seen.add(name)
    rows = []
    for index, fields in enumerate(records[1:], start=2):
        if not fields or all(not f.strip() for f in fields):
            continue  # blank lines are what spreadsheets leave at the end
        if len(fields) != len(header):
            raise _problem(source, index, None, None, f"has {len(fields)} fields but the header has {len(header)}")
        rows.append((index, fields))
    return header, rows


def parse_manifest(
    text: str,
    source: str = "<text>",
    image_root: str | os.PathLike = ".",
    check_files: bool = True,
) -> Manifest:
    """Parse and validate manifest CSV ``text``; raise :class:`ManifestError` on the first problem."""
    header, rows = read_csv_rows(text, source)
    _check_header(header, source)
    column = {name: i for i, name in enumerate(header)}
    ignored = unknown_columns(header)
    root = Path(image_root)

    patients: list[Patient] = []
    first_row_of: dict[str, int] = {}
    for index, fields in rows:
        cell = {name: fields[i].strip() for name, i in column.items()}
        patient = _parse_row(cell, source, index, root, check_files)
        if patient.patient_id in first_row_of:
            raise _problem(
                source,
                index,
                "patient_id",
                patient.patient_id,
                f"duplicate patient id (first seen in row {first_row_of[patient.patient_id]}); "
                "ODIR labels belong to the patient, so each patient must be one row",
            )
        first_row_of[patient.patient_id] = index
        patients.append(patient)
    if not patients:
        raise _problem(source, None, None, None, "has a header but no patient rows")
    return Manifest(tuple(patients), root, source, ignored)


def _check_header(header: list[str], source: str) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise _problem(
            source,
            1,
            None,
            None,
            f"missing required column(s) {', '.join(repr(m) for m in missing)}; required: {','.join(REQUIRED_COLUMNS)}",
        )


def _parse_row(cell: dict[str, str], source: str, row: int, root: Path, check_files: bool) -> Patient:
    patient_id = cell["patient_id"]
    if not patient_id:
        raise _problem(source, row, "patient_id", "", "patient id is empty")
    labels = []
    for name in LABELS:
        value = cell[name]
        if value not in ("0", "1"):
            raise _problem(source, row, name, value, "labels must be 0 or 1")
        labels.append(int(value))
    images: dict[str, str | None] = {}
    for eye in EYES:
        name = f"{eye}_image"
        value = cell[name]
        if not value:
            images[eye] = None
            continue
        relative = check_relative_path(value, source, row, name)
        if check_files:
            check_image_file(root, relative, source, row, name, value)
        images[eye] = relative
    if images["left"] is None and images["right"] is None:
        raise _problem(source, row, "left_image", "", "patient has neither a left nor a right image")
    split = cell["split"]
    if split not in SPLITS:
        raise _problem(source, row, "split", split, f"unknown split; expected one of {', '.join(SPLITS)}")
    extra = {name: cell[name] for name in OPTIONAL_COLUMNS if name in cell and cell[name]}
    return Patient(patient_id, images["left"], images["right"], tuple(labels), split, extra, row)


def check_image_file(root: Path, relative: str, source: str, row: int, column: str, value: str) -> None:
    """Raise unless ``root/relative`` is a file that really lies under ``root`` (links resolved)."""
    path = root / relative
    if path.is_dir():
        raise _problem(source, row, column, value, f"{path} is a folder, not an image file")
    if not path.is_file():
        raise _problem(source, row, column, value, f"image file not found at {path}")
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise _problem(
            source,
            row,
            column,
            value,
            f"image path leads outside the image root {root} through a symbolic link (to {resolved})",
        )


def load_manifest(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    check_files: bool = True,
) -> Manifest:
    """Read and validate a manifest file; image paths resolve against ``image_root`` or its folder."""
    path = Path(path)
    text = read_text_file(path, "manifest file")
    root = Path(image_root) if image_root is not None else path.parent
    manifest = parse_manifest(text, str(path), root, check_files)
    if manifest.ignored_columns:
        warnings.warn(
            f"{path}: ignoring unknown column(s) {', '.join(manifest.ignored_columns)}",
            stacklevel=2,
        )
    return manifest


def manifest_to_csv(patients: list[Patient] | tuple[Patient, ...]) -> str:
    """Render patients as manifest CSV text (optional columns only where some patient has them)."""
    optional = [name for name in OPTIONAL_COLUMNS if any(name in p.extra for p in patients)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*REQUIRED_COLUMNS, *optional])
    for p in patients:
        writer.writerow(
            [
                p.patient_id,
                p.left_image or "",
                p.right_image or "",
                *p.labels,
                p.split,
                *(p.extra.get(name, "") for name in optional),
            ]
        )
    return out.getvalue()


def write_manifest(patients: list[Patient] | tuple[Patient, ...], path: str | os.PathLike) -> None:
    """Write patients to ``path`` atomically."""
    atomic_write_text(path, manifest_to_csv(patients))
