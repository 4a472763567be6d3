"""One eye given alone: which head answers it, measured on the benchmark's held-out patients.

On a prepared feature screen folder (scripts/feature_screen.py --prepare-only: every photo's
frozen features in its store), for each split seed (the benchmark's seeded 70/15/15 split), per
view, heads are cross-fitted over the development patients' folds, the two views averaged and
calibrated on their out-of-fold predictions (as train_pair does), and three answers to a
single eye compared on the test patients, each eye given alone:

- "pair head fed twice": today's: the pair head on the eye in both slots, the pair calibration;
- "pair + one-eye rows": one head fitted on the pair rows and each development eye alone
  (labelled from its own keywords, data.keywords), calibrated on its one-eye out-of-fold rows
  for single eyes and on its pair rows for pairs;
- "eye head": the pair head unchanged for pairs; a second head fitted on single eyes only, with
  their own keyword labels, cross-fitted over the same patient folds, calibrated on its
  out-of-fold eyes (training.heads.cross_fit_eyes).

Per answer: per-class AUC, sensitivity and specificity against each eye's own keyword labels;
the share of healthy patients (labelled Normal only) cleared ("No referable finding": Normal
alone decided) from the left eye, the right eye, and both; and the share of eyes with a finding
that are not cleared. The pair answer's final and pooled AUC show what each costs the pairs.

    PYTHONPATH=. python docs/measurements/one_eye.py runs/ff --size 380 --seeds 0 1 > runs/one_eye.md
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path, help="a feature screen folder with the features in its store")
    p.add_argument("--backbone", default="efficientnet_lite2")
    p.add_argument("--size", type=int, default=380)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fusion", default="max_mean_diff")
    p.add_argument("--grid", type=float, nargs="+", default=None, help="C grid (default: training.heads.C_GRID)")
    p.add_argument(
        "--out", type=Path, help="write the numbers as JSON here too (and each split's test predictions beside)"
    )
    p.add_argument("--answers", nargs="+", default=list(ANSWERS), choices=ANSWERS, help="the answers to compare")
    args = p.parse_args()
    from fundus_ensemble.evaluation.calibration import fit_calibration, fit_referral, raw_thresholds, referral_scores
    from fundus_ensemble.evaluation.feature_screen import ScreenConfig, _Data, _Screen
    from fundus_ensemble.labels import LABELS, VIEWS
    from fundus_ensemble.metrics import odir_score
    from fundus_ensemble.training.heads import C_GRID, cross_fit, cross_fit_eyes, fit_linear_head, fuse

    grid = tuple(args.grid or C_GRID)
    data = _Data(args.screen)
    eye_y_all = data.eye_labels()  # (patients, 2, 8), -1 where an eye has no keywords
    both_all = np.array([bool(q.left_image and q.right_image) for q in data.manifest.patients])
    results = {}
    for seed in args.seeds:
        began = time.perf_counter()
        screen = _Screen(data, ScreenConfig(seeds=(seed,), folds=5), seed)
        dev, test = screen.dev, screen.test
        y_dev, y_test = screen.y_dev, screen.y_test
        eye_dev, eye_test = eye_y_all[dev], eye_y_all[test]
        both_test = both_all[test]
        answers = {name: {"pair_dev": [], "pair_test": [], "eye_dev": [], "eye_test": []} for name in args.answers}
        chosen = {}
        for view in VIEWS:
            f = data.features(args.backbone, args.size, view)
            f_dev, f_test = f[dev], f[test]
            pair = cross_fit(f_dev, y_dev, 5, grid, args.fusion, seed)
            chosen[f"{view} pair"] = pair.c
            # each eye alone through the pair head: the eye in both slots
            eyes_through_pair = lambda head, f_: np.stack(  # noqa: E731
                [head.predict(fuse(np.stack([f_[:, k], f_[:, k]], 1), args.fusion)) for k in (0, 1)], 1
            )
            out_of_fold_twice = np.zeros((len(f_dev), 2, len(LABELS)))
            for fold in range(5):
                held = pair.folds == fold
                out_of_fold_twice[held] = eyes_through_pair(pair.heads[fold], f_dev[held])
            if "pair head fed twice" in answers:
                a = answers["pair head fed twice"]
                a["pair_dev"].append(pair.out_of_fold)
                a["pair_test"].append(pair.predict(f_test))
                a["eye_dev"].append(out_of_fold_twice)
                a["eye_test"].append(eyes_through_pair(pair.bagged, f_test))

            eyes = cross_fit_eyes(f_dev, eye_dev, folds=pair.folds, grid=grid, seed=seed)
            chosen[f"{view} eye"] = eyes.c
            a = answers["eye head"]
            a["pair_dev"].append(pair.out_of_fold)
            a["pair_test"].append(pair.predict(f_test))
            a["eye_dev"].append(eyes.out_of_fold)
            a["eye_test"].append(eyes.predict(f_test))

            if "pair + one-eye rows" not in answers:
                continue
            # one head on the pair rows and every known eye alone (as a pair of itself)
            known = eye_rows(eye_dev, both_all[dev])
            best = None
            for c in grid:
                oof_pair = np.zeros((len(f_dev), len(LABELS)))
                oof_eye = np.zeros((len(f_dev), 2, len(LABELS)))
                heads = []
                for fold in range(5):
                    held = pair.folds == fold
                    rows = [fuse(f_dev[~held], args.fusion)]
                    labels = [y_dev[~held]]
                    for k in (0, 1):
                        keep = ~held & known[:, k]
                        rows.append(fuse(np.stack([f_dev[keep, k], f_dev[keep, k]], 1), args.fusion))
                        labels.append(eye_dev[keep, k])
                    head = fit_linear_head(np.concatenate(rows), np.concatenate(labels), c, seed)
                    oof_pair[held] = head.predict(fuse(f_dev[held], args.fusion))
                    oof_eye[held] = eyes_through_pair(head, f_dev[held])
                    heads.append(head)
                score = odir_score(y_dev, oof_pair)["auc"]
                if best is None or score > best[0] + 1e-9:
                    best = (score, c, oof_pair, oof_eye, heads)
            _, c, oof_pair, oof_eye, heads = best
            chosen[f"{view} pair + one-eye rows"] = c
            from fundus_ensemble.training.heads import LinearHead

            bag = LinearHead.mean(heads)
            a = answers["pair + one-eye rows"]
            a["pair_dev"].append(oof_pair)
            a["pair_test"].append(bag.predict(fuse(f_test, args.fusion)))
            a["eye_dev"].append(oof_eye)
            a["eye_test"].append(eyes_through_pair(bag, f_test))

        seed_results = {"chosen_C": chosen}
        for name, a in answers.items():
            pair_dev, pair_test = np.mean(a["pair_dev"], 0), np.mean(a["pair_test"], 0)
            eye_dev_p, eye_test_p = np.mean(a["eye_dev"], 0), np.mean(a["eye_test"], 0)
            pair_cal = fit_calibration(y_dev, pair_dev)
            # single eyes: calibrated on the development eyes' own out-of-fold rows, except today's
            # answer, which has only the pair calibration
            rows_dev = eye_rows(eye_dev, both_all[dev])
            if name == "pair head fed twice":
                eye_cal = pair_cal
            else:
                eye_cal = fit_calibration(eye_dev[rows_dev], eye_dev_p[rows_dev])
            pair_decided = pair_cal.apply(pair_test) > 0.5
            eye_decided = eye_cal.apply(eye_test_p.reshape(-1, len(LABELS))).reshape(eye_test_p.shape) > 0.5
            # the "any referable finding" score's thresholds, set out of fold for 90 % sensitivity
            pair_ref = fit_referral(y_dev, pair_dev)["threshold"]
            eye_ref = (
                pair_ref
                if name == "pair head fed twice"
                else fit_referral(eye_dev[rows_dev], eye_dev_p[rows_dev])["threshold"]
            )
            seed_results[name] = summarise(
                y_test, pair_test, pair_cal.apply(pair_test), pair_decided, eye_test, eye_test_p, eye_decided, both_test
            )
            seed_results[name]["with the referral score"] = summarise(
                y_test,
                pair_test,
                pair_cal.apply(pair_test),
                pair_decided & (referral_scores(pair_test) <= pair_ref)[:, None],
                eye_test,
                eye_test_p,
                eye_decided & (referral_scores(eye_test_p) <= eye_ref)[..., None],
                both_test,
            )
            seed_results[name]["referral_score"] = referral_rows(
                y_test, pair_test, pair_ref, eye_test, eye_test_p, eye_ref, both_test
            )
            if args.out:
                np.savez(
                    args.out.with_name(f"{args.out.stem}-s{seed}-{name.replace(' ', '_')}.npz"),
                    y_test=y_test,
                    pair_test=pair_test,
                    eye_y=eye_test,
                    eye_test=eye_test_p,
                    both=both_test,
                    pair_thresholds=raw_thresholds(pair_cal),
                    eye_thresholds=raw_thresholds(eye_cal),
                    referral=np.array([pair_ref, eye_ref]),
                )
        seed_results["seconds"] = round(time.perf_counter() - began, 1)
        seed_results["patients"] = {"development": int(dev.sum()), "test": int(test.sum())}
        results[seed] = seed_results
        print(f"[one eye] split {seed}: {seed_results['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print_tables(results, args)


ANSWERS = ("pair head fed twice", "pair + one-eye rows", "eye head")


def eye_rows(eye_y: np.ndarray, both: np.ndarray) -> np.ndarray:
    from fundus_ensemble.training.heads import eye_mask

    return eye_mask(eye_y, ~both)


def referral_rows(y_test, pair_p, pair_t, eye_y, eye_p, eye_t, both) -> dict:
    """The referral score's sensitivity and specificity (95 % Wilson intervals) on the test patients:
    pairs against the patient labels (referable: not Normal), single eyes against their own."""
    from fundus_ensemble.evaluation.calibration import referral_scores
    from fundus_ensemble.metrics import wilson_interval

    rows = eye_rows(eye_y, both)
    out = {}
    for name, score, referable, t in (
        ("pair", referral_scores(pair_p), y_test[:, 0] == 0, pair_t),
        ("one eye", referral_scores(eye_p)[rows], eye_y[rows][:, 0] == 0, eye_t),
    ):
        tp, tn = int((score[referable] > t).sum()), int((score[~referable] <= t).sum())
        out[name] = {
            "threshold": float(t),
            "sensitivity": tp / referable.sum(),
            "sensitivity_95": wilson_interval(tp, int(referable.sum())),
            "specificity": tn / (~referable).sum(),
            "specificity_95": wilson_interval(tn, int((~referable).sum())),
            "auc": float(roc_auc_score(referable, score)),
        }
    return out


def cleared(decided: np.ndarray) -> np.ndarray:
    """Normal alone decided: the referral line's "No referable finding"."""
    return decided[..., 0] & ~decided[..., 1:].any(axis=-1)


