"""Where and how the model computes: numeric precision, XLA compilation and data-parallel devices,
the same options on every Keras backend.

- precision: ``float32`` or Keras mixed precision (``mixed_float16``, ``mixed_bfloat16``):
  layers compute in 16 bits and keep float32 weights; the output layer stays float32 and
  Keras scales the loss for float16 (:meth:`keras.Model.compile` wraps the optimizer).
- XLA: JAX always compiles with XLA; TensorFlow does when ``jit_compile`` is on (``None``:
  on for a GPU, off on the CPU, where it was not faster; docs/results-history.md has the numbers).
- devices: one process driving N devices of one machine, data-parallel, with the global
  batch split across them: ``keras.distribution.DataParallel`` under JAX,
  ``tf.distribute.MirroredStrategy`` under TensorFlow. A run over several processes (hosts)
  uses every device of every process, under JAX (:mod:`.distributed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from ..errors import FundusError
from ..models.forward import accelerator_count
from .distributed import process_count

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise FundusError(f"unknown precision {name!r} (--precision); choose one of {', '.join(PRECISIONS)}")
    return name


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """Build models inside this block to compute in ``name``; the previous policy comes back after."""
    check_precision(name)
    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def cpu_backend_advice(backend: str, accelerators: int, backbone: str) -> str | None:
    """A note when JAX runs a depthwise-convolution backbone (EfficientNet, MobileNet) on a CPU:
    XLA's CPU code for those convolutions is far slower than TensorFlow's CPU kernels (predict
    with the Lite2 pair: 0.6 against 7.2 images/s, docs/backends.md). None otherwise."""
    if backend == "jax" and accelerators == 0 and backbone.startswith(("efficientnet", "mobilenet")):
        return (
            f"note: {backbone} under JAX on a CPU runs its depthwise convolutions more than 10 times slower than "
            "under TensorFlow (docs/backends.md); on a CPU, KERAS_BACKEND=tensorflow is the faster choice"
        )
    return None


def resolve_jit_compile(jit_compile: bool | None) -> bool:
    """The ``jit_compile`` for :meth:`keras.Model.compile` (see the module doc)."""
    if keras.backend.backend() == "jax":
        return True
    return accelerator_count() > 0 if jit_compile is None else bool(jit_compile)


def _device_names(count: int) -> list:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        found = jax.devices()
        hint = "XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N CPU devices"
    elif backend == "tensorflow":
        import tensorflow as tf

        found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        hint = "tf.config.set_logical_device_configuration splits a CPU into logical devices"
    else:
        raise FundusError(f"--devices > 1 is supported on the jax and tensorflow backends, not {backend!r}")
    if len(found) < count:
        raise FundusError(
            f"--devices {count}: the {backend} backend sees {len(found)} device(s) "
            f"({', '.join(str(getattr(d, 'name', d)) for d in found)}); {hint}"
        )
    return list(found[:count])


@contextlib.contextmanager
def data_parallel(devices: int, batch_size: int) -> Iterator[None]:
    """Build, compile and fit inside this block to train on ``devices`` devices, each taking
    ``batch_size / devices`` patients of every batch; ``devices`` 1 changes nothing."""
    if devices < 1:
        raise FundusError(f"--devices must be at least 1, got {devices}")
    if process_count() > 1:
        with _every_process(devices, batch_size):
            yield
        return
    if devices == 1:
        yield
        return
    if batch_size % devices:
        raise FundusError(
            f"--batch-size {batch_size} does not split over --devices {devices}: each device takes an "
            f"equal share; choose a multiple of {devices} (e.g. {batch_size + devices - batch_size % devices})"
        )
    found = _device_names(devices)
    if keras.backend.backend() == "jax":
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=found))
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)
    else:
        import tensorflow as tf

        with tf.distribute.MirroredStrategy([d.name for d in found]).scope():
            yield


@contextlib.contextmanager
def _every_process(devices: int, batch_size: int) -> Iterator[None]:
    """Data-parallel over every device of every process of a multi-process run (JAX)."""
    import jax

    found = jax.devices()
    if devices not in (1, len(found)):
        raise FundusError(
            f"--devices {devices}: a run over {process_count()} processes uses all their {len(found)} "
            "devices; leave --devices at 1"
        )
    if batch_size % len(found):
        raise FundusError(
            f"--batch-size {batch_size} does not split over the {len(found)} devices of {process_count()} "
            f"processes; choose a multiple of {len(found)}"
        )
    previous = keras.distribution.distribution()
    # each process makes its own rows of every batch (distributed.shard), so Keras must not shard again
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=found, auto_shard_dataset=False))
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


def synchronize_batch_norm(model: keras.Model, devices: int) -> None:
    """Under TensorFlow on several devices, make BatchNorm average its batch statistics over
    all of them, as one device sees the whole batch (JAX's data parallelism already computes
    on the global batch). Only the training copy is changed: the saved model is rebuilt."""
    if devices <= 1 or keras.backend.backend() != "tensorflow":
        return
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
