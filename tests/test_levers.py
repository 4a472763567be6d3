"""Training levers: the schedule, the prior bias, the config checks and the lever rows (no training here)."""

import dataclasses
import math

import numpy as np
import pytest

from fundus_ensemble.errors import FundusError
from fundus_ensemble.training.callbacks import cosine_learning_rate
from fundus_ensemble.training.config import TrainConfig
from fundus_ensemble.training.levers import LEVERS, format_levers, lever_config
from fundus_ensemble.training.train import build_loss, prior_log_odds


def test_cosine_schedule_warms_up_then_decays():
    rates = [cosine_learning_rate(e, 1e-3, total=6, warmup=2) for e in range(6)]
    assert rates[:2] == pytest.approx([1e-3 / 3, 2e-3 / 3])
    assert rates[2] == pytest.approx(1e-3)
    assert rates[2] > rates[3] > rates[4] > rates[5] > 0
    assert rates[4] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert cosine_learning_rate(0, 1e-3, total=4) == pytest.approx(1e-3)


def test_prior_log_odds_give_the_prior_back():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    bias = prior_log_odds(labels)
    assert 1 / (1 + np.exp(-bias)) == pytest.approx([0.75, 0.25, 1e-3], rel=1e-4)


def test_build_loss_follows_the_config():
    labels = np.array([[1, 0], [0, 0], [0, 1], [0, 0]])
    loss, weights = build_loss(TrainConfig(), labels)
    assert loss.name == "weighted_bce" and weights == pytest.approx([3**0.5, 3**0.5])
    loss, weights = build_loss(TrainConfig(loss="asymmetric"), labels)
    assert loss.name == "asymmetric" and weights == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"loss": "focal"}, "unknown loss"),
        ({"output_bias": "mean"}, "unknown output_bias"),
        ({"schedule": "step"}, "unknown schedule"),
        ({"warmup_epochs": 1}, "needs schedule 'cosine'"),
        ({"warmup_epochs": 40, "schedule": "cosine"}, "no epoch for the cosine"),
    ],
)
def test_config_refuses_unknown_levers(changes, message):
    with pytest.raises(FundusError, match=message):
        dataclasses.replace(TrainConfig(), **changes).check()


def test_every_lever_row_is_a_valid_config_of_the_same_budget():
    base = TrainConfig(size=96, epochs=3, fine_tune_epochs=1)
    for name in LEVERS:
        config = lever_config(base, name)
        assert config.epochs + config.fine_tune_epochs == 4, name
        changed = {k for k, v in dataclasses.asdict(config).items() if v != getattr(base, k)}
        assert changed <= set(LEVERS[name].changes) | {"epochs"}, name
    assert lever_config(base, "no_cut").fine_tune_epochs == 0
    with pytest.raises(FundusError, match="unknown lever"):
        lever_config(base, "magic")


def test_lever_table_has_one_row_per_result():
    result = {
        "row": "library",
        "what": "defaults",
        "final": 0.6,
        "kappa": 0.2,
        "f1": 0.8,
        "auc": 0.8,
        "auc_per_class": {c: 0.7 for c in "NDGCAHMO"} | {"H": None},
        "best_epoch": 3,
        "train_images_per_s": 12.5,
        "wall_s": 600.0,
    }
    table = format_levers([result, {**result, "row": "cosine"}], TrainConfig(size=96, epochs=3, fine_tune_epochs=1))
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and "**0.600**" in lines[1] and "n/a" in lines[1]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def _prep_of(view_manifest):
    from pathlib import Path

    return Path(view_manifest.source).parent.parent


def test_prior_bias_cosine_and_eye_head_reach_the_trained_model(view_manifest, tmp_path):
    """One small run with three levers (one run: each costs ~20 s of compilation). At a learning rate
    too small to move anything, the saved output bias is the prior's log-odds and history.csv's
    learning rates follow the cosine; the eye head trains on the keywords and is left out of the
    saved model."""
    import csv

    import keras

    from fundus_ensemble.data.batches import PatientBatches, manifest_eye_labels
    from fundus_ensemble.data.keywords import eye_labels
    from fundus_ensemble.training.train import train_view

    train = view_manifest.select("train")
    targets = manifest_eye_labels(train)
    first = train.patients[0]
    assert targets[0, 0].tolist() == eye_labels(first.extra["left_keywords"]).tolist()
    assert targets[0, 1].tolist() == eye_labels(first.extra["right_keywords"]).tolist()
    _, y = PatientBatches(train, 48, 4, eye_labels=True)[0]
    assert y["labels"].shape == (4, 8) and y["eye_labels"].shape == (4, 2, 8)

    config = TrainConfig(
        backbone="mobilenet",
        size=48,
        batch_size=4,
        epochs=2,
        fine_tune_epochs=1,
        learning_rate=1e-12,
        output_bias="prior",
        schedule="cosine",
        eye_head_weight=0.5,
        bn_recalibration_patients=0,
    )
    card = train_view(_prep_of(view_manifest) / "color", tmp_path / "color", config, "color")
    assert card["config"]["eye_head_weight"] == 0.5
    model = keras.saving.load_model(str(tmp_path / "color" / "model.keras"), compile=False)
    assert "eye_dense" not in [layer.name for layer in model.layers]
    batch, _ = PatientBatches(train, 48, 4)[0]
    assert np.asarray(model.predict_on_batch(batch)).shape == (4, 8)
    bias = keras.ops.convert_to_numpy(model.get_layer("labels").bias)
    assert bias == pytest.approx(prior_log_odds(train.label_matrix()), abs=1e-5)
    with open(tmp_path / "color" / "history.csv") as handle:
        rates = [float(row["learning_rate"]) for row in csv.DictReader(handle)]
    assert rates == pytest.approx([cosine_learning_rate(e, 1e-12, 3) for e in range(3)], rel=1e-4)


