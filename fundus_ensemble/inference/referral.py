"""One line per patient that a nurse can act on: refer or not, and why, in words.

The eight decisions of the ODIR labels are what the model says; a screening programme needs
what to do. The rule, in order:

1. **Not gradable**: no photo could be read, or one that was given could not be (the other eye
   alone cannot clear the patient): retake it. A disease seen in the readable eye is still
   named, since it is already a reason to refer.
2. **Inconclusive**: nothing decided positive, not even Normal; or Normal decided together with a
   disease. The model contradicts itself or says nothing: refer for a manual read.
3. **Refer**: a disease decided positive, named in full ("suspected glaucoma, diabetic
   retinopathy").
4. **No referable finding**: Normal alone, and the "any referable finding" score (1 - p(N))
   at or below its threshold, set on out-of-fold predictions for 90 % sensitivity; above it the
   patient is referred though no single finding is decided.

With one eye's photo (the other not given), the decisions are that eye's alone, and the line
says so: "No referable finding in the left eye; the right eye was not screened". A photo screened
though hard to read (blurred, washed out, dark, pale: a cloudy lens does this) never clears: the
line says to retake it and, if a retake is no clearer, to refer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..data.quality import POOR_ADVICE
from ..labels import LABELS

# what each ODIR label is called where a person reads a referral
FINDINGS: dict[str, str] = {
    "N": "normal",
    "D": "diabetic retinopathy",
    "G": "glaucoma",
    "C": "cataract",
    "A": "age-related macular degeneration",
    "H": "hypertensive retinopathy",
    "M": "pathological myopia",
    "O": "another abnormality",
}
KINDS = ("refer", "no_referable_finding", "inconclusive", "not_gradable")


def counts_text(counts: dict[str, int]) -> str:
    """How many patients got each referral kind, in words (predict's console line, the report's header)."""
    return ", ".join(f"{counts[kind]} {kind.replace('_', ' ')}" for kind in KINDS)


@dataclass(frozen=True)
class Referral:
    kind: str  # one of KINDS
    text: str  # the line a person reads

    def as_dict(self) -> dict:
        return {"kind": self.kind, "text": self.text}


def _eyes(eyes: Sequence[str]) -> str:
    return " and ".join(f"the {e} eye" for e in eyes)


def refer(
    decisions: Sequence[bool] | None,
    retake: dict[str, str] | None = None,
    not_screened: Sequence[str] = (),
    poor: dict[str, str] | None = None,
    referral: tuple[float, float] | None = None,
) -> Referral:
    """The patient's line from its eight decisions (None: no photo was usable), the eyes whose
    photo was given but could not be used (``retake``: eye to reason), the eyes no photo was
    given of (``not_screened``): the decisions are then about the other eye alone, and the line says
    which eye they are about and that the other was not screened; and the eyes whose photo was
    screened though hard to read (``poor``: eye to reason, :data:`..data.quality.POOR`): such a photo
    never clears the patient, and the line says to retake it and, if a retake is no clearer, to refer."""
    retake = dict(retake or {})
    score = referral
    referral = _refer(decisions, retake)
    if score is not None and referral.kind == "no_referable_finding" and score[0] > score[1]:
        # Normal alone, yet the "any referable finding" score is past the threshold set for the stated
        # sensitivity: the patient is referred, though no single finding is decided
        referral = Referral(
            "refer",
            f"Refer: a referable finding is likely (score {score[0]:.2f} above {score[1]:.2f}), no single finding decided",
        )
    poor = {e: r for e, r in (poor or {}).items() if e not in retake}
    if decisions is not None and poor and referral.kind != "not_gradable":
        photos = "; ".join(f"the {e} photo is {r}" for e, r in sorted(poor.items()))
        if referral.kind == "no_referable_finding":
            referral = Referral("inconclusive", f"Inconclusive: {photos}: {POOR_ADVICE}")
        else:
            referral = Referral(referral.kind, f"{referral.text}; {photos}")
    missing = sorted(set(not_screened) - set(retake))
    if decisions is None or not missing:
        return referral
    if len(missing) == 2:
        raise ValueError("decisions were given, yet neither eye was screened")
    seen = "right" if missing == ["left"] else "left"
    about = f" in the {seen} eye" if referral.kind == "no_referable_finding" else f" ({seen} eye)"
    return Referral(referral.kind, f"{referral.text}{about}; the {missing[0]} eye was not screened")


def _refer(decisions: Sequence[bool] | None, retake: dict[str, str]) -> Referral:
    if decisions is None:
        eyes = sorted(retake) or ["left", "right"]
        why = "; ".join(f"{e}: {r}" for e, r in sorted(retake.items()))
        return Referral("not_gradable", f"Not gradable: retake {_eyes(eyes)}" + (f" ({why})" if why else ""))
    if len(decisions) != len(LABELS):
        raise ValueError(f"expected {len(LABELS)} decisions, got {len(decisions)}")
    positive = [c for c, d in zip(LABELS, decisions) if d]
    diseases = [FINDINGS[c] for c in positive if c != "N"]
    if retake:
        seen = f"; suspected {', '.join(diseases)} in the other eye" if diseases else ""
        why = "; ".join(f"{e}: {r}" for e, r in sorted(retake.items()))
        return Referral("not_gradable", f"Not gradable: retake {_eyes(sorted(retake))} ({why}){seen}")
    if not positive:
        return Referral("inconclusive", "Inconclusive: no class decided, not even normal; refer for a manual read")
    if "N" in positive and diseases:
        return Referral(
            "inconclusive",
            f"Inconclusive: normal and {', '.join(diseases)} decided together; refer for a manual read",
        )
    if diseases:
        return Referral("refer", f"Refer: suspected {', '.join(diseases)}")
    return Referral("no_referable_finding", "No referable finding")
