"""The invariants the README states, each pinned by a fast test on hand-made inputs that a
one-line slip breaks: the eye fusion (max and mean, symmetric), the ensemble's view weights,
which split a calibration is fitted on, the strict 0.5 threshold of F1, what augmentation does
and where, and the fine-tune phase's learning rate. Each was seen to fail with the slip named
in its docstring planted in the library."""

import csv
import json
import warnings

import numpy as np
import pytest

from fundus_ensemble.labels import LABELS


@pytest.mark.backend  # runs again under KERAS_BACKEND=jax in CI
def test_eye_fusion_is_the_elementwise_max_then_the_mean_of_the_two_eyes():
    """Slips caught: max turned min; the mean replaced by the left (or right) eye; halves swapped."""
    from fundus_ensemble.models.patient_classifier import EyeFusion

    left = np.array([[1.0, 5.0, -2.0], [0.0, 0.0, 7.0]], np.float32)
    right = np.array([[3.0, 2.0, -4.0], [1.0, -1.0, 7.0]], np.float32)
    fused = np.asarray(EyeFusion()(np.concatenate([left, right])))
    np.testing.assert_array_equal(fused, [[3, 5, -2, 2, 3.5, -3], [1, 0, 7, 0.5, -0.5, 7]])
    swapped = np.asarray(EyeFusion()(np.concatenate([right, left])))
    np.testing.assert_array_equal(fused, swapped)  # which eye comes first changes nothing


@pytest.mark.backend  # runs again under KERAS_BACKEND=jax in CI
def test_the_patient_model_fuses_its_eyes_with_eye_fusion_and_ignores_their_order():
    """Slip caught: the model built without the fusion layer, or with an order-dependent one."""
    import keras

    from fundus_ensemble.models import build_patient_model
    from fundus_ensemble.models.patient_classifier import EyeFusion

    model = build_patient_model("mobilenet", 32, None, 0.5)
    assert any(isinstance(layer, EyeFusion) for layer in model._flatten_layers())
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (2, 32, 32, 3)).astype(np.float32) for _ in range(2))
    one = np.asarray(model.predict_on_batch({"left_eye": a, "right_eye": b}))
    other = np.asarray(model.predict_on_batch({"left_eye": b, "right_eye": a}))
    np.testing.assert_allclose(one, other, atol=1e-6)
    keras.backend.clear_session()


@pytest.mark.backend  # runs again under KERAS_BACKEND=jax in CI
def test_the_ensemble_is_the_weighted_mean_of_the_views_with_weights_normalised():
    """Slips caught: the weights ignored (a plain mean); the division by their sum dropped."""
    from fundus_ensemble.evaluation.ensemble import average_probabilities

    color = np.array([[0.2, 0.8], [0.4, 0.0]])
    gray = np.array([[0.6, 0.0], [0.0, 1.0]])
    expected = (1 * color + 3 * gray) / 4
    for weights in ({"color": 1.0, "gray_eq": 3.0}, {"color": 0.5, "gray_eq": 1.5}):
        np.testing.assert_allclose(
            average_probabilities({"color": color, "gray_eq": gray}, weights), expected, atol=1e-15
        )
    np.testing.assert_allclose(average_probabilities({"color": color, "gray_eq": gray}), (color + gray) / 2, atol=1e-15)


@pytest.fixture(scope="module")
def pair_and_prep(small_dataset, tmp_path_factory):
    """Two untrained view models at 32 px (different seeds) and the small dataset's views at 32 px."""
    import keras

    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.data.preprocess import preprocess_manifest
    from fundus_ensemble.models import build_patient_model

    root = tmp_path_factory.mktemp("pair")
    preprocess_manifest(load_manifest(small_dataset), root / "prep", size=32, workers=1, progress=False)
    for seed, view in enumerate(("color", "gray_eq")):
        keras.utils.set_random_seed(seed + 11)
        (root / "run" / view).mkdir(parents=True)
        model = build_patient_model("mobilenet", 32, None, 0.5)
        head = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)][-1]
        rng = np.random.default_rng(seed)  # an untrained head says 0.5 for everyone: give it opinions
        head.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in head.get_weights()])
        model.save(str(root / "run" / view / "model.keras"))
        (root / "run" / view / "card.json").write_text(
            json.dumps({"view": view, "labels": list(LABELS), "input_size": 32})
        )
    return root


def _view_probs(root, split):
    from fundus_ensemble.evaluation.ensemble import load_view_model, predict_manifest_split

    out = {}
    for view in ("color", "gray_eq"):
        model, card = load_view_model(root / "run", view)
        _, labels, out[view] = predict_manifest_split(model, card, root / "prep" / view, split)
    return labels, out


