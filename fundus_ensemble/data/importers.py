"""Build the patient manifest from the label tables ODIR-5K is distributed with.

Two layouts are understood:

* ``image-table``: one row per image, ``filename, ID, eye, patient_age, patient_sex,
  eye_keywords, N..O`` (the layout of ``odir5k-256-dev/labels.csv``);
* ``kaggle``: the Kaggle re-release's ``full_df.csv``, one row per image with both eyes'
  file names and keywords on every row (``ID, Patient Age, Patient Sex, Left-Fundus,
  Right-Fundus, Left-Diagnostic Keywords, Right-Diagnostic Keywords, N..O, ...``).

In both, N..O are the patient's labels; rows of one patient that disagree are an error.
Tables are validated as strictly as manifests (:mod:`.manifest`): UTF-8, readable CSV,
no duplicate columns, every row with the header's number of fields, relative image names.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ManifestError
from ..labels import LABELS
from .manifest import Patient, check_image_file, check_relative_path, read_csv_rows, read_text_file

FORMATS: tuple[str, ...] = ("image-table", "kaggle")


@dataclass
class ImportReport:
    """What the importer dropped, so the caller can tell the user."""

    missing_images: list[str] = field(default_factory=list)
    dropped_patients: list[str] = field(default_factory=list)


@dataclass
class _Draft:
    row: int
    labels: tuple[int, ...]
    images: dict[str, str] = field(default_factory=dict)
    image_rows: dict[str, tuple[int, str]] = field(default_factory=dict)  # eye -> (row, column), for messages
    extra: dict[str, str] = field(default_factory=dict)


def _read_table(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    header, rows = read_csv_rows(read_text_file(path, "label table"), str(path))
    missing = [c for c in required if c not in header]
    if missing:
        raise ManifestError(f"{path}, row 1: missing column(s) {', '.join(map(repr, missing))}")
    return [(index, {name: value.strip() for name, value in zip(header, fields)}) for index, fields in rows]


def _labels(row: dict[str, str], path: Path, index: int) -> tuple[int, ...]:
    values = []
    for name in LABELS:
        value = row[name]
        if value not in ("0", "1"):
            raise ManifestError(f"{path}, row {index}, column {name!r}, value {value!r}: labels must be 0 or 1")
        values.append(int(value))
    return tuple(values)


def _merge(drafts: dict[str, _Draft], pid: str, labels: tuple[int, ...], path: Path, index: int) -> _Draft:
    if not pid:
        raise ManifestError(f"{path}, row {index}, column 'ID', value '': patient id is empty")
    draft = drafts.setdefault(pid, _Draft(index, labels))
    if draft.labels != labels:
        raise ManifestError(
            f"{path}, row {index}, column 'ID', value {pid!r}: labels {labels} disagree with row "
            f"{draft.row} of the same patient {draft.labels}; ODIR labels belong to the patient"
        )
    return draft


def _image_name(row: dict[str, str], column: str, path: Path, index: int) -> str:
    """The row's image name, refused here (not later, in the manifest) if absolute or escaping with '..'."""
    return check_relative_path(row[column], str(path), index, column)


def _carry(draft: _Draft, row: dict[str, str], columns: dict[str, str]) -> None:
    """Copy the optional manifest fields a table row fills (table column -> manifest column)."""
    for source, target in columns.items():
        if row.get(source):
            draft.extra[target] = row[source]


def read_image_table(path: str | os.PathLike) -> dict[str, _Draft]:
    path = Path(path)
    rows = _read_table(path, ("filename", "ID", "eye", *LABELS))
    drafts: dict[str, _Draft] = {}
    for index, row in rows:
        draft = _merge(drafts, row["ID"], _labels(row, path, index), path, index)
        eye = row["eye"].lower()
        if eye not in ("left", "right"):
            raise ManifestError(f"{path}, row {index}, column 'eye', value {row['eye']!r}: expected left or right")
        if eye in draft.images:
            raise ManifestError(
                f"{path}, row {index}, column 'eye', value {eye!r}: patient {row['ID']!r} has two {eye} images"
            )
        draft.images[eye] = _image_name(row, "filename", path, index)
        draft.image_rows[eye] = (index, "filename")
        _carry(draft, row, {"eye_keywords": f"{eye}_keywords", "patient_age": "age", "patient_sex": "sex"})
    return drafts


def read_kaggle_full_df(path: str | os.PathLike) -> dict[str, _Draft]:
    path = Path(path)
    rows = _read_table(path, ("ID", "Left-Fundus", "Right-Fundus", *LABELS))
    drafts: dict[str, _Draft] = {}
    for index, row in rows:
        draft = _merge(drafts, row["ID"], _labels(row, path, index), path, index)
        for eye, column in (("left", "Left-Fundus"), ("right", "Right-Fundus")):
            if row[column]:
                draft.images[eye] = _image_name(row, column, path, index)
                draft.image_rows[eye] = (index, column)
        _carry(
            draft,
            row,
            {
                "Left-Diagnostic Keywords": "left_keywords",
                "Right-Diagnostic Keywords": "right_keywords",
                "Patient Age": "age",
                "Patient Sex": "sex",
            },
        )
    return drafts


def import_label_table(
    path: str | os.PathLike,
    fmt: str,
    image_root: str | os.PathLike,
    image_dir: str = "images",
) -> tuple[list[Patient], ImportReport]:
    """Patients (split ``train``, to be re-split by the caller) from a label table.

    Image paths become ``image_dir/<file name>`` relative to ``image_root``; eyes whose file
    is absent there are left empty and patients with no image left are dropped (both listed
    in the report), since real exports routinely miss a few files.
    """
    readers = {"image-table": read_image_table, "kaggle": read_kaggle_full_df}
    if fmt not in readers:
        raise ManifestError(f"unknown label table format {fmt!r}; expected one of {', '.join(FORMATS)}")
    drafts = readers[fmt](path)
    root = Path(image_root)
    if not root.is_dir():
        raise ManifestError(f"image root {root} is not a folder")
    report = ImportReport()
    patients = []
    for pid, draft in drafts.items():
        images: dict[str, str | None] = {}
        for eye in ("left", "right"):
            name = draft.images.get(eye)
            relative = posixpath.join(image_dir, name) if name else None
            if relative and not (root / relative).exists():
                report.missing_images.append(relative)
                relative = None
            elif relative:
                row, column = draft.image_rows[eye]
                check_image_file(root, relative, str(path), row, column, name)  # a folder, or a link out of the root
            images[eye] = relative
        if images["left"] is None and images["right"] is None:
            report.dropped_patients.append(pid)
            continue
        patients.append(Patient(pid, images["left"], images["right"], draft.labels, "train", dict(draft.extra)))
    if not patients:
        raise ManifestError(f"{path}: no patient has an image under {root / image_dir}")
    return patients, report
