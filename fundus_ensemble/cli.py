"""What every entry point in scripts/ shares: user errors become one line and exit status 2,
and Keras is imported without the TensorFlow start-up noise."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable

from .errors import FundusError

# TensorFlow's C++ start-up lines on a machine without a GPU. They are written to file
# descriptor 2 before absl's logging starts, so no environment variable silences them.
_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc.*cuInit|cuda_executor\.cc"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|oneDNN custom operations"
    r"|This TensorFlow binary is optimized|rebuild TensorFlow with the appropriate compiler flags|TF-TRT Warning"
    r"|computation_placer\.cc|cpu_feature_guard\.cc|port\.cc:\d+\] oneDNN"
)


# An --option auto|on|off as the library takes it: None lets the library decide.
AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


def _quiet_retracing(record) -> bool:
    """Drop TensorFlow's "triggered tf.function retracing" warning: predict runs several models (two
    views, the gate, Grad-CAM) whose first calls each trace once, and the last batch of a job is
    smaller; TensorFlow counts those together as excessive retracing, and the warning breaks the
    progress bar while telling the user nothing they can act on."""
    return "triggered tf.function retracing" not in record.getMessage()


def import_keras():
    """Import Keras (and its backend) with TensorFlow's start-up noise dropped; other lines pass through.

    A backend that is not installed (``KERAS_BACKEND=jax`` without jax) becomes a
    :class:`FundusError` naming it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "keras" in sys.modules:
        return sys.modules["keras"]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.config.list_physical_devices("GPU")  # cuInit happens here, not at the first training step
                tf.get_logger().addFilter(_quiet_retracing)
        except (ImportError, ValueError) as exc:  # Keras raises ValueError for a backend it does not know
            backend = os.environ.get("KERAS_BACKEND", "tensorflow")
            package = getattr(exc, "name", None) or backend
            raise FundusError(
                f"cannot load Keras with the {backend!r} backend (KERAS_BACKEND): {exc}; install it "
                f"(pip install {package}) or set KERAS_BACKEND to an installed backend (tensorflow by default)"
            ) from None
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if line.strip() and not _STARTUP_NOISE.search(line):
                    print(line, file=sys.stderr)
    return keras


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A user-facing warning as one ``warning:`` line (the project's own speak to the user; the
    source line of the ``warnings.warn`` call means nothing to them)."""
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; print a :class:`FundusError` as ``error: ...`` and return 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides our output
    warnings.showwarning = _warning_line
    try:
        return int(main(argv) or 0)
    except FundusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`predict.py --model-card | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would raise again
        return 1


def check_run_folder(run_dir: str | os.PathLike) -> None:
    """Refuse a run folder that does not exist, before Keras starts (which takes seconds to minutes)."""
    from pathlib import Path

    path = Path(run_dir)
    if path.is_file():
        raise FundusError(f"{path} is a file; give the run folder of scripts/train_pair.py")
    if not path.is_dir():
        raise FundusError(
            f"{path}: no such folder, so no trained view model; run scripts/train_pair.py first or give its run folder"
        )


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a model: a run of train_pair (a view model or run.json) or a bundle."""
    from pathlib import Path

    path = Path(path)
    return path.is_dir() and any(
        (path / name).is_file() for name in ("run.json", "bundle.json", "color/model.keras", "gray_eq/model.keras")
    )


def run_and_input(paths: list[str], model: str | None, single: bool) -> tuple[str, str | None]:
    """predict.py's ``[RUN] [INPUT]``: the model to use ("bundled" when none is named) and the photos."""
    if model is not None:
        if len(paths) > 1:
            raise FundusError(f"with --model give at most INPUT, got {len(paths)} paths: {' '.join(paths)}")
        return model, (paths[0] if paths else None)
    if len(paths) > 2:
        raise FundusError(f"expected [RUN] [INPUT], got {len(paths)} paths: {' '.join(paths)}")
    if len(paths) == 2:
        return paths[0], paths[1]
    if len(paths) == 1 and is_model_folder(paths[0]):
        if not single:
            raise FundusError(f"{paths[0]} is a model; give the photos too (a folder, a manifest, or --left/--right)")
        return paths[0], None
    return "bundled", (paths[0] if paths else None)


def parse_fractions(values: list[float]) -> dict[str, float]:
    """``--fractions TRAIN VAL TEST`` to a split-fraction mapping."""
    if len(values) != 3:
        raise FundusError(f"--fractions takes three numbers (train val test), got {values}")
    return dict(zip(("train", "val", "test"), values))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, unless its help already gives it or there is none to give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)
