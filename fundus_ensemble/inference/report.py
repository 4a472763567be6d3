"""One self-contained HTML page a person reads: a scored split, or predictions on new photos.

Every image is inlined as a ``data:`` URI and there is no script or stylesheet from elsewhere,
so the file opens anywhere, offline, and can be mailed as it is. Plots use matplotlib's
``Agg`` backend (no display needed).
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import json
import os
import re
import threading
from pathlib import Path

import cv2
import numpy as np
from markupsafe import Markup

from ..data.batches import ImageStore
from ..data.manifest import load_manifest
from ..errors import FundusError
from ..evaluation.ensemble import load_view_model, run_views
from ..fileio import atomic_write_bytes, atomic_write_text
from ..labels import LABEL_NAMES, LABELS
from .explain import GradCam, ensemble_heatmaps, overlay
from .referral import counts_text

THRESHOLD = 0.5
THUMB = 160  # px a side for the eyes in galleries and cards
TEMPLATES = "templates"  # beside this module: one Jinja2 template per page, pieces shared in macros.html


@functools.cache
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    # autoescape on every template: a patient id, a file name or a card's text is shown, never run
    return Environment(
        loader=PackageLoader("fundus_ensemble.inference", TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, title: str, pdf_fonts: dict | None = None, **context) -> str:
    """A whole self-contained page from one of the templates (``page.html`` and the pages extending it);
    ``pdf_fonts`` (the fonts to embed) lays it out for :func:`prediction_pdf` instead of a browser."""
    return _environment().get_template(template).render(title=title, thumb=THUMB, pdf_fonts=pdf_fonts, **context)


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


# --- a model card, as HTML --------------------------------------------------------------------


def _inline(text: str) -> str:
    """Escaped text with the card's inline Markdown: **bold** and `code`."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def markdown_html(text: str) -> Markup:
    """The Markdown of a model card as HTML: headings, paragraphs, ``-`` lists and pipe tables, every
    character escaped first (a crafted card's HTML is shown as text, never run); marked safe for the
    templates, which would escape it again."""
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
    return Markup("\n".join(blocks))


# --- a scored split ---------------------------------------------------------------------------


def _score_rows(report: dict) -> list[dict]:
    """The scores table of a scored split: each view model, the ensemble (bold), then the image-blind rows."""
    entries = [(name, s, "") for name, s in report["models"].items()] + [("ensemble", report["ensemble"], "")]
    entries += [(name, s, "trivial") for name, s in report.get("trivial", {}).items()]
    rows = []
    for name, s, kind in entries:
        per_class = s.get("per_class", {})
        rows.append(
            {
                "name": name,
                "kind": kind,
                "bold": name == "ensemble",
                "scores": [f"{s[k]:.4f}" for k in ("kappa", "f1", "auc", "final")],
                "aucs": [
                    "n/a" if per_class.get(c, {}).get("auc") is None else format(per_class[c]["auc"], ".3f")
                    for c in LABELS
                ],
            }
        )
    return rows


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


