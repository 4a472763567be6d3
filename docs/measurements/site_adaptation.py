"""Decisions that travel without a labelled sample: site alignment against the camera-shift protocol.

On a prepared feature screen folder (its store holds every photo's frozen features), for the test
patients of each split seed, every photo is shifted as another camera would take it (the
protocol's 13 shifts, data.acquisition.SHIFTS), cropped and made into views by the preprocessing
every run uses, and its features computed into the same store (--prepare-only stops there).

Then per split: pair heads and one-eye heads cross-fitted on the development patients (the
recipe: fusion max_mean_diff), the pair thresholds fitted on their out-of-fold predictions, and
each view's feature reference (training.adaptation.fit_reference). Per shift and per site case
mix (as the test split; mostly normal; enriched in cataract and myopia), DRAWS unlabelled site
samples of PATIENTS test patients (two photos each, 50 photos or more) are drawn from the
shifted photos; the site's alignment is fitted on the sample alone and the pair heads decide
every other test patient of the shifted split. Compared, on the same patients:

- none: the run as it is;
- standardised: every site photo standardised to all training eyes' mean and spread;
- aligned: training.adaptation.fit_alignment (anchored on the normal-looking photos);
- labelled site calibration on 20 and 50 labelled patients of the shifted site
  (evaluation.partial.fit_site_calibration), the labelled alternative.

Per cell: the change of pooled AUC and the largest change of a class's sensitivity at the
thresholds in use, against the same patients' unshifted photos at the run's thresholds; the target is sensitivity within 5 points for every
class with 10 or more positives and pooled AUC within 0.02. And the share of the shifted photos
the feature-distance warning flags (its level set for 1 % on held-back training photos).

    PYTHONPATH=. python docs/measurements/site_adaptation.py runs/ff --image-root $DATA \
        --out runs/adapt --seeds 0 1 > runs/adapt.md
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

MIXES = ("as the test split", "mostly normal", "enriched in cataract and myopia")


def shifted_features(args, data, patients, index: int, shift) -> dict[str, np.ndarray]:
    """view -> (patients, 2, F) of ``patients`` under shift ``index`` (photos written once, features stored)."""
    from fundus_ensemble.data.acquisition import shifted_copies
    from fundus_ensemble.data.manifest import load_manifest, write_manifest
    from fundus_ensemble.data.preprocess import preprocess_manifest
    from fundus_ensemble.labels import VIEWS
    from fundus_ensemble.models import build_backbone
    from fundus_ensemble.training.features import FeatureSpec, FeatureStore, preprocessing_settings

    folder = args.out / f"shift-{index:02d}"
    rows = shifted_copies(patients, args.image_root, folder, lambda photo, name: shift(photo))
    if not (folder / "prep" / "color" / "manifest.csv").is_file():
        write_manifest(rows, folder / "manifest.csv")
        preprocess_manifest(
            load_manifest(folder / "manifest.csv", image_root=folder), folder / "prep", args.size, progress=False
        )
    store = FeatureStore(args.screen / "store")
    cache = {}

    def encoder():
        if "m" not in cache:
            cache["m"] = build_backbone(args.backbone, args.size, "imagenet")
        return cache["m"]

    out = {}
    for view in VIEWS:
        views = load_manifest(folder / "prep" / view / "manifest.csv")
        f = store.patient_features(
            FeatureSpec(args.backbone, "imagenet", args.size, False),
            view,
            views,
            encoder,
            preprocessing=preprocessing_settings(folder / "prep" / view),
            progress=False,
        )
        by_id = {q.patient_id: f[i] for i, q in enumerate(views.patients)}
        # a patient preprocessing refused after the shift keeps NaN features: left out of that shift's scores
        out[view] = np.stack([by_id.get(q.patient_id, np.full(f.shape[1:], np.nan)) for q in patients])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path)
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--backbone", default="efficientnet_lite2")
    p.add_argument("--size", type=int, default=380)
    p.add_argument("--fusion", default="max_mean_diff")
    p.add_argument("--patients", type=int, default=40, help="unlabelled site patients per sample")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--shifts", type=int, nargs="+", help="only these shift indices (0 is always scored)")
    p.add_argument("--prepare-only", action="store_true")
    args = p.parse_args()
    from fundus_ensemble.cli import import_keras

    import_keras()
    from fundus_ensemble.data.acquisition import SHIFTS
    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.evaluation.feature_screen import _Data

    data = _Data(args.screen)
    test_any = np.zeros(len(data.manifest), bool)
    for seed in args.seeds:
        test_any |= data.split(seed) == "test"
    originals = {
        q.patient_id: q for q in load_manifest(args.screen / "manifest.csv", image_root=args.image_root).patients
    }
    patients = [originals[q.patient_id] for q, t in zip(data.manifest.patients, test_any) if t]
    row_of = {q.patient_id: i for i, q in enumerate(patients)}
    chosen = [i for i in range(len(SHIFTS)) if args.shifts is None or i == 0 or i in args.shifts]
    shifted = {}
    for index, (name, shift) in enumerate(SHIFTS.items()):
        if index == 0 or index not in chosen:
            continue
        began = time.perf_counter()
        shifted[name] = shifted_features(args, data, patients, index, shift)
        print(f"[adapt] {name}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    if args.prepare_only:
        return
    results = {seed: analyse(args, data, seed, shifted, row_of) for seed in args.seeds}
    for r in results.values():
        r["met"] = met_counts(r)
    (args.out / "adaptation.json").write_text(json.dumps(results, indent=1))
    print_tables(results, args)


def analyse(args, data, seed: int, shifted: dict, row_of: dict) -> dict:
    from fundus_ensemble.data.acquisition import SHIFTS
    from fundus_ensemble.evaluation.calibration import fit_calibration, raw_thresholds
    from fundus_ensemble.evaluation.partial import fit_site_calibration
    from fundus_ensemble.labels import LABELS, VIEWS
    from fundus_ensemble.training.adaptation import SiteAlignment, fit_alignment, fit_reference
    from fundus_ensemble.training.heads import cross_fit, cross_fit_eyes, eye_mask, single_eyed

    split = data.split(seed)
    dev, test = split != "test", split == "test"
    y_dev, y_test = data.y[dev], data.y[test]
    eye_y = data.eye_labels()
    test_ids = [q.patient_id for q, t in zip(data.manifest.patients, test) if t]
    rows = np.array([row_of[i] for i in test_ids])
    pair_fits, eye_fits, references, everyone = {}, {}, {}, {}
    for view in VIEWS:
        f = data.features(args.backbone, args.size, view)
        pair_fits[view] = cross_fit(f[dev], y_dev, 5, fusion=args.fusion, seed=seed)
        eye_fits[view] = cross_fit_eyes(f[dev], eye_y[dev], pair_fits[view].folds, seed=seed)
        mask = eye_mask(eye_y[dev], single_eyed(f[dev]))
        eyes = f[dev][mask]
        folds = np.repeat(pair_fits[view].folds[:, None], 2, axis=1)[mask]
        references[view] = fit_reference(eyes, eye_fits[view].out_of_fold[mask][:, 0], folds)
        everyone[view] = eyes.std(axis=0)
    calibration = fit_calibration(y_dev, np.mean([pair_fits[v].out_of_fold for v in VIEWS], axis=0))
    thresholds = np.array(raw_thresholds(calibration))
    clean = {v: data.features(args.backbone, args.size, v)[test] for v in VIEWS}

    def predict(features: dict) -> np.ndarray:
        return np.mean([pair_fits[v].predict(features[v]) for v in VIEWS], axis=0)

    def scores(p: np.ndarray, y: np.ndarray, t=thresholds) -> dict:
        decided = p > t
        present = [j for j in range(len(LABELS)) if y[:, j].sum() >= 10]
        return {
            "auc": float(roc_auc_score(y.ravel(), p.ravel())),
            "sensitivity": {LABELS[j]: float(decided[y[:, j] == 1, j].mean()) for j in present},
        }

    base = scores(predict(clean), y_test)
    rng = np.random.default_rng(seed)
    healthy = (y_test[:, 0] == 1) & (y_test[:, 1:].sum(1) == 0)
    enriched = (y_test[:, LABELS.index("C")] == 1) | (y_test[:, LABELS.index("M")] == 1)
    out = {"unshifted": base, "shifts": {}}
    ref_distance = {
        v: float(
            np.mean(references[v].distance(clean[v].reshape(-1, clean[v].shape[-1])) > references[v].warn_distance)
        )
        for v in VIEWS
    }
    out["warning_unshifted"] = ref_distance
    for name, by_view in shifted.items():
        features = {v: by_view[v][rows] for v in VIEWS}
        kept = ~np.isnan(features["color"]).any(axis=(1, 2))
        n = len(test_ids)
        record = {"rejected": int((~kept).sum()), "methods": {}}
        record["warning"] = {
            v: float(
                np.mean(
                    references[v].distance(features[v][kept].reshape(-1, features[v].shape[-1]))
                    > references[v].warn_distance
                )
            )
            for v in VIEWS
        }
        raw = np.full((n, len(LABELS)), np.nan)
        raw[kept] = predict({v: features[v][kept] for v in VIEWS})
        for mix in MIXES:
            draws = {"unshifted": [], "none": [], "standardised": [], "aligned": []}
            for _ in range(args.draws):
                if mix == "as the test split":
                    pool = np.flatnonzero(kept)
                    sample = rng.choice(pool, args.patients, replace=False)
                else:
                    special = healthy if mix == "mostly normal" else enriched
                    share = 0.8 if mix == "mostly normal" else 0.5
                    a = rng.choice(np.flatnonzero(kept & special), int(share * args.patients), replace=False)
                    b = rng.choice(np.flatnonzero(kept & ~special), args.patients - len(a), replace=False)
                    sample = np.concatenate([a, b])
                rest = np.setdiff1d(np.flatnonzero(kept), sample)
                moved = {
                    "unshifted": {v: clean[v][rest] for v in VIEWS},
                    "none": {v: features[v][rest] for v in VIEWS},
                    "standardised": {},
                    "aligned": {},
                }
                for v in VIEWS:
                    site = features[v][sample].reshape(-1, features[v].shape[-1])
                    ref = references[v]
                    alignment = fit_alignment(site, ref, eye_fits[v].bagged)
                    plain = SiteAlignment(
                        site.mean(axis=0),
                        site.std(axis=0) + 1e-6,
                        dataclasses.replace(ref, normal_mean=ref.mean, normal_spread=everyone[v] + 1e-6),
                    )
                    shape = features[v][rest].shape
                    flat = features[v][rest].reshape(-1, shape[-1])
                    moved["aligned"][v] = alignment.apply(flat).reshape(shape)
                    moved["standardised"][v] = plain.apply(flat).reshape(shape)
                for method, feats in moved.items():
                    draws[method].append(scores(predict(feats), y_test[rest]))
            record["methods"][mix] = {m: _mean_scores(d) for m, d in draws.items()}
        labelled = {}
        for count in (20, 50):
            got, unshifted = [], []
            for _ in range(args.draws):
                order = rng.permutation(np.flatnonzero(kept))
                sample, rest = order[:count], order[count:]
                site, _ = fit_site_calibration(y_test[sample].astype(float), raw[sample], calibration)
                got.append(scores(raw[rest], y_test[rest], np.array(raw_thresholds(site))))
                unshifted.append(scores(predict({v: clean[v][rest] for v in VIEWS}), y_test[rest]))
            labelled[count] = _mean_scores(got)
            labelled[f"{count} unshifted"] = _mean_scores(unshifted)
        record["labelled"] = labelled
        out["shifts"][name] = record
        print(f"[adapt] split {seed}: {name} scored", file=sys.stderr, flush=True)
    out["shift_order"] = [n for n in SHIFTS if n in shifted]
    return out


def _mean_scores(draws: list[dict]) -> dict:
    return {
        "auc": float(np.mean([d["auc"] for d in draws])),
        # a class with 10 or more positives among every draw's scored patients
        "sensitivity": {
            c: float(np.mean([d["sensitivity"][c] for d in draws]))
            for c in draws[0]["sensitivity"]
            if all(c in d["sensitivity"] for d in draws)
        },
    }


def meets(r: dict, base: dict) -> tuple[bool, float]:
    """(both targets met, the largest sensitivity change in points)."""
    worst = max(
        (abs(r["sensitivity"][c] - base["sensitivity"][c]) for c in base["sensitivity"] if c in r["sensitivity"]),
        default=0.0,
    )
    return (r["auc"] - base["auc"] >= -0.02 and worst <= 0.05), 100 * worst


def met_counts(r: dict) -> dict:
    """Per method, the shifts under which both targets are met (each against the same patients unshifted)."""
    count = {"shifts": len(r["shift_order"]), "none": 0, **{m: 0 for m in MIXES}, "standardised": 0}
    count.update({"labelled 20": 0, "labelled 50": 0})
    for name in r["shift_order"]:
        s = r["shifts"][name]
        first = s["methods"][MIXES[0]]
        count["none"] += meets(first["none"], first["unshifted"])[0]
        count["standardised"] += meets(first["standardised"], first["unshifted"])[0]
        for m in MIXES:
            count[m] += meets(s["methods"][m]["aligned"], s["methods"][m]["unshifted"])[0]
        for k in (20, 50):
            count[f"labelled {k}"] += meets(s["labelled"][k], s["labelled"][f"{k} unshifted"])[0]
    return count


def print_tables(results: dict, args) -> None:
    seeds = list(results)
    print(
        f"Feature screen `{args.screen}`, {args.backbone} {args.size} px (pretrained, frozen), pair heads on "
        f"{args.fusion}; per split seed {' / '.join(map(str, seeds))}, unlabelled site samples of {args.patients} "
        f"patients ({args.draws} draws per cell), scored on the other test patients of the shifted split.\n"
    )
    for seed in seeds:
        r = results[seed]
        base = r["unshifted"]
        print(f"\n### Split {seed}\n")
        print(
            "Unshifted: pooled AUC "
            f"{base['auc']:.3f}; sensitivity "
            + ", ".join(f"{c} {100 * v:.0f}%" for c, v in base["sensitivity"].items())
        )
        print(
            "\n| shift | warned (colour / gray) | none | "
            + " | ".join(f"aligned, {m}" for m in MIXES)
            + " | standardised, as the test split | labelled 20 | labelled 50 |"
        )
        print("|---|---|---|" + "---|" * len(MIXES) + "---|---|---|")
        count = {"none": 0, **{m: 0 for m in MIXES}, "standardised": 0, "labelled 20": 0, "labelled 50": 0}
        for name in r["shift_order"]:
            s = r["shifts"][name]

            def cell(x, against, key):
                ok, worst = meets(x, against)
                count[key] += ok
                return f"{x['auc'] - against['auc']:+.3f}, {worst:.0f} pts{' (met)' if ok else ''}"

            first = s["methods"][MIXES[0]]
            cells = [cell(first["none"], first["unshifted"], "none")]
            cells += [cell(s["methods"][m]["aligned"], s["methods"][m]["unshifted"], m) for m in MIXES]
            cells += [cell(first["standardised"], first["unshifted"], "standardised")]
            cells += [cell(s["labelled"][k], s["labelled"][f"{k} unshifted"], f"labelled {k}") for k in (20, 50)]
            warned = " / ".join(f"{100 * v:.0f}%" for v in s["warning"].values())
            print(f"| {name} | {warned} | " + " | ".join(cells) + " |")
        print(
            "\nShifts meeting both targets (pooled AUC within 0.02, every class's sensitivity within 5 points): "
            + ", ".join(f"{k} {v} of {len(r['shift_order'])}" for k, v in count.items())
        )
        print(
            "Warned on the unshifted test photos: "
            + " / ".join(f"{100 * v:.1f}%" for v in r["warning_unshifted"].values())
        )
        worse = []
        for name in r["shift_order"]:
            for m in MIXES:
                x = r["shifts"][name]["methods"][m]
                _, a = meets(x["aligned"], x["unshifted"])
                _, b = meets(x["none"], x["unshifted"])
                if a > b + 1e-9 or x["aligned"]["auc"] < x["none"]["auc"] - 0.005:
                    worse.append(
                        f"{name} / {m} ({b:.0f} -> {a:.0f} pts, AUC {x['none']['auc']:.3f} -> {x['aligned']['auc']:.3f})"
                    )
        print(
            "Aligned worse than none (larger sensitivity change, or AUC lower by 0.005+): "
            + ("; ".join(worse) or "never")
        )


if __name__ == "__main__":
    main()
