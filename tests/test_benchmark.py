"""The benchmark end to end on synthetic photos, with a tiny budget (the real one is a script)."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.synthetic import write_synthetic_dataset
from fundus_ensemble.errors import FundusError
from fundus_ensemble.evaluation.benchmark import Budget, format_results_markdown, run_benchmark, view_weight_on_val
from fundus_ensemble.labels import LABELS

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend

TINY = Budget(
    "tiny", size=32, epochs=1, fine_tune_epochs=1, backbone="mobilenet", batch_size=4, bn_recalibration_patients=8
)


def write_image_table(manifest_path, out_path):
    """The per-image layout of odir5k-256-dev/labels.csv, from a synthetic patient manifest."""
    manifest = load_manifest(manifest_path)
    with open(out_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "ID", "eye", "patient_age", "patient_sex", "eye_keywords", *LABELS])
        for p in manifest.patients:
            for eye, image in (("left", p.left_image), ("right", p.right_image)):
                writer.writerow(
                    [
                        image.split("/")[-1],
                        p.patient_id,
                        eye,
                        60,
                        "Female",
                        p.extra.get(f"{eye}_keywords", ""),
                        *p.labels,
                    ]
                )


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
    assert names[:7] == [
        "all-zero",
        "class prior",
        "class prior + calibration",
        "plain baseline",
        "color",
        "gray_eq",
        "ensemble",
    ]
    assert "ensemble + TTA + calibration" in names and names[-1] == "ensemble, view weight chosen on val"
    manifest = load_manifest(out / "manifest.csv", image_root=root)
    assert results["held_out_patients"] == sum(p.split == "test" for p in manifest.patients)
    zero = results["rows"][0]
    assert zero["kappa"] == 0 and zero["auc"] == 0.5
    for row in (r for r in results["rows"][3:] if r["name"] != "ensemble's image-blind twin"):  # models, not constants
        assert 0 <= row["auc"] <= 1 and row["train_s"] > 0 and row["train_images_per_s"] > 0
        assert set(row["per_class_auc"]) == set(LABELS)
    ensemble = next(r for r in results["rows"] if r["name"] == "ensemble")
    assert ensemble["train_s"] == pytest.approx(
        results["timings_s"]["train color"] + results["timings_s"]["train gray_eq"]
    )


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
    # the stages are not run again; only the scoring is, and the total counts it
    assert {k: v for k, v in again["timings_s"].items() if k != "score"} == {
        k: v for k, v in results["timings_s"].items() if k != "score"
    }
    assert again["timings_s"]["score"] > 0
    assert again["total_wall_s"] == pytest.approx(sum(again["timings_s"].values()))


@pytest.mark.slow
def test_a_subset_of_models_keeps_only_their_rows(benchmark_run):
    root, out, results = benchmark_run
    subset = run_benchmark(root / "labels.csv", root, out, TINY, seed=1, resume=True, bootstrap=20, models=("gray_eq",))
    assert subset["models"] == ["gray_eq"]
    names = [r["name"] for r in subset["rows"]]
    assert names == ["all-zero", "class prior", "class prior + calibration", "gray_eq", "gray_eq + TTA + calibration"]
    full = {r["name"]: r for r in results["rows"]}
    assert all(r == full[r["name"]] for r in subset["rows"])
    assert subset["checks"] == {}  # no ensemble, nothing to check
    assert "Models run: gray_eq." in (out / "results.md").read_text()


@pytest.mark.slow
def test_the_checks_compare_the_ensemble_with_every_other_model(benchmark_run):
    checks = benchmark_run[2]["checks"]["ensemble"]
    final = {r["name"]: r["final"] for r in benchmark_run[2]["rows"]}
    for other in ("class prior + calibration", "plain baseline", "color", "gray_eq"):
        assert checks[f"margin over '{other}'"] == pytest.approx(final["ensemble"] - final[other])
        low, high = checks[f"95% interval of the margin over '{other}'"]
        assert low <= high
    for other in ("plain baseline", "color", "gray_eq"):
        assert checks[f"beats '{other}' (interval above 0)"] == (
            checks[f"95% interval of the margin over '{other}'"][0] > 0
        )
    assert {"AUC C >= 0.75", "AUC M >= 0.75"} <= set(checks)


def test_unknown_models_are_refused_before_any_output(tmp_path):
    with pytest.raises(FundusError, match="models must be some of baseline, color, gray_eq; got colour"):
        run_benchmark(tmp_path / "labels.csv", tmp_path, tmp_path / "out", TINY, models=("colour",))
    with pytest.raises(FundusError, match="got none"):
        run_benchmark(tmp_path / "labels.csv", tmp_path, tmp_path / "out", TINY, models=())
    assert not (tmp_path / "out").exists()


def test_a_budget_carries_its_levers_into_the_training_config():
    budget = Budget("b", size=32, epochs=2, fine_tune_epochs=0, changes={"schedule": "cosine", "output_bias": "prior"})
    config = budget.train_config(None, seed=3)
    assert (config.schedule, config.output_bias, config.size, config.seed) == ("cosine", "prior", 32, 3)


def test_the_asymmetric_budget_is_cpu128_but_for_the_loss():
    from fundus_ensemble.evaluation.benchmark import BUDGETS

    default = BUDGETS["cpu128-5+2"].train_config(None, seed=0)
    asl = BUDGETS["cpu128-5+2-asl"].train_config(None, seed=0)
    assert asl.loss == "asymmetric" and default.loss == "weighted_bce"
    assert dataclasses.replace(asl, loss=default.loss) == default


def test_the_readme_names_the_default_budget():
    import re

    from fundus_ensemble.evaluation.benchmark import DEFAULT_BUDGET

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w+-]+)` \(default\)", readme)) | set(re.findall(r"# default budget ([\w+-]+)", readme))
    assert named == {DEFAULT_BUDGET}, (
        f"README calls {sorted(named)} the default budget; the library's is {DEFAULT_BUDGET}"
    )


def test_the_recommended_recipe_is_one_recipe_in_the_readme_the_demo_and_the_release():
    """The default budget, the README's steps 2 and 3, the demo and the bundled model's release train
    the same thing: a change to one that forgets another fails here."""
    import inspect
    import re

    from fundus_ensemble.demo import demo_train_config
    from fundus_ensemble.evaluation.benchmark import BUDGETS, DEFAULT_BUDGET
    from fundus_ensemble.inference.bundle import release

    budget = BUDGETS[DEFAULT_BUDGET]
    config = budget.train_config("imagenet", 0)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    step2 = re.search(r"# 2\..*?\n```|# 2\..*?# 3\.", readme, re.S).group(0)
    step3 = re.search(r"# 3\..*?# 4\.", readme, re.S).group(0)
    assert f"--size {config.size}" in step2, step2
    for flag, value in (
        ("--backbone", config.backbone),
        ("--weights", config.weights),
        ("--head-fit", config.head_fit.replace("_", "-")),
        ("--folds", config.folds),
        ("--head-fusion", config.head_fusion),
        ("--fine-tune-epochs", config.fine_tune_epochs),
    ):
        assert f"{flag} {value}" in step3, (flag, value, step3)
    assert demo_train_config() == config
    defaults = {k: v.default for k, v in inspect.signature(release).parameters.items()}
    assert (defaults["backbone"], defaults["size"], defaults["folds"], defaults["head_fusion"]) == (
        config.backbone,
        config.size,
        config.folds,
        config.head_fusion,
    )


def test_every_cpu_budget_is_named_for_its_size_and_epochs():
    import re

    from fundus_ensemble.evaluation.benchmark import BUDGETS

    for name, budget in BUDGETS.items():
        assert budget.name == name
        if "xfit" in name:  # (cpu|gpu)-BACKBONE-SIZE-xfitFOLDS: cross-fitted heads, no epochs
            match = re.fullmatch(r"[cg]pu-([a-z]+\d*)-(\d+)-xfit(\d+)", name)
            assert match and int(match.group(2)) == budget.size and budget.changes["head_fit"] == "cross_fit", name
            assert (
                int(match.group(3)) == budget.changes["folds"] and budget.backbone == f"efficientnet_{match.group(1)}"
            )
            continue
        # (cpu|gpu)[-BACKBONE]-SIZE-EPOCHS+FINE_TUNE_EPOCHS[-LEVER]; no backbone named: B3
        match = re.fullmatch(r"[cg]pu(?:-([a-z]+\d*)-)?(\d+)-(\d+)\+(\d+)(-\w+)?", name)
        if name.startswith("cpu") or "+" in name:
            assert match, name
            assert tuple(map(int, match.groups()[1:4])) == (budget.size, budget.epochs, budget.fine_tune_epochs), name
            assert budget.backbone == (f"efficientnet_{match.group(1)}" if match.group(1) else "efficientnet_b3"), name


def test_a_bad_table_stops_before_any_output(tmp_path):
    with pytest.raises(FundusError, match="label table not found"):
        run_benchmark(tmp_path / "labels.csv", tmp_path, tmp_path / "out", TINY)
    assert not (tmp_path / "out").exists()


def test_the_view_weight_follows_the_view_that_scores_on_val():
    rng = np.random.default_rng(0)
    y = (rng.random((150, 8)) < 0.3).astype(int)
    informed, noise = np.clip(0.5 * y + 0.5 * rng.random(y.shape), 0, 1), rng.random(y.shape)
    assert view_weight_on_val(y, informed, noise) == 1.0
    assert view_weight_on_val(y, noise, informed) == 0.0
    assert view_weight_on_val(y, informed, informed) == 0.5  # every weight ties: the paper's 1:1


@pytest.mark.slow
def test_the_image_blind_twin_is_the_ensembles_val_mean_for_every_test_patient(benchmark_run):
    from fundus_ensemble.metrics import odir_score

    root, out, results = benchmark_run
    rows = {r["name"]: r for r in results["rows"]}
    with np.load(out / "predictions.npz") as data:
        val_mean = ((data["color/val/plain"] + data["gray_eq/val/plain"]) / 2).mean(axis=0)
    y_test = load_manifest(out / "prep" / "color" / "manifest.csv").select("test").label_matrix()
    expected = odir_score(y_test, np.tile(val_mean, (len(y_test), 1)))
    twin = rows["ensemble's image-blind twin"]
    assert twin["final"] == pytest.approx(expected["final"]) and twin["kappa"] == pytest.approx(expected["kappa"])
    checks = results["checks"]["ensemble"]
    assert checks["margin over 'ensemble's image-blind twin'"] == pytest.approx(
        rows["ensemble"]["final"] - twin["final"]
    )
    assert "beats 'ensemble's image-blind twin' (interval above 0)" in checks


@pytest.mark.slow
def test_two_runs_are_compared_row_by_row_on_the_same_test_patients(benchmark_run, tmp_path):
    import shutil

    from fundus_ensemble.evaluation.benchmark import compare_runs

    root, out, results = benchmark_run
    same = compare_runs(out, out, resamples=20)
    assert [r["row"] for r in same] == [r["name"] for r in results["rows"]]
    assert all(r["margin"] == 0 and r["interval"] == [0.0, 0.0] for r in same)
    # a second run whose colour model knows the test labels: its ensemble must gain, the prior not move
    better = tmp_path / "better"
    shutil.copytree(out, better)
    y_test = load_manifest(out / "prep" / "color" / "manifest.csv").select("test").label_matrix()
    with np.load(out / "predictions.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["color/test/plain"] = y_test.astype(float)
    np.savez(better / "predictions.npz", **arrays)
    rows = {r["row"]: r for r in compare_runs(out, better, rows=("class prior", "ensemble", "color"), resamples=50)}
    assert rows["class prior"]["margin"] == 0
    ensemble = next(r for r in results["rows"] if r["name"] == "ensemble")
    assert rows["ensemble"]["final"][0] == pytest.approx(ensemble["final"])
    assert (
        rows["ensemble"]["margin"] == pytest.approx(rows["ensemble"]["final"][1] - ensemble["final"])
        and rows["ensemble"]["margin"] > 0
    )
    assert rows["color"]["interval"][0] > 0
    with pytest.raises(FundusError, match="rows not in both runs: colour"):
        compare_runs(out, better, rows=("colour",))
    # another split: not the same test patients, so no paired interval
    other = tmp_path / "other"
    shutil.copytree(out, other)
    manifest = other / "prep" / "color" / "manifest.csv"
    lines = manifest.read_text().splitlines(keepends=True)
    first_test = next(i for i, line in enumerate(lines) if ",test," in line)
    manifest.write_text(
        "".join(lines[:first_test] + [lines[first_test].replace(",test,", ",train,")] + lines[first_test + 1 :])
    )
    with pytest.raises(FundusError, match="do not hold the same test patients"):
        compare_runs(out, other)
    with pytest.raises(FundusError, match="no finished benchmark"):
        compare_runs(out, tmp_path)


# --- pretrained: the linear probe rows and the ensemble's margins over them ------------------------------

LITE_TINY = Budget(
    "lite-tiny",
    size=48,
    epochs=2,
    fine_tune_epochs=1,
    backbone="efficientnet_lite0",
    batch_size=4,
    bn_recalibration_patients=8,
    weights="imagenet",
    baseline_epochs=1,
    changes={"fine_tune_fraction": 0.2},
    target_calibrated=0.9,
    class_auc=0.65,
)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_lite_data")
    write_image_table(write_synthetic_dataset(root, 40, seed=5, diameter=80), root / "labels.csv")
    out = tmp_path_factory.mktemp("bench_lite") / "run"
    return root, out, run_benchmark(root / "labels.csv", root, out, LITE_TINY, seed=0, bootstrap=20)


def test_fuse_is_max_then_mean_of_the_eyes():
    from fundus_ensemble.evaluation.probe import fuse

    eyes = np.array([[[1.0, -2.0], [3.0, 0.0]]])  # one patient: left (1, -2), right (3, 0)
    np.testing.assert_array_equal(fuse(eyes), [[3.0, 0.0, 2.0, -1.0]])


@pytest.mark.slow
def test_a_pretrained_run_has_probe_rows_fitted_on_train_and_chosen_on_val(pretrained_run):
    from fundus_ensemble.evaluation.probe import fit_linear_probe

    root, out, results = pretrained_run
    assert results["weights"] == "imagenet"
    names = [r["name"] for r in results["rows"]]
    for name in (
        "linear probe (color)",
        "linear probe (gray_eq)",
        "linear probe (mean of views)",
        "linear probe (mean of views) + calibration",
    ):
        assert name in names
    assert "margin over 'linear probe (color)'" in results["checks"]["ensemble"]
    # the budget's own targets: raw and calibrated finals, the class AUC floor
    assert (
        "final >= 0.72" in results["checks"]["ensemble"]
        and "final >= 0.9" in results["checks"]["ensemble + TTA + calibration"]
    )
    assert any(k.startswith("AUC >= 0.65 for") for k in results["checks"]["ensemble"])
    # the probe's val and test predictions are those of a probe fitted on train, C chosen on val
    manifest = load_manifest(out / "prep" / "color" / "manifest.csv")
    from fundus_ensemble.training.features import eye_features, preprocessing_settings

    feats = {
        s: eye_features(
            None,
            manifest.select(s),
            48,
            8,
            out / "prep" / "features",
            "efficientnet_lite0",
            "imagenet",
            "color",
            preprocessing=preprocessing_settings(out / "prep" / "color"),
        )
        for s in ("train", "val", "test")
    }
    y = {s: manifest.select(s).label_matrix() for s in ("train", "val", "test")}
    probe = fit_linear_probe(feats["train"], y["train"], feats["val"], y["val"])
    with np.load(out / "probe.npz") as saved:
        np.testing.assert_allclose(saved["color/val"], probe.predict(feats["val"]), atol=1e-9)
        np.testing.assert_allclose(saved["color/test"], probe.predict(feats["test"]), atol=1e-9)
    baseline = json.loads((out / "models" / "baseline" / "summary.json").read_text())
    assert baseline["epochs_run"] == 1 and baseline["learning_rate"] == pytest.approx(1e-4)


@pytest.mark.slow
def test_no_row_is_fitted_on_the_labels_it_is_scored_on(pretrained_run, tmp_path):
    """The image-blind rows, the calibrations and the probe: scrambling every test label changes
    no row's test predictions (only their scores)."""
    import dataclasses
    import shutil

    from fundus_ensemble.data.manifest import write_manifest
    from fundus_ensemble.evaluation import benchmark

    root, out, results = pretrained_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for view in ("color", "gray_eq"):
        path = copy / "prep" / view / "manifest.csv"
        manifest = load_manifest(path)
        write_manifest(
            [
                dataclasses.replace(p, labels=tuple(1 - v for v in p.labels)) if p.split == "test" else p
                for p in manifest.patients
            ],
            path,
        )
    timings = json.loads((out / "timings.json").read_text())
    models = tuple(results["models"])
    labels, _, probs = benchmark._score_folder(out, models, timings, LITE_TINY.batch_size)
    scrambled, _, again = benchmark._score_folder(copy, models, timings, LITE_TINY.batch_size)
    assert np.array_equal(scrambled["test"], 1 - labels["test"]) and np.array_equal(scrambled["train"], labels["train"])
    assert set(again) == set(probs) and "class prior" in probs and "linear probe (mean of views) + calibration" in probs
    for name in probs:
        np.testing.assert_array_equal(again[name], probs[name], err_msg=name)
    # the probe itself, fitted again from the scrambled folder: the same predictions
    config = LITE_TINY.train_config("imagenet", 0)
    benchmark._linear_probes(copy / "prep", copy / "models", config, copy / "probe_again.npz", ("color", "gray_eq"))
    with np.load(out / "probe.npz") as first, np.load(copy / "probe_again.npz") as second:
        for key in (k for k in first.files if k != "meta"):
            np.testing.assert_array_equal(second[key], first[key], err_msg=key)


