"""Cross-fitted heads on frozen features (training.heads): out of fold, stratified, C chosen by
out-of-fold AUC, the bag inside the patient model; and a cross-fitted run end to end, whose
calibration is fitted on every train and val patient's out-of-fold prediction."""

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script

from fundus_ensemble.errors import FundusError
from fundus_ensemble.labels import LABELS
from fundus_ensemble.metrics import per_class_scores
from fundus_ensemble.training import heads

REPO = Path(__file__).resolve().parents[1]


def _mean_auc(y, p) -> float:
    return float(np.mean([v["auc"] for v in per_class_scores(y, p).values() if v["auc"] is not None]))


def test_out_of_fold_predictions_come_from_heads_that_never_saw_the_patient():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 2, 100)).astype(np.float32)  # noise: nothing to learn
    y = (rng.random((200, 8)) < 0.3).astype(int)
    fit = heads.cross_fit(features, y, folds=5, grid=(1000.0,), seed=0)  # barely regularised: it memorises
    seen = heads.fit_linear_head(heads.fuse(features), y, 1000.0).predict(heads.fuse(features))
    assert _mean_auc(y, seen) > 0.95, "in sample, the head memorises the noise"
    assert _mean_auc(y, fit.out_of_fold) < 0.62, "out of fold it cannot: each row is predicted by a head without it"
    for f, head in enumerate(fit.heads):
        held = fit.folds == f
        np.testing.assert_allclose(head.predict(heads.fuse(features[held])), fit.out_of_fold[held])


def _eyes_with_own_labels(rng, n=300, features=60):
    """Patients whose left eye alone carries a finding (shown in its features) and right eye is normal."""
    eye_y = np.zeros((n, 2, 8), int)
    sick = rng.random(n) < 0.5
    eye_y[sick, 0, 1] = 1  # D in the left eye only
    eye_y[:, :, 0] = (eye_y[:, :, 1:].sum(-1) == 0).astype(int)
    x = rng.normal(size=(n, 2, features)).astype(np.float32)
    x[:, :, 0] += 2.5 * eye_y[:, :, 1]
    return x, eye_y


def test_the_eye_head_answers_each_eye_with_its_own_labels_out_of_fold():
    rng = np.random.default_rng(5)
    x, eye_y = _eyes_with_own_labels(rng)
    folds = heads.patient_folds(len(x), 5, 0)
    fit = heads.cross_fit_eyes(x, eye_y, folds, grid=(0.1,), seed=0)
    assert fit.mask.all()
    # the healthy right eye of a patient whose left eye is sick: Normal, not the patient's D
    p = fit.predict(x)
    sick = eye_y[:, 0, 1] == 1
    assert p[sick, 1, 0].mean() > 0.6 and p[sick, 0, 0].mean() < 0.4, (p[sick, 1, 0].mean(), p[sick, 0, 0].mean())
    for f, head in enumerate(fit.heads):
        held = folds == f
        np.testing.assert_allclose(
            head.predict(x[held].reshape(-1, x.shape[-1])).reshape(-1, 2, 8), fit.out_of_fold[held]
        )
    # noise, barely regularised: out of fold it cannot memorise
    noise = rng.normal(size=x.shape).astype(np.float32)
    leak = heads.cross_fit_eyes(noise, eye_y, folds, grid=(1000.0,), seed=0)
    assert _mean_auc(eye_y.reshape(-1, 8), leak.out_of_fold.reshape(-1, 8)) < 0.62


def test_eyes_without_labels_and_a_one_eyed_patients_second_slot_are_not_rows():
    rng = np.random.default_rng(6)
    x, eye_y = _eyes_with_own_labels(rng, n=120)
    x[:10, 1] = x[:10, 0]  # ten one-eyed patients: their photo in both slots
    eye_y[:10, 1] = eye_y[:10, 0]
    eye_y[10:30, 1] = -1  # twenty right eyes without keywords
    mask = heads.eye_mask(eye_y, heads.single_eyed(x))
    assert mask[:, 0].all() and not mask[:30, 1].any() and mask[30:, 1].all()
    folds = heads.patient_folds(len(x), 4, 0)
    fit = heads.cross_fit_eyes(x, eye_y, folds, grid=(0.1,), seed=0)
    np.testing.assert_array_equal(fit.mask, mask)
    # the head of fold 0 is the one fitted on exactly the masked rows of the other folds
    rows = mask & (folds != 0)[:, None]
    expected = heads.fit_linear_head(x[rows], eye_y[rows], 0.1, 0)
    np.testing.assert_allclose(fit.heads[0].weights, expected.weights)
    with pytest.raises(FundusError, match="no eye has labels"):
        heads.cross_fit_eyes(x, np.full_like(eye_y, -1), folds, grid=(0.1,))