def _confusion_rows(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> list[dict]:
    decided = y_prob > threshold
    rows = []
    for j, c in enumerate(LABELS):
        t, d = y_true[:, j].astype(bool), decided[:, j]
        tp, fp, fn, tn = int((t & d).sum()), int((~t & d).sum()), int((t & ~d).sum()), int((~t & ~d).sum())
        rows.append(
            {
                "name": f"{c} {LABEL_NAMES[c]}",
                **{"tp": tp, "fp": fp, "fn": fn, "tn": tn},
                "sensitivity": f"{tp / (tp + fn):.2f}" if tp + fn else "n/a",
                "specificity": f"{tn / (tn + fp):.2f}" if tn + fp else "n/a",
            }
        )
    return rows


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
) -> list[dict]:
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
    gallery = []
    for j, c in enumerate(LABELS):
        groups_shown = []
        for title, chosen in groups[c].items():
            cases = []
            for i in chosen:
                images = []
                for e, eye in enumerate(("left", "right")):
                    images.append({"uri": _image_uri(thumbs[i][e]), "alt": f"{ids[i]} {eye} eye"})
                    images.append(
                        {
                            "uri": _image_uri(overlay(thumbs[i][e], heat[i][j, e])),
                            "alt": f"{ids[i]} {eye} eye, {c} heatmap",
                        }
                    )
                cases.append(
                    {
                        "id": ids[i],
                        "images": images,
                        "probability": probability_text(y_prob[i, j], threshold),
                        "label": int(y_true[i, j]),
                    }
                )
            groups_shown.append({"title": title, "cases": cases})
        gallery.append({"code": c, "title": f"{c} {LABEL_NAMES[c]}", "groups": groups_shown})
    return gallery


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
    history = any((run / v / "history.csv").is_file() for v in views)
    shown = {
        "split": report["split"],
        "patients": report["patients"],
        "run": str(run),
        "views": views,
        "calibrated_on": report.get("calibrated_on"),
        "flip_tta": bool(report.get("flip_tta")),
        "labels": LABELS,
        "rows": _score_rows(report),
        "roc": roc,
        "pr": pr,
        "reliability": _reliability(y_true, y_prob),
        "threshold": THRESHOLD,
        "confusion": _confusion_rows(y_true, y_prob, THRESHOLD),
        # epoch-trained view models have training curves; a cross-fitted run has its out-of-fold scores instead
        "history": _history(run, views) if history else None,
        "heads": [] if history else _heads_rows(run, views),
        "gallery": _gallery(run, prep, report["split"], ids, y_true, y_prob, gallery, THRESHOLD) if gallery > 0 else [],
    }
    out = Path(out_path) if out_path is not None else score / "report.html"
    atomic_write_text(out, render("score_report.html", f"fundus-ensemble report: {report['split']} split", s=shown))
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

    names = list(points)
    shown = {
        "table": result["table"],
        "patients": result["patients"],
        "rejected": result["rejected"],
        "one_eye": result.get("one_eye", 0),
        "thresholds_from": result["thresholds_from"],
        "classes": [
            {
                "name": f"{c} {LABEL_NAMES[c]}",
                "labelled": s["labelled"],
                "positives": s["positives"],
                "auc": auc_text(s),
                "threshold": f"{s['threshold']:.3f}",
                "sensitivity": pct(s["sensitivity"], s["sensitivity_95"]),
                "specificity": pct(s["specificity"], s["specificity_95"]),
            }
            for c, s in result["classes"].items()
        ],
        "min_for_auc": MIN_FOR_AUC,
        "roc": roc_figure(y, probs, points),
        "point_names": names,
        "points": [
            {
                "name": f"{c} {LABEL_NAMES[c]}",
                "cells": [
                    text
                    for rates in (result["operating_points"][name].get(c, {}) for name in names)
                    for text in (pct(rates.get("sensitivity")), pct(rates.get("specificity")))
                ],
            }
            for c in result["classes"]
        ],
    }
    out = Path(out_path)
    atomic_write_text(out, render("evaluation.html", "fundus-ensemble evaluation", e=shown))
    return out


# --- predictions on new photos ------------------------------------------------------------------


def probability_text(p: float, other: float) -> str:
    """``p`` with three decimals, or as many more (up to six) as it takes to differ from ``other``:
    a page must never show "0.500" for a probability and the threshold it was decided against."""
    digits = 3
    while digits < 6 and round(p, digits) == round(other, digits):
        digits += 1
    return f"{p:.{digits}f}"


def _heads_rows(run: Path, views) -> list[dict]:
    """A cross-fitted run's out-of-fold scores per view (it has no epochs to plot)."""
    rows = []
    for view in views:
        card = json.loads((run / view / "card.json").read_text())
        head = card.get("head") or {}
        scores = head.get("out_of_fold") or {}
        if scores:
            rows.append(
                {
                    "view": view,
                    "folds": head.get("folds", "?"),
                    "C": head.get("C", "?"),
                    "scores": [f"{scores[k]:.3f}" for k in ("kappa", "f1", "auc", "final")],
                }
            )
    return rows


