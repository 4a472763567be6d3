"""Per-eye labels from ODIR's keywords, checked against the patient labels."""

import numpy as np
import pytest

from fundus_ensemble.data.keywords import (
    compare_with_patient_labels,
    eye_labels,
    keyword_class,
    patient_labels_from_eyes,
    split_keywords,
)
from fundus_ensemble.data.manifest import Patient, load_manifest
from fundus_ensemble.labels import LABELS


def vector(*classes):
    return np.array([int(c in classes) for c in LABELS])


def test_official_keywords_map_to_their_classes():
    assert keyword_class("moderate non proliferative retinopathy") == "D"
    assert keyword_class("Suspected Glaucoma ") == "G"
    assert keyword_class("wet age-related macular degeneration") == "A"
    assert keyword_class("drusen") == "O"  # ODIR counts drusen alone as other, not AMD
    assert keyword_class("a finding nobody listed") == "O"
    assert keyword_class("lens dust") is None


def test_eye_labels_split_full_width_commas_and_set_normal():
    assert split_keywords("cataract，drusen; lens dust") == ["cataract", "drusen", "lens dust"]
    assert eye_labels("cataract，drusen").tolist() == vector("C", "O").tolist()
    assert eye_labels("normal fundus，lens dust").tolist() == vector("N").tolist()
    assert eye_labels("") is None and eye_labels(None) is None


def test_patient_is_or_of_eyes_and_normal_only_when_both_are():
    both = patient_labels_from_eyes(vector("N"), vector("D", "O"))
    assert both.tolist() == vector("D", "O").tolist()
    assert patient_labels_from_eyes(vector("N"), vector("N")).tolist() == vector("N").tolist()


def test_comparison_counts_disagreements(tmp_path):
    def patient(pid, labels, left, right):
        return Patient(
            pid,
            f"{pid}_l.jpg",
            f"{pid}_r.jpg",
            tuple(vector(*labels)),
            "train",
            {"left_keywords": left, "right_keywords": right},
        )

    patients = [
        patient("1", "D", "mild nonproliferative retinopathy", "normal fundus"),  # agrees
        patient("2", "DO", "mild nonproliferative retinopathy", "normal fundus"),  # O from outside the photos
        patient("3", "N", "normal fundus", "cataract"),  # keyword C, labelled normal
        patient("4", "O", "strange new finding", "normal fundus"),  # unknown keyword: O, agrees
        Patient("5", "5_l.jpg", "", tuple(vector("N")), "train", {}),  # no keywords
    ]
    report = compare_with_patient_labels(patients)
    assert (report.patients, report.agree, report.skipped) == (4, 2, 1)
    assert report.missing["O"] == 1 and report.extra["C"] == 1 and report.missing["N"] == 1
    assert report.unknown_keywords == {"strange new finding": 1}
    assert "2 of 4 patients (50.0%)" in report.lines()[0]


def test_synthetic_keywords_explain_the_synthetic_labels(small_dataset):
    report = compare_with_patient_labels(load_manifest(small_dataset).patients)
    assert report.patients == 24 and report.agree == 24 and not report.unknown_keywords


@pytest.mark.parametrize("text", ["glaucoma", "pathological myopia", "hypertensive retinopathy"])
def test_single_findings_are_not_normal(text):
    labels = eye_labels(text)
    assert labels[LABELS.index("N")] == 0 and labels.sum() == 1


def test_eye_label_targets_follow_the_photo_each_input_gets():
    from pathlib import Path

    from fundus_ensemble.data.batches import manifest_eye_labels
    from fundus_ensemble.data.manifest import Manifest, Patient

    zeros = (0,) * 8
    patients = (
        Patient("both", "a.jpg", "b.jpg", zeros, "train", {"left_keywords": "cataract", "right_keywords": ""}),
        Patient("left only", "c.jpg", None, zeros, "train", {"left_keywords": "glaucoma"}),
        Patient("right only", None, "d.jpg", zeros, "train", {"right_keywords": "normal fundus"}),
    )
    targets = manifest_eye_labels(Manifest(patients, Path(".")))
    c, g, n = (eye_labels(k).tolist() for k in ("cataract", "glaucoma", "normal fundus"))
    assert targets[0, 0].tolist() == c and (targets[0, 1] == -1).all()  # an eye without keywords is unknown
    assert targets[1].tolist() == [g, g]  # the missing right input is fed the left photo
    assert targets[2].tolist() == [n, n]