def test_a_cross_fitted_run_is_calibrated_on_its_out_of_fold_predictions_not_on_val():
    """Cross-fitted heads learned on val: what other runs fit on val comes from the out-of-fold predictions."""
    from fundus_ensemble.evaluation.benchmark import _Predictions, _rows
    from fundus_ensemble.evaluation.calibration import fit_calibration

    rng = np.random.default_rng(0)
    labels = {s: (rng.random((n, 8)) < 0.3).astype(int) for s, n in (("train", 60), ("val", 30), ("test", 40))}
    p = _Predictions()
    for view in ("color", "gray_eq"):
        for split in ("val", "test"):
            for tta in (False, True):
                key = p.key(view, split, tta)
                p.probs[key] = np.clip(0.4 * labels[split] + 0.6 * rng.random(labels[split].shape), 0.01, 0.99)
                p.seconds[key], p.images[key] = 1.0, 2
    oof_y = np.concatenate([labels["train"], labels["val"]])
    oof = {
        "labels": oof_y,
        **{v: np.clip(0.3 * oof_y + 0.7 * rng.random(oof_y.shape), 0.01, 0.99) for v in ("color", "gray_eq")},
    }
    training = {v: {"seconds": 1.0, "images": 2} for v in ("color", "gray_eq")}
    rows, probs = _rows(labels, p, training, ("color", "gray_eq"), "efficientnet_lite2", oof)
    test = (p.probs[p.key("color", "test", False)] + p.probs[p.key("gray_eq", "test", False)]) / 2
    expected = fit_calibration(oof_y, (oof["color"] + oof["gray_eq"]) / 2).apply(test)
    np.testing.assert_allclose(probs["ensemble + calibration"], expected)
    twin = probs["ensemble's image-blind twin"][0]
    np.testing.assert_allclose(twin, ((oof["color"] + oof["gray_eq"]) / 2).mean(axis=0))
    assert "out-of-fold" in next(r["what"] for r in rows if r["name"] == "ensemble + calibration")
    # without out-of-fold predictions, the same rows are fitted on val
    _, plain = _rows(labels, p, training, ("color", "gray_eq"), "efficientnet_lite2")
    val = (p.probs[p.key("color", "val", False)] + p.probs[p.key("gray_eq", "val", False)]) / 2
    np.testing.assert_allclose(plain["ensemble + calibration"], fit_calibration(labels["val"], val).apply(test))
