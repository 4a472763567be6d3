"""The benchmark end to end on synthetic photos, with a tiny budget (the real one is a script)."""

import csv
import json

import numpy as np
import pytest

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.synthetic import write_synthetic_dataset
from fundus_ensemble.errors import FundusError
from fundus_ensemble.evaluation.benchmark import Budget, format_results_markdown, run_benchmark
from fundus_ensemble.labels import LABELS

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend

TINY = Budget("tiny", size=32, epochs=1, fine_tune_epochs=1, backbone="mobilenet", batch_size=4, bn_recalibration_patients=8)


def write_image_table(manifest_path, out_path):
    """The per-image layout of odir5k-256-dev/labels.csv, from a synthetic patient manifest."""
    manifest = load_manifest(manifest_path)
    with open(out_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "ID", "eye", "patient_age", "patient_sex", "eye_keywords", *LABELS])
        for p in manifest.patients:
            for eye, image in (("left", p.left_image), ("right", p.right_image)):
                writer.writerow([image.split("/")[-1], p.patient_id, eye, 60, "Female", p.extra.get(f"{eye}_keywords", ""), *p.labels])


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    write_image_table(write_synthetic_dataset(root, 48, seed=11, diameter=80), root / "labels.csv")
    out = tmp_path_factory.mktemp("bench") / "run"
    return root, out, run_benchmark(root / "labels.csv", root, out, TINY, seed=1, bootstrap=20)


@pytest.mark.slow
def test_every_row_is_scored_on_the_held_out_patients(benchmark_run):
    root, out, results = benchmark_run
    names = [r["name"] for r in results["rows"]]
    assert names[:7] == ["all-zero", "class prior", "class prior + calibration", "plain baseline", "color", "gray_eq", "ensemble"]
    assert "ensemble + TTA + calibration" in names
    manifest = load_manifest(out / "manifest.csv", image_root=root)
    assert results["held_out_patients"] == sum(p.split == "test" for p in manifest.patients)
    zero = results["rows"][0]
    assert zero["kappa"] == 0 and zero["auc"] == 0.5
    for row in results["rows"][3:]:
        assert 0 <= row["auc"] <= 1 and row["train_s"] > 0 and row["train_images_per_s"] > 0
        assert set(row["per_class_auc"]) == set(LABELS)
    ensemble = next(r for r in results["rows"] if r["name"] == "ensemble")
    assert ensemble["train_s"] == pytest.approx(results["timings_s"]["train color"] + results["timings_s"]["train gray_eq"])


@pytest.mark.slow
def test_results_are_written_and_rows_can_be_rederived(benchmark_run):
    root, out, results = benchmark_run
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    markdown = (out / "results.md").read_text()
    assert markdown == format_results_markdown(results)
    assert "| ensemble + TTA + calibration |" in markdown
    with np.load(out / "predictions.npz") as data:
        assert data["ensemble/test/plain".replace("ensemble", "color")].shape == (results["held_out_patients"], 8)


@pytest.mark.slow
def test_a_used_folder_is_refused_and_resume_trains_nothing_again(benchmark_run):
    root, out, results = benchmark_run
    with pytest.raises(FundusError, match="--resume"):
        run_benchmark(root / "labels.csv", root, out, TINY, seed=1, bootstrap=20)
    again = run_benchmark(root / "labels.csv", root, out, TINY, seed=1, resume=True, bootstrap=20)
    assert again["rows"] == results["rows"]
    assert again["timings_s"] == results["timings_s"]


def test_a_bad_table_stops_before_any_output(tmp_path):
    with pytest.raises(FundusError, match="label table not found"):
        run_benchmark(tmp_path / "labels.csv", tmp_path, tmp_path / "out", TINY)
    assert not (tmp_path / "out").exists()
