"""Training over several processes (one per host, or per GPU), data-parallel, on JAX's
multi-controller model as Keras drives it (``keras.distribution``).

Every process runs the same command with its own process id. ``jax.distributed`` connects them
through a coordinator (process 0's address); the model's weights are then one array replicated
over every device of every process, each process makes ``batch_size / processes`` rows of
every global batch (:meth:`..data.batches._FixedShapeBatches.shard`), and the compiled training
step all-reduces the gradients, so every process takes the same step single-process training
takes on the same global batch. BatchNorm, in the step and in the epoch-end recalibration,
sees the global batch. Validation predicts each process's share and gathers the whole, so
every process computes the same score and takes the same decisions (learning rate, early
stop, best checkpoint). Process 0 alone writes (checkpoints, history, features, the model and
its card); every process reads (resume, the best checkpoint), after a barrier.

On CPUs the processes exchange data over Gloo (TCP); on GPUs, NCCL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from dataclasses import dataclass

import keras
import numpy as np

from ..errors import FundusError

# Keras' own names for a multi-process job (keras.distribution.initialize reads them too)
ENV_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
ENV_COUNT = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ENV_INDEX = "KERAS_DISTRIBUTION_PROCESS_ID"
_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a model's compiled global forward pass


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands in a multi-process job; ``count`` 1 is a plain run."""

    count: int = 1
    index: int = 0
    coordinator: str | None = None
    heartbeat_timeout_s: int = 30  # a process silent this long ends the job (JAX's default is 100)

    def check(self) -> ProcessGroup:
        if self.count < 1:
            raise FundusError(f"--num-processes must be at least 1, got {self.count}")
        if self.count == 1:
            return self
        if not 0 <= self.index < self.count:
            raise FundusError(
                f"--process-id {self.index} is not one of 0..{self.count - 1} (--num-processes {self.count})"
            )
        if self.heartbeat_timeout_s < 1:
            raise FundusError(f"--heartbeat-timeout must be at least 1 second, got {self.heartbeat_timeout_s}")
        if not self.coordinator or ":" not in self.coordinator:
            raise FundusError(
                f"a run over {self.count} processes needs --coordinator HOST:PORT (process 0's address, "
                f"the same for every process; or {ENV_ADDRESSES})"
            )
        return self


def process_group(
    count: int | None = None,
    index: int | None = None,
    coordinator: str | None = None,
    heartbeat_timeout_s: int = ProcessGroup.heartbeat_timeout_s,
) -> ProcessGroup:
    """The job from the options, each missing one from Keras' environment variables."""

    def from_env(name: str) -> int | None:
        value = os.environ.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise FundusError(f"{name}={value!r} is not a whole number") from None

    count = count if count is not None else from_env(ENV_COUNT)
    index = index if index is not None else from_env(ENV_INDEX)
    coordinator = coordinator or os.environ.get(ENV_ADDRESSES)
    if coordinator and "," in coordinator:  # Keras' form: every process's address, process 0's first
        coordinator = coordinator.split(",")[0]
    return ProcessGroup(count or 1, index or 0, coordinator, heartbeat_timeout_s).check()


def initialize(group: ProcessGroup) -> None:
    """Join the job; before anything else touches the backend. A plain run changes nothing."""
    if group.count == 1:
        return
    backend = keras.backend.backend()
    if backend != "jax":
        raise FundusError(
            f"a run over several processes uses JAX (KERAS_BACKEND=jax), not {backend!r}; "
            "docs/backends.md shows the command"
        )
    import jax

    # Without it, XLA:CPU has no cross-process collectives; GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        # jax.distributed directly (what keras.distribution.initialize calls), for the heartbeat:
        # when a process dies, the others end after this long instead of waiting on it
        jax.distributed.initialize(
            group.coordinator, group.count, group.index, heartbeat_timeout_seconds=group.heartbeat_timeout_s
        )
    except RuntimeError as exc:
        raise FundusError(
            f"could not join the job at {group.coordinator} as process {group.index} of {group.count}: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from None


def process_count() -> int:
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def process_index() -> int:
    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


def is_chief() -> bool:
    """Whether this process writes the run's files: process 0, or the only one."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has come here (a no-op in a plain run)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def local_writes():
    """Around what process 0 alone does with the model (save its weights): Keras' saving makes
    throwaway variables, which under the job's distribution would be placed by a collective
    the other processes never join."""
    if process_count() == 1:
        yield
        return
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


def shard(batches) -> None:
    """Make ``batches`` (a ``_FixedShapeBatches``) produce this process's share of each batch."""
    count = process_count()
    if count > 1:
        try:
            batches.shard(process_index(), count)
        except ValueError:
            raise FundusError(
                f"--batch-size {batches.batch_size} does not split over {count} processes: each takes an "
                f"equal share; choose a multiple of {count}"
            ) from None


def to_global(data):
    """This process's rows of a batch as the global batch the model computes on (as is in a plain run)."""
    if process_count() == 1:
        return data
    import jax

    distribution = keras.distribution.distribution()
    return keras.tree.map_structure(
        lambda x: jax.make_array_from_process_local_data(
            distribution.get_data_layout((x.shape[0] * process_count(),) + x.shape[1:]).backend_layout, np.asarray(x)
        ),
        data,
    )


def predict(model: keras.Model, batches) -> np.ndarray:
    """``predict_batches`` of every process's share of ``batches`` (unshuffled), gathered: the
    same array of all items on every process. A plain run predicts as usual."""
    from ..data.batches import predict_batches

    if process_count() == 1:
        return predict_batches(model, batches)
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    shard(batches)
    forward = _FORWARD.get(model)
    if forward is None:  # compiled once per model, not once per epoch
        mesh = keras.distribution.distribution().device_mesh.backend_mesh
        forward = _FORWARD[model] = jax.jit(
            lambda trainable, other, x: model.stateless_call(trainable, other, x, training=False)[0],
            out_shardings=NamedSharding(mesh, PartitionSpec()),
        )  # replicated: every process gets it all
    trainable = [v.value for v in model.trainable_variables]
    other = [v.value for v in model.non_trainable_variables]
    outputs = []
    for index in range(len(batches)):
        inputs = batches[index][0]
        out = forward(trainable, other, to_global(inputs))
        if isinstance(out, dict):  # a model with a training-only eye head: the patient output is the one scored
            out = out["labels"]
        outputs.append(np.asarray(out, dtype=np.float64))
    return np.concatenate(outputs)[: batches.n_items]


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of the model's weights, as this process holds them."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def check_replicas_agree(model: keras.Model, label: str) -> str | None:
    """In a multi-process run, check every process holds the same weights; FundusError if not.
    Returns the digest (None in a plain run)."""
    count = process_count()
    if count == 1:
        return None
    from jax.experimental import multihost_utils

    digest = weights_digest(model)
    mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(count, -1)
    digests = [row.tobytes().hex() for row in every]
    print(
        f"{label} process {process_index()}/{count}: weights sha256 {digest[:16]}"
        f"{' (the same on every process)' if len(set(digests)) == 1 else ''}",
        flush=True,
    )
    if len(set(digests)) != 1:
        raise FundusError(
            f"{label} the processes' weights differ after training ({', '.join(d[:12] for d in digests)}): "
            "their updates were not the same"
        )
    return digest
