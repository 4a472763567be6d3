"""Another camera, without a labelled sample: align a site's photo features to the training photos'.

A new camera moves every photo's frozen features (colour, brightness, sharpness, the retina's size
in the frame); the heads then rank patients almost as well but their thresholds no longer fit. A
site's photos also differ from the training photos in their case mix, and standardising all of a
site's features to the training photos' mean and spread removes the disease along with the camera
(on disease-enriched sources it halved the share of myopic eyes decided M).

So the alignment is anchored on the photos that look normal, which carry the camera's shift and
little of the case mix: per view, the :data:`NORMAL_FRACTION` of the training eyes with the highest
probability of Normal (the one-eye head's out-of-fold answer) gives a reference mean and spread
(:class:`FeatureReference`, fitted with the run); at a site, the same share of its photos ranked
the same way gives the site's, and every site photo's features are moved by
``x - site_mean + reference_mean`` (:class:`SiteAlignment`; matching the spreads too was measured
to do far more harm than good). The
ranking is redone on the moved features a few times (:data:`ITERATIONS`), since the first ranking
is made through the shift.

The reference also says how far a photo's features lie from the training photos'
(:meth:`FeatureReference.distance`: in the training eyes' principal components, each scaled to
unit variance), with the distance that :data:`FALSE_WARNINGS` of held-back training photos exceed:
a photo beyond it looks unlike the training photos, and a batch with many such photos is one
:func:`...inference.site` adaptation is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FundusError
from .heads import LinearHead

NORMAL_FRACTION = 0.3  # the share of training eyes, most normal-looking first, that anchors the alignment
ITERATIONS = 5
MIN_ANCHOR, MIN_ANCHOR_SHARE = 10, 0.1  # the fewest site photos an alignment is anchored on
COMPONENTS = 32  # principal components of the training eyes' features the distance is measured in
FALSE_WARNINGS = 0.01  # held-back training photos flagged as unlike the training photos
MIN_SITE_PHOTOS = 50
_EPS = 1e-6


ANCHORS = ("fraction", "level")


def normal_looking(features: np.ndarray, head: LinearHead, reference: FeatureReference, anchor: str) -> np.ndarray:
    """Indices of the photos (rows of ``features``) that anchor an alignment, by the Normal
    probability of the one-eye ``head`` (its first class is Normal): ``fraction``, the reference's
    share of them, most normal-looking first; ``level``, those reaching the probability the
    reference's anchor reaches. At least :data:`MIN_ANCHOR` photos either way."""
    p_normal = head.predict(features)[:, 0]
    least = min(len(features), max(MIN_ANCHOR, int(round(MIN_ANCHOR_SHARE * len(features)))))
    order = np.argsort(-p_normal, kind="stable")
    if anchor == "fraction":
        return order[: max(least, int(round(reference.fraction * len(features))))]
    if anchor != "level":
        raise FundusError(f"unknown anchor {anchor!r}; choose one of {', '.join(ANCHORS)}")
    chosen = np.flatnonzero(p_normal >= reference.normal_level)
    return chosen if len(chosen) >= least else order[:least]


