import os
import shutil
import subprocess
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Under pytest -n N (CI: two workers on two cores) one thread per worker for TensorFlow, XLA and BLAS:
# two workers of two threads each on two cores lost an eighth of their time to each other (test_explain
# and test_bundle with -n 2: 155 s, 135 s with one thread each; scripts the tests start inherit this).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= 2:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
# The gradability gate judges real fundus photos; about a fifth of the synthetic ones look like none to
# its ImageNet check. Tests of everything else predict with it off (scripts they start inherit this);
# tests/test_quality.py turns it on and checks it.
os.environ["FUNDUS_QUALITY_GATE"] = "off"
# a bundled model is built into this cache on first use: the tests' own, never the user's ~/.cache
os.environ["FUNDUS_ENSEMBLE_CACHE"] = tempfile.mkdtemp(prefix="fundus-ensemble-cache-")

from pathlib import Path

import pytest

from fundus_ensemble.data.manifest import load_manifest
from fundus_ensemble.data.preprocess import preprocess_manifest
from fundus_ensemble.data.synthetic import write_synthetic_dataset
from fundus_ensemble.labels import LABELS

HEADER = "patient_id,left_image,right_image," + ",".join(LABELS) + ",split"


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """24 synthetic patients (JPEG photos + manifest); returns the manifest path."""
    root = tmp_path_factory.mktemp("small")
    return write_synthetic_dataset(root, 24, seed=7, diameter=120)


@pytest.fixture(scope="session")
def view_manifest(small_dataset, tmp_path_factory):
    """The color view (48 px) of the small dataset, as a loaded manifest."""
    out = tmp_path_factory.mktemp("prep")
    preprocess_manifest(load_manifest(small_dataset), out, size=48, workers=1, progress=False)
    return load_manifest(out / "color" / "manifest.csv")


def write_images(root: Path, *names: str) -> None:
    """Create placeholder files for manifest validation tests."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


@pytest.fixture(autouse=True)
def fresh_warn_once():
    """Each test sees warn_once's warnings afresh, whatever ran before it in this process."""
    import fundus_ensemble.errors

    fundus_ensemble.errors._warned.clear()


@pytest.fixture(scope="session")
def released(tmp_path_factory, small_dataset):
    """A bundle released from the small dataset (Lite0, 48 px, 3 folds): (root, bundle, work, record, image root);
    work/run is the cross-fitted run it came from, root/store the feature store it filled."""
    from test_benchmark import write_image_table

    from fundus_ensemble.inference import bundle

    root = tmp_path_factory.mktemp("release")
    write_image_table(small_dataset, root / "labels.csv")
    out, work = root / "bundle", root / "work"
    record = bundle.release(
        root / "labels.csv",
        small_dataset.parent,
        out,
        work,
        backbone="efficientnet_lite0",
        size=48,
        folds=3,
        command="python scripts/release_model.py (test)",
        feature_store=root / "store",
    )
    return root, out, work, record, small_dataset.parent


def chromium() -> tuple[str, str]:
    """Debian's chromium and its driver; installed here when missing (the test command's setup)."""
    if (
        not (shutil.which("chromium") and shutil.which("chromedriver"))
        and shutil.which("apt-get")
        and os.geteuid() == 0
    ):
        subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver",
            shell=True,
            capture_output=True,
            timeout=900,
        )
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("CI"):
            pytest.fail("no chromium/chromedriver and they could not be installed")
        pytest.skip("needs chromium and chromedriver (apt install chromium chromium-driver)")
    return browser, driver


def headless_chromium(tmp_path: Path):
    """A headless chromium driven by selenium (the caller quits it), with its profile in ``tmp_path``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    """``scripts/<name>`` with ``args``, run in this process as the command line runs it (its
    ``main`` through ``cli.run``: an error is one ``error:`` line and status 2), its output captured:
    a new interpreter per call would import TensorFlow again each time (seconds each)."""
    import contextlib
    import importlib.util
    import io

    from fundus_ensemble.cli import run

    path = Path(__file__).resolve().parents[1] / "scripts" / name
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = run(module.main, argv)
    return subprocess.CompletedProcess([name, *argv], status, out.getvalue(), err.getvalue())


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first: under ``--dist loadfile`` xdist hands whole modules to whichever
    worker is free, and a long module handed out last leaves the other worker idle at the end."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # stable: each module's order is kept
