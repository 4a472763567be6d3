"""The embedded demo: synthetic patients committed under data/demo, and the whole pipeline on them.

The demo data is described by the repository's top-level ``data_manifest.csv``; a test
checks that :func:`write_demo` reproduces it. The demo run uses a small input size and few
epochs so it finishes in minutes on two CPU cores; its scores show the plumbing works, not
what the method reaches on real photographs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .labels import SPLITS


@dataclass(frozen=True)
class DemoData:
    patients: int = 80
    seed: int = 2019
    diameter: int = 200
    image_dir: str = "data/demo/images"
    manifest: str = "data_manifest.csv"
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)


DEMO = DemoData()


def write_demo(root: str | os.PathLike = ".") -> Path:
    """(Re)write the demo images and ``data_manifest.csv`` under ``root``."""
    from .data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        root, DEMO.patients, DEMO.seed, DEMO.diameter, DEMO.image_dir, DEMO.manifest, dict(zip(SPLITS, DEMO.fractions)),
    )


def demo_train_config():
    """B3 from scratch at 64 px for 6 + 2 epochs: minutes on 2 CPU cores, not a benchmark."""
    from .training.train import TrainConfig

    return TrainConfig(size=64, epochs=6, fine_tune_epochs=2, batch_size=8, bn_recalibration_patients=24)


def run_demo(root: str | os.PathLike = ".", out: str | os.PathLike = "runs/demo", split: str = "test") -> dict:
    """Preprocess, train both view models and score the ensemble on the demo data."""
    from .data.manifest import load_manifest
    from .data.preprocess import preprocess_manifest
    from .evaluation.ensemble import format_score_table, score_run
    from .training.train import train_pair

    out = Path(out)
    config = demo_train_config()
    start = time.perf_counter()
    manifest = load_manifest(Path(root) / DEMO.manifest)
    print(f"demo: {len(manifest)} synthetic patients; config {dataclasses.asdict(config)}", flush=True)
    print(preprocess_manifest(manifest, out / "prep", size=config.size).describe(), flush=True)
    train_pair(out / "prep", out / "models", config, force=True)
    report = score_run(out / "models", out / "prep", split, force=True)
    print(format_score_table(report))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; outputs under {out}")
    return report
