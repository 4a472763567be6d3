"""Prediction at scale: --shard i/n splits the patients the same way on every machine and the
merge joins the shards into what one run writes; a killed run resumes from its last finished
batch, no patient predicted twice and none lost."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_ensemble.data.synthetic import EyeSpec, render_eye
from fundus_ensemble.errors import FundusError
from fundus_ensemble.inference.merge import merge_predictions
from fundus_ensemble.inference.predict import in_shard, patients_in_folder, predict_photos
from fundus_ensemble.labels import LABELS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_and_photos(tmp_path_factory):
    """An untrained colour model at 32 px with a random head, and 40 patients' photos."""
    import keras

    from fundus_ensemble.models import build_patient_model

    root = tmp_path_factory.mktemp("scale")
    (root / "run" / "color").mkdir(parents=True)
    model = build_patient_model("mobilenet", 32, None, 0.5)
    head = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)][-1]
    rng = np.random.default_rng(3)
    head.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in head.get_weights()])
    model.save(str(root / "run" / "color" / "model.keras"))
    (root / "run" / "color" / "card.json").write_text(
        json.dumps({"view": "color", "labels": list(LABELS), "input_size": 32})
    )
    (root / "photos").mkdir()
    for k in range(40):
        for e, eye in enumerate(("left", "right")):
            cv2.imwrite(
                str(root / "photos" / f"p{k:02d}_{eye}.jpg"), render_eye(EyeSpec(frozenset(), eye, 2 * k + e), 64)
            )
    return root


def _table(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return {row[0]: row[1:] for row in rows[1:]}


def _ids(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return [row[0] for row in list(csv.reader(handle))[1:]]


def test_shards_split_by_id_and_merge_into_what_one_run_writes(run_and_photos, tmp_path):
    patients = patients_in_folder(run_and_photos / "photos")
    predict_photos(run_and_photos / "run", patients, tmp_path / "whole", batch_size=4, progress=False)
    for i in (1, 2, 3):  # each "machine" lists the folder in its own order: the split must not care
        listed = list(reversed(patients)) if i == 2 else patients
        predict_photos(run_and_photos / "run", listed, tmp_path / f"s{i}", batch_size=4, progress=False, shard=(i, 3))
    parts = [set(_ids(tmp_path / f"s{i}" / "predictions.csv")) for i in (1, 2, 3)]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == {p.patient_id for p in patients}
    assert parts[0] == {p.patient_id for p in patients if in_shard(p.patient_id, 1, 3)}
    record = merge_predictions([tmp_path / f"s{i}" for i in (3, 1, 2)], tmp_path / "merged")
    assert record["patients"] == record["predicted"] == 40
    whole, merged = _table(tmp_path / "whole" / "predictions.csv"), _table(tmp_path / "merged" / "predictions.csv")
    assert merged.keys() == whole.keys()
    for pid in whole:
        np.testing.assert_allclose(np.array(merged[pid], float), np.array(whole[pid], float), atol=1e-6, err_msg=pid)
    assert len(_ids(tmp_path / "merged" / "decisions.csv")) == 40 * len(LABELS)


def test_the_merge_refuses_a_missing_a_doubled_or_a_foreign_shard(run_and_photos, tmp_path):
    patients = patients_in_folder(run_and_photos / "photos")[:12]
    for i in (1, 2):
        predict_photos(run_and_photos / "run", patients, tmp_path / f"s{i}", batch_size=4, progress=False, shard=(i, 2))
    predict_photos(run_and_photos / "run", patients, tmp_path / "other", batch_size=3, progress=False, shard=(2, 2))
    with pytest.raises(FundusError, match="shard\\(s\\) 2/2 missing"):
        merge_predictions([tmp_path / "s1"], tmp_path / "m")
    with pytest.raises(FundusError, match="are both shard 1/2"):
        merge_predictions([tmp_path / "s1", tmp_path / "s1", tmp_path / "s2"], tmp_path / "m")
    with pytest.raises(FundusError, match="another job .* batch_size"):
        merge_predictions([tmp_path / "s1", tmp_path / "other"], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    script = [sys.executable, str(ROOT / "scripts" / "merge_predictions.py")]
    missing = subprocess.run(
        [*script, str(tmp_path / "s2"), "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and missing.stderr.strip() == "error: shard(s) 1/2 missing: give all 2"
    merged = subprocess.run(
        [*script, str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert merged.returncode == 0, merged.stderr
    assert "merged 2 shards: 12 of 12 patients predicted, 0 rejected" in merged.stdout


def test_a_killed_predict_resumes_without_predicting_a_patient_twice_or_losing_one(run_and_photos, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "predict.py"),
        str(run_and_photos / "run"),
        str(run_and_photos / "photos"),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--explain",
        "D",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    batches = out / ".unfinished" / "batches"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and len(list(batches.glob("*.json"))) < 5:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed: make its batches slower"
    os.killpg(process.pid, signal.SIGKILL)  # as the out-of-memory killer or a lost machine would
    process.wait()
    finished = len(list(batches.glob("*.json")))
    assert 5 <= finished < 40 and not (out / "predictions.csv").exists()
    refused = subprocess.run(
        [*command[:-4], "--batch-size", "2", "--explain", "D", "--resume"], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2 and "another job (it differs in batch_size)" in refused.stderr
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {finished} of 40 patients were predicted before" in resumed.stdout
    assert f"; {2 * (40 - finished)} photos in" in resumed.stdout, "the resumed run predicted finished batches again"
    ids = _ids(out / "predictions.csv")
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 40, "a patient predicted twice or lost"
    with open(out / "heatmaps" / "heatmaps.csv", newline="") as handle:
        assert sorted(r["patient_id"] for r in csv.DictReader(handle) if r["class"] == "D") == sorted(
            ids * 2
        )  # both eyes
    whole = tmp_path / "whole"
    predict_photos(
        run_and_photos / "run", patients_in_folder(run_and_photos / "photos"), whole, batch_size=1, progress=False
    )
    expected, got = _table(whole / "predictions.csv"), _table(out / "predictions.csv")
    for pid in expected:
        np.testing.assert_allclose(np.array(got[pid], float), np.array(expected[pid], float), atol=1e-6, err_msg=pid)
    assert not (out / ".unfinished").exists()
