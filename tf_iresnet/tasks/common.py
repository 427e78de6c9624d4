"""Helpers the tasks share: run directories, epochs to steps, strategy set-up, optimizers,
preset resolution, results.

The binaries in `train/` use `run_dirs` and `steps_for_epochs` to resolve their flags into a
task config; the run driver (`tf_iresnet.tasks.run`) and the tasks use the rest. Nothing here
reads flags.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import tensorflow as tf

from tf_iresnet import datasets, presets
from tf_iresnet.training import RunDirError, check_output_dirs, make_strategy, optimizers
from tf_iresnet.training.config import atomic_write

OPTIMIZERS = ("adamax", "adam", "sgd")


class ConfigError(ValueError):
    """A run configuration that cannot work (mismatched dataset and preset, a batch that does
    not split over the replicas, a bad ``TF_CONFIG``, ...). The binaries report it as a usage
    error: the message, no traceback."""


def run_dirs(preset: str, dataset: str, model_dir: str | None = None,
             export_dir: str | None = None) -> tuple[str, str]:
    """``(model_dir, export_dir)`` with the defaults filled in.

    Args:
      preset, dataset: the run's preset and dataset names.
      model_dir: the run directory; empty or None for ``runs/<preset>_<dataset>``.
      export_dir: the SavedModel destination; None for ``saved_models/<preset>`` ('' stays
        '': no export).
    """
    model_dir = model_dir or os.path.join("runs", f"{preset}_{dataset}")
    export_dir = export_dir if export_dir is not None else os.path.join("saved_models", preset)
    return model_dir, export_dir


def check_run_dirs(model_dir: str, export_dir: str = "") -> None:
    """`tf_iresnet.training.check_output_dirs` for a run being configured: ``model_dir`` is
    created if missing, ``export_dir``'s parent too (the directory itself is left to the export).

    Raises:
      ConfigError: either path is empty, an existing file, or cannot be created or written.
    """
    if not model_dir:
        raise ConfigError("model_dir is empty: pass a directory that can be created and written.")
    try:
        check_output_dirs(model_dir, export_dir)
    except RunDirError as e:
        raise ConfigError(str(e)) from None


def steps_for_epochs(dataset: str, epochs: float, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over the training split (at least 1).

    Raises:
      ConfigError: ``dataset`` is a generated stream (no epochs), or ``epochs <= 0``.
    """
    if not epochs > 0:
        raise ConfigError(f"epochs must be > 0, got {epochs!r}.")
    try:
        size = datasets.num_examples(dataset, "train")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return max(1, round(epochs * size / batch_size))


def start_run(strategy_name: str, seed: int, batch_size: int) -> tf.distribute.Strategy:
    """Makes the strategy (first: multi-worker needs it before any op), seeds everything and
    checks that ``batch_size`` splits evenly over the replicas.

    Raises:
      ConfigError: an unknown strategy, a missing or invalid ``TF_CONFIG``, or a ``batch_size``
        that is not a multiple of the number of replicas.
    """
    try:
        strategy = make_strategy(strategy_name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    keras.utils.set_random_seed(seed)
    if batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(f"batch_size {batch_size} must be divisible by the "
                         f"{strategy.num_replicas_in_sync} replicas.")
    return strategy


def make_optimizer(name: str, learning_rate, *, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> keras.optimizers.Optimizer:
    """An optimizer of `OPTIMIZERS` by name.

    Args:
      name: ``adamax``, ``adam`` or ``sgd``.
      learning_rate: a float or a schedule (e.g. `tf_iresnet.training.WarmupSchedule`).
      momentum: SGD momentum (``sgd`` only).
      weight_decay: decoupled weight decay; 0 for none.

    Raises:
      ValueError: an unknown ``name``.
    """
    kwargs = {"learning_rate": learning_rate}
    if weight_decay:
        kwargs["weight_decay"] = weight_decay
    if name == "adamax":
        return optimizers.Adamax(**kwargs)
    if name == "adam":
        return keras.optimizers.Adam(**kwargs)
    if name == "sgd":
        return keras.optimizers.SGD(momentum=momentum, **kwargs)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")


def step_seed(seed: int, step) -> tf.Tensor:
    """The stateless seed of training step ``step``: equal on every replica and worker."""
    return tf.stack([tf.constant(seed, tf.int32), tf.cast(step, tf.int32)])


def write_results(model_dir: str, results: dict) -> None:
    """Writes ``results`` to ``model_dir/results.json`` (atomically, through `tf.io.gfile`)."""
    atomic_write(os.path.join(model_dir, "results.json"),
                 json.dumps(results, indent=2, sort_keys=True))


def preset_config(preset: str, config_type: type, overrides: dict, error: str):
    """The preset's model config with ``overrides`` replaced.

    Raises:
      ConfigError: with ``error``, the preset's config is not a ``config_type``; or an override
        that the config refuses (an unknown field or a bad value).
    """
    base = presets.config(preset)
    if not isinstance(base, config_type):
        raise ConfigError(error)
    try:
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Preset {preset!r} with overrides {overrides}: {e}") from None


def with_dataset_levels(model_cfg, dataset: str):
    """``model_cfg`` with the dataset's number of quantization levels."""
    spec = datasets.spec(dataset)
    if spec.num_levels != model_cfg.num_levels:
        model_cfg = dataclasses.replace(model_cfg, num_levels=spec.num_levels)
    return model_cfg