@dataclass
class FeatureReference:
    """The training photos' features of one view: the normal-looking anchor and the distance scale."""

    normal_mean: np.ndarray  # (F,)
    normal_spread: np.ndarray  # (F,)
    mean: np.ndarray  # (F,) of every training eye
    components: np.ndarray  # (K, F) principal directions
    scales: np.ndarray  # (K,) their standard deviations
    warn_distance: float  # exceeded by FALSE_WARNINGS of held-back training photos
    normal_level: float  # the Normal probability the anchor's eyes reach
    fraction: float = NORMAL_FRACTION  # the share of the training eyes in the anchor

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Each photo's root-mean-square distance from the training eyes in their scaled principal
        components (1 is typical)."""
        z = (np.asarray(features, np.float64) - self.mean) @ self.components.T / self.scales
        return np.sqrt(np.mean(z**2, axis=1))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "normal_mean": self.normal_mean,
            "normal_spread": self.normal_spread,
            "mean": self.mean,
            "components": self.components,
            "scales": self.scales,
            "warn_distance": np.array(self.warn_distance),
            "normal_level": np.array(self.normal_level),
            "fraction": np.array(self.fraction),
        }

    @classmethod
    def load(cls, path) -> FeatureReference:
        """A ``reference.npz``, its headers checked before its arrays are read (:func:`..fileio.read_npz`)."""
        from ..fileio import read_npz

        shapes = {
            "normal_mean": (None,),
            "normal_spread": (None,),
            "mean": (None,),
            "components": (None, None),
            "scales": (None,),
            "warn_distance": (),
            "normal_level": (),
            "fraction": (),
        }
        return cls.from_arrays(read_npz(path, "a feature reference", shapes), str(path))

    @classmethod
    def from_arrays(cls, data, source: str = "feature reference") -> FeatureReference:
        try:
            ref = cls(
                *(np.asarray(data[k], np.float64) for k in ("normal_mean", "normal_spread", "mean", "components")),
                np.asarray(data["scales"], np.float64),
                float(data["warn_distance"]),
                float(data["normal_level"]),
                float(data["fraction"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise FundusError(f"{source}: not a feature reference ({exc})") from None
        f = ref.mean.shape
        ok = (
            ref.normal_mean.shape == f
            and ref.normal_spread.shape == f
            and ref.components.ndim == 2
            and ref.components.shape[1:] == f
            and ref.scales.shape == ref.components.shape[:1]
            and all(np.isfinite(a).all() for a in (ref.normal_mean, ref.normal_spread, ref.mean, ref.components))
            and (ref.scales > 0).all()
            and (ref.normal_spread > 0).all()
            and np.isfinite(ref.warn_distance)
            and ref.warn_distance > 0
            and 0 < ref.normal_level < 1
            and 0 < ref.fraction <= 1
        )
        if not ok:
            raise FundusError(
                f"{source}: a feature reference needs finite arrays of one feature size and positive scales"
            )
        return ref


def _principal(features: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    _, s, vt = np.linalg.svd(features - mean, full_matrices=False)
    k = min(components, len(vt))
    return mean, vt[:k], s[:k] / np.sqrt(max(1, len(features) - 1)) + _EPS


def fit_reference(
    features: np.ndarray,
    p_normal: np.ndarray,
    folds: np.ndarray,
    fraction: float = NORMAL_FRACTION,
    components: int = COMPONENTS,
) -> FeatureReference:
    """The reference of one view from the training eyes' features ``(eyes, F)``, their out-of-fold
    Normal probability (one-eye head) and their patients' folds: the anchor from the ``fraction``
    most normal-looking eyes; the distance's warning level from each fold's eyes measured against
    principal components fitted without them (held back, as a new site's photos are)."""
    features = np.asarray(features, np.float64)
    p_normal, folds = np.asarray(p_normal, np.float64), np.asarray(folds)
    if features.ndim != 2 or len(p_normal) != len(features) or len(folds) != len(features):
        raise FundusError(f"features {features.shape}, {len(p_normal)} probabilities and {len(folds)} folds differ")
    level = float(np.quantile(p_normal, 1 - fraction))
    anchor = features[p_normal >= level]
    held_distances = []
    for f in np.unique(folds):
        mean, vt, scales = _principal(features[folds != f], components)
        z = (features[folds == f] - mean) @ vt.T / scales
        held_distances.append(np.sqrt(np.mean(z**2, axis=1)))
    mean, vt, scales = _principal(features, components)
    return FeatureReference(
        anchor.mean(axis=0),
        anchor.std(axis=0) + _EPS,
        mean,
        vt,
        scales,
        float(np.quantile(np.concatenate(held_distances), 1 - FALSE_WARNINGS)),
        level,
        fraction,
    )


@dataclass
class SiteAlignment:
    """One view's move of a site's photo features onto the training photos' (see the module doc)."""

    site_mean: np.ndarray
    site_spread: np.ndarray
    reference: FeatureReference

    @property
    def scale(self) -> np.ndarray:
        return self.reference.normal_spread / self.site_spread

    @property
    def shift(self) -> np.ndarray:
        return self.reference.normal_mean - self.site_mean * self.scale

    def apply(self, features: np.ndarray) -> np.ndarray:
        """``scale * x + shift`` per feature (the scale is positive)."""
        return (np.asarray(features, np.float64) * self.scale + self.shift).astype(np.float32)

    def fold(self, head: LinearHead, parts: int = 1) -> LinearHead:
        """``head`` on aligned features as a head on the site's own: exact, since the alignment is
        affine per feature with a positive scale, so max and mean of aligned eyes are the aligned max
        and mean. ``parts``: copies of the feature space the head reads side by side (2 for
        concat(max, mean))."""
        blocks = np.split(np.asarray(head.weights, np.float64), parts)
        if any(b.shape[0] != self.scale.shape[0] for b in blocks):
            raise FundusError(
                f"a head on {head.weights.shape[0]} inputs is not {parts} x {self.scale.shape[0]} features"
            )
        weights = np.concatenate([b * self.scale[:, None] for b in blocks])
        bias = np.asarray(head.bias, np.float64) + sum(self.shift @ b for b in blocks)
        return LinearHead(weights, bias)

    def to_dict(self) -> dict:
        return {"site_mean": [float(v) for v in self.site_mean], "site_spread": [float(v) for v in self.site_spread]}

    @classmethod
    def from_dict(cls, data, reference: FeatureReference, source: str) -> SiteAlignment:
        try:
            mean = np.asarray(data["site_mean"], np.float64)
            spread = np.asarray(data["site_spread"], np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise FundusError(f"{source}: not a site alignment ({exc})") from None
        size = reference.mean.shape
        if mean.shape != size or spread.shape != size:
            raise FundusError(f"{source}: {mean.shape[0] if mean.ndim else 0} features, the run's have {size[0]}")
        if not (np.isfinite(mean).all() and np.isfinite(spread).all() and (spread > 0).all()):
            raise FundusError(f"{source}: site means must be finite and spreads finite and above 0")
        return cls(mean, spread, reference)


def fit_alignment(
    site_features: np.ndarray,
    reference: FeatureReference,
    head: LinearHead,
    iterations: int = ITERATIONS,
    anchor: str = "fraction",
    rescale: bool = False,
) -> SiteAlignment:
    """Align a site's photos ``(photos, F)`` of one view (no labels) on those the one-eye ``head``
    finds most normal-looking (:func:`normal_looking` with ``anchor``), chosen again on the aligned
    features each iteration. The mean only moves (``rescale`` True also matches each feature's
    spread: measured on ODIR under 13 camera shifts, spreads of 1280 features taken from a few
    dozen photos cost 0.29 of pooled AUC even with no shift at all, docs/inference.md)."""
    site = np.asarray(site_features, np.float64)
    if site.ndim != 2 or site.shape[1] != reference.mean.shape[0]:
        raise FundusError(f"site features {site.shape} do not match the reference's {reference.mean.shape[0]}")
    if len(site) < MIN_SITE_PHOTOS:
        raise FundusError(f"{len(site)} photos of the site; aligning needs {MIN_SITE_PHOTOS} or more")
    alignment = SiteAlignment(reference.normal_mean, reference.normal_spread, reference)  # the identity
    for _ in range(max(1, iterations)):
        chosen = site[normal_looking(alignment.apply(site), head, reference, anchor)]
        spread = chosen.std(axis=0) + _EPS if rescale else reference.normal_spread
        alignment = SiteAlignment(chosen.mean(axis=0), spread, reference)
    return alignment
