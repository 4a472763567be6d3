"""One eye through predict.py itself, on real photos of patients the run never saw.

From a prepared feature screen folder (its views at SIZE and the store holding their features),
the benchmark's split SEED is written as a preprocessed folder (the views hard-linked, not copied)
and the recipe trained on its development patients (scripts/train_pair.py, cross-fitted heads on
max, mean and |left - right|, the one-eye heads, the run's calibration), reading the features from
the store. Then scripts/predict.py, gate on, answers its test patients three times from the raw
ODIR photos: both photos, the left photo alone, the right photo alone. Per answer: the share of
healthy patients (Normal only) told "No referable finding" (in the left eye, in the right eye),
and the share of patients with a finding (any other label) and of eyes with a finding (the eye's
own keywords) not cleared.

    PYTHONPATH=. python docs/measurements/one_eye_predict.py runs/ff --image-root $DATA --seed 0 \
        --out runs/one_eye_predict-s0
"""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path)
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=380)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    from fundus_ensemble.data.keywords import eye_labels
    from fundus_ensemble.data.manifest import load_manifest, write_manifest
    from fundus_ensemble.data.splits import assign_splits
    from fundus_ensemble.evaluation.feature_screen import FRACTIONS
    from fundus_ensemble.labels import VIEWS

    source = args.screen / f"prep-{args.size}"
    prep = args.out / "prep"
    for view in VIEWS:
        if not (prep / view / "images").is_dir():
            (prep / view).mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(source / view / "images"), str(prep / view / "images")], check=True)
        split = assign_splits(load_manifest(source / view / "manifest.csv"), FRACTIONS, args.seed)
        write_manifest(split.patients, prep / view / "manifest.csv")
    (prep / "preprocess.json").write_bytes((source / "preprocess.json").read_bytes())
    run = args.out / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not (run / "calibration.json").is_file():
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "train_pair.py"), str(prep), "--out", str(run)]
            + ["--backbone", "efficientnet_lite2", "--weights", "imagenet", "--head-fit", "cross-fit", "--folds", "5"]
            + [
                "--head-fusion",
                "max_mean_diff",
                "--fine-tune-epochs",
                "0",
                "--feature-store",
                str(args.screen / "store"),
            ]
            + ["--force"],
            check=True,
            env=env,
        )
    originals = {
        q.patient_id: q for q in load_manifest(args.screen / "manifest.csv", image_root=args.image_root).patients
    }
    test = [q for q in load_manifest(prep / "color" / "manifest.csv").patients if q.split == "test"]
    test = [originals[q.patient_id] for q in test]
    results = {}
    for answer, eyes in (
        ("both eyes", ("left", "right")),
        ("left eye alone", ("left",)),
        ("right eye alone", ("right",)),
    ):
        table = args.out / f"{answer.replace(' ', '_')}.csv"
        with open(table, "w", newline="") as handle:  # paths relative to --image-root, as manifests take them
            writer = csv.writer(handle)
            writer.writerow(["patient_id", "left_image", "right_image"])
            for q in test:
                if all(getattr(q, f"{e}_image") for e in eyes):
                    writer.writerow(
                        [q.patient_id, *(getattr(q, f"{e}_image") if e in eyes else "" for e in ("left", "right"))]
                    )
        out = args.out / f"predict-{answer.replace(' ', '_')}"
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "predict.py"),
                str(run),
                str(table),
                "--image-root",
                str(args.image_root),
            ]
            + ["--out", str(out), "--force"],
            check=True,
            env=env,
        )
        with open(out / "decisions.csv", newline="") as handle:
            lines = {r["patient_id"]: r for r in csv.DictReader(handle)}
        by_id = {q.patient_id: q for q in test}
        healthy, sick, eye_sick, eye_normal = [], [], [], []
        for pid, r in lines.items():
            q = by_id[pid]
            cleared = r["referral"].startswith("No referable finding")
            labels = np.asarray(q.labels)
            if labels[0] == 1 and labels[1:].sum() == 0:
                healthy.append(cleared)
            if labels[1:].sum() > 0:
                sick.append(not cleared)
            if len(eyes) == 1:
                kw = eye_labels(q.extra.get(f"{eyes[0]}_keywords", ""))
                if kw is not None:
                    (eye_normal if kw[0] == 1 else eye_sick).append(cleared if kw[0] == 1 else not cleared)
        results[answer] = {
            "patients": len(lines),
            "not_gradable": sum(r["referral"].startswith("Not gradable") for r in lines.values()),
            "healthy": len(healthy),
            "healthy_cleared": float(np.mean(healthy)),
            "sick": len(sick),
            "sick_not_cleared": float(np.mean(sick)),
            **(
                {
                    "eyes_with_finding": len(eye_sick),
                    "eyes_with_finding_not_cleared": float(np.mean(eye_sick)),
                    "normal_eyes_cleared": float(np.mean(eye_normal)),
                }
                if eye_sick
                else {}
            ),
            "example_lines": sorted({r["referral"] for r in lines.values()})[:6],
        }
    (args.out / "one_eye_predict.json").write_text(json.dumps(results, indent=1))
    print(
        f"Split {args.seed}: the recipe trained on its development patients, predict.py (gate on) on its test patients.\n"
    )
    print(
        "| given | patients | healthy cleared | with a finding not cleared | eyes with a finding (own keywords) not cleared | normal eyes cleared |"
    )
    print("|---|---|---|---|---|---|")
    for answer, r in results.items():
        print(
            f"| {answer} | {r['patients']} | {r['healthy_cleared']:.0%} of {r['healthy']} | "
            f"{r['sick_not_cleared']:.0%} of {r['sick']} | "
            + (
                f"{r['eyes_with_finding_not_cleared']:.0%} of {r['eyes_with_finding']} | {r['normal_eyes_cleared']:.0%} |"
                if "eyes_with_finding" in r
                else "- | - |"
            )
        )


if __name__ == "__main__":
    main()
