"""What every entry point in scripts/ shares: user errors become one line and exit status 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .errors import FundusError


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; print a :class:`FundusError` as ``error: ...`` and return 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides our output
    try:
        return int(main(argv) or 0)
    except FundusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_fractions(values: list[float]) -> dict[str, float]:
    """``--fractions TRAIN VAL TEST`` to a split-fraction mapping."""
    if len(values) != 3:
        raise FundusError(f"--fractions takes three numbers (train val test), got {values}")
    return dict(zip(("train", "val", "test"), values))
