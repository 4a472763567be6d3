import json
import os
import shutil

import cv2
import numpy as np
import pytest

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.errors import FundusError


@pytest.fixture()
def dataset(small_dataset, tmp_path):
    """A private copy of the small synthetic dataset (tests here modify images)."""
    root = tmp_path / "data"
    shutil.copytree(small_dataset.parent, root)
    return root / small_dataset.name


def test_writes_both_views_and_valid_manifests(dataset, tmp_path):
    manifest = load_manifest(dataset)
    out = tmp_path / "prep"
    summary = preprocess_manifest(manifest, out, size=64, workers=2, progress=False)
    assert summary.processed == 48 and summary.up_to_date == 0 and not summary.rejected
    for view in ("color", "gray_eq"):
        view_manifest = load_manifest(out / view / "manifest.csv")  # validates every file exists
        assert view_manifest.patient_ids == manifest.patient_ids
        assert [p.labels for p in view_manifest.patients] == [p.labels for p in manifest.patients]
    color = cv2.imread(str(out / "color" / "images" / "syn0000_left.png"), cv2.IMREAD_UNCHANGED)
    gray = cv2.imread(str(out / "gray_eq" / "images" / "syn0000_left.png"), cv2.IMREAD_UNCHANGED)
    assert color.shape == (64, 64, 3) and gray.shape == (64, 64)
    np.testing.assert_array_equal(gray, cv2.equalizeHist(cv2.cvtColor(color, cv2.COLOR_BGR2GRAY)))
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_rerun_skips_up_to_date_and_redoes_changed(dataset, tmp_path):
    manifest = load_manifest(dataset)
    out = tmp_path / "prep"
    preprocess_manifest(manifest, out, size=64, workers=1, progress=False)
    again = preprocess_manifest(manifest, out, size=64, workers=1, progress=False)
    assert again.processed == 0 and again.up_to_date == 48

    source = dataset.parent / "images" / "syn0003_right.jpg"
    later = os.stat(out / "color" / "images" / "syn0003_right.png").st_mtime + 10
    os.utime(source, (later, later))
    (out / "gray_eq" / "images" / "syn0005_left.png").unlink()
    third = preprocess_manifest(manifest, out, size=64, workers=1, progress=False)
    assert third.processed == 2 and third.up_to_date == 46

    resized = preprocess_manifest(manifest, out, size=48, workers=1, progress=False, force=True)
    assert resized.processed == 48, "a different size must invalidate every output"


def test_unreadable_images_are_rejected_and_reported(dataset, tmp_path):
    images = dataset.parent / "images"
    (images / "syn0001_left.jpg").write_bytes(b"")
    (images / "syn0002_left.jpg").write_text("hello")
    (images / "syn0002_right.jpg").write_text("hello")
    manifest = load_manifest(dataset)
    out = tmp_path / "prep"
    summary = preprocess_manifest(manifest, out, size=64, workers=2, progress=False)
    assert summary.processed == 45
    assert dict(summary.rejected) == {
        "images/syn0001_left.jpg": "empty file (0 bytes)",
        "images/syn0002_left.jpg": "not a readable image (unknown format or corrupt data)",
        "images/syn0002_right.jpg": "not a readable image (unknown format or corrupt data)",
    }
    assert summary.dropped_patients == ["syn0002"]
    color = load_manifest(out / "color" / "manifest.csv")
    assert "syn0002" not in color.patient_ids
    one_eyed = color.patients[color.patient_ids.index("syn0001")]
    assert one_eyed.left_image is None and one_eyed.right_image == "images/syn0001_right.png"
    report = (out / "rejects.csv").read_text()
    assert "syn0001_left.jpg,syn0001,empty file" in report and "patient,,syn0002" in report


def test_views_of_old_settings_never_pass_as_up_to_date(dataset, tmp_path):
    manifest = load_manifest(dataset)
    out = tmp_path / "prep"
    preprocess_manifest(manifest, out, size=64, workers=1, progress=False)
    # a partial run at a new size (killed, or on fewer patients) leaves the rest at the old size
    preprocess_manifest(
        manifest.with_patients(manifest.patients[:12]), out, size=48, workers=1, progress=False, force=True
    )
    full = preprocess_manifest(manifest, out, size=48, workers=1, progress=False)
    assert full.up_to_date == 24 and full.processed == 24
    sizes = {cv2.imread(str(p)).shape[:2] for p in (out / "color").rglob("*.png")}
    assert sizes == {(48, 48)}


def _tree(folder):
    """Every file under ``folder`` (ownership marks aside) with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.name != "preprocess.json"
    }


def test_shards_merged_equal_one_run(dataset, tmp_path):
    from fundus_ensemble.data.preprocess import merge_shards, preprocess_shard

    (dataset.parent / "images" / "syn0005_right.jpg").write_bytes(b"not a photo")  # a reject must survive the merge
    manifest = load_manifest(dataset)
    single = tmp_path / "single"
    preprocess_manifest(manifest, single, size=48, workers=1, progress=False)
    sharded = tmp_path / "sharded"
    shard_summaries = [preprocess_shard(manifest, sharded, i, 3, size=48, workers=1, progress=False) for i in (1, 2, 3)]
    assert sum(s.images for s in shard_summaries) == 48 and all(s.images < 48 for s in shard_summaries)
    merged = merge_shards(manifest, sharded, 3, size=48)
    assert not (sharded / "shards").exists()
    assert _tree(sharded) == _tree(single)
    assert len(merged.rejected) == 1
    records = [json.loads((folder / "preprocess.json").read_text()) for folder in (single, sharded)]
    for record in records:
        del record["summary"]["out_dir"]
    assert records[0] == records[1]


def test_merge_refuses_missing_or_mismatched_shards(dataset, tmp_path):
    from fundus_ensemble.data.preprocess import merge_shards, parse_shard, preprocess_shard

    manifest = load_manifest(dataset)
    out = tmp_path / "sharded"
    preprocess_shard(manifest, out, 1, 2, size=48, workers=1, progress=False)
    with pytest.raises(FundusError, match="shard 2/2 is missing or unfinished"):
        merge_shards(manifest, out, 2, size=48)
    preprocess_shard(manifest, out, 2, 2, size=48, workers=1, progress=False)
    with pytest.raises(FundusError, match="other settings"):
        merge_shards(manifest, out, 2, size=64)
    with pytest.raises(FundusError, match="shard 1/3 is missing"):
        merge_shards(manifest, out, 3, size=48)
    for bad in ("0/2", "3/2", "two", "1/2/3"):
        with pytest.raises(FundusError, match="--shard"):
            parse_shard(bad)
    assert parse_shard("2/8") == (2, 8)
