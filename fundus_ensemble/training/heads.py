"""Patient heads on frozen features, cross-fitted over every development patient.

A head reads a patient's two eye features ``(patients, 2, F)`` fused without regard to their
order (:func:`fuse`; ``max_mean`` is the patient model's own :class:`..models.patient_classifier.EyeFusion`),
standardises them on its training patients and learns one L2-regularised logistic regression
per class. That is the linear probe, and the cheapest honest use of a frozen backbone; what
this module adds is how it is fitted:

- **cross-fitting** (:func:`cross_fit`): ``k`` heads, each on all development patients but one
  fold, predict that fold: every patient gets an out-of-fold prediction from a head that never
  saw it, so calibration and per-class thresholds are fitted on every patient
  (:func:`..evaluation.calibration.fit_calibration`), not on a 15 % validation split. The
  ``k`` heads then predict new patients together (:attr:`CrossFit.bagged`): their weights
  averaged, which averages their logits, so the bag is one linear head again and goes into the
  patient model's ``labels`` layer unchanged (:func:`set_patient_head`);
- the regularisation ``C`` is chosen by the out-of-fold pooled AUC over a grid, so nothing
  else is held back for it.

Everything here is numpy and scikit-learn on features: seconds, not epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import FundusError
from ..metrics import odir_score

C_GRID: tuple[float, ...] = (0.0003, 0.001, 0.003, 0.01)
FUSIONS = ("max_mean", "max_mean_diff", "mean")
DEFAULT_FOLDS = 5
DEFAULT_POWER = 0.5  # models.losses.DEFAULT_POWER: the networks' weighted BCE (a test keeps them equal)


def fuse(features: np.ndarray, fusion: str = "max_mean") -> np.ndarray:
    """``(patients, 2, F)`` eye features to one row per patient, the same whichever eye comes first:
    ``max_mean`` concat(max, mean) (the patient model's fusion), ``max_mean_diff`` with |left - right|
    beside them (how much the eyes differ), ``mean`` their mean alone."""
    features = np.asarray(features, np.float32)
    if features.ndim != 3 or features.shape[1] != 2:
        raise FundusError(f"eye features must be (patients, 2, F), got shape {features.shape}")
    parts = {
        "max_mean": [features.max(1), features.mean(1)],
        "max_mean_diff": [features.max(1), features.mean(1), np.abs(features[:, 0] - features[:, 1])],
        "mean": [features.mean(1)],
    }
    if fusion not in parts:
        raise FundusError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    return np.concatenate(parts[fusion], axis=1)


@dataclass
class LinearHead:
    """``sigmoid(x @ weights + bias)`` on fused features ``x``, one column per class."""

    weights: np.ndarray  # (D, classes), in the raw feature space (the standardisation folded in)
    bias: np.ndarray  # (classes,)

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = np.asarray(x, np.float64) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    @classmethod
    def mean(cls, heads: list[LinearHead]) -> LinearHead:
        return cls(np.mean([h.weights for h in heads], axis=0), np.mean([h.bias for h in heads], axis=0))

    def as_max_mean(self, fusion: str) -> LinearHead:
        """The same head on concat(max, mean) of the eyes, the patient model's fusion: since
        max(l, r) = mean + |l - r| / 2, the |l - r| part of ``max_mean_diff`` is 2 (max - mean), and
        ``mean`` alone is concat(max, mean) with no weight on max. Exact, not an approximation."""
        if fusion == "max_mean":
            return self
        if fusion == "mean":
            return LinearHead(np.concatenate([np.zeros_like(self.weights), self.weights]), self.bias)
        if fusion == "max_mean_diff":
            w_max, w_mean, w_diff = np.split(self.weights, 3)
            return LinearHead(np.concatenate([w_max + 2 * w_diff, w_mean - 2 * w_diff]), self.bias)
        raise FundusError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")


def fit_linear_head(
    x: np.ndarray, y: np.ndarray, c: float, seed: int = 0, pos_weight_power: float = DEFAULT_POWER
) -> LinearHead:
    """Per-class logistic regressions (L2, ``C = c``) on ``x`` standardised with its own mean and
    spread, each class's positives weighted ``(negatives / positives) ** pos_weight_power`` (the
    paper's weighted binary cross-entropy, as :func:`..models.losses.positive_weights` weighs it
    for the networks); a class with one value among these rows gets a constant at its prevalence."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    weights = np.zeros((x.shape[1], y.shape[1]))
    bias = np.zeros(y.shape[1])
    for k in range(y.shape[1]):
        column = y[:, k]
        if column.min() == column.max():
            p = np.clip(column.mean(), 1e-4, 1 - 1e-4)
            bias[k] = np.log(p / (1 - p))
            continue
        positive = float(column.mean())
        weight = ((1 - positive) / positive) ** pos_weight_power
        model = LogisticRegression(C=c, max_iter=3000, random_state=seed, class_weight={0: 1.0, 1: weight}).fit(
            z, column
        )
        weights[:, k] = model.coef_[0] / scale
        bias[k] = model.intercept_[0] - float(np.dot(model.coef_[0], mean / scale))
    return LinearHead(weights, bias)


