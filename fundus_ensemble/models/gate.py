"""Does it look like a fundus photo to an ImageNet classifier? The gradability gate's last check.

Image statistics (:mod:`..data.quality`) catch the photos that are too dark, washed out,
blurred or cut off, and a photo that is no disc on black; a photo of a cat cut into a disc on
black passes them. A network trained on ImageNet has never seen a retina, but it puts real
fundus photos in a few classes of its thousand (a gong, a lampshade, a nautilus, an orange ...)
and a cat, a cup or a face elsewhere. :func:`fundus_mass` is the probability EfficientNet-Lite0's
ImageNet classifier (its weights come with the package) gives to those classes: real photos
score high, everyday objects near zero.

:data:`FUNDUS_CLASSES` are the classes that were the top-1 of at least 0.5 % of every fourth
photo of odir5k-256-dev (1,222 real ODIR-5K photos); :data:`MIN_FUNDUS_MASS` lies below the
0.5th percentile of their mass (0.177). ``docs/measurements/gradability.py`` measures it.
"""

from __future__ import annotations

import cv2
import numpy as np

from .forward import forward

FUNDUS_CLASSES: tuple[int, ...] = (577, 417, 619, 117, 722, 607, 961, 807, 551, 107, 78)
MIN_FUNDUS_MASS = 0.12
INPUT_SIZE = 224
BACKBONE = "efficientnet_lite0"


class FundusLikeness:
    """EfficientNet-Lite0 with its ImageNet classifier, built on first use (a few seconds), then kept."""

    def __init__(self):
        self._net = None

    def _model(self):
        if self._net is None:
            import keras

            from .efficientnet_lite import assign_weights, build_efficientnet_lite, lite_imagenet_weights
            from .preprocessor import BackbonePreprocess

            net = build_efficientnet_lite(BACKBONE, INPUT_SIZE, include_top=True)
            assign_weights(net, lite_imagenet_weights(BACKBONE), f"the ImageNet weights of {BACKBONE}")
            image = keras.Input((INPUT_SIZE, INPUT_SIZE, 3))
            self._net = keras.Model(image, net(BackbonePreprocess("lite")(image)))
        return self._net

    def mass(self, squares: list[np.ndarray]) -> np.ndarray:
        """Each photo's probability on :data:`FUNDUS_CLASSES`; ``squares`` are BGR crops of the retina
        (any size; :func:`..data.imaging.crop_to_fov` makes them)."""
        if not squares:
            return np.zeros(0)
        x = np.stack(
            [
                cv2.cvtColor(cv2.resize(s, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
                for s in squares
            ]
        ).astype(np.float32)
        probabilities = forward(self._model(), x)
        return np.asarray(probabilities, np.float64)[:, FUNDUS_CLASSES].sum(axis=1)
