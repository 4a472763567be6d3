"""The camera-shift protocol's shifts and the random acquisition shifts (data.acquisition)."""

import numpy as np

from fundus_ensemble.data import acquisition
from fundus_ensemble.data.synthetic import EyeSpec, render_eye


def _photo() -> np.ndarray:
    return render_eye(EyeSpec(frozenset({"D"}), "left", 0), 256)  # BGR, as OpenCV reads a photo


def _retina_pixels(a: np.ndarray) -> int:
    return int((a.max(axis=2) > 20).sum())


def test_each_shift_moves_the_photo_the_way_its_name_says():
    photo = _photo()
    shifted = {name: shift(photo) for name, shift in acquisition.SHIFTS.items()}
    np.testing.assert_array_equal(shifted["none"], photo)
    assert max(shifted["resampled to 224 px"].shape[:2]) == 224 and max(shifted["upsampled to 512 px"].shape[:2]) == 512
    h, w = photo.shape[:2]
    assert abs(shifted["resampled to 160 px"].shape[0] / shifted["resampled to 160 px"].shape[1] - h / w) < 0.02
    mean = {name: float(a.mean()) for name, a in shifted.items()}
    assert mean["gamma 0.7 (brighter mid-tones)"] > mean["none"] > mean["gamma 1.4 (darker mid-tones)"]
    assert mean["brightness x1.3"] > mean["none"] > mean["brightness x0.7"]
    red_over_blue = {name: float(a[..., 2].mean() / max(a[..., 0].mean(), 1e-6)) for name, a in shifted.items()}
    assert (
        red_over_blue["warm cast (R x1.15, B x0.8)"]
        > red_over_blue["none"]
        > red_over_blue["cool cast (R x0.85, B x1.2)"]
    )
    retina = {name: _retina_pixels(a) for name, a in shifted.items()}
    assert retina["retina smaller (75 % of the frame)"] < 0.7 * retina["none"]
    assert retina["retina larger (edges cut, 120 %)"] > retina["none"]
    sharpness = {name: float(np.var(np.diff(a.astype(float), axis=1))) for name, a in shifted.items()}
    assert sharpness["blurred (sigma 1.5)"] < 0.5 * sharpness["none"]
    assert not np.array_equal(shifted["JPEG quality 20"], photo)


def test_random_acquisition_is_repeatable_for_a_seed_and_varies_across_seeds():
    photo = _photo()
    a = acquisition.random_acquisition(photo, np.random.default_rng([0, 1]))
    b = acquisition.random_acquisition(photo, np.random.default_rng([0, 1]))
    np.testing.assert_array_equal(a, b)
    draws = [acquisition.random_acquisition(photo, np.random.default_rng([0, k])) for k in range(12)]
    assert all(d.dtype == np.uint8 and d.ndim == 3 and d.shape[2] == 3 for d in draws)
    assert len({d.tobytes() for d in draws}) == len(draws), "two seeds drew the same shifts"
    # with every family applied the photo changes; with none it is the photo
    assert not np.array_equal(acquisition.random_acquisition(photo, np.random.default_rng(3), p=1.0), photo)
    np.testing.assert_array_equal(acquisition.random_acquisition(photo, np.random.default_rng(3), p=0.0), photo)
