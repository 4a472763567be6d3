"""Atomic file writes, folders the project owns, CSV for people, and content hashing.

Every file the project writes goes through here, so a killed job never leaves a truncated
file under its final name: data is written to a temporary file in the same folder, flushed
to disk, then renamed over the target (rename is atomic on POSIX and Windows).

Folders the project creates carry a marker file (:data:`OWNER_MARK`); only such folders are
ever deleted or cleared (:func:`remove_owned`), so a mistyped ``--out`` can never delete a
user's photos.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import FundusError

OWNER_MARK = ".fundus-ensemble"
LOCK_NAME = ".fundus-ensemble.lock"
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a plain write would honour the umask, and so do we
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# OWASP, CSV injection: a cell starting with one of these is a formula to a spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def neutralise_cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as text: formula-like text gets a leading ``'``.

    Plain numbers (``-0.5``, ``+3``) are left alone, so numeric ids and probabilities stay
    valid in the official submission format.
    """
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_for_people(header: list[str], rows: list[list[object]]) -> str:
    """CSV text with every cell neutralised (:func:`neutralise_cell`): for files people open."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([neutralise_cell(h) for h in header])
    writer.writerows([neutralise_cell(cell) for cell in row] for row in rows)
    return out.getvalue()


_MARK_TEXT = re.compile(r"made by fundus-ensemble for (.+?); the project may delete this folder")


def folder_owner(path: str | os.PathLike) -> str | None:
    """What the project made ``path`` for (the purpose its marker records), or None when it did not."""
    mark = Path(path) / OWNER_MARK
    if Path(path).is_symlink() or not mark.is_file():
        return None
    found = _MARK_TEXT.search(mark.read_text(encoding="utf-8", errors="replace"))
    return found.group(1) if found else "an unknown purpose"


def claim_folder(path: str | os.PathLike, purpose: str, adopt_if: tuple[str, ...] = ()) -> Path:
    """Create ``path`` as a folder the project owns for ``purpose``, or accept it if it already is one.

    An empty folder is adopted. A non-empty folder without the marker is refused, unless it
    holds one of ``adopt_if`` (files only this project writes, from before markers existed).
    A folder the project made for another purpose (preprocessed views given as a run's
    ``--out``) is refused too: replacing it would destroy another stage's output.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FundusError(f"{path} is a file; {purpose} needs a folder")
    mark = path / OWNER_MARK
    owner = folder_owner(path)
    if owner is not None and owner != purpose:
        raise FundusError(
            f"{path} holds {owner}, made by fundus-ensemble; {purpose} needs a folder of its own: choose another"
        )
    if path.is_dir() and owner is None:
        entries = [p.name for p in path.iterdir()]
        if entries and not any(name in entries for name in adopt_if):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise FundusError(
                f"{path} already holds files fundus-ensemble did not write ({shown}); "
                f"choose a new or empty folder for {purpose}"
            )
    path.mkdir(parents=True, exist_ok=True)
    if not mark.is_file():
        atomic_write_text(mark, f"made by fundus-ensemble for {purpose}; the project may delete this folder\n")
    return path


def remove_owned(path: str | os.PathLike, purpose: str | None = None) -> None:
    """Delete a folder the project created (it holds :data:`OWNER_MARK`), for ``purpose`` when
    given; refuse any other."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    owner = folder_owner(path)
    if owner is None:
        raise FundusError(
            f"refusing to delete {path}: fundus-ensemble did not create it (no {OWNER_MARK} marker inside); "
            "move or delete it yourself, or choose another output folder"
        )
    if purpose is not None and owner != purpose:
        raise FundusError(f"refusing to delete {path}: it holds {owner}, not {purpose}; choose another output folder")
    shutil.rmtree(path)


def refuse_overlap(out: str | os.PathLike, inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse an output folder that is, or contains, one of the named input files or folders."""
    out_resolved = Path(out).resolve()
    for what, value in inputs.items():
        resolved = Path(value).resolve()
        if resolved == out_resolved or resolved.is_relative_to(out_resolved):
            raise FundusError(
                f"the output folder {out} contains the {what} {value}; writing there could overwrite or delete "
                "your files: choose an output folder outside it"
            )


def check_output_file(out: str | os.PathLike, inputs: list[str | os.PathLike], force: bool) -> None:
    """Refuse to write ``out`` over an input file, or over an existing file without ``force``."""
    out = Path(out)
    for source in inputs:
        if out.exists() and Path(source).exists() and os.path.samefile(out, source):
            raise FundusError(f"--out {out} is the input file {source}; writing it would destroy the input")
    if out.is_dir():
        raise FundusError(f"--out {out} is a folder; give a file name")
    if out.exists() and not force:
        raise FundusError(f"{out} already exists; pass --force to replace it or choose another --out")


