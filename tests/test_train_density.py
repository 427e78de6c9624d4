"""train.density end to end: strategies, TensorBoard, resume, tfds, export in a fresh process."""

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
from _binaries import Background
from _binaries import config as binary_config
from _cluster import start_workers
from absl import flags

from tf_iresnet.tasks.common import ConfigError
from tf_iresnet.tasks.density import DensityTrainConfig, train_density

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(jit_compile=False, log_every=2, num_samples=4, eval_examples=64)
TINY_IMAGE = {"blocks": (1, 1, 1), "hidden_channels": 8, "power_iterations": 1}
TINY_2D = {"blocks": (2,), "hidden_channels": 16, "eval_logdet": "exact"}
TINY_DIGITS = {"blocks": (1, 1), "hidden_channels": 8}
# The binary's runs below train these sizes of its presets (tests/_faults.py): what they test
# (flags, logs, checkpoints, resumption, export) does not depend on the model's size.
TINY_PRESETS = {"digits_density": TINY_DIGITS,
                "toy2d_density": {k: TINY_2D[k] for k in ("blocks", "hidden_channels")}}
LAUNCHER = os.path.join(REPO, "tests", "_faults.py")


def _env(**extra):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=REPO, PRESET_OVERRIDES=json.dumps(TINY_PRESETS))
    env.update(extra)
    return env


def _binary_command(args):
    """``python -m train.density ARGS`` with the tiny presets (and faults from the env)."""
    return [sys.executable, LAUNCHER, "train.density", *args]


def _run_binary(args, **env):
    return subprocess.run(_binary_command(args), cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=300)


def _event_tags(logdir):
    tags = set()
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


# A fresh interpreter that cannot import the project, Keras or TFP, and checks the endpoints
# of each export in its argument (JSON: [[export_dir, event shape], ...]).
_LOAD_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, os, sys
    sys.path = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != sys.argv[2]]
    import numpy as np
    import tensorflow as tf  # TF probes for keras while importing: block afterwards
    BLOCKED = ("tf_iresnet", "keras", "tensorflow_probability", "train")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())
    for mod in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[mod]
    for name in ("tf_iresnet", "keras", "tensorflow_probability"):
        try:
            __import__(name)
            raise SystemExit("import of " + name + " should fail")
        except ImportError:
            pass
    def error_of(fn, *args):
        try:
            fn(*args)
            return "no error"
        except Exception as e:
            return str(e)
    def check(export_dir, shape):
        m = tf.saved_model.load(export_dir)
        x = tf.random.stateless_uniform([5] + shape, seed=[1, 2])
        out = {"log_prob": m.log_prob(x).numpy().tolist(),
               "bits_per_dim": m.bits_per_dim(x).numpy().tolist()}
        z = m.encode(x)
        out["z_shape"] = z.shape.as_list()
        out["rec_err"] = float(tf.reduce_max(tf.abs(m.decode(z) - x)))
        s1 = m.sample(tf.constant(3), tf.constant(11))
        s2 = m.sample(tf.constant(3), tf.constant(11))
        s3 = m.sample(tf.constant(3), tf.constant(12))
        out["sample_shape"] = s1.shape.as_list()
        out["same_seed_equal"] = bool(np.array_equal(s1.numpy(), s2.numpy()))
        out["other_seed_differs"] = not np.array_equal(s1.numpy(), s3.numpy())
        out["sample_range"] = [float(tf.reduce_min(s1)), float(tf.reduce_max(s1))]
        errors = {}
        bad = {"shape": tf.zeros([2] + shape[:-1] + [shape[-1] + 2]), "range": 2.0 + x,
               "dtype": tf.cast(x, tf.float64), "nan": x * float("nan")}
        for endpoint in ("log_prob", "bits_per_dim", "encode"):
            errors[endpoint] = {k: error_of(getattr(m, endpoint), v) for k, v in bad.items()}
        d = z.shape[-1]
        errors["decode"] = {"shape": error_of(m.decode, tf.zeros([2, d + 1])),
                            "nan": error_of(m.decode, z * float("nan"))}
        errors["sample"] = {"n": error_of(m.sample, tf.constant(0), tf.constant(1))}
        out["errors"] = errors
        sig_bad = {"shape": bad["shape"], "rank": tf.zeros(shape)}
        out["signature_errors"] = {k: error_of(lambda v: m.signatures["log_prob"](x=v), v)
                                   for k, v in sig_bad.items()}
        empty = tf.zeros([0] + shape)
        out["empty"] = {k: getattr(m, k)(tf.zeros([0, d]) if k == "decode" else empty)
                        .shape.as_list() for k in ("log_prob", "bits_per_dim", "encode", "decode")}
        return out
    print("RESULT" + json.dumps([check(e, s) for e, s in json.loads(sys.argv[1])]))
