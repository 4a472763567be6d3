#!/usr/bin/env python3
"""A bounded load on a local screening station (scripts/serve.py): N requests, C at a time, to loopback only.

Prints requests/s, latency percentiles, the count of each status, and the server's peak memory
(from /health) before and after.
"""

import argparse
import asyncio
import ipaddress
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from fundus_ensemble.cli import run
from fundus_ensemble.errors import FundusError


async def load(url: str, files: dict[str, tuple[str, bytes]], requests: int, concurrency: int) -> tuple[list, float]:
    import httpx

    results: list[tuple[int, float]] = []
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def one():
            async with gate:
                start = time.perf_counter()
                try:
                    status = (await client.post(f"{url}/predict", files=files)).status_code
                except httpx.HTTPError:
                    status = 0
                results.append((status, time.perf_counter() - start))

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
    return results, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("left", help="left photo to send")
    p.add_argument("right", help="right photo to send")
    p.add_argument("--requests", type=int, default=200, help="requests in all (at most 10,000)")
    p.add_argument("--concurrency", type=int, default=50, help="requests in flight at once")
    args = p.parse_args(argv)
    host = urlparse(args.url).hostname or ""
    if host != "localhost" and not (host.replace(".", "").isdigit() and ipaddress.ip_address(host).is_loopback):
        raise FundusError(f"{args.url}: this load test only targets this machine (127.0.0.0/8 or localhost)")
    if not 1 <= args.requests <= 10_000 or args.concurrency < 1:
        raise FundusError("--requests must be 1..10000 and --concurrency at least 1")
    import httpx

    files = {
        eye: (Path(path).name, Path(path).read_bytes()) for eye, path in (("left", args.left), ("right", args.right))
    }
    before = httpx.get(f"{args.url}/health").json()
    results, seconds = asyncio.run(load(args.url, files, args.requests, args.concurrency))
    after = httpx.get(f"{args.url}/health").json()
    statuses: dict[int, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    ok = np.array([t for s, t in results if s == 200])
    print(
        f"{args.requests} requests, {args.concurrency} at a time, in {seconds:.1f} s: "
        f"{len(ok) / seconds:.2f} answered/s; statuses {dict(sorted(statuses.items()))}"
    )
    if len(ok):
        p50, p90, p99 = np.percentile(ok, [50, 90, 99])
        print(f"latency of answered requests: p50 {p50:.2f} s, p90 {p90:.2f} s, p99 {p99:.2f} s, max {ok.max():.2f} s")
    print(f"server peak RSS: {before['max_rss_mb']} MB before, {after['max_rss_mb']} MB after")


if __name__ == "__main__":
    sys.exit(run(main))
