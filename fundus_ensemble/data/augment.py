"""Training-time augmentation (albumentations): the paper's rotations, plus flips.

Rotation fills with black, the colour of the camera surround, so a rotated photo still
looks like a fundus photograph. Flips are safe for the patient model: its eye fusion is
symmetric, and a flipped left eye is a plausible right eye.
"""

from __future__ import annotations

import albumentations as A
import cv2

DEFAULT_ROTATION = 30.0


def training_augmentation(rotation: float = DEFAULT_ROTATION, seed: int | None = None) -> A.Compose:
    """Random flips and a rotation within +/- ``rotation`` degrees; ``seed`` makes it repeatable."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Rotate(limit=rotation, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0 if rotation > 0 else 0.0),
        ],
        seed=seed,
    )
