import os

import keras
import numpy as np
import pytest

from fundus_ensemble.errors import FundusError, WeightsError
from fundus_ensemble.models import BACKBONES, BackbonePreprocess, build_backbone, build_patient_model
from fundus_ensemble.models.backbone import parse_weights

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend


JAX = os.environ.get("KERAS_BACKEND") == "jax"


@pytest.fixture(scope="module")
def b3():
    # under JAX a MobileNet: B3 is keras.applications' own, built the same on any backend, and JAX
    # takes 30 s to build it; what is ours (the eyes' fusion, the head) is the same on either
    return build_patient_model("mobilenet" if JAX else "efficientnet_b3", 64, None)


def eyes(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(0, 255, (n, size, size, 3)).astype("float32") for name in ("left_eye", "right_eye")}


@pytest.mark.skipif(JAX, reason="keras.applications' B3, built the same on any backend: checked once")
def test_b3_patient_model_shape_and_range(b3):
    out = b3.predict(eyes(3), verbose=0)
    assert out.shape == (3, 8)
    assert (out >= 0).all() and (out <= 1).all()
    assert b3.get_layer("eye_encoder").layers[-1].name == "efficientnetb3"


def test_fusion_is_symmetric_and_one_eye_means_that_eye(b3):
    x = eyes(2, seed=1)
    swapped = {"left_eye": x["right_eye"], "right_eye": x["left_eye"]}
    np.testing.assert_allclose(b3.predict(x, verbose=0), b3.predict(swapped, verbose=0), atol=1e-5)
    # a one-eyed patient is fed its eye twice: the fused features are that eye's own
    encoder = b3.get_layer("eye_encoder")
    features = encoder.predict(x["left_eye"], verbose=0)
    fused = b3.get_layer("fuse_eyes")(np.concatenate([features, features]))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(fused), np.concatenate([features, features], axis=1), atol=1e-6
    )


def test_registry_covers_the_papers_table():
    expected = (
        {f"efficientnet_b{i}" for i in range(8)}
        | {
            "resnet50",
            "vgg16",
            "vgg19",
            "xception",
            "inception_v3",
            "inception_resnet_v2",
            "densenet121",
            "mobilenet",
        }
        | {f"efficientnet_lite{i}" for i in range(3)}
        | {"efficientnet_lite012"}  # the three Lite networks as one backbone (the recipe's)
    )
    assert set(BACKBONES) == expected
    for name, spec in BACKBONES.items():
        if "lite" in name:
            assert spec.constructor == ("combined" if name == "efficientnet_lite012" else "lite")
        else:
            assert callable(getattr(keras.applications, spec.constructor))


def test_preprocess_modes():
    x = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
    np.testing.assert_allclose(BackbonePreprocess("tf")(x), [[[[-1.0, 0.0, 1.0]]]], atol=1e-6)
    np.testing.assert_allclose(BackbonePreprocess("none")(x), x)
    np.testing.assert_allclose(BackbonePreprocess("lite")(x), [[[[-127 / 128, 0.5 / 128, 1.0]]]], atol=1e-6)
    np.testing.assert_allclose(
        BackbonePreprocess("caffe")(x), [[[[255 - 103.939, 127.5 - 116.779, 0 - 123.68]]]], atol=1e-4
    )
    torch = keras.ops.convert_to_numpy(BackbonePreprocess("torch")(x))
    np.testing.assert_allclose(torch[0, 0, 0, 0], (0 - 0.485) / 0.229, rtol=1e-5)
    with pytest.raises(ValueError):
        BackbonePreprocess("bgr")


def test_unknown_backbone_and_small_input():
    with pytest.raises(FundusError, match="unknown backbone 'effnet'"):
        build_backbone("effnet", 64)
    with pytest.raises(FundusError, match="at least 75 px"):
        build_backbone("inception_v3", 64)


def test_local_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        build_backbone("mobilenet", 64, tmp_path / "missing.h5")
    source = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(64, 64, 3), pooling="avg")
    path = tmp_path / "mobilenet_notop.weights.h5"
    source.save_weights(str(path))
    encoder = build_backbone("mobilenet", 64, path)
    loaded = encoder.layers[-1]  # image input, preprocess, then the backbone
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_parse_weights():
    assert parse_weights("none") is None and parse_weights("ImageNet") == "imagenet" and parse_weights("w.h5") == "w.h5"


def test_save_and_load_in_safe_mode(tmp_path):
    model = build_patient_model("mobilenet", 32, None)
    path = tmp_path / "m.keras"
    model.save(str(path))
    again = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    x = eyes(2, size=32)
    np.testing.assert_allclose(model.predict(x, verbose=0), again.predict(x, verbose=0), atol=1e-6)


def test_forward_in_slices_gives_every_row_once_at_one_shape(monkeypatch):
    from fundus_ensemble.models import forward as forward_module

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    images = np.random.default_rng(0).uniform(0, 255, (7, 8, 8, 3)).astype("float32")
    whole = np.asarray(model.predict_on_batch(images))
    shapes = []
    call = model.predict_on_batch
    monkeypatch.setattr(model, "predict_on_batch", lambda x: (shapes.append(x.shape), call(x))[1])
    for size in (1, 3, 4, 7, 16):
        shapes.clear()
        out = forward_module.forward(model, images, size)
        assert out.shape == whole.shape, size
        np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-5)  # each row its own image's, in order
        assert set(shapes) == {(size, 8, 8, 3)}, (size, shapes)  # the last slice padded: one trace
    # the default follows the hardware: small slices on a CPU, large ones on an accelerator
    monkeypatch.setattr(forward_module, "accelerator_count", lambda: 0)
    assert forward_module.slice_size() == forward_module.CPU_SLICE <= 4
    monkeypatch.setattr(forward_module, "accelerator_count", lambda: 1)
    assert forward_module.slice_size() == forward_module.ACCELERATOR_SLICE >= 32
