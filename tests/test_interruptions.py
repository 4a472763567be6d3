"""Jobs killed with SIGKILL resume where they stopped, and never leave a truncated file in use."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from conftest import run_script

from fundus_ensemble.data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def start(script, *args):
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run(script, *args, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_when(process, condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"finished before it could be interrupted:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_killed_preprocess_resumes_without_redoing_or_truncating(tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", 100, seed=4, diameter=400)
    out = tmp_path / "prep"
    done = lambda: len(list((out / "gray_eq").rglob("*.png"))) >= 30  # noqa: E731
    kill_when(start("preprocess.py", manifest, "--out", out, "--size", 256, "--workers", 1), done, timeout=120)

    finished_before = {p.relative_to(out) for p in out.rglob("*.png")}
    assert 0 < len(finished_before) < 400
    for path in finished_before:  # every file under its final name is whole
        assert cv2.imread(str(out / path), cv2.IMREAD_UNCHANGED) is not None, path

    result = run("preprocess.py", manifest, "--out", out, "--size", 256, "--workers", 2)
    assert result.returncode == 0, result.stderr
    by_view = {
        view: {Path(*p.parts[1:]) for p in finished_before if p.parts[0] == view} for view in ("color", "gray_eq")
    }
    complete_pairs = len(by_view["color"] & by_view["gray_eq"])  # an image is done when both views are
    assert f"{complete_pairs} already up to date" in result.stdout
    assert f"{200 - complete_pairs} processed" in result.stdout
    assert not list(out.rglob("*.tmp")), "leftover temporary files from the killed run"


@pytest.mark.slow
def test_killed_training_resumes_from_the_last_epoch(tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", 40, seed=5, diameter=64)
    assert run_script("preprocess.py", manifest, "--out", tmp_path / "prep", "--size", 32).returncode == 0
    args = [
        tmp_path / "prep",
        "--out",
        tmp_path / "run",
        "--views",
        "color",
        "--backbone",
        "mobilenet",
        "--size",
        32,
        "--batch-size",
        4,
        "--epochs",
        5,
        "--fine-tune-epochs",
        2,
        "--bn-recalibration-patients",
        4,
    ]
    history = tmp_path / "run" / "color" / "history.csv"

    def epochs_logged():
        return len(history.read_text().splitlines()) - 1 if history.is_file() else 0

    kill_when(start("train_pair.py", *args), lambda: epochs_logged() >= 2, timeout=300)
    assert not (tmp_path / "run" / "color" / "model.keras").exists()

    # the killed run is a process of its own; what comes after it reads only its files, so it runs in this
    # process (a new interpreter would import TensorFlow again: seconds each)
    refused = run_script("train_pair.py", *args)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = run_script("train_pair.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming phase 'train' at epoch" in resumed.stdout
    with open(history) as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
    card = json.loads((tmp_path / "run" / "color" / "card.json").read_text())
    assert epochs == list(range(1, len(epochs) + 1)) and card["epochs_run"] == len(epochs)
    assert "epoch 1/" not in resumed.stdout, "resumed run must not start again at epoch 1"
    epoch_lines = [line for line in resumed.stdout.splitlines() if " epoch " in line and "/7:" in line]
    resumed_at = int(re.search(r"resuming phase 'train' at epoch (\d+)", resumed.stdout).group(1))
    assert len(epoch_lines) == len(epochs) - resumed_at + 1, "one console line per epoch run"
    assert "compiling the training step" in resumed.stdout
    assert resumed.stdout.strip().splitlines()[-1].startswith("next: python scripts/score.py")
