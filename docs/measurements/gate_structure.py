"""Does the gate ask for a retina's structure? On images that share a retina's colours
(a painted orange disc on black: flat, vignetted, with pixel noise, with a painted bright spot;
montages of real photos: 2 x 2 in a square with their retinas touching or with black between
them, and 1 x 2 side by side) the gate's verdict
(data.quality.grade) and the ImageNet check's fundus mass (models.gate); on every photo of a label
table, per class of its own keywords, the statistics the structure checks read (``detail``:
sigma 1 - 4 detail in gray levels; ``retinas``: separate lit regions) and the vessel fraction a
vessel check would read (thin structures darker than around them, relative to the local
brightness), to show why vessels are not asked for, and the solidity a shape check would read
(the largest lit region's area over its convex hull's: a disc fills it, touching retinas do not),
to show why that is not asked for either; and an optic disc check's reading (:func:`disc_peaks`:
how far the brightest disc-sized blob stands above its surroundings, and how many such blobs
there are): a painted disc has none, four touching retinas have four; and the montage check's
reading (``grid_points_dark``: how many of the five points where a 2 x 2 grid's discs meet are
dark), on every photo and on ``--montages`` touching 2 x 2 montages of four random photos; and
the highest sharpness (finest detail over the coarser) per class, which the grainy check bounds.

    PYTHONPATH=. python docs/measurements/gate_structure.py $DATA/labels.csv --image-root $DATA
"""

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np

from fundus_ensemble.data.imaging import BORDER_LEVEL, crop_to_fov, find_fov
from fundus_ensemble.data.keywords import eye_labels
from fundus_ensemble.data.quality import MIN_BRIGHTNESS, MIN_DETAIL, WORK_SIZE, grade, statistics
from fundus_ensemble.labels import LABELS
from fundus_ensemble.models.gate import INPUT_SIZE, MIN_FUNDUS_MASS, FundusLikeness


