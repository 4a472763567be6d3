"""Grad-CAM: the gradient is the model's, the maps are shaped and averaged right, and a trained
model's heatmap points where the synthetic generator planted the finding."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_ensemble.data.imaging import decode_image, find_fov, square_crop
from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.data.synthetic import EyeSpec, render_eye_with_regions, write_synthetic_dataset
from fundus_ensemble.errors import FundusError
from fundus_ensemble.inference.explain import GradCam, _gradients, ensemble_heatmaps
from fundus_ensemble.inference.predict import patients_in_folder, predict_photos
from fundus_ensemble.labels import LABELS, parse_classes
from fundus_ensemble.models import build_patient_model
from fundus_ensemble.training.train import TrainConfig, train_pair

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend


@pytest.fixture(scope="module")
def small_model():
    import keras

    keras.utils.set_random_seed(3)
    return build_patient_model("mobilenet", 64, None)


def images(n, seed):
    return np.random.default_rng(seed).uniform(0, 255, (n, 64, 64, 3)).astype(np.float32)


def test_gradients_match_finite_differences(small_model):
    """The backend's autodiff gives d logit / d feature map, checked against a numerical derivative."""
    from keras import ops

    cam = GradCam(small_model)
    shape = cam.feature_maps(images(2, 0)).shape
    # Random maps, not the untrained backbone's (about 1e-20 everywhere): with both eyes near 0
    # the eye fusion's max ties, where each backend splits the gradient its own way.
    rng = np.random.default_rng(0)
    left, right = rng.uniform(0, 1, shape).astype(np.float32), rng.uniform(0, 1, shape).astype(np.float32)
    c = 3
    grad_left, grad_right = _gradients(lambda a, b: ops.sum(cam.logits(a, b)[:, c]), left, right)
    assert grad_left.shape == left.shape and np.abs(grad_left).max() > 0

    def logit(a, b):
        return float(ops.convert_to_numpy(ops.sum(cam.logits(a, b)[:, c])))

    eps = 1e-2
    for i, y, x, k in [(0, 0, 0, 5), (1, 1, 0, 17), (0, 1, 1, 900)]:
        bumped = left.copy()
        bumped[i, y, x, k] += eps
        numeric = (logit(bumped, right) - logit(left, right)) / eps
        assert numeric == pytest.approx(float(grad_left[i, y, x, k]), rel=0.05, abs=1e-5)


def test_heatmaps_reproduce_the_model_and_share_a_one_eyed_patients_gradient(small_model):
    cam = GradCam(small_model)
    assert cam.layer_name == "conv_pw_13_relu"
    left, right = images(3, 2), images(3, 4)
    right[1] = left[1]  # patient 1 has one photo, fed as both eyes
    maps, probs = cam.heatmaps(left, right, [0, 4], same_eye=np.array([False, True, False]))
    assert maps.shape == (2, 3, 2, 2, 2) and (maps >= 0).all()
    np.testing.assert_allclose(probs, small_model.predict_on_batch({"left_eye": left, "right_eye": right}), atol=1e-5)
    np.testing.assert_allclose(maps[:, 1, 0], maps[:, 1, 1], atol=1e-6)


def test_ensemble_heatmaps_scale_each_view_then_average():
    a = np.zeros((1, 1, 2, 2, 2), np.float32)
    a[0, 0, 0, 0, 0] = 10.0  # hottest at the left eye's top-left
    b = np.ones((1, 1, 2, 2, 2), np.float32) * 0.001  # a view whose gradients are on another scale
    heat = ensemble_heatmaps({"color": a, "gray_eq": b}, 8)
    assert heat.shape == (1, 1, 2, 8, 8) and heat.max() <= 1.0 + 1e-6
    assert heat[0, 0, 0, 0, 0] == pytest.approx(1.0)  # 1 from both views after scaling
    assert heat[0, 0, 1].min() == pytest.approx(0.5)  # only the flat view adds to the right eye
    zero = ensemble_heatmaps({"color": np.zeros_like(a)}, 8)
    assert not np.isnan(zero).any() and zero.max() == 0


def test_explain_classes_are_checked():
    assert parse_classes(None) is None and parse_classes("") is None
    assert parse_classes("d, a,D") == ["D", "A"] and parse_classes("all") == list(LABELS)
    with pytest.raises(FundusError, match="unknown class"):
        parse_classes("D,X")


