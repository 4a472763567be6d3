"""Time odir_score against the challenge's three sklearn calls it replaces (docs/evaluation.md).

python docs/measurements/metric_speed.py
"""

import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fundus_ensemble.metrics import odir_score  # noqa: E402


def sklearn_score(y: np.ndarray, prob: np.ndarray) -> float:
    gt, p = y.ravel(), prob.ravel()
    return (cohen_kappa_score(gt, p > 0.5) + f1_score(gt, p > 0.5, average="micro") + roc_auc_score(gt, p)) / 3


def per_call_ms(score, y, prob, calls: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        score(y, prob)
    return (time.perf_counter() - start) / calls * 1000


rng = np.random.default_rng(0)
for patients in (10, 700, 3500):
    y = (rng.random((patients, 8)) < 0.2).astype(int)
    prob = np.round(rng.random((patients, 8)), 2)
    assert abs(sklearn_score(y, prob) - odir_score(y, prob)["final"]) < 1e-12
    print(
        f"{patients} patients: sklearn {per_call_ms(sklearn_score, y, prob):.2f} ms, "
        f"odir_score {per_call_ms(odir_score, y, prob):.2f} ms a call"
    )