def _model_context(provenance: dict) -> dict:
    """Which model made the page's numbers: the run, and per view model its backbone, input size,
    initial weights, training data and best validation score; the model card's summary embedded."""
    views = []
    for view, card in provenance["models"].items():
        best = card.get("best_val") or {}
        score = best.get("val_final_score")
        out_of_fold = bool(best.get("out_of_fold"))  # a cross-fitted run learned on train and val, scored out of fold
        when = "out of fold" if out_of_fold else f"epoch {best.get('epoch', '?')}"
        patients = f"{'?' if card.get('train_patients') is None else card['train_patients']} patients"
        if out_of_fold and isinstance(card.get("train_patients"), int) and isinstance(card.get("val_patients"), int):
            patients = f"{card['train_patients'] + card['val_patients']} patients, cross-fitted"
        views.append(
            {
                "view": view,
                "backbone": str(card.get("backbone") or "?"),
                "input": str(card.get("input_size") or "?"),
                "weights": str(card.get("weights_init") or "none (from scratch)"),
                "patients": patients,
                "manifest": str(card["data_manifest"]) if card.get("data_manifest") else None,
                "score": "n/a" if score is None else f"{score:.3f} ({when})",
            }
        )
    where = provenance.get("model_card")
    summary = provenance.get("model_card_summary")
    return {
        "run": provenance.get("run"),
        "calibrated": bool(provenance.get("calibrated")),
        # the station's own route is a link that works wherever its page is seen; a file on this machine
        # would be a link that breaks once the page is mailed, so it is named instead
        "card_url": provenance.get("model_card_url"),
        "card_file": Path(where).name if where else None,
        "views": views,
        "summary": markdown_html(summary) if summary else None,
    }


REFERRAL_COLOURS = {"refer": "#b00", "not_gradable": "#a60", "inconclusive": "#a60"}  # others: "#070"


def record_images(card: dict, size: int | None = None) -> list[tuple[str, str, np.ndarray]]:
    """A record's pictures, in the order every record shows them: per eye the photo, then its heatmaps,
    as (caption, alt text, BGR image); resized to ``size`` px a side first when given."""
    images = []
    for eye, photo in card["eyes"].items():
        small = photo if size is None else cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA)
        images.append((eye, f"{card['patient_id']} {eye} eye", small))
        images += [
            (f"{eye}, {c}", f"{card['patient_id']} {eye} {c} heatmap", overlay(small, heat))
            for (heat_eye, c), heat in card["heatmaps"].items()
            if heat_eye == eye
        ]
    return images


def decision_rows(card: dict) -> list[dict]:
    """Each class's decision in a record: its probability against its threshold, both written so that
    they differ (:func:`probability_text`), and the exact probability for programs reading the page."""
    return [
        {
            "code": c,
            "name": LABEL_NAMES[c],
            "probability": probability_text(p, t),
            "threshold": probability_text(t, p),
            "exact": repr(p),
            "decided": bool(d),
        }
        for c, p, t, d in zip(LABELS, card["probability"], card["threshold"], card["decision"])
    ]


def record_context(card: dict, thumb: int = THUMB) -> dict:
    """One patient's record as the templates draw it (``macros.html``, ``record``)."""
    referral = card.get("referral")
    record = {
        "id": card["patient_id"],
        "status": card["status"],
        "note": card.get("note") or "",
        "side_check": card.get("side_check"),
        "referral": None
        if referral is None
        else {"kind": referral.kind, "text": referral.text, "colour": REFERRAL_COLOURS.get(referral.kind, "#070")},
        "image_style": f"width:{thumb}px" if thumb != THUMB else None,
        "figures": [],
        "decisions": [],
    }
    if card["status"] == "ok":
        record["figures"] = [
            {"caption": caption, "alt": alt, "uri": _image_uri(bgr)} for caption, alt, bgr in record_images(card, thumb)
        ]
        record["decisions"] = decision_rows(card)
    return record


