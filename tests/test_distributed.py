"""Training over two processes for real: two ``train_pair.py`` processes on this machine, joined
through a loopback coordinator (JAX, one CPU device each, Gloo between them), against one
process training on two devices with the same global batches."""

import csv
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.errors import FundusError
from fundus_ensemble.training.distributed import ProcessGroup, process_group

REPO = Path(__file__).resolve().parents[1]
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
# from scratch, so that every layer and BatchNorm (and its epoch-end recalibration) learns; dropout on
# batches of 4, so that an epoch's 4 batches in another order (Keras' own shuffle) shows
TRAIN = [
    "--views",
    "color",
    "--backbone",
    "mobilenet",
    "--batch-size",
    "4",
    "--epochs",
    "2",
    "--fine-tune-epochs",
    "1",
    "--dropout",
    "0.5",
    "--bn-recalibration-patients",
    "16",
    "--seed",
    "3",
]
DIGEST = re.compile(r"process (\d)/2: weights sha256 ([0-9a-f]{16}) \(the same on every process\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    return {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


@pytest.fixture
def compile_cache(tmp_path) -> dict:
    """JAX's persistent compilation cache, shared by the test's processes: the resumed pair loads
    the programs the killed pair compiled (each process compiles for about 10 s on 2 cores), the
    same executables, so the weights still match to the bit."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def train(prep: Path, out: Path, *extra, **env_extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train_pair.py"), str(prep), "--out", str(out), *TRAIN, *extra],
        env=env(**env_extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def two_processes(prep: Path, out: Path, *extra, **env_extra) -> list[subprocess.Popen]:
    port = free_port()
    return [
        train(
            prep,
            out,
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            "--coordinator",
            f"127.0.0.1:{port}",
            "--heartbeat-timeout",
            "10",
            *extra,
            **env_extra,
        )
        for i in (0, 1)
    ]


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def weights(run: Path) -> list[np.ndarray]:
    """The saved model's weight arrays, read from its archive without Keras (this process may run TensorFlow)."""
    with zipfile.ZipFile(run / "color" / "model.keras") as archive:
        data = archive.read("model.weights.h5")
    found = []
    with h5py.File(io.BytesIO(data), "r") as h5:
        h5.visititems(
            lambda name, item: found.append((name, np.asarray(item))) if isinstance(item, h5py.Dataset) else None
        )
    return [array for _, array in sorted(found, key=lambda pair: pair[0])]


def history(run: Path) -> list[dict]:
    with open(run / "color" / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def prep(small_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep32")
    preprocess_manifest(load_manifest(small_dataset), out, size=32, workers=1, progress=False)
    return out


@needs_jax
@pytest.mark.slow
def test_two_processes_train_as_one_process_on_two_devices_and_resume_after_a_killed_worker(
    prep, tmp_path, compile_cache
):
    # the reference: one process, two (simulated) devices, the same global batches of 4 patients
    reference = train(
        prep, tmp_path / "one", "--devices", "2", XLA_FLAGS="--xla_force_host_platform_device_count=2", **compile_cache
    )
    finish(reference)

    # two processes; process 1 is killed once the first epoch is logged: process 0 must not hang
    run = tmp_path / "two"
    workers = two_processes(prep, run, **compile_cache)
    deadline = time.monotonic() + 400
    while not ((run / "color" / "history.csv").is_file() and len(history(run)) >= 1):
        assert all(w.poll() is None for w in workers), "\n".join((w.stdout.read() or "")[-3000:] for w in workers)
        assert time.monotonic() < deadline, "no epoch logged in time"
        time.sleep(0.1)
    workers[1].send_signal(signal.SIGKILL)
    try:
        out0, _ = workers[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        workers[0].kill()
        pytest.fail("process 0 went on waiting for its killed peer")
    assert workers[0].returncode != 0, out0[-3000:]
    workers[1].communicate()
    assert not (run / "color" / "model.keras").exists()

    # both started again with --resume: they continue from process 0's backup and agree
    outputs = [finish(w) for w in two_processes(prep, run, "--resume", **compile_cache)]
    assert "resuming phase 'train' at epoch 2" in outputs[0], outputs[0][-3000:]
    digests = [DIGEST.findall(out) for out in outputs]
    assert [d[0][0] for d in digests] == ["0", "1"] and digests[0][0][1] == digests[1][0][1], outputs
    assert "epoch 1/3" not in outputs[0] and "epoch 2/3" in outputs[0]  # the first epoch was not run again
    assert "epoch 2/3" not in outputs[1] and "best val" not in outputs[1]  # process 0 alone reports

    # ... and end where the single process ended: same weights, same validation scores each epoch
    diff = max(float(np.abs(a - b).max()) for a, b in zip(weights(run), weights(tmp_path / "one")))
    moved = max(float(np.abs(a).max()) for a in weights(run))
    assert moved > 0 and diff < 1e-5, diff  # measured: 0 (the same XLA programs, run on the same data)
    ours, theirs = history(run), history(tmp_path / "one")
    assert [r["epoch"] for r in ours] == ["1", "2", "3"]
    for mine, single in zip(ours, theirs):
        assert float(mine["val_final_score"]) == pytest.approx(float(single["val_final_score"]), abs=1e-6)
        assert float(mine["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5)
    card = json.loads((run / "color" / "card.json").read_text())
    assert card["processes"] == 2 and card["epochs_run"] == 3


def test_the_job_is_checked_before_anything_starts(monkeypatch):
    monkeypatch.delenv("KERAS_DISTRIBUTION_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("KERAS_DISTRIBUTION_PROCESS_ID", raising=False)
    monkeypatch.delenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", raising=False)
    assert process_group() == ProcessGroup(1, 0, None)
    with pytest.raises(FundusError, match="--heartbeat-timeout must be at least 1 second"):
        process_group(2, 0, "h:1", heartbeat_timeout_s=0)
    with pytest.raises(FundusError, match="needs --coordinator HOST:PORT"):
        process_group(2, 1)
    with pytest.raises(FundusError, match="--process-id 2 is not one of 0..1"):
        process_group(2, 2, "10.0.0.1:1234")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "4")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "3")
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "10.0.0.1:1234,10.0.0.2:1234,10.0.0.3:1234,10.0.0.4:1234")
    assert process_group() == ProcessGroup(4, 3, "10.0.0.1:1234")
    assert process_group(2, 0, "h:1") == ProcessGroup(2, 0, "h:1")  # options win over the environment
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "three")
    with pytest.raises(FundusError, match="KERAS_DISTRIBUTION_PROCESS_ID='three' is not a whole number"):
        process_group()


def test_several_processes_need_jax(prep, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "train_pair.py"),
            str(prep),
            "--out",
            str(tmp_path / "r"),
            "--num-processes",
            "2",
            "--process-id",
            "0",
            "--coordinator",
            "127.0.0.1:1",
        ],
        env={**env(), "KERAS_BACKEND": "tensorflow"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "a run over several processes uses JAX (KERAS_BACKEND=jax)" in result.stderr
    assert not (tmp_path / "r").exists()
