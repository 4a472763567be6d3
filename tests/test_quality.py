"""The gradability gate: each check gives its own reason on a real fundus photo degraded that way,
non-fundus photos are refused, and predict refuses an ungradable eye with "retake" and the reason."""

import csv
import json

import cv2
import numpy as np
import pytest

from fundus_ensemble.data import quality
from fundus_ensemble.data.imaging import crop_to_fov
from fundus_ensemble.labels import LABELS

skimage_data = pytest.importorskip("skimage.data")


def bgr(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a[..., :3][..., ::-1]) if a.ndim == 3 else cv2.cvtColor(a, cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    """scikit-image's fundus photograph (a real retina, 1411 px), at 512 px."""
    return cv2.resize(bgr(skimage_data.retina()), (512, 512), interpolation=cv2.INTER_AREA)


def clipped(image: np.ndarray, share: float) -> np.ndarray:
    level = np.percentile(image[..., 1][image.max(axis=2) > 20], 100 * (1 - share))
    return np.clip(image.astype(np.float32) * 255.0 / level, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality_: int) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality_])[1], cv2.IMREAD_COLOR)


def cat_in_a_disc() -> np.ndarray:
    """scikit-image's cat cut into a disc on black, as a fundus camera frames its photo."""
    cat = bgr(skimage_data.cat())
    side = min(cat.shape[:2])
    disc = cat[:side, :side].copy()
    yy, xx = np.mgrid[:side, :side]
    disc[(yy - side / 2) ** 2 + (xx - side / 2) ** 2 > (0.48 * side) ** 2] = 0
    return disc


