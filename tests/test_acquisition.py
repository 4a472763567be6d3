"""The camera-shift protocol's shifts and the random acquisition shifts (data.acquisition)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fundus_ensemble.data import acquisition
from fundus_ensemble.data.synthetic import EyeSpec, render_eye

REPO = Path(__file__).resolve().parents[1]


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


def _run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *map(str, args)], capture_output=True, text=True, timeout=900
    )


def test_heads_learn_from_the_acquisition_copies_of_train_and_val_photos_only(small_dataset, tmp_path):
    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.data.preprocess import acquisition_copy_dir
    from fundus_ensemble.training import heads
    from fundus_ensemble.training.features import eye_features, preprocessing_settings

    prep, run = tmp_path / "prep", tmp_path / "run"
    train = ["--out", run, "--backbone", "efficientnet_lite0", "--weights", "imagenet", "--head-fit", "cross-fit"]
    train += ["--folds", "3", "--fine-tune-epochs", "0", "--acquisition-copies", "1"]
    done = _run("preprocess.py", small_dataset, "--out", prep, "--size", "48", "--workers", "1")
    assert done.returncode == 0, done.stderr[-1500:]
    refused = _run("train_pair.py", prep, *train)
    assert refused.returncode == 2 and "--acquisition-copies 1 and the same --out first" in refused.stderr, (
        refused.stderr[-1500:]
    )
    done = _run(
        "preprocess.py", small_dataset, "--out", prep, "--size", "48", "--workers", "1", "--acquisition-copies", "1"
    )
    assert done.returncode == 0 and "acquisition copy:" in done.stdout, done.stderr[-1500:]
    manifest = load_manifest(prep / "color" / "manifest.csv")
    copy_dir = acquisition_copy_dir(prep, 0)
    copies = load_manifest(copy_dir / "color" / "manifest.csv")
    development = [p.patient_id for p in manifest.patients if p.split in ("train", "val")]
    assert copies.patient_ids == development, "a copy of every train and val patient, and of no test patient"
    recorded = json.loads((copy_dir / "preprocess.json").read_text())["settings"]
    assert recorded["acquisition"]["copy"] == 0
    # one feature entry holds photos and copies: the copy's shift is in its bytes, not in the entry's provenance
    assert preprocessing_settings(copy_dir / "color") == preprocessing_settings(prep / "color")
    shifted = sum(
        (copy_dir / "color" / p.left_image).read_bytes() != (prep / "color" / p.left_image).read_bytes()
        for p in copies.patients
        if p.left_image
    )
    assert shifted >= len(development) // 2, "most copies differ from their photo"

    done = _run("train_pair.py", prep, *train)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stale" not in done.stdout + done.stderr, "photos and copies took turns replacing one feature entry"
    card = json.loads((run / "color" / "card.json").read_text())
    assert card["head"]["acquisition_copies"] == 1
    # the heads are cross_fit's on the photos' features with the copies' features as augmented rows
    dev = manifest.with_patients([p for p in manifest.patients if p.split in ("train", "val")])

    def features(m, view_dir):
        return eye_features(
            None,
            m,
            48,
            8,
            prep / "features",
            "efficientnet_lite0",
            "imagenet",
            "color",
            preprocessing=preprocessing_settings(view_dir),
        )

    plain, copied = features(dev, prep / "color"), features(copies, copy_dir / "color")
    expected = heads.cross_fit(plain, dev.label_matrix(), folds=3, seed=0, augmented=(copied,))
    with np.load(run / "color" / "out_of_fold.npz") as oof:
        np.testing.assert_allclose(oof["probabilities"], expected.out_of_fold, atol=1e-6)


def test_shifted_copies_are_written_once_and_a_missing_eye_stays_missing(tmp_path):
    import cv2

    from fundus_ensemble.data.manifest import Patient
    from fundus_ensemble.errors import ImageError

    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a_l.png"), render_eye(EyeSpec(frozenset(), "left", 1), 64))
    patients = [Patient("a", "in/a_l.png", None, (1, 0, 0, 0, 0, 0, 0, 0), "test")]
    calls = []

    def darker(photo, name):
        calls.append(name)
        return photo // 2

    [copy] = acquisition.shifted_copies(patients, tmp_path, tmp_path / "out", darker)
    assert (copy.left_image, copy.right_image, copy.split, copy.labels) == (
        "photos/a_left.png",
        None,
        "train",
        patients[0].labels,
    )
    written = cv2.imread(str(tmp_path / "out" / copy.left_image))
    assert np.array_equal(written, cv2.imread(str(tmp_path / "in" / "a_l.png")) // 2) and calls == ["in/a_l.png"]
    acquisition.shifted_copies(patients, tmp_path, tmp_path / "out", darker)  # a measurement that goes on
    assert calls == ["in/a_l.png"], "a copy already written is kept, not made again"
    (tmp_path / "in" / "a_l.png").write_bytes(b"not a photo")
    with pytest.raises(ImageError, match="a_l.png: cannot be read"):
        acquisition.shifted_copies(patients, tmp_path, tmp_path / "elsewhere", darker)
