"""The custom training loop shared by the density and classifier binaries.

Why not `model.fit`: in Keras 3.15 it fails under `MultiWorkerMirroredStrategy`, and the
i-ResNet objectives (log-det estimators with a step-keyed random number of terms, extra power
iterations after each update) want a step function we control. One loop serves every strategy.

#### The step-function contract

`train_step_fn(model, batch, step) -> (loss, metrics)` runs once per replica per step, in
replica context, inside the tape the loop differentiates:

* `model`: the Keras model given to the `Trainer`.
* `batch`: this replica's part of the global batch, as the dataset yields it (any nest).
* `step`: int64 scalar tensor, the global step of this update (0 for the first update): the
  value of `optimizer.iterations` before this update, equal on every replica and every worker.
  Use it to key stateless randomness that must agree across replicas (e.g. the random number
  of log-det terms).
* `loss`: float scalar tensor, the MEAN of the per-example objective over this replica's batch,
  i.e. exactly what one would minimise on a single device. The loop divides it by
  `strategy.num_replicas_in_sync` before differentiating, so the gradients the optimizer sums
  over replicas are the gradient of the global-batch mean (replicas get equal batch sizes from
  `experimental_distribute_dataset` when the global batch divides evenly). Include any
  regularisation (e.g. `sum(model.losses)`) yourself: the loop adds nothing.
* `metrics`: dict of name -> float scalar tensor (per-replica means) to log; not
  differentiated. The loop averages them over replicas, then over the logging interval.

The names `loss`, `learning_rate` and `steps_per_second` are reserved for the loop's own logs.

Caveat (Keras 3.15, TF backend): an optimizer's `clipnorm` / `global_clipnorm` / `clipvalue`
clip each replica's (1/num_replicas scaled) gradient *before* the cross-replica sum, so their
effect depends on the number of replicas; clip inside the model or avoid them when it matters.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from tf_iresnet.training.checkpoint import CheckpointState
from tf_iresnet.training.config import atomic_write, config_to_dict, read_config, write_config
from tf_iresnet.training.strategy import is_chief

TrainStepFn = Callable[[keras.Model, Any, tf.Tensor], tuple[tf.Tensor, Mapping[str, tf.Tensor]]]
PostStepFn = Callable[[keras.Model, tf.Tensor], Any]
EvalFn = Callable[[int], "Mapping[str, Any] | None"]

RESERVED_NAMES = ("loss", "learning_rate", "steps_per_second")


class NonFiniteLossError(FloatingPointError):
    """Training diverged (a NaN or infinite loss or weight); nothing was saved after it."""


class Trainer:
    """Runs `train_step_fn` under a strategy with checkpoints, resume, logs and evaluation.

    Per step (one `tf.function` call, no host synchronisation): each replica computes its
    loss and gradients (optionally XLA-compiled), the Keras optimizer all-reduces (sums) the
    gradients and applies them (incrementing `optimizer.iterations`, the one step counter),
    `post_step_fn` runs, and the loss and metrics are averaged over replicas. Every `log_every`
    steps the chief writes the interval means of loss and metrics, the learning rate and the speed to TensorBoard
    (`model_dir/train`) and to a progress bar; every `eval_every` steps it calls `eval_fn`
    (results to `model_dir/eval`); every `checkpoint_every` steps and at the end all workers
    save (only the chief's copy is kept), but only while every loss since the last check and
    every weight is finite (see `train`). A new `Trainer` on the same `model_dir` resumes from
    the newest usable checkpoint: same step, weights and optimizer state. The dataset is the
    caller's: for an exact resume, give `train` the stream from the restored step on (e.g.
    `tf_iresnet.datasets.load(..., start_step=trainer.restore())`). Nothing is written into
    `model_dir` (config.json, summaries) before `restore` has succeeded.

    #### Examples

    ```python
    strategy = make_strategy("mirrored")
    with strategy.scope():
        model = build_model()                      # built: its variables exist
        optimizer = keras.optimizers.Adam(WarmupSchedule(1e-3, 1000))

    def step_fn(model, batch, step):
        x, y = batch
        per_example = keras.losses.mean_squared_error(y, model(x, training=True))
        return tf.reduce_mean(per_example), {"mse": tf.reduce_mean(per_example)}

    trainer = Trainer(strategy=strategy, model=model, optimizer=optimizer,
                      train_step_fn=step_fn, model_dir="/tmp/run", total_steps=10_000)
    trainer.train(dataset.repeat().batch(global_batch_size))
    ```

    Args:
      strategy: the strategy the model and optimizer were created under.
      model: Keras model, built under `strategy.scope()`.
      optimizer: Keras optimizer, created under `strategy.scope()`; built here if needed.
      train_step_fn: see the module docstring for the contract.
      model_dir: run directory for checkpoints, `config.json` and TensorBoard logs.
      total_steps: train until `optimizer.iterations` reaches this.
      log_every: steps between TensorBoard/progress-bar updates. Default 100.
      checkpoint_every: steps between checkpoints (one is also saved at the end); 0 saves
        only at the end. Default 1000.
      eval_every: steps between `eval_fn` calls (it is also called at the end); 0 calls it only
        at the end. Default 0.
      eval_fn: `eval_fn(step) -> dict of name -> scalar, or None`, called on the chief only,
        with the `model_dir/eval` summary writer as default writer (so it may also write e.g.
        `image_summary`). It must not run cross-worker collectives.
      post_step_fn: optional `post_step_fn(model, step)`, traced into the step after the
        optimizer update, in replica context (e.g. extra power iterations). Variables it assigns
        need an aggregation (`"mean"` or `"only_first_replica"`) under mirrored strategies.
      jit_compile: XLA-compile the per-replica forward and backward pass (True), or not
        (False), or None: measure. Before the first step, `train` then times both on the first
        batch (`choose_jit_compile`) and keeps the faster, recorded in
        `model_dir/jit_compile.json`, which a resumed run reuses (so it resumes exactly).
        Which is faster depends on the model, the kernel set and the machine
        (`benchmarks/README.md`, fifth session). The optimizer update stays outside XLA: compiled under
        `MirroredStrategy` it fails on this stack, because its cross-replica update reaches
        variables on the other replicas' devices.
      config: optional dataclass or dict, written to `model_dir/config.json` by the chief.
      progress: show a `keras.utils.Progbar` on the chief. Default True.

    Raises:
      ValueError: for bad step counts, or a model/optimizer not created under the strategy.
    """

    def __init__(
        self,
        *,
        strategy: tf.distribute.Strategy,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        train_step_fn: TrainStepFn,
        model_dir: str,
        total_steps: int,
        log_every: int = 100,
        checkpoint_every: int = 1000,
        eval_every: int = 0,
        eval_fn: EvalFn | None = None,
        post_step_fn: PostStepFn | None = None,
        jit_compile: bool | None = False,
        config: Any = None,
        progress: bool = True,
    ):
        if total_steps < 0 or log_every < 1 or checkpoint_every < 0 or eval_every < 0:
            raise ValueError(
                "Need total_steps >= 0, log_every >= 1, checkpoint_every >= 0 and "
                f"eval_every >= 0; got {total_steps}, {log_every}, {checkpoint_every}, "
                f"{eval_every}."
            )
        _check_created_in_scope(strategy, model, optimizer)
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.train_step_fn = train_step_fn
        self.post_step_fn = post_step_fn
        self.eval_fn = eval_fn
        self.model_dir = model_dir
        self.total_steps = int(total_steps)
        self.log_every = int(log_every)
        self.checkpoint_every = int(checkpoint_every)
        self.eval_every = int(eval_every)
        self.jit_compile = None if jit_compile is None else bool(jit_compile)
        self.jit_compile_timings: dict[str, float] | None = None
        self.progress = progress
        self.is_chief = is_chief(strategy)

        if not optimizer.built:
            with strategy.scope():
                optimizer.build(model.trainable_variables)
        self.checkpoint = CheckpointState(model_dir, model=model, optimizer=optimizer,
                                          strategy=strategy)
        # Nothing is written into model_dir before `restore` knows the run can resume there.
        self._config = config
        self._train_writer = tf.summary.create_noop_writer()
        self._eval_writer = tf.summary.create_noop_writer()
        self._restored = False
        self._weights_finite_fn = None
        self._step_function = tf.function(self._distributed_step, reduce_retracing=True)
        self._xla_grads_fn = tf.function(self._replica_grads, jit_compile=True)
        self._grads_fn = self._xla_grads_fn if self.jit_compile else self._replica_grads

    # ---------------------------------------------------------------- state

    @property
    def step(self) -> int:
        """The number of optimizer steps taken so far: `optimizer.iterations`."""
        return int(self.optimizer.iterations.numpy())

    def restore(self) -> int:
        """Restores the newest checkpoint of `model_dir`, if any; returns the step to resume at.

        Raises:
          CheckpointError: the checkpoint is corrupt, unreadable, or of another model.
        """
        step = self.checkpoint.restore_or_initialize()
        self._restored = True
        if self.is_chief:
            if step:
                logging.info("Restored %s at step %d.", self.checkpoint.latest_checkpoint, step)
            self._open_run_dir()
        return step

    def _open_run_dir(self) -> None:
        """Writes config.json and opens the summary writers (chief, once restored)."""
        if self._config is not None:
            _warn_if_config_changed(self.model_dir, self._config)
            write_config(self.model_dir, self._config)
        self._train_writer = tf.summary.create_file_writer(os.path.join(self.model_dir, "train"))
        if self.eval_fn is not None:
            self._eval_writer = tf.summary.create_file_writer(
                os.path.join(self.model_dir, "eval"))

    def save(self) -> str | None:
        """Saves a checkpoint at the current step (every worker must call this)."""
        path = self.checkpoint.save()
        if path:
            logging.info("Saved checkpoint %s.", path)
        return path

    # ---------------------------------------------------------------- XLA or not

    def choose_jit_compile(self, batch: Any, calls: int = 2) -> bool:
        """Sets `jit_compile` to the faster of the two forward-backward passes on `batch`.

        Each is run once untimed (tracing, XLA compilation), then timed over ``calls`` calls
        (gradients only: no update, no variable changes). Under several workers the times are
        summed over the replicas, so every worker makes the same choice. A choice recorded in
        `model_dir/jit_compile.json` by an earlier run is reused instead (an exact resume
        needs the same computation); the chief records a new one there.

        Args:
          batch: a distributed batch (one step's).
          calls: timed calls per variant.

        Returns:
          The choice; `jit_compile_timings` holds the seconds per call (None when reused).
        """
        recorded = _read_jit_choice(self.model_dir)
        if recorded is not None:
            self._set_jit_compile(recorded)
            logging.info("XLA %s, as recorded in %s.", "on" if recorded else "off",
                         os.path.join(self.model_dir, JIT_CHOICE_FILENAME))
            return recorded
        step = tf.cast(tf.convert_to_tensor(self.optimizer.iterations), tf.int64)
        timings = {}
        for name, fn in (("xla", self._xla_grads_fn), ("no_xla", self._replica_grads)):
            # Called through a Python function in each replica's context, as in the step.
            run = tf.function(lambda b, fn=fn: self.strategy.run(
                lambda part: fn(part, step), args=(b,)))
            _host_read(run(batch))
            tick = time.perf_counter()
            for _ in range(calls):
                _host_read(run(batch))
            seconds = (time.perf_counter() - tick) / calls
            total = self.strategy.reduce(
                tf.distribute.ReduceOp.SUM,
                self.strategy.run(lambda s=seconds: tf.constant(s, tf.float64)), axis=None)
            timings[name] = float(total) / self.strategy.num_replicas_in_sync
        choice = timings["xla"] < timings["no_xla"]
        self._set_jit_compile(choice)
        self.jit_compile_timings = timings
        if self.is_chief:
            _write_jit_choice(self.model_dir, choice, timings)
        logging.info("XLA %s: the forward-backward pass took %.4g s with XLA and %.4g s "
                     "without (per replica and call).", "on" if choice else "off",
                     timings["xla"], timings["no_xla"])
        return choice

    def _set_jit_compile(self, on: bool) -> None:
        self.jit_compile = bool(on)
        self._grads_fn = self._xla_grads_fn if on else self._replica_grads

    # ---------------------------------------------------------------- the step

    def _replica_grads(self, batch: Any, step: tf.Tensor):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss, metrics = self.train_step_fn(self.model, batch, step)
            loss = tf.convert_to_tensor(loss)
            if loss.shape.rank != 0:
                raise ValueError(
                    "train_step_fn must return a scalar loss (the mean over this replica's "
                    f"batch), got shape {loss.shape}."
                )
            scaled = loss / tf.cast(self.strategy.num_replicas_in_sync, loss.dtype)
            scaled = self.optimizer.scale_loss(scaled)  # identity unless loss scaling is on
        grads = tape.gradient(scaled, variables)
        return loss, _check_metrics(metrics), grads

    def _replica_step(self, batch: Any, step: tf.Tensor):
        loss, metrics, grads = self._grads_fn(batch, step)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        if self.post_step_fn is not None:
            self.post_step_fn(self.model, step)
        return tf.cast(loss, tf.float32), metrics

    def _distributed_step(self, batch: Any, first_bad: tf.Tensor | None = None):
        # Read in cross-replica context before the update: the step of this update, the same
        # on every replica (the optimizer increments `iterations` once, in `apply_gradients`).
        step = tf.cast(tf.convert_to_tensor(self.optimizer.iterations), tf.int64)
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)
        loss, metrics = self.strategy.run(self._replica_step, args=(batch, step))
        mean = tf.distribute.ReduceOp.MEAN
        loss = self.strategy.reduce(mean, loss, axis=None)
        metrics = {k: self.strategy.reduce(mean, v, axis=None) for k, v in metrics.items()}
        if first_bad is not None:  # the first update (1-based) with a non-finite loss, or -1
            bad = tf.logical_and(first_bad < 0, tf.logical_not(tf.math.is_finite(loss)))
            first_bad = tf.where(bad, step + 1, first_bad)
        return loss, metrics, learning_rate, first_bad

    def train_step(self, batch: Any) -> tuple[tf.Tensor, dict[str, tf.Tensor], tf.Tensor]:
        """Runs one distributed step on `batch` (a distributed batch).

        Returns:
          (loss, metrics, learning_rate): replica means of the loss and metrics, and the rate
          the optimizer used, as tensors (no host synchronisation).
        """
        loss, metrics, learning_rate, _ = self._step_function(batch)
        return loss, metrics, learning_rate

    def _check_finite(self, first_bad: tf.Tensor, *, weights: bool) -> None:
        """Raises `NonFiniteLossError` if a loss since the last check (or, with `weights`, a
        weight) is not finite; the newest checkpoint is then the last good one."""
        bad = int(first_bad)
        if bad < 0 and not (weights and not self.weights_finite()):
            return
        what = (f"the loss is not finite (NaN or infinite) at step {bad}" if bad >= 0
                else f"a model weight is not finite at step {self.step}")
        latest = self.checkpoint.latest_checkpoint
        where = (f"The newest checkpoint, {latest}, holds finite weights and is left intact: "
                 "rerun with a lower learning rate (or other settings) to continue from it."
                 if latest else
                 f"There is no checkpoint in {self.model_dir} yet: rerun from scratch with a "
                 "lower learning rate (or other settings).")
        raise NonFiniteLossError(f"Training stopped: {what}; nothing was saved after it. "
                                 f"{where}")

    def weights_finite(self) -> bool:
        """Whether every floating-point model weight is finite (one host synchronisation)."""
        if self._weights_finite_fn is None:
            def all_finite():
                checks = [tf.reduce_all(tf.math.is_finite(w.value)) for w in self.model.weights
                          if tf.as_dtype(w.dtype).is_floating]
                return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)
            self._weights_finite_fn = tf.function(all_finite)
        return bool(self._weights_finite_fn())

    # ---------------------------------------------------------------- the loop

    def train(self, dataset: tf.data.Dataset | Iterable) -> dict[str, float]:
        """Trains from the current (restored) step up to `total_steps`.

        Args:
          dataset: a `tf.data.Dataset` of global batches (distributed here with
            `strategy.experimental_distribute_dataset`; batch it with the global batch size and
            `.repeat()` it), or an already distributed dataset. A finite dataset is restarted
            when exhausted (avoid that under multi-worker: workers may run out unevenly).

        Returns:
          The last logged values: `loss`, each metric, `learning_rate`, `steps_per_second`,
          and the last evaluation results as `eval/<name>`.

        Raises:
          NonFiniteLossError: a loss (or, at a checkpoint, a weight) is NaN or infinite. The
            loss of every step is tracked on the device and checked at each log, evaluation
            and checkpoint (never saving after a non-finite step), so the newest checkpoint
            is always a finite one.
          CheckpointError: from restoring (see `restore`).
        """
        start = self.restore() if not self._restored else self.step
        results: dict[str, float] = {}
        if start >= self.total_steps:
            logging.info("Step %d >= total_steps %d: nothing to train.", start, self.total_steps)
            return results
        if isinstance(dataset, tf.data.Dataset):
            dataset = self.strategy.experimental_distribute_dataset(dataset)
        iterator = iter(dataset)
        progbar = None
        if self.is_chief and self.progress:
            print(f"Training steps {start} -> {self.total_steps} in {self.model_dir}")
            progbar = keras.utils.Progbar(
                self.total_steps - start, stateful_metrics=None, stateless_metrics=()
            )
        # `step` mirrors `optimizer.iterations` on the host (each update adds one) so that the
        # loop needs no host synchronisation between logs; it is re-read at every log.
        step, last_saved, last_eval = start, start, -1
        sums: dict[str, tf.Tensor] = {}
        count, tick = 0, time.perf_counter()
        # On the device, no host synchronisation: the first step since the last check whose
        # loss was not finite, or -1. Checked wherever the host waits anyway (logs,
        # evaluations, checkpoints), and always before a checkpoint is written.
        first_bad = tf.constant(-1, tf.int64)
        while step < self.total_steps:
            batch, iterator = _next_batch(iterator, dataset)
            if self.jit_compile is None:
                self.choose_jit_compile(batch)
            loss, metrics, learning_rate, first_bad = self._step_function(batch, first_bad)
            step += 1
            count += 1
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = value if name not in sums else sums[name] + value
            log_now = step % self.log_every == 0 or step == self.total_steps
            eval_now = bool(self.eval_every) and step % self.eval_every == 0
            save_now = (bool(self.checkpoint_every) and step % self.checkpoint_every == 0
                        or step == self.total_steps)
            if log_now:
                step = self.step  # the host is synchronised here anyway
                logs = {k: float(v) / count for k, v in sums.items()}
                logs["learning_rate"] = float(learning_rate)
                now = time.perf_counter()
                logs["steps_per_second"] = count / max(now - tick, 1e-9)
                sums, count, tick = {}, 0, now
                self._write_scalars(self._train_writer, logs, step)
                if progbar is not None:
                    shown = [(k, v) for k, v in logs.items() if k != "steps_per_second"]
                    progbar.update(step - start, values=shown)  # it shows its own speed
                results.update(logs)
            if log_now or eval_now or save_now:
                self._check_finite(first_bad, weights=save_now)
            if eval_now:
                results.update(self._evaluate(step))
                last_eval = step
            if save_now:
                self.save()
                last_saved = step
        if last_saved != step:
            self._check_finite(first_bad, weights=True)
            self.save()
        if self.eval_fn is not None and last_eval != step:
            results.update(self._evaluate(step))
        self._train_writer.flush()
        self._eval_writer.flush()
        return results

    def _evaluate(self, step: int) -> dict[str, float]:
        if self.eval_fn is None or not self.is_chief:
            return {}
        with self._eval_writer.as_default(step=step):
            values = self.eval_fn(step) or {}
        values = {k: float(v) for k, v in values.items()}
        self._write_scalars(self._eval_writer, values, step)
        if values:
            text = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            logging.info("Evaluation at step %d: %s", step, text)
            if self.progress:
                print(f"\nEvaluation at step {step}: {text}")
        return {f"eval/{k}": v for k, v in values.items()}

    @staticmethod
    def _write_scalars(writer, values: Mapping[str, float], step: int) -> None:
        with writer.as_default():
            for name, value in values.items():
                tf.summary.scalar(name, value, step=step)


JIT_CHOICE_FILENAME = "jit_compile.json"


def _host_read(outputs) -> None:
    for t in tf.nest.flatten(outputs):
        for value in getattr(t, "values", (t,)):  # per-replica values
            if tf.is_tensor(value):
                value.numpy()


def _read_jit_choice(model_dir: str) -> bool | None:
    path = os.path.join(model_dir, JIT_CHOICE_FILENAME)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            choice = json.load(f)["jit_compile"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a jit_compile choice ({e}); delete it to measure "
                         "again.") from None
    if not isinstance(choice, bool):
        raise ValueError(f"{path}: jit_compile must be true or false, got {choice!r}; delete "
                         "it to measure again.")
    return choice


def _write_jit_choice(model_dir: str, choice: bool, timings: Mapping[str, float]) -> None:
    tf.io.gfile.makedirs(model_dir)
    record = {"jit_compile": choice, "seconds_per_call": dict(timings),
              "measured": "forward and backward pass on the first batch, per replica"}
    atomic_write(os.path.join(model_dir, JIT_CHOICE_FILENAME),
                 json.dumps(record, indent=2, sort_keys=True) + "\n")


def _next_batch(iterator, dataset):
    try:
        return next(iterator), iterator
    except (StopIteration, tf.errors.OutOfRangeError):
        logging.info("Training data exhausted; starting another pass.")
        iterator = iter(dataset)
        try:
            return next(iterator), iterator
        except (StopIteration, tf.errors.OutOfRangeError):
            raise ValueError("The training dataset yields no batch.") from None


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, tf.Tensor]:
    out = {}
    for name, value in dict(metrics or {}).items():
        if not isinstance(name, str) or not name or name in RESERVED_NAMES:
            raise ValueError(
                f"Metric names must be non-empty strings other than {RESERVED_NAMES}; got {name!r}."
            )
        value = tf.convert_to_tensor(value)
        if value.shape.rank != 0:
            raise ValueError(f"Metric {name!r} must be a scalar, got shape {value.shape}.")
        out[name] = tf.cast(value, tf.float32)
    return out


def _check_created_in_scope(strategy, model: keras.Model, optimizer) -> None:
    if not model.built or not model.variables:
        raise ValueError(
            "Build the model (create its variables, e.g. by calling it on a batch) under "
            "strategy.scope() before making the Trainer."
        )
    extended = strategy.extended
    outside = [v.path for v in model.variables if not extended.variable_created_in_scope(v.value)]
    if outside:
        raise ValueError(
            f"Model variables {outside[:3]} were not created under this strategy's scope(); "
            "build the model inside `with strategy.scope():`."
        )
    # Keras' TF optimizer records the strategy current at construction (private attribute).
    opt_strategy = getattr(optimizer, "_distribution_strategy", strategy)
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        opt_strategy = getattr(inner, "_distribution_strategy", opt_strategy)
    if opt_strategy is not strategy:
        raise ValueError(
            "The optimizer was not created under this strategy's scope(); create it inside "
            "`with strategy.scope():`."
        )


def _warn_if_config_changed(model_dir: str, config: Any) -> None:
    try:
        old = read_config(model_dir)
    except (FileNotFoundError, ValueError):
        return
    new = config_to_dict(config)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        logging.warning(
            "config.json in %s changes in %s; the old file is replaced.", model_dir, changed
        )
