"""Partly labelled data (evaluation.partial, inference.site): an empty cell is unknown, never
negative; each class is scored and thresholded on its own labelled patients; a site threshold
replaces only the classes the sample labels often enough."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fundus_ensemble.errors import FundusError
from fundus_ensemble.evaluation.calibration import Calibration, ClassCalibration, raw_thresholds
from fundus_ensemble.evaluation.partial import fit_site_calibration, read_partial_labels, score_partial
from fundus_ensemble.labels import LABELS

G, OTHER = LABELS.index("G"), LABELS.index("O")


def _refused(table, text: str, message: str) -> None:
    table.write_text(text)
    with pytest.raises(FundusError, match=message):
        read_partial_labels(table)


def test_a_table_may_lack_classes_and_cells_and_says_which_cell_is_wrong(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("patient_id,left_image,right_image,G,C\na,l.png,,1,\nb,,r.png,0,1\nc,l2.png,r2.png,,0\n")
    labels = read_partial_labels(table)
    assert labels.patient_ids == ("a", "b", "c")
    assert np.isnan(labels.y[0, LABELS.index("C")]) and labels.y[1, LABELS.index("C")] == 1
    assert np.isnan(labels.y[:, LABELS.index("N")]).all(), "a missing column is unknown everywhere"
    assert labels.labelled() == {"G": 2, "C": 2}
    _refused(
        table, "patient_id,G\na,1\nb,yes\n", r"labels\.csv, row 3, column 'G', value 'yes': expected 1, 0 or empty"
    )
    _refused(table, "patient_id,G\na,1\na,0\n", r"row 3, column 'patient_id', value 'a': duplicate \(first in row 2\)")
    _refused(table, "patient_id,left_image\na,x.png\n", "none of the class columns")


def test_ids_equal_once_escaped_lowercase_classes_and_unknown_columns_are_said(tmp_path):
    table = tmp_path / "labels.csv"
    # a spreadsheet-safe CSV writes =1 as '=1: scored by id, the two would share one patient's answer
    _refused(
        table,
        "patient_id,G\n=1,1\n'=1,0\n",
        r"row 3, column 'patient_id', value \"'=1\": duplicate as the project's CSV",
    )
    _refused(table, "patient_id,G,g\na,1,0\n", r"row 1, column 'g': class columns are named N, D, G.*rename it 'G'")
    table.write_text("patient_id,G,notes,left_image\na,1,x,a.png\n")
    with pytest.warns(UserWarning, match=r"ignoring unknown column\(s\) notes$"):
        assert read_partial_labels(table).patient_ids == ("a",)


def test_site_tools_write_only_what_they_made_and_check_paths_before_predicting(tmp_path):
    """Each refusal comes before any model is loaded (the run here holds no model at all)."""
    import json

    from fundus_ensemble.inference.site import adapt_site, calibrate_site, evaluate_table

    run = tmp_path / "run"
    (run / "color").mkdir(parents=True)
    (run / "calibration.json").write_text("{}")
    table = tmp_path / "labels.csv"
    table.write_text("patient_id,left_image,G\na,a.png,1\n")
    work = tmp_path / "work"
    cases = [
        (run / "calibration.json", "is inside the run folder"),
        (run / "color" / "card.json", "is inside the run folder"),
        (tmp_path, "is a folder; give the site calibration file to write"),
        (table, "exists and is not a site calibration this command wrote"),
        (table / "x.json", "is a file, not a folder"),
    ]
    for out, message in cases:
        with pytest.raises(FundusError, match=message):
            calibrate_site(run, table, None, out, work)
    assert (run / "calibration.json").read_text() == "{}" and not work.exists()
    with pytest.raises(FundusError, match="exists and is not a site file this command wrote"):
        adapt_site(run, [], table)
    with pytest.raises(FundusError, match="is inside the run folder"):
        calibrate_site(run, table, None, tmp_path / "site.json", run / "sample")
    ours = tmp_path / "site_calibration.json"
    ours.write_text(json.dumps({"fitted_on": "site sample labels.csv (3 patients)", "run_fingerprint": {}}))
    with pytest.raises(FundusError) as replaced:  # its own earlier output passes the check; the empty run fails later
        calibrate_site(run, table, None, ours, work)
    assert "this command wrote" not in str(replaced.value)
    for out, message in (
        (run, "is inside the run folder"),
        (tmp_path, "contains the label table"),
        (table, "labels.csv is a file; evaluation needs a folder"),
    ):
        with pytest.raises(FundusError, match=message):
            evaluate_table(run, table, None, out)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("a user's own file")
    with pytest.raises(FundusError, match="already holds files fundus-ensemble did not write"):
        evaluate_table(run, table, None, user)


def _labels_and_probs(seed=0, n=60):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.35).astype(float)
    probs = np.clip(0.35 * y + 0.65 * rng.random(y.shape), 0.001, 0.999)
    return y, probs


def test_each_class_is_scored_on_its_labelled_patients_at_its_own_threshold():
    y, probs = _labels_and_probs()
    partial = y.copy()
    partial[:25, G] = np.nan  # G unknown for the first 25 patients
    partial[:, LABELS.index("H")] = np.nan  # H not labelled at all
    # an unknown cell that a slip would read as negative: high probabilities, so it would also move AUC
    probs[:25, G] = 0.99
    thresholds = [0.2 + 0.05 * j for j in range(len(LABELS))]  # a different one per class
    result = score_partial(partial, probs, thresholds, resamples=200)
    assert "H" not in result["classes"] and result["final"] is None and "not defined" in result["final_note"]
    g = result["classes"]["G"]
    known = slice(25, None)
    truth = y[known, G].astype(bool)
    assert g["labelled"] == 35 and g["positives"] == truth.sum() and g["negatives"] == (~truth).sum()
    assert g["auc"] == pytest.approx(roc_auc_score(truth, probs[known, G]))
    decided = probs[known, G] > thresholds[G]
    assert g["threshold"] == thresholds[G]
    assert g["sensitivity"] == pytest.approx((decided & truth).sum() / truth.sum())
    assert g["specificity"] == pytest.approx((~decided & ~truth).sum() / (~truth).sum())
    low, high = g["auc_95"]
    assert low < g["auc"] < high
    # one positive (or four): no AUC and no interval, but a note saying why
    few = partial.copy()
    few[:, G] = 0.0
    few[:4, G] = 1.0
    g = score_partial(few, probs, thresholds, resamples=50)["classes"]["G"]
    assert g["auc"] is None and g["auc_95"] is None and g["auc_note"].startswith("too few to rank (4 positive, 56 neg")
    assert g["sensitivity"] is not None, "sensitivity keeps its (wide) Wilson interval"


def test_a_site_threshold_replaces_only_the_classes_the_sample_labels_enough():
    y, probs = _labels_and_probs(1, 80)
    partial = np.full_like(y, np.nan)
    partial[:, G] = y[:, G]  # the sample labels glaucoma for everyone
    partial[:6, OTHER] = [1, 1, 0, 0, 0, 1]  # and 'other' for six patients: too few
    run = Calibration(tuple(ClassCalibration(1.0 + 0.1 * j, -0.2, 0.3 + 0.05 * j) for j in range(len(LABELS))))
    fitted, report = fit_site_calibration(partial, probs, run)
    assert report["G"]["source"] == "site" and report["O"]["source"] == "run" and "3 positives" in report["O"]["why"]
    for j, c in enumerate(LABELS):
        if c != "G":
            assert fitted.classes[j] == run.classes[j], f"{c} keeps the run's calibration"
    t = raw_thresholds(fitted)[G]
    truth, p = y[:, G].astype(bool), probs[:, G]
    youden = (p[truth] > t).mean() + (p[~truth] <= t).mean()
    grid = np.linspace(0.01, 0.99, 99)
    assert youden >= max((p[truth] > u).mean() + (p[~truth] <= u).mean() for u in grid) - 1e-9
    at_90, _ = fit_site_calibration(partial, probs, run, operating_point=("sensitivity", 0.9))
    assert (p[truth] > raw_thresholds(at_90)[G]).mean() >= 0.9
    # the empty cells are no negatives: with them read as 0, G would have 80 labelled, not the sample's
    assert report["G"]["positives"] + report["G"]["negatives"] == 80
    assert report["O"]["positives"] + report["O"]["negatives"] == 6
