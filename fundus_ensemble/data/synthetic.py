"""Procedural fundus-like photographs with label-dependent findings.

Not medicine: a test bed with the geometry of real photographs (black camera surround,
clipped field of view, orange fundus with vignetting, optic disc and cup on the nasal side,
vessel arcades, macula) and one visible finding per ODIR class, strong enough for a small
network to learn in minutes:

=====  =====================================================================
D      microaneurysms, blot haemorrhages and yellow hard exudates
G      enlarged optic cup (cup-to-disc ratio 0.7-0.85 instead of 0.3-0.45)
C      lens haze: blur, washed-out contrast, grey-white veil
A      yellow drusen clustered around the macula
H      narrow, tortuous vessels
M      tessellated (striped) fundus and a pale peripapillary crescent
O      other lesions: pigmented laser scars or a white nerve-fibre patch
=====  =====================================================================

A patient positive for a class shows the finding in one eye, and in the other with
probability ``BILATERAL``, as ODIR's patient-level labels do. N means no other class.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..fileio import atomic_write_bytes
from ..labels import LABELS
from .manifest import Patient, write_manifest
from .splits import stratified_split

DISEASES: tuple[str, ...] = LABELS[1:]
# Prevalences for the demo: ODIR's order of frequency, rare classes raised so a small demo has some.
DEMO_PREVALENCE: dict[str, float] = {"D": 0.30, "G": 0.14, "C": 0.14, "A": 0.14, "H": 0.12, "M": 0.14, "O": 0.18}
BILATERAL = 0.6


@dataclass(frozen=True)
class EyeSpec:
    """Everything that decides one synthetic photograph."""

    findings: frozenset[str]
    eye: str  # "left" or "right": the optic disc sits on the nasal side
    seed: int


def sample_patient_labels(rng: np.random.Generator, prevalence: dict[str, float] = DEMO_PREVALENCE) -> tuple[int, ...]:
    """Eight 0/1 labels in :data:`LABELS` order; N is set exactly when no disease is."""
    diseases = {d for d in DISEASES if rng.random() < prevalence.get(d, 0.0)}
    return tuple(int(label in diseases) if label != "N" else int(not diseases) for label in LABELS)


def eye_findings(rng: np.random.Generator, labels: tuple[int, ...]) -> dict[str, frozenset[str]]:
    """Split a patient's diseases over the two eyes (one eye always, the other maybe)."""
    left: set[str] = set()
    right: set[str] = set()
    for name, value in zip(LABELS, labels):
        if name == "N" or not value:
            continue
        first, second = (left, right) if rng.random() < 0.5 else (right, left)
        first.add(name)
        if rng.random() < BILATERAL:
            second.add(name)
    return {"left": frozenset(left), "right": frozenset(right)}


def render_eye(spec: EyeSpec, diameter: int = 256) -> np.ndarray:
    """Render one photograph (uint8 BGR) with a black camera surround around the retina."""
    return render_eye_with_regions(spec, diameter)[0]


