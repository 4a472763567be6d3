"""Read a PyTorch state dict (``torch.save``'s legacy and zip formats) into numpy, without torch.

A ``.pth`` file is a pickle, and unpickling can run any code the file names. The unpickler
here resolves only the globals a state dict of tensors needs (an ``OrderedDict``, torch's
tensor rebuild function and its storage types) to local stand-ins; any other global ends
the read with :class:`UnsafePickleError` when the pickle first names it, before anything
the file asks for is called. Tensors come back as float32/int64/... numpy arrays in torch's
own layout (a conv kernel is ``(out, in, kh, kw)``).

Legacy format (``_use_new_zipfile_serialization=False``): five pickles (magic number,
protocol version, system info, the state dict with storages as persistent ids, the storage
keys in file order), then each storage as a little-endian int64 element count and its raw
bytes. Zip format: ``<name>/data.pkl`` with the same persistent ids and one file
``<name>/data/<key>`` per storage.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WeightsError

MAX_SHARING = 4  # tensors may view one storage (tied weights); all of them together at most this many storages' bytes
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafePickleError(WeightsError):
    """The file names a global that a state dict never needs; nothing it asked for was run."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise WeightsError(f"a tensor's storage is {type(storage).__name__}, not a storage of the file")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only what a state dict of tensors names; anything else is refused on sight."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"{self.source}: refusing to load {module}.{name}: a state dict of tensors needs only "
            "OrderedDict, torch's tensor rebuild and its storage types (nothing in the file was run)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise WeightsError(f"{self.source}: unexpected persistent id {str(pid)[:80]}")
        return _StorageRef(str(pid[2]), pid[1].dtype, int(pid[4]))


def _load_pickle(file, source: str):
    try:
        return _StateDictUnpickler(file, source).load()
    except (UnsafePickleError, WeightsError):
        raise
    except Exception as exc:  # truncated or garbled: one line, not pickle's traceback
        raise WeightsError(f"{source}: not a readable state dict ({type(exc).__name__}: {str(exc)[:120]})") from exc


def _materialize(state, storages: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise WeightsError(f"{source}: holds a {type(state).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    # Every tensor is copied out of its storage: bound the copies by the bytes the file holds, so a
    # few hundred bytes of pickle cannot ask for any amount of memory (a zero stride repeats one element).
    budget = MAX_SHARING * sum(data.nbytes for data in storages.values())
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise WeightsError(f"{source}: entry {name!r} is a {type(ref).__name__}, not a tensor")
        data = storages.get(ref.storage.key)
        if data is None:
            raise WeightsError(f"{source}: storage {ref.storage.key} of {name!r} is missing")
        if any(n < 0 for n in ref.shape):
            raise WeightsError(f"{source}: tensor {name!r} has a negative size {ref.shape}")
        elements = int(np.prod(ref.shape, dtype=object))
        if elements > data.size:
            raise WeightsError(
                f"{source}: tensor {name!r} {ref.shape} has {elements} elements, more than its storage's "
                f"{data.size} (a state dict's tensors never repeat their storage's elements)"
            )
        budget -= elements * data.itemsize
        if budget < 0:
            raise WeightsError(f"{source}: its tensors take more than {MAX_SHARING} times the bytes of its storages")
        extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1 if all(ref.shape) else 0
        if ref.offset < 0 or extent > data.size or any(s < 0 for s in ref.stride):
            raise WeightsError(f"{source}: tensor {name!r} {ref.shape} reaches past its storage of {data.size}")
        view = np.lib.stride_tricks.as_strided(
            data[ref.offset :], shape=ref.shape, strides=[s * data.itemsize for s in ref.stride], writeable=False
        )
        out[str(name)] = np.array(view)  # a contiguous copy in torch's logical layout
    return out


def _read_legacy(file, source: str) -> dict[str, np.ndarray]:
    header = [_load_pickle(file, source) for _ in range(3)]  # restricted too: a payload may hide in any pickle
    if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL:
        raise WeightsError(f"{source}: not a torch legacy file (magic {header[0]!r}, protocol {header[1]!r})")
    if not isinstance(header[2], dict) or not header[2].get("little_endian", False):
        raise WeightsError(f"{source}: only little-endian torch files are supported")
    state = _load_pickle(file, source)
    keys = _load_pickle(file, source)
    if not isinstance(keys, list):
        raise WeightsError(f"{source}: the storage key list is a {type(keys).__name__}")
    refs = (
        {ref.storage.key: ref.storage for ref in state.values() if isinstance(ref, _TensorRef)}
        if isinstance(state, dict)
        else {}
    )
    storages = {}
    for key in keys:
        ref = refs.get(str(key))
        raw = file.read(8)
        if ref is None or len(raw) != 8:
            raise WeightsError(f"{source}: storage {key} is {'unknown' if ref is None else 'truncated'}")
        (count,) = struct.unpack("<q", raw)
        if count < 0 or count != ref.numel:
            raise WeightsError(
                f"{source}: storage {key} holds {count} elements where its tensors' record says {ref.numel}"
            )
        data = file.read(count * ref.dtype.itemsize)
        if count < 0 or len(data) != count * ref.dtype.itemsize:
            raise WeightsError(
                f"{source}: storage {key} is truncated ({len(data)} of {count * ref.dtype.itemsize} bytes)"
            )
        storages[str(key)] = np.frombuffer(data, ref.dtype)
    return _materialize(state, storages, source)


def _stored_member(archive: zipfile.ZipFile, name: str, source: str, size: int | None = None) -> bytes:
    """A member's bytes, read only when torch could have written it: stored, not compressed (a
    compressed member inflates to what it likes), and of ``size`` bytes when that is known."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise WeightsError(f"{source}: {name} is compressed; torch stores a checkpoint's members uncompressed")
    if size is not None and info.file_size != size:
        raise WeightsError(f"{source}: {name} holds {info.file_size} bytes where its tensors' record says {size}")
    return archive.read(name)


def _read_zip(path: Path, source: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise WeightsError(f"{source}: a torch zip file has one data.pkl, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        state = _load_pickle(io.BytesIO(_stored_member(archive, pickles[0], source)), source)
        storages = {}
        for ref in state.values() if isinstance(state, dict) else ():
            if isinstance(ref, _TensorRef) and ref.storage.key not in storages:
                member = f"{prefix}data/{ref.storage.key}"
                if member not in names:
                    raise WeightsError(f"{source}: storage file {member} is missing")
                size = ref.storage.numel * ref.storage.dtype.itemsize
                storages[ref.storage.key] = np.frombuffer(
                    _stored_member(archive, member, source, size), ref.storage.dtype
                )
    return _materialize(state, storages, source)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a torch state dict file, by name, as numpy arrays (torch's layout)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"state dict file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path, str(path))
        with open(path, "rb") as file:
            return _read_legacy(file, str(path))
    except (UnsafePickleError, WeightsError):
        raise
    except Exception as exc:  # a damaged zip or storage (BadZipFile, ValueError, ...): the file's fault, one line
        raise WeightsError(f"{path}: not a torch state dict ({type(exc).__name__}: {str(exc)[:120]})") from exc
