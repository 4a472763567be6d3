#!/usr/bin/env python3
"""Render an HTML report to a PNG with headless Chromium, to look at the page as a reader sees it.

Needs a Chromium binary (Debian/Ubuntu: apt install chromium). Chromium captures the window,
not the whole page: make --height larger than the page (the PNG's bottom is then blank).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fundus_ensemble.cli import run
from fundus_ensemble.errors import FundusError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", help="the report to render")
    parser.add_argument("png", help="the screenshot to write")
    parser.add_argument("--width", type=int, default=1280, help="window width in px (a laptop screen)")
    parser.add_argument("--height", type=int, default=8000, help="window height in px")
    args = parser.parse_args(argv)
    page = Path(args.html).resolve()
    if not page.is_file():
        raise FundusError(f"{args.html}: file not found")
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        raise FundusError(f"no Chromium found (tried {', '.join(BROWSERS)}); install it, e.g. apt install chromium")
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: nothing of the user's is read or written
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={args.width},{args.height}",
            f"--screenshot={Path(args.png).resolve()}",
            page.as_uri(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or not Path(args.png).is_file():
        raise FundusError(f"{browser} failed (exit {result.returncode}): {result.stderr.strip()[-300:]}")
    print(f"wrote {args.png} ({args.width} x {args.height} px)")


if __name__ == "__main__":
    sys.exit(run(main))
