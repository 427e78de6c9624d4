"""Tests of the shared training machinery (`tf_iresnet.training`) on a tiny linear regression.

The model, data and step function live in `tests/_workers.py`, which the kill-and-restart and
multi-worker tests also run as subprocesses. conftest.py splits the CPU into two logical
devices, so the `mirrored` strategy has two replicas here.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import _workers
import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet.training import (
    CheckpointError,
    CheckpointState,
    NonFiniteLossError,
    RunDirError,
    RunLock,
    Trainer,
    WarmupSchedule,
    check_output_dirs,
    image_summary,
    is_chief,
    make_image_grid,
    make_strategy,
    read_config,
    save_image_grid,
    swap_in_directory,
    write_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_SCRIPT = os.path.join(REPO, "tests", "_workers.py")
GLOBAL_BATCH = 16


# --------------------------------------------------------------------------- helpers


def make_trainer(strategy, model_dir, total_steps, **kwargs):
    """A Trainer on a fresh zero-initialised model (Adam) for the linear regression."""
    model, optimizer = _workers.make_model_and_optimizer(strategy)
    kwargs.setdefault("log_every", 5)
    kwargs.setdefault("checkpoint_every", 0)
    kwargs.setdefault("progress", False)
    trainer = Trainer(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        train_step_fn=kwargs.pop("train_step_fn", _workers.step_fn),
        model_dir=str(model_dir),
        total_steps=total_steps,
        **kwargs,
    )
    return trainer


def dataset():
    """64 examples in batches of 16: 4 steps per pass, the same batches in every run."""
    x, y = _workers.make_data(64)
    return _workers.make_dataset(x, y, GLOBAL_BATCH)


def values(variables):
    return [np.asarray(v.numpy()) for v in variables]


def assert_all_close(a, b, **kwargs):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, **kwargs)


def read_events(logdir):
    """tag -> list of (step, value ndarray) from the TF2 event files in `logdir`."""
    events = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                events.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    return events


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def worker_env(**extra):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        **extra,
    )
    return env


def worker_cmd(model_dir, steps, out, **flags):
    cmd = [sys.executable, WORKER_SCRIPT, f"--model_dir={model_dir}", f"--steps={steps}"]
    cmd += [f"--out={out}"] + [f"--{k}={v}" for k, v in flags.items()]
    return cmd


def run_worker(cmd, env, timeout=120):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@dataclasses.dataclass(frozen=True)
class _Data:
    batch_size: int = 16
    shape: tuple[int, int] = (4, 4)


@dataclasses.dataclass(frozen=True)
class _RunConfig:
    """A nested config, as the binaries write it."""

    name: str = "tiny"
    steps: int = 40
    learning_rate: float = 0.05
    data: _Data = dataclasses.field(default_factory=_Data)
    note: str | None = None


# --------------------------------------------------------------------------- schedules


def test_warmup_schedule_values():
    lr = WarmupSchedule(0.1, warmup_steps=10, boundaries=(20, 30), factor=0.2)
    expected = {
        0: 0.01,  # base_lr / warmup_steps
        4: 0.05,  # mid warm-up
        9: 0.1,  # end of warm-up: exactly base_lr, not 2x
        10: 0.1,
        19: 0.1,
        20: 0.02,  # first boundary
        29: 0.02,
        30: 0.004,  # second boundary
        10_000: 0.004,
    }
    for step, want in expected.items():
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-6, err_msg=f"step {step}")
    assert max(float(lr(s)) for s in range(50)) <= 0.1 * (1 + 1e-7)

    restored = WarmupSchedule.from_config(lr.get_config())
    assert restored.get_config() == lr.get_config()
    deserialized = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(lr))
    assert isinstance(deserialized, WarmupSchedule)
    assert float(deserialized(20)) == pytest.approx(0.02)

    no_warmup = WarmupSchedule(0.5, warmup_steps=0)
    assert float(no_warmup(0)) == pytest.approx(0.5)


def test_warmup_schedule_drives_optimizer():
    optimizer = keras.optimizers.SGD(WarmupSchedule(0.1, warmup_steps=4))
    variable = keras.Variable(1.0)
    rates = []
    for _ in range(6):
        rates.append(float(optimizer.learning_rate))
        optimizer.apply_gradients([(tf.constant(0.0), variable)])
    np.testing.assert_allclose(rates, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(base_lr=0.0, warmup_steps=1), "base_lr"),
        (dict(base_lr=0.1, warmup_steps=-1), "warmup_steps"),
        (dict(base_lr=0.1, warmup_steps=1, factor=0.0), "factor"),
        (dict(base_lr=0.1, warmup_steps=1, boundaries=(5, 5)), "increasing"),
        (dict(base_lr=0.1, warmup_steps=10, boundaries=(5,)), "warm-up"),
    ],
)
def test_warmup_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupSchedule(**kwargs)


# --------------------------------------------------------------------------- strategies


def test_make_strategy_by_name():
    assert make_strategy("default").num_replicas_in_sync == 1
    assert make_strategy("auto").num_replicas_in_sync == 1  # no GPU here
    assert make_strategy("one_device").num_replicas_in_sync == 1
    mirrored = make_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2  # the two logical CPUs of conftest.py
    assert is_chief(mirrored) and is_chief(make_strategy("default"))


def test_successive_mirrored_strategies_do_not_share_collectives():
    # Two plain MirroredStrategy objects in one process reuse collective keys: the second one's
    # first all-reduce pairs with the first one's and aborts ("Shape mismatch in the
    # collective instance 100"). make_strategy keeps each strategy's keys apart.
    for size in (3, 7, 5):
        strategy = make_strategy("mirrored")

        @tf.function
        def step(strategy=strategy, size=size):
            def replica_fn():
                ctx = tf.distribute.get_replica_context()
                value = tf.fill([size], tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32))
                return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)
            return strategy.run(replica_fn)

        for replica_value in strategy.experimental_local_results(step()):
            np.testing.assert_array_equal(replica_value.numpy(), np.full([size], 3.0))


def test_make_strategy_rejects_unknown_name():
    with pytest.raises(ValueError, match="one_device, mirrored, multi_worker_mirrored"):
        make_strategy("tpu")


@pytest.mark.parametrize(
    "tf_config, match",
    [
        (None, "TF_CONFIG environment variable, which is not set"),
        ("{not json", "not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', "no 'cluster'"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "no 'task'"),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
            "out of range",
        ),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}',
            "not a job",
        ),
        ('{"cluster": {"worker": ["nohostport"]}, "task": {"type": "worker", "index": 0}}', "host"),
    ],
)
def test_multi_worker_strategy_rejects_bad_tf_config(monkeypatch, tf_config, match):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=match):
        make_strategy("multi_worker_mirrored")


# --------------------------------------------------------------------------- the loop


def test_default_strategy_trains_checkpoints_and_logs(tmp_path):
    strategy = make_strategy("default")
    evaluated = []

    def eval_fn(step):
        x, y = _workers.make_data(32, seed=1)
        evaluated.append(step)
        image_summary("eval_images", tf.random.uniform([3, 5, 5, 1], seed=1), step)
        return {"mse": tf.reduce_mean(tf.square(trainer.model(x) - y))}

    trainer = make_trainer(
        strategy,
        tmp_path,
        total_steps=40,
        checkpoint_every=20,
        eval_every=20,
        eval_fn=eval_fn,
        config=_RunConfig(),
    )
    results = trainer.train(dataset())

    assert trainer.step == 40 and int(trainer.optimizer.iterations.numpy()) == 40
    assert evaluated == [20, 40]  # every eval_every steps; the end coincides with the last
    assert {"loss", "mae", "learning_rate", "steps_per_second", "eval/mse"} <= set(results)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-40")
    assert os.path.exists(tmp_path / "ckpt-20.index")
    assert read_config(str(tmp_path), _RunConfig) == _RunConfig()

    train_events = read_events(tmp_path / "train")
    assert {"loss", "mae", "learning_rate", "steps_per_second"} <= set(train_events)
    losses = [float(v) for _, v in train_events["loss"]]
    assert [s for s, _ in train_events["loss"]] == list(range(5, 41, 5))
    assert losses[-1] < 0.3 * losses[0]  # the loss decreases
    np.testing.assert_allclose(float(train_events["learning_rate"][0][1]), 0.05)
    eval_events = read_events(tmp_path / "eval")
    assert [s for s, _ in eval_events["mse"]] == [20, 40]
    image = eval_events["eval_images"][0][1]  # TensorBoard format: [width, height, png]
    assert image[:2].tolist() == [b"23", b"9"] and image[2].startswith(b"\x89PNG")


def test_mirrored_matches_default_strategy(tmp_path):
    """Same global batches, 2 replicas vs 1: equal weights and Adam slots (loss scaling)."""
    runs = {}
    for name, jit in [("default", False), ("mirrored", False), ("mirrored", True)]:
        strategy = make_strategy(name)
        trainer = make_trainer(strategy, tmp_path / f"{name}_{jit}", 12, jit_compile=jit)
        results = trainer.train(dataset())
        runs[name, jit] = trainer, results
    reference, ref_results = runs["default", False]
    for key in [("mirrored", False), ("mirrored", True)]:
        trainer, results = runs[key]
        assert trainer.strategy.num_replicas_in_sync == 2
        assert trainer.step == 12
        assert_all_close(values(trainer.model.weights), values(reference.model.weights), atol=1e-5)
        assert_all_close(
            values(trainer.optimizer.variables), values(reference.optimizer.variables), atol=1e-5
        )
        # Logged loss and metrics are replica means: the global-batch means.
        for name in ("loss", "mae"):
            assert results[name] == pytest.approx(ref_results[name], rel=1e-5)


@pytest.mark.parametrize("name", ["default", "mirrored"])
def test_jit_compile_none_measures_both_and_keeps_the_faster(tmp_path, name):
    strategy = make_strategy(name)
    trainer = make_trainer(strategy, tmp_path / "run", 4, jit_compile=None)
    assert trainer.jit_compile is None
    results = trainer.train(dataset())
    timings = trainer.jit_compile_timings
    assert set(timings) == {"xla", "no_xla"} and all(t > 0 for t in timings.values())
    assert trainer.jit_compile == (timings["xla"] < timings["no_xla"])
    recorded = json.load(open(tmp_path / "run" / "jit_compile.json"))
    assert recorded["jit_compile"] is trainer.jit_compile
    assert recorded["seconds_per_call"] == pytest.approx(timings)
    # Timing runs no update: the weights are those of a run with the choice fixed in advance.
    fixed = make_trainer(make_strategy(name), tmp_path / "fixed", 4,
                         jit_compile=trainer.jit_compile)
    fixed_results = fixed.train(dataset())
    assert_all_close(values(trainer.model.weights), values(fixed.model.weights), atol=1e-6)
    assert results["loss"] == pytest.approx(fixed_results["loss"], rel=1e-5)


def test_a_recorded_jit_compile_choice_is_reused_on_resume(tmp_path):
    first = make_trainer(make_strategy("default"), tmp_path, 2, jit_compile=None)
    first.train(dataset())
    forced = not first.jit_compile  # as if the other had been faster when first measured
    path = tmp_path / "jit_compile.json"
    path.write_text(json.dumps({"jit_compile": forced}))
    resumed = make_trainer(make_strategy("default"), tmp_path, 4, jit_compile=None)
    resumed.train(dataset())
    assert resumed.step == 4 and resumed.jit_compile is forced
    assert resumed.jit_compile_timings is None  # reused, not measured
    path.write_text("{not json")
    broken = make_trainer(make_strategy("default"), tmp_path, 6, jit_compile=None)
    with pytest.raises(ValueError, match="jit_compile.json.*delete it to measure again"):
        broken.train(dataset())


def test_resume_continues_with_same_optimizer_state(tmp_path):
    strategy = make_strategy("mirrored")
    full = make_trainer(strategy, tmp_path / "full", 16)
    full.train(dataset())

    first = make_trainer(strategy, tmp_path / "resumed", 8)
    first.train(dataset())
    saved_weights = values(first.model.weights)
    saved_optimizer = values(first.optimizer.variables)

    second = make_trainer(strategy, tmp_path / "resumed", 16)
    assert second.restore() == 8
    assert int(second.optimizer.iterations.numpy()) == 8
    assert_all_close(values(second.model.weights), saved_weights, rtol=0, atol=0)
    assert_all_close(values(second.optimizer.variables), saved_optimizer, rtol=0, atol=0)
    # 8 steps are two whole passes, so the restarted iterator yields what the full run saw.
    second.train(dataset())
    assert second.step == 16 and int(second.optimizer.iterations.numpy()) == 16
    assert_all_close(values(second.model.weights), values(full.model.weights), atol=1e-6)
    assert_all_close(
        values(second.optimizer.variables), values(full.optimizer.variables), atol=1e-6
    )

    # Checkpoints are portable across strategies: a one-replica run picks this one up.
    done = make_trainer(make_strategy("default"), tmp_path / "resumed", 16)
    assert done.train(dataset()) == {}  # already at total_steps: nothing to do
    assert done.step == 16
    assert_all_close(values(done.model.weights), values(second.model.weights), rtol=0, atol=0)
    assert_all_close(
        values(done.optimizer.variables), values(second.optimizer.variables), rtol=0, atol=0
    )


def test_trainer_checks_its_inputs(tmp_path):
    mirrored = make_strategy("mirrored")
    model, optimizer = _workers.make_model_and_optimizer(make_strategy("default"))
    with pytest.raises(ValueError, match="not created under this strategy's scope"):
        Trainer(
            strategy=mirrored,
            model=model,
            optimizer=optimizer,
            train_step_fn=_workers.step_fn,
            model_dir=str(tmp_path),
            total_steps=1,
        )
    with mirrored.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="optimizer was not created"):
        Trainer(
            strategy=mirrored,
            model=model,
            optimizer=optimizer,
            train_step_fn=_workers.step_fn,
            model_dir=str(tmp_path),
            total_steps=1,
        )

    def vector_loss(model, batch, step):
        x, y = batch
        return tf.square(model(x) - y)[:, 0], {}

    with pytest.raises(ValueError, match="scalar loss"):
        make_trainer(mirrored, tmp_path / "a", 2, train_step_fn=vector_loss).train(dataset())

    def nan_loss(model, batch, step):
        loss, metrics = _workers.step_fn(model, batch, step)
        return loss * np.nan, metrics

    # The first non-finite step is named, although the loss is only checked at step 2.
    with pytest.raises(FloatingPointError, match="at step 1;"):
        make_trainer(mirrored, tmp_path / "b", 4, log_every=2, train_step_fn=nan_loss).train(
            dataset()
        )


def test_post_step_fn_and_step_argument(tmp_path):
    """The step handed to step functions is the 0-based update number on every replica."""
    strategy = make_strategy("mirrored")
    with strategy.scope():
        seen = tf.Variable(
            tf.zeros([6], tf.int64), aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA
        )

    def post_step_fn(model, step):
        seen.assign(tf.tensor_scatter_nd_update(seen, [[step]], [step + 1]))

    make_trainer(strategy, tmp_path, 6, post_step_fn=post_step_fn).train(dataset())
    assert seen.numpy().tolist() == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_state_save_and_restore(tmp_path):
    """The step is `optimizer.iterations`: it numbers the checkpoint and comes back restored."""
    strategy = make_strategy("default")
    model, optimizer = _workers.make_model_and_optimizer(strategy)
    optimizer.build(model.trainable_variables)
    state = CheckpointState(str(tmp_path), model=model, optimizer=optimizer)
    assert state.restore_or_initialize() == 0 and state.latest_checkpoint is None
    model.weights[0].assign(tf.ones([4, 1]))
    optimizer.iterations.assign(7)
    assert state.save().endswith("ckpt-7")
    # One counter: the checkpoint holds no step variable beside the optimizer's iterations.
    names = [name for name, _ in tf.train.list_variables(state.latest_checkpoint)]
    assert not [n for n in names if "step" in n.lower()], names

    model2, optimizer2 = _workers.make_model_and_optimizer(strategy)
    optimizer2.build(model2.trainable_variables)
    state2 = CheckpointState(str(tmp_path), model=model2, optimizer=optimizer2)
    assert state2.restore_or_initialize() == 7 == int(optimizer2.iterations.numpy())
    np.testing.assert_array_equal(model2.weights[0].numpy(), np.ones([4, 1]))


def _damage(model_dir, number, damage):
    """Damages checkpoint `number` of `model_dir` as a crash, a full disk or a user would."""
    prefix = os.path.join(model_dir, f"ckpt-{number}")
    (data,) = glob.glob(prefix + ".data-*")
    if damage == "truncate_data":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif damage == "flip_data":
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
    elif damage == "truncate_index":
        with open(prefix + ".index", "r+b") as f:
            f.truncate(os.path.getsize(prefix + ".index") // 2)
    elif damage == "delete_index":
        os.remove(prefix + ".index")
    elif damage == "garble_checkpoint_file":
        with open(os.path.join(model_dir, "checkpoint"), "wb") as f:
            f.write(bytes(range(256)) * 4)
    return prefix


DAMAGES = ["truncate_data", "flip_data", "truncate_index", "delete_index",
           "garble_checkpoint_file"]


def test_unusable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    """Each of the five damages: resume from the previous checkpoint with a warning naming the
    bad files, which are kept (set aside, never deleted); the run then goes on saving."""
    strategy = make_strategy("default")
    base = tmp_path / "base"
    make_trainer(strategy, base, 6, checkpoint_every=2).train(dataset())
    for damage in DAMAGES:
        model_dir = str(tmp_path / damage)
        shutil.copytree(base, model_dir)
        files = sorted(os.listdir(model_dir))
        prefix = _damage(model_dir, 6, damage)
        caplog.clear()
        trainer = make_trainer(strategy, model_dir, 8, checkpoint_every=2)
        with caplog.at_level("WARNING"):
            assert trainer.restore() == (6 if damage == "garble_checkpoint_file" else 4), damage
        warnings = " ".join(r.getMessage() for r in caplog.records)
        if damage == "garble_checkpoint_file":
            assert "checkpoint index file" in warnings and "unreadable" in warnings
            continue
        assert prefix in warnings and "unusable" in warnings, (damage, warnings)
        kept = os.listdir(os.path.join(model_dir, "unusable_checkpoints"))
        assert {f for f in files if f.startswith("ckpt-6.")} - ({"ckpt-6.index"} if
                                                              damage == "delete_index" else
                                                              set()) == set(kept), damage
        trainer.train(dataset())  # saves ckpt-6 and ckpt-8 anew next to the set-aside files
        assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-8")
        assert make_trainer(strategy, model_dir, 8).restore() == 8


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    strategy = make_strategy("default")
    make_trainer(strategy, tmp_path, 4, checkpoint_every=2).train(dataset())
    for number in (2, 4):
        _damage(str(tmp_path), number, "truncate_data")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match="No checkpoint .* can be restored") as info:
        make_trainer(strategy, tmp_path, 8).restore()
    assert str(tmp_path / "ckpt-2.data") in str(info.value)
    assert "move these files" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing moved or deleted

    # Every checkpoint file gone but the index file kept: loud, not a silent restart.
    for path in glob.glob(str(tmp_path / "ckpt-*")):
        os.remove(path)
    with pytest.raises(CheckpointError, match="none of their files exist") as info:
        make_trainer(strategy, tmp_path, 8).restore()
    assert "restart from step 0" in str(info.value)


def test_checkpoint_advice_works_when_followed(tmp_path, caplog):
    """Each checkpoint message's advice, carried out literally, lets the run go on."""
    strategy = make_strategy("default")
    base = tmp_path / "base"
    make_trainer(strategy, base, 4, checkpoint_every=2).train(dataset())

    # Only the newest .index deleted: the warning blames that file, not the index file.
    model_dir = tmp_path / "no_index"
    shutil.copytree(base, model_dir)
    _damage(str(model_dir), 4, "delete_index")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert make_trainer(strategy, model_dir, 4).restore() == 2
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert str(model_dir / "ckpt-4.index") + " is missing" in warnings
    assert "checkpoint index file" not in warnings

    # "No checkpoint can be restored ... move these files (and the index file) out of the directory": do that.
    model_dir = tmp_path / "all_bad"
    shutil.copytree(base, model_dir)
    for number in (2, 4):
        _damage(str(model_dir), number, "truncate_data")
    with pytest.raises(CheckpointError, match="move these files") as info:
        make_trainer(strategy, model_dir, 4).restore()
    named = ", ".join(re.findall(r"files: ([^;)]*)", str(info.value))).split(", ")
    named.append(re.search(r"and the index file (\S+) out of", str(info.value)).group(1))
    moved_out = tmp_path / "kept"
    os.makedirs(moved_out)
    for path in named:
        shutil.move(path, moved_out)
    trainer = make_trainer(strategy, model_dir, 4, checkpoint_every=2)
    assert trainer.restore() == 0  # from scratch, no "stray files" error
    trainer.train(dataset())
    assert make_trainer(strategy, model_dir, 4).restore() == 4

    # Every checkpoint file gone, the index file kept: "... or delete <index file> to really
    # start from scratch".
    model_dir = tmp_path / "index_only"
    shutil.copytree(base, model_dir)
    for path in glob.glob(str(model_dir / "ckpt-*")):
        os.remove(path)
    with pytest.raises(CheckpointError, match="delete (\\S+) to really start") as info:
        make_trainer(strategy, model_dir, 4).restore()
    os.remove(re.search(r"delete (\S+) to really start", str(info.value)).group(1))
    assert make_trainer(strategy, model_dir, 4).restore() == 0

    # Another model's checkpoint: "Nothing was changed in <model_dir>" holds.
    model_dir = tmp_path / "other_model"
    shutil.copytree(base, model_dir)
    before = {p: os.path.getmtime(p) for p in glob.glob(str(model_dir / "*"))}
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    other = Trainer(strategy=strategy, model=model, optimizer=keras.optimizers.Adam(),
                    train_step_fn=_workers.step_fn, model_dir=str(model_dir), total_steps=4)
    with pytest.raises(CheckpointError, match="Nothing was changed"):
        other.restore()
    assert {p: os.path.getmtime(p) for p in glob.glob(str(model_dir / "*"))} == before


