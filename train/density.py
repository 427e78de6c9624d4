r"""Trains an i-ResNet density model by maximum likelihood and exports it.

    python -m train.density --preset=digits_density --dataset=digits
    python -m train.density --preset=toy2d_density --dataset=checkerboard --train_steps=2000
    python -m train.density --preset=cifar10_density_paper --dataset=cifar10 \
        --batch_size=64 --train_steps=200000 --strategy=mirrored

Flags are defined by `define_flags` at import and read only by `config_from_flags`, which
resolves them into a `DensityTrainConfig`; everything else takes that config.
"""

from __future__ import annotations

import functools

from absl import app, flags

from tf_iresnet.logdet import METHODS, PROBES
from tf_iresnet.models.density import GRADIENT_MEMORY
from tf_iresnet.tasks.common import run_dirs, steps_for_epochs
from tf_iresnet.tasks.density import (
    OPTIMIZERS,
    DensityTrainConfig,
    data_defaults,
    train_density,
)
from tf_iresnet.tasks.run import default as config_default

from .flags import define_common_flags, run_main, run_task

_MODEL_FLAGS = ("logdet", "n_terms", "n_samples", "n_exact_terms", "probe", "neumann_gradient",
                "recompute", "gradient_memory", "coeff", "power_iterations")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the binary's flags and their validators in ``fv`` (defaults: the fields of
    `DensityTrainConfig`). Called at import on `flags.FLAGS`; tests pass their own."""
    define_common_flags(
        task="density", default_preset="digits_density", default_dataset="digits",
        config_type=DensityTrainConfig, resolved_by_binary=("batch_size",),
        helps={"batch_size": "Global batch size (default 64 for images, 512 for the 2-D sets)."},
        mismatch_message="--dataset and --preset disagree on the event shape: use an image "
                         "preset of the dataset's size (e.g. digits_density for digits, "
                         "bench_mnist or mnist_density_paper for mnist, bench_cifar_small for "
                         "cifar10) or toy2d_density for the 2-D sets.",
        flag_values=fv)
    default = functools.partial(config_default, DensityTrainConfig)
    flags.DEFINE_enum("optimizer", default("optimizer"), list(OPTIMIZERS),
                      "Optimizer (the paper: adamax).", flag_values=fv)
    flags.DEFINE_float("lr", None, "Peak learning rate, reached after the warm-up (default 3e-3 "
                       "for images, 1e-2 for the 2-D sets).", flag_values=fv)
    flags.register_validator("lr", lambda v: v is None or v > 0.0, flag_values=fv,
                             message="--lr must be > 0.")
    flags.DEFINE_integer("warmup_steps", default("warmup_steps"),
                         "Linear learning-rate warm-up steps.", lower_bound=0, flag_values=fv)
    flags.DEFINE_float("weight_decay", default("weight_decay"),
                       "Decoupled weight decay (the optimizer's, not an L2 loss term).",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_enum("logdet", None, [m for m in METHODS if m != "none"],
                      "Training log-det estimator (default: the preset's, 'series').",
                      flag_values=fv)
    flags.DEFINE_integer("n_terms", None, "Series terms (series estimator).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("n_samples", None, "Hutchinson probes per example.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("n_exact_terms", None, "Terms always computed (unbiased estimator).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_enum("probe", None, list(PROBES), "Hutchinson probe distribution.",
                      flag_values=fv)
    flags.DEFINE_boolean("neumann_gradient", None,
                         "Memory-saving Neumann-series log-det gradient (the presets' default; "
                         "--noneumann_gradient differentiates the estimate itself, as the "
                         "reference code does).", flag_values=fv)
    flags.DEFINE_boolean("recompute", None, "Recompute each residual block in the backward "
                         "pass instead of storing it (less memory, about a third more time).",
                         flag_values=fv)
    flags.DEFINE_enum("gradient_memory", None, list(GRADIENT_MEMORY),
                      "Backward pass of the training step: 'stored' (the preset's default) keeps "
                      "the forward pass's activations; 'logdet_in_forward' computes every "
                      "block's log-det gradients in the forward pass and keeps only those "
                      "(less memory, one more pass of each residual branch; series or unbiased "
                      "log-det, not with --recompute); 'invertible' rebuilds every block's "
                      "input from its output, so memory does not grow with depth (one inverse "
                      "and one more forward pass per block).", flag_values=fv)
    flags.DEFINE_integer("eval_examples", default("eval_examples"),
                         "Test examples per evaluation (0: all).", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer("num_samples", default("num_samples"), "Samples in the image grid.",
                         lower_bound=1, flag_values=fv)


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> DensityTrainConfig:
    """Resolves parsed flags into a `DensityTrainConfig` (per-data defaults filled in)."""
    batch_size, lr = data_defaults(fv.dataset)
    batch_size = fv.batch_size or batch_size
    lr = fv.lr if fv.lr is not None else lr
    train_steps = fv.train_steps
    if fv.epochs is not None:
        train_steps = steps_for_epochs(fv.dataset, fv.epochs, batch_size)
    if train_steps is None:
        train_steps = config_default(DensityTrainConfig, "train_steps")
    model_dir, export_dir = run_dirs(fv.preset, fv.dataset, fv.model_dir, fv.export_dir)
    overrides = {k: fv[k].value for k in _MODEL_FLAGS if fv[k].value is not None}
    return DensityTrainConfig(
        dataset=fv.dataset, preset=fv.preset, model_dir=model_dir, export_dir=export_dir,
        batch_size=batch_size, train_steps=train_steps, optimizer=fv.optimizer,
        learning_rate=lr, warmup_steps=fv.warmup_steps, weight_decay=fv.weight_decay,
        strategy=fv.strategy, seed=fv.seed, eval_every=fv.eval_every,
        checkpoint_every=fv.checkpoint_every, log_every=fv.log_every,
        eval_examples=fv.eval_examples, num_samples=fv.num_samples,
        jit_compile=fv.jit_compile, data_dir=fv.data_dir, model_overrides=overrides)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = run_task(train_density, lambda: config_from_flags(flags.FLAGS))
    print(f"final weights checksum: {results['weights_checksum']:.10e}")
    if "samples_png" not in results:
        return  # a non-chief worker: the chief reports, saves and exports
    print(f"test bits/dim: {results['test_bits_per_dim']:.4f}")
    print(f"samples: {results['samples_png']}")
    if "export_dir" in results:
        print(f"SavedModel: {results['export_dir']}")


def run():
    """Entry point of the ``tf-iresnet-density`` console script."""
    run_main(main, __name__)


define_flags()

if __name__ == "__main__":
    run()
