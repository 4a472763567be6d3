"""Export (issue 8, part 4): the gray view made in the graph equals OpenCV's, and the exported
model refuses what it cannot take. Parity of the exported files with the Keras ensemble after
training is in test_training.py (it needs the trained pair)."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_ensemble.data.imaging import crop_to_fov, decode_image, gray_eq_view
from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.errors import FundusError
from fundus_ensemble.labels import LABELS
from fundus_ensemble.models.views import EqualizedGray

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_photos():
    manifest = load_manifest(ROOT / "data_manifest.csv")
    return [
        decode_image(manifest.image_path(getattr(p, f"{eye}_image")))
        for p in manifest.patients
        for eye in ("left", "right")
    ]


@pytest.mark.parametrize("size", [64, 448])
def test_in_graph_equalization_equals_opencv_on_every_demo_photo(demo_photos, size):
    squares = [crop_to_fov(photo, size) for photo in demo_photos]
    got = np.asarray(EqualizedGray()(np.stack([cv2.cvtColor(s, cv2.COLOR_BGR2RGB) for s in squares])))
    want = np.stack([gray_eq_view(s) for s in squares]).astype(np.float32)
    assert len(squares) == 160 and got.shape == (160, size, size, 3)
    assert np.abs(got[..., 0] - want).max() <= 1.0, "more than one gray level from cv2.equalizeHist"
    assert (got[..., 0] == got[..., 2]).all()


def test_equalization_edge_cases_follow_opencv():
    rng = np.random.default_rng(0)
    flat = np.full((1, 16, 16, 3), 77, np.uint8)  # one level: OpenCV leaves it
    two = np.where(rng.random((1, 16, 16, 1)) < 0.3, 10, 200).astype(np.uint8).repeat(3, -1)
    noise = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)  # not square, several images at once
    for images in (flat, two, noise):
        got = np.asarray(EqualizedGray()(images))[..., 0]
        want = np.stack([cv2.equalizeHist(cv2.cvtColor(i, cv2.COLOR_RGB2GRAY)) for i in images])
        assert np.abs(got - want).max() <= 1.0


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from fundus_ensemble.models import build_patient_model

    run = tmp_path_factory.mktemp("pair")
    for seed, view in enumerate(("color", "gray_eq")):
        import keras

        keras.utils.set_random_seed(seed)
        (run / view).mkdir()
        build_patient_model("mobilenet", 32, None, 0.5).save(str(run / view / "model.keras"))
        (run / view / "card.json").write_text(json.dumps({"view": view, "labels": list(LABELS), "input_size": 32}))
    return run


def test_the_joint_model_is_the_average_of_the_view_models_on_their_views(tiny_pair, demo_photos):
    from fundus_ensemble.data.imaging import view_to_model_input
    from fundus_ensemble.evaluation.ensemble import load_view_model
    from fundus_ensemble.inference.export import build_ensemble_model

    model, info = build_ensemble_model(tiny_pair, {"color": 1.0, "gray_eq": 3.0})
    assert info["views"] == ["color", "gray_eq"] and info["input_size"] == 32
    left, right = (crop_to_fov(p, 32) for p in demo_photos[:2])
    joint = np.asarray(
        model.predict_on_batch(
            {
                "left_eye": cv2.cvtColor(left, cv2.COLOR_BGR2RGB)[None],
                "right_eye": cv2.cvtColor(right, cv2.COLOR_BGR2RGB)[None],
            }
        )
    )[0]
    expected = 0
    for view, weight in (("color", 0.25), ("gray_eq", 0.75)):
        made = {"color": lambda s: s, "gray_eq": gray_eq_view}[view]
        view_model, _ = load_view_model(tiny_pair, view)
        batch = {
            "left_eye": view_to_model_input(made(left))[None].astype(np.float32),
            "right_eye": view_to_model_input(made(right))[None].astype(np.float32),
        }
        expected = expected + weight * np.asarray(view_model.predict_on_batch(batch))[0]
    np.testing.assert_allclose(joint, expected, atol=1e-5)


def test_export_refuses_bad_requests(tiny_pair, tmp_path):
    from fundus_ensemble.inference.export import export_run, load_exported

    with pytest.raises(FundusError, match="unknown format"):
        export_run(tiny_pair, tmp_path / "m.onnx", "onnx")
    with pytest.raises(FundusError, match="quantize applies to tflite"):
        export_run(tiny_pair, tmp_path / "sm", "saved_model", "int8")
    import keras

    if keras.backend.backend() != "tensorflow":  # the formats are TensorFlow's: say so, write nothing
        with pytest.raises(FundusError, match="needs KERAS_BACKEND=tensorflow"):
            export_run(tiny_pair, tmp_path / "m.tflite", "tflite")
        assert not list(tmp_path.iterdir())
        return
    (tmp_path / "taken.tflite").write_bytes(b"x")
    with pytest.raises(FundusError, match="--force"):
        export_run(tiny_pair, tmp_path / "taken.tflite", "tflite")
    with pytest.raises(FundusError, match="neither a .tflite file nor a SavedModel"):
        load_exported(tmp_path)


def test_the_export_carries_the_thresholds_and_fingerprint_predict_uses(tiny_pair, tmp_path):
    import csv
    import shutil

    import keras

    from fundus_ensemble.evaluation.calibration import Calibration, ClassCalibration
    from fundus_ensemble.inference.export import export_run
    from fundus_ensemble.inference.predict import PatientPhotos, predict_photos

    if keras.backend.backend() != "tensorflow":
        pytest.skip("exports are TensorFlow formats")
    run = tmp_path / "run"
    shutil.copytree(tiny_pair, run)
    fitted = Calibration(tuple(ClassCalibration(1.2, 0.1 * k - 0.3, 0.3 + 0.05 * k) for k in range(len(LABELS))))
    (run / "calibration.json").write_text(
        json.dumps({"fitted_on": "out-of-fold", "flip_tta": False, "ensemble": fitted.to_dict()})
    )
    record = export_run(run, tmp_path / "pair.tflite")
    photo = tmp_path / "eye.png"
    cv2.imwrite(str(photo), cv2.imread(str(ROOT / load_manifest(ROOT / "data_manifest.csv").patients[0].left_image)))
    # as predict.py runs it: with the run's own calibration
    predict_photos(
        run, [PatientPhotos("a", photo, None)], tmp_path / "out", progress=False, calibration=run / "calibration.json"
    )
    predicted = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert record["cards_sha256"] == predicted["cards_sha256"], "one fingerprint names one model"
    rows = {r["class"]: float(r["threshold"]) for r in csv.DictReader(open(tmp_path / "out" / "decisions.csv"))}
    assert record["thresholds"] == pytest.approx(rows, abs=1e-12) and record["threshold_source"].startswith(
        "calibration.json"
    )
    assert len(set(record["thresholds"].values())) > 1, "the run's own thresholds, not 0.5 everywhere"
