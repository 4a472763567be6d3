"""DICOM photos, as fundus cameras store them: decoded, colour-converted, paired by their header,
checked against the manifest's eye, and refused clearly when damaged."""

import csv
import json
import re

import cv2
import numpy as np
import pytest

from fundus_ensemble.data.dicom import read_dicom_header, write_dicom_photo
from fundus_ensemble.data.imaging import decode_image
from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.data.synthetic import EyeSpec, render_eye
from fundus_ensemble.errors import FundusError, ImageError
from fundus_ensemble.inference.predict import patients_in_folder
from fundus_ensemble.labels import LABELS


def eye_photo(seed: int = 0) -> np.ndarray:
    return render_eye(EyeSpec(frozenset(), "left", seed), 90)


def colour_bars() -> np.ndarray:
    """Blue, green and red bars (BGR): a channel swap or a missing YBR conversion shows at once."""
    bars = np.zeros((48, 96, 3), np.uint8)
    bars[:, :32, 0] = bars[:, 32:64, 1] = bars[:, 64:, 2] = 230
    return bars


@pytest.mark.parametrize("compression", [None, "rle"])
def test_lossless_dicom_gives_back_the_exact_pixels(tmp_path, compression):
    photo = eye_photo()
    path = write_dicom_photo(tmp_path / "a.dcm", photo, "P1", "left", compression)
    assert np.array_equal(decode_image(path), photo)


def test_a_jpeg_dicom_in_ybr_is_decoded_to_the_right_colours(tmp_path):
    bars = colour_bars()
    path = write_dicom_photo(tmp_path / "bars.dcm", bars, compression="jpeg")
    decoded = decode_image(path).astype(int)
    for x, channel in ((16, 0), (48, 1), (80, 2)):  # the middle of each bar: that channel high, the others low
        pixel = decoded[24, x]
        assert pixel[channel] > 200 and np.delete(pixel, channel).max() < 40, (x, pixel)
    photo = eye_photo(3)
    path = write_dicom_photo(tmp_path / "eye.dcm", photo, compression="jpeg")
    ok, jpeg = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 95])
    same_stream = cv2.imdecode(jpeg, cv2.IMREAD_COLOR).astype(int)
    assert np.abs(decode_image(path).astype(int) - same_stream).mean() < 1.0  # decoders differ by rounding only


def test_laterality_and_patient_come_from_the_header(tmp_path):
    assert read_dicom_header(write_dicom_photo(tmp_path / "r.dcm", eye_photo(), "P7", "right")).laterality == "right"
    header = read_dicom_header(write_dicom_photo(tmp_path / "u.dcm", eye_photo(), "", None))
    assert header.laterality is None and header.patient_id is None


def test_a_damaged_or_oversized_dicom_is_one_clear_reason(tmp_path):
    good = write_dicom_photo(tmp_path / "good.dcm", eye_photo(), "P1", "left").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    for name in ("cut.dcm", "garbage.dcm"):
        with pytest.raises(ImageError) as caught:
            decode_image(tmp_path / name)
        assert "DICOM" in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "big.dcm").write_bytes(good)
    with pytest.raises(ImageError, match="too large"):
        decode_image(tmp_path / "big.dcm", max_pixels=90 * 90)


def test_a_camera_folder_is_paired_by_header_and_a_contradiction_is_refused(tmp_path):
    write_dicom_photo(tmp_path / "IMG0001.dcm", eye_photo(1), "P7", "left")
    write_dicom_photo(tmp_path / "IMG0002.dcm", eye_photo(2), "P7", "right", compression="jpeg")
    write_dicom_photo(tmp_path / "IMG0003.dcm", eye_photo(3), "P8", "right")
    cv2.imwrite(str(tmp_path / "9_left.png"), eye_photo(4))
    patients = {p.patient_id: p for p in patients_in_folder(tmp_path)}
    assert set(patients) == {"P7", "P8", "9"}
    assert (patients["P7"].left.name, patients["P7"].right.name) == ("IMG0001.dcm", "IMG0002.dcm")
    assert patients["P8"].left is None and patients["P8"].right.name == "IMG0003.dcm"
    write_dicom_photo(tmp_path / "5_left.dcm", eye_photo(5), "P5", "right")
    with pytest.raises(FundusError, match=r"5_left\.dcm: given as the left eye, but it is a DICOM of the right eye"):
        patients_in_folder(tmp_path)


