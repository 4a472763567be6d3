"""Fundus photos as fundus cameras store them in hospitals: DICOM (Ophthalmic Photography).

A DICOM file is known by its Part 10 magic (``DICM`` at byte 128), whatever its name. Its
pixels are decoded by pydicom, with Pillow or pylibjpeg for the compressed transfer syntaxes
cameras use (JPEG baseline, JPEG lossless, JPEG-LS, JPEG 2000, RLE), and colour-converted
from YBR to RGB. The header says which eye it is (ImageLaterality, or the series'
Laterality) and whose (PatientID): what a folder of a camera's files is paired by.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImageError
from .limits import DEFAULT_MAX_PIXELS

DICOM_SUFFIXES = (".dcm", ".dicom")
_MAGIC_OFFSET = 128
_EYES = {"L": "left", "R": "right"}
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is one deflate stream
HEADER_ALLOWANCE = 16_000_000  # bytes a dataset may hold beside its pixels (header, overlays, private tags)
NO_LIMIT_INFLATE = 1_000_000_000  # the most a deflated dataset may inflate to when no pixel limit is set


@dataclass(frozen=True)
class DicomHeader:
    """What the header says of a photo: whose it is and which eye (None when it does not say)."""

    patient_id: str | None
    laterality: str | None  # "left", "right" or None


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (by its magic; a ``.dcm`` name without it is not)."""
    try:
        with open(path, "rb") as f:
            f.seek(_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def inflate_limit(max_pixels: int | None) -> int:
    """The most bytes a deflated dataset may inflate to: its pixels at the limit (3 bytes each:
    8-bit colour, or 16-bit gray with room) and :data:`HEADER_ALLOWANCE` beside them."""
    return NO_LIMIT_INFLATE if max_pixels is None else 3 * max_pixels + HEADER_ALLOWANCE


DEFER_BYTES = 1_000_000  # elements longer than this stay on disk until used (a private tag is never used)
_INFLATE_CHUNK = 1 << 20


@contextlib.contextmanager
def _opened(path: Path, stop_before_pixels: bool, max_pixels: int | None):
    """The dataset of ``path``, valid inside the ``with``: long elements are read from disk only
    when used, and a deflated dataset is inflated to a private temporary file (never whole into
    memory), so a small file that inflates to hundreds of MB costs a megabyte or two of memory."""
    import pydicom  # only photos that are DICOM pay for the import

    with contextlib.ExitStack() as stack:
        try:
            with warnings.catch_warnings():  # a damaged file's warnings: the ImageError below says it once
                warnings.simplefilter("ignore")
                meta = pydicom.filereader.read_file_meta_info(path)
                source = path
                if meta.get("TransferSyntaxUID") == DEFLATED:  # only a deflated file needs a scratch folder
                    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fundus-dicom-")))
                    source = _inflate_to(scratch / "inflated.dcm", path, meta, inflate_limit(max_pixels))
                ds = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels, defer_size=DEFER_BYTES)
        except ImageError:
            raise
        except Exception as exc:  # pydicom raises many types for a damaged file; each is the file's fault
            raise ImageError(f"not a readable DICOM file ({_reason(exc)})") from None
        yield ds


