"""Data-parallel training without GPUs: two simulated CPU devices reach the weights one device
reaches with the same global batch, on both backends (each in a fresh process, since the
devices are fixed when the backend starts)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fundus_ensemble.errors import FundusError

REPO = Path(__file__).resolve().parents[1]

TRAIN_ON_DEVICES = r"""
import json, os, sys
import numpy as np
backend, sync = os.environ["KERAS_BACKEND"], sys.argv[1] == "sync"
if backend == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from fundus_ensemble.models.losses import WeightedBinaryCrossentropy
from fundus_ensemble.models.patient_classifier import EyeFusion
from fundus_ensemble.training import hardware

def build():
    # the patient model's shape in small: both eyes stacked through one encoder with BatchNorm, then the fusion
    eyes = [keras.Input((16, 16, 3), name=name) for name in ("left_eye", "right_eye")]
    h = keras.layers.Conv2D(8, 3)(keras.layers.Concatenate(axis=0)(eyes))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(keras.layers.BatchNormalization()(h)))
    return keras.Model(eyes, keras.layers.Dense(8, activation="sigmoid", dtype="float32")(EyeFusion()(h)))

rng = np.random.default_rng(0)
x = {name: rng.uniform(0, 1, (24, 16, 16, 3)).astype("float32") for name in ("left_eye", "right_eye")}
y = (rng.random((24, 8)) < 0.4).astype("float32")
keras.utils.set_random_seed(0)
start = build().get_weights()

def train(devices):
    with hardware.data_parallel(devices, 8):
        model = build()
        if sync:
            hardware.synchronize_batch_norm(model, devices)
        model.compile(keras.optimizers.SGD(0.1), WeightedBinaryCrossentropy([2.0] * 8), jit_compile=hardware.resolve_jit_compile(None))
        model.set_weights(start)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)  # 6 steps of a global batch of 8
        if backend == "tensorflow":
            replicas = model.distribute_strategy.num_replicas_in_sync
        else:
            replicas = len(model.weights[0].value.sharding.device_set)
        return [np.asarray(w) for w in model.get_weights()], replicas

one, n1 = train(1)
two, n2 = train(2)
moved = max(float(np.abs(a - b).max()) for a, b in zip(one, start))
diff = max(float(np.abs(a - b).max()) for a, b in zip(one, two))
print(json.dumps({"replicas": [n1, n2], "moved": moved, "diff": diff}))
"""


def run_on_two_devices(backend: str, sync: bool = True) -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_ON_DEVICES, "sync" if sync else "plain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "backend",
    [
        "tensorflow",
        pytest.param(
            "jax", marks=pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
        ),
    ],
)
def test_two_devices_reach_the_weights_of_one(backend):
    got = run_on_two_devices(backend)
    assert got["replicas"] == [1, 2]
    assert got["moved"] > 1e-2  # training moved the weights: the comparison means something
    # measured after 6 steps, weights moved by up to 0.06: jax 6e-8; tensorflow 1.2e-5 (its synchronized
    # BatchNorm computes the variance as E[x^2] - E[x]^2), and 7.6e-4 with per-device BatchNorm statistics
    assert got["diff"] < 1e-4, got


def test_batch_must_split_over_devices():
    from fundus_ensemble.training.hardware import data_parallel

    with pytest.raises(FundusError, match="--batch-size 15 does not split over --devices 2.*e.g. 16"):
        with data_parallel(2, 15):
            pass
    with pytest.raises(FundusError, match="sees 1 device"):
        with data_parallel(4, 16):
            pass
