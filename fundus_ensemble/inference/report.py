"""One self-contained HTML page a person reads: a scored split, or predictions on new photos.

Every image is inlined as a ``data:`` URI and there is no script or stylesheet from elsewhere,
so the file opens anywhere, offline, and can be mailed as it is. Plots use matplotlib's
``Agg`` backend (no display needed).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np

from ..data.batches import ImageStore
from ..data.manifest import load_manifest
from ..errors import FundusError
from ..evaluation.ensemble import load_view_model, run_views
from ..fileio import atomic_write_text
from ..labels import LABEL_NAMES, LABELS
from .explain import GradCam, ensemble_heatmaps, overlay
from .referral import counts_text

THRESHOLD = 0.5
THUMB = 160  # px a side for the eyes in galleries and cards
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 12px}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.trivial td{color:#777;font-style:italic}
img{max-width:100%%}.note{color:#555;font-size:0.9em;max-width:900px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.case{border:1px solid #ddd;padding:6px;font-size:0.8em;width:fit-content;max-width:100%%;box-sizing:border-box;overflow-wrap:anywhere}
.case img{width:%dpx;height:auto;max-width:none;margin-right:2px}.pos{color:#b00;font-weight:bold}
.card{width:auto;margin-bottom:10px}.photos{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;text-align:center}
@media print{body{margin:0;max-width:none;padding:0;font-size:10pt}.record{break-before:page;break-inside:avoid;border:none}
h2{break-after:avoid}a{color:inherit;text-decoration:none}.noprint,form{display:none}
.record .photos img{width:1.1in!important;height:auto}.record figcaption{font-size:7pt}}
""" % (THUMB,)  # noqa: UP031 (a CSS sheet full of braces: %-formatting keeps them unescaped)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _png_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return _png_uri(buffer.getvalue())


def _image_uri(bgr: np.ndarray) -> str:
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise FundusError("could not encode an image for the report")
    return _png_uri(data.tobytes(), "image/jpeg")


def _img(uri: str, alt: str, extra: str = "") -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}" {extra}>'


def page(title: str, sections: list[str], head: str = "") -> str:
    """A whole self-contained page: the project's style, ``head`` (more ``<head>`` markup), the sections."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>{head}</head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


# --- a model card, as HTML --------------------------------------------------------------------


def _inline(text: str) -> str:
    """Escaped text with the card's inline Markdown: **bold** and `code`."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def markdown_html(text: str) -> str:
    """The Markdown of a model card as HTML: headings, paragraphs, ``-`` lists and pipe tables, every
    character escaped first (a crafted card's HTML is shown as text, never run)."""
    blocks: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif heading := re.match(r"(#{1,4})\s+(.*)", line):
            level = min(len(heading[1]) + 1, 5)  # the page's own title is the h1
            blocks.append(f"<h{level}>{_inline(heading[2])}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                    tag = "th" if not rows else "td"
                    rows.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
                i += 1
            blocks.append(f"<table>{''.join(rows)}</table>")
        elif line.lstrip().startswith("- "):
            items = []
            while i < len(lines) and lines[i].lstrip().startswith("- "):
                items.append(f"<li>{_inline(lines[i].lstrip()[2:])}</li>")
                i += 1
            blocks.append(f"<ul>{''.join(items)}</ul>")
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not re.match(r"#{1,4}\s|\s*[|]|\s*- ", lines[i]):
                paragraph.append(lines[i].strip())
                i += 1
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(blocks)


# --- a scored split ---------------------------------------------------------------------------


def _score_table(report: dict) -> str:
    head = (
        "<tr><th>model</th><th>kappa</th><th>F1</th><th>AUC</th><th>final</th>"
        + "".join(f"<th>AUC {c}</th>" for c in LABELS)
        + "</tr>"
    )
    rows = []
    entries = [(name, s, "") for name, s in report["models"].items()] + [("ensemble", report["ensemble"], "")]
    entries += [(name, s, "trivial") for name, s in report.get("trivial", {}).items()]
    for name, s, kind in entries:
        per_class = s.get("per_class", {})
        aucs = "".join(
            f"<td>{'n/a' if per_class.get(c, {}).get('auc') is None else format(per_class[c]['auc'], '.3f')}</td>"
            for c in LABELS
        )
        bold = ("<b>", "</b>") if name == "ensemble" else ("", "")
        rows.append(
            f'<tr class="{kind}"><td>{bold[0]}{html.escape(name)}{bold[1]}</td>'
            + "".join(f"<td>{s[k]:.4f}</td>" for k in ("kappa", "f1", "auc", "final"))
            + aucs
            + "</tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def roc_figure(y_true: np.ndarray, y_prob: np.ndarray, points: dict[str, np.ndarray] | None = None) -> str:
    """Per-class ROC curves, each with the operating points ``points`` (name: raw thresholds, per
    class or per patient and class) marked where they sit; NaN labels are unknown and left out. A
    class with fewer than MIN_FOR_AUC positives or negatives gets no curve, and says so."""
    from sklearn.metrics import auc, roc_curve

    from ..evaluation.partial import MIN_FOR_AUC, operating_rates

    plt = _plt()
    y_true, y_prob = np.asarray(y_true, float), np.asarray(y_prob, float)
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.6))
    markers = ("o", "s", "^", "D")
    for j, (ax, c) in enumerate(zip(axes.ravel(), LABELS)):
        known = ~np.isnan(y_true[:, j])
        truth, p = y_true[known, j].astype(bool), y_prob[known, j]
        positives, negatives = int(truth.sum()), int((~truth).sum())
        ax.set_title(f"{c} {LABEL_NAMES[c]} ({positives} pos., {negatives} neg.)", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.tick_params(labelsize=7)
        if positives < MIN_FOR_AUC or negatives < MIN_FOR_AUC:
            ax.text(
                0.5,
                0.5,
                f"too few for a curve\n(needs {MIN_FOR_AUC} positives\nand {MIN_FOR_AUC} negatives)",
                ha="center",
                va="center",
                fontsize=8,
            )
            continue
        fpr, tpr, _ = roc_curve(truth, p)
        ax.plot(fpr, tpr, color="C0", lw=1.2)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.text(0.97, 0.05, f"AUC {auc(fpr, tpr):.3f}", ha="right", fontsize=8)
        for k, (name, thresholds) in enumerate((points or {}).items()):
            t = np.asarray(thresholds, float)
            t = t[known, j] if t.ndim == 2 else t[j]
            sensitivity, specificity = operating_rates(truth, p, t)
            ax.plot([1 - specificity], [sensitivity], markers[k % len(markers)], color=f"C{k + 1}", ms=6, label=name)
        if points and j == 0:
            ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 0.12))
    fig.tight_layout()
    return _figure_uri(fig)


