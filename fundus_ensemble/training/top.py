"""Train the top of a pretrained backbone on cached activations, cross-fitted like the heads.

Frozen features stop at what ImageNet's filters see; a full fine-tune costs every photo's pass
through the whole network at each epoch. In between: the activations entering the last stage
(:func:`..models.efficientnet_lite.last_stage_input`) are computed once per photo and kept in
the feature store like pooled features (``FeatureSpec.cut``); only the last stage, the head
convolution and the patient head then train, on those activations (Lite2 at 380 px: one
block and a 1x1 convolution on 12 x 12 maps, about 90 photos/s on 2 cores against about 4
for the whole network).

Each fold's model starts where features-first ends: the top with ImageNet's weights and the
patient head set to the logistic head that the fold's training patients give on the pooled
features (:func:`.heads.fit_linear_head`, fused ``max_mean`` as the patient model fuses), so
zero epochs reproduce that head exactly (a test holds it to that). BatchNorm keeps ImageNet's
statistics (its layers frozen, a few thousand photos would only move them by noise). The
cached maps are mirrored at random (a mirrored photo's map is the mirrored map up to the
convolutions' padding at the border), or, given the store's maps of the mirrored photos
(``FeatureSpec.flip``), each fold trains on every photo and its mirror.

:func:`cross_fit_top` trains one model per fold on the other folds' patients: their
out-of-fold probabilities (for the out-of-fold calibration) and the mean of the fold models'
probabilities on new patients, as the heads' bag gives them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from tqdm.auto import tqdm

from ..errors import FundusError
from ..labels import LABELS
from ..models.losses import DEFAULT_POWER, WeightedBinaryCrossentropy, positive_weights
from ..models.patient_classifier import EyeFusion
from .heads import fit_linear_head, fuse

EYE_INPUTS = ("left_activations", "right_activations")


@dataclass(frozen=True)
class TopConfig:
    """How each fold's top trains."""

    epochs: int = 4
    batch_size: int = 32  # patients (twice as many photos)
    learning_rate: float = 1e-4
    folds: int = 3
    dropout: float = 0.3
    c: float = 0.001  # the starting logistic head's C
    pos_weight_power: float = DEFAULT_POWER

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.folds < 2 or not self.learning_rate > 0:
            raise FundusError(
                f"top training needs epochs >= 0, batch size >= 1, folds >= 2 and a positive learning rate; got {self}"
            )
        if not 0 <= self.dropout < 1 or not self.c > 0:
            raise FundusError(f"dropout must be in [0, 1) and C positive; got {self.dropout}, {self.c}")


def build_top_classifier(top: keras.Model, dropout: float = 0.3, mirror: bool = True) -> keras.Model:
    """``{left_activations, right_activations}`` (flattened, as the store keeps them) to the eight
    probabilities: both eyes through ``top`` in one call (their maps mirrored at random in training
    when ``mirror``), fused ``concat(max, mean)``, a sigmoid ``labels`` layer. ``top``'s BatchNorm
    layers are frozen here."""
    shape = tuple(top.input.shape[1:])
    if None in shape:
        raise FundusError(f"the top's input shape {shape} must be known to cache activations")
    for layer in top.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    width = int(np.prod(shape))
    eyes = {name: keras.Input((width,), name=name) for name in EYE_INPUTS}
    stacked = keras.layers.Concatenate(axis=0, name="stack_eyes")([eyes[name] for name in EYE_INPUTS])
    maps = keras.layers.Reshape(shape, name="maps")(stacked)
    if mirror:
        maps = keras.layers.RandomFlip("horizontal", name="mirror")(maps)
    fused = EyeFusion(name="fuse_eyes")(top(maps))
    x = keras.layers.Dropout(dropout, name="dropout")(fused)
    probabilities = keras.layers.Dense(len(LABELS), activation="sigmoid", name="labels", dtype="float32")(x)
    return keras.Model(eyes, probabilities, name="top_classifier")


