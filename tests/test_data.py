import numpy as np

from fundus_ensemble.augment import training_augmentation
from fundus_ensemble.data import PatientBatches

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
    from dataclasses import replace

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