def prediction_context(
    cards: list[dict], source: str, summary: dict, provenance: dict | None = None, thumb: int = THUMB
) -> dict:
    """What a prediction page shows (``prediction.html``, ``station.html``): a warning when the run
    should not screen, how decisions are made, the model, and a record per patient.

    Each decision cell carries ``data-class``, ``data-probability`` and ``data-decision``, so a
    program reads the page's decisions as a person does.
    """
    size = next(iter(provenance["models"].values())).get("input_size") if provenance else None
    return {
        "warning": (provenance or {}).get("warning"),
        "made": summary.get("made"),
        "input": summary.get("input"),
        "patients": summary["patients"],
        "predicted": summary["predicted"],
        "rejected": summary["rejected"],
        "counts": counts_text(summary["counts"]) if summary.get("counts") else None,
        "source": source,
        "calibrated": bool(provenance and provenance.get("calibrated")),
        "input_size": size,
        "heatmap_cells": max(1, size // 32) if size else None,
        "model": _model_context(provenance) if provenance is not None else None,
        "records": [record_context(card, thumb) for card in cards],
    }


def write_prediction_report(
    cards: list[dict],
    out_dir: str | os.PathLike,
    source: str,
    summary: dict,
    provenance: dict | None = None,
    records: tuple[Path, list[str]] | None = None,
) -> None:
    """One record per patient: both eyes, the heatmaps of the explained classes, and the decisions,
    as ``report.html`` and ``report.pdf`` in ``out_dir``, and with ``records`` (a folder, a file name
    per card) as one PDF per patient; all from one page context, so each picture is encoded once.

    ``cards`` items hold ``patient_id``, ``status``, ``note``, ``eyes`` ({eye: BGR photo}),
    ``heatmaps`` ({(eye, class): [0, 1] array}), ``probability``, ``threshold`` and ``decision``
    (per class lists, absent for a rejected patient).
    """
    out = Path(out_dir)
    shown = prediction_context(cards, source, summary, provenance)
    atomic_write_text(out / "report.html", render("prediction.html", "fundus-ensemble: predictions", p=shown))
    atomic_write_bytes(out / "report.pdf", prediction_pdf(shown))
    if records is not None:
        folder, names = records
        for record, name in zip(shown["records"], names):
            predicted = int(record["status"] == "ok")
            alone = {**shown, "patients": 1, "predicted": predicted, "rejected": 1 - predicted, "counts": None}
            atomic_write_bytes(Path(folder) / name, prediction_pdf({**alone, "records": [record]}))


def prediction_pdf(context: dict) -> bytes:
    """A prediction page's context (:func:`prediction_context`) as a PDF, rendered without a browser
    from the report's own template (``prediction.html``, its ``pdf.css`` added) by xhtml2pdf: the first
    page the job, the counts, the model and the model card's summary, then a page per patient. The
    pictures are drawn 2.6 cm a side whatever the context's ``thumb``."""
    import logging

    from xhtml2pdf import pisa

    html = render("prediction.html", "fundus-ensemble: screening record", p=context, pdf_fonts=_pdf_fonts())
    logging.getLogger("xhtml2pdf").setLevel(logging.ERROR)  # it warns of every CSS property it skips
    buffer = io.BytesIO()
    with _PDF_LOCK:  # one document at a time: ReportLab keeps its fonts in module state
        made = pisa.CreatePDF(html, dest=buffer, encoding="utf-8")
    if made.err:
        raise FundusError(f"the PDF record could not be made ({made.err} errors in its page)")
    return buffer.getvalue()


_PDF_LOCK = threading.Lock()


def _pdf_fonts() -> dict[str, str]:
    """DejaVu Sans, which matplotlib ships, for the PDF: ReportLab's built-in fonts have no glyph
    for the page's ≤ and ✓."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return {"regular": (folder / "DejaVuSans.ttf").as_posix(), "bold": (folder / "DejaVuSans-Bold.ttf").as_posix()}
