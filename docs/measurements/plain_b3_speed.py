"""Training speed of plain keras.applications EfficientNetB3 at 128 px, batch 16, random data (model.fit)."""

import time

import keras
import numpy as np

size = 128
m = keras.applications.EfficientNetB3(
    weights=None, input_shape=(size, size, 3), classes=8, classifier_activation="sigmoid"
)
m.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", jit_compile=False)
x = np.random.rand(16 * 6, size, size, 3).astype("float32") * 255
y = (np.random.rand(16 * 6, 8) > 0.7).astype("float32")
t = time.time()
m.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
print("trace", time.time() - t, flush=True)
t = time.time()
m.fit(x, y, batch_size=16, epochs=1, verbose=0)
dt = time.time() - t
print("fit img/s", 96 / dt, flush=True)
t = time.time()
m.fit(x, y, batch_size=16, epochs=1, verbose=0)
dt = time.time() - t
print("fit img/s", 96 / dt, flush=True)
