"""The feature screen (evaluation.feature_screen): it runs from a label table to its tables, no
fit or choice reads a test label, and the default follows the stated rule."""

import json

import numpy as np
import pytest
from test_benchmark import write_image_table

from fundus_ensemble.data.synthetic import write_synthetic_dataset
from fundus_ensemble.evaluation import feature_screen as fs

# Not rerun under JAX: the screen's only Keras step is the feature extraction, which runs under JAX in
# test_backends (the recipe's train_pair) and test_lite (the same features as under TensorFlow).

CONFIG = fs.ScreenConfig(
    backbones=("efficientnet_lite0",),
    sizes=(40, 48),
    seeds=(0,),
    folds=3,
    reference=("efficientnet_lite0", 48),
    bootstrap=20,
)


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen")
    write_image_table(write_synthetic_dataset(root / "data", 48, seed=3, diameter=80), root / "data" / "labels.csv")
    seconds = fs.prepare(root / "data" / "labels.csv", root / "data", root / "out", CONFIG)
    return root / "out", seconds, fs.run_screen(root / "out", CONFIG)


def test_the_screen_writes_its_tables_and_times_each_extraction(screened):
    out, seconds, results = screened
    assert set(seconds) == {"efficientnet_lite0/40", "efficientnet_lite0/48"} and all(s > 0 for s in seconds.values())
    [seed] = results["seeds"]
    assert [(r["backbone"], r["size"]) for r in seed["table"]] == [
        ("efficientnet_lite0", 40),
        ("efficientnet_lite0", 48),
    ]
    names = [r["name"] for r in seed["levers"]]
    assert names[0].startswith("reference") and "color alone" in names and "eye-level keyword heads" in names
    assert all(r["interval_calibrated"] is not None for r in seed["levers"][1:])
    assert json.loads((out / "screen.json").read_text())["default"] == results["default"]
    text = (out / "screen.md").read_text()
    assert "| efficientnet_lite0 | 48 |" in text and "cross-fitted bag + out-of-fold calibration" in text


def test_no_fit_of_the_screen_reads_a_test_label(screened):
    out, _, _ = screened
    data = fs._Data(out)
    screen = fs._Screen(data, CONFIG, 0)
    fits = {
        "ensemble": screen.ensemble("efficientnet_lite0", 48),
        "per-eye": screen.per_eye("efficientnet_lite0", 48, "color", "patient", "mean"),
        "keywords": screen.per_eye("efficientnet_lite0", 48, "gray_eq", "keywords", "max"),
    }
    probe = screen.probe("efficientnet_lite0", 48)[1]
    # the same screen with every test patient's labels (and per-eye keywords) scrambled
    scrambled = fs._Data(out)
    test = screen.test
    rng = np.random.default_rng(0)
    scrambled.y = data.y.copy()
    scrambled.y[test] = rng.permutation(data.y[test]) ^ 1
    eyes = data.eye_labels()
    eyes[test] = 1 - eyes[test]
    scrambled.eye_labels = lambda: eyes
    scrambled.split = data.split  # the split is drawn from the true labels; only what is fitted may not see them
    again = fs._Screen(scrambled, CONFIG, 0)
    assert np.array_equal(again.test, test)
    np.testing.assert_array_equal(again.ensemble("efficientnet_lite0", 48).test, fits["ensemble"].test)
    np.testing.assert_array_equal(
        again.per_eye("efficientnet_lite0", 48, "color", "patient", "mean").test, fits["per-eye"].test
    )
    np.testing.assert_array_equal(
        again.per_eye("efficientnet_lite0", 48, "gray_eq", "keywords", "max").test, fits["keywords"].test
    )
    np.testing.assert_array_equal(again.probe("efficientnet_lite0", 48)[1], probe)
    calibrated = fits["ensemble"].calibrated().test_calibrated
    np.testing.assert_array_equal(again.ensemble("efficientnet_lite0", 48).calibrated().test_calibrated, calibrated)


def test_the_default_is_the_best_development_score_within_the_time_budget():
    def row(backbone, size, dev, test):
        return {
            "backbone": backbone,
            "size": size,
            "heads_s": 10.0,
            "dev_out_of_fold_calibrated": {"final": dev},
            "test_calibrated": {"final": test},
        }

    results = {
        "seeds": [
            {"table": [row("a", 224, 0.70, 0.80), row("b", 260, 0.72, 0.60), row("c", 380, 0.75, 0.90)]},
            {"table": [row("a", 224, 0.70, 0.80), row("b", 260, 0.72, 0.60), row("c", 380, 0.75, 0.90)]},
        ]
    }
    seconds = {"a/224": 100.0, "b/260": 200.0, "c/380": 4000.0}
    chosen = fs.choose_default(results, seconds)
    assert (chosen["backbone"], chosen["size"]) == ("b", 260), (
        "c is over the hour; a has the better test, not dev, score"
    )
    assert chosen["seconds"] == 210.0
    assert fs.choose_default(results, {**seconds, "c/380": 100.0})["backbone"] == "c"
    assert fs.choose_default(results, {"a/224": 100.0})["backbone"] == "a", "an untimed extraction is not chosen"


def test_referral_rates_are_read_on_test_at_the_development_threshold():
    # development: 10 Normal (p(N) 0.9) and 10 referable (p(N) from 0.05 to 0.5): 90 % sensitivity keeps
    # the threshold below the highest referable p(N) but one
    y_dev = np.zeros((20, 8), int)
    y_dev[:10, 0] = 1
    y_dev[10:, 1] = 1
    dev = np.full((20, 8), 0.1)
    dev[:10, 0] = 0.9
    dev[10:, 0] = np.linspace(0.05, 0.5, 10)
    # test: two Normal patients (one scored like a sick one) and two referable, one scored healthy
    y_test = np.zeros((4, 8), int)
    y_test[:2, 0] = 1
    y_test[2:, 1] = 1
    test = np.full((4, 8), 0.1)
    test[:, 0] = [0.95, 0.1, 0.1, 0.95]
    rates = fs.referral_rates(fs._Fit(dev, test), y_dev, y_test)
    threshold = rates["oof"]["threshold"]
    assert 0.5 < threshold < 0.9 and rates["oof"]["sensitivity"] >= 0.9
    assert rates["test_sensitivity"] == 0.5 and rates["test_specificity"] == 0.5
    y_test[1] = [0, 0, 1, 0, 0, 0, 0, 0]  # the second patient has glaucoma: referable, and scored as such
    rates = fs.referral_rates(fs._Fit(dev, test), y_dev, y_test)
    assert rates["test_sensitivity"] == 2 / 3 and rates["test_specificity"] == 1.0