def test_stale_temp_dir_of_a_killed_save_is_removed(tmp_path):
    strategy = make_strategy("default")
    make_trainer(strategy, tmp_path, 2, checkpoint_every=2).train(dataset())
    os.makedirs(tmp_path / "ckpt-4_temp")
    (tmp_path / "ckpt-4_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    assert make_trainer(strategy, tmp_path, 4).restore() == 2
    assert not os.path.exists(tmp_path / "ckpt-4_temp")


def test_non_finite_loss_stops_without_saving(tmp_path):
    """A huge learning rate: the run stops at the first log after the loss turns non-finite,
    names the step and the newest checkpoint (finite), and a rerun with a sane rate goes on."""
    strategy = make_strategy("default")

    def make(lr, steps):
        # A schedule, as in the binaries: a float rate would be restored from the checkpoint.
        model, optimizer = _workers.make_model_and_optimizer(
            strategy, learning_rate=WarmupSchedule(lr, 0))
        return Trainer(strategy=strategy, model=model, optimizer=optimizer,
                       train_step_fn=_workers.step_fn, model_dir=str(tmp_path),
                       total_steps=steps, log_every=50, checkpoint_every=2, progress=False)

    make(0.05, 2).train(dataset())
    with pytest.raises(NonFiniteLossError, match=r"not finite .* at step (\d+)") as info:
        make(1e20, 200).train(dataset())
    message = str(info.value)
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest in message and "left intact" in message
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), name
    bad_step = int(re.search(r"at step (\d+)", message).group(1))
    assert int(latest.rsplit("-", 1)[1]) < bad_step
    trainer = make(0.01, 8)
    assert trainer.restore() == int(latest.rsplit("-", 1)[1])
    trainer.train(dataset())
    assert trainer.step == 8 and all(np.isfinite(v).all() for v in values(trainer.model.weights))