def test_a_dicom_given_as_the_other_eye_is_refused_the_same_way_everywhere(tmp_path):
    """--left/--right, a manifest's column and a file name: one rule, the station's (test_serve)."""
    import subprocess
    import sys
    from pathlib import Path

    from fundus_ensemble.inference.predict import PatientPhotos, check_sides, patients_in_manifest

    left = write_dicom_photo(tmp_path / "a.dcm", eye_photo(1), "A", "left")
    said = f"{left}: given as the right eye, but it is a DICOM of the left eye (ImageLaterality)"
    with pytest.raises(FundusError, match=re.escape(said)):
        check_sides([PatientPhotos("A", None, left)])
    (tmp_path / "m.csv").write_text("patient_id,left_image,right_image\nA,,a.dcm\n")
    with pytest.raises(FundusError, match=re.escape(said)):
        patients_in_manifest(tmp_path / "m.csv")
    assert check_sides([PatientPhotos("A", left, None)])[0].left == left  # the eye it is: fine
    script = Path(__file__).resolve().parents[1] / "scripts" / "predict.py"
    (tmp_path / "run" / "color").mkdir(parents=True)
    (tmp_path / "run" / "color" / "model.keras").write_bytes(b"x")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), "--right", str(left), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        done.returncode == 2
        and done.stderr.strip().splitlines()[-1] == f"error: {said}; give it as the left eye or fix its header"
    ), done.stderr[-800:]


