"""TensorFlow's generator dataset leaves glibc mapping every allocation above 128 KB afresh;
the library's fits and predictions undo that (data.batches.FastMalloc). Page faults, not
times, tell the two apart: a freshly mapped 1 MB array faults in its 256 pages every time."""

import json
import subprocess
import sys

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow" or not sys.platform.startswith("linux"),
    reason="TensorFlow's allocator setting is made on Linux (glibc) under the TensorFlow backend only",
)

PROBE = """
import json, resource, sys
import keras, numpy as np
from fundus_ensemble.data.batches import PatientBatches, predict_batches
from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.labels import INPUT_NAMES

def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        block = np.ones(1 << 20, np.uint8)  # 1 MB: above 128 KB, below the restored threshold
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

inputs = {name: keras.Input((48, 48, 3), name=name) for name in INPUT_NAMES}
pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Concatenate(axis=-1)([inputs[n] for n in INPUT_NAMES]))
model = keras.Model(inputs, keras.layers.Dense(8, activation="sigmoid")(pooled))
batches = PatientBatches(load_manifest(sys.argv[1]), 48, 8)
model.predict(batches, verbose=0)  # Keras's own path: TensorFlow makes its generator dataset
keras_only = faults()
predict_batches(model, batches)  # the library's path
library = faults()
print(json.dumps({"keras": keras_only, "library": library}))
"""


def test_library_predictions_undo_tensorflows_allocator_setting(view_manifest):
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(view_manifest.source)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    if counts["keras"] < 100 * 200:
        pytest.skip(f"this TensorFlow leaves the allocator alone ({counts['keras']} page faults for 100 MB)")
    assert counts["library"] < counts["keras"] / 20, counts
