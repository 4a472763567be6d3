"""The model in the box (inference.bundle): a release writes it, a load checks every file and
builds the run predict uses, a changed byte is refused, and the package's own bundle is intact."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.evaluation.calibration import load_calibration_file, load_eye_calibration, raw_thresholds
from fundus_ensemble.inference import bundle
from fundus_ensemble.labels import LABELS

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    """A script's module, loaded in this process (its main(argv) runs without a new interpreter)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_release_writes_a_checked_bundle_and_its_card(released, monkeypatch, tmp_path):
    root, out, work, record, _ = released
    assert set(record["files"]) >= {"color.npz", "gray_eq.npz", "calibration.json", "cards/color.json", "MODEL_CARD.md"}
    assert bundle.read_bundle(out)["patients"] == 24
    card = (out / "MODEL_CARD.md").read_text()
    for part in (
        "A screening aid, not a diagnosis",
        "Intended use",
        "Known failure modes",
        "## Rebuild",
        "python scripts/release_model.py (test)",
        "out of fold",
    ):
        assert part in card, part
    assert "float16 phone export" not in card, "measured for the combined Lite backbone only, not Lite0"
    for name in ("cards/color.json", "cards/gray_eq.json", "bundle.json", "MODEL_CARD.md"):
        assert str(root) not in (out / name).read_text(), f"{name}: no path of the machine that made it"
    # loaded, it predicts exactly as the run it came from
    monkeypatch.setenv(bundle.CACHE_VARIABLE, str(tmp_path / "cache"))
    run = bundle.resolve_run(out)
    from fundus_ensemble.data.batches import predict_patients
    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.evaluation.ensemble import load_view_model

    views = load_manifest(work / "prep" / "color" / "manifest.csv")
    for view in ("color", "gray_eq"):
        manifest = load_manifest(work / "prep" / view / "manifest.csv")
        original, _ = load_view_model(work / "run", view)
        rebuilt, card = load_view_model(run, view)
        np.testing.assert_allclose(
            predict_patients(rebuilt, manifest, 48), predict_patients(original, manifest, 48), atol=1e-5
        )
    assert (run / "calibration.json").read_bytes() == (work / "run" / "calibration.json").read_bytes()
    assert bundle.resolve_run(out) == run and len(views) == 24, "built once, then reused"


def test_a_changed_byte_is_refused_in_one_line_and_a_changed_cache_is_rebuilt(released, monkeypatch, tmp_path):
    import shutil

    _, out, _, _, _ = released
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    monkeypatch.setenv(bundle.CACHE_VARIABLE, str(tmp_path / "cache"))
    run = bundle.materialize(copy)
    card = run / "color" / "card.json"
    card.write_text(card.read_text().replace('"backbone"', '"backbone "'))  # someone edits the cached run
    again = bundle.materialize(copy)
    assert json.loads((again / "color" / "card.json").read_text()) == json.loads(
        (copy / "cards" / "color.json").read_text()
    )
    with np.load(copy / "color.npz") as data:
        arrays = dict(data)
    arrays["bias"] = arrays["bias"] + 1.0
    np.savez(copy / "color.npz", **arrays)
    with pytest.raises(bundle.BundleError, match=r"color\.npz was changed after the bundle was made") as info:
        bundle.materialize(copy)
    assert "\n" not in str(info.value)


def test_a_second_release_gives_the_same_weights_from_the_store_it_is_given(released, tmp_path):
    root, out, work, _, image_root = released
    assert not (work / "prep" / "features").exists(), "the release put its features beside its views, not in the store"
    entries = sorted((root / "store").rglob("features.npy"))
    assert len(entries) == 2, entries  # one entry per view
    before = {p: p.stat().st_mtime_ns for p in entries}
    second, other_work = tmp_path / "again", tmp_path / "work"
    bundle.release(
        root / "labels.csv",
        image_root,
        second,
        other_work,
        backbone="efficientnet_lite0",
        size=48,
        folds=3,
        image_dir="images",
        feature_store=root / "store",
    )
    # a fresh work folder, the same store: every photo's features read from it, none computed again
    assert {p: p.stat().st_mtime_ns for p in entries} == before
    assert not (other_work / "prep" / "features").exists()
    for view in ("color", "gray_eq"):
        with np.load(out / f"{view}.npz") as a, np.load(second / f"{view}.npz") as b:
            np.testing.assert_allclose(a["weights"], b["weights"], atol=1e-9)
            np.testing.assert_allclose(a["bias"], b["bias"], atol=1e-9)