def _inputs(activations: np.ndarray) -> dict[str, np.ndarray]:
    return {EYE_INPUTS[0]: activations[:, 0], EYE_INPUTS[1]: activations[:, 1]}


@dataclass
class TopFit:
    """Out-of-fold development probabilities, the fold models' mean on the test patients, and time."""

    out_of_fold: np.ndarray
    test: np.ndarray | None
    seconds: float
    folds: np.ndarray


def _check(
    activations: np.ndarray, pooled: np.ndarray, y: np.ndarray, folds: np.ndarray, mirrored: np.ndarray | None
) -> None:
    if activations.ndim != 3 or activations.shape[1] != 2:
        raise FundusError(f"activations must be (patients, 2, D), got shape {activations.shape}")
    if mirrored is not None and mirrored.shape != activations.shape:
        raise FundusError(
            f"the mirrored photos' activations {mirrored.shape} must match the photos' {activations.shape}"
        )
    if pooled.shape[:2] != activations.shape[:2] or len(y) != len(activations) or len(folds) != len(activations):
        raise FundusError(
            f"{len(activations)} patients' activations, {len(pooled)} pooled, {len(y)} label rows, "
            f"{len(folds)} folds: they must be the same patients"
        )


def cross_fit_top(
    make_top: Callable[[], keras.Model],
    activations: np.ndarray,
    pooled: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    config: TopConfig = TopConfig(),
    seed: int = 0,
    test_activations: np.ndarray | None = None,
    progress: bool = True,
    mirrored: np.ndarray | None = None,
) -> TopFit:
    """One top per fold of ``folds`` (each patient's fold), trained on the other folds' patients.

    ``activations`` ``(patients, 2, D)`` the cached maps of each patient's eyes; ``pooled``
    ``(patients, 2, F)`` the same eyes' pooled ImageNet features (the starting head is fitted on
    them); ``make_top`` builds a fresh top with the pretrained weights each time it is called.
    ``mirrored`` ``(patients, 2, D)``: the maps of the same photos mirrored; given, each fold trains
    on its patients' photos and their mirrors (an epoch sees both) instead of mirroring at random;
    predictions are on the photos as taken."""
    y = np.asarray(y)
    _check(activations, pooled, y, folds, mirrored)
    began = time.perf_counter()
    oof = np.zeros(y.shape, np.float64)
    tests = []
    fused = fuse(pooled, "max_mean")
    keys = sorted(set(int(f) for f in folds))
    for fold in tqdm(keys, desc="top folds", unit="fold", disable=None if progress else True):
        held = folds == fold
        keras.utils.set_random_seed(seed * 1000 + fold)
        head = fit_linear_head(fused[~held], y[~held], config.c, seed, config.pos_weight_power)
        model = build_top_classifier(make_top(), config.dropout, mirror=mirrored is None)
        model.get_layer("labels").set_weights([head.weights.astype(np.float32), head.bias.astype(np.float32)])
        model.compile(
            keras.optimizers.Adam(config.learning_rate),
            WeightedBinaryCrossentropy(positive_weights(y[~held], config.pos_weight_power)),
        )
        if config.epochs:
            x, x_y = activations[~held], y[~held]
            if mirrored is not None:
                x, x_y = np.concatenate([x, mirrored[~held]]), np.concatenate([x_y, x_y])
            model.fit(
                _inputs(x),
                x_y.astype(np.float32),
                batch_size=config.batch_size,
                epochs=config.epochs,
                shuffle=True,
                verbose=0,
            )
        oof[held] = model.predict(_inputs(activations[held]), batch_size=64, verbose=0)
        if test_activations is not None:
            tests.append(model.predict(_inputs(test_activations), batch_size=64, verbose=0))
        keras.backend.clear_session(free_memory=True)
    test = np.mean(tests, axis=0) if tests else None
    return TopFit(oof, test, time.perf_counter() - began, np.asarray(folds))
