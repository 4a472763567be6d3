"""Nothing lost, nothing silently wrong: the second reliability round (issue 11), one test a point."""

import csv
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import HEADER
from crashing_task import dies_on_b
from PIL import Image

from fundus_ensemble.data.imaging import decode_image
from fundus_ensemble.data.importers import import_label_table
from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import map_in_processes, preprocess_manifest
from fundus_ensemble.data.synthetic import EyeSpec, render_eye, write_synthetic_dataset
from fundus_ensemble.errors import FundusError, ImageError, ManifestError
from fundus_ensemble.evaluation.ensemble import predictions_csv
from fundus_ensemble.fileio import OWNER_MARK, atomic_write_text, claim_folder, remove_owned

REPO = Path(__file__).resolve().parents[1]
TABLE_HEADER = "filename,ID,eye,patient_age,patient_sex,eye_keywords,N,D,G,C,A,H,M,O"


def script(name, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def photo(seed=0, diameter=120):
    return render_eye(EyeSpec(frozenset(), "left", seed), diameter)


def write_photos(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), photo(i))


def manifest_of(root: Path, names: list[str]) -> Path:
    rows = [HEADER] + [f"p{i},{name},,0,1,0,0,0,0,0,0,train" for i, name in enumerate(names)]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


# ---- data loss and silent corruption -------------------------------------------------------


def test_preprocess_never_clears_a_folder_holding_the_photos(tmp_path):
    names = ["color/a.jpg", "color/b.jpg"]
    write_photos(tmp_path, names)
    manifest = load_manifest(manifest_of(tmp_path, names))
    with pytest.raises(FundusError, match="contains the image root"):
        preprocess_manifest(manifest, tmp_path, size=48, workers=1, progress=False)
    with pytest.raises(FundusError, match="contains the source image"):  # --out inside the root, photos under it
        preprocess_manifest(manifest, tmp_path / "color", size=48, workers=1, progress=False)
    assert all((tmp_path / n).is_file() for n in names), "a source photo was deleted"


def test_only_folders_the_project_made_are_deleted(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"precious")
    with pytest.raises(FundusError, match="did not create it"):
        remove_owned(foreign)
    with pytest.raises(FundusError, match="did not write"):
        claim_folder(foreign, "a training run")
    owned = claim_folder(tmp_path / "run", "a training run")
    assert (owned / OWNER_MARK).is_file()
    remove_owned(owned)
    assert not owned.exists() and (foreign / "photo.jpg").read_bytes() == b"precious"


def test_train_pair_force_refuses_to_delete_a_foreign_folder(view_manifest, tmp_path):
    from fundus_ensemble.training.train import TrainConfig, train_pair

    prep = Path(view_manifest.source).parent.parent
    (tmp_path / "run" / "color").mkdir(parents=True)
    (tmp_path / "run" / "color" / "notes.txt").write_text("mine")
    with pytest.raises(FundusError, match="did not write|did not create"):
        train_pair(prep, tmp_path / "run", TrainConfig(size=48), ("color",), force=True)
    assert (tmp_path / "run" / "color" / "notes.txt").read_text() == "mine"


def label_table(root: Path, rows: list[str], header: str = TABLE_HEADER) -> Path:
    (root / "images").mkdir(exist_ok=True)
    path = root / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_make_manifest_never_overwrites_its_input_nor_an_existing_file_without_force(tmp_path):
    write_photos(tmp_path / "images", ["1_left.jpg"])
    table = label_table(tmp_path, ["1_left.jpg,1,left,60,Male,normal fundus,1,0,0,0,0,0,0,0"])
    before = table.read_bytes()
    result = script("make_manifest.py", table, "--image-root", tmp_path, "--out", table, "--force")
    assert result.returncode == 2 and "is the input file" in result.stderr
    assert table.read_bytes() == before
    out = tmp_path / "m.csv"
    out.write_text("keep me")
    result = script("make_manifest.py", table, "--image-root", tmp_path, "--out", out)
    assert result.returncode == 2 and "--force" in result.stderr and out.read_text() == "keep me"
    assert script("make_manifest.py", table, "--image-root", tmp_path, "--out", out, "--force").returncode == 0
    assert "patient_id" in out.read_text()


