"""Is this a gradable retina photo? A verdict per photo before any diagnosis.

A screening tool must not answer for a photo it cannot read: a cat, a coffee cup, a photo too
dark, washed out, blurred, blocky from compression, or with half the retina outside the frame.
Each check below is an image statistic measured on the decoded photo (the retina's crop, resized
to :data:`WORK_SIZE` px, so a check means the same at every camera resolution), in this order,
the first that fails giving the reason:

1. **retina not found / too dark**: no bright region big enough for a retina (the crop's own
   finding); too dark when even the brightest pixels are dim;
2. **over-exposed**: more than :data:`MAX_CLIPPED` of the retina's green channel at 250 or more;
3. **too dark**: the retina's mean brightness (max over channels) below :data:`MIN_BRIGHTNESS`;
4. **not a colour fundus photo**: colour saturation below :data:`MIN_SATURATION` or a red share
   below :data:`MIN_RED_SHARE` where the retina is not clipped (a fundus is an orange-red disc);
5. **retina cut off**: the retina's box at least :data:`MAX_ASPECT` times longer one way than the
   other while its corners are dark (half a disc); with bright corners it is 6;
6. **not a fundus photo**: less than :data:`MIN_DARK_CORNERS` of the box's corners (outside the
   inscribed disc) dark: a fundus photo is a disc on the camera's black;
7. **blurred**: the finest detail (the image less its blur at sigma 1) below
   :data:`MIN_SHARPNESS` times the coarser detail (sigma 1 less sigma 4);
8. **heavily compressed**: JPEG's 8 x 8 block edges :data:`MAX_BLOCKINESS` times stronger than
   the edges between them (measured at the photo's own resolution, on its own block grid).

The thresholds were set on real ODIR-5K photographs (every fifth photo of odir5k-256-dev, all of
them graded by the challenge) and degraded copies of every tenth: each lies beyond the 99.5th
percentile of the real photos' statistic and short of most degraded copies'.
``docs/measurements/gradability.py`` measures the rates on every photo (docs/reliability.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import ImageError
from .imaging import BORDER_LEVEL, find_fov

WORK_SIZE = 256
MAX_CLIPPED = 0.10  # real photos: 99.5th percentile 0.068
MIN_BRIGHTNESS = 45.0  # real: 0.5th percentile 56
MIN_SATURATION = 40.0  # real: 0.5th percentile 64 (HSV saturation, 0-255)
MIN_RED_SHARE = 0.36  # real: 0.5th percentile 0.379 (R / (R + G + B) in the retina)
MAX_ASPECT = 1.5  # real: 99.5th percentile 1.23; half a retina: about 2
MIN_DARK_CORNERS = 0.30  # real: 0.5th percentile 0.50; a retina cut in half keeps about 0.37 or more
MIN_SHARPNESS = 0.32  # real: 1st percentile 0.36; Gaussian blur sigma 1.5: 95th percentile 0.29
MAX_BLOCKINESS = 2.2  # real: 99th percentile 1.87; JPEG quality 10: 5th percentile 2.8
DIM_LEVEL = 80  # with no retina found: when the brightest pixels are below this, the photo is too dark

REASONS = (
    "retina not found",
    "over-exposed",
    "too dark",
    "not a colour fundus photo",
    "retina cut off",
    "not a fundus photo",
    "blurred",
    "heavily compressed",
)


@dataclass(frozen=True)
class Verdict:
    """Gradable or not; when not, the reason (one of :data:`REASONS`) and the measured value."""

    gradable: bool
    reason: str | None = None
    detail: str = ""
    statistics: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "gradable" if self.gradable else f"{self.reason} ({self.detail})"


def statistics(image: np.ndarray) -> dict:
    """The statistics the verdict reads, of a decoded BGR photo; raises :class:`ImageError` when no
    retina is found."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = find_fov(image)
    crop = image[y0:y1, x0:x1]
    square = cv2.resize(crop, (WORK_SIZE, WORK_SIZE), interpolation=cv2.INTER_AREA)
    bright = square.max(axis=2)
    retina = bright > BORDER_LEVEL
    yy, xx = np.mgrid[:WORK_SIZE, :WORK_SIZE]
    radius2 = (yy - WORK_SIZE / 2) ** 2 + (xx - WORK_SIZE / 2) ** 2
    inner = retina & (radius2 < (0.4 * WORK_SIZE) ** 2)
    if not inner.any():
        inner = retina
    # colour is read where the photo is not clipped: an over-exposed retina is still red where it is not white
    colour = inner & (square[..., 1] < 250)
    if colour.sum() >= 0.01 * inner.sum() and colour.any():
        b, g, r = (square[..., i][colour].astype(np.float64).mean() for i in range(3))
        saturation = float(cv2.cvtColor(square, cv2.COLOR_BGR2HSV)[..., 1][colour].mean())
    else:  # nothing but white: no colour to read
        b = g = r = 1.0
        saturation = 0.0
    gray = cv2.cvtColor(square, cv2.COLOR_BGR2GRAY).astype(np.float32)
    inside = cv2.erode(retina.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    if not inside.any():
        inside = retina
    fine = gray - cv2.GaussianBlur(gray, (0, 0), 1.0)
    coarse = cv2.GaussianBlur(gray, (0, 0), 1.0) - cv2.GaussianBlur(gray, (0, 0), 4.0)
    native = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
    steps = np.abs(np.diff(native, axis=1))
    on_grid = steps[:, 7::8].mean() if steps.shape[1] >= 8 else 0.0
    off_grid = np.delete(steps, np.s_[7::8], axis=1).mean() if steps.shape[1] >= 8 else 1.0
    return {
        "clipped": float((square[..., 1] >= 250)[retina].mean()),
        "brightness": float(bright[inner].mean()),
        "saturation": saturation,
        "red_share": float(r / (r + g + b + 1e-6)),
        "aspect": max(x1 - x0, y1 - y0) / max(1, min(x1 - x0, y1 - y0)),
        "dark_corners": float((bright[radius2 >= (0.5 * WORK_SIZE) ** 2] <= BORDER_LEVEL + 10).mean()),
        "sharpness": float(np.sqrt((fine[inside] ** 2).mean() / ((coarse[inside] ** 2).mean() + 1e-6))),
        "blockiness": float(on_grid / (off_grid + 1e-6)),
        "frame_fraction": (x1 - x0) * (y1 - y0) / (height * width),
    }


def grade(image: np.ndarray) -> Verdict:
    """The verdict on one decoded BGR photo (see the module doc for the checks and their order)."""
    try:
        s = statistics(image)
    except ImageError as exc:
        top = float(np.percentile(image.max(axis=2), 99)) if image.size else 0.0
        if top < DIM_LEVEL:
            return Verdict(False, "too dark", f"its brightest pixels reach {top:.0f} of 255")
        return Verdict(False, "retina not found", str(exc))
    not_colour = s["saturation"] < MIN_SATURATION or s["red_share"] < MIN_RED_SHARE
    checks = (
        (
            "not a fundus photo",
            s["dark_corners"] < MIN_DARK_CORNERS,
            f"{s['dark_corners']:.0%} of its corners dark; a fundus photo is a disc on black",
        ),
        ("not a colour fundus photo", not_colour, f"saturation {s['saturation']:.0f}, red share {s['red_share']:.2f}"),
        ("over-exposed", s["clipped"] > MAX_CLIPPED, f"{s['clipped']:.0%} of the retina clipped white"),
        ("too dark", s["brightness"] < MIN_BRIGHTNESS, f"mean brightness {s['brightness']:.0f} of 255"),
        (
            "retina cut off",
            s["aspect"] >= MAX_ASPECT,
            f"the retina's box is {s['aspect']:.1f} times longer one way",
        ),
        ("blurred", s["sharpness"] < MIN_SHARPNESS, f"sharpness {s['sharpness']:.2f}"),
        ("heavily compressed", s["blockiness"] > MAX_BLOCKINESS, f"JPEG blocks {s['blockiness']:.1f} times the detail"),
    )
    for reason, failed, detail in checks:
        if failed:
            return Verdict(False, reason, detail, s)
    return Verdict(True, statistics=s)