def test_predict_answers_with_a_bundle_named_as_the_model(released, tmp_path):
    _, out, work, _, _ = released
    photos = sorted((work / "prep" / "color" / "images").glob("*.png"))[:2]
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "predict.py"),
            "--model",
            str(out),
            "--left",
            str(photos[0]),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, bundle.CACHE_VARIABLE: str(tmp_path / "c")},
    )
    assert done.returncode == 0, done.stderr[-1500:]
    assert "checked against its bundle.json" in done.stdout and (tmp_path / "out" / "decisions.csv").is_file()


def test_the_packaged_bundle_is_intact():
    if not (bundle.PACKAGED / "bundle.json").is_file():
        pytest.skip("no bundled model in this checkout")
    from fundus_ensemble.evaluation.benchmark import BUDGETS, DEFAULT_BUDGET

    record = bundle.read_bundle(bundle.PACKAGED)  # every file's SHA-256 as recorded
    recipe = BUDGETS[DEFAULT_BUDGET]  # the bundle is the recommended recipe, released
    assert (record["backbone"], record["input_size"]) == (recipe.backbone, recipe.size) and record["patients"] > 2000
    card = (bundle.PACKAGED / "MODEL_CARD.md").read_text()
    assert "it never saw" in card and "## The gradability gate" in card
    # measured for this model on the camera-shift protocol, and its failure modes count from that table
    assert "## Another camera" in card and "the section above); check the decisions" in card
    from fundus_ensemble.models.efficientnet_lite import COMBINED

    # its float16 export changed decisions (docs/export.md): the card says so where it applies
    assert ("float16 phone export of this recipe changes its decisions" in card) == (record["backbone"] in COMBINED)


def test_the_model_card_is_printed_by_predict_and_linked_and_served_by_the_station(released, tmp_path, monkeypatch):
    _, out, _, _, _ = released
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "predict.py"), "--model", str(out), "--model-card"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip() == (out / "MODEL_CARD.md").read_text().strip()

    from fastapi.testclient import TestClient

    from fundus_ensemble.inference.predict import Predictor
    from fundus_ensemble.serve.app import create_app

    monkeypatch.setenv(bundle.CACHE_VARIABLE, str(tmp_path / "cache"))
    client = TestClient(create_app(Predictor(bundle.resolve_run(out))))
    page = client.get("/").text
    assert 'class="model-card" href="/model-card"' in page and str(tmp_path) not in page
    served = client.get("/model-card.md")
    assert served.status_code == 200 and served.text == (out / "MODEL_CARD.md").read_text()
    shown = client.get("/model-card")  # a page a person reads, not Markdown source
    assert shown.headers["content-type"].startswith("text/html")
    assert "<h3>Intended use</h3>" in shown.text and "## Intended use" not in shown.text
    assert "<table>" in shown.text and "|---|" not in shown.text


def test_no_packaged_bundle_is_said_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(bundle, "PACKAGED", tmp_path / "bundled")
    with pytest.raises(bundle.BundleError, match="no model is bundled with this installation") as info:
        bundle.resolve_run(bundle.BUNDLE_NAME)
    assert "\n" not in str(info.value)


def test_predict_with_no_model_named_answers_with_the_packaged_bundle(small_dataset, tmp_path):
    if not (bundle.PACKAGED / "bundle.json").is_file():
        pytest.skip("no bundled model in this checkout")
    import csv
    import shutil

    from fundus_ensemble.evaluation.calibration import load_calibration_file, raw_thresholds

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("syn0000_left.jpg", "syn0000_right.jpg"):
        shutil.copyfile(small_dataset.parent / "images" / name, photos / name)
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "predict.py"), str(photos), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-1500:]
    assert "model: the bundled model (checked against its bundle.json)" in done.stdout
    with open(tmp_path / "out" / "decisions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = raw_thresholds(load_calibration_file(bundle.PACKAGED / "calibration.json")[0])
    assert [float(r["threshold"]) for r in rows] == pytest.approx(expected), "decided at the bundle's thresholds"


# A released run on another site's partly labelled table (here with test_bundle's release, built once per
# process): evaluate.py, calibrate_site.py, and predict.py taking the site's calibration.


def _partial_table(small_dataset: Path, out: Path, classes=("N", "D", "G", "C", "M")) -> dict:
    """The small dataset's patients as a partly labelled table: some classes only, every third cell
    of D empty, one patient with one eye."""
    manifest = load_manifest(small_dataset)
    truth = {}
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "left_image", "right_image", *classes])
        for i, p in enumerate(manifest.patients):
            cells = []
            for c in classes:
                value = str(p.labels[LABELS.index(c)])
                cells.append("" if c == "D" and i % 3 == 0 else value)
            truth[p.patient_id] = dict(zip(classes, cells))
            writer.writerow([p.patient_id, p.left_image, "" if i == 0 else p.right_image, *cells])
    return truth


