"""End to end on synthetic patients: preprocess, train both views, ensemble, score."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.data.synthetic import write_synthetic_dataset
from fundus_ensemble.errors import FundusError, ModelCardError
from fundus_ensemble.evaluation.calibration import Calibration
from fundus_ensemble.evaluation.ensemble import format_score_table, load_view_model, score_run
from fundus_ensemble.labels import LABELS
from fundus_ensemble.metrics import odir_score
from fundus_ensemble.training.train import TrainConfig, train_pair

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend

# A small backbone keeps this test to a couple of minutes on 2 CPU cores; the B3 patient model
# itself is covered in test_models.py, and every other line of the pipeline runs here.
# 48 px: ensemble AUC 0.730 against the class prior's 0.611 in 74 s alone; 64 px gave 0.737 in 112 s (2026-12-06)
CONFIG = TrainConfig(
    backbone="mobilenet", size=48, batch_size=16, epochs=4, fine_tune_epochs=1, seed=0, bn_recalibration_patients=48
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    manifest_path = write_synthetic_dataset(
        root / "data", 200, seed=11, diameter=90, fractions={"train": 0.6, "val": 0.2, "test": 0.2}
    )
    preprocess_manifest(load_manifest(manifest_path), root / "prep", size=CONFIG.size, progress=False)
    cards = train_pair(root / "prep", root / "run", CONFIG)
    report = score_run(root / "run", root / "prep", split="test")
    return root, cards, report


@pytest.mark.slow
def test_ensemble_beats_constant_prior(trained):
    root, _, report = trained
    prep = root / "prep" / "color" / "manifest.csv"
    manifest = load_manifest(prep)
    prior = manifest.select("train").label_matrix().mean(axis=0)
    test_labels = manifest.select("test").label_matrix()
    prior_auc = odir_score(test_labels, np.tile(prior, (len(test_labels), 1)))["auc"]
    ensemble_auc = report["ensemble"]["auc"]
    print(format_score_table(report), f"\nconstant class-prior pooled AUC {prior_auc:.4f}")
    # measured with 4 + 1 epochs at 48 px: 0.730 against the prior's 0.611 (at 64 px 0.737; 6 + 1 epochs gave 0.737 too)
    assert ensemble_auc > prior_auc + 0.05


@pytest.mark.slow
def test_outputs_cards_and_histories(trained):
    root, cards, report = trained
    for view in ("color", "gray_eq"):
        folder = root / "run" / view
        card = json.loads((folder / "card.json").read_text())
        assert card == cards[view]
        assert card["view"] == view and card["labels"] == list(LABELS) and card["input_size"] == CONFIG.size
        assert card["backbone"] == "mobilenet" and card["weights_init"] == "none" and card["seed"] == 0
        assert len(card["data_manifest_sha256"]) == 64 and card["source_manifest_sha256"]
        assert set(card["pos_weight"]) == set(LABELS) and "tensorflow" in card["versions"]
        with open(folder / "history.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1)), "each epoch exactly once, from 1"
        assert len(rows) == card["epochs_run"] and {"val_final_score", "val_loss", "loss", "phase", "wall_s"} <= set(
            rows[0]
        )
        assert {r["phase"] for r in rows} == {"train", "fine_tune"} and all(float(r["wall_s"]) > 0 for r in rows)
        assert card["train_wall_s"] > 0 and card["train_images_per_s"] > 0 and card["versions"]["fundus_ensemble"]
        assert (folder / "model.keras").is_file() and not (folder / "best.weights.h5").exists(), (
            "one copy of the best weights"
        )
        best = max(float(r["val_final_score"]) for r in rows)
        assert card["best_val"]["val_final_score"] == pytest.approx(best)
        assert any((folder / "tensorboard").rglob("events.out.tfevents.*"))
    with open(root / "run" / "score_test" / "predictions.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ID", *LABELS] and len(rows) - 1 == report["patients"]
    probs = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert ((probs >= 0) & (probs <= 1)).all()
    saved = json.loads((root / "run" / "score_test" / "score.json").read_text())
    assert set(saved["models"]) == {"color", "gray_eq"} and set(saved["ensemble"]) >= {
        "kappa",
        "f1",
        "auc",
        "final",
        "per_class",
    }


@pytest.mark.slow
def test_ensemble_is_the_mean_of_the_views(trained):
    root, _, report = trained
    from fundus_ensemble.evaluation.ensemble import predict_manifest_split

    probs = {}
    for view in ("color", "gray_eq"):
        model, card = load_view_model(root / "run", view)
        _, labels, probs[view] = predict_manifest_split(model, card, root / "prep" / view, "test")
    expected = odir_score(labels, (probs["color"] + probs["gray_eq"]) / 2)
    assert report["ensemble"]["final"] == pytest.approx(expected["final"], abs=1e-6)


@pytest.mark.slow
def test_existing_run_is_not_overwritten_and_cards_are_checked(trained):
    root, _, _ = trained
    with pytest.raises(FundusError, match="already holds a run.*--resume.*--force"):
        train_pair(root / "prep", root / "run", CONFIG)
    with pytest.raises(FundusError, match="already holds a score.*--force"):
        score_run(root / "run", root / "prep", split="test")
    card_path = root / "run" / "gray_eq" / "card.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "view": "color"}))
    try:
        with pytest.raises(ModelCardError, match="card says view 'color'"):
            load_view_model(root / "run", "gray_eq")
    finally:
        card_path.write_text(json.dumps(card))


@pytest.mark.slow
def test_views_of_another_size_are_refused(trained, tmp_path):
    root, _, _ = trained
    prep = tmp_path / "prep"
    shutil.copytree(root / "prep", prep)
    record = json.loads((prep / "preprocess.json").read_text())
    record["settings"]["size"] = 96
    (prep / "preprocess.json").write_text(json.dumps(record))
    with pytest.raises(ModelCardError, match=f"trained on {CONFIG.size} px views but .* holds 96 px views"):
        score_run(root / "run", prep, split="test", out_dir=tmp_path / "score")


@pytest.mark.slow
def test_card_with_other_labels_is_refused(trained):
    root, _, _ = trained
    card_path = root / "run" / "color" / "card.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "labels": ["N", "D"]}))
    try:
        with pytest.raises(ModelCardError, match="card labels"):
            load_view_model(root / "run", "color")
    finally:
        card_path.write_text(json.dumps(card))


def test_divergence_stops_without_a_model(view_manifest, tmp_path, monkeypatch):
    from fundus_ensemble.models.losses import WeightedBinaryCrossentropy
    from fundus_ensemble.training import train as training

    class NaNLoss(WeightedBinaryCrossentropy):
        def call(self, y_true, y_pred):
            return super().call(y_true, y_pred) * float("nan")

    monkeypatch.setattr(training, "WeightedBinaryCrossentropy", NaNLoss)
    prep = Path(view_manifest.source).parent.parent
    config = TrainConfig(
        backbone="mobilenet", size=48, batch_size=4, epochs=3, fine_tune_epochs=1, bn_recalibration_patients=0
    )
    with pytest.raises(FundusError, match="training diverged: non-finite loss"):
        training.train_view(prep / "color", tmp_path / "color", config, "color")
    assert not (tmp_path / "color" / "model.keras").exists()
    with open(tmp_path / "color" / "history.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 1, "TerminateOnNaN stops in the first epoch"


def test_score_table_shows_undefined_auc():
    scores = {
        "kappa": 0.1,
        "f1": 0.8,
        "auc": 0.7,
        "final": 0.533,
        "per_class": {
            c: {"auc": None if c == "H" else 0.7, "f1": 0.5, "positives": 0 if c == "H" else 3} for c in LABELS
        },
    }
    table = format_score_table({"split": "test", "patients": 9, "models": {"color": scores}, "ensemble": scores})
    assert "H=n/a(0)" in table and "ensemble" in table and "0.5330" in table


@pytest.mark.slow
def test_score_script_loads_the_models_in_a_fresh_process(trained, tmp_path):
    import subprocess
    import sys

    root, _, _ = trained
    script = Path(__file__).resolve().parents[1] / "scripts" / "score.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(root / "run"),
            str(root / "prep"),
            "--split",
            "val",
            "--out",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ODIR score on split 'val'" in result.stdout and "ensemble" in result.stdout
    assert json.loads((tmp_path / "s" / "score.json").read_text())["split"] == "val"


def read_predictions(path):
    rows = list(csv.reader(open(path)))
    return np.array([[float(v) for v in row[1:]] for row in rows[1:]])


@pytest.mark.slow
def test_calibrated_score_is_fitted_on_another_split_and_saved(trained, tmp_path):
    root, _, _ = trained
    with pytest.raises(FundusError, match="calibrating on the scored split 'test'"):
        score_run(root / "run", root / "prep", split="test", out_dir=tmp_path / "bad", calibrate_on="test")
    raw = score_run(root / "run", root / "prep", split="test", out_dir=tmp_path / "raw", flip_tta=True)
    calibrated = score_run(
        root / "run", root / "prep", split="test", out_dir=tmp_path / "cal", flip_tta=True, calibrate_on="val"
    )
    saved = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert saved["fitted_on"] == "val" and saved["flip_tta"] is True
    expected = Calibration.from_dict(saved["ensemble"]).apply(read_predictions(tmp_path / "raw" / "predictions.csv"))
    np.testing.assert_allclose(read_predictions(tmp_path / "cal" / "predictions.csv"), expected, atol=1e-4)
    assert calibrated["calibrated_on"] == "val" and raw["calibrated_on"] is None
    assert "calibrated on val" in format_score_table(calibrated)


@pytest.mark.slow
def test_score_shows_trivial_rows_and_writes_the_detail(trained):
    root, cards, report = trained
    assert set(report["trivial"]) == {"all-zero", "class prior (train)"}
    assert report["trivial"]["all-zero"]["auc"] == pytest.approx(0.5)
    # the class prior is the train split's rate (test_metrics checks the row itself tells the splits apart)
    manifest = load_manifest(root / "prep" / "color" / "manifest.csv")
    test_labels = manifest.select("test").label_matrix()

    def prior_of(split):
        rate = manifest.select(split).label_matrix().mean(axis=0)
        return odir_score(test_labels, np.tile(rate, (len(test_labels), 1)))

    row = report["trivial"]["class prior (train)"]
    assert (row["auc"], row["final"]) == pytest.approx((prior_of("train")["auc"], prior_of("train")["final"]))
    table = format_score_table(report)
    assert "all-zero" in table and "class prior (train)" in table
    saved = json.loads((root / "run" / "score_test" / "score.json").read_text())
    assert saved["trivial"]["class prior (train)"]["final"] == pytest.approx(
        report["trivial"]["class prior (train)"]["final"]
    )
    with open(root / "run" / "score_test" / "predictions_detail.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == report["patients"]
    assert {"ensemble_N", "color_N", "gray_eq_O", "label_M"} <= set(rows[0])


@pytest.mark.slow
def test_a_run_with_one_view_is_scored_as_that_model(trained, tmp_path):
    root, cards, report = trained
    shutil.copytree(root / "run" / "color", tmp_path / "run" / "color")
    single = score_run(tmp_path / "run", root / "prep", split="test")
    assert list(single["models"]) == ["color"]
    assert single["ensemble"]["final"] == pytest.approx(report["models"]["color"]["final"])


@pytest.mark.slow
def test_predict_on_raw_photos_equals_the_scored_predictions(trained, tmp_path):
    """New photos go through preprocessing's own crop and views: the same probabilities as score."""
    from fundus_ensemble.inference.predict import patients_in_manifest, predict_photos

    root, _, report = trained
    with open(root / "data" / "manifest.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        fields, test_rows = reader.fieldnames, [row for row in reader if row["split"] == "test"]
    with open(root / "data" / "test_only.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(test_rows)
    assert len(test_rows) == report["patients"]
    summary = predict_photos(
        root / "run", patients_in_manifest(root / "data" / "test_only.csv"), tmp_path / "pred", progress=False
    )
    assert summary["predicted"] == report["patients"]
    with open(tmp_path / "pred" / "predictions.csv") as handle:
        predicted = {r["ID"]: [float(r[c]) for c in LABELS] for r in csv.DictReader(handle)}
    with open(root / "run" / "score_test" / "predictions.csv") as handle:
        scored = {r["ID"]: [float(r[c]) for c in LABELS] for r in csv.DictReader(handle)}
    assert predicted.keys() == scored.keys()
    assert max(abs(a - b) for k in scored for a, b in zip(predicted[k], scored[k])) <= 2e-6


@pytest.mark.slow
def test_exported_models_match_the_keras_ensemble_on_the_demo_patients(trained, tmp_path):
    """One exported model per format: float32 within 1e-4 of predict's probabilities, float16 within 5e-2,
    float16 and int8 weights move the pooled validation AUC by at most 0.02."""
    import cv2

    from fundus_ensemble.data.imaging import crop_to_fov, decode_image
    from fundus_ensemble.inference.export import export_run, load_exported
    from fundus_ensemble.inference.predict import patients_in_manifest, predict_photos

    root, _, _ = trained
    demo = Path(__file__).resolve().parents[1] / "data_manifest.csv"
    manifest = load_manifest(demo)
    summary = predict_photos(root / "run", patients_in_manifest(demo), tmp_path / "keras", progress=False)
    assert summary["predicted"] == len(manifest)
    reference = read_predictions(tmp_path / "keras" / "predictions.csv")
    squares = [
        [
            cv2.cvtColor(
                crop_to_fov(decode_image(manifest.image_path(getattr(p, f"{eye}_image"))), CONFIG.size),
                cv2.COLOR_BGR2RGB,
            )
            for eye in ("left", "right")
        ]
        for p in manifest.patients
    ]
    val = [i for i, p in enumerate(manifest.patients) if p.split == "val"]
    labels = manifest.label_matrix()[val]
    keras_auc = odir_score(labels, reference[val])["auc"]
    results = {}
    for fmt, quantize, name in [
        ("saved_model", "none", "sm"),
        ("tflite", "none", "f32.tflite"),
        ("tflite", "float16", "f16.tflite"),
        ("tflite", "int8", "i8.tflite"),
    ]:
        record = export_run(root / "run", tmp_path / name, fmt, quantize)
        assert record["views"] == ["color", "gray_eq"] and (tmp_path / f"{name}.json").is_file()
        run = load_exported(tmp_path / name, threads=1)
        probs = np.array([run(left, right) for left, right in squares])
        results[(fmt, quantize)] = (float(np.abs(probs - reference).max()), odir_score(labels, probs[val])["auc"])
    print({k: (f"{d:.2e}", f"{a:.4f}") for k, (d, a) in results.items()}, "keras AUC", keras_auc)
    assert results[("saved_model", "none")][0] <= 1e-4
    assert results[("tflite", "none")][0] <= 1e-4
    # float16 weights move this from-scratch pair's probabilities by 5.6e-3 on one machine and 1.15e-2 on
    # another (the trained pair differs between machines); what a user needs is the ranking, as for int8
    assert results[("tflite", "float16")][0] <= 5e-2
    # int8 moved the pooled val AUC by 0.0029 on one machine's pair and 0.0141 on another's (a weaker pair,
    # AUC 0.615, on the demo's few val patients), so the bound is 0.02, not the 0.01 it once was
    assert abs(results[("tflite", "float16")][1] - keras_auc) <= 0.02
    assert abs(results[("tflite", "int8")][1] - keras_auc) <= 0.02
