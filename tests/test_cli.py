"""The command line a researcher expects (issue 10): no traps, quiet logs, one meaning per flag."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from fundus_ensemble.errors import FundusError
from fundus_ensemble.evaluation.calibration import fit_calibration
from fundus_ensemble.training.config import TrainConfig

# runs again under KERAS_BACKEND=jax in CI (README, tests)
pytestmark = pytest.mark.backend

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("*.py"))


def script(name, *args, env=None):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_no_retracing_warning_when_several_models_and_batch_sizes_predict():
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        pytest.skip("a TensorFlow warning")
    code = (
        "import numpy as np\nfrom fundus_ensemble.cli import import_keras\nkeras = import_keras()\n"
        "for n in range(1, 8):\n"
        "    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])\n"
        "    model.predict_on_batch(np.zeros((n, 4), np.float32))\n"
        "print('done')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]
    assert "retracing" not in done.stderr, done.stderr[-2000:]


def test_a_warning_is_one_warning_line(capsys):
    from fundus_ensemble.cli import run

    def main(argv):
        warnings.warn("labels.csv: ignoring unknown column(s) notes", stacklevel=2)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert run(main, []) == 0
    assert capsys.readouterr().err == "warning: labels.csv: ignoring unknown column(s) notes\n"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_imports_no_tensorflow(name):
    probe = (
        f"import runpy, sys; sys.argv = ['{name}', '--help']\n"
        f"try:\n    runpy.run_path({str(REPO / 'scripts' / name)!r}, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('LOADED' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'CLEAN')"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.stdout.strip().splitlines()[-1] == "CLEAN", f"{name} --help imported TensorFlow/Keras"


def test_the_model_card_is_printed_without_starting_keras():
    # the bundle's record is checked (its backbone among those this package builds) from the registry alone
    probe = (
        "import runpy, sys; sys.argv = ['predict.py', '--model-card']\n"
        f"try:\n    runpy.run_path({str(REPO / 'scripts' / 'predict.py')!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('LOADED' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'CLEAN')"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("# Model card") and lines[-1] == "CLEAN", (result.stdout[-500:], result.stderr[-2000:])


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `predict.py --model-card | head -1`: the pipe closes while the card is still being written
    code = "import sys\nfrom fundus_ensemble.cli import run\ndef main(argv):\n    raise BrokenPipeError(32, 'Broken pipe')\nsys.exit(run(main))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1 and result.stderr == "", result.stderr


def test_a_missing_keras_backend_is_one_error_line(tmp_path):
    (tmp_path / "run").mkdir()  # folders that exist: score gets as far as loading Keras
    (tmp_path / "prep").mkdir()
    result = script("score.py", tmp_path / "run", tmp_path / "prep", env={"KERAS_BACKEND": "no_such_backend"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load Keras with the 'no_such_backend' backend"), (
        result.stderr
    )


def test_keras_loads_without_start_up_noise(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "prep").mkdir()
    result = script("score.py", tmp_path / "run", tmp_path / "prep")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run'}: no trained view model (color/model.keras, gray_eq/model.keras); run scripts/train_pair.py first"
    ]


def test_weights_means_initial_weights_only():
    assert script("score.py", "run", "prep", "--weights", "imagenet").returncode == 2  # unknown flag for score.py
    assert "--ensemble-weights" in script("score.py", "--help").stdout
    for name in ("train_pair.py", "benchmark.py"):
        assert "imagenet" in script(name, "--help").stdout


def prep_with_size(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocess.json").write_text(json.dumps({"settings": {"size": size}}))
    return folder


def test_training_size_defaults_to_the_views_and_warns_on_another(tmp_path, capsys):
    from fundus_ensemble.training.train import with_views_size

    prep = prep_with_size(tmp_path / "prep", 96)
    assert with_views_size(TrainConfig(size=None), prep).size == 96
    assert capsys.readouterr().err == ""
    assert with_views_size(TrainConfig(size=128), prep).size == 128
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "96 px" in err[0]


def test_a_failed_start_leaves_no_run_folder(view_manifest, tmp_path, monkeypatch):
    from fundus_ensemble.training import train

    prep = Path(view_manifest.source).parent.parent
    with pytest.raises(FundusError, match="unknown backbone 'nope'"):
        train.train_pair(prep, tmp_path / "a", TrainConfig(backbone="nope", size=None), ("color",))
    with pytest.raises(FundusError, match="weights file not found"):
        train.train_pair(prep, tmp_path / "b", TrainConfig(weights=str(tmp_path / "none.h5"), size=None), ("color",))

    def no_weights(*args, **kwargs):
        raise FundusError("could not obtain ImageNet weights")

    monkeypatch.setattr(train, "build_patient_model", no_weights)  # fails inside, after the folders exist
    with pytest.raises(FundusError, match="ImageNet"):
        train.train_pair(prep, tmp_path / "c", TrainConfig(backbone="mobilenet", size=None), ("color",))
    assert not any((tmp_path / name).exists() for name in "abc")


def test_calibration_warns_once_with_class_letters():
    y = np.zeros((20, 8), int)
    y[:10, 0] = 1
    probs = np.random.default_rng(0).random((20, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        fit_calibration(y, probs)
        fit_calibration(y, probs)
    messages = [str(w.message) for w in caught if "calibration" in str(w.message)]
    assert len(messages) == 1 and "D, G, C, A, H, M, O" in messages[0] and "[" not in messages[0]


def test_the_keras_free_config_keeps_the_libraries_defaults():
    from fundus_ensemble.data.augment import DEFAULT_ROTATION
    from fundus_ensemble.models.losses import DEFAULT_POWER

    assert TrainConfig().rotation == DEFAULT_ROTATION and TrainConfig().pos_weight_power == DEFAULT_POWER
    from fundus_ensemble.training import heads

    assert heads.DEFAULT_POWER == DEFAULT_POWER, "the cross-fitted heads weigh positives as the networks' loss does"


def test_preprocess_help_names_the_real_exit_status():
    text = " ".join(script("preprocess.py", "--help").stdout.split())
    assert "exit with status 2" in text and "status 1" not in text


def test_train_pair_options_reach_the_config():
    spec = importlib.util.spec_from_file_location(
        "train_pair_script", Path(__file__).resolve().parents[1] / "scripts" / "train_pair.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = module.build_parser().parse_args
    default = module.config_from_args(parse(["prep", "--out", "run"]))
    assert default == TrainConfig(size=None)  # every option's default is the config's
    config = module.config_from_args(
        parse(
            [
                "prep",
                "--out",
                "run",
                "--backbone",
                "efficientnet_lite2",
                "--weights",
                "imagenet",
                "--fine-tune-fraction",
                "0.4",
                "--train-batchnorm",
                "--no-frozen-features",
            ]
        )
    )
    assert (config.backbone, config.weights, config.fine_tune_fraction) == ("efficientnet_lite2", "imagenet", 0.4)
    assert config.freeze_batchnorm is False and config.frozen_features is False
