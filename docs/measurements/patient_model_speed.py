"""Training/prediction speed of the B3 patient model at 96 and 128 px on random data (train_on_batch)."""

import sys
import time

import keras
import numpy as np

sys.path.insert(0, ".")  # run from the repository root
from fundus_ensemble.models import build_patient_model
from fundus_ensemble.models.losses import WeightedBinaryCrossentropy

for size in (96, 128):
    m = build_patient_model("efficientnet_b3", size, None, 0.5)
    m.compile(keras.optimizers.Adam(1e-3), WeightedBinaryCrossentropy([1.0] * 8), jit_compile=False)
    x = {
        "left_eye": np.random.rand(15, size, size, 3).astype("float32") * 255,
        "right_eye": np.random.rand(15, size, size, 3).astype("float32") * 255,
    }
    y = (np.random.rand(15, 8) > 0.7).astype("float32")
    t = time.time()
    m.train_on_batch(x, y)
    print(size, "trace", time.time() - t, flush=True)
    t = time.time()
    for _ in range(8):
        m.train_on_batch(x, y)
    dt = (time.time() - t) / 8
    print(size, "step", dt, "img/s", 30 / dt, flush=True)
    t = time.time()
    m.predict(x, verbose=0)
    print(size, "ptrace", time.time() - t)
    t = time.time()
    for _ in range(4):
        m.predict_on_batch(x)
    dt = (time.time() - t) / 4
    print(size, "pred img/s", 30 / dt, flush=True)