def _curves(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[str, str]:
    """ROC curves with the decisions at THRESHOLD marked, and precision-recall curves."""
    plt = _plt()
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.4))
    for j, (ax, c) in enumerate(zip(axes.ravel(), LABELS)):
        positives = int(y_true[:, j].sum())
        ax.set_title(f"{c} {LABEL_NAMES[c]} ({positives} pos.)", fontsize=10)
        if positives in (0, len(y_true)):
            ax.text(0.5, 0.5, "undefined:\nno positives or\nno negatives", ha="center", va="center")
        else:
            recall, precision = pr_points(y_true[:, j], y_prob[:, j])
            ax.plot(recall, precision, color="C1", drawstyle="steps-pre")
            ax.axhline(positives / len(y_true), color="0.7", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    roc = roc_figure(y_true, y_prob, {f"decided (p > {THRESHOLD})": np.full(len(LABELS), THRESHOLD)})
    return roc, _figure_uri(fig)


def pr_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of each threshold, from the highest recall down; the points at recall 0
    are left out: there no positive is found yet and precision says nothing (scikit-learn adds
    (0, 1) by convention, and a top-ranked negative gives (0, 0))."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(y, p)
    keep = recall > 0
    return recall[keep], precision[keep]


def _reliability(y_true: np.ndarray, y_prob: np.ndarray, bins: int = 10) -> str:
    plt = _plt()
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(y_prob.ravel(), edges[1:-1]), 0, bins - 1)
    truth = y_true.ravel()
    count = np.bincount(index, minlength=bins)
    mean_p = np.bincount(index, y_prob.ravel(), bins) / np.maximum(count, 1)
    rate = np.bincount(index, truth, bins) / np.maximum(count, 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 5.5), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8, label="perfect calibration")
    top.plot(mean_p[count > 0], rate[count > 0], "o-", label="ensemble (all classes pooled)")
    top.set_ylabel("observed positive rate")
    top.legend(fontsize=8, loc="upper left")
    bottom.bar((edges[:-1] + edges[1:]) / 2, count, width=0.09, color="0.6")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("patient-classes")
    fig.tight_layout()
    return _figure_uri(fig)


