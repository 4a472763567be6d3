#!/usr/bin/env python3
"""The screening station: a local web page and JSON API (POST /predict, GET /health, /openapi.json) over a trained run.

Binds to 127.0.0.1. Serving on another interface needs --host and a token (--token, or the
FUNDUS_SERVE_TOKEN environment variable) that every prediction must carry.
"""

import argparse
import ipaddress
import os
import sys

from fundus_ensemble.cli import HelpFormatter, run
from fundus_ensemble.errors import FundusError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "run_dir",
        nargs="?",
        default="bundled",
        help="run folder of scripts/train_pair.py, a bundle folder, or 'bundled' (the package's own model)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; anything but loopback needs a token")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--token", help="bearer token every prediction must carry (default: $FUNDUS_SERVE_TOKEN)")
    p.add_argument(
        "--calibration",
        help="calibration.json of score.py --calibrate-on (default: the run's own, "
        "RUN/calibration.json or RUN/score_*/calibration.json, as predict.py)",
    )
    p.add_argument("--no-calibration", action="store_true", help="decide at 0.5 even if the run has a calibration")
    p.add_argument("--site", help="site.json of scripts/adapt_site.py for this camera (made for this model)")
    p.add_argument("--max-upload-mb", type=float, default=40.0, help="largest request (both photos) in MB")
    p.add_argument("--max-megapixels", type=float, default=100.0, help="reject larger photos before decoding")
    p.add_argument("--queue", type=int, default=16, help="requests waiting at most; more are answered 503")
    p.add_argument("--batch-size", type=int, default=8, help="queued requests predicted together")
    p.add_argument(
        "--no-quality-gate",
        action="store_true",
        help="decide on every readable photo, even one the gradability gate refuses (as predict.py)",
    )
    p.add_argument("--log-patients", action="store_true", help="log patient ids (off: no patient data in logs)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get("FUNDUS_SERVE_TOKEN") or None
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and token is None:
        raise FundusError(
            f"--host {args.host} serves beyond this machine: give a --token (or FUNDUS_SERVE_TOKEN) "
            "that every prediction must carry"
        )
    if token is not None and len(token) < 16:
        raise FundusError(
            "the token must be at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    for name in ("queue", "batch_size", "port"):
        if getattr(args, name) < 1:
            raise FundusError(f"--{name.replace('_', '-')} must be at least 1")
    from fundus_ensemble.cli import check_run_folder, import_keras

    if args.run_dir != "bundled":
        check_run_folder(args.run_dir)
    import_keras()
    from fundus_ensemble.evaluation.calibration import load_calibration_file, run_calibration
    from fundus_ensemble.inference.bundle import resolve_run

    named = args.run_dir
    args.run_dir = resolve_run(args.run_dir)  # a bundle: its files checked, its run built once

    calibration = None if args.no_calibration else (args.calibration or run_calibration(args.run_dir))
    if calibration is not None:
        load_calibration_file(calibration)
    import uvicorn

    from fundus_ensemble.inference.predict import Predictor
    from fundus_ensemble.serve.app import create_app

    max_pixels = round(args.max_megapixels * 1e6) if args.max_megapixels > 0 else None
    predictor = Predictor(
        args.run_dir,
        calibration,
        max_pixels,
        explain=True,
        gate=False if args.no_quality_gate else None,
        site=args.site,
    )
    predictor.warm_up()  # the first patient should not wait for the networks' tracing
    app = create_app(predictor, token, args.max_upload_mb, args.queue, args.batch_size, args.log_patients)
    print(
        f"serving {'the bundled model' if named == 'bundled' else named} ({', '.join(predictor.views)}, {predictor.size} px; thresholds: {predictor.source}) "
        f"on http://{args.host}:{args.port}/  (API schema: /openapi.json){'; token required' if token else ''}",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=True)


if __name__ == "__main__":
    sys.exit(run(main))
