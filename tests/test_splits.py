import numpy as np
import pytest

from fundus_ensemble.data.splits import stratified_split
from fundus_ensemble.errors import FundusError

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def odir_like_labels(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.0, 0.34, 0.05, 0.06, 0.05, 0.03, 0.05, 0.27])
    labels = (rng.random((n, 8)) < prevalence).astype(int)
    labels[:, 0] = labels[:, 1:].sum(axis=1) == 0
    return labels


def test_every_patient_gets_exactly_one_split():
    labels = odir_like_labels()
    splits = stratified_split(labels, FRACTIONS, seed=1)
    assert splits.shape == (len(labels),)
    assert set(splits) == {"train", "val", "test"}


def test_sizes_and_label_balance_follow_fractions():
    labels = odir_like_labels()
    splits = stratified_split(labels, FRACTIONS, seed=1)
    for name, fraction in FRACTIONS.items():
        chosen = labels[splits == name]
        assert abs(len(chosen) - fraction * len(labels)) <= 0.02 * len(labels)
        # every class, the rare ones (H: ~30 positives) included, lands in proportion
        np.testing.assert_allclose(chosen.sum(axis=0), fraction * labels.sum(axis=0), atol=2.0)


def test_random_split_would_fail_the_balance_check():
    # guards the test above: an unstratified split misses the tolerance for some class
    labels = odir_like_labels()
    rng = np.random.default_rng(3)
    splits = rng.choice(["train", "val", "test"], size=len(labels), p=[0.6, 0.2, 0.2])
    errors = [np.abs(labels[splits == s].sum(0) - f * labels.sum(0)).max() for s, f in FRACTIONS.items()]
    assert max(errors) > 2.0


def test_seeded_and_seed_sensitive():
    labels = odir_like_labels(200)
    a = stratified_split(labels, FRACTIONS, seed=5)
    np.testing.assert_array_equal(a, stratified_split(labels, FRACTIONS, seed=5))
    assert (a != stratified_split(labels, FRACTIONS, seed=6)).any()


def test_zero_fraction_split_is_empty():
    splits = stratified_split(odir_like_labels(100), {"train": 0.8, "val": 0.2, "test": 0.0})
    assert "test" not in set(splits)


@pytest.mark.parametrize("fractions", [{"train": 0.5, "val": 0.2}, {"train": 1.2, "val": -0.2}, {"trn": 1.0}])
def test_bad_fractions(fractions):
    with pytest.raises(FundusError):
        stratified_split(odir_like_labels(10), fractions)
