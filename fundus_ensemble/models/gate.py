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

ImageNet's classes do not see a retina's structure: an orange disc painted on black, with pixel
noise blurred into blobs or a bright spot for an optic disc, scores as high as a retina. The
:class:`RetinaHead` does: a logistic head on the same network's pooled features (the same forward
pass), fitted on every photo of odir5k-256-dev against such lookalikes
(:mod:`..data.lookalikes`, everyday photos cut into discs, real photos with their phase
scrambled); its threshold lies 0.5 under the lowest out-of-fold score of a real photo
(``docs/measurements/gate_learned.py``, which writes :data:`HEAD_FILE`, measures it: no held-out
real photo refused; left out of the fitting, painted vessels, everyday photos and scrambled
photos are caught about half the time, the plainer painted discs always).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..data.imaging import crop_to_fov
from ..data.quality import Verdict, grade
from ..errors import FundusError
from ..fileio import read_npz
from .forward import forward

FUNDUS_CLASSES: tuple[int, ...] = (577, 417, 619, 117, 722, 607, 961, 807, 551, 107, 78)
MIN_FUNDUS_MASS = 0.12
INPUT_SIZE = 224
BACKBONE = "efficientnet_lite0"
FEATURES = 1280  # its pooled features
HEAD_FILE = Path(__file__).with_name("gate_head.npz")
IMAGENET_CHECK, HEAD_CHECK = "ImageNet check", "retina head"  # the network's two checks


