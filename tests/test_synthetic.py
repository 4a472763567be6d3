from pathlib import Path

import cv2
import numpy as np

from fundus_ensemble.data.imaging import find_fov
from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.synthetic import EyeSpec, make_patients, render_eye
from fundus_ensemble.demo import DEMO, write_demo

REPO = Path(__file__).resolve().parents[1]


def test_generator_reproduces_the_committed_demo(tmp_path):
    write_demo(tmp_path)
    assert (tmp_path / DEMO.manifest).read_text() == (REPO / DEMO.manifest).read_text()
    committed = load_manifest(REPO / DEMO.manifest)
    assert len(committed) == DEMO.patients
    for patient in committed.patients:
        for image in (patient.left_image, patient.right_image):
            fresh = cv2.imread(str(tmp_path / image))
            stored = cv2.imread(str(REPO / image))
            assert fresh.shape == stored.shape, image
            # JPEG coders may differ by a level or two between OpenCV builds; content must not
            assert np.abs(fresh.astype(int) - stored.astype(int)).mean() < 1.0, image


def test_demo_is_small_and_has_every_class_in_every_split():
    size = sum(f.stat().st_size for f in (REPO / "data" / "demo").rglob("*") if f.is_file())
    assert size < 5 * 2**20
    manifest = load_manifest(REPO / DEMO.manifest)
    for split in ("train", "val", "test"):
        assert (manifest.select(split).label_matrix().sum(axis=0) > 0).all(), split


def test_labels_are_consistent():
    for _, labels, specs in make_patients(200, seed=3):
        diseases = labels[1:]
        assert labels[0] == int(not any(diseases))  # N exactly when no disease
        shown = specs["left"].findings | specs["right"].findings
        assert shown == {name for name, v in zip("DGCAHMO", diseases) if v}


def test_findings_change_the_image_and_the_retina_is_found():
    normal = render_eye(EyeSpec(frozenset(), "left", 11), 200)
    for finding in "DGCAHMO":
        sick = render_eye(EyeSpec(frozenset({finding}), "left", 11), 200)
        assert sick.shape == normal.shape
        changed = (np.abs(sick.astype(int) - normal.astype(int)).max(axis=2) > 20).sum()
        assert changed > 50, finding  # G alters only the cup, a few hundred pixels
    x0, y0, x1, y1 = find_fov(normal)
    assert x1 - x0 > 0.9 * 200 and x0 > 0  # camera border left and right of the retina


def test_disc_is_on_the_nasal_side():
    left = render_eye(EyeSpec(frozenset(), "left", 5), 200).max(axis=2)
    right = render_eye(EyeSpec(frozenset(), "right", 5), 200).max(axis=2)
    brightest_left = np.unravel_index(np.argmax(cv2.GaussianBlur(left, (9, 9), 0)), left.shape)[1]
    brightest_right = np.unravel_index(np.argmax(cv2.GaussianBlur(right, (9, 9), 0)), right.shape)[1]
    assert brightest_left < left.shape[1] / 2 < brightest_right


def test_the_demo_says_in_one_line_whether_the_run_is_healthy():
    from fundus_ensemble.demo import health

    def report(color, gray, ensemble):
        scores = lambda auc, final: {"auc": auc, "final": final}  # noqa: E731
        return {
            "trivial": {"class prior (train)": scores(0.64, 0.49)},
            "models": {"color": scores(*color), "gray_eq": scores(*gray)},
            "ensemble": scores(*ensemble),
        }

    ok, line = health(report((0.98, 0.89), (0.93, 0.86), (0.99, 0.91)))
    assert ok and line.startswith("healthy: every model is above the image-blind class prior")
    assert "lowest gray_eq model 0.930 against 0.640" in line
    for bad in (report((0.98, 0.89), (0.60, 0.86), (0.99, 0.91)), report((0.98, 0.48), (0.93, 0.86), (0.99, 0.91))):
        ok, line = health(bad)  # one model under the prior's AUC, or under its final
        assert not ok and line.startswith("NOT healthy:"), line
