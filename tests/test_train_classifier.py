"""train.classifier end to end: strategies, TensorBoard, resume, export, the CLI and its flags."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from _binaries import Background, binary
from absl import flags

from tf_iresnet import presets
from tf_iresnet.tasks.classifier import ClassifierTrainConfig, schedule_steps, train_classifier
from tf_iresnet.training import read_config

classifier = binary("classifier")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What these runs test (logs, checkpoints, resumption, export, flags) does not depend on the
# model's size: digits_classifier's three stages with one narrow block each. The binary's runs
# get the same (tests/_faults.py).
TINY = {"blocks": (1, 1, 1), "hidden_channels": (8, 8, 8)}
TINY_MODEL = dataclasses.replace(presets.config("digits_classifier"), **TINY)
LAUNCHER = os.path.join(REPO, "tests", "_faults.py")


def _env(**extra):
    return dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
                PYTHONPATH=REPO, PRESET_OVERRIDES=json.dumps({"digits_classifier": TINY}),
                **extra)


def _config(tmp_path, **changes):
    steps = changes.pop("train_steps", 6)
    warmup, decays = schedule_steps(steps)
    cfg = ClassifierTrainConfig(
        dataset="digits", preset="digits_classifier",
        model=TINY_MODEL, model_dir=str(tmp_path / "run"),
        export_dir="", batch_size=32, train_steps=steps, learning_rate=0.05,
        warmup_steps=warmup, decay_steps=decays, strategy="default", eval_every=3,
        checkpoint_every=3, log_every=2, num_images=8, jit_compile=False)
    return dataclasses.replace(cfg, **changes)


def _event_tags(logdir):
    tags = set()
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_end_to_end_then_resume_and_export(tmp_path, capsys):
    cfg = _config(tmp_path)
    results = train_classifier(cfg)
    assert results["step"] == 6 and results["num_replicas"] == 1
    assert 0.0 <= results["test_accuracy"] <= 1.0 and np.isfinite(results["final/xent"])
    assert results["reconstruction_max_abs_error"] < 1e-3
    assert read_config(cfg.model_dir, ClassifierTrainConfig) == cfg
    assert json.load(open(os.path.join(cfg.model_dir, "results.json")))["step"] == 6
    assert tf.train.latest_checkpoint(cfg.model_dir).endswith("ckpt-6")
    assert {"loss", "xent", "accuracy", "learning_rate"} <= _event_tags(
        os.path.join(cfg.model_dir, "train"))
    eval_tags = _event_tags(os.path.join(cfg.model_dir, "eval"))
    assert {"accuracy", "loss", "xent", "reconstruction_max_abs_error", "lipschitz_layer_max",
            "lipschitz_block_max", "images/inputs", "images/reconstructions"} <= eval_tags
    assert any(t.startswith("lipschitz/") for t in eval_tags)
    assert any(t.startswith("lipschitz_block/branch_") for t in eval_tags)
    first = tf.train.load_checkpoint(tf.train.latest_checkpoint(cfg.model_dir))
    # The non-trainable state is checkpointed too: ActNorm's flags, power-iteration vectors.
    # (Trainable weights may be saved under the optimizer's path to them instead.)
    # One ActNorm and three spectrally normalized convolutions per block.
    blocks = sum(cfg.model.blocks)
    saved = [k for k in first.get_variable_to_shape_map() if k.startswith("model/")]
    flags_saved = [k for k in saved if k.endswith("/initialized/.ATTRIBUTES/VARIABLE_VALUE")]
    assert len(flags_saved) == blocks and all(first.get_tensor(k) == 1 for k in flags_saved)
    for vector in ("u", "v"):
        assert sum(k.endswith(f"/{vector}/.ATTRIBUTES/VARIABLE_VALUE") for k in saved) == \
            3 * blocks
    capsys.readouterr()

    # Resume with a longer run, this time exporting.
    export_dir = str(tmp_path / "export")
    cfg2 = dataclasses.replace(cfg, train_steps=8, export_dir=export_dir)
    results = train_classifier(cfg2)
    assert "Training steps 6 -> 8" in capsys.readouterr().out
    assert results["step"] == 8
    after = tf.train.load_checkpoint(tf.train.latest_checkpoint(cfg.model_dir))
    key = next(k for k in first.get_variable_to_shape_map() if "iterations" in k)
    assert after.get_tensor(key) == first.get_tensor(key) + 2
    loaded = tf.saved_model.load(export_dir)
    x = tf.random.stateless_uniform([3, 8, 8, 1], seed=[1, 2])
    assert loaded.serving_default(x)["classes"].shape == (3,)
    np.testing.assert_allclose(loaded.reconstruct(x).numpy(), x.numpy(), atol=1e-4)


def test_two_replicas(tmp_path):
    assert len(tf.config.list_logical_devices("CPU")) == 2  # tests/conftest.py
    cfg = _config(tmp_path, strategy="mirrored", train_steps=4, eval_every=0,
                  checkpoint_every=0, export_dir=str(tmp_path / "export"))
    results = train_classifier(cfg)
    assert results["num_replicas"] == 2 and results["step"] == 4
    assert np.isfinite(results["loss"]) and 0.0 <= results["test_accuracy"] <= 1.0
    assert tf.train.latest_checkpoint(cfg.model_dir).endswith("ckpt-4")
    loaded = tf.saved_model.load(cfg.export_dir)  # exported from mirrored variables
    x = tf.random.stateless_uniform([3, 8, 8, 1], seed=[3, 4])
    np.testing.assert_allclose(loaded.reconstruct(x).numpy(), x.numpy(), atol=1e-4)


def test_hybrid_two_replicas_under_xla(tmp_path):
    """--jit_compile --strategy=mirrored: the hybrid objective (tfb.Chain +
    TransformedDistribution) compiled per replica, power iterations as the post-step."""
    tiny_hybrid = dataclasses.replace(presets.config("digits_hybrid"), blocks=(1, 1),
                                      hidden_channels=(16, 16))
    cfg = _config(tmp_path, preset="digits_hybrid", model=tiny_hybrid, train_steps=3,
                  strategy="mirrored", jit_compile=True, eval_every=0, checkpoint_every=0)
    results = train_classifier(cfg)
    assert results["num_replicas"] == 2 and results["step"] == 3
    assert np.isfinite(results["loss"]) and np.isfinite(results["test_bits_per_dim"])
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(cfg.model_dir))
    names = [k for k in reader.get_variable_to_shape_map() if k.endswith("/u/.ATTRIBUTES/"
                                                                         "VARIABLE_VALUE")]
    assert names  # the power-iteration state is checkpointed, hence was trained with


def test_hybrid_run(tmp_path):
    tiny_hybrid = dataclasses.replace(presets.config("digits_hybrid"), blocks=(1, 1),
                                      hidden_channels=(16, 16))
    cfg = _config(tmp_path, preset="digits_hybrid", model=tiny_hybrid, train_steps=4,
                  eval_every=0, checkpoint_every=0, export_dir=str(tmp_path / "export"))
    results = train_classifier(cfg)
    assert 0.0 < results["test_bits_per_dim"] < 10.0
    assert "bits_per_dim" in _event_tags(os.path.join(cfg.model_dir, "train"))
    loaded = tf.saved_model.load(cfg.export_dir)
    x = tf.random.stateless_uniform([3, 8, 8, 1], seed=[1, 2])
    assert np.isfinite(loaded.bits_per_dim(x).numpy()).all()


def _binary_command(model_dir):
    """The binary, 6 steps with a checkpoint every 2 (tests/_faults.py: the tiny preset, and
    faults from the environment)."""
    return [sys.executable, LAUNCHER, "train.classifier", f"--model_dir={model_dir}",
            "--export_dir=", "--train_steps=6", "--batch_size=16", "--eval_every=0",
            "--checkpoint_every=2", "--log_every=1", "--strategy=default", "--nojit_compile",
            "--coeff=0.8"]


def _run_binary(model_dir, **extra_env):
    return subprocess.run(_binary_command(model_dir), cwd=REPO, env=_env(**extra_env),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted_cli_run(tmp_path_factory):
    """The binary run that test_cli inspects and the killed run must match, started in the
    background (the kill test's runs go side by side with it); ``wait()`` gives the finished
    process."""
    tmp_path = tmp_path_factory.mktemp("cli")
    model_dir = tmp_path / "whole"
    run = Background(_binary_command(model_dir), out_dir=str(tmp_path / "output"), cwd=REPO,
                     env=_env())
    yield model_dir, run
    run.wait()


def _checkpoint_tensors(model_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if not k.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


def test_killed_run_resumes_bit_identically(uninterrupted_cli_run, tmp_path):
    """The classifier binary SIGKILLed while it writes ckpt-4 (after ckpt-2), restarted with
    the same command, ends with the weights, BatchNorm statistics, power-iteration vectors and
    optimizer state of an uninterrupted run, bit for bit. (Kills mid-training are covered for
    the shared driver by tests/test_train_density.py; augmentation's resume by
    tests/test_datasets.py.)"""
    killed = tmp_path / "killed"
    proc = _run_binary(killed, KILL_IN_SAVE="4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert tf.train.latest_checkpoint(str(killed)).endswith("ckpt-2")
    assert glob.glob(str(killed / "ckpt-4_temp*"))
    restart = _run_binary(killed)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "Training steps 2 -> 6" in restart.stdout
    assert not glob.glob(str(killed / "ckpt-*_temp*"))
    whole, run = uninterrupted_cli_run
    uninterrupted = run.wait()
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    expected, got = _checkpoint_tensors(str(whole)), _checkpoint_tensors(str(killed))
    assert expected.keys() == got.keys()
    assert any("moving_mean" in k for k in expected) and any("/u/" in k for k in expected)
    different = [k for k in expected if not np.array_equal(expected[k], got[k])]
    assert not different, different


def test_cli(uninterrupted_cli_run):
    model_dir, run = uninterrupted_cli_run
    proc = run.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy:" in proc.stdout and "reconstruction max abs error:" in proc.stdout
    assert "accuracy:" in proc.stdout.split("Training steps 0 -> 6", 1)[1]  # progress bar
    config = read_config(str(model_dir))
    assert config["train_steps"] == 6 and config["model"]["coeff"] == 0.8
    assert tuple(config["model"]["blocks"]) == TINY["blocks"]  # the launcher's tiny preset
    assert config["preset"] == "digits_classifier" and config["l2_penalty"] == 5e-4


def _parse(args):
    fv = flags.FlagValues()
    classifier.define_flags(fv)
    fv(["train.classifier", *args])
    return classifier.config_from_flags(fv)


def test_flag_defaults_and_overrides():
    cfg = _parse([])
    assert (cfg.dataset, cfg.preset, cfg.batch_size) == ("digits", "digits_classifier", 64)
    assert cfg.train_steps == round(30 * 1500 / 64) and cfg.learning_rate == 0.05
    assert cfg.warmup_steps == schedule_steps(cfg.train_steps)[0] > 0
    assert len(cfg.decay_steps) == 3 and cfg.l2_penalty == 5e-4 and not cfg.augment
    assert cfg.model_dir == os.path.join("runs", "digits_classifier_digits")
    assert cfg.export_dir == os.path.join("saved_models", "digits_classifier")
    cfg = _parse(["--preset=digits_hybrid", "--epochs=2", "--coeff=0.8", "--batch_size=50",
                  "--export_dir="])
    assert cfg.train_steps == 60 and cfg.export_dir == ""
    assert cfg.model.coeff == 0.8 and cfg.model.hybrid
    # The paper's schedule for CIFAR: warm-up 10 epochs, x0.2 at epochs 60, 120 and 160.
    cfg = _parse(["--dataset=cifar10", "--preset=cifar10_classifier_paper"])
    epoch = 50_000 / 128
    assert cfg.augment and cfg.learning_rate == 0.1 and cfg.model.power_iterations == 1
    assert abs(cfg.warmup_steps - 10 * epoch) <= 1
    assert all(abs(d - e * epoch) <= 1 for d, e in zip(cfg.decay_steps, (60, 120, 160),
                                                        strict=True))


@pytest.mark.parametrize("args, message", [
    (["--coeff=1.5"], "--coeff must be in the open interval (0, 1)"),
    (["--train_steps=5", "--epochs=1"], "not both"),
    (["--preset=cifar10_classifier_paper"], "pick a matching --preset"),
    (["--dataset=cifar100", "--preset=cifar10_classifier_paper"], "100 classes"),
    (["--hybrid_weight=1"], "needs pad_channels=0"),
    (["--preset=digits_density"], "should be one of"),
    (["--batch_size=0"], "batch_size"),
    (["--lr=0"], "--lr must be > 0"),
    (["--strategy=tpu"], "strategy"),
])
def test_bad_flags_are_refused(args, message):
    with pytest.raises(flags.Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        _parse(args)