def patient_folds(n: int, folds: int, seed: int, y: np.ndarray | None = None) -> np.ndarray:
    """Each patient's fold (0 .. folds-1): stratified by label when ``y`` is given (so rare
    classes fall in every fold), seeded."""
    if folds < 2 or folds > n:
        raise FundusError(f"cross-fitting needs 2 to {n} folds, got {folds}")
    if y is None:
        return np.random.default_rng(seed).permutation(np.arange(n) % folds)
    return _stratified_folds(np.asarray(y, bool), folds, seed)


def _stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Iterative stratification into ``folds`` equal folds (rarest label first, as
    :func:`..data.splits.stratified_split` does for the three splits)."""
    n = len(y)
    rng = np.random.default_rng(seed)
    wanted_total = np.full(folds, n / folds)
    wanted_label = np.outer(np.full(folds, 1 / folds), y.sum(axis=0))
    assigned = np.full(n, -1)
    order = rng.permutation(n)
    while True:
        remaining = order[assigned[order] < 0]
        if remaining.size == 0:
            break
        counts = y[remaining].sum(axis=0)
        if counts.sum() == 0:
            for i in remaining:
                best = np.flatnonzero(wanted_total == wanted_total.max())
                choice = int(rng.choice(best))
                assigned[i], wanted_total[choice] = choice, wanted_total[choice] - 1
            break
        rarest = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        for i in remaining[y[remaining, rarest]]:
            need = wanted_label[:, rarest]
            top = np.flatnonzero(need == need.max())
            top = top[wanted_total[top] == wanted_total[top].max()]
            choice = int(rng.choice(top))
            assigned[i] = choice
            wanted_total[choice] -= 1
            wanted_label[choice] -= y[i]
    return assigned


@dataclass
class CrossFit:
    """``k`` heads over the development patients: their out-of-fold predictions and their bag."""

    out_of_fold: np.ndarray  # (patients, classes), each row from the head that did not see it
    heads: list[LinearHead]
    folds: np.ndarray  # each patient's fold
    c: float
    fusion: str
    scores: dict = field(default_factory=dict)  # out-of-fold pooled AUC per C tried

    @property
    def bagged(self) -> LinearHead:
        return LinearHead.mean(self.heads)

    @property
    def patient_head(self) -> LinearHead:
        """The bag as the patient model's head (on concat(max, mean) of the eyes, whatever the fusion)."""
        return self.bagged.as_max_mean(self.fusion)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The bag's probabilities for new patients' eye features ``(patients, 2, F)``."""
        return self.bagged.predict(fuse(features, self.fusion))


def cross_fit(
    features: np.ndarray,
    y: np.ndarray,
    folds: int = DEFAULT_FOLDS,
    grid: tuple[float, ...] = C_GRID,
    fusion: str = "max_mean",
    seed: int = 0,
    pos_weight_power: float = DEFAULT_POWER,
    augmented: tuple[np.ndarray, ...] = (),
) -> CrossFit:
    """Cross-fit a linear head per fold for each ``C`` of ``grid`` and keep the ``C`` whose
    out-of-fold predictions have the best pooled AUC (ties: the stronger regularisation).

    ``augmented``: more eye features of the same patients in the same order (their photos as
    other cameras might take them, :func:`..data.acquisition.random_acquisition`); a fold's head
    also learns from the copies of its own training patients, never from a held-out patient's,
    and the out-of-fold predictions (and so the ``C`` chosen) stay those of the unshifted photos."""
    x = fuse(features, fusion)
    y = np.asarray(y)
    if len(x) != len(y):
        raise FundusError(f"{len(x)} patients' features but {len(y)} label rows")
    copies = [fuse(a, fusion) for a in augmented]
    for i, a in enumerate(copies):
        if a.shape != x.shape:
            raise FundusError(f"augmented copy {i} has features {a.shape}, the patients' are {x.shape}")
    fold_of = patient_folds(len(x), folds, seed, y)
    best = None
    scores = {}
    for c in sorted(grid):
        oof = np.zeros(y.shape, np.float64)
        heads = []
        for f in range(folds):
            held = fold_of == f
            rows = np.concatenate([x[~held]] + [a[~held] for a in copies])
            head = fit_linear_head(rows, np.tile(y[~held], (1 + len(copies), 1)), c, seed, pos_weight_power)
            oof[held] = head.predict(x[held])
            heads.append(head)
        scores[c] = odir_score(y, oof)["auc"]
        if best is None or scores[c] > best[0] + 1e-9:
            best = (scores[c], CrossFit(oof, heads, fold_of, c, fusion))
    best[1].scores = scores
    return best[1]


def single_eyed(features: np.ndarray) -> np.ndarray:
    """Which patients of ``(patients, 2, F)`` eye features have one photo (it fills both slots:
    two photos never give identical features)."""
    features = np.asarray(features)
    return np.all(features[:, 0] == features[:, 1], axis=-1)


def eye_mask(eye_labels: np.ndarray, single: np.ndarray) -> np.ndarray:
    """``(patients, 2)``: the eyes that count as rows of their own: labels known (not -1), and a
    one-eyed patient's photo once, not once per slot."""
    eye_labels = np.asarray(eye_labels)
    mask = eye_labels[:, :, 0] >= 0
    mask[:, 1] &= ~np.asarray(single, bool)
    return mask


