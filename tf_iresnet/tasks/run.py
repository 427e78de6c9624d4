"""One run driver for every training task, and the configuration fields all runs share.

A run is always the same sequence: make the strategy and seed everything, build the model and
the optimizer under the strategy, restore the newest checkpoint (or, on a fresh run,
initialize the ActNorms from the first batch, explicitly and once), train with the custom loop,
converge the spectral norms and evaluate the model that gets exported, write the task's extra
outputs, export, write ``results.json``. `run` does exactly that; a `Task` provides only what
differs between tasks (model, optimizer, data, step function, post-step, evaluator, report,
export), and its config extends `RunConfig` with the task's own fields.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import keras
import tensorflow as tf
from absl import logging

from tf_iresnet import converge_spectral_norms, datasets, update_spectral_norms
from tf_iresnet.tasks import common
from tf_iresnet.training import (
    CheckpointError,
    NonFiniteLossError,
    RunDirError,
    RunLock,
    Trainer,
    WorkerLostError,
    is_chief,
    swap_in_directory,
)
from tf_iresnet.training.strategy import PEER_FAILURE_ERRORS, is_multi_worker, lost_worker_error

# Errors of a run that the binaries report as a message and exit status 1, without traceback:
# the message says what happened and what to do.
RUN_ERRORS = (CheckpointError, NonFiniteLossError, RunDirError, WorkerLostError)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The fields every training run has (written to ``model_dir/config.json``).

    A task's config subclasses it, adds its own fields and may give a field another default by
    declaring it again (e.g. the density task compiles with XLA by default). The binaries take
    their flags' defaults from these fields, so each default lives in one place.

    Attributes:
      dataset: a `tf_iresnet.datasets` name.
      preset: a `tf_iresnet.presets` name of the task's type.
      model_dir: checkpoints, config.json, results.json and TensorBoard logs.
      export_dir: SavedModel destination ('' skips the export).
      batch_size: global batch size (split over the replicas).
      train_steps: optimizer steps in total (a resumed run continues up to it).
      learning_rate: peak learning rate, reached at the end of the warm-up.
      strategy: `tf_iresnet.training.make_strategy` name.
      seed: seeds initialization, data order, dequantization noise and log-det probes.
      eval_every, checkpoint_every: intervals in steps (0: only at the end).
      log_every: steps between TensorBoard/progress-bar updates.
      jit_compile: XLA-compile the per-replica forward and backward pass (True) or not
        (False); None (default): time both on the first batch and keep the faster, recorded
        in ``model_dir/jit_compile.json`` (`tf_iresnet.training.Trainer`).
      data_dir: where tfds datasets are prepared ('' for ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``); nothing is downloaded.

    Raises:
      common.ConfigError: on construction, a value no run can use (the message names the
        field and what is allowed): a seed outside [0, `MAX_SEED`], a non-positive batch size
        or learning rate, negative step counts or intervals, a batch larger than the
        dataset's training split.
    """

    dataset: str
    preset: str
    model_dir: str
    export_dir: str = ""
    batch_size: int = 64
    train_steps: int = 2000
    learning_rate: float = 1e-3
    strategy: str = "auto"
    seed: int = 0
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    jit_compile: bool | None = None
    data_dir: str = ""

    def __post_init__(self):
        check_run_config(self)


# Seeds are int32 in the stateless seeds of the steps (and seed + 1 seeds the test split).
MAX_SEED = 2**31 - 2


