"""Seeded, patient-level, multi-label stratified splits.

Iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML 2011): the rarest label is
distributed first, each of its patients going to the split that most lacks that label, so
rare classes (ODIR's H has 3 % prevalence) land in every split in proportion. A patient is
one unit, so both eyes of a patient always share a split.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import FundusError
from ..labels import SPLITS
from .manifest import Manifest


def check_fractions(fractions: dict[str, float]) -> dict[str, float]:
    """Validate split fractions (known names, non-negative, summing to 1)."""
    unknown = sorted(set(fractions) - set(SPLITS))
    if unknown:
        raise FundusError(f"unknown split name(s) {unknown}; expected {list(SPLITS)}")
    if any(not 0 <= f <= 1 for f in fractions.values()):
        raise FundusError(f"split fractions must lie in [0, 1], got {fractions}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise FundusError(f"split fractions must sum to 1, got {total:.4f} from {fractions}")
    return {name: float(fractions.get(name, 0.0)) for name in SPLITS}


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int = 0) -> np.ndarray:
    """Assign each row of an (n, k) 0/1 ``labels`` array to a split name.

    Returns an array of split names, one per row. Same inputs and seed, same answer.
    """
    fractions = check_fractions(fractions)
    labels = np.asarray(labels, dtype=bool)
    n = labels.shape[0]
    names = list(fractions)
    ratio = np.array([fractions[s] for s in names])
    rng = np.random.default_rng(seed)

    wanted_total = ratio * n
    wanted_label = np.outer(ratio, labels.sum(axis=0)).astype(float)  # (splits, labels)
    assigned = np.full(n, -1)
    order = rng.permutation(n)  # the seed decides ties and visiting order

    def place(i: int, candidates: np.ndarray) -> None:
        best = candidates[wanted_total[candidates] == wanted_total[candidates].max()]
        choice = int(rng.choice(best))
        assigned[i] = choice
        wanted_total[choice] -= 1
        wanted_label[choice] -= labels[i]

    while True:
        remaining = order[assigned[order] < 0]
        if remaining.size == 0:
            break
        counts = labels[remaining].sum(axis=0)
        if counts.sum() == 0:
            for i in remaining:
                place(int(i), np.flatnonzero(ratio > 0))
            break
        rarest = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        for i in remaining[labels[remaining, rarest]]:
            need = wanted_label[:, rarest]
            open_splits = np.flatnonzero(ratio > 0)
            top = open_splits[need[open_splits] == need[open_splits].max()]
            place(int(i), top)
    return np.array(names, dtype=object)[assigned]


def assign_splits(manifest: Manifest, fractions: dict[str, float], seed: int = 0) -> Manifest:
    """A copy of ``manifest`` whose patients carry new stratified splits."""
    splits = stratified_split(manifest.label_matrix(), fractions, seed)
    patients = [replace(p, split=str(s)) for p, s in zip(manifest.patients, splits)]
    return manifest.with_patients(patients)