@dataclass
class EyeFit:
    """``k`` heads on single eyes over the development patients' folds: each eye's out-of-fold
    prediction and the heads' bag, which answers a photo given alone."""

    out_of_fold: np.ndarray  # (patients, 2, classes), each eye from the head whose fold held its patient out
    mask: np.ndarray  # (patients, 2): the eyes that were rows (labels known, a one-eyed patient's eye once)
    heads: list[LinearHead]
    c: float
    scores: dict = field(default_factory=dict)  # out-of-fold pooled AUC over the eyes, per C tried

    @property
    def bagged(self) -> LinearHead:
        return LinearHead.mean(self.heads)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``(patients, 2, F)`` eye features to each eye's own probabilities ``(patients, 2, classes)``."""
        features = np.asarray(features)
        flat = features.reshape(-1, features.shape[-1])
        return self.bagged.predict(flat).reshape(*features.shape[:-1], -1)


def cross_fit_eyes(
    features: np.ndarray,
    eye_labels: np.ndarray,
    folds: np.ndarray,
    grid: tuple[float, ...] = C_GRID,
    seed: int = 0,
    pos_weight_power: float = DEFAULT_POWER,
    augmented: tuple[np.ndarray, ...] = (),
) -> EyeFit:
    """A head for one eye given alone: per-eye rows ``features[i, k]`` labelled with that eye's own
    labels ``eye_labels[i, k]`` (ODIR's per-eye keywords, :func:`..data.batches.manifest_eye_labels`;
    -1 unknown, never a row), cross-fitted over the patients' ``folds`` (the pair heads' own, so a
    patient is held out of both together), ``C`` chosen by the eyes' out-of-fold pooled AUC.

    The pair heads are fitted on two different eyes; a photo alone put in both slots gives them
    max = mean and |left - right| = 0, which no training row had. This head has seen only single eyes.
    ``augmented``: the same patients' eye features from other acquisitions, rows of the folds that
    train on their patient, as in :func:`cross_fit`."""
    features = np.asarray(features, np.float32)
    eye_labels = np.asarray(eye_labels)
    folds = np.asarray(folds)
    if features.ndim != 3 or features.shape[1] != 2:
        raise FundusError(f"eye features must be (patients, 2, F), got shape {features.shape}")
    if eye_labels.shape[:2] != features.shape[:2]:
        raise FundusError(f"eye labels {eye_labels.shape} do not match the eye features {features.shape}")
    if len(folds) != len(features):
        raise FundusError(f"{len(folds)} folds for {len(features)} patients")
    mask = eye_mask(eye_labels, single_eyed(features))
    if not mask.any():
        raise FundusError("no eye has labels of its own (per-eye keywords): an eye head cannot be fitted")
    for i, a in enumerate(augmented):
        if np.shape(a) != features.shape:
            raise FundusError(f"augmented copy {i} has features {np.shape(a)}, the patients' are {features.shape}")
    n_folds = int(folds.max()) + 1
    best = None
    scores = {}
    for c in sorted(grid):
        oof = np.zeros((*features.shape[:2], eye_labels.shape[-1]))
        heads = []
        for f in range(n_folds):
            train = mask & (folds != f)[:, None]
            rows = np.concatenate([features[train]] + [np.asarray(a)[train] for a in augmented])
            head = fit_linear_head(rows, np.tile(eye_labels[train], (1 + len(augmented), 1)), c, seed, pos_weight_power)
            held = folds == f
            oof[held] = head.predict(features[held].reshape(-1, features.shape[-1])).reshape(int(held.sum()), 2, -1)
            heads.append(head)
        scores[c] = odir_score(eye_labels[mask], oof[mask])["auc"]
        if best is None or scores[c] > best[0] + 1e-9:
            best = (scores[c], EyeFit(oof, mask, heads, c))
    best[1].scores = scores
    return best[1]


