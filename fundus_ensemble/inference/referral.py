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
4. **No referable finding**: Normal alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Referral:
    kind: str  # one of KINDS
    text: str  # the line a person reads

    def as_dict(self) -> dict:
        return {"kind": self.kind, "text": self.text}


def _eyes(eyes: Sequence[str]) -> str:
    return " and ".join(f"the {e} eye" for e in eyes)


def refer(decisions: Sequence[bool] | None, retake: dict[str, str] | None = None) -> Referral:
    """The patient's line from its eight decisions (None: no photo was usable) and the eyes whose
    photo was given but could not be used (``retake``: eye to reason)."""
    retake = dict(retake or {})
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