def test_preprocess_reads_dicom_and_rejects_a_wrong_eye_or_a_damaged_file_alone(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    write_dicom_photo(root / "a_l.dcm", eye_photo(1), "a", "left", compression="jpeg")
    write_dicom_photo(root / "a_r.dcm", eye_photo(2), "a", "left")  # the manifest says right
    write_dicom_photo(root / "b_l.dcm", eye_photo(3), "b", "left")
    (root / "b_r.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 40)
    header = "patient_id,left_image,right_image," + ",".join(LABELS) + ",split"
    labels = ",".join(["1"] + ["0"] * (len(LABELS) - 1))
    (tmp_path / "m.csv").write_text(f"{header}\na,a_l.dcm,a_r.dcm,{labels},train\nb,b_l.dcm,b_r.dcm,{labels},train\n")
    summary = preprocess_manifest(
        load_manifest(tmp_path / "m.csv", root), tmp_path / "prep", size=48, workers=1, progress=False
    )
    reasons = dict(summary.rejected)
    assert set(reasons) == {"a_r.dcm", "b_r.dcm"}
    assert "given as the right eye, but it is a DICOM of the left eye (ImageLaterality)" in reasons["a_r.dcm"]
    assert "DICOM" in reasons["b_r.dcm"]
    view = cv2.imread(str(tmp_path / "prep" / "color" / "b_l.png"))
    assert view.shape == (48, 48, 3)
    rows = list(csv.DictReader(open(tmp_path / "prep" / "color" / "manifest.csv")))
    assert [(r["patient_id"], r["left_image"], r["right_image"]) for r in rows] == [
        ("a", "a_l.png", ""),
        ("b", "b_l.png", ""),
    ]


@pytest.mark.backend
def test_predict_gives_a_dicom_the_probabilities_of_the_same_photo_as_png(tmp_path):
    from fundus_ensemble.inference.predict import PatientPhotos, predict_photos
    from fundus_ensemble.models import build_patient_model

    run = tmp_path / "run"
    (run / "color").mkdir(parents=True)
    build_patient_model("mobilenet", 32, None, 0.5).save(str(run / "color" / "model.keras"))
    (run / "color" / "card.json").write_text(json.dumps({"view": "color", "labels": list(LABELS), "input_size": 32}))
    left, right = eye_photo(1), eye_photo(2)
    cv2.imwrite(str(tmp_path / "l.png"), left)
    cv2.imwrite(str(tmp_path / "r.png"), right)
    (tmp_path / "dcm").mkdir()
    write_dicom_photo(tmp_path / "dcm" / "x1.dcm", left, "D1", "left")
    write_dicom_photo(tmp_path / "dcm" / "x2.dcm", right, "D1", "right", compression="rle")
    predict_photos(run, patients_in_folder(tmp_path / "dcm"), tmp_path / "out_dcm", progress=False)
    predict_photos(
        run, [PatientPhotos("D1", tmp_path / "l.png", tmp_path / "r.png")], tmp_path / "out_png", progress=False
    )
    dcm = (tmp_path / "out_dcm" / "decisions.csv").read_text()
    assert dcm == (tmp_path / "out_png" / "decisions.csv").read_text()
    assert {r["status"] for r in csv.DictReader(dcm.splitlines())} == {"ok"}


# --- small files that must not take the machine down (each bound measured, not only the error) ---------


def _deflated(path, source, extra: bytes = b""):
    """``source`` re-saved as Deflated Explicit VR Little Endian, with ``extra`` bytes in a private tag."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(source)
    if extra:
        ds.add_new((0x0009, 0x0010), "LO", "BOMB")
        ds.add_new((0x0009, 0x1001), "OB", extra)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _peak_bytes(work) -> int:
    """Peak bytes Python and numpy allocate while ``work`` runs (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        work()
    except ImageError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_a_deflated_dicom_is_read_and_a_deflate_bomb_refused_within_its_bound(tmp_path):
    from fundus_ensemble.data.dicom import decode_dicom, inflate_limit

    photo = eye_photo()
    plain = write_dicom_photo(tmp_path / "plain.dcm", photo, "P1", "left")
    small = _deflated(tmp_path / "small.dcm", plain)
    assert np.array_equal(decode_image(small), photo) and read_dicom_header(small).laterality == "left"
    bomb = _deflated(tmp_path / "bomb.dcm", plain, b"\0" * 200_000_000)
    assert bomb.stat().st_size < 400_000  # 500:1 and more
    max_pixels = 1_000_000
    limit = inflate_limit(max_pixels)
    for read in (lambda: decode_dicom(bomb, max_pixels), lambda: read_dicom_header(bomb, max_pixels)):
        with pytest.raises(ImageError, match=r"inflates past 19 MB \(0\.\d\d MB compressed\); refused"):
            read()
        assert _peak_bytes(read) < 3 * limit, "inflating stopped at the limit"


def test_a_deflate_bomb_within_the_default_limit_costs_little_memory(tmp_path):
    """200 MB of zeros in a private tag, deflated to under 0.4 MB: under the default pixel limit
    the dataset is inflated (to disk), the photo decoded and the tag never read into memory."""
    photo = eye_photo()
    plain = write_dicom_photo(tmp_path / "plain.dcm", photo, "P1", "left")
    bomb = _deflated(tmp_path / "bomb.dcm", plain, b"\0" * 200_000_000)
    assert np.array_equal(decode_image(bomb), photo) and read_dicom_header(bomb).laterality == "left"
    for read in (lambda: decode_image(bomb), lambda: read_dicom_header(bomb)):
        peak = _peak_bytes(read)
        assert peak < 20_000_000, f"{peak / 1e6:.0f} MB taken to read a {bomb.stat().st_size / 1e6:.2f} MB file"


def _rss_growth_mb(code: str) -> tuple[float, str]:
    """Run ``code`` (which sets ``answer``) in a fresh interpreter; the growth of its peak RSS, and ``answer``."""
    import subprocess
    import sys

    script = (
        "import resource, numpy, pydicom, PIL.Image\nfrom fundus_ensemble.data import dicom, imaging\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        + code
        + "\nprint((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\nprint(answer)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    growth, answer = done.stdout.strip().splitlines()[-2:]
    return float(growth), answer


def test_a_jpeg_stream_larger_than_its_header_is_refused_before_decoding(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate

    from fundus_ensemble.data.dicom import compressed_frame_size

    path = write_dicom_photo(tmp_path / "liar.dcm", eye_photo(), "P1", "left", compression="jpeg")
    ds = pydicom.dcmread(path)
    ok, huge = cv2.imencode(".jpg", np.zeros((8000, 6000, 3), np.uint8))  # 144 MB decoded, under 1 MB here
    assert ok and compressed_frame_size(huge.tobytes()) == (6000, 8000)
    ds.PixelData = encapsulate([huge.tobytes()])
    ds.save_as(path, enforce_file_format=True)
    growth, answer = _rss_growth_mb(
        f"try:\n    imaging.decode_image({str(path)!r}, max_pixels=100_000_000)\n    answer = 'decoded'\n"
        "except imaging.ImageError as exc:\n    answer = str(exc)"
    )
    assert answer == (
        "the DICOM's compressed frame holds a 6000 x 8000 image but its header says 120 x 83; refused before decoding"
    ), answer
    assert growth < 50, f"{growth:.0f} MB taken: the frame was decoded"
    ok, jp2 = cv2.imencode(".jp2", np.zeros((70, 50, 3), np.uint8))  # JPEG 2000's size, from its SIZ marker
    assert ok and compressed_frame_size(jp2.tobytes()) == (50, 70)
    assert compressed_frame_size(b"\xff\xd8\xff\xda\x00\x02") is None  # scan data before a frame header
