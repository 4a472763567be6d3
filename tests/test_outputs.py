"""Outputs that never destroy: a command replaces only what it made itself, for the same purpose,
atomically, and refuses anything else in one line; inputs it reads (a run, a calibration, photos)
are checked with one-line errors; exit codes and the console say what happened."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.data.synthetic import EyeSpec, render_eye
from fundus_ensemble.errors import FundusError
from fundus_ensemble.evaluation.calibration import Calibration, ClassCalibration, fit_calibration, load_calibration_file
from fundus_ensemble.fileio import OWNER_MARK, claim_folder, folder_lock, remove_owned
from fundus_ensemble.inference.predict import PatientPhotos, predict_photos
from fundus_ensemble.labels import LABEL_NAMES, LABELS

ROOT = Path(__file__).resolve().parents[1]
# file handling, not backend arithmetic: these run once, under TensorFlow (the JAX pass runs
# predict and score end to end in tests/test_backends.py)


def photo(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), render_eye(EyeSpec(frozenset(), "left", seed), 90))
    return path


def script(name: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def run_and_prep(small_dataset, tmp_path_factory):
    """An untrained color model at 32 px (a random head) and the small dataset's views at 32 px: the plumbing."""
    import keras

    from fundus_ensemble.models import build_patient_model

    root = tmp_path_factory.mktemp("outputs")
    preprocess_manifest(load_manifest(small_dataset), root / "prep", size=32, workers=1, progress=False)
    (root / "run" / "color").mkdir(parents=True)
    model = build_patient_model("mobilenet", 32, None, 0.5)
    head = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)][-1]
    rng = np.random.default_rng(5)  # an untrained head says 0.5 for everyone: give it opinions
    head.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in head.get_weights()])
    model.save(str(root / "run" / "color" / "model.keras"))
    (root / "run" / "color" / "card.json").write_text(
        json.dumps({"view": "color", "labels": list(LABELS), "input_size": 32})
    )
    return root


# --- folders the project owns, for one purpose each -------------------------------------------


def test_a_folder_made_for_one_purpose_is_never_claimed_or_deleted_for_another(tmp_path):
    claim_folder(tmp_path / "prep", "preprocessed views")
    (tmp_path / "prep" / "view.png").write_bytes(b"x")
    with pytest.raises(FundusError, match="holds preprocessed views, made by fundus-ensemble; a training run needs"):
        claim_folder(tmp_path / "prep", "a training run")
    with pytest.raises(FundusError, match="it holds preprocessed views, not a training run"):
        remove_owned(tmp_path / "prep", "a training run")
    assert (tmp_path / "prep" / "view.png").is_file()
    remove_owned(tmp_path / "prep", "preprocessed views")
    assert not (tmp_path / "prep").exists()


def test_train_pair_into_its_own_views_refuses_even_with_force(run_and_prep, tmp_path):
    import shutil

    from fundus_ensemble.training.train import TrainConfig, train_pair

    prep = tmp_path / "prep"
    shutil.copytree(run_and_prep / "prep", prep)
    before = sorted(p.relative_to(prep) for p in prep.rglob("*"))
    config = TrainConfig(backbone="mobilenet", size=32, epochs=1, fine_tune_epochs=0)
    for out in (prep, prep / "color"):
        with pytest.raises(FundusError, match="preprocessed views|the color views"):
            train_pair(prep, out, config, views=("color",), force=True)
    assert sorted(p.relative_to(prep) for p in prep.rglob("*")) == before, "a view file was deleted"


# --- score -------------------------------------------------------------------------------------


