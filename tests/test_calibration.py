import numpy as np
import pytest

from fundus_ensemble.errors import FundusError
from fundus_ensemble.evaluation.calibration import Calibration, ClassCalibration, fit_calibration
from fundus_ensemble.metrics import odir_score, per_class_scores


def shy_model(n, seed):
    """Labels and a model that ranks well but never dares 0.5: positives ~0.3, negatives ~0.1."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 8)) < np.array([0.3, 0.3, 0.05, 0.06, 0.05, 0.04, 0.05, 0.25])).astype(int)
    y[0], y[1] = 1, 0  # every class has both values
    logits = np.where(y == 1, -0.9, -2.2) + rng.normal(0, 0.6, y.shape)
    return y, 1 / (1 + np.exp(-logits))


def test_calibration_moves_the_threshold_where_kappa_needs_it():
    y_fit, p_fit = shy_model(400, 0)
    y_new, p_new = shy_model(400, 1)
    before = odir_score(y_new, p_new)
    after = odir_score(y_new, fit_calibration(y_fit, p_fit).apply(p_new))
    assert before["kappa"] < 0.2  # few cells cross 0.5
    assert after["kappa"] > before["kappa"] + 0.4
    assert after["final"] > before["final"] + 0.1


def test_calibration_keeps_each_class_ranking():
    y, p = shy_model(300, 2)
    calibrated = fit_calibration(y, p).apply(p)
    for c, scores in per_class_scores(y, p).items():
        assert per_class_scores(y, calibrated)[c]["auc"] == pytest.approx(scores["auc"], abs=1e-9)


def test_identity_calibration_changes_nothing_and_round_trips():
    p = np.random.default_rng(3).uniform(0.01, 0.99, (5, 8))
    identity = Calibration(tuple(ClassCalibration() for _ in range(8)))
    np.testing.assert_allclose(identity.apply(p), p, atol=1e-9)
    fitted = fit_calibration(*shy_model(100, 4))
    assert Calibration.from_dict(fitted.to_dict()) == fitted


def test_a_class_without_positives_is_left_alone_with_a_warning():
    y, p = shy_model(100, 5)
    y[:, 2] = 0
    with pytest.warns(UserWarning, match=r"class\(es\) G have"):
        calibration = fit_calibration(y, p)
    assert calibration.classes[2] == ClassCalibration()


def test_wrong_shapes_are_refused():
    y, p = shy_model(50, 6)
    with pytest.raises(FundusError, match="equal"):
        fit_calibration(y[:, :7], p)
    with pytest.raises(FundusError, match=r"\(patients, 8\)"):
        fit_calibration(y, p).apply(p[:, :7])


def test_the_threshold_search_improves_on_platt_scaling_alone():
    y, p = shy_model(400, 2)
    searched, platt_only = fit_calibration(y, p), fit_calibration(y, p, passes=0)
    assert any(c.threshold != 0.5 for c in searched.classes)
    assert all(c.threshold == 0.5 for c in platt_only.classes)
    assert odir_score(y, searched.apply(p))["final"] > odir_score(y, platt_only.apply(p))["final"] + 0.005
