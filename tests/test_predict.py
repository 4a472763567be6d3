"""Prediction on new photos: finding the patients, bad photos as rows, refusals (issue 8, part 1)."""

import csv
import json
import os
from pathlib import Path

import cv2
import pytest

from fundus_ensemble.data.synthetic import EyeSpec, render_eye
from fundus_ensemble.errors import FundusError
from fundus_ensemble.inference.predict import PatientPhotos, patients_in_folder, patients_in_manifest, predict_photos
from fundus_ensemble.labels import LABELS

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend


def photo(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), render_eye(EyeSpec(frozenset(), "left", seed), 90))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An untrained color-only run at 32 px: prediction's plumbing, not its accuracy."""
    from fundus_ensemble.models import build_patient_model

    run = tmp_path_factory.mktemp("run")
    (run / "color").mkdir()
    build_patient_model("mobilenet", 32, None, 0.5).save(str(run / "color" / "model.keras"))
    (run / "color" / "card.json").write_text(json.dumps({"view": "color", "labels": list(LABELS), "input_size": 32}))
    return run


def test_a_folder_is_paired_by_name_and_a_lone_photo_is_one_patient(tmp_path):
    for name in ("1_left.jpg", "1_right.jpg", "2_left.png", "solo.jpg", "notes.txt"):
        photo(tmp_path / name) if not name.endswith(".txt") else (tmp_path / name).write_text("x")
    # a photo whose name says no eye is not silently a left eye
    with pytest.raises(FundusError, match=r"solo\.jpg: its name says no eye"):
        patients_in_folder(tmp_path)
    patients = {p.patient_id: p for p in patients_in_folder(tmp_path, unnamed_eye="right")}
    assert set(patients) == {"1", "2", "solo"}
    assert patients["1"].left.name == "1_left.jpg" and patients["1"].right.name == "1_right.jpg"
    assert patients["2"].right is None and patients["solo"].right.name == "solo.jpg" and patients["solo"].left is None
    with pytest.raises(FundusError, match="named groups"):
        patients_in_folder(tmp_path, r"(?P<id>.+)")