def test_score_never_writes_into_a_folder_of_the_users_files(run_and_prep, tmp_path):
    from fundus_ensemble.evaluation.ensemble import score_run

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "predictions.csv").write_text("my own work\n")
    for force in (False, True):
        with pytest.raises(FundusError, match="did not write"):
            score_run(run_and_prep / "run", run_and_prep / "prep", "test", out_dir=mine, force=force)
    assert (mine / "predictions.csv").read_text() == "my own work\n"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FundusError, match="is a file"):
        score_run(run_and_prep / "run", run_and_prep / "prep", "test", out_dir=tmp_path / "file.txt")
    result = script(
        "score.py",
        run_and_prep / "run",
        run_and_prep / "prep",
        "--out",
        tmp_path / "file.txt",
        env={"KERAS_BACKEND": "no-such-backend"},
    )  # refused before Keras starts
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'file.txt'} is a file; a score needs a folder"
    ]


def test_a_forced_score_leaves_no_calibration_of_the_earlier_one(run_and_prep, tmp_path):
    from fundus_ensemble.evaluation.ensemble import score_run

    out = tmp_path / "score"
    score_run(run_and_prep / "run", run_and_prep / "prep", "test", out_dir=out, calibrate_on="val")
    assert (out / "calibration.json").is_file()
    score_run(run_and_prep / "run", run_and_prep / "prep", "test", out_dir=out, force=True)
    assert not (out / "calibration.json").exists(), "an earlier run's calibration would pass for this score's"


# --- predict -------------------------------------------------------------------------------------


def test_a_forced_predict_leaves_no_page_or_heatmap_of_the_earlier_run(run_and_prep, tmp_path):
    first = [PatientPhotos("old", photo(tmp_path / "in" / "old_left.jpg"), None)]
    predict_photos(run_and_prep / "run", first, tmp_path / "out", progress=False, report=True, explain_classes=["D"])
    assert (tmp_path / "out" / "report.html").is_file() and any((tmp_path / "out" / "heatmaps").glob("old*"))
    second = [PatientPhotos("new", photo(tmp_path / "in" / "new_left.jpg", 1), None)]
    predict_photos(run_and_prep / "run", second, tmp_path / "out", progress=False, force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "decisions.csv",
        "predict.json",
        "predictions.csv",
        "worklist.csv",
    ]
    predict_photos(
        run_and_prep / "run", second, tmp_path / "out", progress=False, force=True, explain_classes=["G"], explain=True
    )
    assert {p.name.split("_")[0] for p in (tmp_path / "out" / "heatmaps").glob("*.png")} == {"new"}
    assert not list((tmp_path / "out").glob(".unfinished*")), "the staging folder was left behind"


def test_a_second_predict_into_a_folder_being_written_is_refused(run_and_prep, tmp_path):
    patients = [PatientPhotos("a", photo(tmp_path / "in" / "a_left.jpg"), None)]
    claim_folder(tmp_path / "out", "predictions")
    with folder_lock(tmp_path / "out", "predictions"):  # as another predict running there holds it
        with pytest.raises(FundusError, match="being written by another run"):
            predict_photos(run_and_prep / "run", patients, tmp_path / "out", progress=False, force=True)
    assert not (tmp_path / "out" / "predictions.csv").exists()
    predict_photos(run_and_prep / "run", patients, tmp_path / "out", progress=False)  # the lock went with its holder