def painted_discs(side: int = 512) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:side, :side]
    distance = np.sqrt((yy - side / 2) ** 2 + (xx - side / 2) ** 2) / (0.45 * side)
    flat = np.zeros((side, side, 3), np.float32)
    flat[:] = (30, 90, 200)  # BGR orange-red
    flat[distance > 1] = 0
    vignetted = flat * np.clip(1 - 0.5 * distance**2, 0, 1)[..., None]
    noisy = vignetted + np.random.default_rng(0).normal(0, 4, vignetted.shape)
    noisy[distance > 1] = 0
    spot = vignetted.copy()
    cv2.circle(spot, (int(side * 0.65), side // 2), side // 14, (120, 200, 250), -1)
    spot = cv2.GaussianBlur(spot, (0, 0), 6)
    return {
        name: np.clip(a, 0, 255).astype(np.uint8)
        for name, a in (("flat disc", flat), ("vignetted disc", vignetted), ("noisy disc", noisy), ("spot disc", spot))
    }


def vessel_fraction(image: np.ndarray, size: int = 256) -> float:
    x0, y0, x1, y1 = find_fov(image)
    square = cv2.resize(image[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
    retina = square.max(axis=2) > BORDER_LEVEL
    yy, xx = np.mgrid[:size, :size]
    inside = cv2.erode(retina.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    inside &= (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    green = cv2.GaussianBlur(square[..., 1].astype(np.float32), (0, 0), 1.0)
    closed = cv2.morphologyEx(green, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    relative = (closed - green) / (cv2.GaussianBlur(green, (0, 0), 8) + 10)
    return float((relative[inside] > 0.03).mean()) if inside.any() else 0.0


def disc_peaks(image: np.ndarray, size: int = 256) -> tuple[float, int]:
    """The optic disc as a bright blob of its size: a difference of Gaussians (sigma 3 % and 9 % of
    the retina's width) of the red-free (green) light over the local brightness, inside the retina.
    Returns the highest value and the number of local maxima reaching half of it (and 0.05)."""
    x0, y0, x1, y1 = find_fov(image)
    side = max(x1 - x0, y1 - y0)
    square = np.zeros((side, side, 3), np.uint8)
    square[: y1 - y0, : x1 - x0] = image[y0:y1, x0:x1]
    square = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    lit = (square.max(axis=2) > BORDER_LEVEL).astype(np.float32)
    green = square[..., 1].astype(np.float32) * lit

    def blur(sigma: float) -> np.ndarray:  # the retina's own mean around each pixel: the black outside left out
        return cv2.GaussianBlur(green, (0, 0), sigma) / np.maximum(cv2.GaussianBlur(lit, (0, 0), sigma), 1e-3)

    near, far = blur(0.03 * size), blur(0.09 * size)
    retina = cv2.erode(lit.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    blob = np.where(retina, (near - far) / (far + 10), -1.0)
    top = float(blob.max())
    peaks = (blob == cv2.dilate(blob, np.ones((15, 15), np.uint8))) & (blob >= max(0.5 * top, 0.05))
    return top, int(peaks.sum())


def solidity(image: np.ndarray) -> float:
    scale = WORK_SIZE / max(image.shape[:2])
    small = cv2.resize(image, None, fx=min(1.0, scale), fy=min(1.0, scale), interpolation=cv2.INTER_AREA)
    count, labels, stats, _ = cv2.connectedComponentsWithStats((small.max(axis=2) > BORDER_LEVEL).astype(np.uint8))
    if count < 2:
        return float("nan")
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    contours, _ = cv2.findContours((labels == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return float(stats[k, cv2.CC_STAT_AREA] / max(1.0, cv2.contourArea(cv2.convexHull(np.vstack(contours)))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("labels", type=Path)
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--montages", type=int, default=300, help="touching 2 x 2 montages of random photos to grade")
    p.add_argument(
        "--without-grid-check", action="store_true", help="grade as before the montage check (no grid point is dark)"
    )
    args = p.parse_args()
    if args.without_grid_check:
        import fundus_ensemble.data.quality as quality

        quality._grid_points = lambda bright: 0
    rows = list(csv.DictReader(open(args.labels, newline="")))
    images = painted_discs()
    photos = [cv2.imread(str(args.image_root / "images" / r["filename"])) for r in rows[:4]]
    images["montage 2 x 2, retinas touching"] = np.vstack([np.hstack(photos[:2]), np.hstack(photos[2:])])
    gaps = np.zeros((2 * 256 + 24, 2 * 256 + 24, 3), np.uint8)
    for k, photo in enumerate(photos):
        y, x = 8 + (k // 2) * 264, 8 + (k % 2) * 264
        gaps[y : y + 256, x : x + 256] = cv2.resize(photo, (256, 256), interpolation=cv2.INTER_AREA)
    images["montage 2 x 2, black between"] = gaps
    images["montage 1 x 2"] = np.hstack(photos[:2])
    mass = FundusLikeness().mass([crop_to_fov(a, INPUT_SIZE) for a in images.values()])
    print(
        f"| image | verdict | screened | fundus mass (ImageNet check, min {MIN_FUNDUS_MASS}) | solidity "
        "| disc blob | disc blobs | grid points dark |\n|---|---|---|---|---|---|---|---|"
    )
    for (name, image), m in zip(images.items(), mass):
        verdict = grade(image)
        top, count = disc_peaks(image)
        print(
            f"| {name} | {verdict.text} | {'yes' if verdict.usable else 'no'} | {m:.2f} | {solidity(image):.2f} "
            f"| {top:.3f} | {count} | {verdict.statistics.get('grid_points_dark', '')} |"
        )
    rng = np.random.default_rng(0)
    reasons: dict[str, int] = {}
    for _ in range(args.montages):
        four = [cv2.imread(str(args.image_root / "images" / rows[i]["filename"])) for i in rng.choice(len(rows), 4)]
        verdict = grade(np.vstack([np.hstack(four[:2]), np.hstack(four[2:])]))
        kind = "gradable" if verdict.gradable else f"{verdict.reason} ({'screened' if verdict.usable else 'refused'})"
        reasons[kind] = reasons.get(kind, 0) + 1
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(reasons.items(), key=lambda item: -item[1]))
    print(f"\n{args.montages} touching 2 x 2 montages of four random photos: {counts}")
    values: dict[str, list] = {c: [] for c in LABELS}
    several = grid = grid_bright = 0
    for r in rows:
        image = cv2.imread(str(args.image_root / "images" / r["filename"]))
        try:
            s = statistics(image)
        except Exception:  # no retina found: the gate's first check, not a structure one
            continue
        verdict = grade(image)
        several += verdict.reason == "several photos in one"
        grid += s["grid_points_dark"] == 5
        grid_bright += s["grid_points_dark"] == 5 and s["brightness"] >= MIN_BRIGHTNESS
        labels = eye_labels(r["eye_keywords"])
        for j, c in enumerate(LABELS):
            if labels is not None and labels[j]:
                values[c].append(
                    (s["detail"], vessel_fraction(image), solidity(image), *disc_peaks(image), s["sharpness"])
                )
    print(
        f"\n{len(rows)} photos: {several} refused as several photos in one; {grid} with all five grid points dark, "
        f"{grid_bright} of them at least {MIN_BRIGHTNESS:.0f} bright\n"
    )
    print(
        f"| class | photos | detail: lowest | under {MIN_DETAIL} | vessel fraction: median | 1st percentile "
        "| solidity: lowest | 1st percentile | disc blob: lowest | 1st percentile | median "
        "| more than one disc blob | more than three | sharpness: highest |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in LABELS:
        v = np.array(values[c])
        print(
            f"| {c} | {len(v)} | {v[:, 0].min():.2f} | {(v[:, 0] < MIN_DETAIL).sum()} | {np.median(v[:, 1]):.4f} | "
            f"{np.percentile(v[:, 1], 1):.4f} | {np.nanmin(v[:, 2]):.2f} | {np.nanpercentile(v[:, 2], 1):.2f} | "
            f"{v[:, 3].min():.3f} | {np.percentile(v[:, 3], 1):.3f} | {np.median(v[:, 3]):.3f} | "
            f"{(v[:, 4] > 1).mean():.1%} | {(v[:, 4] > 3).mean():.1%} | {v[:, 5].max():.2f} |"
        )


if __name__ == "__main__":
    main()
