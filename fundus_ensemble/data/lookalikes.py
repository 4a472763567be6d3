"""Images that share a retina's colours and framing but are no photo of one: what the gate's learned
retina check (:mod:`..models.gate`) is fitted to refuse and measured on.

Each family paints an orange-red disc on black, as a fundus camera frames a retina, and adds one
more thing a retina has, so that the colour, border and detail checks of :mod:`.quality` let
many of them through: vignetting, pixel noise (white or blurred into blobs), a bright spot where
an optic disc would be, dark lines where vessels would be, or a real photo's own colours and
spectrum with its structure scrambled. A family is a function ``(rng, colour) -> BGR uint8``;
``colour`` is a retina's mean colour (BGR), drawn by the caller from real photos.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from .imaging import find_fov

SIDE = 512


def _disc(rng: np.random.Generator, colour, vignette: float) -> tuple[np.ndarray, np.ndarray]:
    """A disc of ``colour`` (float BGR), darker towards its rim by ``vignette``; and its mask."""
    radius = rng.uniform(0.40, 0.48) * SIDE
    cy, cx = SIDE / 2 + rng.uniform(-0.03, 0.03, 2) * SIDE
    yy, xx = np.mgrid[:SIDE, :SIDE]
    distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
    inside = distance <= 1
    shade = np.clip(1 - vignette * distance**2, 0, 1) * 1.25  # centre brighter than the mean colour
    image = np.asarray(colour, np.float32)[None, None, :] * shade[..., None]
    return image * inside[..., None], inside


def _finish(image: np.ndarray, inside: np.ndarray) -> np.ndarray:
    image = image * inside[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def _noise(rng: np.random.Generator, blur: float) -> np.ndarray:
    noise = rng.normal(0, 1, (SIDE, SIDE, 1)).astype(np.float32)
    if blur > 0:
        noise = cv2.GaussianBlur(noise, (0, 0), blur)[..., None]
        noise /= noise.std() + 1e-6
    return noise


def _spot(image: np.ndarray, rng: np.random.Generator, colour) -> np.ndarray:
    """A bright blurred spot (an optic disc's place) and, across from it, a darker one (a macula's)."""
    side = rng.choice([-1, 1])
    at = (int(SIDE / 2 + side * rng.uniform(0.12, 0.22) * SIDE), int(SIDE / 2 + rng.uniform(-0.05, 0.05) * SIDE))
    spot = np.zeros_like(image)
    bright = np.minimum(np.asarray(colour, np.float32) * rng.uniform(1.6, 2.4) + 40, 255)
    cv2.circle(spot, at, int(rng.uniform(0.05, 0.09) * SIDE), bright.tolist(), -1)
    spot = cv2.GaussianBlur(spot, (0, 0), rng.uniform(3, 10))
    mask = spot.max(axis=2, keepdims=True) > 0
    out = np.where(mask, np.maximum(image, spot), image)
    if rng.random() < 0.7:
        macula = np.zeros(image.shape[:2], np.float32)
        cv2.circle(macula, (SIDE - at[0], at[1]), int(0.08 * SIDE), 1.0, -1)
        out = out * (1 - 0.35 * cv2.GaussianBlur(macula, (0, 0), 15))[..., None]
    return out, at


def _vessels(image: np.ndarray, rng: np.random.Generator, origin: tuple[int, int]) -> np.ndarray:
    """Dark winding lines out of ``origin``, thinner as they go: painted vessels."""
    lines = np.zeros(image.shape[:2], np.float32)
    for _ in range(rng.integers(4, 9)):
        x, y = float(origin[0]), float(origin[1])
        angle, width = rng.uniform(0, 2 * np.pi), rng.uniform(3, 7)
        for _ in range(rng.integers(15, 30)):
            angle += rng.normal(0, 0.25)
            nx, ny = x + 12 * np.cos(angle), y + 12 * np.sin(angle)
            cv2.line(lines, (int(x), int(y)), (int(nx), int(ny)), 1.0, max(1, int(round(width))))
            x, y, width = nx, ny, width * 0.96
    lines = cv2.GaussianBlur(lines, (0, 0), 1.0)
    return image * (1 - rng.uniform(0.25, 0.5) * np.clip(lines, 0, 1))[..., None]


def flat(rng, colour):
    image, inside = _disc(rng, colour, 0.0)
    return _finish(image / 1.25, inside)


def vignetted(rng, colour):
    return _finish(*_disc(rng, colour, rng.uniform(0.3, 0.7)))


def white_noise(rng, colour):
    image, inside = _disc(rng, colour, rng.uniform(0.3, 0.7))
    return _finish(image + rng.uniform(2, 16) * _noise(rng, 0), inside)


def blurred_noise(rng, colour):
    image, inside = _disc(rng, colour, rng.uniform(0.3, 0.7))
    return _finish(image + rng.uniform(4, 24) * _noise(rng, rng.uniform(1, 4)), inside)


def optic_spot(rng, colour):
    image, inside = _disc(rng, colour, rng.uniform(0.3, 0.7))
    image, _ = _spot(image, rng, colour)
    if rng.random() < 0.5:
        image = image + rng.uniform(2, 12) * _noise(rng, rng.uniform(0, 3))
    return _finish(image, inside)


def painted_vessels(rng, colour):
    image, inside = _disc(rng, colour, rng.uniform(0.3, 0.7))
    image, origin = _spot(image, rng, colour)
    image = _vessels(image, rng, origin)
    if rng.random() < 0.5:
        image = image + rng.uniform(2, 10) * _noise(rng, rng.uniform(0, 2))
    return _finish(image, inside)


FAMILIES: dict[str, Callable[[np.random.Generator, tuple[float, float, float]], np.ndarray]] = {
    "flat disc": flat,
    "vignetted disc": vignetted,
    "white noise": white_noise,
    "blurred noise": blurred_noise,
    "optic disc spot": optic_spot,
    "painted vessels": painted_vessels,
}


def scrambled(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A real photo's retina with its phase randomised (the same random phase in every channel): its
    colours, brightness and spectrum kept, its vessels and optic disc gone."""
    x, y, w, h = find_fov(photo)
    crop = photo[y : y + h, x : x + w]
    side = max(crop.shape[:2])
    square = np.zeros((side, side, 3), np.float32)
    square[: crop.shape[0], : crop.shape[1]] = crop
    yy, xx = np.mgrid[:side, :side]
    inside = np.sqrt((yy - side / 2) ** 2 + (xx - side / 2) ** 2) <= side / 2 * 0.97
    phase = np.exp(1j * np.angle(np.fft.fft2(rng.normal(0, 1, (side, side)))))
    out = np.empty_like(square)
    for c in range(3):
        channel = square[..., c]
        mean = channel[inside].mean()
        spectrum = np.fft.fft2(np.where(inside, channel - mean, 0))
        out[..., c] = np.real(np.fft.ifft2(np.abs(spectrum) * phase)) + mean
    return _finish(out, inside)
