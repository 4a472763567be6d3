"""The referral line (inference.referral): what to do, in words, by one rule for every way out."""

import pytest

from fundus_ensemble.inference.predict import retake_of
from fundus_ensemble.inference.referral import refer
from fundus_ensemble.labels import LABELS


def decisions(*positive: str) -> list[bool]:
    return [c in positive for c in LABELS]


@pytest.mark.parametrize(
    "positive, kind, text",
    [
        (("N",), "no_referable_finding", "No referable finding"),
        (("G", "D"), "refer", "Refer: suspected diabetic retinopathy, glaucoma"),
        (("A",), "refer", "Refer: suspected age-related macular degeneration"),
        ((), "inconclusive", "Inconclusive: no class decided, not even normal; refer for a manual read"),
        (
            ("N", "D"),
            "inconclusive",
            "Inconclusive: normal and diabetic retinopathy decided together; refer for a manual read",
        ),
    ],
)
def test_each_answer_in_words(positive, kind, text):
    referral = refer(decisions(*positive))
    assert (referral.kind, referral.text) == (kind, text)


def test_an_unreadable_eye_is_retaken_and_never_cleared_by_the_other():
    note = "right: not a readable image (cannot decode); left: x"  # a reason may hold a semicolon itself
    assert retake_of("right: image too dark; retake it; left: retina not found") == {
        "right": "image too dark; retake it",
        "left": "retina not found",
    }
    assert retake_of(note)["right"] == "not a readable image (cannot decode)"
    cleared = refer(decisions("N"), {"right": "not a readable image"})
    assert (
        cleared.kind == "not_gradable"
        and cleared.text == "Not gradable: retake the right eye (right: not a readable image)"
    )
    seen = refer(decisions("C"), {"left": "too dark"})
    assert seen.text == "Not gradable: retake the left eye (left: too dark); suspected cataract in the other eye"
    nothing = refer(None, {"left": "a", "right": "b"})
    assert (
        nothing.kind == "not_gradable"
        and nothing.text == "Not gradable: retake the left eye and the right eye (left: a; right: b)"
    )
    with pytest.raises(ValueError):
        refer([True, False])


@pytest.mark.parametrize(
    "positive, kind, text",
    [
        (("N",), "no_referable_finding", "No referable finding in the left eye; the right eye was not screened"),
        (("G",), "refer", "Refer: suspected glaucoma (left eye); the right eye was not screened"),
        (
            (),
            "inconclusive",
            "Inconclusive: no class decided, not even normal; refer for a manual read (left eye); "
            "the right eye was not screened",
        ),
    ],
)
def test_an_answer_from_one_eye_says_which_and_that_the_other_was_not_screened(positive, kind, text):
    referral = refer(decisions(*positive), not_screened=["right"])
    assert (referral.kind, referral.text) == (kind, text)
    # an eye given but unreadable is a retake, not "not screened"
    retake = refer(decisions("N"), {"right": "too dark"}, not_screened=["right"])
    assert retake.kind == "not_gradable" and "not screened" not in retake.text
    with pytest.raises(ValueError):
        refer(decisions("N"), not_screened=["left", "right"])


@pytest.mark.parametrize("c", LABELS[1:])
def test_every_finding_alone_refers_by_its_name_and_with_normal_is_inconclusive(c):
    from fundus_ensemble.inference.referral import FINDINGS

    alone = refer(decisions(c))
    assert (alone.kind, alone.text) == ("refer", f"Refer: suspected {FINDINGS[c]}")
    both = refer(decisions("N", c))
    assert both.kind == "inconclusive" and f"normal and {FINDINGS[c]} decided together" in both.text
    # each finding has its own words: a slip that names the neighbouring class fails here
    assert len(set(FINDINGS.values())) == len(LABELS)


@pytest.mark.parametrize("poor_kind", ["no_referable_finding", "refer", "inconclusive"])
def test_a_poor_photo_never_clears_and_says_what_to_do(poor_kind):
    positive = {"no_referable_finding": ("N",), "refer": ("C",), "inconclusive": ()}[poor_kind]
    line = refer(decisions(*positive), poor={"left": "blurred (sharpness 0.21)"})
    assert line.kind != "no_referable_finding"
    assert "the left photo is blurred (sharpness 0.21)" in line.text
    if poor_kind == "no_referable_finding":
        assert line.kind == "inconclusive" and "a cloudy lens" in line.text
    else:
        assert line.kind == poor_kind


def test_the_referral_score_past_its_threshold_refers_a_patient_normal_alone():
    cleared = refer(decisions("N"), referral=(0.30, 0.41))
    assert cleared.kind == "no_referable_finding"
    referred = refer(decisions("N"), referral=(0.52, 0.41))
    assert referred.kind == "refer" and "a referable finding is likely (score 0.52 above 0.41)" in referred.text
    # a finding decided is named whatever the score
    assert refer(decisions("G"), referral=(0.10, 0.41)).text == "Refer: suspected glaucoma"


def test_the_referral_threshold_is_set_for_the_stated_sensitivity_out_of_fold():
    import numpy as np

    from fundus_ensemble.evaluation.calibration import fit_referral, referral_scores

    rng = np.random.default_rng(0)
    y = np.zeros((400, 8), int)
    sick = rng.random(400) < 0.6
    y[~sick, 0] = 1
    y[sick, 1] = 1
    p = rng.random((400, 8))
    p[:, 0] = np.clip(0.5 + 0.3 * (~sick) - 0.3 * sick + rng.normal(0, 0.2, 400), 0.01, 0.99)
    fitted = fit_referral(y, p, 0.9)
    score = referral_scores(p)
    assert fitted["sensitivity"] == (score[sick] > fitted["threshold"]).mean() >= 0.9
    assert (score[sick] > fitted["threshold"] + 1e-3).mean() < 0.9 + 1 / sick.sum() + 0.01, "the highest such threshold"
    assert fitted["specificity"] == (score[~sick] <= fitted["threshold"]).mean() > 0.3