def test_patients_whose_ids_collide_as_file_names_keep_their_own_heatmaps(run_and_prep, tmp_path):
    ids = ["a/b", "a_b", "..", "patient", "A B", "A_B", "x", "X"]
    patients = [PatientPhotos(pid, photo(tmp_path / "in" / f"{k}_left.jpg", k), None) for k, pid in enumerate(ids)]
    predict_photos(
        run_and_prep / "run", patients, tmp_path / "out", progress=False, explain=True, explain_classes=["D"]
    )
    with open(tmp_path / "out" / "heatmaps" / "heatmaps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["patient_id"] for r in rows] == ids
    names = [r["array"] for r in rows]
    assert len({n.lower() for n in names}) == len(ids), f"two patients share a heatmap file: {names}"
    arrays = [np.load(tmp_path / "out" / "heatmaps" / n) for n in names]
    # each patient's photo differs, so each file must hold its own patient's map
    for k, pid in enumerate(ids):
        alone = tmp_path / f"alone{k}"
        predict_photos(run_and_prep / "run", [patients[k]], alone, progress=False, explain=True, explain_classes=["D"])
        [row] = list(csv.DictReader(open(alone / "heatmaps" / "heatmaps.csv")))
        np.testing.assert_allclose(arrays[k], np.load(alone / "heatmaps" / row["array"]), atol=1e-6, err_msg=pid)
        assert row["array"] == names[k], f"{pid}: its file name depends on the other patients of the run"


def test_predict_fails_when_nothing_could_be_predicted_and_says_why(run_and_prep, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p1_left.jpg").write_bytes(b"not a photo")
    (tmp_path / "in" / "p2_left.jpg").write_bytes(b"")
    result = script("predict.py", run_and_prep / "run", tmp_path / "in", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: none of the 2 patients could be predicted")
    assert "rejected: p1: left:" in result.stdout and "rejected: p2: left:" in result.stdout
    photo(tmp_path / "half" / "h_left.jpg")
    (tmp_path / "half" / "h_right.jpg").write_bytes(b"broken")
    result = script("predict.py", run_and_prep / "run", tmp_path / "half", "--out", tmp_path / "out2")
    assert result.returncode == 0, result.stderr
    assert "1 of 1 patients predicted (1 from one eye: the other photo unusable), 0 rejected" in result.stdout
    assert "predicted from one eye: h: right:" in result.stdout


def test_predict_checks_paths_and_calibration_before_keras_starts(run_and_prep, tmp_path):
    # an unknown backend fails as soon as Keras is imported: these errors must come first
    env = {"KERAS_BACKEND": "no-such-backend"}
    result = script("predict.py", tmp_path / "nowhere", tmp_path, "--out", tmp_path / "o", env=env)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {tmp_path / 'nowhere'}: no such folder, so no trained view model; run scripts/train_pair.py first "
        "or give its run folder"
    )
    result = script("predict.py", run_and_prep / "run", tmp_path / "missing", "--out", tmp_path / "o", env=env)
    assert result.returncode == 2 and "no such folder or manifest" in result.stderr
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"ensemble": {"classes": [{"slope": 1, "intercept": 0, "threshold": 1.5}] * 8}}))
    result = script(
        "predict.py", run_and_prep / "run", tmp_path, "--out", tmp_path / "o", "--calibration", bad, env=env
    )
    assert result.returncode == 2 and "class N: 'threshold' is 1.5" in result.stderr
    result = script("predict.py", run_and_prep / "run", tmp_path, "--out", tmp_path / "o", env=env)
    assert "no-such-backend" in result.stderr, (
        "with good paths Keras does start (and here fails): the checks above came first"
    )


# --- models and calibrations a user or an attacker could have changed -----------------------------


