"""A CLAHE gray view beside the paper's globally equalized one, for the lever screen (issue 12).

Writes ``OUT/gray_eq/`` from ``PREP/color/``: each colour view to gray as ``gray_eq_view``
does, then CLAHE (clip limit 2.0, 8 x 8 tiles) instead of ``cv2.equalizeHist``; the manifest
is the colour view's, so the split and patients are the same. The folder is named
``gray_eq`` so ``scripts/levers.py OUT --view gray_eq`` trains on it unchanged; it is a
measurement, not a view of the library.

    PYTHONPATH=. python docs/measurements/clahe_view.py runs/odir96/prep runs/odir96/prep_clahe
"""

import shutil
import sys
from pathlib import Path

import cv2

from fundus_ensemble.data.imaging import encode_png

prep, out = Path(sys.argv[1]), Path(sys.argv[2])
clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
source, target = prep / "color", out / "gray_eq"
count = 0
for png in sorted(source.rglob("*.png")):
    gray = clahe.apply(cv2.cvtColor(cv2.imread(str(png), cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY))
    destination = target / png.relative_to(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(encode_png(gray))
    count += 1
shutil.copy(source / "manifest.csv", target / "manifest.csv")
for extra in ("preprocess.json", "rejects.csv"):
    if (prep / extra).is_file():
        shutil.copy(prep / extra, out / extra)
print(f"{count} CLAHE gray views in {target}")