def test_score_uses_the_view_weights_it_is_given(pair_and_prep, tmp_path):
    """Slip caught: score_run not passing --ensemble-weights on to the average."""
    from fundus_ensemble.evaluation.ensemble import score_run

    score_run(pair_and_prep / "run", pair_and_prep / "prep", "test", {"color": 1.0, "gray_eq": 3.0}, tmp_path / "s")
    _, probs = _view_probs(pair_and_prep, "test")
    with open(tmp_path / "s" / "predictions.csv") as handle:
        written = np.array([[float(r[c]) for c in LABELS] for r in csv.DictReader(handle)])
    np.testing.assert_allclose(written, (probs["color"] + 3 * probs["gray_eq"]) / 4, atol=1e-12)
    assert not np.allclose(written, (probs["color"] + probs["gray_eq"]) / 2, atol=1e-9), "the weights must matter here"


def test_calibration_is_fitted_on_the_calibration_split_never_the_scored_one(pair_and_prep, tmp_path):
    """Slip caught: score_run fitting the calibration on the split it scores."""
    from fundus_ensemble.evaluation.calibration import Calibration, fit_calibration
    from fundus_ensemble.evaluation.ensemble import average_probabilities, score_run

    with warnings.catch_warnings():  # classes with one value among the few patients are left as they are
        warnings.simplefilter("ignore")
        score_run(pair_and_prep / "run", pair_and_prep / "prep", "test", out_dir=tmp_path / "s", calibrate_on="val")
        saved = Calibration.from_dict(json.loads((tmp_path / "s" / "calibration.json").read_text())["ensemble"])
        fits = {}
        for split in ("val", "test"):
            labels, probs = _view_probs(pair_and_prep, split)
            fits[split] = fit_calibration(labels, average_probabilities(probs))
    assert fits["val"] != fits["test"], "the two splits must give different fits for this test to tell them apart"
    assert saved == fits["val"]


def test_f1_and_kappa_count_a_cell_positive_only_strictly_above_the_threshold():
    """Slip caught: ``>`` turned ``>=`` in the pooled or the per-class decision."""
    from fundus_ensemble.metrics import odir_score, per_class_scores

    y = np.zeros((4, len(LABELS)), int)
    y[0, 0] = y[1, 1] = 1
    p = np.full(y.shape, 0.1)
    p[0, 0] = p[1, 1] = 0.5000001  # the two positives, just above 0.5
    p[2, 2] = 0.5  # a negative exactly at 0.5: not decided positive
    score = odir_score(y, p)
    assert score["f1"] == pytest.approx(1.0) and score["kappa"] == pytest.approx(1.0)
    p[0, 0] = 0.5  # a positive exactly at 0.5 is now missed
    assert odir_score(y, p)["f1"] < 1.0
    assert per_class_scores(y, p)["N"]["f1"] == 0.0 and per_class_scores(y, p)["C"]["f1"] == 0.0


def _flips(image):
    return [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]


def test_augmentation_rotates_within_its_limit_as_well_as_flipping():
    """Slips caught: the rotation disabled (p 0 or limit 0); a limit other than the one asked for."""
    import albumentations as A

    from fundus_ensemble.data.augment import training_augmentation

    image = np.zeros((33, 33, 3), np.uint8)
    image[4:8, 4:20] = 255  # an asymmetric bar: every flip of it differs, and any rotation moves it off the grid
    augment = training_augmentation(30, seed=0)
    outputs = [augment(image=image)["image"] for _ in range(40)]
    rotated = [o for o in outputs if not any(np.array_equal(o, f) for f in _flips(image))]
    assert len(rotated) >= 35, "almost every draw must rotate (a rotation of exactly 0 degrees is rare)"
    [rotate] = [t for t in augment.transforms if isinstance(t, A.Rotate)]
    assert tuple(rotate.limit) == (-30, 30) and rotate.p == 1.0
    still = training_augmentation(0, seed=0)
    unrotated = [still(image=image)["image"] for _ in range(20)]
    assert all(any(np.array_equal(o, f) for f in _flips(image)) for o in unrotated)