def render_eye_with_regions(spec: EyeSpec, diameter: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`render_eye`, and where the localised findings are (or would be) drawn.

    The regions (boolean masks in photo coordinates) are ``A``: the macular area the drusen
    fall in, spots' radius included; ``G``: the optic disc. They let a test check that an
    explanation points where the generator planted a finding.
    """
    rng = np.random.default_rng(spec.seed)
    f = spec.findings
    d = diameter
    r = d / 2.0
    width = int(d * rng.uniform(1.15, 1.45))
    height = int(d * rng.uniform(0.88, 1.04))  # < 1: the camera clips the top and bottom
    cx = width / 2 + rng.uniform(-0.04, 0.04) * d
    cy = height / 2 + rng.uniform(-0.03, 0.03) * d
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rho = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
    inside = rho <= 1.0

    # Fundus background: orange-red, darker towards the rim, with gentle large-scale mottling.
    base = np.array([rng.uniform(25, 55), rng.uniform(70, 110), rng.uniform(170, 230)], np.float32)
    mottling = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), d / 10)
    mottling /= max(float(np.abs(mottling).max()), 1e-6)
    shade = (1.0 - 0.45 * rho**2 + 0.06 * mottling)[..., None]
    img = base[None, None, :] * shade

    side = 1.0 if spec.eye == "right" else -1.0  # disc nasal: right of the image for a right eye
    disc = np.array([cx + side * 0.33 * r, cy + rng.uniform(-0.05, 0.05) * r])
    macula = np.array([cx - side * 0.12 * r, cy + rng.uniform(-0.04, 0.04) * r])
    disc_r = rng.uniform(0.10, 0.13) * r

    if "M" in f:
        _tessellate(img, rng, xx, yy, d)
        crescent = np.sqrt((xx - disc[0] + side * disc_r * 0.5) ** 2 + (yy - disc[1]) ** 2) < disc_r * 1.9
        img[crescent] = img[crescent] * 0.35 + np.array([170, 200, 225], np.float32) * 0.65

    # Macula and fovea: a darker, browner area.
    mac = np.exp(-(((xx - macula[0]) ** 2 + (yy - macula[1]) ** 2) / (2 * (0.14 * r) ** 2)))
    img *= (1.0 - 0.35 * mac)[..., None]

    _vessels(img, rng, disc, r, narrow="H" in f)

    # Optic disc and cup.
    disc_mask = np.sqrt((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2) / disc_r
    img[disc_mask <= 1] = img[disc_mask <= 1] * 0.2 + np.array([120, 200, 245], np.float32) * 0.8
    cdr = rng.uniform(0.70, 0.85) if "G" in f else rng.uniform(0.30, 0.45)
    cup = disc_mask <= cdr
    img[cup] = img[cup] * 0.15 + np.array([215, 240, 255], np.float32) * 0.85

    if "D" in f:
        _diabetic(img, rng, cx, cy, r, disc, disc_r)
    spot_sizes = (1.5, 3.5) if d < 300 else (2, 5)
    if "A" in f:
        _spots(img, rng, macula, 0.30 * r, int(rng.integers(18, 36)), spot_sizes, (90, 215, 235))
    if "O" in f:
        _other(img, rng, cx, cy, r, disc, disc_r, side)

    img = np.clip(img, 0, 255)
    if "C" in f:
        sigma = rng.uniform(0.012, 0.022) * d
        img = cv2.GaussianBlur(img, (0, 0), sigma)
        veil = rng.uniform(0.30, 0.45)
        img = img * (1 - veil) + np.array([200, 200, 205], np.float32) * veil * (0.6 + 0.4 * (1 - rho[..., None]))

    img *= rng.uniform(0.85, 1.1)  # exposure
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)
    img[~inside] = rng.uniform(0, 6)
    regions = {
        "A": np.sqrt((xx - macula[0]) ** 2 + (yy - macula[1]) ** 2) <= 0.30 * r + spot_sizes[1] + 1,
        "G": disc_mask <= 1,
    }
    return np.clip(img, 0, 255).astype(np.uint8), regions


def _tessellate(img: np.ndarray, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, d: int) -> None:
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(18, 26) / d
    warp = cv2.GaussianBlur(rng.normal(0, 1, xx.shape).astype(np.float32), (0, 0), d / 25) * 40
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle) + warp))
    img *= (1.0 - 0.22 * (stripes > 0.2))[..., None]


def _vessels(img: np.ndarray, rng: np.random.Generator, disc: np.ndarray, r: float, narrow: bool) -> None:
    colour = (30.0, 35.0, 110.0)
    scale = r / 128.0
    width = (1.6 if narrow else 3.6) * scale
    wiggle = 0.55 if narrow else 0.12
    for base_angle in (-2.3, -0.8, 0.8, 2.3, -1.6, 1.6):
        angle = base_angle + rng.uniform(-0.2, 0.2)
        _branch(img, rng, disc.copy(), angle, 0.95 * r, width, wiggle, colour, depth=0)


def _branch(img, rng, start, angle, length, width, wiggle, colour, depth) -> None:
    steps = 14
    step = length / steps
    point = start
    pts = [point.copy()]
    for i in range(steps):
        angle += rng.normal(0, wiggle) + 0.03 * np.sign(angle)
        point = point + step * np.array([np.cos(angle), np.sin(angle)])
        pts.append(point.copy())
        if depth < 2 and i in (5, 9) and rng.random() < 0.7:
            _branch(
                img,
                rng,
                point.copy(),
                angle + rng.choice([-0.7, 0.7]),
                length * 0.45,
                width * 0.7,
                wiggle,
                colour,
                depth + 1,
            )
    thickness = max(1, int(round(width)))
    cv2.polylines(img, [np.round(np.array(pts)).astype(np.int32)], False, colour, thickness, cv2.LINE_AA)


def _random_points(rng, cx, cy, r, n, avoid=None, avoid_r=0.0, spread=0.85):
    out = []
    while len(out) < n:
        a, rad = rng.uniform(0, 2 * np.pi), spread * r * np.sqrt(rng.uniform(0, 1))
        p = np.array([cx + rad * np.cos(a), cy + rad * np.sin(a)])
        if avoid is None or np.linalg.norm(p - avoid) > avoid_r:
            out.append(p)
    return out


def _spots(img, rng, centre, radius, n, size_range, colour) -> None:
    for p in _random_points(rng, centre[0], centre[1], radius, n, spread=1.0):
        cv2.circle(img, (int(p[0]), int(p[1])), int(round(rng.uniform(*size_range))), colour, -1, cv2.LINE_AA)


def _diabetic(img, rng, cx, cy, r, disc, disc_r) -> None:
    s = r / 128.0
    for p in _random_points(rng, cx, cy, r, int(rng.integers(14, 28)), disc, 2 * disc_r, 0.7):
        cv2.circle(
            img, (int(p[0]), int(p[1])), max(1, int(round(rng.uniform(1.0, 2.0) * s))), (20, 20, 90), -1, cv2.LINE_AA
        )
    for p in _random_points(rng, cx, cy, r, int(rng.integers(3, 7)), disc, 2 * disc_r, 0.7):
        cv2.circle(img, (int(p[0]), int(p[1])), int(round(rng.uniform(3.5, 6.0) * s)), (15, 15, 70), -1, cv2.LINE_AA)
    for p in _random_points(rng, cx, cy, r, int(rng.integers(8, 18)), disc, 2 * disc_r, 0.6):
        cv2.circle(
            img, (int(p[0]), int(p[1])), max(1, int(round(rng.uniform(1.5, 3.0) * s))), (60, 225, 245), -1, cv2.LINE_AA
        )


def _other(img, rng, cx, cy, r, disc, disc_r, side) -> None:
    s = r / 128.0
    if rng.random() < 0.5:  # laser photocoagulation scars: dark pigment in pale rings
        for p in _random_points(rng, cx, cy, r, int(rng.integers(10, 20)), disc, 2.5 * disc_r, 0.85):
            centre = (int(p[0]), int(p[1]))
            cv2.circle(img, centre, int(round(5 * s)), (140, 170, 200), -1, cv2.LINE_AA)
            cv2.circle(img, centre, int(round(2.5 * s)), (15, 20, 35), -1, cv2.LINE_AA)
    else:  # myelinated nerve fibres: a white feathery patch hugging the disc
        centre = (int(disc[0] - side * 1.6 * disc_r), int(disc[1] + rng.uniform(-1, 1) * disc_r))
        axes = (int(2.2 * disc_r), int(1.3 * disc_r))
        patch = np.zeros(img.shape[:2], np.float32)
        cv2.ellipse(patch, centre, axes, rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
        patch = cv2.GaussianBlur(patch, (0, 0), 3 * s)[..., None]
        img[:] = img * (1 - 0.75 * patch) + np.array([235, 240, 245], np.float32) * 0.75 * patch


# one ODIR keyword per planted finding (data.keywords maps them back to the classes)
FINDING_KEYWORDS: dict[str, str] = {
    "D": "moderate non proliferative retinopathy",
    "G": "glaucoma",
    "C": "cataract",
    "A": "dry age-related macular degeneration",
    "H": "hypertensive retinopathy",
    "M": "pathological myopia",
    "O": "myelinated nerve fibers",
}


def eye_keywords(findings: frozenset[str]) -> str:
    """The eye's diagnostic keywords in ODIR's wording, ``normal fundus`` for none."""
    return ",".join(FINDING_KEYWORDS[f] for f in LABELS if f in findings) or "normal fundus"


def make_patients(
    n: int, seed: int, prevalence: dict[str, float] = DEMO_PREVALENCE
) -> list[tuple[str, tuple[int, ...], dict[str, EyeSpec]]]:
    """``n`` patients as (id, labels, {eye: spec}); the same seed gives the same patients."""
    rng = np.random.default_rng(seed)
    patients = []
    for i in range(n):
        labels = sample_patient_labels(rng, prevalence)
        findings = eye_findings(rng, labels)
        specs = {eye: EyeSpec(findings[eye], eye, int(rng.integers(0, 2**31))) for eye in ("left", "right")}
        patients.append((f"syn{i:04d}", labels, specs))
    return patients


def write_synthetic_dataset(
    root: str | os.PathLike,
    n_patients: int,
    seed: int = 0,
    diameter: int = 256,
    image_dir: str = "images",
    manifest_name: str = "manifest.csv",
    fractions: dict[str, float] | None = None,
    jpeg_quality: int = 90,
    prevalence: dict[str, float] = DEMO_PREVALENCE,
) -> Path:
    """Write ``n_patients`` synthetic patients (JPEG photos + manifest) under ``root``.

    Photo sizes vary (each retina ``diameter`` times 0.8-1.25) like images from different
    cameras. ``prevalence`` gives each disease's chance per patient. Returns the manifest
    path; image paths in it are relative to ``root``.
    """
    root = Path(root)
    fractions = fractions or {"train": 0.6, "val": 0.2, "test": 0.2}
    records = make_patients(n_patients, seed, prevalence)
    splits = stratified_split(np.array([lab for _, lab, _ in records]), fractions, seed)
    size_rng = np.random.default_rng(seed + 1)
    patients = []
    for (pid, labels, specs), split in zip(records, splits):
        paths = {}
        for eye, spec in specs.items():
            image = render_eye(spec, int(diameter * size_rng.uniform(0.8, 1.25)))
            relative = f"{image_dir}/{pid}_{eye}.jpg"
            ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
            atomic_write_bytes(root / relative, data.tobytes())
            paths[eye] = relative
        keywords = {f"{eye}_keywords": eye_keywords(spec.findings) for eye, spec in specs.items()}
        patients.append(Patient(pid, paths["left"], paths["right"], labels, str(split), keywords))
    manifest_path = root / manifest_name
    write_manifest(patients, manifest_path)
    return manifest_path
