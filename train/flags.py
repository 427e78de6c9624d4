"""The flags every training binary shares, defined in one place.

Each binary has the same shape: ``define_flags(fv)`` calls `define_common_flags` with its
task's config type (the flags' defaults are that config's field defaults) and defines its own
extra flags; ``config_from_flags(fv)`` resolves them into the task's config; ``main`` runs it
through `run_task`. ``define_flags(flags.FLAGS)`` runs at import. The flags count
as the calling binary's own (this module disclaims them), and `run_main` makes them the key
flags of the main module absl's ``--help`` describes, so ``--help`` lists them both under
``python -m train.<binary>`` and from the installed console scripts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

from absl import app, flags

from tf_iresnet import datasets, presets
from tf_iresnet.tasks import run
from tf_iresnet.tasks.common import ConfigError
from tf_iresnet.tasks.run import RUN_ERRORS, RunConfig
from tf_iresnet.training import STRATEGY_NAMES

flags.disclaim_key_flags()  # DEFINE_* below are attributed to the binary that calls them

COMMON_FLAGS = ("dataset", "preset", "model_dir", "export_dir", "batch_size", "train_steps",
                "epochs", "strategy", "seed", "eval_every", "checkpoint_every", "log_every",
                "jit_compile", "coeff", "power_iterations", "data_dir")

# The default help of each flag; a binary replaces what its defaults make different.
_HELP = {
    "dataset": "Training data.",
    "preset": "Model preset.",
    "model_dir": "Run directory (default runs/<preset>_<dataset>).",
    "export_dir": "SavedModel destination (default saved_models/<preset>; '' skips export).",
    "batch_size": "Global batch size.",
    "train_steps": "Optimizer steps (default: the task config's, {train_steps}; or use "
                   "--epochs).",
    "epochs": "Train for this many passes over the training split.",
    "strategy": "tf.distribute strategy.",
    "seed": "Random seed.",
    "eval_every": "Steps between test-split evaluations.",
    "checkpoint_every": "Steps between checkpoints.",
    "log_every": "Steps between TensorBoard/progress updates.",
    "jit_compile": "XLA-compile the forward/backward pass (--jit_compile) or not "
                   "(--nojit_compile). Default: both are timed on the first batch and the "
                   "faster is kept (recorded in <model_dir>/jit_compile.json; a resumed run "
                   "reuses it).",
    "coeff": "Spectral-norm coefficient in (0, 1).",
    "power_iterations": "Power iterations per step.",
    "data_dir": "Where tfds datasets are prepared (default $TFDS_DATA_DIR or "
                "~/tensorflow_datasets); runs never download: prepare a set once with "
                "`tfds build <name> --data_dir=DIR`.",
}
_LOWER_BOUNDS = {"batch_size": 1, "train_steps": 0, "epochs": None, "eval_every": 0,
                 "checkpoint_every": 0, "log_every": 1, "power_iterations": 0, "seed": 0}
_COEFF_MESSAGE = "--coeff must be in the open interval (0, 1)."


def define_common_flags(
    *,
    task: str,
    default_preset: str,
    default_dataset: str,
    config_type: type[RunConfig],
    dataset_names: Sequence[str] | None = None,
    resolved_by_binary: Sequence[str] = (),
    helps: Mapping[str, str] | None = None,
    lower_bounds: Mapping[str, float | None] | None = None,
    coeff_message: str = _COEFF_MESSAGE,
    mismatch_message: str = "--dataset and --preset disagree on the event shape.",
    check_compatible: Callable[[dict], object] | None = None,
    compatible_flags: Sequence[str] = ("dataset", "preset"),
    flag_values: flags.FlagValues = flags.FLAGS,
) -> None:
    """Defines `COMMON_FLAGS` and their validators in ``flag_values``.

    Not idempotent: a second call on the same `FlagValues` raises `flags.DuplicateFlagError`
    (two binaries' flags never share a process; tests pass their own `FlagValues`).

    Args:
      task: the preset task (`tf_iresnet.presets.task`) that ``--preset`` offers.
      default_preset, default_dataset: defaults of ``--preset`` and ``--dataset``.
      config_type: the task's `RunConfig` subclass: the flags' defaults are its fields'
        defaults (one place for each default). ``--train_steps`` and ``--epochs`` default to
        None: the binary uses the config's ``train_steps`` when neither is given.
      dataset_names: the choices of ``--dataset`` (default: every dataset).
      resolved_by_binary: flags whose default is None because the binary picks one per
        dataset (e.g. ``batch_size``).
      helps: per flag name, a help text that replaces the default one.
      lower_bounds: per flag name, a lower bound that replaces the default one (None: none).
      coeff_message: the error of a ``--coeff`` outside (0, 1).
      mismatch_message: the error of a ``--dataset`` whose event shape is not the preset's
        (the default check).
      check_compatible: replaces the event-shape check: called with the values of
        ``compatible_flags``; raises `ValueError` (its text is the flag error) when the
        dataset and the preset (and model flags) do not fit together.
      compatible_flags: the flags ``check_compatible`` sees.
      flag_values: where to define them.
    """
    def default(name):
        return None if name in resolved_by_binary else run.default(config_type, name)

    helps = {**_HELP, **(helps or {})}
    helps["train_steps"] = helps["train_steps"].format(
        train_steps=run.default(config_type, "train_steps"))
    bounds = {**_LOWER_BOUNDS, **(lower_bounds or {})}
    fv = flag_values

    def kw(name):
        extra = {"flag_values": fv}
        if bounds.get(name) is not None:
            extra["lower_bound"] = bounds[name]
        return extra

    preset_names = [n for n in presets.names() if presets.task(n) == task]
    flags.DEFINE_enum("dataset", default_dataset, list(dataset_names or datasets.names()),
                      helps["dataset"], flag_values=fv)
    flags.DEFINE_enum("preset", default_preset, preset_names, helps["preset"], flag_values=fv)
    flags.DEFINE_string("model_dir", None, helps["model_dir"], flag_values=fv)
    flags.DEFINE_string("export_dir", None, helps["export_dir"], flag_values=fv)
    flags.DEFINE_integer("batch_size", default("batch_size"), helps["batch_size"],
                         **kw("batch_size"))
    flags.DEFINE_integer("train_steps", None, helps["train_steps"], **kw("train_steps"))
    flags.DEFINE_float("epochs", None, helps["epochs"], **kw("epochs"))
    flags.DEFINE_enum("strategy", default("strategy"), list(STRATEGY_NAMES), helps["strategy"],
                      flag_values=fv)
    flags.DEFINE_integer("seed", default("seed"), helps["seed"], upper_bound=run.MAX_SEED,
                         **kw("seed"))
    flags.DEFINE_integer("eval_every", default("eval_every"), helps["eval_every"],
                         **kw("eval_every"))
    flags.DEFINE_integer("checkpoint_every", default("checkpoint_every"),
                         helps["checkpoint_every"], **kw("checkpoint_every"))
    flags.DEFINE_integer("log_every", default("log_every"), helps["log_every"],
                         **kw("log_every"))
    flags.DEFINE_boolean("jit_compile", default("jit_compile"), helps["jit_compile"],
                         flag_values=fv)
    flags.DEFINE_float("coeff", None, helps["coeff"], **kw("coeff"))
    flags.DEFINE_integer("power_iterations", None, helps["power_iterations"],
                         **kw("power_iterations"))
    flags.DEFINE_string("data_dir", default("data_dir"), helps["data_dir"], flag_values=fv)

    flags.register_validator("coeff", lambda c: c is None or 0.0 < c < 1.0,
                             message=coeff_message, flag_values=fv)
    flags.register_multi_flags_validator(
        ["train_steps", "epochs"], lambda v: v["train_steps"] is None or v["epochs"] is None,
        message="Give --train_steps or --epochs, not both.", flag_values=fv)
    flags.register_validator("epochs", lambda v: v is None or v > 0.0, flag_values=fv,
                             message="--epochs must be > 0 (for no training: --train_steps=0).")

    def check_epochs(values):
        if values["epochs"] is not None:
            try:
                datasets.num_examples(values["dataset"], "train")
            except ValueError as e:
                raise flags.ValidationError(f"--epochs: {e}") from None
        return True

    flags.register_multi_flags_validator(["dataset", "epochs"], check_epochs, flag_values=fv)
    if check_compatible is None:
        def check_compatible(values):
            if (tuple(datasets.spec(values["dataset"]).shape)
                    != tuple(presets.config(values["preset"]).input_shape)):
                raise ValueError(mismatch_message)

    def validate(values):
        try:
            check_compatible(values)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    flags.register_multi_flags_validator(list(compatible_flags), validate, flag_values=fv)


def run_task(train_fn: Callable, config_fn: Callable):
    """``train_fn(config_fn())``, with a `ConfigError` (a run configuration that cannot work,
    found once the flags are resolved, before training, or once the strategy exists) and a lost
    worker (`tf_iresnet.training.WorkerLostError`) reported as one line on stderr and exit
    status 1, no traceback."""
    try:
        return train_fn(config_fn())
    except (ConfigError, *RUN_ERRORS) as e:  # the run cannot go on: what happened, what to do
        message = " ".join(str(e).split())  # one line
        sys.stderr.write(f"Error: {message}\n")
        sys.stderr.flush()
        sys.exit(1)


def run_main(main: Callable, module_name: str) -> None:
    """``app.run(main)`` for the binary ``module_name`` (its ``__name__``), with ``--help``
    (and its alias ``--helpshort``) listing the binary's own flags.

    absl's ``--help`` lists the key flags of the main module, which it names by
    ``sys.argv[0]``, and a flag is key to the module that defines it, named by its
    ``__name__`` (``sys.argv[0]`` for ``__main__``). Under ``python -m train.density`` the two
    agree; a console script imports the binary as ``tf_iresnet_train.density`` while
    ``sys.argv[0]`` is the script's path, so without this ``--help`` would print only the usage
    line. ``--helpfull`` is unchanged: every flag, grouped by the module that defines it.
    """
    main_module = sys.argv[0]  # what absl's --help and --helpfull take as the main module
    for flag in flags.FLAGS.get_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(main_module, flag)
    app.run(main)
