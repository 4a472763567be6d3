"""Operating points a screening programme asks for, sensitivity and specificity with intervals,
and scores by sex and age band."""

import numpy as np
import pytest

from fundus_ensemble.data.manifest import Manifest, Patient
from fundus_ensemble.errors import FundusError
from fundus_ensemble.evaluation.calibration import fit_operating_point, parse_operating_point
from fundus_ensemble.evaluation.ensemble import MIN_SUBGROUP, subgroup_scores
from fundus_ensemble.metrics import odir_score, sensitivity_specificity, wilson_interval


def scores(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 8)) < 0.25).astype(int)
    p = np.clip(0.35 * y + 0.65 * rng.random(y.shape), 0.001, 0.999)
    return y, p


@pytest.mark.parametrize("measure, target", [("sensitivity", 0.9), ("specificity", 0.95), ("sensitivity", 0.5)])
def test_each_class_gets_the_strictest_threshold_that_reaches_the_target(measure, target):
    y, p = scores()
    calibration = fit_operating_point(y, p, measure, target)
    decided = calibration.apply(p) > 0.5
    reached = sensitivity_specificity(y, decided)
    for j, (c, r) in enumerate(reached.items()):
        assert r[measure] >= target, (c, r)
        t = calibration.classes[j].threshold
        assert np.array_equal(decided[:, j], p[:, j] > t), "the decision is the raw probability against the threshold"
        # the strictest such threshold: one patient fewer on the target's side misses it
        if measure == "sensitivity":
            lowest = np.min(p[(y[:, j] == 1) & decided[:, j], j])
            stricter = p[:, j] > lowest
        else:
            highest = np.max(p[(y[:, j] == 0) & ~decided[:, j], j])
            stricter = p[:, j] >= highest
        again = sensitivity_specificity(y[:, [j]], stricter[:, None])["N"][measure]
        assert again < target, (c, t, again)


def test_the_operating_point_is_parsed_and_checked():
    assert parse_operating_point("sensitivity=0.90") == ("sensitivity", 0.9)
    assert parse_operating_point("Specificity=0.8") == ("specificity", 0.8)
    for bad in ("sensitivity", "recall=0.9", "sensitivity=1", "specificity=x"):
        with pytest.raises(FundusError, match="--operating-point"):
            parse_operating_point(bad)


def test_wilson_intervals_are_the_textbook_ones():
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson_interval(0, 0) is None and wilson_interval(5, 5)[1] == 1.0


def test_subgroups_are_scored_on_their_own_patients_and_small_ones_say_so():
    y, p = scores(120, seed=3)
    patients = []
    for i in range(120):
        # 10 under 40, 50 aged 40-59 (ten of them exactly 40), 60 aged 60 or more (ten exactly 60)
        age = 30 if i < 10 else 40 if i < 20 else 50 if i < 60 else 60 if i < 70 else 70
        sex = "Female" if i % 2 else "Male"
        patients.append(Patient(f"p{i}", "a.jpg", "b.jpg", tuple(y[i]), "test", {"age": str(age), "sex": sex}))
    groups = subgroup_scores(Manifest(tuple(patients), "."), y, p)
    assert {g: v["patients"] for g, v in groups.items()} == {
        "sex: female": 60,
        "sex: male": 60,
        "age: under 40": 10,
        "age: 40-59": 50,
        "age: 60 and over": 60,
    }
    old = np.arange(120) >= 60
    assert groups["age: 60 and over"]["final"] == pytest.approx(odir_score(y[old], p[old])["final"])
    assert groups["age: under 40"]["note"].startswith("too small for an interval") and 10 < MIN_SUBGROUP
    low, high = groups["age: 40-59"]["final_95"]
    assert low < groups["age: 40-59"]["final"] < high