def test_evaluate_and_calibrate_site_run_predict_and_predict_takes_the_site_calibration(
    released, small_dataset, tmp_path, capsys
):
    _, _, work, _, image_root = released
    run = work / "run"
    table = tmp_path / "site.csv"
    truth = _partial_table(small_dataset, table)
    script("evaluate").main([str(run), str(table), "--image-root", str(image_root), "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert set(result["classes"]) == {"N", "D", "G", "C", "M"} and result["final"] is None
    labelled_d = sum(v["D"] != "" for v in truth.values())
    assert result["classes"]["D"]["labelled"] == labelled_d < len(truth)
    assert "not defined" in printed
    run_thresholds = raw_thresholds(load_calibration_file(run / "calibration.json")[0])
    assert [result["classes"][c]["threshold"] for c in result["classes"]] == pytest.approx(
        [run_thresholds[LABELS.index(c)] for c in result["classes"]]
    )
    # the page: ROC curves with the points in use and the run's own operating points, whose rates are
    # recomputed here from predict's raw probabilities (a pair at the pair's thresholds, one eye at the eye's)
    page = (tmp_path / "eval" / "evaluation.html").read_text()
    assert "ROC curves and operating points" in page and page.count("data:image/png") == 1
    points = result["operating_points"]
    in_use = next(name for name in points if name.startswith("in use"))
    for c, s in result["classes"].items():
        assert points[in_use][c] == {"sensitivity": s["sensitivity"], "specificity": s["specificity"]}, c
    raw = tmp_path / "eval" / "raw_predictions"
    probs = {r["ID"]: r for r in csv.DictReader(open(raw / "predictions.csv", newline=""))}
    single = {
        r["patient_id"]
        for r in csv.DictReader(open(raw / "decisions.csv", newline=""))
        if r["answered_from"] not in ("", "both eyes")
    }
    assert single, "the table has a one-eyed patient"
    from fundus_ensemble.evaluation.calibration import load_operating_point

    for name in ("sensitivity=0.90", "specificity=0.90"):
        pair = raw_thresholds(load_operating_point(run / "calibration.json", name))
        eye = raw_thresholds(load_operating_point(run / "calibration.json", name, "eye_operating_points"))
        assert str(escape(f"the run's {name}")) in page  # as the page escapes it
        for c in result["classes"]:
            j = LABELS.index(c)
            cells = [
                (truth[p][c], float(probs[p][c]) > (eye if p in single else pair)[j])
                for p in probs
                if truth[p].get(c, "") != ""
            ]
            decided_positive = [d for t, d in cells if t == "1"]
            decided_negative = [not d for t, d in cells if t == "0"]
            rates = points[f"the run's {name}"][c]
            assert rates["sensitivity"] == (pytest.approx(np.mean(decided_positive)) if decided_positive else None)
            assert rates["specificity"] == (pytest.approx(np.mean(decided_negative)) if decided_negative else None)

    site = tmp_path / "site_calibration.json"
    script("calibrate_site").main(
        [str(run), str(table), "--image-root", str(image_root), "--out", str(site)]
        + ["--min-positives", "3", "--min-negatives", "3"]
    )
    printed = capsys.readouterr().out
    record = json.loads(site.read_text())
    fitted = [c for c, v in record["site"].items() if v["source"] == "site"]
    assert fitted and "kept the run's threshold" in printed
    assert all(record["site"][c]["source"] == "run" for c in ("A", "H", "O")), "unlabelled classes keep the run's"
    # before / after on the sample: recomputed from the sample's raw predictions at the run's and the site's thresholds
    raw = tmp_path / "site_calibration_sample" / "raw_predictions"
    probs = {r["ID"]: r for r in csv.DictReader(open(raw / "predictions.csv", newline=""))}
    pairs = {
        r["patient_id"]
        for r in csv.DictReader(open(raw / "decisions.csv", newline=""))
        if r["answered_from"] == "both eyes"
    }
    site_fit = raw_thresholds(load_calibration_file(site)[0])
    for c, r in record["sample_before_after"].items():
        cells = [(truth[p][c], float(probs[p][c])) for p in pairs if truth[p].get(c, "") != ""]
        positive = [q for t, q in cells if t == "1"]
        negative = [q for t, q in cells if t == "0"]
        for when, t in (("before", run_thresholds[LABELS.index(c)]), ("after", site_fit[LABELS.index(c)])):
            assert r[when]["sensitivity"] == pytest.approx(np.mean([q > t for q in positive])), (c, when)
            assert r[when]["specificity"] == pytest.approx(np.mean([q <= t for q in negative])), (c, when)
        if record["site"][c]["source"] == "run":
            assert r["before"] == r["after"], c
    moved = record["sample_before_after"]
    assert any(moved[c]["before"] != moved[c]["after"] for c in fitted), "a site threshold changed some decision"
    assert f"{fitted[0]} (" in printed and "sensitivity" in printed.split("optimistic")[1]
    script("predict").main(
        [str(run), str(table), "--image-root", str(image_root), "--out", str(tmp_path / "pred")]
        + ["--calibration", str(site)]
    )
    with open(tmp_path / "pred" / "decisions.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["status"] == "ok"]
    site_thresholds = raw_thresholds(load_calibration_file(site)[0])
    site_eye_thresholds = raw_thresholds(load_eye_calibration(site))
    kinds = {r["answered_from"] for r in rows}
    assert "both eyes" in kinds and kinds - {"both eyes"}, "the table has patients with one eye and with two"
    for c in LABELS:
        pair = [float(r["threshold"]) for r in rows if r["class"] == c and r["answered_from"] == "both eyes"]
        single = [float(r["threshold"]) for r in rows if r["class"] == c and r["answered_from"] != "both eyes"]
        assert pair and np.allclose(pair, site_thresholds[LABELS.index(c)], atol=1e-6), c
        assert single and np.allclose(single, site_eye_thresholds[LABELS.index(c)], atol=1e-6), c
    # a site calibration names the model it was fitted for: another model refuses it, here and in the export
    other = json.loads(site.read_text())
    other["run_fingerprint"] = {v: "0" * 64 for v in other["run_fingerprint"]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    from fundus_ensemble.errors import FundusError
    from fundus_ensemble.inference.export import export_thresholds
    from fundus_ensemble.inference.predict import Predictor

    with pytest.raises(FundusError, match="fitted for another model"):
        Predictor(run, calibration=tmp_path / "other.json", gate=False)
    with pytest.raises(FundusError, match="fitted for another model"):
        export_thresholds(run, tmp_path / "other.json")


def test_the_cards_rebuild_command_names_no_folder_of_the_machine():
    root = "/srv/data/odir5k"
    argv = [f"{root}/labels.csv", "--image-root", root + "/", "--out", "fundus_ensemble/bundled", "--benchmarks", "b 0"]
    command = bundle.rebuild_command(argv, root)
    assert command == (
        'python scripts/release_model.py "$DATA"/labels.csv --image-root "$DATA" --out fundus_ensemble/bundled '
        "--benchmarks 'b 0'"
    )
    assert "/srv" not in bundle.rebuild_command([f"{root}/images/x.csv"], root)
    assert bundle.rebuild_command(["/srv/data/odir5k-other/t.csv"], root) == (
        "python scripts/release_model.py /srv/data/odir5k-other/t.csv"
    ), "a sibling folder whose name starts like the data folder's is not inside it"


def _crafted(out, tmp_path, name: str, change) -> "Path":
    """A copy of the bundle with one file changed by ``change(path)`` and bundle.json re-signed to match:
    what a hostile or careless hand would make, past the SHA-256 check."""
    import shutil

    from fundus_ensemble.fileio import sha256_file

    copy = tmp_path / f"bundle-{name.replace('/', '_')}"
    shutil.copytree(out, copy)
    change(copy / name)
    if name == "bundle.json":
        return copy
    record = json.loads((copy / "bundle.json").read_text())
    if (copy / name).is_file() and name in record["files"]:
        record["files"][name] = sha256_file(copy / name)
    (copy / "bundle.json").write_text(json.dumps(record))
    return copy


def _npz(arrays_of):
    def change(path):
        with np.load(path) as data:
            arrays = dict(data)
        arrays = arrays_of(arrays)
        with open(path, "wb") as handle:  # np.savez appends .npz to a name without it
            np.savez(handle, **arrays)

    return change


def _huge_header(path):
    """A 1 kB .npz whose weights claim 10**9 floats (the data is not there)."""
    import io
    import zipfile

    from numpy.lib import format as npy

    buffer = io.BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": (125_000_000, 8)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights.npy", buffer.getvalue() + b"\0" * 64)
        archive.writestr("bias.npy", npy_bytes(np.zeros(8)))


def npy_bytes(a):
    import io

    buffer = io.BytesIO()
    np.save(buffer, a)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, change, words",
    [
        ("color.npz", _npz(lambda a: {**a, "weights": np.array([object()] * 8, dtype=object)}), "numbers only"),
        ("color.npz", _npz(lambda a: {**a, "bias": np.full_like(a["bias"], np.nan)}), "NaN or infinite"),
        ("color.npz", _npz(lambda a: {**a, "weights": a["weights"][:, :7]}), "expected"),
        ("color.npz", _huge_header, "refused unread"),
        ("gray_eq_eye.npz", _npz(lambda a: {**a, "bias": np.full_like(a["bias"], np.inf)}), "NaN or infinite"),
        ("side.npz", _npz(lambda a: {**a, "single": np.array(np.nan)}), "NaN or infinite"),
        ("side.npz", _npz(lambda a: {**a, "pair": np.array(-0.5)}), "thresholds must be"),
        ("color_reference.npz", _npz(lambda a: {**a, "scales": -a["scales"]}), "positive scales"),
        ("bundle.json", lambda p: p.write_text('{"a": ' * 100_000 + "1" + "}" * 100_000), "nested too deeply"),
        ("bundle.json", lambda p: p.write_bytes(b" " * 3_000_000), "refused unread"),
        ("bundle.json", lambda p: p.write_text(p.read_text().replace('"gray_eq"', '"/tmp/outside"')), "views"),
        ("bundle.json", lambda p: p.write_text(p.read_text().replace('"efficientnet_lite0"', '"lite9"')), "not one of"),
        ("extra.npz", lambda p: np.save(p.with_suffix(".npy"), np.zeros(3)), "not in bundle.json"),
    ],
)
def test_a_crafted_model_file_is_refused_in_one_line_naming_it_before_any_prediction(
    released, tmp_path, monkeypatch, name, change, words
):
    _, out, _, _, _ = released
    monkeypatch.setenv(bundle.CACHE_VARIABLE, str(tmp_path / "cache"))
    copy = _crafted(out, tmp_path, name, change)
    with pytest.raises(bundle.BundleError, match=words) as info:
        bundle.resolve_run(copy)
    message = str(info.value)
    assert "\n" not in message and str(copy) in message, message
    assert not any(p.name == "outside" for p in Path("/tmp").glob("outside*")), "nothing written outside the cache"
    made = list((tmp_path / "cache").glob("bundle-*")) if (tmp_path / "cache").exists() else []
    assert not [m for m in made if not m.name.startswith(".")], "no model was built from a broken bundle"


def test_predict_refuses_a_crafted_bundle_with_an_error_line_and_status_2(released, tmp_path):
    _, out, _, _, image_root = released
    copy = _crafted(out, tmp_path, "color.npz", _npz(lambda a: {**a, "bias": np.full_like(a["bias"], np.nan)}))
    photo = next(Path(image_root).rglob("*.jpg"))
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "predict.py"),
            "--model",
            str(copy),
            "--left",
            str(photo),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, bundle.CACHE_VARIABLE: str(tmp_path / "cache")},
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr[-800:]
    assert "color.npz" in done.stderr and not (tmp_path / "o" / "predictions.csv").exists()


