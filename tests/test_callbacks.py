import keras
import numpy as np
import pytest

from fundus_ensemble.data.batches import PatientBatches
from fundus_ensemble.labels import INPUT_NAMES
from fundus_ensemble.training.callbacks import RecalibrateBatchNorm

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend


def bn_probe():
    inputs = {name: keras.Input((48, 48, 3), name=name) for name in INPUT_NAMES}
    stacked = keras.layers.Concatenate(axis=0)([inputs[name] for name in INPUT_NAMES])
    norm = keras.layers.BatchNormalization()
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(norm(stacked))), norm


def test_recalibration_sets_the_exact_average_of_batch_statistics(view_manifest):
    batches = PatientBatches(view_manifest, 48, 8)  # 24 patients: 3 batches
    model, norm = bn_probe()
    callback = RecalibrateBatchNorm(batches, patients=16)  # the first 2 batches
    callback.set_model(model)
    callback.on_epoch_end(0, {})
    stacked = [np.concatenate([batches[i][0][n] for n in INPUT_NAMES]) for i in range(2)]
    expected_mean = np.mean([s.mean(axis=(0, 1, 2)) for s in stacked], axis=0)
    expected_var = np.mean([s.var(axis=(0, 1, 2)) for s in stacked], axis=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.moving_mean), expected_mean, rtol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.moving_variance), expected_var, rtol=1e-3)
    assert norm.momentum == 0.99, "the layer's own momentum is restored"


def test_frozen_layers_are_left_alone(view_manifest):
    model, norm = bn_probe()
    norm.trainable = False
    callback = RecalibrateBatchNorm(PatientBatches(view_manifest, 48, 8))
    callback.set_model(model)
    callback.on_epoch_end(0, {})
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(norm.moving_mean), np.zeros(3))
