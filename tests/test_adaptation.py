"""Another camera without labels (training.adaptation; the end-to-end adapt_site test is in test_bundle.py): the site's
alignment is fitted on its own normal-looking photos, folds exactly into the heads, is refused by
another model, and the unlike-photo warning flags about 1 % of held-back training photos."""

import numpy as np
import pytest

from fundus_ensemble.errors import FundusError
from fundus_ensemble.training import adaptation
from fundus_ensemble.training.heads import LinearHead, fuse


def _eyes(rng, n: int, sick_share: float, features: int = 12) -> tuple[np.ndarray, np.ndarray]:
    sick = rng.random(n) < sick_share
    x = rng.normal(size=(n, features))
    x[sick, 0] += 3.0  # the disease moves feature 0
    return x, sick


def _normal_head() -> LinearHead:
    """p(Normal) falls with feature 0; the other seven classes are constants."""
    weights = np.zeros((12, 8))
    weights[0, 0] = -2.0
    return LinearHead(weights, np.zeros(8))


def _reference(rng):
    train, _ = _eyes(rng, 2000, 0.3)
    head = _normal_head()
    return adaptation.fit_reference(train, head.predict(train)[:, 0], rng.integers(0, 5, len(train))), head, train


def test_the_alignment_takes_the_camera_from_the_sites_own_normal_looking_photos():
    rng = np.random.default_rng(0)
    reference, head, _ = _reference(rng)
    for sick_share in (0.3, 0.1):
        site, sick = _eyes(rng, 1000, sick_share)
        truth = head.predict(site)[:, 0]
        # another camera moves every feature (the default moves the mean; rescale also matches spreads)
        for camera, rescale in ((site + 2.0, False), (site * 1.6 + 2.0, True)):
            moved = head.predict(camera)[:, 0]
            assert moved[~sick].mean() < truth[~sick].mean() - 0.3, "the camera makes the healthy look sick"
            fitted = adaptation.fit_alignment(camera, reference, head, rescale=rescale)
            aligned = head.predict(fitted.apply(camera))[:, 0]
            assert abs(aligned[~sick].mean() - truth[~sick].mean()) < 0.1, (aligned[~sick].mean(), truth[~sick].mean())
            assert aligned[sick].mean() < 0.05, "the sick stay sick"


def test_the_alignment_folds_exactly_into_a_pair_head_and_a_one_eye_head():
    rng = np.random.default_rng(1)
    reference, head, _ = _reference(rng)
    site = rng.normal(size=(80, 12)) * 1.3 + 0.5
    alignment = adaptation.fit_alignment(site, reference, head)
    pair = LinearHead(rng.normal(size=(24, 8)), rng.normal(size=8))
    eyes = rng.normal(size=(10, 2, 12))
    aligned = alignment.apply(eyes.reshape(-1, 12)).reshape(eyes.shape)
    np.testing.assert_allclose(
        alignment.fold(pair, 2).predict(fuse(eyes, "max_mean")), pair.predict(fuse(aligned, "max_mean")), atol=1e-5
    )
    one = LinearHead(rng.normal(size=(12, 8)), rng.normal(size=8))
    np.testing.assert_allclose(alignment.fold(one).predict(site), one.predict(alignment.apply(site)), atol=1e-5)


def test_the_unlike_photo_warning_flags_about_one_in_a_hundred_training_photos_and_most_of_another_cameras():
    rng = np.random.default_rng(2)
    reference, _, _ = _reference(rng)
    fresh, _ = _eyes(rng, 4000, 0.3)
    rate = np.mean(reference.distance(fresh) > reference.warn_distance)
    assert 0.002 < rate < 0.03, rate
    assert np.mean(reference.distance(fresh * 1.8 + 1.5) > reference.warn_distance) > 0.5


def test_a_site_alignment_is_checked_where_it_is_read():
    rng = np.random.default_rng(3)
    reference, _, _ = _reference(rng)
    good = {"site_mean": [0.0] * 12, "site_spread": [1.0] * 12}
    adaptation.SiteAlignment.from_dict(good, reference, "s")
    for bad, words in (
        ({**good, "site_spread": [0.0] * 12}, "above 0"),
        ({**good, "site_mean": [float("nan")] * 12}, "finite"),
        ({**good, "site_mean": [0.0] * 11}, "11 features"),
        ({"site_mean": [0.0] * 12}, "not a site alignment"),
    ):
        with pytest.raises(FundusError, match=words):
            adaptation.SiteAlignment.from_dict(bad, reference, "s")
    with pytest.raises(FundusError, match="aligning needs"):
        adaptation.fit_alignment(rng.normal(size=(10, 12)), reference, _normal_head())
