import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import pytest

from fundus_ensemble.labels import LABELS
from fundus_ensemble.synthetic import write_synthetic_dataset

HEADER = "patient_id,left_image,right_image," + ",".join(LABELS) + ",split"


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """24 synthetic patients (JPEG photos + manifest); returns the manifest path."""
    root = tmp_path_factory.mktemp("small")
    return write_synthetic_dataset(root, 24, seed=7, diameter=120)


def write_images(root: Path, *names: str) -> None:
    """Create placeholder files for manifest validation tests."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