""")


def _load_in_fresh_process(exports, tmp_path):
    """Runs `_LOAD_SCRIPT` on ``exports`` ([(export_dir, shape), ...]) in one process that
    cannot import the project; returns its findings, one dict per export."""
    script = tmp_path / "load_export.py"
    script.write_text(_LOAD_SCRIPT)
    arg = json.dumps([[export_dir, list(shape)] for export_dir, shape in exports])
    proc = subprocess.run([sys.executable, str(script), arg, REPO],
                          cwd=str(tmp_path), env=dict(_env(), PYTHONPATH=""),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def _check_export(out, shape, num_levels):
    """The findings of `_LOAD_SCRIPT` on an export of event shape ``shape``."""
    d = int(np.prod(shape))
    lp = np.array(out["log_prob"])
    assert lp.shape == (5,) and np.isfinite(lp).all()
    discrete = np.log2(num_levels) if num_levels else 0.0  # continuous 2-D data: no bins
    np.testing.assert_allclose(out["bits_per_dim"], -lp / (d * np.log(2)) + discrete, rtol=1e-5)
    assert out["z_shape"] == [5, d]
    assert out["rec_err"] < 1e-4
    assert out["sample_shape"] == [3, *shape]
    assert out["same_seed_equal"] and out["other_seed_differs"]
    if len(shape) == 3:
        assert 0.0 <= out["sample_range"][0] <= out["sample_range"][1] <= 1.0
    typed = "TensorSpec(shape=(None, " + ", ".join(map(str, shape))
    for endpoint in ("log_prob", "bits_per_dim", "encode"):
        errors = out["errors"][endpoint]
        assert typed in errors["shape"]  # the typed signature refuses it, naming the shape
        assert "float32" in errors["dtype"]
        assert "must be finite" in errors["nan"]
        if len(shape) == 3:  # images live in [0, 1]; 2-D points are unbounded
            assert "values must lie in [0, 1]" in errors["range"]
    assert f"TensorSpec(shape=(None, {d})" in out["errors"]["decode"]["shape"]
    for key in ("shape", "rank"):  # signatures do not check shapes: the in-graph check does
        assert "must have shape [batch, " + ", ".join(map(str, shape)) in \
            out["signature_errors"][key]
    assert out["empty"] == {"log_prob": [0], "bits_per_dim": [0], "encode": [0, d],
                            "decode": [0, *shape]}
    assert "must be finite" in out["errors"]["decode"]["nan"]
    assert "n (number of samples) must be >= 1" in out["errors"]["sample"]["n"]


# --- The module's shared runs ------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_cli_run(tmp_path_factory):
    """The binary on digits, 6 steps, evaluated, checkpointed and exported: started in the
    background (the test process trains meanwhile); ``wait()`` gives the finished process."""
    tmp_path = tmp_path_factory.mktemp("digits_cli")
    model_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
    run = Background(_binary_command([
        "--dataset=digits", "--preset=digits_density", f"--model_dir={model_dir}",
        f"--export_dir={export_dir}", "--train_steps=6", "--eval_every=3",
        "--checkpoint_every=3", "--log_every=2", "--batch_size=32", "--nojit_compile",
        "--num_samples=4", "--eval_examples=64", "--power_iterations=1"]),
        out_dir=str(tmp_path / "output"), cwd=REPO, env=_env())
    yield run, model_dir, export_dir
    run.wait()


def _strategy_config(dataset, strategy, tmp_path):
    toy = dataset == "moons"
    return DensityTrainConfig(
        dataset=dataset, preset="toy2d_density" if toy else "digits_density",
        model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), batch_size=32,
        train_steps=6, eval_every=3, checkpoint_every=3, strategy=strategy,
        model_overrides=TINY_2D if toy else TINY_DIGITS, **FAST)


@pytest.fixture(scope="module")
def moons_default_run(tmp_path_factory):
    cfg = _strategy_config("moons", "default", tmp_path_factory.mktemp("moons_default"))
    return cfg, train_density(cfg)


@pytest.fixture(scope="module")
def digits_mirrored_run(tmp_path_factory):
    """Two replicas: also the uninterrupted run that the resumed one must match."""
    cfg = _strategy_config("digits", "mirrored", tmp_path_factory.mktemp("digits_mirrored"))
    return cfg, train_density(cfg)


@pytest.fixture(scope="module")
def fresh_process_exports(digits_cli_run, moons_default_run, tmp_path_factory):
    """What a fresh process without the project finds in the digits and the moons export."""
    run, _, digits_export = digits_cli_run
    proc = run.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    digits, moons = _load_in_fresh_process(
        [(digits_export, (8, 8, 1)), (moons_default_run[0].export_dir, (2,))],
        tmp_path_factory.mktemp("load"))
    return {"digits": digits, "moons": moons}


def test_digits_cli_end_to_end_and_export(digits_cli_run, fresh_process_exports):
    run, model_dir, _ = digits_cli_run
    proc = run.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    bpd = float(re.search(r"test bits/dim: ([0-9.]+)", proc.stdout).group(1))
    assert 0.5 < bpd < 10.0
    assert os.path.exists(os.path.join(model_dir, "samples.png"))
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["train_steps"] == 6 and config["model"]["power_iterations"] == 1
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-6")
    train_tags = _event_tags(os.path.join(model_dir, "train"))
    assert {"loss", "bits_per_dim", "log_pz_per_dim", "logdet_per_dim",
            "learning_rate"} <= train_tags
    eval_tags = _event_tags(os.path.join(model_dir, "eval"))
    assert {"bits_per_dim", "reconstruction_max_abs_error", "inverse_iterations_max",
            "lipschitz_layer_max", "lipschitz/layer_estimates", "images/samples",
            "images/reconstructions", "images/data"} <= eval_tags
    assert any(t.startswith("lipschitz/branch_") for t in eval_tags)
    _check_export(fresh_process_exports["digits"], (8, 8, 1), 17)


@pytest.mark.parametrize("dataset, strategy", [
    ("moons", "mirrored"), ("digits", "mirrored"), ("moons", "default")])
def test_runs_on_strategies(dataset, strategy, tmp_path, request):
    assert len(tf.config.list_logical_devices("CPU")) == 2  # tests/conftest.py
    toy = dataset == "moons"
    if (dataset, strategy) == ("moons", "mirrored"):
        cfg = _strategy_config(dataset, strategy, tmp_path)
        results = train_density(cfg)
    else:  # shared with the export and resumption tests
        cfg, results = request.getfixturevalue(f"{dataset}_{strategy}_run")
    assert results["num_replicas"] == (2 if strategy == "mirrored" else 1)
    assert np.isfinite(results["test_bits_per_dim"])
    assert results["loss"] < 20 and np.isfinite(results["loss"])
    if strategy == "default":
        # A fresh process, no project.
        _check_export(request.getfixturevalue("fresh_process_exports")["moons"], (2,), None)
        # A rerun on a finished model_dir trains nothing but still reports the final figures
        # (without exporting again: the checks below read the first run's export).
        again = train_density(dataclasses.replace(cfg, export_dir=""))
        assert again["step"] == 6 and "loss" not in again
        np.testing.assert_allclose(again["test_bits_per_dim"], results["test_bits_per_dim"],
                                   rtol=1e-4)
    eval_tags = _event_tags(os.path.join(cfg.model_dir, "eval"))
    if toy:
        assert os.path.exists(os.path.join(cfg.model_dir, "density.png"))
        assert "images/density" in eval_tags
    assert any(t.startswith("lipschitz_layers/") for t in eval_tags)
    loaded = tf.saved_model.load(cfg.export_dir)
    x = (tf.random.stateless_normal([4, 2], seed=[1, 1]) if toy
         else tf.random.stateless_uniform([4, 8, 8, 1], seed=[1, 1]))
    assert np.isfinite(loaded.log_prob(x).numpy()).all()
    np.testing.assert_allclose(loaded.decode(loaded.encode(x)).numpy(), x.numpy(), atol=1e-4)


@pytest.mark.slow  # over the CI time budget: `make test-slow`
def test_tfds_path_under_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    cfg = DensityTrainConfig(
        dataset="mnist", preset="bench_mnist", model_dir=str(tmp_path / "run"), export_dir="",
        batch_size=8, train_steps=2, eval_every=0, checkpoint_every=0, strategy="default",
        model_overrides=TINY_IMAGE, **{**FAST, "eval_examples": 16})
    with tfds.testing.mock_data(num_examples=32):
        results = train_density(cfg)
    assert np.isfinite(results["test_bits_per_dim"])




def _checkpoint_tensors(model_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if not k.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


def test_killed_runs_resume_bit_identically(tmp_path):
    """A run SIGKILLed inside a checkpoint write and again mid-training, restarted with the
    same command until done, ends with the weights and optimizer state of an uninterrupted
    run, bit for bit (the data of step k depends on (seed, k) only)."""
    def args(model_dir):
        return ["--dataset=moons", "--preset=toy2d_density", f"--model_dir={model_dir}",
                "--export_dir=", "--batch_size=16", "--checkpoint_every=3", "--eval_every=0",
                "--log_every=1", "--nojit_compile", "--eval_examples=32", "--train_steps=12"]

    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    # The uninterrupted run, side by side with the first killed one.
    uninterrupted = Background(_binary_command(args(whole)), out_dir=str(tmp_path / "output"),
                               cwd=REPO, env=_env())
    # 1. Killed between writing ckpt-6's shards and merging them into place.
    proc = _run_binary(args(killed), KILL_IN_SAVE="6")
    assert uninterrupted.wait().returncode == 0, uninterrupted.wait().stderr[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert tf.train.latest_checkpoint(killed).endswith("ckpt-3")
    assert glob.glob(os.path.join(killed, "ckpt-6_temp*"))
    # 2. Restarted, then killed mid-training once ckpt-6 exists.
    proc = subprocess.Popen(_binary_command(args(killed)), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not glob.glob(
                os.path.join(killed, "ckpt-6.index")):
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # 3. Restarted until done: the stale lock and temp directory are taken over / removed.
    restart = _run_binary(args(killed))
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert not glob.glob(os.path.join(killed, "ckpt-*_temp*"))
    expected, got = _checkpoint_tensors(whole), _checkpoint_tensors(killed)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not np.array_equal(expected[k], got[k])]
    assert not different, different


def test_resume_under_mirrored_matches_an_uninterrupted_run(digits_mirrored_run, tmp_path,
                                                            capsys):
    """Two replicas: a run that lost everything after ckpt-3 and was restarted ends within
    float round-off of the uninterrupted run (each replica's dequantization noise and probes
    depend on (seed, step, replica) only)."""
    cfg, results = digits_mirrored_run
    assert results["num_replicas"] == 2
    resumed = str(tmp_path / "resumed")
    shutil.copytree(cfg.model_dir, resumed)
    for path in glob.glob(os.path.join(resumed, "ckpt-6.*")) + [
            os.path.join(resumed, "results.json")]:
        os.remove(path)
    with open(os.path.join(resumed, "checkpoint"), "w") as f:  # as it was after ckpt-3
        f.write('model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
    capsys.readouterr()
    assert train_density(dataclasses.replace(cfg, model_dir=resumed, export_dir=""))["step"] == 6
    assert "Training steps 3 -> 6" in capsys.readouterr().out
    expected, got = _checkpoint_tensors(cfg.model_dir), _checkpoint_tensors(resumed)
    assert tf.train.latest_checkpoint(resumed).endswith("ckpt-6")
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)

@pytest.mark.slow  # over the CI time budget: `make test-slow`
def test_multi_worker_mirrored_two_processes(tmp_path):
    """Two workers on one model_dir train to identical weights; the chief checkpoints."""
    procs, _ = start_workers(tmp_path / "run", ["--train_steps=4"], tmp_path, "run")
    for index, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"run_err{index}").read_text()[-3000:]
    sums = [re.search(r"final weights checksum: (\S+)",
                      (tmp_path / f"run_out{index}").read_text()).group(1) for index in range(2)]
    assert sums[0] == sums[1]
    assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith("ckpt-4")




def test_defaults_depend_on_the_kind_of_data(tmp_path):
    # 2-D sets train with larger batches and a larger rate than images (tasks.density).
    cfg = binary_config("density", ["--dataset=moons", "--preset=toy2d_density",
                                    "--train_steps=0", "--export_dir=", "--nojit_compile",
                                    f"--model_dir={tmp_path}", "--num_samples=4"])
    assert (cfg.batch_size, cfg.learning_rate) == (512, 1e-2)
    # --train_steps=0 only evaluates (the tiny model of the binary tests).
    results = train_density(dataclasses.replace(cfg, model_overrides=TINY_2D))
    config = json.load(open(tmp_path / "config.json"))
    assert (config["batch_size"], config["learning_rate"]) == (512, 1e-2)
    assert results["step"] == 0 and np.isfinite(results["test_bits_per_dim"])


@pytest.mark.parametrize("args, message", [
    (["--coeff=1.5"], "--coeff must be in the open interval (0, 1)"),
    (["--dataset=mnist", "--preset=digits_density"], "disagree on the event shape"),
    (["--preset=nope"], "--preset"),
    (["--train_steps=5", "--epochs=1"], "not both"),
    (["--dataset=moons", "--preset=toy2d_density", "--epochs=1"],
     "--epochs: 'moons' is an infinite generated stream"),
    (["--probe=uniform"], "--probe"),
    (["--strategy=multi_worker_mirrored", "--train_steps=1"], "TF_CONFIG"),
])
def test_bad_flags_are_refused(args, message, tmp_path, monkeypatch):
    # In the test process: the binary's flags, resolved and run as its main does. The binary
    # prints either error as one line and exits with status 1 (test_a_bad_flag_stops_the_binary
    # below; tests/test_train_errors.py for a ConfigError).
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises((flags.Error, ConfigError)) as info:
        train_density(binary_config("density", [f"--model_dir={tmp_path / 'run'}",
                                                "--export_dir=", *args]))
    assert message in str(info.value)


def test_a_bad_flag_stops_the_binary():
    proc = subprocess.run([sys.executable, "-m", "train.density", "--coeff=1.5"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "--coeff must be in the open interval (0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow  # over the CI time budget: `make test-slow`
def test_recompute_trains_identically_under_mirrored_xla(tmp_path):
    # Gradient checkpointing changes where the block is computed, not what: the same losses,
    # with the train step XLA-compiled on two replicas.
    losses = {}
    for recompute in (False, True):
        cfg = DensityTrainConfig(
            dataset="digits", preset="digits_density", model_dir=str(tmp_path / f"r{recompute}"),
            export_dir=str(tmp_path / f"e{recompute}"), batch_size=32, train_steps=3,
            eval_every=3, checkpoint_every=0, strategy="mirrored",
            model_overrides={"blocks": (1, 1), "hidden_channels": 8, "recompute": recompute},
            **{**FAST, "jit_compile": True, "eval_examples": 32})
        losses[recompute] = train_density(cfg)["loss"]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