def test_masked_loss_ignores_unknown_eyes():
    import keras

    from fundus_ensemble.models.losses import MaskedBinaryCrossentropy

    y = np.array([[[1.0, 0.0], [-1.0, -1.0]]], np.float32)
    p = np.array([[[0.8, 0.4], [0.01, 0.99]]], np.float32)
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    loss = MaskedBinaryCrossentropy()(y, p)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(expected, rel=1e-5)
    nothing_known = MaskedBinaryCrossentropy()(np.full((1, 2, 2), -1.0, np.float32), p)
    assert float(keras.ops.convert_to_numpy(nothing_known)) == 0.0


def test_rows_are_compared_with_the_library_patient_by_patient(tmp_path):
    from fundus_ensemble.metrics import odir_score
    from fundus_ensemble.training.levers import PROBABILITIES, add_margins

    rng = np.random.default_rng(0)
    y = (rng.random((120, 8)) < 0.3).astype(int)
    informed = np.clip(0.6 * y + 0.4 * rng.random(y.shape), 0, 1)
    probs = {"library": rng.random(y.shape), "good": informed, "same": None}
    probs["same"] = probs["library"].copy()
    for name, p in probs.items():
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / PROBABILITIES, p)
    results = [{"row": name} for name in probs]
    add_margins(results, tmp_path, y, resamples=100)
    library, good, same = results
    assert "margin" not in library
    assert good["margin"] == pytest.approx(odir_score(y, informed)["final"] - odir_score(y, probs["library"])["final"])
    assert 0 < good["margin_interval"][0] < good["margin"] < good["margin_interval"][1]
    assert same["margin"] == 0 and same["margin_interval"] == [0.0, 0.0]


def test_lever_table_shows_each_margin_with_its_interval():
    result = {
        "row": "cosine",
        "what": "c",
        "final": 0.6,
        "kappa": 0.2,
        "f1": 0.8,
        "auc": 0.8,
        "auc_per_class": {c: 0.7 for c in "NDGCAHMO"},
        "best_epoch": 3,
        "train_images_per_s": 12.5,
        "wall_s": 600.0,
        "margin": 0.012,
        "margin_interval": [-0.01, 0.03],
    }
    library = {k: v for k, v in result.items() if not k.startswith("margin")} | {"row": "library"}
    table = format_levers([library, result], TrainConfig(size=96, epochs=3))
    assert "| +0.012 [-0.010, +0.030] |" in table and "| **0.600** | - |" in table


@pytest.mark.slow
def test_a_lever_row_runs_once_and_keeps_its_val_probabilities(view_manifest, tmp_path):
    """The fresh path and the read-back path of a row (margins between rows are tested above)."""
    from fundus_ensemble.metrics import odir_score
    from fundus_ensemble.training.levers import PROBABILITIES, run_levers

    base = TrainConfig(
        backbone="mobilenet", size=48, batch_size=4, epochs=1, fine_tune_epochs=0, bn_recalibration_patients=0
    )
    [result] = run_levers(_prep_of(view_manifest), tmp_path, base, ["library"])
    val = view_manifest.select("val")
    probs = np.load(tmp_path / "library" / PROBABILITIES)
    assert result["final"] == pytest.approx(odir_score(val.label_matrix(), probs)["final"])
    constant = np.tile(probs.mean(axis=0), (len(val), 1))  # what the images are worth, beyond the threshold
    assert result["vs_constant"] == pytest.approx(result["final"] - odir_score(val.label_matrix(), constant)["final"])
    assert "| library |" in (tmp_path / "levers.md").read_text()
    (tmp_path / "library" / PROBABILITIES).unlink()  # as for a row finished before probabilities were kept
    [again] = run_levers(_prep_of(view_manifest), tmp_path, base, ["library"])
    assert again == result  # read back, not trained again
    np.testing.assert_allclose(np.load(tmp_path / "library" / PROBABILITIES), probs, atol=1e-6)