def test_augmented_copies_train_only_their_own_folds_heads_and_are_used():
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(200, 2, 100)).astype(np.float32)
    y = (rng.random((200, 8)) < 0.3).astype(int)
    # a copy identical to each patient's features: were a held-out patient's copy in its fold's
    # training rows, the barely regularised head would memorise it and the out-of-fold AUC would soar
    leak = heads.cross_fit(noise, y, folds=5, grid=(1000.0,), seed=0, augmented=(noise.copy(),))
    assert _mean_auc(y, leak.out_of_fold) < 0.62, "a held-out patient's copy trained the head that predicts it"
    # copies that show the labels (the unshifted photos do not): only a head that learned from them
    # ranks new patients whose features show the labels
    shown = noise.copy()
    shown[:, :, :8] += 2.0 * y[:, None, :]
    fit = heads.cross_fit(noise, y, folds=5, grid=(0.01,), seed=0, augmented=(shown,))
    plain = heads.cross_fit(noise, y, folds=5, grid=(0.01,), seed=0)
    new_y = (rng.random((100, 8)) < 0.3).astype(int)
    new = rng.normal(size=(100, 2, 100)).astype(np.float32)
    new[:, :, :8] += 2.0 * new_y[:, None, :]
    learned, not_learned = _mean_auc(new_y, fit.predict(new)), _mean_auc(new_y, plain.predict(new))
    assert learned > 0.7 and not_learned < 0.6, (learned, not_learned)
    with pytest.raises(FundusError, match="augmented copy 0 has features"):
        heads.cross_fit(noise, y, folds=5, grid=(0.01,), augmented=(noise[:10],))


def test_folds_are_stratified_and_c_is_chosen_by_out_of_fold_auc():
    rng = np.random.default_rng(1)
    n = 300
    y = np.zeros((n, 8), int)
    y[rng.choice(n, 10, replace=False), 5] = 1  # a rare class: 10 positives, 2 in each of 5 folds
    y[:, :5] = rng.random((n, 5)) < 0.3
    folds = heads.patient_folds(n, 5, seed=3, y=y)
    assert [int(y[folds == f, 5].sum()) for f in range(5)] == [2] * 5
    assert sorted(np.bincount(folds)) == [60] * 5
    signal = rng.normal(size=(n, 2, 30)).astype(np.float32)
    signal[:, :, :8] += 1.5 * y[:, None, :]  # the labels show in the features
    fit = heads.cross_fit(signal, y, folds=5, grid=(1e-7, 0.01, 1e4), seed=0)
    assert fit.c == 0.01 and fit.scores[0.01] == max(fit.scores.values()), fit.scores
    assert _mean_auc(y, fit.out_of_fold) > 0.85
    with pytest.raises(FundusError, match="2 to 300 folds"):
        heads.patient_folds(n, 1, 0)


