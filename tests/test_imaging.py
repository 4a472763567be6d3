import cv2
import numpy as np
import pytest

from fundus_ensemble.data.imaging import crop_to_fov, decode_image, find_fov, gray_eq_view, load_view, to_bgr8
from fundus_ensemble.data.synthetic import EyeSpec, render_eye
from fundus_ensemble.errors import ImageError


def bordered_retina(border_x=300, border_y=80):
    """A synthetic retina inside a wide black camera border, with a white timestamp in the corner."""
    retina = render_eye(EyeSpec(frozenset({"D"}), "left", 3), 256)
    h, w = retina.shape[:2]
    canvas = np.zeros((h + 2 * border_y, w + 2 * border_x, 3), np.uint8)
    canvas[border_y : border_y + h, border_x : border_x + w] = retina
    cv2.putText(canvas, "2019-03-01 10:22", (5, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
    return canvas, retina


def test_fov_box_finds_the_retina_not_the_text():
    canvas, retina = bordered_retina()
    x0, y0, x1, y1 = find_fov(canvas)
    # the retina disc sits inside the pasted photo; the box must hug it, ignoring the label
    assert 300 <= x0 <= 300 + 0.25 * retina.shape[1]
    assert 300 + 0.75 * retina.shape[1] <= x1 <= 300 + retina.shape[1]
    assert x1 - x0 > 200 and y1 - y0 > 200


def test_crop_removes_border_and_is_square():
    canvas, _ = bordered_retina()
    out = crop_to_fov(canvas, 128)
    assert out.shape == (128, 128, 3)
    # the retina fills the width: the middle row is bright from near edge to near edge
    row = out[64].max(axis=1)
    assert (row[4:-4] > 20).all()
    # the original canvas was mostly black; after cropping most pixels are retina
    assert (out.max(axis=2) > 20).mean() > 0.6
    assert (canvas.max(axis=2) > 20).mean() < 0.3


def test_black_image_is_rejected():
    with pytest.raises(ImageError, match="no retina found"):
        crop_to_fov(np.zeros((200, 300, 3), np.uint8), 64)


def test_gray_eq_is_single_channel_and_equalized():
    canvas, _ = bordered_retina()
    square = crop_to_fov(canvas, 128)
    eq = gray_eq_view(square)
    assert eq.shape == (128, 128)
    gray = cv2.cvtColor(square, cv2.COLOR_BGR2GRAY)
    # global equalization stretches the retina's narrow band of grays over the full range
    assert eq.max() == 255 and np.ptp(eq) > np.ptp(gray)
    np.testing.assert_array_equal(eq, cv2.equalizeHist(gray))


def test_decode_formats(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 2] = 200
    rgba[..., 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    assert decode_image(tmp_path / "a.png").shape == (20, 20, 3)
    cv2.imwrite(str(tmp_path / "g16.png"), np.full((20, 20), 65535, np.uint16))
    decoded = decode_image(tmp_path / "g16.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (20, 20, 3) and decoded.max() == 255
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        decode_image(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(tmp_path / "text.jpg")
    ok, data = cv2.imencode(".jpg", render_eye(EyeSpec(frozenset(), "left", 1), 120))
    (tmp_path / "cut.jpg").write_bytes(data.tobytes()[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated JPEG"):
        decode_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="file not found"):
        decode_image(tmp_path / "gone.jpg")


def test_to_bgr8_gray():
    assert to_bgr8(np.zeros((5, 5), np.uint8)).shape == (5, 5, 3)


def test_load_view_is_rgb_and_replicates_gray(tmp_path):
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV order
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    assert load_view(tmp_path / "c.png")[0, 0].tolist() == [0, 0, 255]
    cv2.imwrite(str(tmp_path / "g.png"), np.full((8, 8), 77, np.uint8))
    gray = load_view(tmp_path / "g.png", size=4)
    assert gray.shape == (4, 4, 3) and (gray == 77).all()