def _inflate_to(target: Path, path: Path, meta, limit: int) -> Path:
    """A deflated file rewritten to ``target`` as the same dataset uncompressed, a megabyte at a
    time, or ImageError past ``limit`` bytes: deflate reaches 1000:1, so a file within any
    upload limit could otherwise take tens of GB (pydicom inflates the whole stream at once)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    group_length = meta.get("FileMetaInformationGroupLength")
    if not isinstance(group_length, int) or group_length <= 0:
        raise ImageError("deflated DICOM file without a File Meta Information Group Length")
    compressed_bytes = path.stat().st_size
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\0" * _MAGIC_OFFSET + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    with open(path, "rb") as src, open(target, "wb") as out:
        out.write(head.getvalue())
        src.seek(_MAGIC_OFFSET + 4 + 12 + group_length)  # preamble, DICM, the (0002,0000) element, the group
        pending = b""
        while True:
            if not pending:
                pending = src.read(_INFLATE_CHUNK)
                if not pending:
                    break
            try:
                piece = inflater.decompress(pending, _INFLATE_CHUNK)
            except zlib.error as exc:
                raise ImageError(f"damaged deflated DICOM dataset ({exc})") from None
            pending = inflater.unconsumed_tail
            written += len(piece)
            if written > limit:
                raise ImageError(
                    f"deflated DICOM dataset inflates past {limit / 1e6:.0f} MB ({compressed_bytes / 1e6:.2f} MB "
                    "compressed); refused before reading it (the limit follows --max-megapixels)"
                )
            out.write(piece)
            if inflater.eof:
                break
    return target


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_dicom_header(path: str | os.PathLike, max_pixels: int | None = None) -> DicomHeader:
    """PatientID and laterality, read without the pixel data (a deflated dataset is inflated up
    to :func:`inflate_limit` of ``max_pixels``; None: the default pixel limit's)."""
    with _opened(Path(path), stop_before_pixels=True, max_pixels=max_pixels or DEFAULT_MAX_PIXELS) as ds:
        return _header_of(ds)


def _header_of(ds) -> DicomHeader:
    code = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper()
    patient = str(ds.get("PatientID", "") or "").strip() or None
    return DicomHeader(patient, _EYES.get(code))


def check_laterality(path: str | os.PathLike, eye: str, max_pixels: int | None = None) -> None:
    """The one rule for every way a photo reaches the project as ``eye`` (a form slot, --left or
    --right, a manifest column, a file name): a DICOM whose header says the other eye is refused
    with :class:`ImageError`. Other photos, and a DICOM that does not say, pass."""
    if not is_dicom(path):
        return
    said = read_dicom_header(path, max_pixels).laterality
    if said is not None and said != eye:
        raise ImageError(
            f"given as the {eye} eye, but it is a DICOM of the {said} eye (ImageLaterality); give it as "
            f"the {said} eye or fix its header"
        )


def decode_dicom(path: str | os.PathLike, max_pixels: int | None) -> np.ndarray:
    """A DICOM photo as 8-bit BGR (OpenCV's order), or :class:`ImageError` with the reason.

    The pixel count is checked against ``max_pixels`` before decoding: the header's, and a
    compressed frame's own (a JPEG stream may hold a larger image than the header says; the
    decoder would allocate what the stream says). A deflated dataset inflates only up to
    :func:`inflate_limit`.
    """
    with _opened(Path(path), stop_before_pixels=False, max_pixels=max_pixels) as ds:
        return _decoded(ds, max_pixels)


def _decoded(ds, max_pixels: int | None) -> np.ndarray:
    if "PixelData" not in ds:
        raise ImageError("DICOM file without pixel data (not a photo: a report or a structured document?)")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if max_pixels is not None and rows * columns * frames > max_pixels:
        raise ImageError(
            f"image too large ({columns} x {rows} x {frames} frames = {rows * columns * frames / 1e6:.0f} "
            f"megapixels; the limit is {max_pixels / 1e6:.0f}, set by --max-megapixels)"
        )
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames); export the one photo of each eye as its own file")
    if ds.file_meta.get("TransferSyntaxUID") is not None and ds.file_meta.TransferSyntaxUID.is_encapsulated:
        _check_frame_size(ds, rows, columns)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric.startswith("PALETTE"):
        raise ImageError("palette-colour DICOM is not supported; export the photo as RGB")
    try:
        pixels = ds.pixel_array  # pydicom converts YBR_* to RGB here
    except Exception as exc:  # an unsupported or damaged compressed stream
        raise ImageError(
            f"cannot decode the DICOM pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}: {_reason(exc)})"
        ) from None
    if pixels.ndim not in (2, 3) or pixels.shape[:2] != (rows, columns):
        raise ImageError(f"DICOM pixel data of shape {pixels.shape} does not match its {columns} x {rows} header")
    bits = int(ds.get("BitsStored", 8) or 8)
    if pixels.dtype.kind == "i":
        pixels = np.clip(pixels, 0, None)
    if bits > 8:
        pixels = pixels >> (bits - 8)  # the stored range, not the container's, to 0..255
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels  # MONOCHROME1 shows its minimum as white
    if pixels.ndim == 3:
        if pixels.shape[2] != 3:
            raise ImageError(f"DICOM photo with {pixels.shape[2]} samples per pixel; expected 1 (gray) or 3 (colour)")
        return np.ascontiguousarray(pixels[:, :, ::-1])
    import cv2

    return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)