# another camera, from the same released run (tests/test_adaptation.py has the alignment's own tests)
@pytest.mark.backend
def test_adapt_site_writes_a_site_file_for_this_model_that_predict_applies_and_another_refuses(
    released, small_dataset, tmp_path, monkeypatch
):
    import csv

    import cv2

    from fundus_ensemble.data.acquisition import gain
    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.errors import FundusError
    from fundus_ensemble.inference.predict import PatientPhotos, Predictor, predict_photos
    from fundus_ensemble.inference.site import adapt_site
    from fundus_ensemble.training import adaptation
    from fundus_ensemble.training.train import load_references

    _, _, work, _, _ = released
    run = work / "run"
    references = load_references(run, ("color", "gray_eq"))
    assert set(references) == {"color", "gray_eq"}, "a cross-fitted run keeps each view's feature reference"
    manifest = load_manifest(small_dataset)
    patients = []
    for q in manifest.patients:  # the site's camera: warmer and darker
        eyes = {}
        for eye in ("left", "right"):
            if getattr(q, f"{eye}_image"):
                path = tmp_path / "site" / f"{q.patient_id}_{eye}.png"
                path.parent.mkdir(exist_ok=True)
                cv2.imwrite(
                    str(path), gain(cv2.imread(str(manifest.image_path(getattr(q, f"{eye}_image")))), (0.6, 0.8, 1.0))
                )
                eyes[eye] = path
        patients.append(PatientPhotos(q.patient_id, eyes.get("left"), eyes.get("right")))
    monkeypatch.setattr(adaptation, "MIN_SITE_PHOTOS", 20)
    site = tmp_path / "site.json"
    record = adapt_site(run, patients, site, gate=False, progress=False)
    assert record["photos"] >= 40
    # the site's statistics are the site photos' own: the mean of its normal-looking colour photos
    predictor = Predictor(run, gate=False)
    features, _ = predictor.photo_features(patients)
    expected = adaptation.fit_alignment(features["color"], references["color"], predictor.eye_heads["color"])
    np.testing.assert_allclose(record["views"]["color"]["site_mean"], expected.site_mean, rtol=1e-5, atol=1e-6)
    assert not np.allclose(record["views"]["color"]["site_mean"], references["color"].normal_mean, atol=1e-3)
    summary = predict_photos(run, patients[:4], tmp_path / "with", progress=False, gate=False, site=site)
    plain = predict_photos(run, patients[:4], tmp_path / "without", progress=False, gate=False)
    assert summary["site"] == str(site) and plain["site"] is None
    with_site = list(csv.DictReader(open(tmp_path / "with" / "predictions.csv")))
    without = list(csv.DictReader(open(tmp_path / "without" / "predictions.csv")))
    assert with_site != without, "the alignment changes the answers"
    # the export folds the same alignment into each view's head
    from fundus_ensemble.inference.export import build_ensemble_model

    exported, info = build_ensemble_model(run, site=site)
    kernel, bias = exported.get_layer("color_model").get_layer("labels").get_weights()
    folded = Predictor(run, gate=False, site=site).heads["color"]
    np.testing.assert_allclose(kernel, folded.weights, atol=1e-5)
    np.testing.assert_allclose(bias, folded.bias, atol=1e-5)
    assert info["site"]["file"] == "site.json"
    other = json.loads(site.read_text())
    other["run_fingerprint"] = {"color": "0" * 64, "gray_eq": "0" * 64}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(FundusError, match="made for another model"):
        Predictor(run, gate=False, site=tmp_path / "other.json")