def check_run_config(cfg: RunConfig) -> None:
    """Raises `common.ConfigError` for a `RunConfig` value no run can use (see `RunConfig`)."""
    def fail(message):
        raise common.ConfigError(message)

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(cfg.seed) or not 0 <= cfg.seed <= MAX_SEED:
        fail(f"seed must be an integer in [0, {MAX_SEED}], got {cfg.seed!r}.")
    if not is_int(cfg.batch_size) or cfg.batch_size < 1:
        fail(f"batch_size must be a positive integer, got {cfg.batch_size!r}.")
    if not is_int(cfg.train_steps) or cfg.train_steps < 0:
        fail(f"train_steps must be an integer >= 0 (0: only evaluate and export), got "
             f"{cfg.train_steps!r}.")
    if not (isinstance(cfg.learning_rate, int | float) and math.isfinite(cfg.learning_rate)
            and cfg.learning_rate > 0):
        fail(f"learning_rate must be a finite number > 0, got {cfg.learning_rate!r}.")
    for name in ("eval_every", "checkpoint_every"):
        value = getattr(cfg, name)
        if not is_int(value) or value < 0:
            fail(f"{name} must be an integer >= 0 (0: only at the end), got {value!r}.")
    if not is_int(cfg.log_every) or cfg.log_every < 1:
        fail(f"log_every must be a positive integer, got {cfg.log_every!r}.")
    try:
        size = datasets.num_examples(cfg.dataset, "train")
    except ValueError:
        return  # a generated stream (any batch size) or an unknown name (refused by the task)
    if cfg.batch_size > size:
        fail(f"batch_size {cfg.batch_size} is larger than the {size} training examples of "
             f"{cfg.dataset!r}: use a batch_size of at most {size}.")


def preflight(task: Task) -> None:
    """The checks `run` makes before anything is created or trained: the run directories are
    usable (`common.check_run_dirs`) and the data is on disk (`datasets.check_available`).

    Raises:
      common.ConfigError: with a message that says what to do.
    """
    cfg = task.config
    common.check_run_dirs(cfg.model_dir, cfg.export_dir)
    try:
        datasets.check_available(cfg.dataset, data_dir=cfg.data_dir or None)
    except ValueError as e:
        raise common.ConfigError(str(e)) from None


def default(config_cls: type[RunConfig], field: str) -> Any:
    """The default of ``field`` in ``config_cls`` (for flags that must agree with it)."""
    for f in dataclasses.fields(config_cls):
        if f.name == field:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"{config_cls.__name__}.{field} has no default.")
            return f.default
    raise ValueError(f"{config_cls.__name__} has no field {field!r}.")


def power_iteration_step(model: keras.Model, step: tf.Tensor) -> None:
    """The post-step of every task: after each optimizer update, each spectrally normalized
    layer runs its ``power_iterations`` power iterations (nowhere else in training)."""
    del step
    update_spectral_norms(model)


class Task(abc.ABC):
    """What differs between training tasks; `run` does the rest.

    Subclasses set ``config_type`` and implement the abstract methods. The step function and
    post-step follow `tf_iresnet.training.Trainer`'s contract; `post_step` runs the spectral
    norms' power iterations after every update (a forward pass never assigns variables).
    """

    config_type: ClassVar[type[RunConfig]] = RunConfig

    def __init__(self, config: RunConfig):
        if not isinstance(config, self.config_type):
            raise TypeError(f"{type(self).__name__} needs a {self.config_type.__name__}, got "
                            f"{type(config).__name__}.")
        self.config = config

    @abc.abstractmethod
    def build_model(self) -> keras.Model:
        """The model (called under the strategy's scope)."""

    @abc.abstractmethod
    def build_optimizer(self) -> keras.optimizers.Optimizer:
        """The optimizer (called under the strategy's scope)."""

    @abc.abstractmethod
    def train_data(self, start_step: int = 0) -> tf.data.Dataset:
        """The repeated, batched training stream (global batches) from batch ``start_step``
        on: a pure function of ``(seed, step)``, so that a resumed run trains on the batches
        of the uninterrupted one."""

    def init_inputs(self, batch: Any) -> tf.Tensor:
        """The inputs of a training batch that ActNorm's data-dependent init sees."""
        return batch

    @abc.abstractmethod
    def train_step(self, model: keras.Model, batch: Any,
                   step: tf.Tensor) -> tuple[tf.Tensor, Mapping[str, tf.Tensor]]:
        """The per-replica ``(loss, metrics)`` of one step (`Trainer`'s contract)."""

    def post_step(self, model: keras.Model, step: tf.Tensor) -> None:
        """After each update: `power_iteration_step`."""
        power_iteration_step(model, step)

    @abc.abstractmethod
    def evaluator(self, model: keras.Model):
        """``evaluate(step) -> dict of name -> float`` on the test split (chief only)."""

    def report(self, model: keras.Model, evaluator, final: dict) -> dict:
        """The task's entries of ``results.json`` from the final metrics (chief only); may
        write files into ``model_dir`` (sample grids)."""
        del model, evaluator, final
        return {}

    @abc.abstractmethod
    def export(self, model: keras.Model, export_dir: str) -> None:
        """Writes the serving SavedModel of the (converged) model."""