def test_a_manifest_without_labels_is_enough(tmp_path):
    photo(tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text("patient_id,left_image,right_image\np1,a.jpg,\n")
    [patient] = patients_in_manifest(tmp_path / "m.csv")
    assert patient == PatientPhotos("p1", tmp_path / "a.jpg", None)
    (tmp_path / "bad.csv").write_text("patient_id,left_image,right_image\np1,../a.jpg,\n")
    with pytest.raises(FundusError, match=r"row 2, column 'left_image', value '../a.jpg'"):
        patients_in_manifest(tmp_path / "bad.csv")


def test_unusable_photos_become_rejected_rows_not_crashes(tiny_run, tmp_path):
    good = photo(tmp_path / "in" / "ok_left.jpg")
    (tmp_path / "in" / "broken_left.jpg").write_bytes(b"not a photo")
    patients = [
        PatientPhotos("ok", good, None),
        PatientPhotos("broken", tmp_path / "in" / "broken_left.jpg", None),
        PatientPhotos("half", good, tmp_path / "in" / "broken_left.jpg"),
    ]
    summary = predict_photos(tiny_run, patients, tmp_path / "out", progress=False)
    assert (summary["predicted"], summary["rejected"]) == (2, 1)
    rows = list(csv.DictReader(open(tmp_path / "out" / "decisions.csv")))
    broken = [r for r in rows if r["patient_id"] == "broken"]
    assert len(broken) == 1 and broken[0]["status"] == "rejected" and "not a readable image" in broken[0]["note"]
    half = [r for r in rows if r["patient_id"] == "half"]
    assert len(half) == 8 and half[0]["note"].startswith("right: ") and half[0]["color_right"] == ""
    ok = [r for r in rows if r["patient_id"] == "ok"]
    assert [r["class"] for r in ok] == list(LABELS)
    assert all(r["decision"] == str(int(float(r["probability"]) > 0.5)) for r in ok)
    predictions = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [r["ID"] for r in predictions] == ["ok", "half"]
    with pytest.raises(FundusError, match="--force"):
        predict_photos(tiny_run, patients, tmp_path / "out", progress=False)


def test_another_naming_with_pattern(tmp_path):
    photo(tmp_path / "left_3.jpg")
    photo(tmp_path / "right_3.jpg")
    [patient] = patients_in_folder(tmp_path, r"(?P<eye>left|right)_(?P<id>\d+)")
    assert patient.patient_id == "3" and patient.left.name == "left_3.jpg" and patient.right.name == "right_3.jpg"


def test_predict_script_one_patient_and_bad_usage(tiny_run, tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "predict.py"
    left = photo(tmp_path / "l.jpg", 1)
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_run), "--left", str(left), "--id", "x", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "1 of 1 patients predicted" in result.stdout and "images/s at 32 px" in result.stdout
    both = subprocess.run(
        [sys.executable, str(script), str(tiny_run), str(tmp_path), "--left", str(left), "--out", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert both.returncode == 2 and both.stderr.strip().splitlines() == [
        "error: give either INPUT (a folder or a manifest) or --left/--right, not both or neither"
    ]


def test_a_fitted_calibration_sets_the_thresholds(tiny_run, tmp_path):
    from fundus_ensemble.evaluation.calibration import Calibration, ClassCalibration

    cal = Calibration(tuple(ClassCalibration(slope=2.0, intercept=-1.0, threshold=0.3) for _ in LABELS))
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"fitted_on": "val", "flip_tta": False, "ensemble": cal.to_dict()}))
    good = photo(tmp_path / "in" / "a_left.jpg")
    predict_photos(tiny_run, [PatientPhotos("a", good, None)], tmp_path / "out", progress=False, calibration=path)
    rows = list(csv.DictReader(open(tmp_path / "out" / "decisions.csv")))
    [predicted] = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    for row in rows:
        threshold = float(row["threshold"])
        assert row["threshold_source"] == "calibration.json (fitted on val)"
        assert abs(cal.classes[0].apply(threshold) - 0.5) < 1e-5, (
            "the threshold (6 decimals) is where the calibrated value is 0.5"
        )
        assert row["decision"] == str(int(float(row["probability"]) > threshold))
        assert float(predicted[row["class"]]) == pytest.approx(
            float(cal.classes[0].apply(float(row["probability"]))), abs=2e-6
        )
    path.write_text(json.dumps({"fitted_on": "val", "flip_tta": True, "ensemble": cal.to_dict()}))
    with pytest.raises(FundusError, match="flip-TTA"):
        predict_photos(tiny_run, [PatientPhotos("a", good, None)], tmp_path / "o2", progress=False, calibration=path)


def test_a_run_that_learned_nothing_is_said_so_before_it_screens_anyone(tmp_path, capsys):
    from fundus_ensemble.inference.predict import Predictor
    from fundus_ensemble.models import build_patient_model

    run = tmp_path / "run"
    (run / "color").mkdir(parents=True)
    build_patient_model("mobilenet", 32, None, 0.5).save(str(run / "color" / "model.keras"))
    card = {"view": "color", "labels": list(LABELS), "input_size": 32, "image_blind": {"final": 0.54, "auc": 0.76}}

    def with_score(final: float, auc: float) -> str | None:
        card["best_val"] = {"epoch": 3, "val_final_score": final, "val_auc": auc}
        (run / "color" / "card.json").write_text(json.dumps(card))
        return Predictor(run).fitness_warning

    assert with_score(0.60, 0.85) is None
    assert with_score(0.53, 0.85).startswith("this run's models do not beat a predictor that never looks at a photo")
    assert "color (validation final 0.600, AUC 0.750; the image-blind prior's 0.540, 0.760)" in with_score(0.60, 0.75)
    good = photo(tmp_path / "in" / "a_left.jpg")
    predict_photos(run, [PatientPhotos("a", good, None)], tmp_path / "out", progress=False, report=True)
    assert "warning: this run's models do not beat" in capsys.readouterr().err
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.index('id="warning"') < page.index("patients predicted"), "the warning comes first on the page"


