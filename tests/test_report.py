"""The HTML reports: self-contained (nothing fetched from outside), every image decodes, and
each part the reader needs is there (issue 8, part 3). The page's look is checked by rendering
it in headless Chromium: scripts/screenshot.py."""

import base64
import csv
import html
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.data.synthetic import EyeSpec, render_eye
from fundus_ensemble.evaluation.ensemble import score_run
from fundus_ensemble.inference.predict import PatientPhotos, predict_photos
from fundus_ensemble.inference.report import write_score_report
from fundus_ensemble.labels import LABELS

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.references, self.images, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action"):
                self.references.append((tag, name, value or ""))
                if tag == "img" and name == "src":
                    self.images.append(value or "")


def check_self_contained(page: str) -> list[np.ndarray]:
    """Fail on anything the page would fetch; return its inlined images, decoded."""
    parser = _Collector()
    parser.feed(page)
    outside = [r for r in parser.references if not r[2].startswith("data:")]
    assert not outside, f"references outside the file: {outside[:3]}"
    assert "script" not in parser.tags and "link" not in parser.tags and "iframe" not in parser.tags
    assert "url(" not in page and "@import" not in page
    decoded = []
    for uri in parser.images:
        head, _, payload = uri.partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
        image = cv2.imdecode(np.frombuffer(base64.b64decode(payload, validate=True), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.size > 0, "an inlined image does not decode"
        decoded.append(image)
    return decoded


def test_the_checker_catches_an_outside_reference_and_a_broken_image():
    with pytest.raises(AssertionError, match="outside"):
        check_self_contained('<img src="https://example.org/x.png">')
    with pytest.raises(AssertionError, match="does not decode"):
        check_self_contained('<img src="data:image/png;base64,' + base64.b64encode(b"not a png").decode() + '">')


@pytest.fixture(scope="module")
def scored(small_dataset, tmp_path_factory):
    """An untrained color model at 32 px, scored on the small dataset's test split: the report's plumbing."""
    from fundus_ensemble.models import build_patient_model

    root = tmp_path_factory.mktemp("report")
    preprocess_manifest(load_manifest(small_dataset), root / "prep", size=32, workers=1, progress=False)
    (root / "run" / "color").mkdir(parents=True)
    build_patient_model("mobilenet", 32, None, 0.5).save(str(root / "run" / "color" / "model.keras"))
    (root / "run" / "color" / "card.json").write_text(
        json.dumps({"view": "color", "labels": list(LABELS), "input_size": 32})
    )
    with open(root / "run" / "color" / "history.csv", "w") as handle:
        handle.write("epoch,phase,loss,val_loss,val_final_score\n1,train,0.9,0.95,0.5\n2,fine_tune,0.8,0.9,0.55\n")
    score_run(root / "run", root / "prep", split="test")
    return root


def test_score_report_is_self_contained_and_complete(scored):
    out = write_score_report(scored / "run", scored / "prep", scored / "run" / "score_test", gallery=2)
    page = out.read_text()
    images = check_self_contained(page)
    for part in (
        "Scores",
        "all-zero",
        "class prior (train)",
        "ROC",
        "precision-recall",
        "Reliability",
        "Decisions at threshold",
        "Training curves",
        "Gallery",
        "false positives",
    ):
        assert part in page, part
    assert len(images) >= 5 + 4  # four plots, at least one gallery case (two eyes and their heatmaps)
    assert all(min(i.shape[:2]) >= 100 for i in images), "an image too small to read"


def test_prediction_report_has_a_card_per_patient(scored, tmp_path):
    good = tmp_path / "in" / "a_left.jpg"
    good.parent.mkdir()
    cv2.imwrite(str(good), render_eye(EyeSpec(frozenset({"D"}), "left", 1), 90))
    cv2.imwrite(str(tmp_path / "in" / "a_right.jpg"), render_eye(EyeSpec(frozenset(), "right", 2), 90))
    (tmp_path / "in" / "bad_left.jpg").write_bytes(b"broken")
    patients = [
        PatientPhotos("a", good, tmp_path / "in" / "a_right.jpg"),
        PatientPhotos("bad", tmp_path / "in" / "bad_left.jpg", None),
    ]
    summary = predict_photos(
        scored / "run", patients, tmp_path / "out", progress=False, report=True, explain_classes=["D", "G"]
    )
    assert summary["heatmaps"] == 4  # two eyes x two classes
    page = (tmp_path / "out" / "report.html").read_text()
    images = check_self_contained(page)
    assert len(images) == 2 + 4, "both eyes and their D and G heatmaps"
    assert "<b>bad</b>" in page and "rejected: no photo could be used" in page and "not a readable image" in page
    # each card starts with what to do, in words: the photo of the bad patient must be taken again
    bad = page[page.index('data-patient="bad"') :]
    assert bad.index('data-referral="not_gradable"') < bad.index("rejected")
    assert "Not gradable: retake the left eye (left: not a readable image" in bad
    assert f"from <code>{(tmp_path / 'in').resolve()}</code>" in page and "Made 20" in page
    # the PDF to file: a first page with the job, then a page per patient, rendered from the same
    # template: each record's words and decisions as the page shows them, in a font with its glyphs
    printed = (tmp_path / "out" / "report.pdf").read_bytes()
    assert pdf_pages(printed) == 1 + len(patients)
    assert b"DejaVuSans" in printed
    first, a_page, bad_page = pdf_text(printed)
    assert "predicted, 1 rejected" in first and "A screening aid, not a diagnosis." in first
    cells = re.findall(r'<td class="(?:pos)?" data-class="\w"[^>]*>([^<]+)</td>', page)
    assert len(cells) == len(LABELS)
    for cell in cells:
        assert " ".join(html.unescape(cell).split()) in a_page, cell
    assert "Not gradable: retake the left eye (left: not a readable image" in bad_page
    # and a record per patient to file in its chart: the job's page and that patient's page
    records = tmp_path / "out" / "records"
    assert sorted(p.name for p in records.glob("*.pdf")) == ["record-a.pdf", "record-bad.pdf"]
    assert all(pdf_pages(p.read_bytes()) == 2 for p in records.glob("*.pdf"))
    assert (records / "record-a.pdf").read_bytes() != (records / "record-bad.pdf").read_bytes()
    with open(tmp_path / "out" / "heatmaps" / "heatmaps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["eye"], r["class"]) for r in rows} == {("left", "D"), ("left", "G"), ("right", "D"), ("right", "G")}
    for row in rows:
        heat = np.load(tmp_path / "out" / "heatmaps" / row["array"])
        assert heat.shape == (32, 32) and 0 <= heat.min() and heat.max() <= 1
        assert cv2.imread(str(tmp_path / "out" / "heatmaps" / row["overlay"])).shape == (256, 256, 3)
    # a later run without the report leaves no record of this one behind
    predict_photos(scored / "run", patients[:1], tmp_path / "out", progress=False, force=True)
    assert not records.exists() and not (tmp_path / "out" / "report.pdf").exists()


def pdf_text(data: bytes) -> list[str]:
    """Each page's words, one space apart (pypdf comes with xhtml2pdf)."""
    from pypdf import PdfReader

    return [" ".join(page.extract_text().split()) for page in PdfReader(io.BytesIO(data)).pages]


def pdf_pages(data: bytes) -> int:
    """Pages of a PDF: its page objects (``/Type /Page``, not the ``/Pages`` tree)."""
    return len(re.findall(rb"/Type\s*/Page(?![a-z])", data))


def test_the_report_prints_a_patient_per_page_in_a_real_browser(scored, tmp_path):
    import base64

    from conftest import headless_chromium

    photos = tmp_path / "in"
    photos.mkdir()
    for i in range(3):
        for eye, seed in (("left", 2 * i), ("right", 2 * i + 1)):
            cv2.imwrite(str(photos / f"p{i}_{eye}.jpg"), render_eye(EyeSpec(frozenset(), eye, seed), 90))
    long_note = tmp_path / "in" / ("x" * 180 + "_left.jpg")  # a rejected patient whose line is long
    long_note.write_bytes(b"broken")
    patients = [PatientPhotos(f"p{i}", photos / f"p{i}_left.jpg", photos / f"p{i}_right.jpg") for i in range(3)]
    patients.append(PatientPhotos("x" * 180, long_note, None))
    predict_photos(scored / "run", patients, tmp_path / "out", progress=False, report=True, explain_classes=["D"])
    driver = headless_chromium(tmp_path)
    try:
        driver.get((tmp_path / "out" / "report.html").resolve().as_uri())
        # on screen, no record runs out of the page (a long rejected line wraps inside its card)
        widths = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth,"
            " Math.max(...[...document.querySelectorAll('.record')].map(e => e.scrollWidth - e.clientWidth))];"
        )
        assert widths[0] <= widths[1] and widths[2] <= 0, widths
        printed = base64.b64decode(driver.print_page())
    finally:
        driver.quit()
    assert pdf_pages(printed) == 1 + len(patients), "the job's page, then each patient on a page of its own"


def test_report_script_needs_a_score_first(scored, tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "report.py"
    result = subprocess.run(
        [sys.executable, str(script), str(scored / "run"), str(scored / "prep"), "--split", "val"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "no score.json; run scripts/score.py" in result.stderr


def test_a_record_embeds_the_model_cards_summary_and_links_no_local_file():
    from fundus_ensemble.inference.bundle import PACKAGED, card_summary
    from fundus_ensemble.inference.report import prediction_context, render

    def model_part(provenance):
        page = render("prediction.html", "t", p=prediction_context([], "", summary, provenance))
        return page[page.index("<h2>Model</h2>") :]

    text = (PACKAGED / "MODEL_CARD.md").read_text()
    provenance = {
        "run": "/home/someone/.cache/fundus-ensemble/bundled",
        "calibrated": True,
        "models": {"color": {"backbone": "efficientnet_lite2", "input_size": 380}},
        "model_card": "/home/someone/.cache/fundus-ensemble/bundled/MODEL_CARD.md",
        "model_card_summary": card_summary(text),
    }
    summary = {"patients": 0, "predicted": 0, "rejected": 0}
    model = model_part(provenance)
    assert "<h4>Intended use</h4>" in model and "<h4>Known failure modes</h4>" in model
    assert "Training data" not in model  # the summary, not the whole card
    assert "href" not in model and "file://" not in model, "a mailed page must not point into this machine"
    provenance["model_card_url"] = "/model-card"  # the station's route: a link that works where the page is seen
    assert 'class="model-card" href="/model-card"' in model_part(provenance)