@pytest.mark.parametrize("damage", ["truncated", "random", "lambda"])
def test_a_damaged_or_code_carrying_model_file_is_one_line(run_and_prep, tmp_path, damage):
    import shutil

    import keras

    from fundus_ensemble.errors import ModelCardError
    from fundus_ensemble.evaluation.ensemble import load_view_model

    run = tmp_path / "run"
    shutil.copytree(run_and_prep / "run", run)
    model_file = run / "color" / "model.keras"
    if damage == "truncated":
        model_file.write_bytes(model_file.read_bytes()[:5000])
    elif damage == "random":
        model_file.write_bytes(np.random.default_rng(0).bytes(20000))
    else:
        marker = tmp_path / "ran"
        payload = eval(
            f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]"
        )  # no closure: saved whole
        inputs = keras.Input((4,))
        keras.Model(inputs, keras.layers.Lambda(payload)(inputs)).save(str(model_file))
        marker.unlink()  # building the model ran it once; loading must not run it again
    with pytest.raises(ModelCardError, match=f"^{model_file}: cannot load this model file: ") as caught:
        load_view_model(run, "color")
    assert "\n" not in str(caught.value)
    if damage == "lambda":
        assert "safe mode" in str(caught.value) and not (tmp_path / "ran").exists()
    result = script("predict.py", run, "--left", photo(tmp_path / "p.jpg"), "--out", tmp_path / "o")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"threshold": float("nan")}, "'threshold' is nan; expected a finite number"),
        ({"threshold": 1.5}, "'threshold' is 1.5; expected a number in (0, 1)"),
        ({"threshold": 0.0}, "'threshold' is 0.0; expected a number in (0, 1)"),
        ({"threshold": None}, "'threshold' is missing"),
        ({"slope": "2"}, "'slope' is '2'; expected a finite number"),
        ({"slope": -0.5}, "'slope' is -0.5; it must be above 0"),
        ({"slope": True}, "'slope' is True; expected a finite number"),
        ({"bias": 1.0}, "unknown key(s) 'bias'"),
    ],
)
def test_a_tampered_calibration_is_refused_with_its_class_and_key(tmp_path, change, message):
    classes = [{"slope": 1.0, "intercept": 0.0, "threshold": 0.5} for _ in LABELS]
    classes[3].update(change)
    classes[3] = {k: v for k, v in classes[3].items() if v is not None}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"fitted_on": "val", "ensemble": {"classes": classes}}))
    with pytest.raises(FundusError) as caught:
        load_calibration_file(path)
    assert str(caught.value) == f"--calibration {path}, ensemble, class C: {message}" or message in str(caught.value)
    assert "class C:" in str(caught.value) and message in str(caught.value)


def test_a_reversed_fit_falls_back_to_the_raw_threshold_and_says_so():
    rng = np.random.default_rng(0)
    y = (rng.random((120, 8)) < 0.3).astype(int)
    p = np.clip(0.35 * y + 0.65 * rng.random(y.shape), 0.01, 0.99)
    p[:, 2] = 1 - p[:, 2]  # the model ranks class G the wrong way round on these patients
    with pytest.warns(UserWarning, match="class\\(es\\) G fitted a reversed slope"):
        fitted = fit_calibration(y, p)
    assert fitted.classes[2] == ClassCalibration(), "G keeps its raw probability and the threshold 0.5"
    assert all(c.slope > 0 and 0 < c.threshold < 1 for c in fitted.classes)
    again = Calibration.from_dict(json.loads(json.dumps(fitted.to_dict())))  # what predict reads back
    calibrated = again.apply(p)
    assert np.isfinite(calibrated).all()
    for j in range(8):  # every class's rule keeps its order: a higher probability is never decided lower
        order = np.argsort(p[:, j])
        assert np.all(np.diff(calibrated[order, j]) >= -1e-12), LABELS[j]


# --- export's target ------------------------------------------------------------------------------


def test_export_never_replaces_a_folder_or_file_it_did_not_make(tmp_path):
    from fundus_ensemble.inference.export import SAVED_MODEL_PURPOSE, check_export_target

    theirs = tmp_path / "served"
    theirs.mkdir()
    (theirs / "saved_model.pb").write_bytes(b"x")
    (theirs / "NOTES.txt").write_text("my notes")
    with pytest.raises(FundusError, match="did not export"):
        check_export_target(theirs, "saved_model", force=True)
    (tmp_path / "served.json").write_text(
        '{"path": "served", "format": "saved_model"}'
    )  # as an export made before markers
    with pytest.raises(FundusError, match="did not export"):  # its record is there, but so are the user's notes
        check_export_target(theirs, "saved_model", force=True)
    (theirs / "NOTES.txt").unlink()
    check_export_target(theirs, "saved_model", force=True)  # an old export of ours, nothing else inside: replaced
    (theirs / "NOTES.txt").write_text("my notes")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(FundusError, match="is a file; a SavedModel is a folder"):
        check_export_target(tmp_path / "model.bin", "saved_model", force=True)
    with pytest.raises(FundusError, match="is a folder; a TFLite model is a file"):
        check_export_target(theirs, "tflite", force=True)
    (tmp_path / "m.tflite.json").write_text('{"path": "m.tflite", "format": "tflite"}')
    with pytest.raises(FundusError, match=r"m.tflite.json exists; pass --force"):
        check_export_target(tmp_path / "m.tflite", "tflite", force=False)
    check_export_target(tmp_path / "m.tflite", "tflite", force=True)  # our own record: replaced with --force
    (tmp_path / "m.tflite.json").write_text("my own notes")
    with pytest.raises(FundusError, match="not the record of an export"):
        check_export_target(tmp_path / "m.tflite", "tflite", force=True)
    ours = tmp_path / "ours"
    claim_folder(ours, SAVED_MODEL_PURPOSE)
    (ours / "saved_model.pb").write_bytes(b"x")
    check_export_target(ours, "saved_model", force=True)
    assert (ours / OWNER_MARK).is_file()