def _pair_of_photos(folder: Path) -> tuple[Path, Path]:
    left = folder / "p_left.png"
    right = folder / "p_right.png"
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(left), render_eye(EyeSpec(frozenset({"D"}), "left", 3), 90))
    cv2.imwrite(str(right), render_eye(EyeSpec(frozenset(), "right", 4), 90))
    return left, right


def _model_inputs(predictor, *photos):
    from fundus_ensemble.data.imaging import crop_to_fov, decode_image, view_to_model_input, views_of

    return [
        view_to_model_input(views_of(crop_to_fov(decode_image(p), predictor.size), ("color",))["color"]) for p in photos
    ]


def test_each_photo_goes_through_the_backbone_once_and_the_heads_are_the_models(tiny_run, tmp_path, monkeypatch):
    import numpy as np

    from fundus_ensemble.inference.predict import Predictor

    predictor = Predictor(tiny_run, gate=False)
    left, right = _pair_of_photos(tmp_path)
    encoder = predictor.encoders["color"]
    passed = []
    real = encoder.predict_on_batch
    # the rows of a call that are photos (models.forward pads a call with black images to one shape)
    monkeypatch.setattr(
        encoder,
        "predict_on_batch",
        lambda x: passed.append(int((np.abs(x).reshape(len(x), -1).max(1) > 0).sum())) or real(x),
    )
    patients = [PatientPhotos("pair", left, right), PatientPhotos("one", None, right)]
    results, _, read = predictor.predict_chunk(patients)
    assert read == 3 and sum(passed) == 3, f"3 photos, {sum(passed)} backbone passes"
    model = predictor.models["color"][0]
    a, b = _model_inputs(predictor, left, right)
    expected = model.predict_on_batch({"left_eye": np.stack([a, b]), "right_eye": np.stack([b, a])})
    pair = results[0][1]
    np.testing.assert_allclose(pair["ensemble"], expected[0], atol=1e-5)
    # a run without one-eye heads: each eye alone is the pair model with the photo in both slots
    alone = model.predict_on_batch({"left_eye": np.stack([a, b]), "right_eye": np.stack([a, b])})
    np.testing.assert_allclose(pair["eyes"]["color", "left"], alone[0], atol=1e-5)
    np.testing.assert_allclose(pair["eyes"]["color", "right"], alone[1], atol=1e-5)
    one = results[1][1]
    np.testing.assert_allclose(one["ensemble"], alone[1], atol=1e-5)
    assert (pair["answered_from"], one["answered_from"]) == ("both eyes", "right eye")


def _with_eye_head(tiny_run, tmp_path, bias: float):
    import shutil

    import numpy as np

    from fundus_ensemble.evaluation.calibration import Calibration, ClassCalibration

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    from fundus_ensemble.inference.predict import Predictor

    features = int(Predictor(tiny_run).encoders["color"].output.shape[-1])
    weights = np.zeros((features, len(LABELS)))
    weights[0] = 0.01
    np.savez(run / "color" / "eye_head.npz", weights=weights, bias=np.full(len(LABELS), bias), c=np.array(0.1))
    pair = Calibration(tuple(ClassCalibration(threshold=0.5) for _ in LABELS))
    eye = Calibration(tuple(ClassCalibration(threshold=0.3) for _ in LABELS))
    (run / "calibration.json").write_text(
        json.dumps({"fitted_on": "out-of-fold", "flip_tta": False, "ensemble": pair.to_dict(), "eye": eye.to_dict()})
    )
    return run