@pytest.mark.parametrize(
    "header,row,message",
    [
        (
            TABLE_HEADER.replace(",O", ",D"),
            "a.jpg,1,left,60,Male,kw,1,0,0,0,0,0,0,0",
            r"row 1, column 'D': column appears twice",
        ),
        (
            TABLE_HEADER,
            "/abs/a.jpg,1,left,60,Male,kw,1,0,0,0,0,0,0,0",
            r"row 2, column 'filename', value '/abs/a.jpg': .*absolute",
        ),
        (
            TABLE_HEADER,
            "../a.jpg,1,left,60,Male,kw,1,0,0,0,0,0,0,0",
            r"row 2, column 'filename', value '../a.jpg': .*escapes",
        ),
        (TABLE_HEADER, "a.jpg,1,left,60,Male,kw,1,0,0,0,0,0,0,0,extra", r"row 2: has 15 fields but the header has 14"),
    ],
)
def test_label_tables_are_validated_as_strictly_as_manifests(tmp_path, header, row, message):
    table = label_table(tmp_path, [row], header)
    with pytest.raises(ManifestError, match=message):
        import_label_table(table, "image-table", tmp_path)


def test_changing_the_size_of_a_used_preprocess_folder_needs_force(small_dataset, tmp_path):
    manifest = load_manifest(small_dataset)
    preprocess_manifest(manifest, tmp_path / "prep", size=48, workers=1, progress=False)
    view = next((tmp_path / "prep" / "color").rglob("*.png"))
    with pytest.raises(FundusError, match="other settings .*--force"):
        preprocess_manifest(manifest, tmp_path / "prep", size=40, workers=1, progress=False)
    assert cv2.imread(str(view)).shape[:2] == (48, 48), "views were deleted without --force"
    preprocess_manifest(manifest, tmp_path / "prep", size=40, workers=1, progress=False, force=True)
    assert cv2.imread(str(view)).shape[:2] == (40, 40)


# ---- crashes instead of errors -------------------------------------------------------------


@pytest.mark.parametrize(
    "content,message",
    [
        ("filename,ID\ncaf\xe9.jpg,1\n".encode("latin-1"), "not UTF-8 text"),
        (bytes(range(256)) * 4, "not UTF-8 text"),
        (
            (TABLE_HEADER + "\n" + "a.jpg,1,left,60,Male," + "k" * 200_000 + ",1,0,0,0,0,0,0,0\n").encode(),
            r"row 2: not readable as CSV \(field larger",
        ),
    ],
)
def test_make_manifest_unreadable_tables_are_one_line_errors(tmp_path, content, message):
    table = tmp_path / "labels.csv"
    table.write_bytes(content)
    (tmp_path / "images").mkdir()
    result = script("make_manifest.py", table, "--image-root", tmp_path, "--out", tmp_path / "m.csv")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith(f"error: {table}")
        and message.split(r"\(")[0].replace("\\", "") in lines[0]
    )


def test_when_every_image_is_rejected_the_rejects_file_exists(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    manifest = load_manifest(manifest_of(tmp_path, ["a.jpg", "b.jpg"]))
    with pytest.raises(FundusError, match="every image was rejected; see .*rejects.csv"):
        preprocess_manifest(manifest, tmp_path / "out", size=48, workers=1, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "rejects.csv")))
    assert {r["image"] for r in rows if r["kind"] == "image"} == {"a.jpg", "b.jpg"}


def test_an_output_name_clash_names_both_images_and_their_rows(tmp_path):
    write_photos(tmp_path, ["x.jpg", "x.png"])
    manifest = load_manifest(manifest_of(tmp_path, ["x.jpg", "x.png"]))
    with pytest.raises(FundusError, match=r"x.jpg \(row 2, patient p0\) and x.png \(row 3, patient p1\)"):
        preprocess_manifest(manifest, tmp_path / "out", size=48, workers=1, progress=False)


# ---- photos --------------------------------------------------------------------------------


def test_a_white_disc_on_black_is_overexposed(tmp_path):
    image = np.zeros((400, 400, 3), np.uint8)
    cv2.circle(image, (200, 200), 150, (255, 255, 255), -1)
    path = tmp_path / "white.png"
    cv2.imwrite(str(path), image)
    from fundus_ensemble.data.imaging import crop_to_fov

    with pytest.raises(ImageError, match="overexposed"):
        crop_to_fov(decode_image(path), 64)
    crop_to_fov(decode_image_of(photo(diameter=300), tmp_path), 64)  # a real-looking retina still passes


