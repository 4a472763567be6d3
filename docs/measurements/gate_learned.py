"""Can a linear head on the gate's own features tell a retina from an image painted to look like one?

The gate's last check reads EfficientNet-Lite0's ImageNet classes; a painted orange disc with
blurred pixel noise, or with a bright spot for an optic disc, gets a fundus mass above its
threshold. Here a logistic head on the same network's pooled features (1280, computed in the same
forward pass) is fitted on real photos (every photo of odir5k-256-dev) against lookalikes
(:mod:`fundus_ensemble.data.lookalikes`' families, scikit-image's everyday photos cut into discs
and tinted orange, real photos with their phase scrambled), and measured:

- out of fold (5 folds, a patient's photos in one fold; the lookalikes in the same folds): the
  threshold lies ``--margin`` below the lowest out-of-fold score of a real photo of folds 0-2; each
  class's real photos of folds 3-4 refused at it, and each family's lookalikes caught;
- each family left out of the fitting entirely (the threshold set again the same way): is a kind
  of fake the head has never seen caught?
- another camera: every tenth real photo through each of the camera-shift protocol's shifts
  (:data:`fundus_ensemble.data.acquisition.SHIFTS`), never in the fitting: the share refused.

Only photos the image checks find gradable meet this check in predict; the tables count those.
``--write PATH`` saves the head fitted on everything (the package's ``models/gate_head.npz``).

    PYTHONPATH=. python docs/measurements/gate_learned.py $D/labels.csv --image-root $D --cache runs/gate_features.npz
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import cv2
import numpy as np

from fundus_ensemble.data import lookalikes
from fundus_ensemble.data.acquisition import SHIFTS
from fundus_ensemble.data.imaging import crop_to_fov, find_fov
from fundus_ensemble.data.quality import grade
from fundus_ensemble.labels import LABELS
from fundus_ensemble.models.gate import INPUT_SIZE, MIN_FUNDUS_MASS, FundusLikeness

EVERYDAY = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "moon",
    "page",
    "rocket",
    "text",
    "horse",
)  # fmt: skip  (those scikit-image installs with itself; the others need a download)


def everyday_discs(n: int, colours: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """scikit-image's photos (not its retina), cropped, turned, tinted towards a retina's colour and
    cut into a vignetted disc on black."""
    import skimage.data

    sources = []
    for name in EVERYDAY:
        a = np.asarray(getattr(skimage.data, name)())
        a = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]
        sources.append(cv2.cvtColor(a.astype(np.uint8), cv2.COLOR_RGB2BGR))
    out = []
    for _ in range(n):
        a = sources[rng.integers(len(sources))]
        h, w = a.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        a = cv2.resize(a[y : y + side, x : x + side], (lookalikes.SIDE, lookalikes.SIDE)).astype(np.float32)
        a = np.rot90(a, rng.integers(4)).copy()
        light = a.mean(axis=2, keepdims=True) / 255
        tint = colours[rng.integers(len(colours))][None, None, :] * (0.4 + 1.2 * light)
        mix = rng.uniform(0.5, 1.0)
        image, inside = lookalikes._disc(rng, (1, 1, 1), rng.uniform(0.2, 0.6))
        out.append(lookalikes._finish((mix * tint + (1 - mix) * a) * image, inside))
    return out


def features(gate: FundusLikeness, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fundus mass, pooled features, gradable by the image checks) of each image."""
    squares, gradable = [], []
    for image in images:
        try:
            gradable.append(grade(image).gradable)
            squares.append(crop_to_fov(image, INPUT_SIZE))
        except Exception:  # no retina found at all: refused before this check
            gradable.append(False)
            squares.append(np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
    mass, feats = gate.read(squares)
    return mass, feats.astype(np.float32), np.array(gradable)


def fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000)).fit(x, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("labels", type=Path)
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--per-family", type=int, default=300, help="lookalikes made per family")
    p.add_argument(
        "--margin", type=float, default=0.5, help="the threshold lies this far below the lowest out-of-fold real photo"
    )
    p.add_argument("--c", type=float, default=0.01, help="inverse regularisation of the logistic head")
    p.add_argument("--cache", type=Path, help="keep the features here (computed once)")
    p.add_argument("--write", type=Path, help="save the head fitted on everything here")
    p.add_argument("--samples", type=Path, help="write three lookalikes of each family here, to look at")
    args = p.parse_args()

    rows = list(csv.DictReader(open(args.labels, newline="")))
    if args.cache and args.cache.is_file():
        data = dict(np.load(args.cache, allow_pickle=False))
        print(f"features from {args.cache}")
    else:
        gate, rng, start = FundusLikeness(), np.random.default_rng(0), time.time()
        photos = [cv2.imread(str(args.image_root / "images" / r["filename"])) for r in rows]
        colours = []
        for photo in photos[::5]:
            x, y, w, h = find_fov(photo)
            retina = photo[y : y + h, x : x + w].reshape(-1, 3).astype(np.float32)
            retina = retina[retina.max(axis=1) > 30]
            colours.append(retina.mean(axis=0))
        colours = np.array(colours)
        data = {}
        real_cache = args.cache.with_name(args.cache.stem + "_real.npz") if args.cache else None
        if real_cache and real_cache.is_file():
            data.update(np.load(real_cache, allow_pickle=False))
        else:
            data["real_mass"], data["real_x"], data["real_gradable"] = features(gate, photos)
            if real_cache:
                real_cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(real_cache, **data)
        print(f"real photos: {len(photos)} in {time.time() - start:.0f} s", flush=True)
        families = {}
        for name, make in lookalikes.FAMILIES.items():
            families[name] = [make(rng, colours[rng.integers(len(colours))]) for _ in range(args.per_family)]
        families["everyday photos in a disc"] = everyday_discs(args.per_family, colours, rng)
        picks = rng.choice(len(photos), args.per_family, replace=False)
        families["scrambled real photos"] = [lookalikes.scrambled(photos[i], rng) for i in picks]
        data["families"] = np.array(list(families))
        for k, (name, images) in enumerate(families.items()):
            data[f"fake{k}_mass"], data[f"fake{k}_x"], data[f"fake{k}_gradable"] = features(gate, images)
            if args.samples:
                args.samples.mkdir(parents=True, exist_ok=True)
                for i in range(3):
                    cv2.imwrite(str(args.samples / f"{k}_{i}.jpg"), images[i])
            print(f"{name}: {len(images)} in {time.time() - start:.0f} s", flush=True)
        for k, (name, shift) in enumerate(SHIFTS.items()):
            if name == "none":
                continue
            data[f"shift{k}_mass"], data[f"shift{k}_x"], data[f"shift{k}_gradable"] = features(
                gate, [shift(photo) for photo in photos[::10]]
            )
        print(f"camera shifts in {time.time() - start:.0f} s", flush=True)
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.cache, **data)

    names = [str(n) for n in data["families"]]
    fakes = [data[f"fake{k}_x"] for k in range(len(names))]
    real = data["real_x"]
    patients = np.array([r["ID"] for r in rows])
    real_fold = np.array([int(pid) % 5 for pid in patients])  # a patient's photos in one fold
    fake_folds = [np.arange(len(f)) % 5 for f in fakes]

    def out_of_fold(left_out: int | None) -> tuple[np.ndarray, list[np.ndarray]]:
        real_score = np.zeros(len(real))
        fake_score = [np.zeros(len(f)) for f in fakes]
        for fold in range(5):
            used = [k for k in range(len(fakes)) if k != left_out]
            x = np.concatenate([real[real_fold != fold], *[fakes[k][fake_folds[k] != fold] for k in used]])
            y = np.concatenate([np.ones((real_fold != fold).sum()), np.zeros(len(x) - (real_fold != fold).sum())])
            head = fit(x, y, args.c)
            real_score[real_fold == fold] = head.decision_function(real[real_fold == fold])
            for k in range(len(fakes)):
                if k != left_out:
                    part = fake_folds[k] == fold
                elif fold == 0:  # the left-out family scored once, by the first fold's head (never fitted on it)
                    part = slice(None)
                else:
                    continue
                fake_score[k][part] = head.decision_function(fakes[k][part])
        return real_score, fake_score

    gradable = data["real_gradable"]
    real_score, fake_score = out_of_fold(None)
    labels = np.array([[int(r[c]) for c in LABELS] for r in rows])
    # the threshold is set on some patients' out-of-fold scores and the refusals counted on the others
    sets = real_fold < 3
    threshold = real_score[gradable & sets].min() - args.margin
    print(
        f"\nthreshold {args.margin} under the lowest out-of-fold score of the gradable real photos of folds 0-2 "
        f"({(gradable & sets).sum()} photos): {threshold:.2f}\n"
    )
    print(
        "| real photos of folds 3-4 (patients' labels), gradable by the image checks | n | refused by the head "
        "| lowest score | 1st percentile | by the ImageNet check |\n|---|---|---|---|---|---|"
    )
    for j, c in [*enumerate(LABELS), (None, "all")]:
        sel = gradable & ~sets & (labels[:, j] == 1 if j is not None else True)
        print(
            f"| {c} | {sel.sum()} | {(real_score[sel] < threshold).sum()} | {real_score[sel].min():.2f} "
            f"| {np.percentile(real_score[sel], 1):.2f} | {(data['real_mass'][sel] < MIN_FUNDUS_MASS).sum()} |"
        )
    lowest = {c: real_score[gradable & (labels[:, j] == 1)].min() for j, c in enumerate(LABELS)}
    print("lowest out-of-fold score per class, every fold:", ", ".join(f"{c} {v:.2f}" for c, v in lowest.items()))
    threshold = real_score[gradable].min() - args.margin  # the shipped head's: every fold
    print(f"the threshold set on every fold: {threshold:.2f}")

    print(
        "\n| lookalikes | n | gradable by the image checks | of those, passing the ImageNet check "
        "| caught by the head (out of fold) | caught, family left out of the fitting | passing both checks now, "
        "left out |\n|---|---|---|---|---|---|---|"
    )
    for k, name in enumerate(names):
        g = data[f"fake{k}_gradable"]
        passes = g & (data[f"fake{k}_mass"] >= MIN_FUNDUS_MASS)
        lo_real, lo_fake = out_of_fold(k)
        lo_threshold = lo_real[gradable].min() - args.margin
        caught = fake_score[k] < threshold
        caught_lo = lo_fake[k] < lo_threshold
        print(
            f"| {name} | {len(g)} | {g.sum()} | {passes.sum()} | {caught[g].mean():.1%} of gradable "
            f"| {caught_lo[g].mean():.1%} of gradable | {(passes & ~caught_lo).sum()} |"
            if g.any()
            else f"| {name} | {len(g)} | 0 | 0 | {caught.mean():.1%} of all | {caught_lo.mean():.1%} of all | 0 |"
        )

    head = fit(
        np.concatenate([real, *fakes]), np.concatenate([np.ones(len(real)), np.zeros(sum(map(len, fakes)))]), args.c
    )
    full_threshold = threshold  # set out of fold: the fitted head's own scores of its photos are optimistic
    print(
        "\n| every tenth real photo through a camera shift | gradable | refused by the head (fitted on all) | by the ImageNet check |"
    )
    print("|---|---|---|---|")
    for k, name in enumerate(SHIFTS):
        if f"shift{k}_x" not in data:
            continue
        g = data[f"shift{k}_gradable"]
        score = head.decision_function(data[f"shift{k}_x"])
        print(f"| {name} | {g.sum()} | {(score[g] < full_threshold).sum()} ({(score[g] < full_threshold).mean():.1%}) "
              f"| {(data[f'shift{k}_mass'][g] < MIN_FUNDUS_MASS).sum()} |")  # fmt: skip
    # two things never in the fitting: a real retina from another camera, and the demo's synthetic photos
    import skimage.data

    retina = cv2.cvtColor(skimage.data.retina(), cv2.COLOR_RGB2BGR)
    demo = [cv2.imread(str(f)) for f in sorted((Path(__file__).parents[2] / "data" / "demo" / "images").glob("*.jpg"))]
    mass, x, g = features(FundusLikeness(), [retina, *demo])
    score = head.decision_function(x)
    imagenet = g[1:] & (mass[1:] < MIN_FUNDUS_MASS)
    by_head = g[1:] & ~imagenet & (score[1:] < full_threshold)
    print(
        f"\nscikit-image's retina photo (another camera): score {score[0]:.2f} against the threshold {full_threshold:.2f} "
        f"(gradable: {g[0]}); the demo's {len(demo)} synthetic photos: {g[1:].sum()} gradable by the image checks, "
        f"{imagenet.sum()} of them refused by the ImageNet check, {by_head.sum()} more by the head"
    )
    if args.write:
        scaler, logistic = head[0], head[1]
        np.savez(
            args.write,
            mean=scaler.mean_,
            scale=scaler.scale_,
            coef=logistic.coef_[0],
            intercept=logistic.intercept_,
            threshold=np.array([full_threshold]),
        )
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
