"""Every supported Keras backend: the pipeline without TensorFlow, models across backends,
and TensorBoard logs that need no TensorFlow."""

import csv
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fundus_ensemble.data.synthetic import write_synthetic_dataset

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend

REPO = Path(__file__).resolve().parents[1]
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")


def read_events(folder: Path) -> list:
    """The Event protos of every event file under ``folder``, parsed without TensorFlow
    (TFRecord framing: length, its CRC, the record, its CRC)."""
    from tensorboard.compat.proto import event_pb2

    events = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return events


def test_tensorboard_scalars_are_readable_and_follow_keras_layout(tmp_path):
    import keras

    from fundus_ensemble.training.callbacks import TensorBoardScalars

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.01), "mse")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    model.fit(
        x, x[:, :1], validation_data=(x, x[:, :1]), epochs=3, verbose=0, callbacks=[TensorBoardScalars(tmp_path / "tb")]
    )
    scalars = {}
    for part in ("train", "validation"):
        for event in read_events(tmp_path / "tb" / part):
            for value in event.summary.value:
                scalars.setdefault((part, value.tag), []).append((event.step, value.simple_value))
    assert [s for s, _ in scalars[("train", "epoch_loss")]] == [0, 1, 2]
    assert [s for s, _ in scalars[("validation", "epoch_loss")]] == [0, 1, 2]
    assert scalars[("train", "epoch_learning_rate")][0][1] == pytest.approx(0.01)
    history = model.history.history
    np.testing.assert_allclose([v for _, v in scalars[("validation", "epoch_loss")]], history["val_loss"], rtol=1e-6)


# --- the whole pipeline under JAX, in a process where TensorFlow cannot be imported -------------
# the recommended recipe, pretrained Lite0 frozen with cross-fitted heads; training by epochs under JAX is
# tests/test_distributed.py's (MobileNet from scratch, both phases)
JAX_RUN = [
    "--backbone",
    "efficientnet_lite0",
    "--weights",
    "imagenet",
    "--head-fit",
    "cross-fit",
    "--fine-tune-epochs",
    "0",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """The README's command lines under ``KERAS_BACKEND=jax`` with ``import tensorflow`` failing."""
    root = tmp_path_factory.mktemp("jax")
    blocker = root / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('tensorflow is blocked: this process must not need it')\n")
    manifest = write_synthetic_dataset(
        root / "data", 120, seed=21, diameter=90, fractions={"train": 0.6, "val": 0.2, "test": 0.2}
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO)])}
    test_only = root / "test_patients.csv"  # predict the held-out patients' photos, not all 240
    with open(manifest, newline="") as source, open(test_only, "w", newline="") as out:
        rows = list(csv.DictReader(source))
        writer = csv.DictWriter(out, list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["split"] == "test")
    steps = [
        ["preprocess.py", str(manifest), "--out", str(root / "prep"), "--size", "48", "--workers", "1"],
        ["train_pair.py", str(root / "prep"), "--out", str(root / "run"), *JAX_RUN],
        [
            "score.py",
            str(root / "run"),
            str(root / "prep"),
            "--split",
            "test",
            "--calibrate-on",
            "out-of-fold",
            "--report",
            "--gallery",
            "1",  # Grad-CAM under JAX once per class and group is enough here (3 each: a minute more)
        ],
        [
            "predict.py",
            str(root / "run"),
            str(test_only),
            "--image-root",
            str(root / "data"),
            "--out",
            str(root / "predict"),
            "--explain",
            "A",
        ],
    ]
    # one process runs the four command lines as the shell would (each script's main through cli.run):
    # a new interpreter per step would import Keras and JAX again each time
    result = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, json.dumps(steps), str(REPO / "scripts")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"failed under JAX:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return root


ONE_PROCESS = """
import importlib.util, json, sys
from pathlib import Path
from fundus_ensemble.cli import run
for name, *argv in json.loads(sys.argv[1]):
    path = Path(sys.argv[2]) / name
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = run(module.main, argv)
    if status:
        sys.exit(f"{name} exited with status {status}")
"""


@needs_jax
@pytest.mark.slow
def test_pipeline_runs_and_learns_under_jax_without_tensorflow(jax_run):
    score = json.loads((jax_run / "run" / "score_test" / "score.json").read_text())
    prior = score["trivial"]["class prior (train)"]
    # measured under JAX, cross-fitted: ensemble AUC 0.929 against the class prior's 0.625 (2026-12-04)
    assert score["ensemble"]["auc"] > prior["auc"] + 0.05, score
    for view in ("color", "gray_eq"):
        card = json.loads((jax_run / "run" / view / "card.json").read_text())
        assert card["versions"]["keras_backend"] == "jax" and "tensorflow" not in card["versions"]
        assert card["head"]["fit"] == "cross_fit" and (jax_run / "run" / view / "out_of_fold.npz").is_file()
    assert (jax_run / "run" / "calibration.json").is_file()
    page = (jax_run / "run" / "score_test" / "report.html").read_text()
    assert len(page) > 10_000 and "Cross-fitted heads" in page
    assert (jax_run / "predict" / "heatmaps" / "heatmaps.csv").is_file() and list(
        (jax_run / "predict" / "heatmaps").glob("*_A.npy")
    )


@needs_jax
@pytest.mark.slow
def test_models_trained_under_jax_predict_the_same_under_this_backend(jax_run):
    """Saved under JAX, loaded here (TensorFlow in CI's first run): the same probabilities within 1e-4
    (the score holds them through the run's out-of-fold calibration, applied here the same way)."""
    from fundus_ensemble.data.batches import predict_patients
    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.evaluation.calibration import Calibration
    from fundus_ensemble.evaluation.ensemble import load_view_model

    fitted = json.loads((jax_run / "run" / "calibration.json").read_text())

    with open(jax_run / "run" / "score_test" / "predictions_detail.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for view in ("color", "gray_eq"):
        model, card = load_view_model(jax_run / "run", view)
        test = load_manifest(jax_run / "prep" / view / "manifest.csv").select("test")
        assert test.patient_ids == [r["ID"] for r in rows]
        probs = Calibration.from_dict(fitted[view]).apply(predict_patients(model, test, card["input_size"]))
        saved = np.array([[float(r[f"{view}_{c}"]) for c in "NDGCAHMO"] for r in rows])
        np.testing.assert_allclose(probs, saved, atol=1e-4)