def test_run_lock_refuses_a_second_process_and_takes_over_a_dead_ones(tmp_path, caplog):
    with RunLock(str(tmp_path)):
        with pytest.raises(RunDirError, match=f"in use by process {os.getpid()} on host "
                                              f"{socket.gethostname()}"):
            RunLock(str(tmp_path)).acquire()
    assert not os.path.exists(tmp_path / "LOCK")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "LOCK").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    with caplog.at_level("WARNING"):
        lock = RunLock(str(tmp_path)).acquire()
    assert f"of process {dead}" in caplog.text and "no longer runs" in caplog.text
    lock.release()


def test_output_dirs_are_checked_and_writes_are_atomic(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="model_dir .*is a file"):
        check_output_dirs(str(tmp_path / "file"))
    with pytest.raises(RunDirError, match="export_dir .*is a file"):
        check_output_dirs(str(tmp_path / "run"), str(tmp_path / "file"))
    with pytest.raises(RunDirError, match="cannot be created"):
        check_output_dirs(str(tmp_path / "file" / "sub"))
    check_output_dirs(str(tmp_path / "run"), str(tmp_path / "out" / "export"))
    assert os.listdir(tmp_path / "run") == []

    # An export that fails half-way leaves the previous one as it was.
    dest = str(tmp_path / "export")
    swap_in_directory(dest, lambda d: (os.makedirs(d), open(os.path.join(d, "v1"), "w")))
    def broken(d):
        os.makedirs(d)
        open(os.path.join(d, "partial"), "w").close()
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        swap_in_directory(dest, broken)
    assert sorted(os.listdir(tmp_path)) == ["export", "file", "out", "run"]
    assert os.listdir(dest) == ["v1"]
    swap_in_directory(dest, lambda d: (os.makedirs(d), open(os.path.join(d, "v2"), "w")))
    assert os.listdir(dest) == ["v2"]