@pytest.mark.backend
def test_the_bag_in_the_patient_model_is_the_heads_on_features(view_manifest, tmp_path):
    from fundus_ensemble.data.batches import PatientBatches, predict_batches
    from fundus_ensemble.models import build_patient_model
    from fundus_ensemble.training.features import eye_features

    model = build_patient_model("efficientnet_lite0", 48, "imagenet")
    features = eye_features(
        model.get_layer("eye_encoder"),
        view_manifest,
        48,
        8,
        tmp_path / "store",
        "efficientnet_lite0",
        "imagenet",
        "color",
    )
    y = view_manifest.label_matrix()
    fit = heads.cross_fit(features, y, folds=3, grid=(0.01,), seed=0)
    bag = heads.LinearHead.mean(fit.heads)
    z = heads.fuse(features) @ bag.weights + bag.bias
    np.testing.assert_allclose(fit.predict(features), 1 / (1 + np.exp(-z)))  # the bag averages the heads' logits
    # a head is scikit-learn's logistic regression on standardised features, the standardisation folded in,
    # its positives weighted (negatives / positives) ** 0.5 as the networks' weighted BCE weighs them
    from sklearn.linear_model import LogisticRegression

    x = heads.fuse(features)
    standardised = (x - x.mean(0)) / (x.std(0) + 1e-6)
    k = int(np.argmin(np.where(y.sum(0) > 0, y.sum(0), len(y))))  # the rarest class present: its weight is largest
    weight = ((len(y) - y[:, k].sum()) / y[:, k].sum()) ** 0.5
    assert weight > 1.5
    sklearn = LogisticRegression(C=0.01, max_iter=3000, class_weight={0: 1, 1: weight}).fit(standardised, y[:, k])
    np.testing.assert_allclose(
        heads.fit_linear_head(x, y, 0.01).predict(x)[:, k], sklearn.predict_proba(standardised)[:, 1], atol=1e-6
    )
    heads.set_patient_head(model, fit.bagged)
    on_images = predict_batches(model, PatientBatches(view_manifest, 48, 8))
    np.testing.assert_allclose(on_images, fit.predict(features), atol=2e-4)
    # heads fitted on another fusion of the eyes go into the same model, folded into concat(max, mean)
    diff = heads.cross_fit(features, y, folds=3, grid=(0.01,), seed=0, fusion="max_mean_diff")
    heads.set_patient_head(model, diff.patient_head)
    np.testing.assert_allclose(
        predict_batches(model, PatientBatches(view_manifest, 48, 8)), diff.predict(features), atol=2e-4
    )


def test_every_fusion_folds_exactly_into_a_head_on_max_and_mean():
    rng = np.random.default_rng(7)
    eyes = rng.normal(size=(50, 2, 6))
    for fusion, width in (("max_mean", 12), ("max_mean_diff", 18), ("mean", 6)):
        head = heads.LinearHead(rng.normal(size=(width, 8)), rng.normal(size=8))
        folded = head.as_max_mean(fusion)
        assert folded.weights.shape == (12, 8)
        np.testing.assert_allclose(
            folded.predict(heads.fuse(eyes, "max_mean")), head.predict(heads.fuse(eyes, fusion)), rtol=1e-5
        )


def _script(name: str, *args) -> subprocess.CompletedProcess:
    return run_script(name, *args)


