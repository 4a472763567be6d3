import math

import keras
import numpy as np
import pytest

from fundus_ensemble.errors import FundusError
from fundus_ensemble.models.losses import WeightedBinaryCrossentropy, positive_weights

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend


def test_loss_equals_hand_computation():
    y = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    p = np.array([[0.8, 0.3], [0.4, 0.9]], np.float32)
    w = [2.0, 3.0]
    # patient 1: class 0 positive (weight 2), class 1 negative; patient 2: class 0 negative, class 1 positive (weight 3)
    patient1 = (-2.0 * math.log(0.8) - math.log(1 - 0.3)) / 2
    patient2 = (-math.log(1 - 0.4) - 3.0 * math.log(0.9)) / 2
    loss = WeightedBinaryCrossentropy(w)(y, p)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx((patient1 + patient2) / 2, rel=1e-5)


def test_unit_weights_equal_keras_bce():
    rng = np.random.default_rng(0)
    y = (rng.random((6, 8)) < 0.3).astype(np.float32)
    p = rng.uniform(0.05, 0.95, (6, 8)).astype(np.float32)
    ours = keras.ops.convert_to_numpy(WeightedBinaryCrossentropy([1.0] * 8)(y, p))
    reference = keras.ops.convert_to_numpy(keras.losses.BinaryCrossentropy()(y, p))
    assert float(ours) == pytest.approx(float(reference), rel=1e-4)


def test_extreme_probabilities_stay_finite():
    loss = WeightedBinaryCrossentropy([5.0])(np.array([[1.0], [0.0]]), np.array([[0.0], [1.0]]))
    assert np.isfinite(keras.ops.convert_to_numpy(loss))


def test_positive_weights_formula():
    labels = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    # class 0: 1 positive, 3 negatives; class 1: no positives; class 2: no negatives
    np.testing.assert_allclose(positive_weights(labels, power=1.0), [3.0, 1.0, 1.0])
    np.testing.assert_allclose(positive_weights(labels, power=0.5), [math.sqrt(3.0), 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(positive_weights(labels, power=0.0), [1.0, 1.0, 1.0])
    with pytest.raises(FundusError):
        positive_weights(np.zeros((0, 8)))


def test_config_roundtrip():
    loss = WeightedBinaryCrossentropy([1.5, 2.5])
    again = WeightedBinaryCrossentropy.from_config(loss.get_config())
    assert again.pos_weight == [1.5, 2.5]


def test_asymmetric_loss_equals_hand_computation():
    from fundus_ensemble.models.losses import AsymmetricLoss

    y = np.array([[1.0, 0.0, 0.0]], np.float32)
    p = np.array([[0.7, 0.3, 0.04]], np.float32)
    # positive: (1-0.7)^1 * log(0.7); negative 0.3 shifted to 0.25: 0.25^4 * log(0.75); 0.04 is under the margin: 0
    expected = -(0.3 * math.log(0.7) + 0.25**4 * math.log(0.75) + 0.0) / 3
    loss = AsymmetricLoss(gamma_pos=1.0, gamma_neg=4.0, margin=0.05)(y, p)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(expected, rel=1e-5)


def test_asymmetric_loss_without_focusing_is_bce_and_roundtrips():
    from fundus_ensemble.models.losses import AsymmetricLoss

    rng = np.random.default_rng(1)
    y = (rng.random((5, 8)) < 0.3).astype(np.float32)
    p = rng.uniform(0.05, 0.95, (5, 8)).astype(np.float32)
    plain = AsymmetricLoss(gamma_pos=0.0, gamma_neg=0.0, margin=0.0)
    reference = keras.ops.convert_to_numpy(keras.losses.BinaryCrossentropy()(y, p))
    assert float(keras.ops.convert_to_numpy(plain(y, p))) == pytest.approx(float(reference), rel=1e-4)
    again = AsymmetricLoss.from_config(AsymmetricLoss(gamma_neg=2.0).get_config())
    assert (again.gamma_neg, again.margin) == (2.0, 0.05)
    with pytest.raises(FundusError, match="margin"):
        AsymmetricLoss(margin=1.5)