@pytest.mark.parametrize(
    "degrade, reason",
    [
        (lambda a: cv2.GaussianBlur(a, (0, 0), 3), "blurred"),
        (lambda a: (a * 0.15).astype(np.uint8), "too dark"),
        (lambda a: (a * 0.02).astype(np.uint8), "too dark"),  # so dark no retina is found: still too dark
        (lambda a: clipped(a, 0.4), "over-exposed"),
        (lambda a: np.ascontiguousarray(a[:, a.shape[1] // 2 :]), "retina cut off"),
        (lambda a: jpeg(a, 5), "heavily compressed"),
        (lambda a: cv2.cvtColor(cv2.cvtColor(a, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR), "not a colour fundus photo"),
    ],
)
def test_each_degradation_of_a_real_retina_gets_its_own_reason(retina, degrade, reason):
    assert quality.grade(retina).gradable, quality.grade(retina).text
    verdict = quality.grade(degrade(retina))
    assert not verdict.gradable and verdict.reason == reason, verdict.text
    # a poor photo whose retina is found is screened (a cloudy lens does the same); the rest are refused
    assert verdict.usable == (reason in quality.POOR and verdict.statistics != {}), verdict.text


def test_a_half_lit_retina_is_screened_and_a_half_photographed_one_is_cut_off(retina):
    lit = retina.copy()
    lit[:, : lit.shape[1] * 2 // 5] = (lit[:, : lit.shape[1] * 2 // 5] * 0.05).astype(np.uint8)  # the left part unlit
    verdict = quality.grade(lit)
    assert verdict.reason == "partly dark" and verdict.usable, verdict.text
    cut = np.ascontiguousarray(retina[:, retina.shape[1] // 2 :])
    assert quality.grade(cut).reason == "retina cut off" and not quality.grade(cut).usable


def painted_disc(side: int = 512, vignette: bool = True) -> np.ndarray:
    """An orange-red disc on black with a retina's colours and none of its structure."""
    yy, xx = np.mgrid[:side, :side]
    distance = np.sqrt((yy - side / 2) ** 2 + (xx - side / 2) ** 2) / (0.45 * side)
    falloff = np.clip(1 - 0.5 * distance**2, 0, 1) if vignette else np.ones_like(distance)
    disc = np.zeros((side, side, 3), np.float32)
    disc[:] = (30, 90, 200)
    disc *= falloff[..., None]
    disc[distance > 1] = 0
    return disc.astype(np.uint8)


@pytest.mark.parametrize("vignette", [False, True])
def test_a_painted_disc_with_no_retinal_detail_is_never_gradable(vignette):
    # it shares a retina's colours and frame; real photos, the densest cataract included, have 1.5 times the detail
    verdict = quality.grade(painted_disc(vignette=vignette))
    assert verdict.reason == "blurred" and verdict.statistics["detail"] < quality.MIN_DETAIL, verdict.text
    assert verdict.usable, "screened as poor, never cleared, like a hazy lens: not refused"


def test_pixel_noise_on_a_painted_disc_is_grainy_and_a_real_retina_is_not(retina):
    disc = painted_disc(vignette=True).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 4, disc.shape) * (disc.max(axis=2, keepdims=True) > 0)
    verdict = quality.grade(np.clip(disc + noise, 0, 255).astype(np.uint8))
    assert verdict.statistics["detail"] >= quality.MIN_DETAIL, "its noise is detail: the blur check passes it"
    assert verdict.reason == "grainy" and verdict.usable, verdict.text  # screened, never cleared
    # real photos reach 1.99 (hazy cataracts); a real retina, with the same noise too, is not grainy
    for photo in (retina, np.clip(retina + np.random.default_rng(1).normal(0, 4, retina.shape), 0, 255)):
        real = quality.grade(photo.astype(np.uint8))
        assert real.gradable and real.statistics["sharpness"] < quality.MAX_SHARPNESS, real.text


def test_a_montage_of_fundus_photos_is_refused(retina):
    small = cv2.resize(retina, (240, 240), interpolation=cv2.INTER_AREA)
    two = np.zeros((512, 512, 3), np.uint8)
    two[136:376, 8:248], two[136:376, 264:504] = small, small  # two photos side by side in one square
    verdict = quality.grade(two)
    assert verdict.reason == "several photos in one" and not verdict.usable, verdict.text
    four = np.zeros((512, 512, 3), np.uint8)
    for y in (8, 264):
        for x in (8, 264):
            four[y : y + 240, x : x + 240] = small
    assert quality.grade(four).reason == "several photos in one"
    assert quality.grade(retina).statistics["retinas"] == 1


def test_four_touching_retinas_are_several_photos_and_one_retina_with_dark_spots_is_not(retina):
    tile = crop_to_fov(retina, 256)  # tightly cropped, as ODIR's photos are: the retinas touch
    touching = np.vstack([np.hstack([tile, tile]), np.hstack([tile, tile])])  # one lit region
    verdict = quality.grade(touching)
    assert verdict.statistics["retinas"] == 1 and verdict.reason == "several photos in one", verdict.text
    assert not verdict.usable and "2 x 2" in verdict.text
    # as for retinas apart, not asked of a retina too dark to read: its centre may be black (real: 1 photo)
    dark = quality.grade((touching * 0.15).astype(np.uint8))
    assert dark.statistics["grid_points_dark"] == 5 and dark.reason == "too dark", dark.text
    # one retina dark where four would meet: at its centre (a dark macula) or at the middles of its sides
    centre, sides = retina.copy(), retina.copy()
    cv2.circle(centre, (256, 256), 40, (0, 0, 0), -1)
    for y, x in ((20, 256), (492, 256), (256, 20), (256, 492)):
        cv2.circle(sides, (x, y), 30, (0, 0, 0), -1)
    for one in (centre, sides):
        verdict = quality.grade(one)
        assert 1 <= verdict.statistics["grid_points_dark"] <= 4 and verdict.reason != "several photos in one"


def test_a_camera_with_a_white_surround_is_a_fundus_camera(retina):
    white = retina.copy()
    white[retina.max(axis=2) <= 20] = 255
    verdict = quality.grade(white)
    assert verdict.reason != "not a fundus photo", verdict.text
    # a white page with something blue or white on it is no such camera
    blue = white.copy()
    blue[retina.max(axis=2) > 20] = blue[retina.max(axis=2) > 20][:, ::-1]  # the retina's colours, red and blue swapped
    assert quality.grade(blue).reason == "not a fundus photo", quality.grade(blue).text
    page = np.full_like(white, 255)
    page[200:260, 100:400] = (40, 40, 40)  # a line of text
    assert quality.grade(page).reason in ("not a fundus photo", "retina not found"), quality.grade(page).text


@pytest.mark.parametrize("side", [2000, 3000])
@pytest.mark.parametrize("quality_", [85, 95])
def test_a_large_photo_saved_at_usual_jpeg_quality_is_not_heavily_compressed(retina, side, quality_):
    # softened and enlarged from 512 px: smoother than a camera's photo, the hardest case for the block
    # check (at 3,000 px and quality 85 its block edges are 2.4 times the others, yet 0.2 gray levels)
    soft = cv2.GaussianBlur(retina, (0, 0), 2)
    big = jpeg(cv2.resize(soft, (side, side), interpolation=cv2.INTER_CUBIC), quality_)
    assert quality.grade(big).reason != "heavily compressed", quality.grade(big).text
    # the check still sees blocks a reader sees: quality 10 at 2,000 px
    small = jpeg(cv2.resize(retina, (2000, 2000), interpolation=cv2.INTER_CUBIC), 10)
    assert quality.grade(small).reason == "heavily compressed", quality.grade(small).text


@pytest.mark.parametrize("name", ["cat", "coffee", "astronaut", "rocket", "brick"])
def test_everyday_photos_are_no_fundus_photos(name):
    verdict = quality.grade(bgr(getattr(skimage_data, name)()))
    assert verdict.reason in ("not a fundus photo", "not a colour fundus photo"), verdict.text


def test_a_photo_cut_into_a_disc_is_caught_by_the_imagenet_check(retina):
    from fundus_ensemble.models.gate import MIN_FUNDUS_MASS, FundusLikeness

    disc = cat_in_a_disc()
    assert quality.grade(disc).gradable, "the image statistics alone let a cat on black pass"
    real, cat_mass, cup = FundusLikeness().mass(
        [crop_to_fov(retina, 224), crop_to_fov(disc, 224), crop_to_fov(bgr(skimage_data.coffee()), 224)]
    )
    assert real >= MIN_FUNDUS_MASS > max(cat_mass, cup), (real, cat_mass, cup)


def painted(family: str, seed: int) -> np.ndarray:
    """A lookalike of ``family`` (data.lookalikes) in a retina's mean colour (BGR, an ODIR median)."""
    from fundus_ensemble.data import lookalikes

    return lookalikes.FAMILIES[family](np.random.default_rng(seed), (45.0, 80.0, 160.0))


def test_painted_retinas_that_pass_every_other_check_are_refused_by_the_retina_head(retina):
    from fundus_ensemble.models.gate import INPUT_SIZE, MIN_FUNDUS_MASS, FundusLikeness

    fakes = [painted(f, seed) for f in ("blurred noise", "optic disc spot", "painted vessels") for seed in range(6)]
    gate = FundusLikeness()
    passing = [a for a, m in zip(fakes, gate.mass([crop_to_fov(a, INPUT_SIZE) for a in fakes])) if m >= MIN_FUNDUS_MASS]
    passing = [a for a in passing if quality.grade(a).gradable]
    assert len(passing) >= 3, "the image checks and the ImageNet check no longer let these through: pick harder ones"
    why = gate.judge([crop_to_fov(a, INPUT_SIZE) for a in [retina, *passing]])
    assert why[0] is None, why[0]  # a real retina, from another camera than the head was fitted on
    assert all(w is not None and w.startswith("no retina's structure") for w in why[1:]), why


def test_the_retina_head_file_is_checked_before_use(tmp_path):
    from fundus_ensemble.errors import FundusError
    from fundus_ensemble.models.gate import HEAD_FILE, RetinaHead

    head = RetinaHead.load()
    arrays = dict(np.load(HEAD_FILE))
    for name, value, said in [
        ("coef", np.full(3, 1.0), "shape"),
        ("threshold", np.array([np.nan]), "NaN or infinite"),
        ("scale", np.zeros_like(head.scale), "not positive"),
    ]:
        np.savez(tmp_path / "head.npz", **{**arrays, name: value})
        with pytest.raises(FundusError, match=said) as caught:
            RetinaHead.load(tmp_path / "head.npz")
        assert str(tmp_path / "head.npz") in str(caught.value)


def test_the_whole_gate_sends_only_gradable_photos_to_the_network_in_one_pass(retina):
    from fundus_ensemble.models.gate import HEAD_CHECK, INPUT_SIZE, gate_images

    class Network:  # refuses every second photo it is shown, and records what it is shown
        calls: list = []

        def refusals(self, squares):
            self.calls.append([s.shape for s in squares])
            return [(HEAD_CHECK, "painted") if i % 2 else None for i in range(len(squares))]

    dark = (retina * 0.07).astype(np.uint8)  # refused by the image checks
    hazy = cv2.GaussianBlur(retina, (0, 0), 3)  # poor: screened, never shown to the network
    flipped = np.ascontiguousarray(retina[:, ::-1])
    network = Network()
    photos = gate_images([retina, dark, hazy, flipped], network)
    assert network.calls == [[(INPUT_SIZE, INPUT_SIZE, 3)] * 2]  # the two gradable photos, one pass
    assert [p.status for p in photos] == ["gradable", "refused", "poor", "refused"]
    assert [p.check for p in photos] == [None, "image", None, HEAD_CHECK]
    assert photos[1].text.startswith("too dark (") and photos[2].text.startswith("blurred (")
    assert photos[3].text == "not a fundus photo (painted)" and photos[0].text is None
    assert all(p.square is None for p in photos)  # the crops are let go
    assert gate_images([dark, hazy], network) and len(network.calls) == 1  # nothing gradable: no pass


@pytest.mark.backend
def test_predict_refuses_an_ungradable_eye_and_says_retake(retina, tmp_path):
    from fundus_ensemble.inference.predict import PatientPhotos, predict_photos
    from fundus_ensemble.models import build_patient_model

    run = tmp_path / "run"
    (run / "color").mkdir(parents=True)
    build_patient_model("mobilenet", 32, None, 0.5).save(str(run / "color" / "model.keras"))
    (run / "color" / "card.json").write_text(json.dumps({"view": "color", "labels": list(LABELS), "input_size": 32}))
    cv2.imwrite(str(tmp_path / "eye.png"), retina)
    cv2.imwrite(str(tmp_path / "dark.png"), (retina * 0.07).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "cat.png"), cat_in_a_disc())  # only the ImageNet check refuses it
    cv2.imwrite(str(tmp_path / "hazy.png"), cv2.GaussianBlur(retina, (0, 0), 3))
    cv2.imwrite(str(tmp_path / "painted.png"), painted("blurred noise", 1))  # only the retina head refuses it
    patients = [
        PatientPhotos("one-bad", tmp_path / "cat.png", tmp_path / "eye.png"),
        PatientPhotos("all-bad", tmp_path / "dark.png", tmp_path / "cat.png"),
        PatientPhotos("good", tmp_path / "eye.png", None),
        PatientPhotos("hazy", tmp_path / "hazy.png", tmp_path / "eye.png"),
        PatientPhotos("painted", tmp_path / "painted.png", tmp_path / "eye.png"),
    ]
    summary = predict_photos(run, patients, tmp_path / "out", progress=False, gate=True)
    assert (summary["predicted"], summary["rejected"]) == (4, 1)
    rows = {}
    for r in csv.DictReader(open(tmp_path / "out" / "decisions.csv")):
        rows.setdefault(r["patient_id"], r)
    assert rows["one-bad"]["referral"].startswith("Not gradable: retake the left eye (left: not a fundus photo")
    assert rows["all-bad"]["status"] == "rejected"
    assert rows["all-bad"]["referral"].startswith(
        "Not gradable: retake the left eye and the right eye (left: too dark ("
    )
    assert not rows["good"]["referral"].startswith("Not gradable")
    assert rows["painted"]["referral"].startswith(
        "Not gradable: retake the left eye (left: not a fundus photo (no retina's structure: a head fitted on"
    ), rows["painted"]["referral"]
    # a blurred photo is screened (a cloudy lens blurs too): decided on, never cleared, told what to do
    hazy = rows["hazy"]
    assert hazy["status"] == "ok" and hazy["photo_quality"].startswith("left: blurred (sharpness"), hazy
    assert "the left photo is blurred" in hazy["referral"] and not hazy["referral"].startswith("No referable")
    # the worklist: one row per patient, the same referral, each eye's photo in its own column
    worklist = {r["patient_id"]: r for r in csv.DictReader(open(tmp_path / "out" / "worklist.csv"))}
    assert list(worklist) == ["one-bad", "all-bad", "good", "hazy", "painted"]
    assert all(worklist[p]["referral"] == rows[p]["referral"] for p in worklist)
    photos = {p: (w["eyes_screened"], w["left_photo"][:22], w["right_photo"][:22]) for p, w in worklist.items()}
    assert photos == {
        "one-bad": ("right", "refused: not a fundus ", "screened"),
        "all-bad": ("", "refused: too dark (its", "refused: not a fundus "),
        "good": ("left", "screened", "not given"),
        "hazy": ("left right", "screened, hard to read", "screened"),
        "painted": ("right", "refused: not a fundus ", "screened"),
    }, photos
    assert worklist["all-bad"]["referral_kind"] == "not_gradable" and worklist["all-bad"]["classes_decided"] == ""
    decided = {
        p: " ".join(
            r["class"]
            for r in csv.DictReader(open(tmp_path / "out" / "decisions.csv"))
            if r["patient_id"] == p and r["decision"] == "1"
        )
        for p in ("good", "hazy")
    }
    assert {p: worklist[p]["classes_decided"] for p in decided} == decided
    assert summary["counts"] == {
        k: sum(w["referral_kind"] == k for w in worklist.values())
        for k in ("refer", "no_referable_finding", "inconclusive", "not_gradable")
    }
    assert summary["counts"]["not_gradable"] >= 2
    # off, the same photos are all decided on
    summary = predict_photos(run, patients, tmp_path / "off", progress=False, gate=False)
    assert (summary["predicted"], summary["rejected"]) == (5, 0)