def run(task: Task) -> dict:
    """Runs ``task`` from start (or its newest checkpoint) to the exported model.

    Returns:
      The loop's last logs, ``num_replicas``, ``step``, the final metrics as ``final/<name>``,
      the task's report and ``export_dir`` when exported. The chief also writes them to
      ``model_dir/results.json``; the other workers return after training.

    On the chief, the run directory and the export destination are checked first and the run
    directory is locked (`tf_iresnet.training.RunLock`) until the run ends. The training
    stream starts at the restored step, so a run killed at any point and restarted ends with
    the weights of an uninterrupted one.

    Raises:
      common.ConfigError: a configuration that cannot work (unknown strategy, bad
        ``TF_CONFIG``, a batch that does not split over the replicas, a preset that does not
        fit the dataset, an unusable ``model_dir`` or ``export_dir``, a tfds set that is not
        prepared), before anything is trained.
      RunDirError: ``model_dir`` or ``export_dir`` unusable, or ``model_dir`` in use by
        another process.
      CheckpointError: no usable checkpoint although the directory has some, or a checkpoint
        of another model.
      NonFiniteLossError: training diverged (the newest checkpoint stays the last good one).
      tf_iresnet.training.WorkerLostError: a multi-worker run lost a worker (TF aborted the
        collectives); the message names it and says how to resume.
    """
    cfg = task.config
    preflight(task)
    strategy = common.start_run(cfg.strategy, cfg.seed, cfg.batch_size)
    lock = RunLock(cfg.model_dir).acquire() if is_chief(strategy) else None
    try:
        return _run_locked(task, strategy)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(task: Task, strategy: tf.distribute.Strategy) -> dict:
    cfg = task.config
    with strategy.scope():
        model = task.build_model()
        optimizer = task.build_optimizer()
    evaluator = task.evaluator(model)
    trainer = Trainer(
        strategy=strategy, model=model, optimizer=optimizer, train_step_fn=task.train_step,
        post_step_fn=task.post_step, model_dir=cfg.model_dir, total_steps=cfg.train_steps,
        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
        eval_every=cfg.eval_every, eval_fn=evaluator, jit_compile=cfg.jit_compile,
        config={**dataclasses.asdict(cfg), "model": dataclasses.asdict(model.config)})
    try:
        start = trainer.restore()
        train = task.train_data(start_step=start)  # the batches of step `start` on
        if start == 0:
            # ActNorm's data-dependent init: once, eagerly, in cross-replica context, from the
            # same first batch on every worker.
            model.initialize(task.init_inputs(next(iter(train))))
        results = trainer.train(train)
    except PEER_FAILURE_ERRORS as e:
        if not is_multi_worker(strategy):
            raise
        raise lost_worker_error(
            strategy, e, newest_checkpoint=tf.train.latest_checkpoint(cfg.model_dir)) from e
    results["num_replicas"] = strategy.num_replicas_in_sync
    results["step"] = trainer.step
    # Every worker reports it: workers (and replicas) must end with identical weights.
    results["weights_checksum"] = float(
        sum(tf.reduce_sum(tf.cast(w, tf.float64)) for w in model.weights))
    if not trainer.is_chief:
        return results
    converge_spectral_norms(model)  # the exported model is the converged one
    final = evaluator(trainer.step)
    results.update({f"final/{k}": v for k, v in final.items()})
    results.update(task.report(model, evaluator, final))
    if cfg.export_dir:
        # Written beside export_dir and swapped in when complete: a kill never leaves a broken
        # export in place of the previous one.
        swap_in_directory(cfg.export_dir, lambda tmp: task.export(model, tmp))
        results["export_dir"] = cfg.export_dir
        logging.info("Exported SavedModel to %s", cfg.export_dir)
    common.write_results(cfg.model_dir, results)
    return results
