"""Fundus photos as fundus cameras store them in hospitals: DICOM (Ophthalmic Photography).

A DICOM file is known by its Part 10 magic (``DICM`` at byte 128), whatever its name. Its
pixels are decoded by pydicom, with Pillow or pylibjpeg for the compressed transfer syntaxes
cameras use (JPEG baseline, JPEG lossless, JPEG-LS, JPEG 2000, RLE), and colour-converted
from YBR to RGB. The header says which eye it is (ImageLaterality, or the series'
Laterality) and whose (PatientID): what a folder of a camera's files is paired by.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImageError

DICOM_SUFFIXES = (".dcm", ".dicom")
_MAGIC_OFFSET = 128
_EYES = {"L": "left", "R": "right"}


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


def _read(path: Path, stop_before_pixels: bool):
    import pydicom  # only photos that are DICOM pay for the import

    try:
        with warnings.catch_warnings():  # a damaged file's warnings: the ImageError below says it once
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # pydicom raises many types for a damaged file; each is the file's fault
        raise ImageError(f"not a readable DICOM file ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_dicom_header(path: str | os.PathLike) -> DicomHeader:
    """PatientID and laterality, read without the pixel data."""
    ds = _read(Path(path), stop_before_pixels=True)
    code = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper()
    patient = str(ds.get("PatientID", "") or "").strip() or None
    return DicomHeader(patient, _EYES.get(code))


def decode_dicom(path: str | os.PathLike, max_pixels: int | None) -> np.ndarray:
    """A DICOM photo as 8-bit BGR (OpenCV's order), or :class:`ImageError` with the reason.

    The pixel count is checked against ``max_pixels`` from the header, before decoding.
    """
    path = Path(path)
    ds = _read(path, stop_before_pixels=False)
    if "PixelData" not in ds:
        raise ImageError("DICOM file without pixel data (not a photo: a report or a structured document?)")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if max_pixels is not None and rows * columns * frames > max_pixels:
        raise ImageError(f"image too large ({columns} x {rows} x {frames} frames = {rows * columns * frames / 1e6:.0f} "
                         f"megapixels; the limit is {max_pixels / 1e6:.0f}, set by --max-megapixels)")
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames); export the one photo of each eye as its own file")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric.startswith("PALETTE"):
        raise ImageError("palette-colour DICOM is not supported; export the photo as RGB")
    try:
        pixels = ds.pixel_array  # pydicom converts YBR_* to RGB here
    except Exception as exc:  # an unsupported or damaged compressed stream
        raise ImageError(f"cannot decode the DICOM pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}: "
                         f"{_reason(exc)})") from None
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


def write_dicom_photo(path: str | os.PathLike, bgr: np.ndarray, patient_id: str = "", laterality: str | None = None,
                      compression: str | None = None) -> Path:
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
