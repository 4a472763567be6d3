"""Join the outputs of ``predict.py --shard i/n`` run on several machines into one folder.

Each shard's ``predict.json`` says which run, cards, thresholds and shard made it; the merge
refuses shards of different jobs, a shard missing or given twice, and a patient in two shards,
so the merged ``predictions.csv``, ``decisions.csv`` and ``worklist.csv`` are exactly what one run would write
(rows grouped by shard). Heatmaps and per-patient records stay in the shard folders, the heatmaps listed by their ``heatmaps.csv``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..errors import FundusError
from ..fileio import atomic_write_json, atomic_write_text, claim_folder, csv_for_people, folder_lock, refuse_overlap

# what every shard of one job shares (the listing and counts differ by shard)
SAME = ("run", "cards_sha256", "batch_size", "max_pixels", "thresholds", "explain", "explain_classes")


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise FundusError(f"{path}: empty")
    return rows[0], rows[1:]


def merge_predictions(folders: list[str | os.PathLike], out_dir: str | os.PathLike, force: bool = False) -> dict:
    """Merge the ``--shard`` outputs in ``folders`` into ``out_dir``; returns the merged record."""
    shards, seen = {}, {}
    for folder in map(Path, folders):
        record_path = folder / "predict.json"
        if not record_path.is_file() or not (folder / "predictions.csv").is_file():
            raise FundusError(
                f"{folder}: no finished predictions (predict.json, predictions.csv); run predict.py there first"
            )
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if not record.get("shard"):
            raise FundusError(f"{folder}: not a shard (predict.py ran without --shard); nothing to merge")
        index, count = record["shard"]
        if index in shards:
            raise FundusError(f"{folder} and {shards[index][0]} are both shard {index}/{count}")
        shards[index] = (folder, record)
    first = next(iter(shards.values()))[1]
    count = first["shard"][1]
    for folder, record in shards.values():
        differ = [k for k in SAME if record.get(k) != first.get(k)] + (
            ["shard count"] if record["shard"][1] != count else []
        )
        if differ:
            raise FundusError(
                f"{folder} is a shard of another job than {next(iter(shards.values()))[0]} "
                f"(they differ in {', '.join(differ)})"
            )
    missing = sorted(set(range(1, count + 1)) - set(shards))
    if missing:
        raise FundusError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing: give all {count}")
    out = Path(out_dir)
    refuse_overlap(out, {f"shard {i}": folder for i, (folder, _) in shards.items()})
    if (out / "predictions.csv").exists() and not force:
        raise FundusError(f"{out} already holds predictions; pass --force to replace them or choose another --out")
    tables = {}
    # shards made before the worklist existed have none: the merge then has none either
    with_worklist = all((folder / "worklist.csv").is_file() for folder, _ in shards.values())
    for name in ("predictions.csv", "decisions.csv", *(("worklist.csv",) if with_worklist else ())):
        header, rows = None, []
        for index in sorted(shards):
            folder = shards[index][0]
            shard_header, shard_rows = _read_csv(folder / name)
            if header is not None and shard_header != header:
                raise FundusError(f"{folder / name}: columns differ from the other shards'")
            header = shard_header
            for row in shard_rows:
                owner = seen.setdefault((name, row[0]), index)
                if owner != index:
                    raise FundusError(f"patient {row[0]!r} is in shard {owner}/{count} and {index}/{count}")
            rows += shard_rows
        tables[name] = (header, rows)
    claim_folder(out, "predictions")
    with folder_lock(out, "predictions"):
        header, rows = tables["decisions.csv"]
        atomic_write_text(out / "decisions.csv", csv_for_people(header, rows))
        if with_worklist:
            header, rows = tables["worklist.csv"]
            atomic_write_text(out / "worklist.csv", csv_for_people(header, rows))
        record = {
            **{k: first.get(k) for k in SAME},
            "shard": None,
            "merged_from": [str(shards[i][0]) for i in sorted(shards)],
            "patients": sum(r["patients"] for _, r in shards.values()),
            "predicted": sum(r.get("predicted", 0) for _, r in shards.values()),
            "rejected": sum(r.get("rejected", 0) for _, r in shards.values()),
        }
        atomic_write_json(out / "predict.json", record)
        header, rows = tables["predictions.csv"]
        atomic_write_text(out / "predictions.csv", csv_for_people(header, rows))  # last: its presence means done
    return record
