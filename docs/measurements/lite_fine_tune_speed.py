"""Phase-2 training speed of the Lite2 patient model by how much of the backbone learns.

One in-memory batch of 15 random patients at 224 px, pretrained Lite2, BatchNorm frozen; the
first step (tracing) is timed apart, then four steps. Chose the budget's fine_tune_fraction
0.3 (19 of 128 weighted layers): about twice as many images per second as all layers.

    PYTHONPATH=. python docs/measurements/lite_fine_tune_speed.py
"""

import time

import numpy as np

from fundus_ensemble.cli import import_keras

keras = import_keras()
from fundus_ensemble.models import build_patient_model  # noqa: E402
from fundus_ensemble.models.losses import WeightedBinaryCrossentropy  # noqa: E402
from fundus_ensemble.training.train import unfreeze_top  # noqa: E402

SIZE, BATCH, STEPS = 224, 15, 4
rng = np.random.default_rng(0)
x = {name: rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype("float32") for name in ("left_eye", "right_eye")}
y = (rng.uniform(size=(BATCH, 8)) > 0.7).astype("float32")
for fraction in (0.3, 1.0):
    model = build_patient_model("efficientnet_lite2", SIZE, "imagenet")
    learning = unfreeze_top(model.get_layer("eye_encoder"), fraction, freeze_batchnorm=True)
    model.compile(keras.optimizers.Adam(1e-4), WeightedBinaryCrossentropy([1.0] * 8))
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(STEPS):
        model.train_on_batch(x, y)
    print(
        f"fine_tune_fraction {fraction} ({learning}): {STEPS * BATCH * 2 / (time.perf_counter() - start):.1f} "
        f"images/s, first step {first:.0f} s",
        flush=True,
    )