def test_a_photo_alone_is_answered_by_the_one_eye_head_at_its_own_thresholds(tiny_run, tmp_path):
    import numpy as np

    from fundus_ensemble.evaluation.calibration import load_eye_calibration, raw_thresholds
    from fundus_ensemble.inference.predict import Predictor, decide

    run = _with_eye_head(tiny_run, tmp_path, bias=-1.0)
    predictor = Predictor(run, calibration=run / "calibration.json", gate=False)
    left, right = _pair_of_photos(tmp_path / "photos")
    results, _, _ = predictor.predict_chunk([PatientPhotos("pair", left, right), PatientPhotos("one", left, None)])
    (_, pair, _), (_, one, note) = results
    features = predictor.encoders["color"].predict_on_batch(np.stack(_model_inputs(predictor, left)))
    eye = 1 / (1 + np.exp(-(features @ predictor.eye_heads["color"].weights + predictor.eye_heads["color"].bias)))
    np.testing.assert_allclose(one["ensemble"], eye[0], atol=1e-5)
    np.testing.assert_allclose(pair["eyes"]["color", "left"], eye[0], atol=1e-5)
    assert not np.allclose(pair["ensemble"], eye[0], atol=1e-3), "a pair stays with the pair heads"
    eye_thresholds = raw_thresholds(load_eye_calibration(run / "calibration.json"))
    assert one["thresholds"] == pytest.approx(eye_thresholds) and pair["thresholds"] == pytest.approx([0.5] * 8)
    # every class at 0.27 against the one-eye thresholds (0.3): nothing decided, and the line names the eye
    _, referral = decide(one, note, predictor.thresholds)
    assert referral.text.endswith("(left eye); the right eye was not screened"), referral.text


def test_the_side_check_reads_each_slot_with_a_head_that_looks_at_the_photo(tiny_run, tmp_path):
    import numpy as np

    from fundus_ensemble.inference.predict import Predictor
    from fundus_ensemble.training.heads import LinearHead, SideHead

    predictor = Predictor(tiny_run, gate=False)
    left, right = _pair_of_photos(tmp_path)
    f = predictor.encoders["color"].predict_on_batch(np.stack(_model_inputs(predictor, left, right)))
    direction = (f[1] - f[0]) / np.sum((f[1] - f[0]) ** 2)
    middle = float((f[0] + f[1]) @ direction / 2)
    # probability of a right eye: high for the right photo, low for the left one, from what each shows
    head = LinearHead(20 * direction[:, None], np.array([-20 * middle]))
    predictor.side = SideHead(head, single=0.9, pair=0.5, accuracy=1, caught_single=1, caught_pair=1, c=1)
    cases = {
        "placed": PatientPhotos("a", left, right),
        "swapped": PatientPhotos("b", right, left),
        "right photo as the left": PatientPhotos("c", right, None),
        "left photo as the right": PatientPhotos("d", None, left),
        "left alone": PatientPhotos("e", left, None),
    }
    results, _, _ = predictor.predict_chunk(list(cases.values()))
    checks = dict(zip(cases, (r["side_check"] for _, r, _ in results)))
    assert checks["placed"] is None and checks["left alone"] is None, checks
    assert checks["swapped"].startswith("the two photos look swapped"), checks
    assert checks["right photo as the left"].startswith("the left photo looks like a right eye"), checks
    assert checks["left photo as the right"].startswith("the right photo looks like a left eye"), checks


def test_a_folders_patients_come_in_the_order_people_read_ids(tmp_path):
    for pid in ("1258", "23", "992", "a10", "a9"):
        (tmp_path / f"{pid}_left.jpg").write_bytes(b"x")
    assert [p.patient_id for p in patients_in_folder(tmp_path)] == ["23", "992", "1258", "a9", "a10"]


@pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND") == "jax", reason="which networks are warmed is the same on any backend"
)
def test_warm_up_traces_every_network_a_patient_needs(tiny_run):
    from fundus_ensemble.inference.predict import Predictor

    for explain in (False, True):
        predictor = Predictor(tiny_run, explain=explain, gate=True)
        networks = [predictor.cams[v].image_maps if explain else predictor.encoders[v] for v in predictor.views]
        assert all(net.predict_function is None for net in networks)
        predictor.warm_up()
        networks.append(predictor._likeness._model())
        assert all(net.predict_function is not None for net in networks), explain
        assert predictor._likeness._head is not None, "the retina head is read at warm-up, not at the first patient"