def set_patient_head(model, head: LinearHead) -> None:
    """Put a linear head on ``concat(max, mean)`` into the patient model's ``labels`` layer (its
    dropout is off at inference, so the model on images is the head on their features)."""
    dense = model.get_layer("labels")
    kernel, bias = dense.get_weights()
    if kernel.shape != head.weights.shape:
        raise FundusError(f"the head has weights {head.weights.shape} but the model's labels layer {kernel.shape}")
    dense.set_weights([head.weights.astype(kernel.dtype), head.bias.astype(bias.dtype)])


SIDE_GRID = (0.003, 0.01, 0.03)
SIDE_FALSE_WARNINGS = 0.01  # the share of correctly placed photos (or pairs) a side warning may flag


@dataclass
class SideHead:
    """Which eye a photo shows, from its frozen features: ``probability_right``; and the two
    thresholds beyond which a photo, or a patient's two photos, look like the other eye's."""

    head: LinearHead  # one output: the probability that the photo is of a right eye
    single: float  # warn when a photo's probability of the other side exceeds this
    pair: float  # warn when the left photo's probability of right exceeds the right photo's by this
    accuracy: float  # out of fold, photos of held-back patients
    caught_single: float  # out of fold: share of photos in the wrong slot that the single threshold flags
    caught_pair: float  # out of fold: share of swapped pairs the pair threshold flags
    c: float

    def probability_right(self, features: np.ndarray) -> np.ndarray:
        return self.head.predict(np.asarray(features).reshape(-1, self.head.weights.shape[0]))[:, 0]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "weights": self.head.weights,
            "bias": self.head.bias,
            **{
                k: np.array(getattr(self, k))
                for k in ("single", "pair", "accuracy", "caught_single", "caught_pair", "c")
            },
        }

    SCALARS = ("single", "pair", "accuracy", "caught_single", "caught_pair", "c")

    @classmethod
    def from_arrays(cls, data) -> SideHead:
        return cls(
            LinearHead(np.asarray(data["weights"]), np.asarray(data["bias"])),
            *(float(data[k]) for k in cls.SCALARS),
        )

    @classmethod
    def load(cls, path) -> SideHead:
        """A ``side.npz``, checked before use (:func:`..fileio.read_npz`): finite weights of one output and
        thresholds where a warning means something (a NaN threshold would switch the check off unseen)."""
        from ..fileio import read_npz

        data = read_npz(path, "a side head", {"weights": (None, 1), "bias": (1,), **{k: () for k in cls.SCALARS}})
        side = cls.from_arrays(data)
        if not (0.5 <= side.single < 1 and 0 <= side.pair < 1 and 0 <= side.accuracy <= 1):
            raise FundusError(
                f"{path}: a side head's thresholds must be 0.5 <= single < 1 and 0 <= pair < 1 "
                f"(single {side.single}, pair {side.pair}, accuracy {side.accuracy})"
            )
        return side


