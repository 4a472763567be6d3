"""The gradability gate (fundus_ensemble.data.quality) on real photos, degraded copies and photos
that are not of a retina: the share flagged, and the share flagged for the right reason.

    python docs/measurements/gradability.py $DATA/images --every 1 > gradability.md

Real: every photo of the folder (odir5k-256-dev: all graded by the challenge). Degraded: a copy of
every photo (--every N: of every N-th) per degradation and strength. Not a retina: scikit-image's
bundled photos (the ones it ships without a download), each as it is and cut into a circle on
black the way a fundus camera frames its photo (a hostile case, not a camera's).
"""

import argparse
import glob
import json
import sys
from collections import Counter

import cv2
import numpy as np

from fundus_ensemble.models.gate import FundusLikeness, gate_images

LIKENESS = FundusLikeness()


def gate(images: list[np.ndarray]) -> list[str | None]:
    """The whole gate, as predict runs it (models.gate.gate_images): each photo's reason, None when
    gradable (a poor one, data.quality.POOR, is screened and never clears); ``gate.refused`` counts
    the photos refused (not screened at all)."""
    photos = gate_images(images, LIKENESS)
    gate.refused = sum(p.status == "refused" for p in photos)
    return ["not a fundus photo" if p.not_fundus is not None else p.verdict.reason for p in photos]


def clip_share(image: np.ndarray, share: float) -> np.ndarray:
    """The photo brightened until ``share`` of its retina's green channel clips at 255."""
    retina = image.max(axis=2) > 20
    level = np.percentile(image[..., 1][retina], 100 * (1 - share)) if retina.any() else 255
    gain = 255.0 / max(float(level), 1.0)
    return np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)


DEGRADATIONS = {
    ("blurred", "Gaussian sigma 1.5"): lambda a: cv2.GaussianBlur(a, (0, 0), 1.5),
    ("blurred", "Gaussian sigma 3"): lambda a: cv2.GaussianBlur(a, (0, 0), 3),
    ("blurred", "Gaussian kernel 31"): lambda a: cv2.GaussianBlur(a, (31, 31), 0),
    ("too dark", "x 0.10"): lambda a: (a * 0.10).astype(np.uint8),
    ("too dark", "x 0.15"): lambda a: (a * 0.15).astype(np.uint8),
    ("too dark", "x 0.20"): lambda a: (a * 0.20).astype(np.uint8),
    ("over-exposed", "30 % of the retina clipped"): lambda a: clip_share(a, 0.30),
    ("over-exposed", "50 % clipped"): lambda a: clip_share(a, 0.50),
    ("retina cut off", "left half gone"): lambda a: np.ascontiguousarray(a[:, a.shape[1] // 2 :]),
    ("retina cut off", "top half gone"): lambda a: np.ascontiguousarray(a[a.shape[0] // 2 :]),
    ("heavily compressed", "JPEG quality 10"): lambda a: jpeg(a, 10),
    ("heavily compressed", "JPEG quality 5"): lambda a: jpeg(a, 5),
}
NO_RETINA = ("not a fundus photo", "not a colour fundus photo", "retina not found")  # the right reasons there
NOT_A_RETINA = (
    "astronaut brick camera cat checkerboard clock coffee coins colorwheel grass gravel horse hubble_deep_field "
    "immunohistochemistry logo moon page rocket text cell binary_blobs shepp_logan_phantom"
).split()


def skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / (a.max() - a.min() + 1e-9)).astype(np.uint8)
    if a.ndim == 2:
        return cv2.cvtColor(a, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(a[..., :3][..., ::-1])


def in_a_circle(image: np.ndarray) -> np.ndarray:
    side = min(image.shape[:2])
    square = image[:side, :side].copy()
    yy, xx = np.mgrid[:side, :side]
    square[(yy - side / 2) ** 2 + (xx - side / 2) ** 2 > (0.48 * side) ** 2] = 0
    return square


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="folder of real fundus photos")
    p.add_argument("--every", type=int, default=1, help="degrade every N-th photo (default: all)")
    p.add_argument("--json", help="also write the counts here")
    args = p.parse_args(argv)
    files = sorted(glob.glob(f"{args.images}/*.jpg") + glob.glob(f"{args.images}/*.png"))
    real, refused = Counter(), 0
    for start in range(0, len(files), 256):
        real.update(gate([cv2.imread(f) for f in files[start : start + 256]]))
        refused += gate.refused
    flagged = len(files) - real[None]
    out = {
        "real": {
            "photos": len(files),
            "flagged": flagged,
            "refused": refused,
            "reasons": {k: v for k, v in real.items() if k},
        }
    }
    lines = [
        "| photos | n | flagged | flagged for the right reason | reasons given |",
        "|---|---|---|---|---|",
        f"| real ODIR photos (all graded; {refused / len(files):.1%} refused, the rest screened as poor) | "
        f"{len(files)} | {flagged / len(files):.1%} | - | "
        + ", ".join(f"{k} {v}" for k, v in real.most_common() if k)
        + " |",
    ]
    sample = files[:: args.every]
    for (reason, strength), degrade in DEGRADATIONS.items():
        got, refused = Counter(), 0
        for start in range(0, len(sample), 256):
            got.update(gate([degrade(cv2.imread(f)) for f in sample[start : start + 256]]))
            refused += gate.refused
        n = len(sample)
        right = got[reason]
        out[f"{reason}: {strength}"] = {
            "photos": n,
            "flagged": n - got[None],
            "refused": refused,
            "right": right,
            "reasons": dict(got),
        }
        lines.append(
            f"| {reason}: {strength} ({refused / n:.0%} refused) | {n} | {(n - got[None]) / n:.1%} | {right / n:.1%} | "
            + ", ".join(f"{k or 'gradable'} {v}" for k, v in got.most_common())
            + " |"
        )
    for framing, make in (("as it is", lambda a: a), ("cut into a disc on black", in_a_circle)):
        verdicts = dict(zip(NOT_A_RETINA, gate([make(skimage_photo(name)) for name in NOT_A_RETINA])))
        right = [n for n, r in verdicts.items() if r in NO_RETINA]
        flagged = [n for n, r in verdicts.items() if r is not None]
        out[f"not a retina, {framing}"] = verdicts
        lines.append(
            f"| scikit-image photos, {framing} | {len(verdicts)} | {len(flagged) / len(verdicts):.1%} | "
            f"{len(right) / len(verdicts):.1%} | "
            + ", ".join(f"{n}: {r or 'gradable'}" for n, r in verdicts.items() if r not in NO_RETINA)
            + " |"
        )
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
