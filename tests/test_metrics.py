import numpy as np
import pytest

from fundus_ensemble.errors import FundusError
from fundus_ensemble.metrics import odir_score, per_class_scores


def test_hand_worked_case():
    # cells: gt 1 0 0 1 / prob .9 .6 .2 .7 -> predicted 1 1 0 1: TP 2, FP 1, TN 1, FN 0
    # accuracy (= pooled micro F1) 3/4; kappa (0.75 - 0.5) / (1 - 0.5) = 0.5; every positive outranks every negative: AUC 1
    score = odir_score(np.array([[1, 0], [0, 1]]), np.array([[0.9, 0.6], [0.2, 0.7]]))
    assert score == pytest.approx({"kappa": 0.5, "f1": 0.75, "auc": 1.0, "final": 0.75})


def test_second_hand_worked_case():
    # gt 1 0 1 0 / prob .4 .6 .8 .1: one of four positive-negative pairs misordered -> AUC 0.75
    # predicted 0 1 1 0: accuracy 0.5, chance agreement 0.5 -> kappa 0
    score = odir_score(np.array([[1, 0], [1, 0]]), np.array([[0.4, 0.6], [0.8, 0.1]]))
    assert score == pytest.approx({"kappa": 0.0, "f1": 0.5, "auc": 0.75, "final": 1.25 / 3})


def test_the_closed_form_equals_the_challenges_sklearn_calls():
    """odir_score computes the official evaluation's three sklearn calls itself (they were its time);
    on many matrices, tied probabilities, one-valued predictions and a threshold other than 0.5 among them,
    it must give their numbers. Slips caught: ordinal ranks for ties, a count of the wrong side of the
    threshold in kappa's chance agreement, F1 of the positive class instead of micro."""
    from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(300):
        patients = int(rng.integers(1, 40))
        y = (rng.random((patients, 8)) < rng.uniform(0.05, 0.6)).astype(int)
        if y.min() == y.max():
            continue
        prob = rng.random(y.shape)
        if trial % 3 == 0:
            prob = np.round(prob, 1)  # many ties, within and across classes
        if trial % 7 == 0:
            prob = np.full(y.shape, rng.choice([0.2, 0.9]))  # every cell called the same way
        threshold = 0.5 if trial % 2 else float(rng.choice([0.3, 0.5, 0.7]))
        gt, predicted = y.ravel(), (prob.ravel() > threshold).astype(int)
        score = odir_score(y, prob, threshold)
        expected = {
            "kappa": cohen_kappa_score(gt, predicted),
            "f1": f1_score(gt, predicted, average="micro"),
            "auc": roc_auc_score(gt, prob.ravel()),
        }
        for name, value in expected.items():
            assert score[name] == pytest.approx(value, abs=1e-12), (trial, name)


def test_threshold_is_strict():
    y = np.array([[1, 0]])
    assert odir_score(y, np.array([[0.5, 0.2]]))["f1"] == pytest.approx(0.5)  # 0.5 is not > 0.5
    assert odir_score(y, np.array([[0.51, 0.2]]))["f1"] == pytest.approx(1.0)


def test_all_zero_prediction_scores_cell_accuracy():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 8)) < 0.15).astype(int)
    score = odir_score(y, np.zeros((200, 8)))
    assert score["kappa"] == 0.0 and score["auc"] == 0.5
    assert score["f1"] == pytest.approx(1 - y.mean())


def test_input_checks():
    with pytest.raises(FundusError, match="equal"):
        odir_score(np.zeros((2, 8)), np.zeros((3, 8)))
    with pytest.raises(FundusError, match="NaN"):
        odir_score(np.array([[1, 0]]), np.array([[np.nan, 0.1]]))
    with pytest.raises(FundusError, match="0 and 1"):
        odir_score(np.array([[2, 0]]), np.array([[0.3, 0.1]]))


def test_per_class_undefined_auc_warns():
    y = np.array([[1, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0, 0, 0]])
    p = np.full((3, 8), 0.3)
    p[0, 0] = 0.9
    with pytest.warns(UserWarning, match="undefined for G, C, A, H, M"):
        scores = per_class_scores(y, p)
    # N: positives score .9 and .3, the negative .3: one pair won, one tied (counts 1/2) -> AUC 0.75
    assert scores["G"]["auc"] is None and scores["N"]["auc"] == pytest.approx(0.75)
    assert scores["N"]["f1"] == pytest.approx(2 / 3) and scores["O"]["positives"] == 2


def test_the_class_prior_row_predicts_the_training_rate_not_the_scored_splits():
    from fundus_ensemble.evaluation.ensemble import trivial_rows
    from fundus_ensemble.metrics import odir_score

    rng = np.random.default_rng(0)
    rates = np.linspace(0.05, 0.6, 8)
    train = (rng.random((400, 8)) < rates).astype(int)
    scored = (rng.random((200, 8)) < rates[::-1]).astype(int)  # the scored split's rates run the other way
    row = trivial_rows(train, scored)["class prior (train)"]
    expected = odir_score(scored, np.tile(train.mean(axis=0), (200, 1)))
    wrong = odir_score(scored, np.tile(scored.mean(axis=0), (200, 1)))
    assert row["auc"] == pytest.approx(expected["auc"]) and row["auc"] != pytest.approx(wrong["auc"], abs=0.01)
