"""Peak memory of training and prediction against the number of patients, with the decoded
views kept in memory and streamed from disk (docs/training.md, "Data larger than memory").

    python docs/measurements/memory_table.py OUT [--patients 1000 4000 16000] [--size 128]

Makes 1,000 synthetic patients (photos about 256 px across, preprocessed to 256 px views), then
folders of N patients that repeat those 1,000 under new file names (hard links: the same bytes,
distinct images to every cache). For each N it runs, each in a fresh process under
``/usr/bin/time -v`` (peak resident memory):

- ``train_pair.py --views color --backbone mobilenet --size SIZE --epochs 1 --fine-tune-epochs 0``
  with ``--cache on`` and ``--cache off`` (one epoch fills the cache: the peak is the run's peak);
- ``predict.py`` over every photo of the N patients with the ``--cache on`` run's model.

Prints a markdown table and writes OUT/memory.json (the rows of this call). Needs about an hour on
2 CPU cores (the 16,000 row alone took 36 minutes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; its peak RSS (MB), wall seconds and last lines."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return {
        "peak_mb": round(peak_kb / 1024),
        "wall_s": round(time.perf_counter() - start, 1),
        "said": [line for line in result.stdout.splitlines() if "decoded views" in line or "images/s" in line][:2],
    }


def repeated(source: Path, prep: Path, out: Path, patients: int) -> tuple[Path, Path]:
    """A preprocessing folder (colour view) and a photo folder of ``patients`` patients, repeating the source's."""
    view, photos = out / f"prep{patients}", out / f"photos{patients}"
    if (view / "color" / "manifest.csv").is_file():
        return view, photos
    (view / "color" / "images").mkdir(parents=True, exist_ok=True)
    photos.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(prep / "color" / "manifest.csv", newline="")))
    header = list(rows[0])
    with open(view / "color" / "manifest.csv.tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        for k in range(patients):
            row = dict(rows[k % len(rows)])
            copy = f"r{k // len(rows)}_"
            row["patient_id"] = copy + row["patient_id"]
            for eye in ("left_image", "right_image"):
                if row[eye]:
                    name = Path(row[eye]).name
                    os.link(prep / "color" / row[eye], view / "color" / "images" / (copy + name))
                    row[eye] = f"images/{copy}{name}"
                    photo = f"{row['patient_id']}_{eye.split('_')[0]}.jpg"
                    os.link(
                        source / "images" / f"{rows[k % len(rows)]['patient_id']}_{eye.split('_')[0]}.jpg",
                        photos / photo,
                    )
            writer.writerow(row)
    os.replace(view / "color" / "manifest.csv.tmp", view / "color" / "manifest.csv")
    (view / "preprocess.json").write_text((prep / "preprocess.json").read_text())
    return view, photos


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--patients", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    source = out / "source"
    if not (out / "prep" / "preprocess.json").is_file():
        from fundus_ensemble.data.synthetic import write_synthetic_dataset

        write_synthetic_dataset(source, 1000, seed=3, diameter=256, fractions={"train": 0.7, "val": 0.15, "test": 0.15})
        subprocess.run(
            [
                python,
                str(REPO / "scripts" / "preprocess.py"),
                str(source / "manifest.csv"),
                "--out",
                str(out / "prep"),
                "--size",
                "256",
                "--workers",
                "2",
            ],
            check=True,
        )
    from fundus_ensemble.data.batches import memory_available

    results = {"size": args.size, "available_gb": round((memory_available() or 0) / 1e9, 1), "rows": []}
    for n in args.patients:
        prep, photos = repeated(source, out / "prep", out, n)
        row = {"patients": n}
        for cache in ("on", "off"):
            run = out / f"run{n}-{cache}"
            row[f"train_cache_{cache}"] = timed(
                [
                    python,
                    str(REPO / "scripts" / "train_pair.py"),
                    str(prep),
                    "--out",
                    str(run),
                    "--force",
                    "--views",
                    "color",
                    "--backbone",
                    "mobilenet",
                    "--size",
                    str(args.size),
                    "--epochs",
                    "1",
                    "--fine-tune-epochs",
                    "0",
                    "--batch-size",
                    "16",
                    "--workers",
                    "2",
                    "--cache",
                    cache,
                ],
                out / f"train{n}-{cache}.log",
            )
            print(n, cache, row[f"train_cache_{cache}"], flush=True)
        row["predict"] = timed(
            [
                python,
                str(REPO / "scripts" / "predict.py"),
                str(out / f"run{n}-on"),
                str(photos),
                "--out",
                str(out / f"predict{n}"),
                "--force",
            ],
            out / f"predict{n}.log",
        )
        print(n, "predict", row["predict"], flush=True)
        results["rows"].append(row)
        (out / "memory.json").write_text(json.dumps(results, indent=2))
    print(f"\n{args.size} px training views; {results['available_gb']} GB available at the start\n")
    print("| patients | training, views kept | training, views streamed | prediction |")
    print("|---:|---:|---:|---:|")
    for row in results["rows"]:
        cells = [
            f"{row[k]['peak_mb']:,} MB ({row[k]['wall_s']:.0f} s)"
            for k in ("train_cache_on", "train_cache_off", "predict")
        ]
        print(f"| {row['patients']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