@dataclass(frozen=True)
class RetinaHead:
    """Real fundus photo (score at or above ``threshold``) or an image painted to share its colours,
    from the gate network's pooled features: ``(features - mean) / scale @ coef + intercept``."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    threshold: float

    @classmethod
    def load(cls, path: str | os.PathLike = HEAD_FILE) -> RetinaHead:
        a = read_npz(
            path,
            "the gate's retina head",
            {"mean": (FEATURES,), "scale": (FEATURES,), "coef": (FEATURES,), "intercept": (1,), "threshold": (1,)},
        )
        if not (a["scale"] > 0).all():
            raise FundusError(f"{path}: the gate's retina head has a scale that is not positive")
        return cls(a["mean"], a["scale"], a["coef"], float(a["intercept"][0]), float(a["threshold"][0]))

    def score(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - self.mean) / self.scale @ self.coef + self.intercept


class FundusLikeness:
    """EfficientNet-Lite0 with its ImageNet classifier and the retina head on its pooled features, built
    on first use (a few seconds), then kept."""

    def __init__(self, head: RetinaHead | None = None):
        self._net = None
        self._head = head

    @property
    def head(self) -> RetinaHead:
        """The retina head (default: the package's :data:`HEAD_FILE`, read on first use)."""
        if self._head is None:
            self._head = RetinaHead.load()
        return self._head

    def _model(self):
        if self._net is None:
            import keras

            from .efficientnet_lite import assign_weights, build_efficientnet_lite, lite_imagenet_weights
            from .preprocessor import BackbonePreprocess

            net = build_efficientnet_lite(BACKBONE, INPUT_SIZE, include_top=True)
            assign_weights(net, lite_imagenet_weights(BACKBONE), f"the ImageNet weights of {BACKBONE}")
            image = keras.Input((INPUT_SIZE, INPUT_SIZE, 3))
            both = keras.Model(net.input, [net.get_layer("avg_pool").output, net.output])
            pooled, probabilities = both(BackbonePreprocess("lite")(image))
            # one output, so that forward's slices run it: the pooled features, then the 1000 classes
            self._net = keras.Model(image, keras.layers.Concatenate()([pooled, probabilities]))
        return self._net

    def read(self, squares: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Each photo's probability on :data:`FUNDUS_CLASSES`, and its pooled features (1280);
        ``squares`` are BGR crops of the retina (any size; :func:`..data.imaging.crop_to_fov` makes them)."""
        if not squares:
            return np.zeros(0), np.zeros((0, FEATURES))
        x = np.stack(
            [
                cv2.cvtColor(cv2.resize(s, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
                for s in squares
            ]
        ).astype(np.float32)
        out = np.asarray(forward(self._model(), x), np.float64)
        return out[:, FEATURES:][:, FUNDUS_CLASSES].sum(axis=1), out[:, :FEATURES]

    def mass(self, squares: list[np.ndarray]) -> np.ndarray:
        """Each photo's probability on :data:`FUNDUS_CLASSES` (see :meth:`read`)."""
        return self.read(squares)[0]

    def judge(self, squares: list[np.ndarray]) -> list[str | None]:
        """For each photo, why it is not a fundus photo (the words after "not a fundus photo"), or None."""
        return [None if refusal is None else refusal[1] for refusal in self.refusals(squares)]

    def refusals(self, squares: list[np.ndarray]) -> list[tuple[str, str] | None]:
        """For each photo, ``(check, why)`` when it is not a fundus photo (``check`` one of
        :data:`IMAGENET_CHECK` or :data:`HEAD_CHECK`), or None."""
        mass, features = self.read(squares)
        out: list[tuple[str, str] | None] = []
        for m, score in zip(mass, self.head.score(features)):
            if m < MIN_FUNDUS_MASS:
                out.append(
                    (
                        IMAGENET_CHECK,
                        f"an ImageNet classifier gives the classes of fundus photos {m:.2f}; "
                        f"real ones {MIN_FUNDUS_MASS} or more",
                    )
                )
            elif score < self.head.threshold:
                out.append(
                    (
                        HEAD_CHECK,
                        f"no retina's structure: a head fitted on real photos against painted lookalikes scores it "
                        f"{score:.1f}; real ones {self.head.threshold:.1f} or more",
                    )
                )
            else:
                out.append(None)
        return out


@dataclass
class PhotoGate:
    """One decoded photo through the whole gate, as predict runs it: the image checks
    (:func:`..data.quality.grade`) first; a photo they call gradable then goes to the network's
    checks (:meth:`FundusLikeness.refusals`), which a poor photo (:data:`..data.quality.POOR`,
    screened, never cleared) skips: a hazy retina looks less like ImageNet's fundus classes.

    :func:`image_checks` makes one (the image checks, and the network's crop of a gradable photo, so
    that a batch of them holds crops, not whole photos); :func:`network_checks` runs the network on a
    batch of them at once."""

    verdict: Verdict
    square: np.ndarray | None = None  # the network's crop, until :func:`network_checks`
    check: str | None = None  # which check refused it: "image", IMAGENET_CHECK or HEAD_CHECK
    not_fundus: str | None = None  # the network's words, when it refused

    @property
    def status(self) -> str:
        """``refused`` (not screened: "retake"), ``poor`` (screened with a caution) or ``gradable``."""
        if self.check is not None:
            return "refused"
        return "gradable" if self.verdict.gradable else "poor"

    @property
    def text(self) -> str | None:
        """Why it is refused or poor, in predict's words; None when gradable."""
        if self.not_fundus is not None:
            return f"not a fundus photo ({self.not_fundus})"
        return None if self.verdict.gradable else self.verdict.text


def image_checks(image: np.ndarray) -> PhotoGate:
    """The image checks of one decoded BGR photo (see :class:`PhotoGate`)."""
    verdict = grade(image)
    if not verdict.usable:
        return PhotoGate(verdict, check="image")
    return PhotoGate(verdict, crop_to_fov(image, INPUT_SIZE) if verdict.gradable else None)


def network_checks(photos: list[PhotoGate], likeness: FundusLikeness) -> list[PhotoGate]:
    """The network's checks on the photos the image checks called gradable, in one pass; the
    crops are let go. Returns ``photos``."""
    waiting = [p for p in photos if p.square is not None]
    if not waiting:  # no network built, no head read
        return photos
    for photo, refusal in zip(waiting, likeness.refusals([p.square for p in waiting])):
        photo.square = None
        if refusal is not None:
            photo.check, photo.not_fundus = refusal
    return photos


def gate_images(images: list[np.ndarray], likeness: FundusLikeness) -> list[PhotoGate]:
    """Every decoded photo of ``images`` through the whole gate."""
    return network_checks([image_checks(a) for a in images], likeness)
