#!/usr/bin/env python3
"""Measure every export of a run: file size, single-patient CPU latency (median, 1 thread),
largest probability difference from the Keras ensemble, and pooled AUC on a labelled split.

Two references: predict's own path (views made by OpenCV, each view model on batches of
patients, averaged) and the joint Keras model the exports are made from (one patient at a
time, gray view made in the graph); the second isolates what the conversion changes.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fundus_ensemble.cli import run

VARIANTS = [
    ("Keras (in memory)", None, None),
    ("SavedModel", "saved_model", "none"),
    ("TFLite float32", "tflite", "none"),
    ("TFLite float16", "tflite", "float16"),
    ("TFLite int8 (dynamic range)", "tflite", "int8"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("manifest", help="labelled manifest of the patients to compare on (e.g. data_manifest.csv)")
    parser.add_argument("--image-root", help="folder the manifest's paths are relative to (default: its folder)")
    parser.add_argument("--split", default="val", help="split whose pooled AUC is reported")
    parser.add_argument("--repeats", type=int, default=50, help="timed single-patient calls per format")
    parser.add_argument("--out", help="folder to keep the exports and bench_export.json in (default: a temporary one)")
    args = parser.parse_args(argv)
    from fundus_ensemble.cli import import_keras

    import_keras()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # before the runtime starts: one thread, as on a phone core
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import cv2
    import numpy as np

    from fundus_ensemble.data.imaging import crop_to_fov, decode_image
    from fundus_ensemble.data.manifest import load_manifest
    from fundus_ensemble.inference.export import build_ensemble_model, decision_changes, export_run, load_exported
    from fundus_ensemble.inference.predict import patients_in_manifest, predict_photos
    from fundus_ensemble.labels import INPUT_NAMES, LABELS
    from fundus_ensemble.metrics import odir_score

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_export_"))
    manifest = load_manifest(args.manifest, image_root=args.image_root)
    patients = patients_in_manifest(args.manifest, args.image_root)
    summary = predict_photos(args.run_dir, patients, out / "keras_predictions", force=True, progress=False)
    with open(out / "keras_predictions" / "predictions.csv") as handle:
        rows = [line.split(",") for line in handle.read().splitlines()[1:]]
    reference = {r[0]: np.array([float(v) for v in r[1:]]) for r in rows}
    size = summary["input_size"]
    ids = [p.patient_id for p in patients if p.patient_id in reference]

    def square(path):
        return cv2.cvtColor(crop_to_fov(decode_image(path), size), cv2.COLOR_BGR2RGB)

    eyes = {
        p.patient_id: (square(p.left or p.right), square(p.right or p.left))
        for p in patients
        if p.patient_id in reference
    }
    in_split = [
        i for i, pid in enumerate(ids) if any(q.patient_id == pid and q.split == args.split for q in manifest.patients)
    ]
    labels = {q.patient_id: q.labels for q in manifest.patients}
    y_split = np.array([labels[ids[i]] for i in in_split])
    keras_model, _ = build_ensemble_model(args.run_dir)

    def keras_fn(left, right):
        return np.asarray(keras_model.predict_on_batch({INPUT_NAMES[0]: left[None], INPUT_NAMES[1]: right[None]}))[0]

    table, joint = [], None
    for name, fmt, quantize in VARIANTS:
        if fmt is None:
            fn, size_bytes = keras_fn, 4 * keras_model.count_params()  # float32 weights in memory
        else:
            path = out / ("ensemble_saved_model" if fmt == "saved_model" else f"ensemble_{quantize}.tflite")
            size_bytes = export_run(args.run_dir, path, fmt, quantize, force=True)["bytes"]
            fn = load_exported(path, threads=1)
        probs = np.array([fn(*eyes[pid]) for pid in ids])
        diff = float(np.abs(probs - np.array([reference[pid] for pid in ids])).max())
        if fmt is None:
            joint = probs
        diff_joint = float(np.abs(probs - joint).max())
        auc = odir_score(y_split, probs[in_split])["auc"] if len(in_split) else float("nan")
        changes = decision_changes(joint[in_split], probs[in_split]) if len(in_split) else None
        left, right = eyes[ids[0]]
        for _ in range(3):
            fn(left, right)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(left, right)
            times.append(time.perf_counter() - start)
        table.append(
            {
                "format": name,
                "megabytes": size_bytes / 1e6,
                "latency_ms_median": 1e3 * float(np.median(times)),
                "max_abs_diff_vs_predict": diff,
                "max_abs_diff_vs_keras_joint": diff_joint,
                f"pooled_auc_{args.split}": auc,
                f"decisions_changed_{args.split}": changes,
            }
        )
        print(f"{name}: done", file=sys.stderr)
    keras_auc = table[0][f"pooled_auc_{args.split}"]
    print(
        f"run {args.run_dir}, {size} px, {len(ids)} patients ({len(in_split)} in {args.split}); latency: one patient "
        f"(two eyes), median of {args.repeats}, 1 CPU thread\n"
    )
    print(
        f"| format | size (MB) | latency (ms) | max abs diff vs predict.py | vs Keras joint model | pooled AUC {args.split} "
        f"(Keras {keras_auc:.4f}) | decisions changed vs Keras joint, {args.split} (cells / patients) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in table:
        changed = row[f"decisions_changed_{args.split}"]
        changed_text = "n/a" if changed is None else f"{changed['cells']} / {changed['patients']}"
        print(
            f"| {row['format']} | {row['megabytes']:.1f} | {row['latency_ms_median']:.1f} | "
            f"{row['max_abs_diff_vs_predict']:.1e} | {row['max_abs_diff_vs_keras_joint']:.1e} | "
            f"{row[f'pooled_auc_{args.split}']:.4f} | "
            f"{changed_text} |"
        )
    (out / "bench_export.json").write_text(
        json.dumps(
            {"run": args.run_dir, "input_size": size, "labels": list(LABELS), "patients": len(ids), "rows": table},
            indent=2,
        )
    )
    print(f"\nwrote {out / 'bench_export.json'}")


if __name__ == "__main__":
    sys.exit(run(main))