def decode_image_of(image, folder):
    cv2.imwrite(str(folder / "ok.png"), image)
    return decode_image(folder / "ok.png")


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_as_viewers_do(tmp_path, orientation):
    image = np.zeros((120, 200, 3), np.uint8)
    image[:40, :60] = (0, 0, 255)  # a red block in the stored top-left corner
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(image[:, :, ::-1]).save(path, exif=exif, quality=95)
    upright = decode_image(path)
    expected = cv2.imread(str(path), cv2.IMREAD_COLOR)  # OpenCV's IMREAD_COLOR applies EXIF orientation
    assert upright.shape == expected.shape == ((200, 120, 3) if orientation in (6, 8) else (120, 200, 3))
    assert np.abs(upright.astype(int) - expected.astype(int)).max() <= 2


def test_a_symlink_out_of_the_image_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    write_photos(outside, ["secret.jpg"])
    root = tmp_path / "root"
    root.mkdir()
    (root / "eye.jpg").symlink_to(outside / "secret.jpg")
    with pytest.raises(
        ManifestError, match="row 2, column 'left_image', value 'eye.jpg': image path leads outside the image root"
    ):
        load_manifest(manifest_of(root, ["eye.jpg"]))


def test_a_folder_given_as_an_image_is_called_a_folder(tmp_path):
    (tmp_path / "eye.jpg").mkdir()
    with pytest.raises(ManifestError, match="eye.jpg is a folder, not an image file"):
        load_manifest(manifest_of(tmp_path, ["eye.jpg"]))
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        decode_image(tmp_path / "eye.jpg")


def test_photos_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((3000, 4000, 3), np.uint8))
    with pytest.raises(ImageError, match=r"image too large \(4000 x 3000 = 12 megapixels; the limit is 10"):
        decode_image(path, max_pixels=10_000_000)
    assert decode_image(path, max_pixels=None).shape == (3000, 4000, 3)


# ---- processes -----------------------------------------------------------------------------


def test_a_killed_worker_costs_its_task_only():
    results, crashed = {}, []
    map_in_processes(
        dies_on_b, list("abcdef"), 2, on_result=results.__setitem__, on_crash=crashed.append, initializer=None
    )
    assert crashed == ["b"]
    assert results == {t: t.upper() for t in "acdef"}


def test_a_worker_that_starts_after_its_job_died_ends_at_once():
    # a worker still importing when the job is killed: its parent is already another process (init, a
    # subreaper) when it starts watching, so it must watch for the job's pid, not the one it reads then
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    code = (
        "import time\nfrom fundus_ensemble.data.preprocess import _die_with_parent\n"
        f"_die_with_parent({int(gone.stdout)})\ntime.sleep(60)"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120)
    assert result.returncode == 1 and time.monotonic() - started < 30


def test_killing_the_preprocess_job_kills_its_workers(tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", 60, seed=4, diameter=400)
    out = tmp_path / "prep"
    job = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "preprocess.py"),
            str(manifest),
            "--out",
            str(out),
            "--size",
            "256",
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while len(list(out.rglob("*.png"))) < 10:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before it could be killed"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)  # the main process only, as `kill -9 PID` does
    job.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(job.pid, 0)  # anyone left in the job's process group?
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "workers (or the resource tracker) outlived the killed job"
        time.sleep(0.1)
    written = len(list(out.rglob("*.png")))
    time.sleep(1)
    assert len(list(out.rglob("*.png"))) == written, "views were still written after the job was killed"


# ---- security and file modes ---------------------------------------------------------------


def test_formula_like_ids_are_neutralised_in_predictions_and_rejects(tmp_path):
    text = predictions_csv(['=HYPERLINK("http://x")', "123", "-5", "@SUM(A1)"], np.full((4, 8), 0.25))
    ids = [row[0] for row in csv.reader(text.splitlines()[1:])]
    assert ids == ['\'=HYPERLINK("http://x")', "123", "-5", "'@SUM(A1)"]
    (tmp_path / "bad.jpg").write_bytes(b"no")
    (tmp_path / "ok.jpg").write_bytes(cv2.imencode(".jpg", photo(1))[1].tobytes())
    (tmp_path / "manifest.csv").write_text(
        f"{HEADER}\n\"=cmd|' /C calc'!A0\",bad.jpg,,0,1,0,0,0,0,0,0,train\np2,ok.jpg,,0,1,0,0,0,0,0,0,train\n"
    )
    preprocess_manifest(load_manifest(tmp_path / "manifest.csv"), tmp_path / "out", size=48, workers=1, progress=False)
    rejected = [r["patient_id"] for r in csv.DictReader(open(tmp_path / "out" / "rejects.csv"))]
    assert rejected and all(pid.startswith("'=") for pid in rejected)


def test_written_files_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