def test_checkpoint_of_another_model_raises_clear_error(tmp_path):
    strategy = make_strategy("default")
    make_trainer(strategy, tmp_path, 2).train(dataset())
    for layers in ([keras.layers.Dense(2)], [keras.layers.Dense(1), keras.layers.Dense(1)]):
        model = keras.Sequential([keras.Input((4,)), *layers])
        trainer = Trainer(
            strategy=strategy,
            model=model,
            optimizer=keras.optimizers.Adam(),
            train_step_fn=_workers.step_fn,
            model_dir=str(tmp_path),
            total_steps=4,
        )
        with pytest.raises(CheckpointError, match="different model") as info:
            trainer.restore()
        assert str(tmp_path / "ckpt-2") in str(info.value)


def test_missing_checkpoint_index_file_resumes_from_the_files(tmp_path, caplog):
    strategy = make_strategy("default")
    make_trainer(strategy, tmp_path, 4, checkpoint_every=2).train(dataset())
    os.remove(tmp_path / "checkpoint")
    assert make_trainer(strategy, tmp_path, 4).restore() == 4
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")  # index rewritten


def test_kill_and_restart_resumes_from_saved_step(tmp_path):
    """SIGKILL a training process after it has saved; the restart continues from there."""
    model_dir = tmp_path / "run"
    env = worker_env()
    cmd = worker_cmd(model_dir, 10**7, tmp_path / "first.json", checkpoint_every=10)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            latest = tf.train.latest_checkpoint(str(model_dir))
            if latest and int(latest.rsplit("-", 1)[1]) >= 20:
                break
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    saved = int(tf.train.latest_checkpoint(str(model_dir)).rsplit("-", 1)[1])

    out = tmp_path / "second.json"
    proc2 = run_worker(worker_cmd(model_dir, saved + 10, out, checkpoint_every=10), env)
    result = json.loads(out.read_text())
    assert f"start_step={saved}" in proc2.stdout
    assert result["start_step"] == saved
    assert result["final_step"] == result["optimizer_iterations"] == saved + 10
    assert tf.train.latest_checkpoint(str(model_dir)).endswith(f"ckpt-{saved + 10}")