# not rerun under JAX (a minute there): what it checks is NumPy's; the same command lines run under JAX in
# test_backends, and the bag in the patient model just above is checked under both backends
def test_a_cross_fitted_run_is_calibrated_on_every_train_and_val_patient_and_predict_uses_it(small_dataset, tmp_path):
    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.evaluation.calibration import Calibration, fit_calibration

    prep, run = tmp_path / "prep", tmp_path / "run"
    assert _script("preprocess.py", small_dataset, "--out", prep, "--size", "48").returncode == 0
    done = _script(
        "train_pair.py",
        prep,
        "--out",
        run,
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        "imagenet",
        "--head-fit",
        "cross-fit",
        "--folds",
        "3",
        "--fine-tune-epochs",
        "0",
        "--head-fusion",
        "max_mean_diff",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--calibrate-on out-of-fold" in done.stdout
    manifest = load_manifest(prep / "color" / "manifest.csv")
    development = [p.patient_id for p in manifest.patients if p.split in ("train", "val")]
    oof = {v: np.load(run / v / "out_of_fold.npz") for v in ("color", "gray_eq")}
    assert list(oof["color"]["patient_id"]) == development, "every train and val patient, and no test patient"
    card = json.loads((run / "color" / "card.json").read_text())
    assert card["head"]["folds"] == 3 and card["best_val"]["out_of_fold"]
    # the heads were fitted on the fusion asked for (the recipe's concat(max, mean, |left - right|))
    from fundus_ensemble.training.features import eye_features, preprocessing_settings

    dev_manifest = manifest.with_patients([p for p in manifest.patients if p.split in ("train", "val")])
    features = eye_features(
        None,
        dev_manifest,
        48,
        8,
        prep / "features",
        "efficientnet_lite0",
        "imagenet",
        "color",
        preprocessing=preprocessing_settings(prep / "color"),
    )
    again = heads.cross_fit(features, dev_manifest.label_matrix(), folds=3, seed=0, fusion="max_mean_diff")
    assert card["head"]["fusion"] == "max_mean_diff"
    np.testing.assert_allclose(oof["color"]["probabilities"], again.out_of_fold, atol=1e-6)
    # the run's calibration is the one fitted on the ensemble's out-of-fold predictions
    fitted = json.loads((run / "calibration.json").read_text())
    expected = fit_calibration(
        oof["color"]["labels"], (oof["color"]["probabilities"] + oof["gray_eq"]["probabilities"]) / 2
    )
    assert Calibration.from_dict(fitted["ensemble"]) == expected and fitted["fitted_on"] == "out-of-fold"
    refused = _script("score.py", run, prep, "--split", "val")
    assert refused.returncode == 2 and "scoring val would grade patients they learned from" in refused.stderr
    scored = _script("score.py", run, prep, "--split", "test", "--calibrate-on", "out-of-fold")
    assert scored.returncode == 0, scored.stderr[-1500:]
    # predict decides with the run's calibration unless told not to
    test = next(p for p in manifest.patients if p.split == "test")
    photo = manifest.image_path(test.left_image or test.right_image)
    predicted = _script("predict.py", run, "--left", photo, "--out", tmp_path / "out")
    assert predicted.returncode == 0 and "deciding with the run's calibration" in predicted.stdout, predicted.stderr[
        -1500:
    ]
    rows = {r["class"]: r for r in csv.DictReader(open(tmp_path / "out" / "decisions.csv"))}
    thresholds = {c: float(rows[c]["threshold"]) for c in LABELS}
    from fundus_ensemble.evaluation.calibration import raw_thresholds

    # one photo alone is answered by the one-eye heads, at the thresholds fitted on their out-of-fold eyes
    eyes = {v: np.load(run / v / "eye_out_of_fold.npz") for v in ("color", "gray_eq")}
    mask = eyes["color"]["mask"]
    from fundus_ensemble.data.batches import manifest_eye_labels

    # each eye learned its own keywords' labels, not its patient's
    np.testing.assert_array_equal(eyes["color"]["labels"], manifest_eye_labels(dev_manifest))
    assert (eyes["color"]["labels"][mask] != np.repeat(dev_manifest.label_matrix()[:, None], 2, 1)[mask]).any()
    assert mask.sum() > len(development), "both eyes of most patients are rows of their own"
    expected_eye = fit_calibration(
        eyes["color"]["labels"][mask], (eyes["color"]["probabilities"] + eyes["gray_eq"]["probabilities"])[mask] / 2
    )
    assert Calibration.from_dict(fitted["eye"]) == expected_eye
    assert rows["N"]["answered_from"] == "left eye"
    assert thresholds == {c: pytest.approx(t, abs=1e-6) for c, t in zip(LABELS, raw_thresholds(expected_eye))}
    both = next(p for p in manifest.patients if p.split == "test" and p.left_image and p.right_image)
    pair = ["--left", manifest.image_path(both.left_image), "--right", manifest.image_path(both.right_image)]
    assert _script("predict.py", run, *pair, "--out", tmp_path / "pair").returncode == 0
    rows = {r["class"]: r for r in csv.DictReader(open(tmp_path / "pair" / "decisions.csv"))}
    assert rows["N"]["answered_from"] == "both eyes"
    thresholds = {c: float(rows[c]["threshold"]) for c in LABELS}
    assert thresholds == {c: pytest.approx(t, abs=1e-6) for c, t in zip(LABELS, raw_thresholds(expected))}
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":  # numpy thresholds: one backend suffices
        # an operating point, fitted on the same out-of-fold predictions, pairs and single eyes apart
        from fundus_ensemble.evaluation.calibration import fit_operating_point

        ensemble = (oof["color"]["probabilities"] + oof["gray_eq"]["probabilities"]) / 2
        at = _script("predict.py", run, *pair, "--out", tmp_path / "sens", "--operating-point", "sensitivity=0.9")
        assert at.returncode == 0 and "deciding at the operating point sensitivity=0.90" in at.stdout, at.stderr[-1500:]
        rows = list(csv.DictReader(open(tmp_path / "sens" / "decisions.csv")))
        want = raw_thresholds(fit_operating_point(oof["color"]["labels"], ensemble, "sensitivity", 0.9))
        assert [float(r["threshold"]) for r in rows] == pytest.approx(want, abs=1e-6)
        assert rows[0]["threshold_source"].startswith("operating point sensitivity=0.90 (calibration.json")
        assert want != pytest.approx(list(thresholds.values()), abs=1e-3), "another threshold than the calibration's"
        single = _script(
            "predict.py", run, "--left", photo, "--out", tmp_path / "spec1", "--operating-point", "specificity=0.90"
        )
        assert single.returncode == 0, single.stderr[-1500:]
        eye_want = raw_thresholds(
            fit_operating_point(
                eyes["color"]["labels"][mask],
                (eyes["color"]["probabilities"] + eyes["gray_eq"]["probabilities"])[mask] / 2,
                "specificity",
                0.9,
            )
        )
        rows = list(csv.DictReader(open(tmp_path / "spec1" / "decisions.csv")))
        assert [float(r["threshold"]) for r in rows] == pytest.approx(eye_want, abs=1e-6)
        unknown = _script(
            "predict.py", run, "--left", photo, "--out", tmp_path / "x", "--operating-point", "sensitivity=0.8"
        )
        assert (
            unknown.returncode == 2
            and "no operating point sensitivity=0.80 (it has: sensitivity=0.90, specificity=0.90)" in unknown.stderr
        ), unknown.stderr[-800:]
    plain = _script("predict.py", run, "--left", photo, "--out", tmp_path / "plain", "--no-calibration")
    assert {float(r["threshold"]) for r in csv.DictReader(open(tmp_path / "plain" / "decisions.csv"))} == {0.5}, (
        plain.stderr
    )
    # the colour view's side head: recorded, and its warnings reach decisions.csv for the slot they concern
    assert card["side"]["accuracy"] > 0 and (run / "color" / "side.npz").is_file()
    with np.load(run / "color" / "side.npz") as data:
        arrays = dict(data)
    for bias, slot in (
        (20.0, "the left photo looks like a right eye"),
        (-20.0, "the right photo looks like a left eye"),
    ):
        zero = np.zeros_like(arrays["weights"])  # every photo a right (left) eye, whatever it shows
        np.savez(
            run / "color" / "side.npz", **{**arrays, "weights": zero, "bias": np.array([bias]), "pair": np.array(0.5)}
        )
        done = _script("predict.py", run, *pair, "--out", tmp_path / f"side{bias}", "--no-calibration")
        assert done.returncode == 0, done.stderr[-1500:]
        checks = {r["side_check"] for r in csv.DictReader(open(tmp_path / f"side{bias}" / "decisions.csv"))}
        assert len(checks) == 1 and checks.pop().startswith(slot), checks


def test_a_side_head_tells_left_from_right_and_sets_its_warnings_on_held_back_patients():
    rng = np.random.default_rng(0)
    n = 300
    features = rng.normal(size=(n, 2, 20)).astype(np.float32)
    features[:, 0, 0] -= 1.5  # the left eye's optic disc on one side ...
    features[:, 1, 0] += 1.5  # ... the right eye's on the other
    both = np.ones(n, bool)
    both[:10] = False  # one-eyed patients take no part
    side = heads.fit_side_head(features, both, folds=5, seed=0)
    assert side.accuracy > 0.9
    assert side.probability_right(features[10:, 1]).mean() > 0.7 > 0.3 > side.probability_right(features[10:, 0]).mean()
    assert 0.5 <= side.single < 1 and side.pair >= 0
    assert side.caught_pair > side.caught_single > 0, "a swapped pair says more than one photo"
    again = heads.SideHead.from_arrays(side.to_arrays())
    np.testing.assert_allclose(again.probability_right(features[:5]), side.probability_right(features[:5]))
