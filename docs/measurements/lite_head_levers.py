"""Phase-1 levers of the pretrained budget, screened on val with several seeds.

Phase 1 learns only the head, on frozen Lite2 features that a finished benchmark kept
(``models/<view>/features_{train,val}.npy``): each row below is the library's own phase 1
(``train_view`` with no fine-tune epochs, the features copied in, so none is recomputed),
changed in one setting from the budget's, and scored by its best val final. Test patients
are never read.

    PYTHONPATH=. python docs/measurements/lite_head_levers.py runs/bench-lite2-s0 --seeds 0 1 2
"""

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from fundus_ensemble.cli import import_keras

ROWS = {
    "budget (lr 1e-3, dropout 0.5, pos weight power 0.5)": {},
    "lr 1e-4": {"learning_rate": 1e-4},
    "lr 3e-3": {"learning_rate": 3e-3},
    "dropout 0.2": {"dropout": 0.2},
    "unweighted BCE (power 0)": {"pos_weight_power": 0.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", type=Path, help="a finished pretrained benchmark folder")
    parser.add_argument("--view", default="color")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/lite-head-levers"))
    args = parser.parse_args()
    import_keras()
    from fundus_ensemble.evaluation.benchmark import BUDGETS
    from fundus_ensemble.training.train import train_view

    results = json.loads((args.bench / "results.json").read_text())
    budget = BUDGETS[results["budget"]["name"]]
    table = {}
    for name, change in ROWS.items():
        for seed in args.seeds:
            out = args.out / f"{list(ROWS).index(name)}-s{seed}" / args.view
            if not (out / "card.json").is_file():
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                for split in ("train", "val"):  # the benchmark's frozen features: the key inside says they match
                    for suffix in (".npy", ".json"):
                        shutil.copy(args.bench / "models" / args.view / f"features_{split}{suffix}", out)
                config = dataclasses.replace(budget.train_config(budget.weights, seed), fine_tune_epochs=0, **change)
                start = time.perf_counter()
                train_view(args.bench / "prep" / args.view, out, config, args.view)
                print(f"{name} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
            card = json.loads((out / "card.json").read_text())
            table.setdefault(name, []).append(
                (card["best_val"]["val_final_score"], card["best_val"]["val_auc"], card["best_val"]["epoch"])
            )
    print(
        f"\nPhase 1 (head on frozen features) of {budget.name}, {args.view} view, val split of {args.bench}; "
        f"seeds {args.seeds}\n"
    )
    print("| row | val final (mean ± sd) | val AUC (mean ± sd) | best epoch per seed | final per seed |")
    print("|---|---:|---:|---|---|")
    for name, rows in table.items():
        final, auc = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        print(
            f"| {name} | {final.mean():.3f} ± {final.std(ddof=1) if len(rows) > 1 else 0:.3f} | "
            f"{auc.mean():.3f} ± {auc.std(ddof=1) if len(rows) > 1 else 0:.3f} | "
            f"{', '.join(str(r[2]) for r in rows)} | {', '.join(f'{r[0]:.3f}' for r in rows)} |"
        )


if __name__ == "__main__":
    main()
