"""The feature screen: every features-first choice measured on real photos in one run, in minutes.

From a label table it preprocesses the photos at each size asked for, puts every photo's
frozen features of each backbone into one :class:`..training.features.FeatureStore` (timed:
that is most of a recipe's cost), then, for each split seed (the benchmark's seeded,
stratified 70/15/15 split, so its test patients are the benchmark's), fits heads on the
features alone and scores them on the test patients, which nothing is fitted or chosen on:

- **the table** (backbone x size): per view, logistic heads cross-fitted over the development
  (train + val) patients (:func:`..training.heads.cross_fit`); the two views' mean is the
  ensemble, raw and with the calibration fitted on its out-of-fold predictions. The default
  recipe is chosen from this table by the rule in :func:`choose_default`, on development
  patients only;
- **the levers**, at the reference backbone and size, each against the cross-fitted ensemble
  with a 95 % paired bootstrap interval on test: the linear probe fitted on train with its
  calibration on val (what cross-fitting replaces), each view alone, other fusions of the two
  eyes, per-eye heads fused afterwards, the per-eye keywords as an auxiliary eye-level head,
  several sizes or backbones averaged, and mirrored features.

Everything is kept under the output folder; a second run reuses the views and the features.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FundusError
from ..fileio import atomic_write_json, atomic_write_text, claim_folder
from ..labels import LABELS, VIEWS
from ..metrics import bootstrap_margin, odir_score, per_class_scores
from ..training.heads import DEFAULT_POWER

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}  # the benchmark's
BOOTSTRAP = 500
SCREEN_GRID = (0.0003, 0.001, 0.003)  # every winner of the wider grid (training.heads.C_GRID) lay in here
TIME_BUDGET_S = 3600.0  # the issue's: the whole recommended pair within 60 minutes on 2 CPU cores


@dataclass(frozen=True)
class ScreenConfig:
    backbones: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    sizes: tuple[int, ...] = (224, 260, 300, 380)
    seeds: tuple[int, ...] = (0, 1)
    folds: int = 5
    reference: tuple[str, int] = ("efficientnet_lite2", 260)
    flips: bool = False  # also the mirrored photos' features (a lever)
    bootstrap: int = BOOTSTRAP
    levers: bool = True  # False: the backbone x size table only


def prepare(
    table: str | os.PathLike,
    image_root: str | os.PathLike,
    out: str | os.PathLike,
    config: ScreenConfig,
    image_dir: str = "images",
) -> dict:
    """Preprocess at every size and extract every backbone's features of both views into
    ``out/store``; returns the seconds each (backbone, size) took through the backbone, both views,
    as the store counted them (kept in ``out/extraction.json``)."""
    from ..data.importers import import_label_table
    from ..data.manifest import Manifest, load_manifest, write_manifest
    from ..data.preprocess import preprocess_manifest
    from ..training.features import FeatureSpec, FeatureStore, extract_features

    out = claim_folder(out, "a feature screen", adopt_if=("extraction.json", "screen.json", "manifest.csv"))
    manifest_path = out / "manifest.csv"
    if not manifest_path.is_file():
        patients, _ = import_label_table(table, "image-table", image_root, image_dir)
        write_manifest(Manifest(tuple(patients), Path(image_root)).patients, manifest_path)
    manifest = load_manifest(manifest_path, image_root=image_root)
    store = FeatureStore(out / "store")
    seconds = {}
    for size in config.sizes:
        prep = out / f"prep-{size}"
        print(preprocess_manifest(manifest, prep, size, progress=False).describe(), flush=True)
        for backbone in config.backbones:
            flips = (False, True) if config.flips else (False,)
            extract_features(prep, store.root, backbone, "imagenet", size, VIEWS, flips)
            # the store's own count of the seconds its photos took: a later call finding them there costs nothing
            took = [store.seconds(FeatureSpec(backbone, "imagenet", size, False), view) for view in VIEWS]
            seconds[f"{backbone}/{size}"] = sum(took) if all(took) else None
            print(
                f"[screen] features {backbone} {size} px, both views: "
                f"{'n/a (made before the store counted time)' if seconds[f'{backbone}/{size}'] is None else f'{sum(took):.0f} s'}",
                flush=True,
            )
    atomic_write_json(out / "extraction.json", seconds)
    return seconds


class _Data:
    """Labels, splits and (lazily) every feature array of a prepared screen folder."""

    def __init__(self, out: Path):
        from ..data.manifest import load_manifest

        self.out = out
        sizes = sorted(
            int(p.name.split("-")[1]) for p in out.glob("prep-*") if (p / "color" / "manifest.csv").is_file()
        )
        if not sizes:
            raise FundusError(f"{out} holds no prepared views; run the screen's prepare step first")
        self.manifests = {s: {v: load_manifest(out / f"prep-{s}" / v / "manifest.csv") for v in VIEWS} for s in sizes}
        first = self.manifests[sizes[0]]["color"]
        for s in sizes:
            for v in VIEWS:
                if self.manifests[s][v].patient_ids != first.patient_ids:
                    raise FundusError(f"{out}/prep-{s}/{v} holds other patients than prep-{sizes[0]}/color")
        self.manifest = first
        self.y = first.label_matrix().astype(int)
        self._features: dict = {}

    def features(self, backbone: str, size: int, view: str, flip: bool = False) -> np.ndarray:
        from ..training.features import FeatureSpec, FeatureStore, preprocessing_settings

        key = (backbone, size, view, flip)
        if key not in self._features:

            def missing():
                raise FundusError(
                    f"features of {backbone} at {size} px ({view}{', mirrored' if flip else ''}) are not "
                    f"in {self.out / 'store'}; run the prepare step with them"
                )

            self._features[key] = FeatureStore(self.out / "store").patient_features(
                FeatureSpec(backbone, "imagenet", size, flip),
                view,
                self.manifests[size][view],
                missing,
                preprocessing=preprocessing_settings(self.out / f"prep-{size}" / view),
                progress=False,
            )
        return self._features[key]

    def eye_labels(self) -> np.ndarray:
        from ..data.batches import manifest_eye_labels

        return manifest_eye_labels(self.manifest).astype(int)

    def split(self, seed: int) -> np.ndarray:
        from ..data.splits import assign_splits

        return np.array([p.split for p in assign_splits(self.manifest, FRACTIONS, seed).patients])


@dataclass
class _Fit:
    """Out-of-fold development predictions and test predictions of one model."""

    dev: np.ndarray
    test: np.ndarray
    dev_calibrated: np.ndarray | None = None
    test_calibrated: np.ndarray | None = None

    def calibrated(self) -> _Fit:
        from .calibration import fit_calibration

        if self.test_calibrated is None:
            calibration = fit_calibration(self._y_dev, self.dev)
            self.dev_calibrated, self.test_calibrated = calibration.apply(self.dev), calibration.apply(self.test)
        return self

    _y_dev: np.ndarray = dataclasses.field(default=None, repr=False)


def referral_rates(fit: _Fit, y_dev: np.ndarray, y_test: np.ndarray) -> dict:
    """The referral score (1 - p(N)) of ``fit`` at the threshold its out-of-fold development
    predictions give for the referral sensitivity (``fit_referral``): that fit, and the sensitivity
    and specificity it gives on test (referable: any label but Normal)."""
    from .calibration import fit_referral, referral_scores

    fitted = fit_referral(y_dev, fit.dev)
    referable = y_test[:, 0] == 0
    score = referral_scores(fit.test)
    return {
        "oof": fitted,
        "test_sensitivity": float((score[referable] > fitted["threshold"]).mean()),
        "test_specificity": float((score[~referable] <= fitted["threshold"]).mean()),
    }


def _mean(fits: list[_Fit], y_dev: np.ndarray) -> _Fit:
    out = _Fit(np.mean([f.dev for f in fits], axis=0), np.mean([f.test for f in fits], axis=0))
    out._y_dev = y_dev
    return out


class _Screen:
    def __init__(self, data: _Data, config: ScreenConfig, seed: int):
        from ..training.heads import patient_folds

        self.data, self.config, self.seed = data, config, seed
        split = data.split(seed)
        self.dev, self.test = split != "test", split == "test"
        self.split = split
        self.y_dev, self.y_test = data.y[self.dev], data.y[self.test]
        self.folds = patient_folds(int(self.dev.sum()), config.folds, seed, self.y_dev)
        self._cache: dict = {}

    def _fit(self, f: _Fit) -> _Fit:
        f._y_dev = self.y_dev
        return f

    def cross_fit(
        self,
        backbone: str,
        size: int,
        view: str,
        fusion: str = "max_mean",
        flip: bool = False,
        power: float = DEFAULT_POWER,
    ) -> _Fit:
        """A view's cross-fitted logistic heads: out-of-fold on development, their bag on test."""
        from ..training.heads import cross_fit

        key = ("xfit", backbone, size, view, fusion, flip, power)
        if key not in self._cache:
            features = self.data.features(backbone, size, view, flip)
            fit = cross_fit(features[self.dev], self.y_dev, self.config.folds, SCREEN_GRID, fusion, self.seed, power)
            self._cache[key] = self._fit(_Fit(fit.out_of_fold, fit.predict(features[self.test])))
        return self._cache[key]

    def ensemble(self, backbone: str, size: int, **kwargs) -> _Fit:
        return _mean([self.cross_fit(backbone, size, view, **kwargs) for view in VIEWS], self.y_dev)

    def probe(self, backbone: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The benchmark's linear probe per view (train only, C chosen on val), mean of the views:
        its val and test predictions."""
        from .probe import fit_linear_probe

        train, val = self.split == "train", self.split == "val"
        vals, tests = [], []
        for view in VIEWS:
            f = self.data.features(backbone, size, view)
            probe = fit_linear_probe(f[train], self.data.y[train], f[val], self.data.y[val], seed=self.seed)
            vals.append(probe.predict(f[val]))
            tests.append(probe.predict(f[self.test]))
        return np.mean(vals, axis=0), np.mean(tests, axis=0)

    def per_eye(self, backbone: str, size: int, view: str, labels: str, combine: str) -> _Fit:
        """Heads on single eyes, cross-fitted over the same patient folds, fused per patient afterwards.

        ``labels`` "patient": each eye learns its patient's labels (today's per-eye models); "keywords":
        each eye its own labels from ODIR's per-eye keywords. ``combine`` "mean" or "max" of the
        eyes (for N under keywords: the minimum, a patient is normal when both eyes are)."""
        from ..training.heads import fit_linear_head

        key = ("eye", backbone, size, view, labels, combine)
        if key in self._cache:
            return self._cache[key]
        features = self.data.features(backbone, size, view)
        eye_y = self.data.eye_labels() if labels == "keywords" else np.repeat(self.data.y[:, None], 2, axis=1)
        dev_f, dev_y = features[self.dev], eye_y[self.dev]
        best = None
        for c in SCREEN_GRID:
            oof = np.zeros((len(dev_f), 2, len(LABELS)))
            heads = []
            for fold in range(self.config.folds):
                held = self.folds == fold
                head = fit_linear_head(
                    dev_f[~held].reshape(-1, dev_f.shape[-1]), dev_y[~held].reshape(-1, len(LABELS)), c, self.seed
                )
                oof[held] = head.predict(dev_f[held].reshape(-1, dev_f.shape[-1])).reshape(-1, 2, len(LABELS))
                heads.append(head)
            score = odir_score(self.y_dev, _combine(oof, combine, labels))["auc"]
            if best is None or score > best[0]:
                best = (score, oof, heads)
        _, oof, heads = best
        from ..training.heads import LinearHead

        test = (
            LinearHead.mean(heads)
            .predict(features[self.test].reshape(-1, features.shape[-1]))
            .reshape(-1, 2, len(LABELS))
        )
        self._cache[key] = self._fit(_Fit(_combine(oof, combine, labels), _combine(test, combine, labels)))
        return self._cache[key]


def _combine(eyes: np.ndarray, combine: str, labels: str) -> np.ndarray:
    if combine == "mean":
        return eyes.mean(axis=1)
    out = eyes.max(axis=1)
    if labels == "keywords":
        out[:, 0] = eyes[:, :, 0].min(axis=1)  # normal: both eyes normal
    return out


def _scores(y: np.ndarray, p: np.ndarray) -> dict:
    score = odir_score(y, p)
    return {
        **{k: float(v) for k, v in score.items()},
        "per_class_auc": {c: v["auc"] for c, v in per_class_scores(y, p).items()},
    }


def _row(
    name: str, what: str, screen: _Screen, fit: _Fit, reference: _Fit | None = None, calibrated_reference: bool = True
) -> dict:
    """One screened model: raw and calibrated (on its own out-of-fold predictions) scores on test,
    its development out-of-fold score (what choices are made on), and its margin over ``reference``."""
    fit.calibrated()
    row = {
        "name": name,
        "what": what,
        "test": _scores(screen.y_test, fit.test),
        "test_calibrated": _scores(screen.y_test, fit.test_calibrated),
        "dev_out_of_fold": _scores(screen.y_dev, fit.dev),
        "dev_out_of_fold_calibrated": _scores(screen.y_dev, fit.dev_calibrated),
    }
    if reference is not None:
        reference.calibrated()
        ours, theirs = fit.test_calibrated, reference.test_calibrated if calibrated_reference else reference.test
        row["margin_calibrated"] = float(
            odir_score(screen.y_test, ours)["final"] - odir_score(screen.y_test, theirs)["final"]
        )
        row["interval_calibrated"] = bootstrap_margin(screen.y_test, ours, theirs, screen.seed, screen.config.bootstrap)
        row["margin_raw"] = float(
            odir_score(screen.y_test, fit.test)["final"] - odir_score(screen.y_test, reference.test)["final"]
        )
        row["interval_raw"] = bootstrap_margin(
            screen.y_test, fit.test, reference.test, screen.seed, screen.config.bootstrap
        )
    return row


def _plain_row(name: str, what: str, screen: _Screen, test: np.ndarray, reference: np.ndarray | None) -> dict:
    row = {"name": name, "what": what, "test": _scores(screen.y_test, test)}
    if reference is not None:
        row["margin"] = float(odir_score(screen.y_test, test)["final"] - odir_score(screen.y_test, reference)["final"])
        row["interval"] = bootstrap_margin(screen.y_test, test, reference, screen.seed, screen.config.bootstrap)
    return row


def screen_seed(data: _Data, config: ScreenConfig, seed: int, levers: bool = True) -> dict:
    """The table and the levers for one split seed."""
    from .calibration import fit_calibration

    screen = _Screen(data, config, seed)
    table = []
    for backbone in config.backbones:
        for size in config.sizes:
            start = time.perf_counter()
            fit = screen.ensemble(backbone, size)
            row = _row(f"{backbone} {size} px", "cross-fitted heads per view, views averaged", screen, fit)
            row.update(backbone=backbone, size=size, heads_s=time.perf_counter() - start)
            table.append(row)
            print(
                f"[screen] seed {seed} {backbone} {size} px: development out of fold, calibrated: final "
                f"{row['dev_out_of_fold_calibrated']['final']:.3f}; test final {row['test']['final']:.3f} calibrated "
                f"{row['test_calibrated']['final']:.3f} AUC {row['test']['auc']:.3f}; heads {row['heads_s']:.0f} s",
                flush=True,
            )
    out = {
        "seed": seed,
        "patients": {"development": int(screen.dev.sum()), "test": int(screen.test.sum())},
        "table": table,
    }
    if not levers:
        return out
    backbone, size = config.reference
    reference = screen.ensemble(backbone, size)
    rows = [
        _row(
            "reference: cross-fitted ensemble",
            f"{backbone} {size} px, both views, concat(max, mean)",
            screen,
            reference,
        )
    ]
    # what cross-fitting replaces: heads on train, calibration on val (section 3 of the issue)
    val = screen.split == "val"
    probe_val, probe_test = screen.probe(backbone, size)
    val_calibrated = fit_calibration(data.y[val], probe_val).apply(probe_test)
    calibrations = [
        _plain_row(
            "probe: heads on train",
            "linear probe per view, C on val, views averaged (the benchmark's)",
            screen,
            probe_test,
            None,
        ),
        _plain_row(
            "probe + calibration on val",
            "the same, Platt + thresholds fitted on the 15 % val split",
            screen,
            val_calibrated,
            probe_test,
        ),
        _plain_row(
            "cross-fitted bag, raw", "5-fold heads over train + val, bagged", screen, reference.test, probe_test
        ),
        _plain_row(
            "cross-fitted bag + out-of-fold calibration",
            "calibration fitted on every development patient's out-of-fold prediction",
            screen,
            reference.calibrated().test_calibrated,
            reference.test,
        ),
        _plain_row(
            "cross-fitted bag + out-of-fold calibration, against the probe + val calibration",
            "the whole change",
            screen,
            reference.test_calibrated,
            val_calibrated,
        ),
    ]
    levers_rows = []

    def lever(name: str, what: str, fit: _Fit) -> None:
        levers_rows.append(_row(name, what, screen, fit, reference))
        r = levers_rows[-1]
        print(
            f"[screen] seed {seed} lever {name}: calibrated {r['test_calibrated']['final']:.3f} "
            f"({r['margin_calibrated']:+.3f}), AUC {r['test']['auc']:.3f}",
            flush=True,
        )

    for view in VIEWS:
        lever(
            f"{view} alone",
            "one view's cross-fitted heads (the ensemble should beat it)",
            screen.cross_fit(backbone, size, view),
        )
    lever(
        "unweighted heads",
        "positives not weighted (plain logistic loss) instead of (negatives / positives) ** 0.5",
        screen.ensemble(backbone, size, power=0.0),
    )
    for fusion in ("max_mean_diff", "mean"):
        lever(
            f"fusion {fusion}",
            "the eyes fused otherwise before the heads",
            screen.ensemble(backbone, size, fusion=fusion),
        )
    for combine in ("mean", "max"):
        lever(
            f"per-eye heads, {combine} of the eyes",
            "each eye learns its patient's labels; fused after the heads",
            _mean([screen.per_eye(backbone, size, v, "patient", combine) for v in VIEWS], screen.y_dev),
        )
    keywords = _mean([screen.per_eye(backbone, size, v, "keywords", "max") for v in VIEWS], screen.y_dev)
    lever("eye-level keyword heads", "each eye learns its own keywords' labels; max of the eyes (N: min)", keywords)
    lever("patient heads + eye-level keyword heads", "the mean of the two", _mean([reference, keywords], screen.y_dev))
    if len(config.sizes) > 1:
        lever(
            f"sizes {'+'.join(map(str, config.sizes))} averaged",
            f"{backbone} at every size, each cross-fitted, averaged",
            _mean([screen.ensemble(backbone, s) for s in config.sizes], screen.y_dev),
        )
    if len(config.backbones) > 1:
        lever(
            f"backbones {'+'.join(b.split('_')[-1] for b in config.backbones)} averaged",
            f"every backbone at {size} px",
            _mean([screen.ensemble(b, size) for b in config.backbones], screen.y_dev),
        )
        lever(
            "every backbone and size averaged",
            "the whole table's ensembles, averaged",
            _mean([screen.ensemble(b, s) for b in config.backbones for s in config.sizes], screen.y_dev),
        )
    if config.flips:
        lever(
            "mirrored features too (flip TTA)",
            "heads on plain features; their test predictions averaged with the mirrored photos'",
            _flip_tta(screen, backbone, size),
        )
    out.update(reference=list(config.reference), levers=[rows[0], *levers_rows], calibration=calibrations)
    return out


def _flip_tta(screen: _Screen, backbone: str, size: int) -> _Fit:
    from ..training.heads import cross_fit

    fits = []
    for view in VIEWS:
        plain, flipped = screen.data.features(backbone, size, view), screen.data.features(backbone, size, view, True)
        fit = cross_fit(plain[screen.dev], screen.y_dev, screen.config.folds, SCREEN_GRID, "max_mean", screen.seed)
        test = 0.5 * (fit.predict(plain[screen.test]) + fit.predict(flipped[screen.test]))
        fits.append(screen._fit(_Fit(fit.out_of_fold, test)))
    return _mean(fits, screen.y_dev)


def choose_default(results: dict, extraction_s: dict, budget_s: float = TIME_BUDGET_S) -> dict:
    """The rule: of the table's (backbone, size) whose whole pair (features of every photo of both
    views, then the heads) took at most ``budget_s``, the best mean development out-of-fold final
    after its calibration, over the split seeds; test patients take no part."""
    candidates = {}
    for result in results["seeds"]:
        for row in result["table"]:
            key = (row["backbone"], row["size"])
            candidates.setdefault(key, []).append(row)
    best = None
    for (backbone, size), rows in candidates.items():
        extraction = extraction_s.get(f"{backbone}/{size}")
        if extraction is None:
            continue  # an untimed extraction cannot be held against the budget
        seconds = extraction + float(np.mean([r["heads_s"] for r in rows]))
        score = float(np.mean([r["dev_out_of_fold_calibrated"]["final"] for r in rows]))
        if seconds <= budget_s and (best is None or score > best["dev_final"]):
            best = {"backbone": backbone, "size": size, "dev_final": score, "seconds": seconds}
    if best is None:
        raise FundusError(f"no backbone and size of the screen fits {budget_s / 60:.0f} minutes")
    return best


def run_screen(out: str | os.PathLike, config: ScreenConfig) -> dict:
    """Screen a prepared folder on every seed of ``config``; writes screen.json and screen.md."""
    out = Path(out)
    data = _Data(out)
    extraction = json.loads((out / "extraction.json").read_text()) if (out / "extraction.json").is_file() else {}
    results = {
        "config": dataclasses.asdict(config),
        "extraction_s": extraction,
        "seeds": [screen_seed(data, config, seed, config.levers) for seed in config.seeds],
    }
    results["default"] = choose_default(results, extraction)
    atomic_write_json(out / "screen.json", results)
    atomic_write_text(out / "screen.md", format_screen(results))
    return results


def _interval(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "-"
    span = f" [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""
    return f"{value:+.3f}{span}"


def format_screen(results: dict) -> str:
    """The screen as Markdown: the table (both seeds side by side), the levers and the calibration rows."""
    seeds = results["seeds"]
    tag = " / ".join(str(s["seed"]) for s in seeds)
    lines = [
        f"# Feature screen (split seeds {tag})",
        "",
        "Test patients: "
        + ", ".join(f"{s['patients']['test']} (seed {s['seed']})" for s in seeds)
        + "; nothing was fitted or chosen on them.",
        "",
        f"## Backbone x size: cross-fitted heads, views averaged (test, seed {tag})",
        "",
        "| backbone | size | features, both views (s) | raw final | calibrated final | pooled AUC | dev out-of-fold calibrated final |",
        "|---|---|---|---|---|---|---|",
    ]
    extraction = results.get("extraction_s", {})
    for i, row in enumerate(seeds[0]["table"]):
        rows = [s["table"][i] for s in seeds]
        seconds = extraction.get(f"{row['backbone']}/{row['size']}")
        lines.append(
            f"| {row['backbone']} | {row['size']} | {'n/a' if seconds is None else f'{seconds:.0f}'} | "
            + " | ".join(
                " / ".join(f"{r[part][key]:.3f}" for r in rows)
                for part, key in (
                    ("test", "final"),
                    ("test_calibrated", "final"),
                    ("test", "auc"),
                    ("dev_out_of_fold_calibrated", "final"),
                )
            )
            + " |"
        )
    default = results.get("default")
    if default:
        lines += [
            "",
            f"Default by the rule (best development out-of-fold calibrated final within "
            f"{TIME_BUDGET_S / 60:.0f} minutes): **{default['backbone']} at {default['size']} px** "
            f"({default['dev_final']:.3f}, {default['seconds'] / 60:.1f} min).",
        ]
    if "levers" in seeds[0]:
        lines += [
            "",
            f"## Levers at {seeds[0]['reference'][0]} {seeds[0]['reference'][1]} px, against the cross-fitted "
            f"ensemble (test, seed {tag}; 95 % paired bootstrap intervals)",
            "",
            "| lever | calibrated final | vs reference, calibrated | raw final | vs reference, raw | pooled AUC | "
            + " | ".join(f"AUC {c}" for c in LABELS)
            + " |",
            "|---|---|---|---|---|---|" + "---|" * len(LABELS),
        ]
        for i, row in enumerate(seeds[0]["levers"]):
            rows = [s["levers"][i] for s in seeds]
            lines.append(
                f"| {row['name']} | "
                + " / ".join(f"{r['test_calibrated']['final']:.3f}" for r in rows)
                + " | "
                + " / ".join(_interval(r.get("margin_calibrated"), r.get("interval_calibrated")) for r in rows)
                + " | "
                + " / ".join(f"{r['test']['final']:.3f}" for r in rows)
                + " | "
                + " / ".join(_interval(r.get("margin_raw"), r.get("interval_raw")) for r in rows)
                + " | "
                + " / ".join(f"{r['test']['auc']:.3f}" for r in rows)
                + " | "
                + " | ".join(
                    " / ".join(
                        "n/a" if r["test"]["per_class_auc"][c] is None else f"{r['test']['per_class_auc'][c]:.2f}"
                        for r in rows
                    )
                    for c in LABELS
                )
                + " |"
            )
        lines += ["", "What each lever is:", ""] + [f"- **{r['name']}**: {r['what']}." for r in seeds[0]["levers"]]
        lines += [
            "",
            f"## Where thresholds and calibration are fitted (test, seed {tag})",
            "",
            "| row | final | gain (95 % paired interval; against which: below) | pooled AUC |",
            "|---|---|---|---|",
        ]
        for i, row in enumerate(seeds[0]["calibration"]):
            rows = [s["calibration"][i] for s in seeds]
            lines.append(
                f"| {row['name']} | "
                + " / ".join(f"{r['test']['final']:.3f}" for r in rows)
                + " | "
                + " / ".join(_interval(r.get("margin"), r.get("interval")) for r in rows)
                + " | "
                + " / ".join(f"{r['test']['auc']:.3f}" for r in rows)
                + " |"
            )
        lines += [
            "",
            "Each gain is against: the probe (calibration on val), the probe (the bag), the bag (out-of-fold "
            "calibration), and the probe calibrated on val (the whole change).",
        ]
    return "\n".join(lines) + "\n"
