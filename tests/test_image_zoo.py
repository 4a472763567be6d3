"""What clinics export: every odd file is either processed correctly or rejected with its reason."""

import cv2
import numpy as np
import pytest
from conftest import HEADER

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.data.synthetic import EyeSpec, render_eye


def retina(diameter=200, seed=0):
    return render_eye(EyeSpec(frozenset(), "left", seed), diameter)


def jpeg(image):
    return cv2.imencode(".jpg", image)[1].tobytes()


def png(image):
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    photo = retina()
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # some transparency in the surround
    files = {
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "truncated.jpg": jpeg(photo)[:3000],
        "alpha.png": png(rgba),
        "deep.png": png(photo.astype(np.uint16) * 257),
        "gray.png": png(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)),
        "tiny.png": png(cv2.resize(photo, (8, 8))),
        "black.jpg": jpeg(np.zeros((300, 400, 3), np.uint8)),
        "white.jpg": jpeg(np.full((300, 400, 3), 252, np.uint8)),
        "large.jpg": jpeg(cv2.resize(retina(700), (8000, 6000))),
        "vanishing.jpg": jpeg(photo),
    }
    rows = [HEADER]
    for i, (name, data) in enumerate(files.items()):
        (root / name).write_bytes(data)
        rows.append(f"p{i},{name},,0,1,0,0,0,0,0,0,train")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    manifest = load_manifest(root / "m.csv")
    (root / "vanishing.jpg").unlink()  # listed and checked, gone before it is read
    summary = preprocess_manifest(manifest, root / "out", size=64, workers=2, progress=False)
    return root, summary


EXPECTED_REJECTS = {
    "zero.jpg": "empty file (0 bytes)",
    "text.jpg": "not a readable image",
    "truncated.jpg": "truncated JPEG",
    "tiny.png": "image too small (8 x 8 px",
    "black.jpg": "no retina found",
    "white.jpg": "overexposed",
    "vanishing.jpg": "file not found",
}


def test_each_bad_file_has_its_reason(zoo):
    _, summary = zoo
    reasons = dict(summary.rejected)
    assert set(reasons) == set(EXPECTED_REJECTS)
    for name, reason in EXPECTED_REJECTS.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
        assert "\n" not in reasons[name]


@pytest.mark.parametrize("name", ["alpha.png", "deep.png", "gray.png", "large.jpg"])
def test_unusual_but_valid_files_are_processed(zoo, name):
    root, summary = zoo
    stem = name.rsplit(".", 1)[0]
    color = cv2.imread(str(root / "out" / "color" / f"{stem}.png"))
    gray = cv2.imread(str(root / "out" / "gray_eq" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
    assert color.shape == (64, 64, 3) and gray.shape == (64, 64)
    assert (color.max(axis=2) > 20).mean() > 0.5, "the retina fills the crop"


def test_summary_and_reports_count_them(zoo):
    root, summary = zoo
    assert summary.images == 11 and summary.processed == 4 and len(summary.rejected) == 7
    assert summary.reject_fraction == pytest.approx(7 / 11)
    assert len(summary.dropped_patients) == 7  # one-eyed patients whose only eye was rejected
    assert "4 processed" in summary.describe() and "7 rejected" in summary.describe()
    assert len(load_manifest(root / "out" / "color" / "manifest.csv")) == 4
