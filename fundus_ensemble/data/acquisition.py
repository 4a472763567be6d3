"""How another clinic's camera changes a photo: the camera-shift protocol's named shifts, and random
acquisition shifts drawn from the same families for training.

Every function takes and returns an 8-bit BGR photo as OpenCV reads it, before the crop and the
views are made (:mod:`.preprocess`), because that is where a camera acts: a gray-eq view made from
a blurred photo is not the blurred gray-eq view. The protocol
(``docs/measurements/camera_shift.py``) applies one named shift to every test photo; the
acquisition augmentation (:func:`random_acquisition`) draws a few shifts of random strength per
photo, so heads can learn from photos as other cameras take them.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from ..errors import ImageError
from .imaging import decode_image
from .manifest import Patient


def gamma(photo: np.ndarray, g: float) -> np.ndarray:
    """Mid-tones brighter (``g`` < 1) or darker (``g`` > 1); black and white stay."""
    table = (255 * (np.arange(256) / 255) ** g).astype(np.uint8)
    return cv2.LUT(photo, table)


def gain(photo: np.ndarray, bgr: tuple[float, float, float]) -> np.ndarray:
    """Each channel scaled (a white balance or exposure change), clipped to 8 bits."""
    return np.clip(photo * np.asarray(bgr, np.float64), 0, 255).astype(np.uint8)


def resample(photo: np.ndarray, side: int) -> np.ndarray:
    """The photo as a camera of another resolution would give it: ``side`` pixels on its longer side."""
    h, w = photo.shape[:2]
    factor = side / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(photo, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)


def blur(photo: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(photo, (0, 0), sigma) if sigma > 0 else photo


def jpeg(photo: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(data, cv2.IMREAD_COLOR) if ok else photo


def scale_retina(photo: np.ndarray, factor: float) -> np.ndarray:
    """The retina smaller in the frame (``factor`` < 1, black around it) or larger (edges cut)."""
    h, w = photo.shape[:2]
    scaled = cv2.resize(photo, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA)
    if factor < 1:
        out = np.zeros_like(photo)
        y, x = (h - scaled.shape[0]) // 2, (w - scaled.shape[1]) // 2
        out[y : y + scaled.shape[0], x : x + scaled.shape[1]] = scaled
        return out
    y, x = (scaled.shape[0] - h) // 2, (scaled.shape[1] - w) // 2
    return scaled[y : y + h, x : x + w]


# The protocol's shifts, in the order of its table (its output folders are numbered by it)
SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda a: a,
    "resampled to 224 px": lambda a: resample(a, 224),
    "resampled to 160 px": lambda a: resample(a, 160),
    "upsampled to 512 px": lambda a: resample(a, 512),
    "blurred (sigma 1.5)": lambda a: blur(a, 1.5),
    "JPEG quality 20": lambda a: jpeg(a, 20),
    "gamma 0.7 (brighter mid-tones)": lambda a: gamma(a, 0.7),
    "gamma 1.4 (darker mid-tones)": lambda a: gamma(a, 1.4),
    "brightness x0.7": lambda a: gain(a, (0.7, 0.7, 0.7)),
    "brightness x1.3": lambda a: gain(a, (1.3, 1.3, 1.3)),
    "warm cast (R x1.15, B x0.8)": lambda a: gain(a, (0.8, 1.0, 1.15)),
    "cool cast (R x0.85, B x1.2)": lambda a: gain(a, (1.2, 1.0, 0.85)),
    "retina smaller (75 % of the frame)": lambda a: scale_retina(a, 0.75),
    "retina larger (edges cut, 120 %)": lambda a: scale_retina(a, 1.2),
}

# Ranges of the random shifts: each family at least as strong as the protocol's shift of it, so a
# head trained on them has seen every shift the protocol makes (and a measurement on the protocol
# is not a measurement on an unseen camera)
ACQUISITION_RANGES = {
    "retina_scale": (0.7, 1.25),
    "side": (128, 640),
    "gamma": (0.6, 1.6),
    "brightness": (0.6, 1.4),
    "channel_gain": (0.75, 1.25),
    "blur_sigma": (0.3, 2.0),
    "jpeg_quality": (15, 90),
}


def acquisition_rng(seed: int, copy: int, name: str) -> np.random.Generator:
    """The random state of one photo's ``copy``-th shifted copy: the same for the same seed, copy and
    photo name wherever it is made (preprocessing, a measurement), so its view has the same bytes
    and its features are found in a feature store."""
    return np.random.default_rng([seed, copy, zlib.crc32(name.encode("utf-8"))])


def random_acquisition(photo: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """``photo`` as another camera might have taken it: each family of :data:`ACQUISITION_RANGES`
    applied with probability ``p`` at a random strength, in a camera's order (optics and framing,
    then resolution, exposure and white balance, then the encoder's compression)."""
    r = ACQUISITION_RANGES

    def draw(key: str, log: bool = False) -> float:
        low, high = r[key]
        return float(np.exp(rng.uniform(np.log(low), np.log(high)))) if log else float(rng.uniform(low, high))

    out = photo
    if rng.random() < p:
        out = scale_retina(out, draw("retina_scale"))
    if rng.random() < p:
        out = blur(out, draw("blur_sigma"))
    if rng.random() < p:
        out = resample(out, round(draw("side", log=True)))
    if rng.random() < p:
        out = gamma(out, draw("gamma", log=True))
    if rng.random() < p:
        b = draw("brightness")
        out = gain(out, (b, b, b))
    if rng.random() < p:
        out = gain(out, tuple(draw("channel_gain") for _ in range(3)))
    if rng.random() < p:
        out = jpeg(out, round(draw("jpeg_quality")))
    return out


def shifted_copies(
    patients: list[Patient], image_root: str | os.PathLike, folder: str | os.PathLike, shift: Callable
) -> list[Patient]:
    """The patients with each photo replaced by ``shift(photo, relative_name)``, written once to
    ``folder/photos`` as PNG (a copy already there is kept: a measurement that stopped goes on), and
    their split set to train; a patient's missing eye stays missing."""
    folder = Path(folder)
    copies = []
    for patient in patients:
        eyes = {}
        for eye in ("left", "right"):
            relative = getattr(patient, f"{eye}_image")
            if not relative:
                eyes[eye] = None
                continue
            target = folder / "photos" / f"{patient.patient_id}_{eye}.png"
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                source = Path(image_root) / relative
                try:  # as preprocessing reads it: upright, 8-bit BGR, a truncated JPEG refused
                    photo = decode_image(source)
                except ImageError as exc:
                    raise ImageError(f"{source}: cannot be read as an image ({exc})") from None
                cv2.imwrite(str(target), shift(photo, relative))
            eyes[eye] = f"photos/{target.name}"
        copies.append(dataclasses.replace(patient, left_image=eyes["left"], right_image=eyes["right"], split="train"))
    return copies
