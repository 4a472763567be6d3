#!/usr/bin/env bash
# predict.py with the bundled model on the same ODIR photos, before and after "one backbone pass per
# photo and view" (commit 7471985), one after the other on this machine, and the station's time per
# patient (the app in process, one patient per request) after.
#
#   bash docs/measurements/predict_speed.sh $DATA 100 > runs/predict_speed.txt
#
# BEFORE is the last commit before the change (4bfd582), checked out into a worktree; several
# commits may be named (BEFORE="4bfd582 00d1d4d": also the last with the Lite2 bundle, before the
# model was re-released with efficientnet_lite012). Each uses the package's bundled model of its
# own checkout and the same venv. The first patients of labels.csv with both eyes are used (2 x N photos).
set -euo pipefail
DATA=${1:?usage: predict_speed.sh DATA [PATIENTS]}
PATIENTS=${2:-100}
ROOT=$(git rev-parse --show-toplevel)
WORK=$ROOT/runs/predict_speed
BEFORE=${BEFORE:-4bfd582}
rm -rf "$WORK" && mkdir -p "$WORK/photos"
python3 - "$DATA" "$PATIENTS" "$WORK/photos" <<'EOF'
import csv, os, sys
data, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
eyes = {}
for r in csv.DictReader(open(os.path.join(data, "labels.csv"))):
    eyes.setdefault(r["ID"], {})[r["eye"]] = r["filename"]
both = [i for i, e in eyes.items() if len(e) == 2][:n]
for i in both:
    for eye, name in eyes[i].items():
        os.symlink(os.path.join(data, "images", name), os.path.join(out, f"{i}_{eye}.jpg"))
print(f"{2 * len(both)} photos of {len(both)} patients", file=sys.stderr)
EOF
export FUNDUS_ENSEMBLE_CACHE=$WORK/cache
for ref in $BEFORE; do
  git -C "$ROOT" worktree remove --force "$WORK/before-$ref" 2>/dev/null || true
  git -C "$ROOT" worktree add --detach "$WORK/before-$ref" "$ref" >/dev/null
done
for which in $BEFORE after; do
  src=$ROOT; [ "$which" != after ] && src=$WORK/before-$which
  # the bundle is built into the cache first, so its one-off cost is not timed
  (cd "$src" && PYTHONPATH=$src "$ROOT/.venv/bin/python" scripts/predict.py --model-card > /dev/null)
  echo "== $which ($(git -C "$src" describe --always --dirty), $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['backbone'])" "$src/fundus_ensemble/bundled/bundle.json"))"
  (cd "$src" && PYTHONPATH=$src "$ROOT/.venv/bin/python" scripts/predict.py "$WORK/photos" --out "$WORK/out-$which" 2>&1 \
    | grep -E "patients predicted|images/s")
done
echo "== the station, after: one patient per request"
PYTHONPATH=$ROOT "$ROOT/.venv/bin/python" - "$WORK/photos" <<'EOF'
import sys, time, glob
from fastapi.testclient import TestClient
from fundus_ensemble.inference.bundle import resolve_run
from fundus_ensemble.inference.predict import Predictor
from fundus_ensemble.serve.app import create_app

predictor = Predictor(resolve_run("bundled"), explain=True)
predictor.warm_up()  # as scripts/serve.py does before serving
client = TestClient(create_app(predictor))
lefts = sorted(glob.glob(f"{sys.argv[1]}/*_left.jpg"))[:20]
times = []
for left in lefts:
    right = left.replace("_left", "_right")
    files = {"left": ("l.jpg", open(left, "rb").read()), "right": ("r.jpg", open(right, "rb").read())}
    start = time.perf_counter()
    answer = client.post("/predict", files=files)
    times.append(time.perf_counter() - start)
    assert answer.status_code == 200, answer.text
print(f"{len(times)} patients, one per request, with heatmaps: first {times[0]:.1f} s, then median "
      f"{sorted(times[1:])[len(times[1:]) // 2]:.2f} s per patient")
EOF
for ref in $BEFORE; do git -C "$ROOT" worktree remove --force "$WORK/before-$ref"; done