def test_training_augments_its_train_batches_only_and_fine_tunes_at_the_lower_rate(
    small_dataset, tmp_path, monkeypatch
):
    """Slips caught: augmentation given to the validation batches; the rotation not passed on from
    the config; the fine-tune phase's learning-rate factor ignored; the views cached whatever the memory."""
    import albumentations as A

    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.data.preprocess import preprocess_manifest
    from fundus_ensemble.training import train
    from fundus_ensemble.training.config import TrainConfig

    preprocess_manifest(load_manifest(small_dataset), tmp_path / "prep", size=32, workers=1, progress=False)
    made = []
    real = train.PatientBatches

    def spy(manifest, *args, **kwargs):
        batches = real(manifest, *args, **kwargs)
        made.append(({p.split for p in manifest.patients}, batches.augment, batches._image._cache))
        return batches

    monkeypatch.setattr(train, "PatientBatches", spy)
    # the training and validation views at 32 px take over 50 kB, more than half of 100 kB: they stream from disk
    monkeypatch.setattr("fundus_ensemble.data.batches.memory_available", lambda: 100_000)
    config = TrainConfig(
        backbone="mobilenet",
        size=32,
        batch_size=4,
        epochs=1,
        fine_tune_epochs=1,
        learning_rate=2e-3,
        fine_tune_lr_factor=0.25,
        rotation=17.0,
        early_stopping_patience=5,
    )
    card = train.train_view(tmp_path / "prep" / "color", tmp_path / "run", config, "color")
    assert card["images_cached"] is False and [cache for *_, cache in made] == [None, None], "both splits stream"
    by_split = {frozenset(splits): augment for splits, augment, _ in made}
    assert by_split[frozenset({"val"})] is None, "validation batches must not be augmented"
    [rotate] = [t for t in by_split[frozenset({"train"})].transforms if isinstance(t, A.Rotate)]
    assert tuple(rotate.limit) == (-17, 17)
    with open(tmp_path / "run" / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    rates = {r["phase"]: float(r["learning_rate"]) for r in rows}
    assert rates == {"train": pytest.approx(2e-3), "fine_tune": pytest.approx(5e-4)}


def test_jax_on_a_cpu_with_a_depthwise_backbone_gets_a_note_and_nothing_else_does():
    """Slips caught: the note for every backend, or on a GPU, or for backbones without depthwise convolutions."""
    from fundus_ensemble.training.hardware import cpu_backend_advice

    assert "KERAS_BACKEND=tensorflow" in cpu_backend_advice("jax", 0, "efficientnet_lite2")
    assert cpu_backend_advice("jax", 0, "mobilenet") is not None
    for backend, accelerators, backbone in (
        ("tensorflow", 0, "efficientnet_b3"),
        ("jax", 1, "efficientnet_b3"),
        ("jax", 0, "resnet50"),
        ("torch", 0, "efficientnet_b0"),
    ):
        assert cpu_backend_advice(backend, accelerators, backbone) is None, (backend, accelerators, backbone)


def test_each_patient_gets_its_own_flips_whatever_the_worker_or_process(view_manifest):
    """Slips caught: seeding every transform alike (albumentations' Compose.set_random_seed gives each
    transform the same stream, so the two flips always agree and a mirror never comes alone); a
    process's rows drawn from another place in the batch than the single process draws them."""
    from fundus_ensemble.data.augment import training_augmentation
    from fundus_ensemble.data.batches import PatientBatches

    image = np.arange(48, dtype=np.float32).reshape(4, 4, 3)
    outcomes = {"none": image, "h": image[:, ::-1], "v": image[::-1], "hv": image[::-1, ::-1]}
    batches = PatientBatches(view_manifest, 48, 8, training_augmentation(0, seed=5), shuffle=True, seed=5)
    seen = []
    for index in range(4):
        for row in range(8):
            out = batches._augmenter(index, row)(image=image)["image"]
            seen.append(next(name for name, want in outcomes.items() if np.array_equal(out, want)))
    assert set(seen) == set(outcomes), seen  # a horizontal or a vertical mirror alone, too
    whole = [b[0]["left_eye"] for b in (batches[0], batches[1])]
    for process in (0, 1):
        batches.shard(process, 2)
        for index in (0, 1):
            np.testing.assert_array_equal(batches[index][0]["left_eye"], whole[index][4 * process : 4 * process + 4])


def test_the_views_are_cached_only_when_they_fit_in_half_the_available_memory(monkeypatch):
    """Slips caught: the share ignored (cache whenever the views fit at all), the image count or size misread."""
    from fundus_ensemble.data.batches import CACHE_SHARE, cached_bytes, choose_cache

    need = cached_bytes(1000, 128)
    assert need == 1000 * 128 * 128 * 3 and CACHE_SHARE == 0.5
    assert choose_cache(1000, 128, available=2 * need)[0] is True
    keep, why = choose_cache(1000, 128, available=2 * need - 1)
    assert keep is False and "--cache on" in why and "49.2 MB" in why
    assert "2.95 GB of 6.30 GB" in choose_cache(60_000, 128, available=6_300_000_000)[1]
    assert (
        choose_cache(1001, 128, available=2 * need)[0] is False
        and choose_cache(1000, 129, available=2 * need)[0] is False
    )
    monkeypatch.setattr("fundus_ensemble.data.batches.memory_available", lambda: None)
    assert choose_cache(10**9, 448)[0] is True  # unknown memory: kept, as before the choice existed
