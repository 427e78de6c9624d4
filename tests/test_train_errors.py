"""Bad runs get one clear line: every flag with a bad value, unusable directories, data that is
not on disk, and a multi-worker run that loses a worker."""

import glob
import os
import re
import subprocess
import sys
import time

import _bad_flags
import pytest
import tensorflow as tf
from _cluster import start_workers

from tf_iresnet import datasets
from tf_iresnet.tasks import common
from tf_iresnet.tasks.common import ConfigError
from tf_iresnet.tasks.density import DensityTrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    return dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
                PYTHONPATH=REPO, **extra)


@pytest.mark.parametrize("changes, message", [
    ({"seed": -1}, "seed must be an integer in [0, 2147483646]"),
    ({"seed": 2**31}, "seed must be an integer in [0, 2147483646]"),
    ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 1501}, "larger than the 1500 training examples of 'digits'"),
    ({"train_steps": -1}, "train_steps must be an integer >= 0"),
    ({"eval_every": -1}, "eval_every must be an integer >= 0"),
    ({"checkpoint_every": 1.5}, "checkpoint_every must be an integer >= 0"),
    ({"log_every": 0}, "log_every must be a positive integer"),
])
def test_run_config_refuses_values_no_run_can_use(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DensityTrainConfig(**changes)


def test_generated_streams_take_any_batch_size():
    assert DensityTrainConfig(dataset="moons", preset="toy2d_density",
                              batch_size=100_000).batch_size == 100_000


def test_epochs_must_be_positive():
    with pytest.raises(ConfigError, match="epochs must be > 0"):
        common.steps_for_epochs("digits", 0, 64)


def test_run_dirs_are_checked(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    common.check_run_dirs(str(tmp_path / "run"), str(tmp_path / "exports" / "model"))
    assert (tmp_path / "run").is_dir() and (tmp_path / "exports").is_dir()
    assert not (tmp_path / "exports" / "model").exists()  # left to the export
    for model_dir, export_dir, message in [
            (str(a_file), "", "model_dir .* is a file, not a directory"),
            (str(a_file / "run"), "", "model_dir .* cannot be created"),
            (str(tmp_path / "run"), str(a_file), "export_dir .* is a file"),
            (str(tmp_path / "run"), str(a_file / "sub" / "model"), "export_dir .* cannot be")]:
        with pytest.raises(ConfigError, match=message):
            common.check_run_dirs(model_dir, export_dir)


def test_tfds_data_not_on_disk_is_reported_not_downloaded(tmp_path):
    start = time.time()
    with pytest.raises(datasets.DataNotFoundError) as info:
        datasets.check_available("mnist", data_dir=str(tmp_path))
    assert time.time() - start < 30  # no download attempts
    message = str(info.value)
    assert str(tmp_path) in message and "tfds build mnist" in message
    assert "--data_dir" in message and "offline" in message
    with pytest.raises(datasets.DataNotFoundError):
        datasets.load("mnist", batch_size=4, data_dir=str(tmp_path))
    datasets.check_available("digits")  # bundled and generated sets are always there
    datasets.check_available("moons")
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        datasets.check_available("mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("binary", ["density", "classifier"])
def test_every_bad_flag_gets_a_clear_error(binary, tmp_path):
    """tests/_bad_flags.py: every flag of the binary with a bad value (about 45 cases per
    binary), parsed, resolved and pre-flighted in the test process. (The binaries print such
    an error as one line and exit 1: test_binaries_print_one_line_and_exit_1.)"""
    out = _bad_flags.sweep(binary, str(tmp_path))
    unclear = {k: v for k, v in out.items() if v[0] != "clear"}
    assert not unclear
    assert len(out) >= 40
    assert "2147483646" in out["seed_negative"][1]
    assert "--lr must be > 0" in out["lr_zero"][1]
    assert "--epochs must be > 0" in out["epochs_zero"][1]
    assert "larger than the 1500 training examples" in out["batch_size_over_dataset"][1]
    assert "is a file" in out["model_dir_is_file"][1]
    assert "tfds build mnist" in out["tfds_not_prepared"][1]
    if binary == "density":
        assert "use it with recompute=False" in out["logdet_in_forward_recompute"][1]
        assert "needs logdet one of" in out["logdet_in_forward_exact"][1]


def test_binaries_print_one_line_and_exit_1(tmp_path):
    """The real binaries: an error found before training is one line on stderr, status 1."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    runs = {
        "density": ["train.density", f"--model_dir={a_file}", "--export_dir=",
                    "--train_steps=1"],
        "classifier": ["train.classifier", f"--model_dir={tmp_path / 'run'}", "--export_dir=",
                       "--dataset=mnist", "--preset=mnist_classifier_paper",
                       f"--data_dir={tmp_path / 'no_data'}", "--train_steps=1"],
    }
    expected = {"density": "is a file, not a directory", "classifier": "tfds build mnist"}
    for name, args in runs.items():
        proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and expected[name] in errors[0], proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / "config.json")  # nothing written


@pytest.mark.slow
def test_lost_worker_is_named_and_restart_resumes(tmp_path):
    """Kill the chief of a two-worker run after a checkpoint: the other worker stops with one
    line naming it; restarting both resumes from the chief's newest checkpoint."""
    procs, ports = start_workers(tmp_path / "run", ["--train_steps=100000", "--n_terms=1"],
                                 tmp_path, "first")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not glob.glob(str(tmp_path / "run" / "ckpt-4.index")):
            assert procs[0].poll() is None, (tmp_path / "first_err0").read_text()[-3000:]
            time.sleep(0.5)
        assert glob.glob(str(tmp_path / "run" / "ckpt-4.index")), "no checkpoint written"
        procs[0].kill()
        killed = time.time()
        returncode = procs[1].wait(timeout=120)
        lost_after = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    stderr = (tmp_path / "first_err1").read_text()
    assert returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert f"lost worker 0 (127.0.0.1:{ports[0]})" in errors[0]
    assert "Restart every worker" in errors[0] and "newest checkpoint" in errors[0]
    print(f"worker 1 stopped {lost_after:.1f} s after the chief was killed")

    saved = int(tf.train.latest_checkpoint(str(tmp_path / "run")).rsplit("-", 1)[1])
    procs, _ = start_workers(tmp_path / "run", [f"--train_steps={saved + 2}", "--n_terms=1"],
                             tmp_path, "again")  # both resume at `saved`
    for index, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"again_err{index}").read_text()[-3000:]
    out = (tmp_path / "again_out0").read_text() + (tmp_path / "again_err0").read_text()
    assert f"Training steps {saved} -> {saved + 2}" in out
    assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith(f"ckpt-{saved + 2}")