def fit_side_head(features: np.ndarray, both: np.ndarray, folds: int = DEFAULT_FOLDS, seed: int = 0) -> SideHead:
    """A side head on the eye features ``(patients, 2, F)`` of the patients with both eyes (``both``),
    left labelled 0 and right 1, C chosen by out-of-fold accuracy over patient folds; the warning
    thresholds are the out-of-fold quantiles that flag :data:`SIDE_FALSE_WARNINGS` of correctly
    placed photos and pairs, and what they catch of misplaced ones is measured the same way."""
    pairs = np.asarray(features)[np.asarray(both, bool)]
    if len(pairs) < 2 * folds:
        raise FundusError(f"a side head needs at least {2 * folds} patients with both eyes, got {len(pairs)}")
    fold_of = patient_folds(len(pairs), folds, seed)
    labels = np.tile([0, 1], len(pairs))[:, None]
    best = None
    for c in SIDE_GRID:
        oof = np.zeros((len(pairs), 2))
        for f in range(folds):
            held = fold_of == f
            head = fit_linear_head(
                pairs[~held].reshape(-1, pairs.shape[-1]),
                np.tile([0, 1], (~held).sum())[:, None],
                c,
                seed,
                pos_weight_power=0.0,
            )
            oof[held] = head.predict(pairs[held].reshape(-1, pairs.shape[-1]))[:, 0].reshape(-1, 2)
        accuracy = float(((oof.ravel() > 0.5) == labels.ravel()).mean())
        if best is None or accuracy > best[0]:
            best = (accuracy, c, oof)
    accuracy, c, oof = best
    other = np.concatenate([oof[:, 0], 1 - oof[:, 1]])  # each photo's probability of the side it is not
    single = max(0.5, float(np.quantile(other, 1 - SIDE_FALSE_WARNINGS)))  # a warning leans to the other side
    margin = oof[:, 0] - oof[:, 1]  # negative when the slots are right
    pair = max(0.0, float(np.quantile(margin, 1 - SIDE_FALSE_WARNINGS)))
    head = fit_linear_head(pairs.reshape(-1, pairs.shape[-1]), labels, c, seed, pos_weight_power=0.0)
    return SideHead(head, single, pair, accuracy, float(np.mean(1 - other > single)), float(np.mean(-margin > pair)), c)