def _confusion(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> str:
    decided = y_prob > threshold
    rows = []
    for j, c in enumerate(LABELS):
        t, d = y_true[:, j].astype(bool), decided[:, j]
        tp, fp, fn, tn = int((t & d).sum()), int((~t & d).sum()), int((t & ~d).sum()), int((~t & ~d).sum())
        sens = f"{tp / (tp + fn):.2f}" if tp + fn else "n/a"
        spec = f"{tn / (tn + fp):.2f}" if tn + fp else "n/a"
        rows.append(
            f"<tr><td>{c} {LABEL_NAMES[c]}</td><td>{tp}</td><td>{fp}</td><td>{fn}</td><td>{tn}</td>"
            f"<td>{sens}</td><td>{spec}</td></tr>"
        )
    return (
        "<table><tr><th>class</th><th>TP</th><th>FP</th><th>FN</th><th>TN</th><th>sensitivity</th>"
        f"<th>specificity</th></tr>{''.join(rows)}</table>"
    )


def _history(run_dir: Path, views: tuple[str, ...]) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for k, view in enumerate(views):
        path = run_dir / view / "history.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        epochs = [int(r["epoch"]) for r in rows]

        def column(name, rows=rows):
            return [float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows]

        axes[0].plot(epochs, column("loss"), color=f"C{k}", label=f"{view} train")
        axes[0].plot(epochs, column("val_loss"), color=f"C{k}", ls="--", label=f"{view} val")
        axes[1].plot(epochs, column("val_final_score"), color=f"C{k}", marker="o", ms=3, label=view)
        fine = [e for e, r in zip(epochs, rows) if r.get("phase") == "fine_tune"]
        if fine:
            for ax in axes:
                ax.axvline(fine[0] - 0.5, color=f"C{k}", lw=1.2, ls=(0, (1, 3)))
        kept = _kept_epoch(run_dir / view)
        if kept in epochs:
            score = column("val_final_score")[epochs.index(kept)]
            axes[1].plot(
                [kept],
                [score],
                marker="*",
                ms=13,
                color=f"C{k}",
                mec="black",
                ls="none",
                label=f"{view}: kept checkpoint (epoch {kept})",
            )
    axes[0].set_title("loss (weighted BCE)")
    axes[1].set_title("validation ODIR final score")
    for ax in axes:
        ax.set_xlabel("epoch (dotted line: fine-tune phase starts)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _figure_uri(fig)


def _kept_epoch(view_dir: Path) -> int | None:
    """The epoch of the checkpoint the run kept (its card's best validation row), if the card says."""
    try:
        return int(json.loads((view_dir / "card.json").read_text())["best_val"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _gallery(
    run_dir: Path,
    prep_dir: Path,
    split: str,
    ids: list[str],
    y_true: np.ndarray,
    y_prob: np.ndarray,
    per_group: int,
    threshold: float,
) -> str:
    """Per class: the most confident true positives, false positives and false negatives, with heatmaps."""
    views = run_views(run_dir)
    manifest = load_manifest(prep_dir / views[0] / "manifest.csv", check_files=False).select(split)
    stores = {
        v: ImageStore(load_manifest(prep_dir / v / "manifest.csv", check_files=False), None, cache=False) for v in views
    }
    models = {v: load_view_model(run_dir, v) for v in views}
    cams = {v: GradCam(m) for v, (m, _) in models.items()}
    size = models[views[0]][1]["input_size"]
    patients = {p.patient_id: p for p in manifest.patients}
    groups = {}
    for j, c in enumerate(LABELS):
        t, p = y_true[:, j].astype(bool), y_prob[:, j]
        groups[c] = {
            "true positives (most confident)": [i for i in np.argsort(-p) if t[i] and p[i] > threshold][:per_group],
            "false positives (most confident)": [i for i in np.argsort(-p) if not t[i] and p[i] > threshold][
                :per_group
            ],
            "false negatives (most missed)": [i for i in np.argsort(p) if t[i] and p[i] <= threshold][:per_group],
        }
    shown = sorted({i for g in groups.values() for chosen in g.values() for i in chosen})
    heat, thumbs = {}, {}
    for first in range(0, len(shown), 16):  # every class's heatmap of a batch of shown patients at once
        batch = shown[first : first + 16]
        eyes = [
            [
                patients[ids[i]].left_image or patients[ids[i]].right_image,
                patients[ids[i]].right_image or patients[ids[i]].left_image,
            ]
            for i in batch
        ]
        same = np.array([left == right for left, right in eyes])
        maps = {}
        for v in views:
            left = np.stack([stores[v](e[0]) for e in eyes])
            right = np.stack([stores[v](e[1]) for e in eyes])
            maps[v] = cams[v].heatmaps(left, right, list(range(len(LABELS))), same_eye=same)[0]
        averaged = ensemble_heatmaps(maps, size)
        shown_view = "color" if "color" in views else views[0]
        for k, i in enumerate(batch):
            heat[i] = averaged[:, k]
            thumbs[i] = [
                cv2.resize(
                    cv2.cvtColor(np.uint8(stores[shown_view](e)), cv2.COLOR_RGB2BGR),
                    (THUMB, THUMB),
                    interpolation=cv2.INTER_CUBIC,
                )
                for e in eyes[k]
            ]
    parts = []
    for j, c in enumerate(LABELS):
        parts.append(f"<h3>{c} {LABEL_NAMES[c]}</h3>")
        for title, chosen in groups[c].items():
            if not chosen:
                parts.append(f"<p class=note>{title}: none</p>")
                continue
            cases = []
            for i in chosen:
                images = []
                for e, eye in enumerate(("left", "right")):
                    images.append(_img(_image_uri(thumbs[i][e]), f"{ids[i]} {eye} eye"))
                    images.append(
                        _img(_image_uri(overlay(thumbs[i][e], heat[i][j, e])), f"{ids[i]} {eye} eye, {c} heatmap")
                    )
                cases.append(
                    f'<div class="case">{"".join(images)}<br>{html.escape(ids[i])}: p({c}) = '
                    f"{probability_text(y_prob[i, j], threshold)} against {threshold}, label {int(y_true[i, j])} "
                    "&middot; left eye, its heatmap, right eye, its heatmap</div>"
                )
            parts.append(f"<p>{title}</p><div class=gallery>{''.join(cases)}</div>")
    return "\n".join(parts)


def write_score_report(
    run_dir: str | os.PathLike,
    prep_dir: str | os.PathLike,
    score_dir: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    gallery: int = 3,
) -> Path:
    """The report of a split scored by ``score.py`` (its ``score.json`` and ``predictions_detail.csv``)."""
    run, prep, score = Path(run_dir), Path(prep_dir), Path(score_dir)
    if not (score / "score.json").is_file():
        raise FundusError(
            f"{score / 'score.json'} not found; score the split first (scripts/score.py, or --report there)"
        )
    report = json.loads((score / "score.json").read_text())
    with open(score / "predictions_detail.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    ids = [r["ID"] for r in rows]
    y_prob = np.array([[float(r[f"ensemble_{c}"]) for c in LABELS] for r in rows]).reshape(-1, len(LABELS))
    y_true = np.array([[int(r[f"label_{c}"]) for c in LABELS] for r in rows]).reshape(-1, len(LABELS))
    views = tuple(report["models"])
    roc, pr = _curves(y_true, y_prob)
    calibrated = f", calibrated on {report['calibrated_on']}" if report.get("calibrated_on") else ""
    sections = [
        f"<p class=note>Split <b>{html.escape(report['split'])}</b>: {report['patients']} patients; run "
        f"<code>{html.escape(str(run))}</code>; ensemble of {', '.join(views)}{calibrated}"
        f"{', flip TTA' if report.get('flip_tta') else ''}. Probabilities are the ensemble's unless a row says otherwise.</p>",
        "<h2>Scores</h2><p class=note>ODIR final = (kappa + F1 + AUC) / 3, F1 and AUC pooled over all patient-classes. "
        "The grey rows never look at a photo: all-zero predicts no finding, the class prior predicts each class's "
        "training rate. Pooled F1 and AUC are high even for them, so read a model by its margin over these rows.</p>",
        _score_table(report),
        f"<h2>Per-class ROC curves</h2><p class=note>Marked: where the decisions in use sit (probability above "
        f"{THRESHOLD}{', after the calibration' if report.get('calibrated_on') else ''}).</p>"
        f"{_img(roc, 'per-class ROC curves')}",
        f"<h2>Per-class precision-recall curves</h2><p class=note>Dashed: the class's prevalence (a blind predictor).</p>"
        f"{_img(pr, 'per-class precision-recall curves')}",
        f"<h2>Reliability</h2><p class=note>Do the probabilities mean what they say? Points on the diagonal: among "
        f"patient-classes predicted p, a fraction p is positive.</p>{_img(_reliability(y_true, y_prob), 'reliability diagram')}",
        f"<h2>Decisions at threshold {THRESHOLD}</h2>{_confusion(y_true, y_prob, THRESHOLD)}",
        _training_section(run, views),
    ]
    if gallery > 0:
        sections.append(
            "<h2>Gallery</h2><p class=note>Per class, the most confident true positives, false positives "
            "and false negatives, each eye beside its Grad-CAM heatmap for that class (averaged over the "
            "view models, red = most evidence).</p>"
        )
        sections.append(_gallery(run, prep, report["split"], ids, y_true, y_prob, gallery, THRESHOLD))
    out = Path(out_path) if out_path is not None else score / "report.html"
    atomic_write_text(out, page(f"fundus-ensemble report: {report['split']} split", sections))
    return out


# --- a partly labelled table (evaluate.py) -----------------------------------------------------


def write_evaluation_page(
    out_path: str | os.PathLike,
    result: dict,
    y: np.ndarray,
    probs: np.ndarray,
    points: dict[str, np.ndarray],
) -> Path:
    """``evaluate.py``'s page: the per-class table of ``result`` and ROC curves of the labelled cells
    (``y`` NaN where unknown, ``probs`` the raw probabilities) with ``points`` marked (name: raw
    thresholds per patient and class; the first is the one in use) and their rates in a table
    (``result["operating_points"]``, :func:`..evaluation.partial.rates_at_points`)."""
    from ..evaluation.partial import MIN_FOR_AUC, auc_text
    from ..evaluation.partial import percent_text as pct

    rows = []
    for c, s in result["classes"].items():
        auc = html.escape(auc_text(s))
        rows.append(
            f"<tr><td>{c} {html.escape(LABEL_NAMES[c])}</td><td>{s['labelled']}</td><td>{s['positives']}</td>"
            f"<td>{auc}</td><td>{s['threshold']:.3f}</td><td>{pct(s['sensitivity'], s['sensitivity_95'])}</td>"
            f"<td>{pct(s['specificity'], s['specificity_95'])}</td></tr>"
        )
    table = (
        "<table><tr><th>class</th><th>labelled</th><th>positives</th><th>AUC [95 %]</th><th>threshold</th>"
        f"<th>sensitivity [95 %]</th><th>specificity [95 %]</th></tr>{''.join(rows)}</table>"
    )
    names = list(points)
    head = "".join(f"<th>{html.escape(name)}: sensitivity</th><th>specificity</th>" for name in names)
    point_rows = []
    for c in result["classes"]:
        cells = "".join(
            f"<td>{pct(rates.get('sensitivity'))}</td><td>{pct(rates.get('specificity'))}</td>"
            for rates in (result["operating_points"][name].get(c, {}) for name in names)
        )
        point_rows.append(f"<tr><td>{c} {html.escape(LABEL_NAMES[c])}</td>{cells}</tr>")
    sections = [
        f"<p class=note>Table <code>{html.escape(result['table'])}</code>: {result['patients']} patients scored "
        f"({result['rejected']} rejected by predict; {result.get('one_eye', 0)} answered from one eye, at the "
        f"one-eye thresholds); thresholds in use: {html.escape(result['thresholds_from'])}. Only labelled cells "
        "count: an empty cell is unknown. The ODIR final score needs every class labelled and is not given.</p>",
        "<h2>Per class</h2>",
        table,
        f"<h2>ROC curves and operating points</h2><p class=note>Each labelled class with at least {MIN_FOR_AUC} "
        "positives and negatives; marked, where each set of thresholds sits on this table's patients.</p>",
        _img(roc_figure(y, probs, points), "per-class ROC curves with operating points"),
        f"<table><tr><th>class</th>{head}</tr>{''.join(point_rows)}</table>",
    ]
    out = Path(out_path)
    atomic_write_text(out, page("fundus-ensemble evaluation", sections))
    return out


# --- predictions on new photos ------------------------------------------------------------------


def probability_text(p: float, other: float) -> str:
    """``p`` with three decimals, or as many more (up to six) as it takes to differ from ``other``:
    a page must never show "0.500" for a probability and the threshold it was decided against."""
    digits = 3
    while digits < 6 and round(p, digits) == round(other, digits):
        digits += 1
    return f"{p:.{digits}f}"


def _provenance(provenance: dict) -> str:
    """Which model made the page's numbers: the run, and per view model its backbone, input size,
    initial weights, training data and best validation score."""
    rows = []
    for view, card in provenance["models"].items():
        best = card.get("best_val") or {}
        score = best.get("val_final_score")
        out_of_fold = bool(best.get("out_of_fold"))  # a cross-fitted run learned on train and val, scored out of fold
        when = "out of fold" if out_of_fold else f"epoch {best.get('epoch', '?')}"
        shown = "n/a" if score is None else f"{score:.3f} ({when})"
        patients = f"{card.get('train_patients', '?')} patients"
        if out_of_fold and isinstance(card.get("train_patients"), int) and isinstance(card.get("val_patients"), int):
            patients = f"{card['train_patients'] + card['val_patients']} patients, cross-fitted"
        rows.append(
            f"<tr><td>{html.escape(view)}</td><td>{html.escape(str(card.get('backbone', '?')))}</td>"
            f"<td>{html.escape(str(card.get('input_size', '?')))} px</td>"
            f"<td>{html.escape(str(card.get('weights_init') or 'none (from scratch)'))}</td>"
            f"<td>{html.escape(patients)}"
            + (f" of <code>{html.escape(str(card['data_manifest']))}</code>" if card.get("data_manifest") else "")
            + f"</td><td>{shown}</td></tr>"
        )
    run = f"Run <code>{html.escape(provenance['run'])}</code>; the" if provenance.get("run") else "The"
    where, url = provenance.get("model_card"), provenance.get("model_card_url")
    card = ""
    if url:  # the station's own route: a link that works wherever its page is seen
        card = (
            f' <a class="model-card" href="{html.escape(url)}">Its model card</a>: intended use, '
            "the data it learned from, how well it did on patients it never saw, its known failure modes."
        )
    elif where:  # a file on this machine: a link would break once the page is mailed, so name it
        card = (
            f" Its model card, <code>{html.escape(Path(where).name)}</code> in the model's folder (printed by "
            "<code>predict.py --model-card</code>), says how well it did on patients it never saw; its use and "
            "failure modes are below."
        )
    summary = provenance.get("model_card_summary")
    embedded = f'<div class="card-summary">{markdown_html(summary)}</div>' if summary else ""
    return (
        f"<h2>Model</h2><p class=note>{run} ensemble averages "
        f"its view models{' and applies its calibration' if provenance.get('calibrated') else ''}.{card}</p>"
        "<table><tr><th>view</th><th>backbone</th><th>input</th><th>initial weights</th><th>trained on</th>"
        f"<th>validation final</th></tr>{''.join(rows)}</table>{embedded}"
    )


def _training_section(run: Path, views) -> str:
    """Training curves of epoch-trained view models; a cross-fitted run has no epochs: its out-of-fold
    scores instead."""
    if any((run / v / "history.csv").is_file() for v in views):
        return f"<h2>Training curves</h2>{_img(_history(run, views), 'training curves')}"
    rows = []
    for view in views:
        card = json.loads((run / view / "card.json").read_text())
        head = card.get("head") or {}
        scores = head.get("out_of_fold") or {}
        if scores:
            rows.append(
                f"<tr><td>{html.escape(view)}</td><td>{head.get('folds', '?')}</td><td>{head.get('C', '?')}</td>"
                + "".join(f"<td>{scores[k]:.3f}</td>" for k in ("kappa", "f1", "auc", "final"))
                + "</tr>"
            )
    if not rows:
        return ""
    return (
        "<h2>Cross-fitted heads</h2><p class=note>No epochs: each view's logistic heads were fitted on folds of every "
        "train and val patient; each patient's score below comes from the heads that did not see it.</p>"
        "<table><tr><th>view</th><th>folds</th><th>C</th><th>kappa</th><th>F1</th><th>AUC</th><th>final</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _counts_line(counts: dict | None) -> str:
    """The worklist's counts, as predict.py prints them (empty without counts)."""
    if not counts:
        return ""
    return f" <span class=counts>Referral: {counts_text(counts)}.</span>"


def write_prediction_report(
    cards: list[dict], out_path: str | os.PathLike, source: str, summary: dict, provenance: dict | None = None
) -> Path:
    """One card per patient: both eyes, the heatmaps of the explained classes, and the decisions.

    ``cards`` items hold ``patient_id``, ``status``, ``note``, ``eyes`` ({eye: BGR photo}),
    ``heatmaps`` ({(eye, class): [0, 1] array}), ``probability``, ``threshold`` and ``decision``
    (per class lists, absent for a rejected patient).
    """
    out = Path(out_path)
    atomic_write_text(
        out, page("fundus-ensemble: predictions", prediction_sections(cards, source, summary, provenance))
    )
    return out


REFERRAL_COLOURS = {"refer": "#b00", "not_gradable": "#a60", "inconclusive": "#a60"}  # others: "#070"
A4 = (8.27, 11.69)  # inches, portrait


def write_prediction_pdf(
    cards: list[dict], out_path: str | os.PathLike, source: str, summary: dict, provenance: dict | None = None
) -> Path:
    """The same records as :func:`write_prediction_report` as a PDF to print or file, drawn with
    matplotlib (no browser needed): a first page with the job, the counts and the model card's
    summary, then one A4 page per patient (its referral line, its eyes and heatmaps, each class's
    probability against its threshold)."""
    from matplotlib.backends.backend_pdf import PdfPages

    plt = _plt()
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.tmp")
    model = provenance.get("run") if provenance else None
    made = " ".join(
        x
        for x in (
            f"Made {summary['made']}" if summary.get("made") else "",
            f"from {summary['input']}" if summary.get("input") else "",
            f"by the model {model}" if model else "",
        )
        if x
    )
    with PdfPages(tmp, metadata={"Title": "fundus-ensemble screening record", "Creator": "fundus-ensemble"}) as pdf:
        fig = plt.figure(figsize=A4)
        fig.text(0.07, 0.96, "fundus-ensemble screening record", fontsize=15, weight="bold", va="top")
        lines = [
            made,
            f"{summary['predicted']} of {summary['patients']} patients predicted, {summary['rejected']} rejected.",
            f"Referral: {counts_text(summary['counts'])}." if summary.get("counts") else "",
            f"Thresholds: {source}.",
            "",
            "A screening aid, not a diagnosis.",
            "",
            *_wrapped(re.sub(r"[*`#]", "", (provenance or {}).get("model_card_summary") or ""), 95),
        ]
        fig.text(0.07, 0.925, "\n".join(lines), va="top", fontsize=8.5)
        pdf.savefig(fig)
        plt.close(fig)
        for card in cards:
            fig = plt.figure(figsize=A4)
            fig.text(0.07, 0.96, f"Patient {card['patient_id']}", fontsize=15, weight="bold", va="top")
            fig.text(0.07, 0.935, made, fontsize=7, color="0.35", va="top")
            referral = card.get("referral")
            y = 0.91
            if referral is not None:
                for line in _wrapped(referral.text, 80):
                    fig.text(
                        0.07,
                        y,
                        line,
                        fontsize=11,
                        weight="bold",
                        va="top",
                        color=REFERRAL_COLOURS.get(referral.kind, "#070"),
                    )
                    y -= 0.02
            for note in (f"Which eye? {card['side_check']}." if card.get("side_check") else "", card.get("note") or ""):
                for line in _wrapped(note, 110):
                    fig.text(0.07, y, line, fontsize=8, va="top", color="#a60" if note.startswith("Which") else "0.3")
                    y -= 0.016
            if card["status"] == "ok":
                images = []
                for eye, photo in card["eyes"].items():
                    images.append((eye, photo))
                    images += [
                        (f"{eye}, {c}", overlay(photo, heat)) for (e, c), heat in card["heatmaps"].items() if e == eye
                    ]
                images = images[:6]
                width = 0.86 / max(3, len(images))
                for k, (caption, bgr) in enumerate(images):
                    ax = fig.add_axes(
                        [0.07 + k * width, y - 0.03 - width * A4[0] / A4[1], width * 0.95, width * A4[0] / A4[1]]
                    )
                    ax.imshow(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                    ax.set_title(caption, fontsize=7)
                    ax.axis("off")
                y -= 0.06 + width * A4[0] / A4[1]
                rows = [
                    [f"{c} {LABEL_NAMES[c]}", probability_text(p, t), probability_text(t, p), "positive" if d else "-"]
                    for c, p, t, d in zip(LABELS, card["probability"], card["threshold"], card["decision"])
                ]
                ax = fig.add_axes([0.07, y - 0.3, 0.86, 0.3])
                ax.axis("off")
                table = ax.table(
                    rows, colLabels=["class", "probability", "threshold", "decided"], loc="upper left", cellLoc="left"
                )
                table.auto_set_font_size(False)
                table.set_fontsize(8.5)
                for (r, _), cell in table.get_celld().items():
                    if r > 0 and rows[r - 1][3] == "positive":
                        cell.set_text_props(color="#b00", weight="bold")
            fig.text(0.07, 0.03, "A screening aid, not a diagnosis.", fontsize=8, weight="bold")
            pdf.savefig(fig)
            plt.close(fig)
    os.replace(tmp, out)
    return out


def _wrapped(text: str, width: int) -> list[str]:
    import textwrap

    return [line for paragraph in text.splitlines() for line in (textwrap.wrap(paragraph, width) or [""])]


def _referral_line(referral) -> str:
    """The patient's referral, first in its card: what to do, in words (:mod:`.referral`)."""
    if referral is None:
        return ""
    colour = REFERRAL_COLOURS.get(referral.kind, "#070")
    return (
        f'<p class="referral" data-referral="{referral.kind}" style="font-size:1.15em;color:{colour};margin:4px 0">'
        f"<b>{html.escape(referral.text)}</b></p>"
    )


def prediction_parts(
    cards: list[dict], source: str, summary: dict, provenance: dict | None = None, thumb: int = THUMB
) -> list[str]:
    """The pieces of a prediction page: ``warning`` (None, or why the run should not screen),
    ``note`` (how decisions are made), ``model`` (its provenance table, or "") and ``cards`` (one per
    patient, its referral line first); :func:`prediction_sections` lays them out for the report,
    the station in its own order.

    Each decision cell carries ``data-class``, ``data-probability`` and ``data-decision``, so a
    program reads the page's decisions as a person does.
    """
    size = next(iter(provenance["models"].values())).get("input_size") if provenance else None
    coarse = (
        f" Each heatmap has about {max(1, size // 32)} x {max(1, size // 32)} cells (the backbone's last feature "
        f"map at {size} px): it shows a region, not a lesion's outline; it is drawn inside the retina only."
        if size
        else ""
    )
    calibrated = (
        "; with a calibration, that probability is the raw ensemble's and the threshold is where the calibrated "
        "one (in predictions.csv) reaches 0.5"
        if provenance and provenance.get("calibrated")
        else ""
    )
    warning = (provenance or {}).get("warning")
    made = ""
    if summary.get("made") or summary.get("input"):
        made = (
            '<p class="note made">'
            + (f"Made {html.escape(summary['made'])}" if summary.get("made") else "")
            + (f" from <code>{html.escape(summary['input'])}</code>" if summary.get("input") else "")
            + ".</p>"
        )
    how = made + (
        f"<p class=note>{summary['predicted']} of {summary['patients']} patients predicted, {summary['rejected']} "
        f"rejected.{_counts_line(summary.get('counts'))} Each class is decided by the ensemble's probability against the class threshold "
        f"({html.escape(source)}); the page shows both{calibrated}. Heatmaps: Grad-CAM of the classes decided positive (or "
        f"those asked for), averaged over the view models, red = most evidence.{coarse} "
        "<b>A screening aid, not a diagnosis.</b></p>"
    )
    parts: list[str] = []
    for card in cards:
        raw_id = card["patient_id"]
        pid = html.escape(raw_id)
        line = _referral_line(card.get("referral"))
        if card["status"] != "ok":
            parts.append(
                f'<div class="case record" data-patient="{pid}"><b>{pid}</b>{line}<span class=note>rejected: no photo could be '
                f"used &middot; {html.escape(card['note'])}</span></div>"
            )
            continue
        images = []
        img_size = f'style="width:{thumb}px"' if thumb != THUMB else ""
        for eye, photo in card["eyes"].items():
            small = cv2.resize(photo, (thumb, thumb), interpolation=cv2.INTER_AREA)
            images.append(
                f"<figure>{_img(_image_uri(small), f'{raw_id} {eye} eye', img_size)}<figcaption>{eye}</figcaption></figure>"
            )
            for (heat_eye, c), heat in card["heatmaps"].items():
                if heat_eye == eye:
                    images.append(
                        f"<figure>{_img(_image_uri(overlay(small, heat)), f'{raw_id} {eye} {c} heatmap', img_size)}"
                        f"<figcaption>{eye}, {c}</figcaption></figure>"
                    )
        decisions = "".join(
            f'<td class="{"pos" if d else ""}" data-class="{c}" data-probability="{p!r}" data-decision="{int(d)}">'
            f"{LABEL_NAMES[c]} {probability_text(p, t)} {'&gt;' if d else '&le;'} {probability_text(t, p)}"
            f"{' &#10003;' if d else ''}</td>"
            for c, p, t, d in zip(LABELS, card["probability"], card["threshold"], card["decision"])
        )
        note = f"<br><span class=note>{html.escape(card['note'])}</span>" if card["note"] else ""
        if card.get("side_check"):
            note = (
                f'<p class="side-check" style="color:#a60;font-weight:bold">Which eye? '
                f"{html.escape(card['side_check'])}.</p>{note}"
            )
        parts.append(
            f'<div class="case card record" data-patient="{pid}"><b>{pid}</b>{line}{note}<div class=photos>{"".join(images)}</div>'
            f"<table><tr><th colspan=8>probability &gt; threshold: decided positive (&#10003;)</th></tr>"
            f"<tr>{decisions}</tr></table></div>"
        )
    return {
        "warning": (
            f'<p class="warning" id="warning" style="color:#b00;font-weight:bold">Warning: {html.escape(warning)}.</p>'
            if warning
            else None
        ),
        "note": how,
        "model": _provenance(provenance) if provenance is not None else "",
        "cards": parts,
    }


def prediction_sections(
    cards: list[dict], source: str, summary: dict, provenance: dict | None = None, thumb: int = THUMB
) -> list[str]:
    """The report page's body (:func:`write_prediction_report`): a warning first when the run should
    not screen, how decisions are made, the model, then one card per patient."""
    p = prediction_parts(cards, source, summary, provenance, thumb)
    heading = ["<h2>Patients</h2>"] if provenance is not None else []
    return [x for x in (p["warning"], p["note"], p["model"]) if x] + heading + p["cards"]