def test_a_model_that_is_not_a_patient_model_is_refused():
    import keras

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)])
    with pytest.raises(FundusError, match="patient model"):
        GradCam(model)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
@pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND") == "jax",
    reason="compared once, saved under TensorFlow (a JAX-saved model loads under TensorFlow: test_backends)",
)
def test_heatmaps_agree_across_backends(small_model, tmp_path):
    """A model saved under this backend gives the same heatmaps under JAX (a fresh process)."""
    path = tmp_path / "m.keras"
    small_model.save(path)
    left, right = images(2, 5), images(2, 6)
    np.save(tmp_path / "left.npy", left)
    np.save(tmp_path / "right.npy", right)
    maps, probs = GradCam(small_model).heatmaps(left, right, [1, 6])
    code = (
        "import sys, numpy as np, keras\nimport fundus_ensemble.models\n"
        "from fundus_ensemble.inference.explain import GradCam\n"
        "d = sys.argv[1]\n"
        "m = keras.saving.load_model(d + '/m.keras', compile=False)\n"
        "maps, probs = GradCam(m).heatmaps(np.load(d + '/left.npy'), np.load(d + '/right.npy'), [1, 6])\n"
        "np.save(d + '/maps.npy', maps); np.save(d + '/probs.npy', probs); print(keras.backend.backend())\n"
    )
    other = "jax" if os.environ.get("KERAS_BACKEND", "tensorflow") != "jax" else "tensorflow"
    env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith(other)
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), probs, atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "maps.npy"), maps, atol=1e-3 * max(1.0, float(maps.max())))


# --- localisation after training -------------------------------------------------------------
# The learning test's model works at 64 px, where the last convolutional block is 2 x 2: too
# coarse to localise anything. This one trains the colour model at 128 px (4 x 4 maps) on
# patients who have AMD (drusen around the macula) or nothing.
EXPLAIN_CONFIG = TrainConfig(
    backbone="mobilenet", size=128, batch_size=16, epochs=4, fine_tune_epochs=1, seed=0, bn_recalibration_patients=32
)
# measured: mean ratio 1.80 (per eye 1.44-2.46; README "Explain"); 1.0 would be no localisation at all
MIN_RATIO = 1.4


@pytest.fixture(scope="module")
def amd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    manifest = write_synthetic_dataset(
        root / "data",
        96,
        seed=5,
        diameter=150,
        prevalence={"A": 0.5},
        fractions={"train": 0.8, "val": 0.2, "test": 0.0},
    )
    preprocess_manifest(load_manifest(manifest), root / "prep", size=EXPLAIN_CONFIG.size, progress=False)
    train_pair(root / "prep", root / "run", EXPLAIN_CONFIG, views=("color",))
    return root


@pytest.mark.slow
def test_the_amd_heatmap_falls_on_the_planted_drusen(amd_run, tmp_path):
    photos, regions = tmp_path / "photos", {}
    photos.mkdir()
    for i in range(8):
        for eye in ("left", "right"):
            image, masks = render_eye_with_regions(EyeSpec(frozenset({"A"}), eye, 1000 + 2 * i + (eye == "right")), 150)
            path = photos / f"amd{i}_{eye}.png"
            cv2.imwrite(str(path), image)
            regions[f"amd{i}_{eye}"] = (path, masks["A"])
    summary = predict_photos(
        amd_run / "run",
        patients_in_folder(photos),
        tmp_path / "out",
        progress=False,
        explain=True,
        explain_classes=["A"],
    )
    assert summary["heatmaps"] == 16
    with open(tmp_path / "out" / "heatmaps" / "heatmaps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert np.mean([float(r["probability"]) for r in rows]) > 0.5, "the model did not learn AMD"
    ratios = []
    for row in rows:
        path, mask = regions[f"{row['patient_id']}_{row['eye']}"]
        heat = np.load(tmp_path / "out" / "heatmaps" / row["array"])
        box = find_fov(decode_image(path))
        region = square_crop(mask.astype(np.uint8) * 255, box, heat.shape[0]) > 127
        share = region.mean()
        ratios.append((heat[region].sum() / heat.sum()) / share)
    print("heat-in-region / region share per eye:", np.round(ratios, 2), "mean", np.mean(ratios))
    (tmp_path / "ratios.json").write_text(json.dumps(ratios))
    assert np.mean(ratios) >= MIN_RATIO
