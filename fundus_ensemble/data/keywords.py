"""Per-eye labels from ODIR's diagnostic keywords.

ODIR's eight labels belong to the patient, but each photo carries the clinicians' keywords
for that eye (``left_keywords`` / ``right_keywords`` in a manifest). This maps them to the
eight classes per eye, following the ODIR-2019 annotation: retinopathy of any stage is D,
glaucoma (also suspected) G, cataract C, dry or wet age-related macular degeneration A,
hypertensive retinopathy H, pathological myopia M; every other finding (epiretinal
membrane, drusen, myelinated fibres, vein occlusion, ...) is O, ODIR's catch-all. Keywords
about the photo rather than the eye (lens dust, low image quality, ...) are no finding.
An eye is N when it has no finding at all.

A patient's D..O should then be the OR of its eyes', and its N the AND (normal only when
both eyes are). :func:`compare_with_patient_labels` measures how often that holds; on
odir5k-256-dev it does not always (a patient can carry a label from information outside
the photographs), which is why the patient labels stay the ones that are scored.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..labels import LABELS

KEYWORD_CLASSES: dict[str, str] = {
    "mild nonproliferative retinopathy": "D",
    "moderate non proliferative retinopathy": "D",
    "severe nonproliferative retinopathy": "D",
    "proliferative diabetic retinopathy": "D",
    "severe proliferative diabetic retinopathy": "D",
    "diabetic retinopathy": "D",
    "suspected diabetic retinopathy": "D",
    "glaucoma": "G",
    "suspected glaucoma": "G",
    "cataract": "C",
    "dry age-related macular degeneration": "A",
    "wet age-related macular degeneration": "A",
    "hypertensive retinopathy": "H",
    "pathological myopia": "M",
    "myopic maculopathy": "M",
}
# ODIR's "other" findings seen in odir5k-256-dev; a keyword in no list is counted as O too, and reported
OTHER_KEYWORDS: frozenset[str] = frozenset(
    {
        "macular epiretinal membrane",
        "epiretinal membrane",
        "epiretinal membrane over the macula",
        "suspected macular epimacular membrane",
        "drusen",
        "myelinated nerve fibers",
        "vitreous degeneration",
        "vitreous opacity",
        "refractive media opacity",
        "laser spot",
        "post laser photocoagulation",
        "fundus laser photocoagulation spots",
        "maculopathy",
        "branch retinal vein occlusion",
        "old branch retinal vein occlusion",
        "old central retinal vein occlusion",
        "atrophic change",
        "white vessel",
        "spotted membranous change",
        "vessel tortuosity",
        "chorioretinal atrophy",
        "diffuse chorioretinal atrophy",
        "optic disc edema",
        "optic nerve atrophy",
        "retinitis pigmentosa",
        "retina fold",
        "retinal pigmentation",
        "retinal pigment epithelial hypertrophy",
        "choroidal nevus",
        "diffuse retinal atrophy",
        "tessellated fundus",
    }
)
# about the photograph, not the eye
NO_FINDING: frozenset[str] = frozenset(
    {
        "normal fundus",
        "normal",
        "lens dust",
        "low image quality",
        "image offset",
        "optic disk photographically invisible",
        "no fundus image",
        "anterior segment image",
    }
)
_SEPARATORS = re.compile(r"[,，;；]")


def split_keywords(text: str) -> list[str]:
    """``'cataract，drusen'`` to ``['cataract', 'drusen']`` (ASCII or full-width commas, any case)."""
    return [k.strip().lower() for k in _SEPARATORS.split(text or "") if k.strip()]


def keyword_class(keyword: str) -> str | None:
    """The class of one keyword: a letter of D..O, or None for no finding. Unknown findings are O."""
    keyword = keyword.strip().lower()
    if keyword in NO_FINDING:
        return None
    return KEYWORD_CLASSES.get(keyword, "O")


def is_known(keyword: str) -> bool:
    keyword = keyword.strip().lower()
    return keyword in KEYWORD_CLASSES or keyword in OTHER_KEYWORDS or keyword in NO_FINDING


def eye_labels(text: str | None) -> np.ndarray | None:
    """The eye's eight 0/1 labels from its keywords, or None when it has none (unknown)."""
    keywords = split_keywords(text or "")
    if not keywords:
        return None
    classes = {keyword_class(k) for k in keywords} - {None}
    labels = np.array([int(c in classes) for c in LABELS], np.int64)
    labels[LABELS.index("N")] = int(not classes)
    return labels


def patient_labels_from_eyes(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """D..O: either eye; N: both eyes normal."""
    combined = np.maximum(left, right)
    combined[LABELS.index("N")] = int(left[LABELS.index("N")] and right[LABELS.index("N")])
    return combined


@dataclass
class KeywordComparison:
    """How the eyes' keyword labels agree with the official patient labels."""

    patients: int = 0  # with keywords for every photo they have
    agree: int = 0
    missing: Counter = field(
        default_factory=Counter
    )  # class -> patients labelled positive that no eye's keywords explain
    extra: Counter = field(
        default_factory=Counter
    )  # class -> patients whose eyes' keywords say positive, labelled negative
    unknown_keywords: Counter = field(default_factory=Counter)  # keywords in no list (counted as O)
    skipped: int = 0  # patients with a photo but no keywords

    def lines(self) -> list[str]:
        share = self.agree / self.patients if self.patients else float("nan")
        out = [
            f"{self.agree} of {self.patients} patients ({share:.1%}) have labels equal to their eyes' keywords "
            f"(D..O: either eye; N: both eyes); {self.skipped} without keywords skipped"
        ]
        if self.missing["N"] or self.extra["N"]:
            out.append(
                f"  N: {self.missing['N']} labelled normal though an eye has a finding, "
                f"{self.extra['N']} with both eyes normal by their keywords but labelled not normal"
            )
        for c in LABELS[1:]:
            if self.missing[c] or self.extra[c]:
                out.append(
                    f"  {c}: {self.missing[c]} labelled positive without a keyword for it, "
                    f"{self.extra[c]} with a keyword but labelled negative"
                )
        if self.unknown_keywords:
            out.append(
                "  keywords in no list (counted as O): "
                + ", ".join(f"{k} ({n})" for k, n in self.unknown_keywords.most_common())
            )
        return out


def compare_with_patient_labels(patients) -> KeywordComparison:
    """Compare each patient's labels with those of its eyes' keywords (``manifest.Patient`` objects)."""
    report = KeywordComparison()
    for p in patients:
        eyes = []
        for eye, image in (("left", p.left_image), ("right", p.right_image)):
            if image:
                text = p.extra.get(f"{eye}_keywords", "")
                report.unknown_keywords.update(k for k in split_keywords(text) if not is_known(k))
                eyes.append(eye_labels(text))
        if not eyes or any(e is None for e in eyes):
            report.skipped += 1
            continue
        derived = patient_labels_from_eyes(eyes[0], eyes[-1])
        official = np.asarray(p.labels, np.int64)
        report.patients += 1
        report.agree += int((derived == official).all())
        for j, c in enumerate(LABELS):
            report.missing[c] += int(official[j] == 1 and derived[j] == 0)
            report.extra[c] += int(official[j] == 0 and derived[j] == 1)
    return report
