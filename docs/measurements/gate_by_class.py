"""The gate per class: does it turn away the sick? On every photo of a label table (odir5k-256-dev:
all graded by the challenge), the whole gate as predict runs it (data.quality.grade, then the
network checks of models.gate (ImageNet classes, the retina head) on the photos the statistics let through): per class, the share of
photos refused (no decision: "retake") and the share screened with a poor-quality caution (the
retina found but blurred, washed out, dark or pale: screened, never cleared), by the patients'
labels (Normal: patients with no other label) and by each eye's own keywords (data.keywords).

Then a camera the gate must not lock out: every --every-th photo enlarged to 2,000 / 2,500 /
3,000 px (bicubic, the smoothest such a photo can be, so the hardest case for the blockiness
check) and saved as JPEG at quality 85 / 90 / 95: the share called "heavily compressed". And the
degradation the check is for, at the photos' own 256 px: JPEG quality 10 and 20.

    PYTHONPATH=. python docs/measurements/gate_by_class.py $DATA/labels.csv --image-root $DATA \
        --json runs/gate_by_class.json > runs/gate_by_class.md
"""

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from fundus_ensemble.data.keywords import eye_labels
from fundus_ensemble.data.quality import grade
from fundus_ensemble.labels import LABEL_NAMES, LABELS
from fundus_ensemble.models.gate import FundusLikeness, gate_images

LIKENESS = FundusLikeness()


def gate(images: list[np.ndarray]) -> list[tuple[str, str | None]]:
    """Per photo ("refused" | "poor" | "gradable", reason), as predict's gate decides
    (models.gate.gate_images)."""
    out = []
    for p in gate_images(images, LIKENESS):
        if p.not_fundus is not None:
            out.append(("refused", f"not a fundus photo ({p.check})"))
        else:
            out.append((p.status, p.verdict.reason))
    return out


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", type=Path, help="labels.csv: filename, eye_keywords and the eight labels per photo")
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--image-dir", default="images")
    p.add_argument("--every", type=int, default=10, help="the camera check on every N-th photo")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with open(args.table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    verdicts = []
    for start in range(0, len(rows), 128):
        batch = rows[start : start + 128]
        verdicts += gate([cv2.imread(str(args.image_root / args.image_dir / r["filename"])) for r in batch])
        print(f"[gate] {start + len(batch)} of {len(rows)}", file=sys.stderr, flush=True)
    patient = np.array([[int(r[c]) for c in LABELS] for r in rows])
    eye = np.array(
        [e if (e := eye_labels(r.get("eye_keywords", ""))) is not None else np.full(len(LABELS), -1) for r in rows]
    )
    groups = {}
    for j, c in enumerate(LABELS):
        in_patient = (patient[:, j] == 1) & ((patient[:, 1:].sum(1) == 0) if c == "N" else True)
        groups[c] = {"patient labels": in_patient, "eye keywords": eye[:, j] == 1}
    table = {}
    for c, by in groups.items():
        table[c] = {}
        for kind, mask in by.items():
            picked = [verdicts[i] for i in np.flatnonzero(mask)]
            n = len(picked)
            refused = Counter(r for k, r in picked if k == "refused")
            poor = Counter(r for k, r in picked if k == "poor")
            table[c][kind] = {
                "photos": n,
                "refused": sum(refused.values()),
                "poor": sum(poor.values()),
                "refused_reasons": dict(refused),
                "poor_reasons": dict(poor),
            }
    every = rows[:: args.every]
    camera = {}
    for side in (2000, 2500, 3000):
        for quality in (85, 90, 95):
            reasons = Counter()
            for r in every:
                photo = cv2.imread(str(args.image_root / args.image_dir / r["filename"]))
                big = jpeg(cv2.resize(photo, (side, side), interpolation=cv2.INTER_CUBIC), quality)
                reasons[grade(big).reason] += 1
            camera[f"{side} px, quality {quality}"] = {
                "photos": len(every),
                "compressed": reasons["heavily compressed"],
            }
    for quality in (10, 20):
        reasons = Counter(
            grade(jpeg(cv2.imread(str(args.image_root / args.image_dir / r["filename"])), quality)).reason
            for r in every
        )
        camera[f"256 px, quality {quality}"] = {"photos": len(every), "compressed": reasons["heavily compressed"]}

    normal = table["N"]["eye keywords"]
    normal_rate = normal["refused"] / normal["photos"]
    print(
        f"Gate per class on {len(rows)} photos of `{args.table.name}` (grade, then the network checks, as predict "
        "runs them). Refused: no decision, 'retake'. Poor: screened with a caution, never cleared.\n"
    )
    print(
        "| class | by | photos | refused | x the normal eyes' rate | reasons refused | screened as poor | reasons poor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in LABELS:
        for kind, t in table[c].items():
            rate = t["refused"] / t["photos"] if t["photos"] else float("nan")
            ratio = rate / normal_rate if normal_rate else float("inf") if rate else 0.0
            print(
                f"| {c} ({LABEL_NAMES[c]}) | {kind} | {t['photos']} | {t['refused']} ({100 * rate:.1f}%) | "
                f"{ratio:.1f} | {', '.join(f'{k} {v}' for k, v in t['refused_reasons'].items()) or '-'} | "
                f"{t['poor']} ({100 * t['poor'] / max(1, t['photos']):.1f}%) | "
                f"{', '.join(f'{k} {v}' for k, v in t['poor_reasons'].items()) or '-'} |"
            )
    print("\n| photos saved as JPEG | photos | called heavily compressed |")
    print("|---|---|---|")
    for name, t in camera.items():
        print(f"| {name} | {t['photos']} | {t['compressed']} ({100 * t['compressed'] / t['photos']:.0f}%) |")
    if args.json:
        args.json.write_text(json.dumps({"classes": table, "camera": camera, "photos": len(rows)}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