def summarise(y_test, pair_raw, pair_calibrated, pair_decided, eye_y, eye_p, eye_decided, both) -> dict:
    from fundus_ensemble.labels import LABELS
    from fundus_ensemble.metrics import odir_score

    healthy = (y_test[:, 0] == 1) & (y_test[:, 1:].sum(1) == 0)
    sick = y_test[:, 1:].sum(1) > 0
    rows = eye_rows(eye_y, both)
    ey, ep, ed = eye_y[rows], eye_p[rows], eye_decided[rows]
    finding = ey[:, 0] == 0
    per_class = {}
    for j, c in enumerate(LABELS):
        pos = ey[:, j] == 1
        if 0 < pos.sum() < len(ey):
            per_class[c] = {
                "positives": int(pos.sum()),
                "auc": float(roc_auc_score(pos, ep[:, j])),
                "sensitivity": float(ed[pos, j].mean()),
                "specificity": float((~ed[~pos, j]).mean()),
            }
    pair_clear = cleared(pair_decided)
    return {
        "pair": {
            "final_raw": odir_score(y_test, pair_raw)["final"],
            "final_calibrated": odir_score(y_test, pair_calibrated)["final"],
            "auc": odir_score(y_test, pair_raw)["auc"],
            "healthy_cleared": float(pair_clear[healthy].mean()),
            "sick_not_cleared": float((~pair_clear[sick]).mean()),
        },
        "one_eye": {
            "healthy_cleared_left": float(cleared(eye_decided[:, 0])[healthy].mean()),
            "healthy_cleared_right": float(cleared(eye_decided[:, 1])[healthy & both].mean()),
            "healthy_cleared_any_eye": float(cleared(eye_decided)[healthy][rows[healthy]].mean()),
            "eyes_with_finding_not_cleared": float((~cleared(ed[finding])).mean()),
            "normal_eyes_cleared": float(cleared(ed[~finding]).mean()),
            "pooled_auc": float(roc_auc_score(ey.ravel(), ep.ravel())),
            "eyes": int(len(ey)),
            "per_class": per_class,
        },
        "healthy_patients": int(healthy.sum()),
        "sick_patients": int(sick.sum()),
    }


