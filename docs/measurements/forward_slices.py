"""Seconds per image of inference by the number of images per model call, on this machine.

    PYTHONPATH=. python docs/measurements/forward_slices.py runs/ff/prep-380/color --photos 128

1. EfficientNet-Lite2 at 380 px (the bundled model's backbone, ImageNet weights) on 64 random
   images, in calls of 1 ... 64 images (each size traced first, then timed twice).
2. The gate's EfficientNet-Lite0 classifier at 224 px, the same way.
3. The feature store's extraction (:meth:`FeatureStore.photo_features`) of the first ``--photos``
   preprocessed photos of a view folder, into fresh stores, at batch 32 and at
   :func:`..models.forward.slice_size` images per call (one run each; the backbone built before
   the timing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fundus_ensemble.models import build_backbone
from fundus_ensemble.models.forward import forward, slice_size
from fundus_ensemble.models.gate import FundusLikeness
from fundus_ensemble.training.features import FeatureSpec, FeatureStore

SLICES = (1, 2, 4, 8, 16, 32, 64)


def per_image(model, images: np.ndarray) -> dict[int, float]:
    for size in SLICES:  # trace each shape before timing
        forward(model, images[:size], size)
    out = {}
    for size in SLICES:
        times = []
        for _ in range(2):
            began = time.perf_counter()
            forward(model, images, size)
            times.append((time.perf_counter() - began) / len(images))
        out[size] = min(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("view_dir", help="a preprocessed view folder (its .png photos, in subfolders too)")
    p.add_argument("--photos", type=int, default=128)
    args = p.parse_args()
    rng = np.random.default_rng(0)

    encoder = build_backbone("efficientnet_lite2", 380, "imagenet")
    print("Lite2 380 px, s/image by images per call:")
    for size, s in per_image(encoder, rng.uniform(0, 255, (64, 380, 380, 3)).astype(np.float32)).items():
        print(f"  {size:3d}: {s:.3f}")
    gate = FundusLikeness()._model()
    print("gate, Lite0 224 px classifier, s/image by images per call:")
    for size, s in per_image(gate, rng.uniform(0, 255, (64, 224, 224, 3)).astype(np.float32)).items():
        print(f"  {size:3d}: {s:.4f}")

    paths = sorted(Path(args.view_dir).rglob("*.png"))[: args.photos]
    spec = FeatureSpec("efficientnet_lite2", "imagenet", 380)
    print(f"feature extraction of {len(paths)} photos of {args.view_dir}:")
    for batch in (32, slice_size()):
        with tempfile.TemporaryDirectory() as store:
            began = time.perf_counter()
            FeatureStore(store).photo_features(spec, "color", paths, encoder, batch, progress=False)
            seconds = time.perf_counter() - began
        print(f"  batch {batch:2d}: {seconds:.1f} s ({seconds / len(paths):.3f} s/photo)")


if __name__ == "__main__":
    main()