def test_the_cards_operating_points_are_fitted_out_of_fold_and_scored_on_test(tmp_path):
    """The card's operating-point rows: thresholds from the benchmark run's out-of-fold predictions
    (never its test patients'), sensitivity and specificity on its test patients."""
    import re

    from fundus_ensemble.evaluation.calibration import fit_operating_point, raw_thresholds
    from fundus_ensemble.inference.bundle import _operating_point_rows

    rng = np.random.default_rng(0)
    y_oof = (rng.random((300, len(LABELS))) < 0.3).astype(float)
    views = {}
    for v in ("color", "gray_eq"):
        (tmp_path / "models" / v).mkdir(parents=True)
        views[v] = np.clip(0.3 * y_oof + 0.7 * rng.random(y_oof.shape), 0.001, 0.999)
        np.savez(
            tmp_path / "models" / v / "out_of_fold.npz",
            patient_id=np.array([str(i) for i in range(300)]),
            labels=y_oof,
            probabilities=views[v],
        )
    y = (rng.random((120, len(LABELS))) < 0.3).astype(int)
    raw = np.clip(0.5 * y + 0.5 * rng.random(y.shape), 0.001, 0.999)  # the test patients rank otherwise
    lines = _operating_point_rows(tmp_path, {"models": ["color", "gray_eq"]}, y, raw)
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| class")]
    assert len(table) == len(LABELS)
    ensemble = (views["color"] + views["gray_eq"]) / 2
    for measure, first in (("sensitivity", 1), ("specificity", 4)):
        want = raw_thresholds(fit_operating_point(y_oof, ensemble, measure, 0.9))
        got = [float(row.split(" | ")[first]) for row in table]
        assert got == pytest.approx(want, abs=1e-3), measure
        for j, row in enumerate(table):
            sens = float(re.findall(r"([\d.]+)% \[", row)[0 if measure == "sensitivity" else 2]) / 100
            decided = raw[:, j] > want[j]
            assert sens == pytest.approx(decided[y[:, j] == 1].mean(), abs=0.001)