def print_tables(results: dict, args) -> None:
    from fundus_ensemble.labels import LABELS

    seeds = list(results)

    def cells(get, form):
        return " / ".join(form(get(results[s])) for s in seeds)

    def pct(x):
        return f"{100 * x:.0f}%"

    def num(x):
        return f"{x:.3f}"

    print(
        f"Feature screen `{args.screen}`, {args.backbone} {args.size} px (pretrained, frozen), heads on fusion "
        f"{args.fusion}, split seeds {' / '.join(map(str, seeds))}; test patients: "
        + cells(lambda r: r["patients"]["test"], str)
        + "; healthy (Normal only): "
        + cells(lambda r: r[next(n for n in ANSWERS if n in r)]["healthy_patients"], str)
        + ".\n"
    )
    print(
        "| answer | pair final raw | pair final calibrated | pair pooled AUC | healthy cleared, both eyes | "
        "healthy cleared, left eye alone | right eye alone | eyes with a finding not cleared | "
        "normal eyes cleared | one-eye pooled AUC |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    names = [n for n in ANSWERS if n in results[seeds[0]]]
    for name in names:
        row = [
            cells(lambda r, k=k: r[name]["pair"][k], form)
            for k, form in (("final_raw", num), ("final_calibrated", num), ("auc", num), ("healthy_cleared", pct))
        ] + [
            cells(lambda r, k=k: r[name]["one_eye"][k], form)
            for k, form in (
                ("healthy_cleared_left", pct),
                ("healthy_cleared_right", pct),
                ("eyes_with_finding_not_cleared", pct),
                ("normal_eyes_cleared", pct),
                ("pooled_auc", num),
            )
        ]
        print(f"| {name} | " + " | ".join(row) + " |")
    print(
        "\nWith the referral score: a patient (an eye) is cleared only when Normal alone is decided and its "
        "'any referable finding' score (1 - p(N)) is at or below the threshold set out of fold for 90 % "
        "sensitivity.\n"
    )
    print(
        "| answer | healthy cleared, both eyes | left eye alone | right eye alone | eyes with a finding not cleared "
        "| with a finding not cleared, both eyes |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        w = "with the referral score"
        row = [
            cells(lambda r: r[name][w]["pair"]["healthy_cleared"], pct),
            cells(lambda r: r[name][w]["one_eye"]["healthy_cleared_left"], pct),
            cells(lambda r: r[name][w]["one_eye"]["healthy_cleared_right"], pct),
            cells(lambda r: r[name][w]["one_eye"]["eyes_with_finding_not_cleared"], pct),
            cells(lambda r: r[name][w]["pair"]["sick_not_cleared"], pct),
        ]
        print(f"| {name} | " + " | ".join(row) + " |")
    print("\nThe referral score on the test patients (95 % Wilson intervals), threshold set out of fold:\n")
    print("| answer | given | AUC | sensitivity | specificity |")
    print("|---|---|---|---|---|")

    def interval(x, key):
        lo, hi = x[f"{key}_95"]
        return f"{100 * x[key]:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"

    for name in names:
        for given in ("pair", "one eye"):
            row = [
                cells(lambda r: r[name]["referral_score"][given]["auc"], num),
                cells(lambda r: interval(r[name]["referral_score"][given], "sensitivity"), str),
                cells(lambda r: interval(r[name]["referral_score"][given], "specificity"), str),
            ]
            print(f"| {name} | {given} | " + " | ".join(row) + " |")
    for name in names:
        print(f"\nEach eye alone, '{name}', against the eye's own keyword labels:\n")
        print("| class | eyes with it | AUC | sensitivity | specificity |")
        print("|---|---|---|---|---|")
        for c in LABELS:
            if not all(c in results[s][name]["one_eye"]["per_class"] for s in seeds):
                continue
            row = [
                cells(lambda r, k=k: r[name]["one_eye"]["per_class"][c][k], form)
                for k, form in (("positives", str), ("auc", num), ("sensitivity", pct), ("specificity", pct))
            ]
            print(f"| {c} | " + " | ".join(row) + " |")
    print("\nC chosen: " + "; ".join(f"split {s}: {results[s]['chosen_C']}" for s in seeds))


if __name__ == "__main__":
    main()
