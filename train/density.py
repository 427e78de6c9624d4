r"""Trains an i-ResNet density model by maximum likelihood and exports it.

    python -m train.density --preset=digits_density --dataset=digits
    python -m train.density --preset=toy2d_density --dataset=checkerboard --train_steps=2000
    python -m train.density --preset=cifar10_density_paper --dataset=cifar10 \
        --batch_size=64 --train_steps=200000 --strategy=mirrored

Flags are read here only; everything else takes the resolved `DensityTrainConfig`.
"""

from __future__ import annotations

from absl import app, flags

from tf_iresnet.logdet import METHODS, PROBES
from tf_iresnet.tasks.common import run_dirs, steps_for_epochs
from tf_iresnet.tasks.density import (
    OPTIMIZERS,
    DensityTrainConfig,
    data_defaults,
    train_density,
)

from .flags import define_common_flags, run_task

FLAGS = flags.FLAGS
define_common_flags(
    task="density", default_preset="digits_density", default_dataset="digits",
    batch_size=None,
    helps={"batch_size": "Global batch size (default 64 for images, 512 for the 2-D sets)."},
    mismatch_message="--dataset and --preset disagree on the event shape: use an image preset "
                     "of the dataset's size (e.g. digits_density for digits, bench_mnist or "
                     "mnist_density_paper for mnist, bench_cifar_small for cifar10) or "
                     "toy2d_density for the 2-D sets.")
flags.DEFINE_enum("optimizer", "adamax", list(OPTIMIZERS), "Optimizer (the paper: adamax).")
flags.DEFINE_float("lr", None, "Peak learning rate, reached after the warm-up (default 3e-3 "
                   "for images, 1e-2 for the 2-D sets).", lower_bound=0.0)
flags.DEFINE_integer("warmup_steps", 100, "Linear learning-rate warm-up steps.", lower_bound=0)
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay.", lower_bound=0.0)
flags.DEFINE_enum("logdet", None, [m for m in METHODS if m != "none"],
                  "Training log-det estimator (default: the preset's, 'series').")
flags.DEFINE_integer("n_terms", None, "Series terms (series estimator).", lower_bound=1)
flags.DEFINE_integer("n_samples", None, "Hutchinson probes per example.", lower_bound=1)
flags.DEFINE_integer("n_exact_terms", None, "Terms always computed (unbiased estimator).",
                     lower_bound=0)
flags.DEFINE_enum("probe", None, list(PROBES), "Hutchinson probe distribution.")
flags.DEFINE_boolean("neumann_gradient", None, "Memory-saving Neumann-series log-det gradient.")
flags.DEFINE_boolean("recompute", None, "Recompute each residual block in the backward pass "
                     "instead of storing it (less memory, about a third more time).")
flags.DEFINE_integer("eval_examples", 2000, "Test examples per evaluation (0: all).",
                     lower_bound=0)
flags.DEFINE_integer("num_samples", 64, "Samples in the image grid.", lower_bound=1)

_MODEL_FLAGS = ("logdet", "n_terms", "n_samples", "n_exact_terms", "probe", "neumann_gradient",
                "recompute", "coeff", "power_iterations")


def config_from_flags() -> DensityTrainConfig:
    """Resolves the flags into a `DensityTrainConfig` (per-data defaults filled in)."""
    batch_size, lr = data_defaults(FLAGS.dataset)
    batch_size = FLAGS.batch_size or batch_size
    lr = FLAGS.lr if FLAGS.lr is not None else lr
    train_steps = FLAGS.train_steps
    if FLAGS.epochs is not None:
        train_steps = steps_for_epochs(FLAGS.dataset, FLAGS.epochs, batch_size)
    if train_steps is None:
        train_steps = 2000
    model_dir, export_dir = run_dirs(FLAGS.preset, FLAGS.dataset, FLAGS.model_dir,
                                     FLAGS.export_dir)
    overrides = {k: FLAGS[k].value for k in _MODEL_FLAGS if FLAGS[k].value is not None}
    return DensityTrainConfig(
        dataset=FLAGS.dataset, preset=FLAGS.preset, model_dir=model_dir, export_dir=export_dir,
        batch_size=batch_size, train_steps=train_steps, optimizer=FLAGS.optimizer,
        learning_rate=lr, warmup_steps=FLAGS.warmup_steps,
        weight_decay=FLAGS.weight_decay,
        strategy=FLAGS.strategy, seed=FLAGS.seed, eval_every=FLAGS.eval_every,
        checkpoint_every=FLAGS.checkpoint_every, log_every=FLAGS.log_every,
        eval_examples=FLAGS.eval_examples, num_samples=FLAGS.num_samples,
        jit_compile=FLAGS.jit_compile, model_overrides=overrides)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = run_task(train_density, config_from_flags)
    if "samples_png" not in results:
        return  # a non-chief worker: the chief reports, saves and exports
    print(f"test bits/dim: {results['test_bits_per_dim']:.4f}")
    print(f"samples: {results['samples_png']}")
    if "export_dir" in results:
        print(f"SavedModel: {results['export_dir']}")


def run():
    """Entry point of the ``tf-iresnet-density`` console script."""
    app.run(main)


if __name__ == "__main__":
    run()