# --- report ---------------------------------------------------------------------------------------


def test_report_script_never_replaces_a_file_without_force(run_and_prep, tmp_path):
    from fundus_ensemble.evaluation.ensemble import score_run

    score_run(run_and_prep / "run", run_and_prep / "prep", "test", out_dir=tmp_path / "score")
    page = tmp_path / "page.html"
    page.write_text("my page")
    result = script(
        "report.py",
        run_and_prep / "run",
        run_and_prep / "prep",
        "--score-dir",
        tmp_path / "score",
        "--out",
        page,
        env={"KERAS_BACKEND": "no-such-backend"},
    )
    assert result.returncode == 2 and "already exists; pass --force" in result.stderr
    assert page.read_text() == "my page"


# --- pages that tell the truth -------------------------------------------------------------------


class _Page:
    """Alt texts and table cells of a page, as a browser reads them (entities decoded once)."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        self.alts, self.cells = [], []
        page = self

        class Parser(HTMLParser):
            cell = None

            def handle_starttag(self, tag, attrs):
                if tag == "img":
                    page.alts.append(dict(attrs).get("alt"))
                if tag == "td":
                    self.cell = []

            def handle_data(self, data):
                if self.cell is not None:
                    self.cell.append(data)

            def handle_endtag(self, tag):
                if tag == "td" and self.cell is not None:
                    page.cells.append("".join(self.cell))
                    self.cell = None

        Parser(convert_charrefs=True).feed(text)


def test_the_prediction_page_names_its_model_and_shows_what_each_decision_compared(run_and_prep, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_and_prep / "run", run)
    card = json.loads((run / "color" / "card.json").read_text())
    card.update(
        backbone="mobilenet",
        weights_init=None,
        train_patients=17,
        data_manifest="prep/color/manifest.csv",
        best_val={"epoch": 4, "val_final_score": 0.6125},
    )
    (run / "color" / "card.json").write_text(json.dumps(card))
    pid = 'a<b&"c'
    patients = [PatientPhotos(pid, photo(tmp_path / "in" / "l.jpg"), photo(tmp_path / "in" / "r.jpg", 3))]
    predict_photos(run, patients, tmp_path / "out", progress=False, report=True, explain_classes=["D"])
    text = (tmp_path / "out" / "report.html").read_text()
    page = _Page(text)
    assert f"{pid} left eye" in page.alts and f"{pid} right D heatmap" in page.alts, page.alts  # escaped once
    assert pid not in text and "a&lt;b&amp;&#34;c" in text, "the patient id must be escaped where the page shows it"
    for part in (
        "mobilenet",
        "32 px",
        "none (from scratch)",
        "17 patients of",
        "prep/color/manifest.csv",
        "0.613 (epoch 4)",
        str(run),
        "A screening aid, not a diagnosis",
        "1 x 1 cells",
    ):
        assert part in text, part
    with open(tmp_path / "out" / "decisions.csv") as handle:
        rows = list(csv.DictReader(handle))
    names = {name: c for c, name in LABEL_NAMES.items()}  # a page a person reads names each class in full
    decided = [c for c in page.cells if c.split(" ")[0] in names and (" > " in c or " ≤ " in c)]
    assert len(decided) == len(LABELS)
    for cell, row in zip(decided, rows):
        name, p, sign, t = cell.replace(" ✓", "").split(" ")
        assert names[name] == row["class"]
        assert float(p) == pytest.approx(float(row["probability"]), abs=5e-4) and float(t) == pytest.approx(
            float(row["threshold"]), abs=5e-4
        )
        assert (sign == ">") == (row["decision"] == "1") == cell.endswith("✓")
        assert (float(p) > float(t)) == (sign == ">"), f"the shown numbers contradict the decision: {cell}"


def test_a_probability_is_shown_with_the_digits_that_tell_it_from_its_threshold():
    from fundus_ensemble.inference.report import probability_text

    assert probability_text(0.502, 0.5) == "0.502"
    assert probability_text(0.5004, 0.5) == "0.5004"
    assert probability_text(0.49999, 0.5) == "0.49999"
    assert probability_text(0.25, 0.5) == "0.250"


def test_heatmaps_are_drawn_inside_the_retina_only():
    from fundus_ensemble.data.imaging import BORDER_LEVEL
    from fundus_ensemble.inference.explain import overlay

    eye = render_eye(EyeSpec(frozenset(), "left", 0), 64)
    border = eye.max(axis=2) <= BORDER_LEVEL
    assert border.any() and (~border).any()
    drawn = overlay(eye, np.ones((2, 2), np.float32))
    assert (drawn[border] == eye[border]).all(), "heat painted on the black border"
    assert (drawn[~border] != eye[~border]).any()


def test_precision_recall_points_never_sit_at_zero_recall():
    from fundus_ensemble.inference.report import pr_points

    y = np.array([0, 1, 1, 0, 1, 0])
    p = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])  # the top-ranked patient is a negative
    recall, precision = pr_points(y, p)
    assert (recall > 0).all() and recall[-1] == pytest.approx(1 / 3) and precision[-1] == pytest.approx(0.5)


def test_score_files_carry_the_exact_probabilities_the_table_was_computed_from(run_and_prep, tmp_path):
    from fundus_ensemble.evaluation.ensemble import load_view_model, predict_manifest_split, score_run

    score_run(run_and_prep / "run", run_and_prep / "prep", "test", out_dir=tmp_path / "score")
    model, card = load_view_model(run_and_prep / "run", "color")
    ids, _, probs = predict_manifest_split(model, card, run_and_prep / "prep" / "color", "test")
    with open(tmp_path / "score" / "predictions_detail.csv") as handle:
        rows = list(csv.DictReader(handle))
    with open(tmp_path / "score" / "predictions.csv") as handle:
        submitted = list(csv.DictReader(handle))
    assert [r["ID"] for r in rows] == ids
    for k, (row, sub) in enumerate(zip(rows, submitted)):
        for j, c in enumerate(LABELS):  # one view: the ensemble is its probabilities, to the last bit
            assert float(row[f"ensemble_{c}"]) == probs[k, j] == float(sub[c])


def test_the_training_curves_mark_the_kept_checkpoint_and_a_visible_fine_tune_line(run_and_prep, tmp_path, monkeypatch):
    import shutil

    from fundus_ensemble.inference import report

    run = tmp_path / "run"
    shutil.copytree(run_and_prep / "run", run)
    card = json.loads((run / "color" / "card.json").read_text())
    (run / "color" / "card.json").write_text(json.dumps({**card, "best_val": {"epoch": 3, "val_final_score": 0.61}}))
    (run / "color" / "history.csv").write_text(
        "epoch,phase,loss,val_loss,val_final_score\n1,train,0.9,0.95,0.5\n"
        "2,train,0.8,0.9,0.55\n3,fine_tune,0.7,0.85,0.61\n4,fine_tune,0.6,0.9,0.58\n"
    )
    figures = []
    monkeypatch.setattr(report, "_figure_uri", lambda fig: figures.append(fig) or "data:image/png;base64,")
    report._history(run, ("color",))
    [fig] = figures
    scores = fig.axes[1]
    stars = [line for line in scores.lines if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [3] and list(stars[0].get_ydata()) == [0.61]
    starts = [line for line in fig.axes[0].lines if list(line.get_xdata()) == [2.5, 2.5]]
    assert starts and all(line.get_linestyle() != "-" and line.get_linewidth() >= 1 for line in starts)


def test_decision_changes_counts_cells_and_patients_across_the_threshold():
    from fundus_ensemble.inference.export import decision_changes

    reference = np.array([[0.49, 0.9, 0.1], [0.51, 0.2, 0.6], [0.3, 0.5, 0.3]])
    moved = np.array([[0.52, 0.8, 0.1], [0.49, 0.2, 0.6], [0.3, 0.5, 0.3]])  # two cells cross 0.5, one only moves
    assert decision_changes(reference, moved) == {
        "cells": 2,
        "of_cells": 9,
        "patients": 2,
        "of_patients": 3,
        "agreement": pytest.approx(7 / 9),
    }  # 0.5 is negative in both
    assert decision_changes(reference, reference)["cells"] == 0


def test_a_forced_saved_model_export_is_swapped_in_whole_and_checked_on_val(run_and_prep, tmp_path):
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the export formats are TensorFlow's")
    from fundus_ensemble.fileio import folder_owner
    from fundus_ensemble.inference.export import SAVED_MODEL_PURPOSE, check_export_on_split, export_run

    out = tmp_path / "exports" / "served"
    export_run(run_and_prep / "run", out, "saved_model")
    first = (out / "saved_model.pb").stat().st_mtime_ns
    assert folder_owner(out) == SAVED_MODEL_PURPOSE
    export_run(run_and_prep / "run", out, "saved_model", force=True)
    assert (out / "saved_model.pb").stat().st_mtime_ns != first, "the export was not replaced"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["served", "served.json"], (
        "a temporary folder was left"
    )
    export_run(run_and_prep / "run", tmp_path / "m.tflite", "tflite")
    check = check_export_on_split(run_and_prep / "run", tmp_path / "m.tflite", run_and_prep / "prep", "val")
    assert check["of_patients"] == sum(
        p.split == "val" for p in load_manifest(run_and_prep / "prep" / "color" / "manifest.csv").patients
    )
    assert check["max_abs_diff"] < 1e-4 and check["cells"] == 0


def test_the_screens_write_only_into_folders_of_their_own(tmp_path):
    from fundus_ensemble.evaluation.feature_screen import ScreenConfig, prepare
    from fundus_ensemble.training.config import TrainConfig
    from fundus_ensemble.training.levers import run_levers

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_bytes(b"a user's own file")
    with pytest.raises(FundusError, match="holds files fundus-ensemble did not write"):
        prepare(tmp_path / "labels.csv", tmp_path, mine, ScreenConfig())
    with pytest.raises(FundusError, match="holds files fundus-ensemble did not write"):
        run_levers(tmp_path / "prep", mine, TrainConfig(), ["library"])
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.docx"]


# messages a person reads, the same under any backend: run once, under TensorFlow
def test_one_phase_is_not_numbered(view_manifest, tmp_path, capsys):
    from fundus_ensemble.training.config import TrainConfig
    from fundus_ensemble.training.train import train_pair

    prep = Path(view_manifest.source).parent.parent
    config = TrainConfig(
        backbone="mobilenet", size=None, batch_size=4, epochs=1, fine_tune_epochs=0, bn_recalibration_patients=0
    )
    train_pair(prep, tmp_path / "run", config, ("color",))
    out = capsys.readouterr().out
    assert "phase" not in out and "[color] epoch 1/1:" in out


def test_imagenet_without_network_fails_clearly(monkeypatch, tmp_path):
    from fundus_ensemble.errors import WeightsError
    from fundus_ensemble.models import build_backbone

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached weights

    def no_network(*args, **kwargs):
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", no_network)
    with pytest.raises(WeightsError, match=r"ImageNet weights for EfficientNetB0.*--weights none.*--weights PATH"):
        build_backbone("efficientnet_b0", 64, "imagenet")
