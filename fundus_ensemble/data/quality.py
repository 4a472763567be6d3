"""Is this a gradable retina photo? A verdict per photo before any diagnosis.

A screening tool must not answer for a photo it cannot read: a cat, a coffee cup, a photo with
no retina in it, half the retina outside the frame, or blocky from compression. It must not turn
away the sick either: a cloudy lens (cataract) or another opacity of the eye's media makes a
hazy, washed-out, dark or pale photo, and a retake cannot fix that; it is itself a finding.
So each check below is one of two kinds:

- **refused** (no decision; "retake" and why): the photo is no retina photo, or its retina
  cannot be read whatever the eye has;
- **poor** (:data:`POOR`: screened, never clears the patient): the retina is found, but the photo
  is blurred, washed out, too dark or pale. The model still decides (a cataract is still decided
  C), and the referral says to retake the photo and, if a retake is no clearer, to refer, since
  a cloudy lens is a reason to refer (:mod:`..inference.referral`).

Each check is an image statistic measured on the decoded photo (the retina's crop, resized to
:data:`WORK_SIZE` px, so a check means the same at every camera resolution), in this order, the
first that fails giving the reason:

1. **retina not found / too dark** (refused): no bright region big enough for a retina (the
   crop's own finding); too dark when even the brightest pixels are dim, or the retina's mean
   brightness is below :data:`UNREADABLE_BRIGHTNESS` (nothing left to read);
2. **not a fundus photo** (refused): less than :data:`MIN_DARK_CORNERS` of the box's corners
   (outside the inscribed disc) dark or camera white: a fundus photo is a disc on the camera's
   black (or, for some cameras, white) surround; **several photos in one** (refused): more than
   one lit region in the photo at least :data:`MIN_RETINA_SHARE` of the largest one's size and
   :data:`MIN_RETINA_AREA` of the photo, apart from each other (a montage of fundus photos: which one would the answer be about?),
   or a 2 x 2 grid of retinas that touch (one lit region): the box's centre and the middles of its
   four sides all dark (:func:`_grid_points`), where four discs' dark corners meet and one retina
   is lit;
3. **not a colour fundus photo** (refused): gray (saturation below :data:`GRAY_SATURATION`) or
   hardly red (red share below :data:`GRAY_RED_SHARE`): a red-free or gray photo, or no retina;
4. **retina cut off** (refused): the retina's box at least :data:`MAX_ASPECT` times longer one
   way than the other, its short side at the photo's edge (half a disc: the rest is outside);
5. **heavily compressed** (refused): JPEG's 8 x 8 block edges :data:`MAX_BLOCKINESS` times
   stronger than the edges between them and :data:`MIN_BLOCK_STEP` gray levels stronger (on the
   photo's own grid): blocks a reader sees, not those of a 2,000 px photo saved at quality 85;
6. **over-exposed** (poor): more than :data:`MAX_CLIPPED` of the retina's green channel at 250 or more;
7. **too dark** (poor): the retina's mean brightness (max over channels) below :data:`MIN_BRIGHTNESS`;
   **partly dark** (poor): the lit part's box :data:`MAX_ASPECT` times longer one way, inside the photo;
8. **pale or discoloured** (poor): colour saturation below :data:`MIN_SATURATION` or a red share
   below :data:`MIN_RED_SHARE` where the retina is not clipped (a fundus is an orange-red disc);
9. **blurred or hazy** (poor): the finest detail (the image less its blur at sigma 1) below
   :data:`MIN_SHARPNESS` times the coarser detail (sigma 1 less sigma 4), or that coarser detail
   below :data:`MIN_DETAIL` gray levels (a smooth painted disc: no retina has so little);
10. **grainy** (poor): the finest detail over :data:`MAX_SHARPNESS` times the coarser: pixel
   noise with no retina's structure under it (a smooth disc with noise added; the haziest
   cataracts reach 1.99).

A retina's vessels are not asked for: half of the cataract photos of odir5k-256-dev show
hardly any (the haze hides them), so a vessel check would turn away exactly the eyes a
screening must see. A smooth disc is screened as poor instead (never cleared; "retake, and if
no clearer, refer"), and a disc with a painted bright spot still passes (docs/reliability.md).

The thresholds were set on real ODIR-5K photographs (every fifth photo of odir5k-256-dev, all of
them graded by the challenge) and degraded copies of every tenth: each lies beyond the 99.5th
percentile of the real photos' statistic and short of most degraded copies'.
``docs/measurements/gradability.py`` measures the rates on every photo and
``docs/measurements/gate_by_class.py`` per class (docs/reliability.md).
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
GRAY_SATURATION = 12.0  # below: a gray photo (a hazy cataract's is paler, not gray: 25 and up on ODIR)
GRAY_RED_SHARE = 0.25  # below: a red-free (green) photo, not a colour fundus (a dark cataract's: 0.29 on ODIR)
MAX_ASPECT = 1.5  # real: 99.5th percentile 1.23; half a retina: about 2
MIN_DARK_CORNERS = 0.30  # real: 0.5th percentile 0.50; a retina cut in half keeps about 0.37 or more
MAX_WHITE_DISC = 0.5  # a white surround counts as a camera's only around a disc mostly not white
CAMERA_WHITE = 235  # a corner pixel this bright in every channel is a camera's white surround, not retina
MIN_SHARPNESS = 0.32  # real: 1st percentile 0.36; Gaussian blur sigma 1.5: 95th percentile 0.29
# fine detail this many times the coarser is pixel noise, not a retina's structure: real photos reach 1.99 (a hazy
# cataract, whose coarse detail the haze hides), pixel noise on a smooth painted disc 2.55
MAX_SHARPNESS = 2.3
# gray levels of detail between sigma 1 and 4 at WORK_SIZE: every real photo has some (lowest of 4,885: 0.44, a
# dense cataract); a smooth painted disc has almost none (0.19 flat, 0.23 vignetted), which a ratio alone misses
MIN_DETAIL = 0.3
MIN_RETINA_SHARE = 0.25  # of the largest lit region: a region this big lit apart from it is another retina
MIN_RETINA_AREA = 0.05  # of the photo: smaller lit parts are the bright spots of a dark photo, not retinas
MAX_BLOCKINESS = 2.2  # real: 99th percentile 1.87; JPEG quality 10: 5th percentile 2.8
MIN_BLOCK_STEP = 1.5  # gray levels: real 256 px photos reach 1.3; quality 10 at 256 px 2.8 and more
# the retina's box at WORK_SIZE: its centre and the middles of its sides, this far in, are where a 2 x 2 montage's
# four discs meet (their dark corners) and one retina is lit; a point is dark at the frame's level
GRID_INSET = 10
FRAME_DARK = BORDER_LEVEL + 10  # at or below: dark as a camera's surround (the corners of _frame, the grid points)
GRID_PATCH = 4  # px either side of each point
DIM_LEVEL = 80  # with no retina found: when the brightest pixels are below this, the photo is too dark
UNREADABLE_BRIGHTNESS = 20.0  # a retina darker than this is refused, not screened (real: darkest 25)

REASONS = (
    "retina not found",
    "over-exposed",
    "too dark",
    "not a colour fundus photo",
    "retina cut off",
    "not a fundus photo",
    "blurred",
    "heavily compressed",
    "pale or discoloured",
    "partly dark",
    "several photos in one",
    "grainy",
)
# the retina is found but hard to read: a cloudy lens does this too, so the photo is screened and never clears
POOR = ("over-exposed", "too dark", "partly dark", "pale or discoloured", "blurred", "grainy")
POOR_ADVICE = (
    "retake it; if a retake is no clearer, refer: a cloudy lens (cataract) or another opacity of the eye "
    "can cause this, and is itself a reason to refer"
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

    @property
    def usable(self) -> bool:
        """Screened by the model: gradable, or :data:`POOR` (the retina found, hard to read, not
        darker than :data:`UNREADABLE_BRIGHTNESS`)."""
        if self.gradable:
            return True
        readable = bool(self.statistics) and self.statistics.get("brightness", 0.0) >= UNREADABLE_BRIGHTNESS
        return self.reason in POOR and readable


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
        # the box's short side at the frame's edge: the retina runs out of the photo (else it is only partly lit)
        "at_edge": float((x0 <= 1 or x1 >= width - 1) if (x1 - x0) < (y1 - y0) else (y0 <= 1 or y1 >= height - 1)),
        "dark_corners": float(_frame(square)[radius2 >= (0.5 * WORK_SIZE) ** 2].mean()),
        "sharpness": float(np.sqrt((fine[inside] ** 2).mean() / ((coarse[inside] ** 2).mean() + 1e-6))),
        "blockiness": float(on_grid / (off_grid + 1e-6)),
        "block_step": float(on_grid - off_grid),
        "frame_fraction": (x1 - x0) * (y1 - y0) / (height * width),
        "detail": float(np.sqrt((coarse[inside] ** 2).mean())),
        "retinas": _lit_regions(image),
        "grid_points_dark": _grid_points(bright),
    }


def _grid_points(bright: np.ndarray) -> int:
    """How many of the five points where a 2 x 2 montage's retinas meet are dark (each a small patch's
    mean brightness at the frame's level): the centre of the retina's box and the middles of its sides.
    Measured on odir5k-256-dev (docs/measurements/gate_structure.py): none of its photos at least
    :data:`MIN_BRIGHTNESS` bright has all five dark; of 300 touching montages of four of its photos,
    134 were gradable without this check and none is with it."""
    side, h, c, e = bright.shape[0], bright.shape[0] // 2, GRID_PATCH, GRID_INSET
    points = ((h, h), (e, h), (side - e, h), (h, e), (h, side - e))
    return int(sum(bright[y - c : y + c, x - c : x + c].mean() <= FRAME_DARK for y, x in points))


def _lit_regions(image: np.ndarray) -> int:
    """Separate lit regions of the whole photo at least MIN_RETINA_SHARE of the largest one's size and
    MIN_RETINA_AREA of the photo: one for a fundus photo (a camera's printed text, a light leak or
    the few lit spots of a dark photo are far smaller)."""
    scale = WORK_SIZE / max(image.shape[:2])
    small = cv2.resize(image, None, fx=min(1.0, scale), fy=min(1.0, scale), interpolation=cv2.INTER_AREA)
    lit = (small.max(axis=2) > BORDER_LEVEL).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(lit, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    big = np.maximum(MIN_RETINA_SHARE * areas.max(), MIN_RETINA_AREA * lit.size) if len(areas) else 0
    return int((areas >= big).sum())


def _frame(square: np.ndarray) -> np.ndarray:
    """Pixels of the camera's surround: black, or flat white around a disc that is neither white itself
    nor other than orange-red (some cameras frame the retina in white; a page, a logo or a colour wheel
    on white is no such camera)."""
    dark = square.max(axis=2) <= FRAME_DARK
    white = square.min(axis=2) >= CAMERA_WHITE
    side = square.shape[0]
    yy, xx = np.mgrid[:side, : square.shape[1]]
    disc = (yy - side / 2) ** 2 + (xx - square.shape[1] / 2) ** 2 < (0.4 * side) ** 2
    inner = square[disc & ~white].astype(np.float64)
    if white[disc].mean() >= MAX_WHITE_DISC or not len(inner):
        return dark
    b, g, r = inner.mean(axis=0)
    return dark | white if r / (r + g + b + 1e-6) >= MIN_RED_SHARE else dark  # an orange-red disc inside, as a retina


def grade(image: np.ndarray) -> Verdict:
    """The verdict on one decoded BGR photo (see the module doc for the checks and their order)."""
    try:
        s = statistics(image)
    except ImageError as exc:
        top = float(np.percentile(image.max(axis=2), 99)) if image.size else 0.0
        if top < DIM_LEVEL:
            return Verdict(False, "too dark", f"its brightest pixels reach {top:.0f} of 255")
        return Verdict(False, "retina not found", str(exc))
    colour = f"saturation {s['saturation']:.0f}, red share {s['red_share']:.2f}"
    checks = (
        (
            "not a fundus photo",
            s["dark_corners"] < MIN_DARK_CORNERS,
            f"{s['dark_corners']:.0%} of its corners dark; a fundus photo is a disc on black",
        ),
        (
            "several photos in one",
            s["retinas"] > 1 and s["brightness"] >= MIN_BRIGHTNESS,  # a dark retina's lit spots are not photos
            f"{s['retinas']} retinas apart from each other; give each photo on its own",
        ),
        (
            "several photos in one",
            s["grid_points_dark"] == 5 and s["brightness"] >= MIN_BRIGHTNESS,  # a dark retina's centre may be black
            "4 retinas in a 2 x 2 grid, touching; give each photo on its own",
        ),
        ("not a colour fundus photo", s["saturation"] < GRAY_SATURATION or s["red_share"] < GRAY_RED_SHARE, colour),
        (
            "retina cut off",
            s["aspect"] >= MAX_ASPECT and s["at_edge"] > 0,
            f"the retina's box is {s['aspect']:.1f} times longer one way, at the photo's edge",
        ),
        (
            "heavily compressed",
            s["blockiness"] > MAX_BLOCKINESS and s["block_step"] > MIN_BLOCK_STEP,
            f"JPEG blocks {s['blockiness']:.1f} times the detail",
        ),
        ("too dark", s["brightness"] < UNREADABLE_BRIGHTNESS, f"mean brightness {s['brightness']:.0f} of 255"),
        ("over-exposed", s["clipped"] > MAX_CLIPPED, f"{s['clipped']:.0%} of the retina clipped white"),
        ("too dark", s["brightness"] < MIN_BRIGHTNESS, f"mean brightness {s['brightness']:.0f} of 255"),
        (
            "partly dark",
            s["aspect"] >= MAX_ASPECT,
            f"only part of the retina is lit: its lit box is {s['aspect']:.1f} times longer one way",
        ),
        ("pale or discoloured", s["saturation"] < MIN_SATURATION or s["red_share"] < MIN_RED_SHARE, colour),
        (
            "blurred",
            s["sharpness"] < MIN_SHARPNESS or s["detail"] < MIN_DETAIL,
            f"sharpness {s['sharpness']:.2f}, detail {s['detail']:.2f}",
        ),
        (
            "grainy",
            s["sharpness"] > MAX_SHARPNESS,
            f"its finest detail {s['sharpness']:.2f} times the coarser: pixel noise, not a retina's structure",
        ),
    )
    for reason, failed, detail in checks:
        if failed:
            return Verdict(False, reason, detail, s)
    return Verdict(True, statistics=s)
