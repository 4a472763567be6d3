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