RLE_LOSSLESS = "1.2.840.10008.1.2.5"  # no size in the stream: pydicom decodes into the header's Rows x Columns
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # JPEG, and JPEG-LS's SOF55


def compressed_frame_size(frame: bytes) -> tuple[int, int] | None:
    """(columns, rows) a JPEG, JPEG-LS or JPEG 2000 codestream says it holds, from its frame header
    (SOFn, or SIZ), without decoding; None when no such header is found."""
    if frame[:2] == b"\xff\xd8":  # JPEG family: walk the marker segments up to the frame header
        at = 2
        while at + 4 <= len(frame):
            if frame[at] != 0xFF:
                return None
            marker = frame[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
                continue
            (length,) = struct.unpack(">H", frame[at + 2 : at + 4])
            if marker in _SOF:
                if at + 9 > len(frame):
                    return None
                rows, columns = struct.unpack(">HH", frame[at + 5 : at + 9])
                return columns, rows
            if marker == 0xDA or length < 2:  # scan data before any frame header
                return None
            at += 2 + length
        return None
    siz = frame.find(b"\xff\x4f\xff\x51")  # JPEG 2000 codestream (raw, or inside a JP2 file's box)
    if siz >= 0 and siz + 24 <= len(frame):
        x, y, x0, y0 = struct.unpack(">IIII", frame[siz + 8 : siz + 24])
        return x - x0, y - y0
    return None


def _check_frame_size(ds, rows: int, columns: int) -> None:
    """Refuse a compressed frame whose own size is not the header's (checked against the limit)."""
    from pydicom.encaps import generate_frames

    syntax = ds.file_meta.TransferSyntaxUID
    if syntax == RLE_LOSSLESS:
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:
        raise ImageError(f"cannot read the DICOM's compressed frame ({syntax.name}: {_reason(exc)})") from None
    size = compressed_frame_size(frame)
    if size is None:
        raise ImageError(
            f"cannot find the image size in the DICOM's compressed frame ({syntax.name}); refused before decoding"
        )
    if size != (columns, rows):
        raise ImageError(
            f"the DICOM's compressed frame holds a {size[0]} x {size[1]} image but its header says "
            f"{columns} x {rows}; refused before decoding"
        )


def write_dicom_photo(
    path: str | os.PathLike,
    bgr: np.ndarray,
    patient_id: str = "",
    laterality: str | None = None,
    compression: str | None = None,
) -> Path:
    """Write ``bgr`` as a camera stores a photo: an Ophthalmic Photography 8-bit DICOM file.

    ``laterality`` "left"/"right" sets ImageLaterality; ``compression`` None stores RGB pixels,
    ``"jpeg"`` a JPEG baseline stream in YBR_FULL_422 (what most cameras write), ``"rle"``
    RLE lossless. For tests and demos: the project reads such files, it does not make them.
    """
    import cv2
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid

    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "OP", patient_id
    if laterality is not None:
        ds.ImageLaterality = {"left": "L", "right": "R"}[laterality]
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if compression == "jpeg":
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise ImageError("JPEG encoding failed")
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([jpeg.tobytes()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = rgb.tobytes()
        if compression == "rle":
            ds.compress(RLELossless)
        elif compression is not None:
            raise ValueError(f"compression {compression!r}: expected None, 'jpeg' or 'rle'")
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path
