"""The entry points: user errors are one line and exit status 2; the happy paths write what they say."""

import subprocess
import sys
from pathlib import Path

from conftest import HEADER

from fundus_ensemble.data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


def script(name, *args, cwd=REPO):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_preprocess_bad_manifest_is_one_clear_line(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text(f"{HEADER}\np1,a.jpg,,0,1,0,0,0,0,0,0,train\n")
    result = script("preprocess.py", bad, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}, row 2, column 'left_image', value 'a.jpg': image file not found at {tmp_path / 'a.jpg'}"
    ]
    assert not (tmp_path / "out").exists(), "nothing may be written for a bad manifest"


def test_preprocess_fails_when_too_many_rejects(small_dataset, tmp_path):
    result = script(
        "preprocess.py", small_dataset, "--out", tmp_path / "out", "--size", 48, "--max-reject-fraction", "0.5"
    )
    assert result.returncode == 0, result.stderr
    assert "48 images: 48 processed" in result.stdout


def test_make_manifest_from_image_table(small_dataset, tmp_path):
    table = tmp_path / "labels.csv"
    rows = ["filename,ID,eye,patient_age,patient_sex,eye_keywords,N,D,G,C,A,H,M,O"]
    for p in load_manifest(small_dataset).patients:
        for eye, image in (("left", p.left_image), ("right", p.right_image)):
            rows.append(f"{Path(image).name},{p.patient_id},{eye},60,Male,kw,{','.join(map(str, p.labels))}")
    table.write_text("\n".join(rows) + "\n")
    out = tmp_path / "manifest.csv"
    result = script("make_manifest.py", table, "--image-root", small_dataset.parent, "--out", out, "--seed", 3)
    assert result.returncode == 0, result.stderr
    made = load_manifest(out, image_root=small_dataset.parent)
    assert len(made) == 24 and {p.split for p in made.patients} == {"train", "val", "test"}


def test_train_pair_without_preprocessing(tmp_path):
    result = script("train_pair.py", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert result.returncode == 2 and "run scripts/preprocess.py first" in result.stderr


def test_score_without_models(tmp_path):
    result = script("score.py", tmp_path / "run", tmp_path / "prep")
    assert result.returncode == 2 and "no trained view model" in result.stderr