def claim_output_file(
    out: str | os.PathLike, what: str, made_here: Callable[[Any], bool], protected: dict[str, str | os.PathLike]
) -> Path:
    """Check before any work that ``out`` may be written as ``what`` (a JSON file): not a folder,
    its folder not a file, not inside a ``protected`` folder (a run: its own files must stay as
    trained), and, when it exists, a file this command made before (``made_here`` of its JSON)."""
    out = Path(out)
    if out.is_dir():
        raise FundusError(f"--out {out} is a folder; give the {what} file to write")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FundusError(f"--out {out}: {parent} is a file, not a folder")
            break
    for name, folder in protected.items():
        if folder is not None and out.resolve().is_relative_to(Path(folder).resolve()):
            raise FundusError(f"--out {out} is inside the {name} {folder}; write the {what} outside it")
    if out.exists() or out.is_symlink():
        try:
            ours = out.is_file() and not out.is_symlink() and made_here(read_json_file(out, what))
        except FundusError:
            ours = False
        if not ours:
            raise FundusError(f"--out {out} exists and is not a {what} this command wrote; choose another --out")
    return out


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, purpose: str) -> Iterator[None]:
    """Hold ``path``'s write lock while writing ``purpose`` there; a second writer is refused at
    once (two runs into one folder would mix their outputs). The operating system drops the
    lock when the process ends, however it ends, so a killed run never leaves it stuck."""
    path = Path(path)
    handle = open(path / LOCK_NAME, "a+b")
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        handle.close()
        raise FundusError(
            f"{path} is being written by another run right now ({purpose}); wait for it to finish or "
            "choose another output folder"
        ) from None
    try:
        yield
    finally:
        handle.close()


JSON_MAX_BYTES = 2_000_000  # a model's JSON (bundle record, card, calibration, site file) is tens of kB
NPZ_MAX_ELEMENTS = 20_000_000  # a model's arrays: the largest is a reference's 32 x 1408 components


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """A JSON file a model is made of, read only when it is at most ``max_bytes`` (its size is checked
    first) and parsed without unbounded nesting; every failure is one :class:`FundusError` naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FundusError(f"{path}: {what} not found") from None
    if path.is_dir():
        raise FundusError(f"{path}: is a folder, not {what}")
    if size > max_bytes:
        raise FundusError(f"{path}: {size} bytes; {what} is at most {max_bytes} (refused unread)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise FundusError(f"{path}: not {what} (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FundusError(f"{path}: not readable as {what} ({exc})") from None


def read_npz(
    path: str | os.PathLike,
    what: str,
    shapes: dict[str, tuple[int | None, ...]],
    max_elements: int = NPZ_MAX_ELEMENTS,
) -> dict[str, Any]:
    """The arrays of an ``.npz`` a model is made of, each named in ``shapes`` (``None``: any length
    there), after its header says a number array of that shape and no larger than ``max_elements``
    in all; float arrays must be finite. Nothing is decompressed before the headers pass; no object
    arrays (pickles) are read; every failure is one :class:`FundusError` naming the file."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    path = Path(path)
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {n.removesuffix(".npy"): n for n in archive.namelist()}
            missing = sorted(set(shapes) - set(members))
            if missing:
                raise FundusError(f"{path}: {what} lacks {', '.join(missing)}")
            for name in shapes:
                with archive.open(members[name]) as stream:
                    version = npy.read_magic(stream)
                    read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    headers[name] = read(stream, max_header_size=10_000)
    except FundusError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise FundusError(f"{path}: not readable as {what} ({exc})") from None
    total = 0
    for name, (shape, _, dtype) in headers.items():
        if dtype.hasobject or dtype.kind not in "fiub":
            raise FundusError(f"{path}: {what}'s {name} holds {dtype} values; numbers only (no pickled objects)")
        want = shapes[name]
        if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
            raise FundusError(f"{path}: {what}'s {name} has shape {shape}, expected {want}")
        total += int(np.prod(shape, dtype=np.int64))
    if total > max_elements:
        raise FundusError(f"{path}: {what} declares {total} values; at most {max_elements} (refused unread)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in shapes}
    except (OSError, ValueError) as exc:
        raise FundusError(f"{path}: not readable as {what} ({exc})") from None
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise FundusError(f"{path}: {what}'s {name} holds NaN or infinite values")
    return arrays


def natural_key(text: str) -> tuple:
    """Sort key that orders the numbers inside ids as numbers: 23 before 992 before 1258 (text order
    puts 1258 first), so a list of patients reads as a person expects."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", text))
