from dataclasses import replace

import keras
import numpy as np
import pytest

from fundus_ensemble.data.augment import training_augmentation
from fundus_ensemble.data.batches import EyeBatches, PatientBatches, predict_eye_average, predict_patients

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend


def column_mean_model(inputs: dict[str, tuple] | tuple):
    """A model whose 8 outputs depend on the left/right layout of its input (so flips show)."""

    def head(x):
        left_half = keras.layers.Lambda(lambda t: t[:, :, : t.shape[2] // 2, :])(x)
        return keras.layers.Dense(8, activation="sigmoid", kernel_initializer="ones")(
            keras.layers.GlobalAveragePooling2D()(left_half) / 255.0 - 0.5
        )

    if isinstance(inputs, dict):
        eyes = {name: keras.Input(shape, name=name) for name, shape in inputs.items()}
        return keras.Model(eyes, (head(eyes["left_eye"]) + head(eyes["right_eye"])) / 2)
    image = keras.Input(inputs, name="image")
    return keras.Model(image, head(image))


def test_every_batch_has_the_same_shape(view_manifest):
    padded = PatientBatches(view_manifest, 48, 10)  # 24 patients: 10 + 10 + 4 padded to 10
    assert len(padded) == 3
    for i in range(len(padded)):
        x, y = padded[i]
        assert x["left_eye"].shape == (10, 48, 48, 3) and y.shape == (10, 8)
    x, y = padded[2]
    np.testing.assert_array_equal(y[:4], view_manifest.label_matrix()[20:24])
    np.testing.assert_array_equal(x["left_eye"][4], x["left_eye"][3])  # padding repeats the last patient

    dropped = PatientBatches(view_manifest, 48, 10, shuffle=True, ragged_last="drop")
    assert len(dropped) == 2


def test_one_eyed_patient_gets_that_eye_twice(view_manifest):
    patients = list(view_manifest.patients)
    patients[0] = replace(patients[0], left_image=None)
    x, _ = PatientBatches(view_manifest.with_patients(patients), 48, 4)[0]
    np.testing.assert_array_equal(x["left_eye"][0], x["right_eye"][0])
    assert not np.array_equal(x["left_eye"][1], x["right_eye"][1])


def test_shuffle_and_augmentation_are_seeded(view_manifest):
    def first_batch(seed):
        return PatientBatches(view_manifest, 48, 8, training_augmentation(30, seed), shuffle=True, seed=seed)[0]

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    np.testing.assert_array_equal(a[0]["left_eye"], b[0]["left_eye"])
    assert not np.array_equal(a[0]["left_eye"], c[0]["left_eye"])
    plain = PatientBatches(view_manifest, 48, 24)[0][0]["left_eye"]
    augmented = PatientBatches(view_manifest, 48, 24, training_augmentation(30, 0))[0][0]["left_eye"]
    assert not np.array_equal(plain, augmented)
    assert plain.min() >= 0 and plain.max() <= 255 and plain.dtype == np.float32


def test_eye_batches_label_each_eye_with_its_patient(view_manifest):
    patients = list(view_manifest.patients)
    patients[0] = replace(patients[0], left_image=None)  # 24 patients, 47 eyes
    manifest = view_manifest.with_patients(patients)
    eyes = EyeBatches(manifest, 48, 10)
    assert len(eyes.eyes) == 47 and len(eyes) == 5
    x, y = eyes[4]  # 7 eyes padded to 10
    assert x.shape == (10, 48, 48, 3) and y.shape == (10, 8)
    np.testing.assert_array_equal(y[:7], manifest.label_matrix()[eyes.eye_patient[40:47]])
    assert eyes.eye_patient[0] == 0 and eyes.eye_patient[1] == 1 and eyes.eye_patient[2] == 1
    assert len(EyeBatches(manifest, 48, 10, shuffle=True, ragged_last="drop")) == 4


def test_eye_average_is_the_mean_of_the_patients_eyes(view_manifest):
    patients = list(view_manifest.patients)
    patients[0] = replace(patients[0], right_image=None)
    manifest = view_manifest.with_patients(patients)
    model = column_mean_model((48, 48, 3))
    eyes = EyeBatches(manifest, 48, 8)
    per_eye = model.predict(eyes, verbose=0)[: len(eyes.eyes)]
    per_patient = predict_eye_average(model, manifest, 48, batch_size=8)
    np.testing.assert_allclose(per_patient[0], per_eye[0], rtol=1e-5)  # one eye: that eye
    np.testing.assert_allclose(per_patient[1], per_eye[1:3].mean(axis=0), rtol=1e-5)


def test_flip_tta_averages_with_the_mirrored_eyes(view_manifest):
    model = column_mean_model({"left_eye": (48, 48, 3), "right_eye": (48, 48, 3)})
    plain = predict_patients(model, view_manifest, 48, batch_size=8)
    tta = predict_patients(model, view_manifest, 48, batch_size=8, flip_tta=True)
    x, _ = PatientBatches(view_manifest, 48, 24)[0]
    flipped = model.predict({k: v[:, :, ::-1, :].copy() for k, v in x.items()}, verbose=0)
    np.testing.assert_allclose(tta, (plain + flipped) / 2, rtol=1e-5)
    assert not np.allclose(tta, plain)


def test_augmentation_is_the_same_whatever_the_workers_and_their_order(view_manifest):
    from concurrent.futures import ThreadPoolExecutor

    def batches(workers):
        return PatientBatches(
            view_manifest, 48, 8, training_augmentation(30, seed=3), shuffle=True, seed=3, workers=workers
        )

    one, many = batches(1), batches(4)
    with ThreadPoolExecutor(4) as pool:  # as PyDataset's worker threads: any order, concurrently
        got = list(pool.map(many.__getitem__, reversed(range(len(many)))))[::-1]
    for index, (inputs, labels) in enumerate(got):
        expected_inputs, expected_labels = one[index]
        np.testing.assert_array_equal(inputs["left_eye"], expected_inputs["left_eye"])
        np.testing.assert_array_equal(labels, expected_labels)
    first = one[0][0]["left_eye"]
    one.on_epoch_end()
    one._order = np.arange(len(view_manifest))  # same patients as before, so only the augmentation can differ
    one_again = batches(1)
    one_again._order = one._order
    assert not np.array_equal(one[0][0]["left_eye"], one_again[0][0]["left_eye"]), (
        "a new epoch must draw new augmentations"
    )
    assert first.shape == (8, 48, 48, 3)
