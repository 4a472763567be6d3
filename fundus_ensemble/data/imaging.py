"""Decode a fundus photograph, crop it to the retina, and make the paper's two views.

All arrays here are OpenCV's: uint8, BGR channel order, (height, width[, channels]).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from .dicom import decode_dicom, is_dicom
from .limits import DEFAULT_MAX_PIXELS

# Below this share of the frame a "retina" is noise, a label or a reflection.
MIN_FOV_FRACTION = 0.05
# Pixels at most this bright (max over channels) count as the camera's black surround.
BORDER_LEVEL = 20
# Smaller photos hold no usable detail (and are below every backbone's minimum input).
MIN_SIDE = 32
# A retina with more than this share of near-white pixels is a blown-out exposure.
MAX_WHITE_FRACTION = 0.8
_EXIF_ORIENTATION = 0x0112


def decode_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as 8-bit BGR, upright, or raise :class:`ImageError` with the reason.

    Accepts what clinics export: 8/16-bit, grayscale, RGBA (composited on black, the
    colour of the camera surround), and DICOM photos (:mod:`.dicom`), known by their content. Applies the EXIF orientation, as every image viewer does.
    Truncated JPEGs are refused (OpenCV would silently fill the missing part with grey), and
    so are images of more than ``max_pixels`` pixels, from the header, before decoding.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError("is a folder, not an image file")
    if is_dicom(path):
        return decode_dicom(path, max_pixels)
    width_height, orientation = _header(path)
    if max_pixels is not None and width_height and width_height[0] * width_height[1] > max_pixels:
        w, h = width_height
        raise ImageError(
            f"image too large ({w} x {h} = {w * h / 1e6:.0f} megapixels; the limit is "
            f"{max_pixels / 1e6:.0f}, set by --max-megapixels)"
        )
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError("file not found (moved or deleted while the job ran?)") from None
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageError("empty file (0 bytes)")
    if data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:].tobytes():
        raise ImageError("truncated JPEG (no end-of-image marker)")
    # IMREAD_UNCHANGED keeps 16 bits and alpha, but also ignores EXIF orientation (applied below).
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError("not a readable image (unknown format or corrupt data)")
    return apply_exif_orientation(to_bgr8(image), orientation)


def _header(path: Path) -> tuple[tuple[int, int] | None, int]:
    """``((width, height), EXIF orientation)`` read from the header alone; ``(None, 1)`` if unknown."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                size = image.size
                try:
                    orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
                except Exception:  # a malformed EXIF block must not cost the photo
                    orientation = 1
                return size, orientation
    except Image.DecompressionBombError:
        return (1 << 16, 1 << 16), 1  # far beyond any limit: Pillow refused to read the header's size
    except (UnidentifiedImageError, OSError, ValueError):
        return None, 1  # OpenCV may still read it; it reports its own errors


def apply_exif_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn/mirror a decoded image as EXIF Orientation 1-8 says (values outside leave it as is)."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(transforms[orientation](image)) if orientation in transforms else image


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Convert any decoded image (8/16-bit, 1/3/4 channels) to uint8 BGR."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        scale = 255.0 / max(float(image.max()), 1e-6) if image.dtype.kind == "f" else 1.0
        image = np.clip(image.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        return (image[:, :, :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
    if image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    return image[:, :, :3]


def find_fov(image: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box ``(x0, y0, x1, y1)`` of the retina's field of view.

    The largest bright connected region wins, so text, timestamps and dust in the black
    surround are ignored; the search runs on a downscaled copy for speed on large photos.
    """
    height, width = image.shape[:2]
    scale = min(1.0, 512.0 / max(height, width))
    small = cv2.resize(
        image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
    )
    brightness = cv2.medianBlur(small.max(axis=2), 5)
    mask = (brightness > BORDER_LEVEL).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        raise ImageError("no retina found (image is black)")
    areas = stats[1:, cv2.CC_STAT_AREA]
    best = 1 + int(np.argmax(areas))
    if areas[best - 1] < MIN_FOV_FRACTION * mask.size:
        raise ImageError(f"no retina found (brightest region covers {areas[best - 1] / mask.size:.1%} of the frame)")
    x, y, w, h = (int(v) for v in stats[best, :4])
    x0, y0 = int(np.floor(x / scale)), int(np.floor(y / scale))
    x1, y1 = min(width, int(np.ceil((x + w) / scale))), min(height, int(np.ceil((y + h) / scale)))
    return x0, y0, x1, y1


def crop_to_fov(image: np.ndarray, size: int) -> np.ndarray:
    """Crop to the retina, pad to a centred black square, resize to ``size`` x ``size``.

    Raises :class:`ImageError` for photos too small to use, with no retina, or overexposed.
    """
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ImageError(f"image too small ({width} x {height} px; at least {MIN_SIDE} px a side needed)")
    x0, y0, x1, y1 = find_fov(image)
    crop = image[y0:y1, x0:x1]
    # measured inside the retina: the black corners of the crop would dilute a white disc below any limit
    retina = crop.max(axis=2) > BORDER_LEVEL
    white = float((crop.min(axis=2) >= 245)[retina].mean()) if retina.any() else 0.0
    if white > MAX_WHITE_FRACTION:
        raise ImageError(f"overexposed ({white:.0%} of the retina is near white)")
    return square_crop(image, (x0, y0, x1, y1), size)


def square_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Cut ``box`` out of ``image``, pad it to a centred black square, resize to ``size`` x ``size``.

    Public so that anything drawn in photo coordinates (a synthetic finding's region, an
    annotation) lands on the same pixels of a view as the photo does.
    """
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1]
    h, w = crop.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = cv2.copyMakeBorder(crop, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=0)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interpolation)


def color_view(square: np.ndarray) -> np.ndarray:
    """The paper's first view: the cropped colour photograph, unchanged (BGR)."""
    return square


def gray_eq_view(square: np.ndarray) -> np.ndarray:
    """The paper's second view: grayscale with global histogram equalization (one channel)."""
    return cv2.equalizeHist(cv2.cvtColor(square, cv2.COLOR_BGR2GRAY))


VIEW_FUNCTIONS = {"color": color_view, "gray_eq": gray_eq_view}


def encode_png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ImageError("PNG encoding failed")
    return buffer.tobytes()


def make_views(
    path: str | os.PathLike, size: int, views=tuple(VIEW_FUNCTIONS), max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """A photo file to its views (OpenCV arrays): decode, crop to the retina, square, resize.

    The one path from a photo to views, for preprocessing (which saves them as PNG) and for
    prediction on new photos (which feeds them on, via :func:`view_to_model_input`).
    """
    return views_of(crop_to_fov(decode_image(path, max_pixels), size), views)


def views_of(square: np.ndarray, views=tuple(VIEW_FUNCTIONS)) -> dict[str, np.ndarray]:
    """The views of a photo already cropped to its retina and squared (:func:`crop_to_fov`)."""
    return {view: VIEW_FUNCTIONS[view](square) for view in views}


def view_to_model_input(view: np.ndarray, size: int | None = None) -> np.ndarray:
    """A view array (BGR, or one gray channel) as the models take it: uint8 RGB, gray replicated to 3 channels."""
    image = view if view.ndim == 3 else cv2.cvtColor(view, cv2.COLOR_GRAY2BGR)
    if size is not None and image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_view(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Load a preprocessed view (PNG) as the model's input (:func:`view_to_model_input`)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # gray PNGs stay one channel, as written
    if image is None:
        raise ImageError(f"cannot read preprocessed view {path}; re-run preprocessing")
    return view_to_model_input(image, size)