def test_multi_worker_mirrored_two_processes(tmp_path):
    """Two workers on 127.0.0.1 train in lockstep and end with identical weights."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "run"
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        tmpdir = tmp_path / f"tmp{index}"
        tmpdir.mkdir()
        env = worker_env(TF_CONFIG=tf_config, TMPDIR=str(tmpdir))
        cmd = worker_cmd(
            model_dir,
            12,
            tmp_path / f"out{index}.json",
            strategy="multi_worker_mirrored",
            checkpoint_every=6,
            global_batch=16,
        )
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["task"] for r in results] == [["worker", 0], ["worker", 1]]
    for r in results:
        assert r["num_replicas"] == 2 and r["final_step"] == r["optimizer_iterations"] == 12
    for w0, w1 in zip(results[0]["weights"], results[1]["weights"], strict=True):
        np.testing.assert_array_equal(np.asarray(w0), np.asarray(w1))
    assert np.abs(np.asarray(results[0]["weights"][0])).sum() > 0  # it trained
    # Only the chief (worker 0) wrote into model_dir; worker 1's temp copies are gone.
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-12")
    assert os.listdir(tmp_path / "tmp1") == []


# --------------------------------------------------------------------------- configs, images


def test_config_round_trip(tmp_path):
    config = _RunConfig(name="x", data=_Data(batch_size=8, shape=(2, 3)), note="n")
    path = write_config(str(tmp_path), config)
    assert json.loads(open(path).read())["data"] == {"batch_size": 8, "shape": [2, 3]}
    assert read_config(str(tmp_path), _RunConfig) == config
    assert read_config(str(tmp_path))["name"] == "x"
    write_config(str(tmp_path), {"name": "y", "unknown": 1})
    with pytest.raises(ValueError, match="unknown"):
        read_config(str(tmp_path), _RunConfig)
    with pytest.raises(FileNotFoundError):
        read_config(str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="field 'bad'"):
        write_config(str(tmp_path), {"bad": object()})


def test_save_image_grid(tmp_path):
    images = np.zeros([5, 6, 7, 3], np.float32)
    images[0] = 1.0
    images[4, :, :, 0] = 0.5
    path = save_image_grid(images, str(tmp_path / "sub" / "grid.png"), nrow=3)
    grid = tf.io.decode_png(tf.io.read_file(path)).numpy()
    assert grid.shape == (2 * (6 + 2) + 2, 3 * (7 + 2) + 2, 3)
    assert (grid[2:8, 2:9] == 255).all()  # image 0: white
    assert (grid[2:8, 11:18] == 0).all()  # image 1: black
    assert (grid[10:16, 11:18, 0] == 128).all()  # image 4 at row 1, column 1
    assert (grid[:2] == 255).all()  # white border
    assert make_image_grid(images[:, :, :, :1], nrow=8).shape == (10, 5 * 9 + 2, 1)
    with pytest.raises(ValueError, match="channels"):
        make_image_grid(np.zeros([1, 2, 2, 2]))
    assert image_summary("x", images, 0) is False  # no default writer


def test_summaries_read_back_with_tensorboard(tmp_path):
    """Scalars and image grids are `tf.summary` records TensorBoard's own reader understands."""
    from tensorboard.backend.event_processing import event_accumulator

    images = np.random.RandomState(0).uniform(size=[3, 5, 6, 1]).astype(np.float32)
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        assert image_summary("grid", images, step=3, nrow=2) is True
    Trainer._write_scalars(writer, {"loss": 1.5, "learning_rate": 0.25}, 4)
    writer.flush()

    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == {"grid", "loss", "learning_rate"}
    for name, value in [("loss", 1.5), ("learning_rate", 0.25)]:
        (event,) = acc.Tensors(name)
        assert event.step == 4 and float(tf.make_ndarray(event.tensor_proto)) == value
        assert acc.SummaryMetadata(name).plugin_data.plugin_name == "scalars"
    (event,) = acc.Tensors("grid")
    assert event.step == 3 and acc.SummaryMetadata("grid").plugin_data.plugin_name == "images"
    width, height, png = tf.make_ndarray(event.tensor_proto).tolist()
    grid = make_image_grid(images, nrow=2).numpy()
    assert (int(width), int(height)) == (grid.shape[1], grid.shape[0])
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), grid)
