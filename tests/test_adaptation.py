"""Another camera without labels (training.adaptation, inference.site.adapt_site): the site's
alignment is fitted on its own normal-looking photos, folds exactly into the heads, is refused by
another model, and the unlike-photo warning flags about 1 % of held-back training photos."""

import json

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
        camera = site * 1.6 + 2.0  # another camera moves every feature
        truth = head.predict(site)[:, 0]
        moved = head.predict(camera)[:, 0]
        assert moved[~sick].mean() < truth[~sick].mean() - 0.3, "the camera makes the healthy look sick"
        aligned = head.predict(adaptation.fit_alignment(camera, reference, head).apply(camera))[:, 0]
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


@pytest.mark.backend
def test_adapt_site_writes_a_site_file_for_this_model_that_predict_applies_and_another_refuses(
    released, small_dataset, tmp_path, monkeypatch
):
    import csv

    import cv2

    from fundus_ensemble.data.acquisition import gain
    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.inference.predict import PatientPhotos, Predictor, predict_photos
    from fundus_ensemble.inference.site import adapt_site
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
