"""The top of a pretrained backbone trained on cached activations (training.top, issue 43.1)."""

import keras
import numpy as np
import pytest

from fundus_ensemble.errors import FundusError
from fundus_ensemble.models.backbone import build_backbone, split_encoder
from fundus_ensemble.models.efficientnet_lite import last_stage_input
from fundus_ensemble.training.features import FeatureSpec, FeatureStore
from fundus_ensemble.training.heads import fit_linear_head, fuse, patient_folds
from fundus_ensemble.training.top import TopConfig, build_top_classifier, cross_fit_top

SIZE = 64
PATIENTS = 24


@pytest.fixture(scope="module")
def cut_network():
    """A small random Lite0 cut before its last stage, and 24 patients' activations and pooled features."""
    keras.utils.set_random_seed(0)
    encoder = build_backbone("efficientnet_lite0", SIZE, None)
    bottom, top = split_encoder(encoder, last_stage_input("efficientnet_lite0"))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2 * PATIENTS, SIZE, SIZE, 3)).astype("float32")
    activations = bottom.predict(images, verbose=0)
    pooled = encoder.predict(images, verbose=0)
    weights = top.get_weights()

    def make_top():
        fresh = keras.models.clone_model(top)
        fresh.set_weights(weights)
        return fresh

    y = (rng.random((PATIENTS, 8)) > 0.6).astype(int)
    y[:2] = [[1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1]]  # every class has both values
    return {
        "encoder": encoder,
        "bottom": bottom,
        "top": top,
        "make_top": make_top,
        "images": images,
        "activations": activations.reshape(PATIENTS, 2, -1),
        "pooled": pooled.reshape(PATIENTS, 2, -1),
        "y": y,
        "folds": patient_folds(PATIENTS, 2, 0),
    }


def test_the_cut_is_the_input_of_the_last_stage():
    # Lite0 has 16 blocks (the last stage one), Lite2 21; two stages back is one stage of 4 or 5 earlier
    assert last_stage_input("efficientnet_lite0") == "blocks_14_add"
    assert last_stage_input("efficientnet_lite2") == "blocks_19_add"
    assert last_stage_input("efficientnet_lite0", stages=2) == "blocks_10_add"
    assert last_stage_input("efficientnet_lite2", stages=2) == "blocks_14_add"
    with pytest.raises(FundusError):
        last_stage_input("efficientnet_lite0", stages=7)


def test_top_of_bottom_is_the_whole_encoder(cut_network):
    n = cut_network
    flat = n["bottom"].predict(n["images"][:4], verbose=0)
    maps = flat.reshape((-1, *n["top"].input.shape[1:]))
    np.testing.assert_allclose(n["top"].predict(maps, verbose=0), n["pooled"].reshape(-1, 1280)[:4], atol=1e-5)
    assert flat.shape[1] == int(np.prod(n["top"].input.shape[1:]))


def test_a_cut_the_network_lacks_is_refused(cut_network):
    with pytest.raises(FundusError, match="no layer"):
        split_encoder(cut_network["encoder"], "blocks_99_add")


def test_zero_epochs_give_the_features_first_head_of_each_fold(cut_network):
    n = cut_network
    fit = cross_fit_top(
        n["make_top"], n["activations"], n["pooled"], n["y"], n["folds"], TopConfig(epochs=0, folds=2), progress=False
    )
    expected = np.zeros(n["y"].shape)
    for fold in (0, 1):
        held = n["folds"] == fold
        head = fit_linear_head(fuse(n["pooled"][~held]), n["y"][~held], TopConfig().c)
        expected[held] = head.predict(fuse(n["pooled"][held]))
    np.testing.assert_allclose(fit.out_of_fold, expected, atol=1e-5)


def test_a_held_out_patient_never_teaches_its_own_fold(cut_network):
    n = cut_network
    config = TopConfig(epochs=2, folds=2, learning_rate=1e-2, dropout=0.0)
    first = cross_fit_top(n["make_top"], n["activations"], n["pooled"], n["y"], n["folds"], config, progress=False)
    changed = n["y"].copy()
    held = n["folds"] == 0
    changed[held] = 1 - changed[held]
    changed[:2] = n["y"][:2]  # keep every class with both values in the other fold's rows
    second = cross_fit_top(n["make_top"], n["activations"], n["pooled"], changed, n["folds"], config, progress=False)
    start = cross_fit_top(
        n["make_top"], n["activations"], n["pooled"], n["y"], n["folds"], TopConfig(epochs=0, folds=2), progress=False
    )
    rows = held & (np.arange(PATIENTS) >= 2)
    np.testing.assert_allclose(first.out_of_fold[rows], second.out_of_fold[rows], atol=1e-5)
    assert np.abs(first.out_of_fold - start.out_of_fold).max() > 1e-3  # and training did move the predictions


def test_the_mirrored_photos_of_the_training_patients_only_teach_each_fold(cut_network):
    n = cut_network
    config = TopConfig(epochs=2, folds=2, learning_rate=1e-2, dropout=0.0)
    noise = np.random.default_rng(5).normal(size=n["activations"].shape).astype(np.float32)

    def fit(mirrored):
        return cross_fit_top(
            n["make_top"], n["activations"], n["pooled"], n["y"], n["folds"], config, progress=False, mirrored=mirrored
        ).out_of_fold

    first = fit(n["activations"][..., ::-1].copy())
    held = n["folds"] == 0
    changed = n["activations"][..., ::-1].copy()
    changed[held] = noise[held]  # the held-out patients' mirrors: never seen by their own fold
    np.testing.assert_allclose(fit(changed)[held], first[held], atol=1e-5)
    changed = n["activations"][..., ::-1].copy()
    changed[~held] = noise[~held]  # the training patients' mirrors: they are trained on
    assert np.abs(fit(changed)[held] - first[held]).max() > 1e-3
    with pytest.raises(FundusError, match="mirrored"):
        fit(n["activations"][:-1])


def test_training_keeps_imagenet_batchnorm_statistics(cut_network):
    n = cut_network
    top = n["make_top"]()
    norms = [layer for layer in top.layers if isinstance(layer, keras.layers.BatchNormalization)]
    before = [np.array(layer.moving_mean) for layer in norms]
    model = build_top_classifier(top, 0.0)
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    x = {"left_activations": n["activations"][:, 0], "right_activations": n["activations"][:, 1]}
    model.fit(x, n["y"].astype("float32"), batch_size=8, epochs=1, verbose=0)
    for layer, mean in zip(norms, before):
        np.testing.assert_array_equal(np.array(layer.moving_mean), mean)
    assert any(np.abs(np.array(w) - v).max() > 0 for w, v in zip(top.trainable_weights, n["top"].trainable_weights))


def test_mismatched_inputs_are_refused(cut_network):
    n = cut_network
    with pytest.raises(FundusError, match="same patients"):
        cross_fit_top(n["make_top"], n["activations"], n["pooled"][:-1], n["y"], n["folds"], progress=False)
    with pytest.raises(FundusError):
        TopConfig(folds=1)


def test_a_cut_entry_is_its_own_and_pooled_entries_keep_their_provenance(tmp_path):
    pooled = FeatureSpec("efficientnet_lite2", "imagenet", 380)
    cut = FeatureSpec("efficientnet_lite2", "imagenet", 380, cut="blocks_19_add")
    store = FeatureStore(tmp_path)
    assert store.entry(pooled, "color") != store.entry(cut, "color")
    assert "cut" not in pooled.provenance("color", {})  # stores made before cuts existed stay valid
    assert cut.provenance("color", {})["cut"] == "blocks_19_add"
