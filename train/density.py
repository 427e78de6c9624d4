r"""Trains an i-ResNet density model by maximum likelihood and exports it.

    python -m train.density --preset=digits_density --dataset=digits
    python -m train.density --preset=toy2d_density --dataset=checkerboard --train_steps=2000
    python -m train.density --preset=cifar10_density_paper --dataset=cifar10 \
        --batch_size=64 --train_steps=200000 --strategy=mirrored

Flags are read here only; everything else takes the resolved `DensityTrainConfig`.
"""

from __future__ import annotations

import os

from absl import app, flags

from tf_iresnet import datasets, presets
from tf_iresnet.logdet import METHODS, PROBES
from tf_iresnet.tasks.density import OPTIMIZERS, DensityTrainConfig, train_density
from tf_iresnet.training import STRATEGY_NAMES

_DENSITY_PRESETS = [n for n in presets.names() if presets.kind(n) == "density"]

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "digits", datasets.names(), "Training data.")
flags.DEFINE_enum("preset", "digits_density", _DENSITY_PRESETS, "Model preset.")
flags.DEFINE_string("model_dir", None, "Run directory (default runs/<preset>_<dataset>).")
flags.DEFINE_string("export_dir", None,
                    "SavedModel destination (default saved_models/<preset>; '' skips export).")
flags.DEFINE_integer("batch_size", 64, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("train_steps", None, "Optimizer steps (default 2000; or use --epochs).",
                     lower_bound=0)
flags.DEFINE_float("epochs", None, "Train for this many passes over the training split.",
                   lower_bound=0.0)
flags.DEFINE_enum("optimizer", "adamax", list(OPTIMIZERS), "Optimizer (the paper: adamax).")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate, reached after the warm-up.", lower_bound=0.0)
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
flags.DEFINE_float("coeff", None, "Spectral-norm coefficient in (0, 1).")
flags.DEFINE_integer("power_iterations", None, "Power iterations per step.", lower_bound=0)
flags.DEFINE_enum("strategy", "auto", list(STRATEGY_NAMES), "tf.distribute strategy.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("eval_every", 500, "Steps between test-split evaluations.", lower_bound=0)
flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.", lower_bound=0)
flags.DEFINE_integer("log_every", 50, "Steps between TensorBoard/progress updates.",
                     lower_bound=1)
flags.DEFINE_integer("eval_examples", 2000, "Test examples per evaluation (0: all).",
                     lower_bound=0)
flags.DEFINE_integer("num_samples", 64, "Samples in the image grid.", lower_bound=1)
flags.DEFINE_boolean("jit_compile", True,
                     "XLA-compile the forward/backward pass (slower first step, faster after).")

flags.register_validator("coeff", lambda c: c is None or 0.0 < c < 1.0,
                         message="--coeff must be in the open interval (0, 1).")
flags.register_multi_flags_validator(
    ["train_steps", "epochs"], lambda f: f["train_steps"] is None or f["epochs"] is None,
    message="Give --train_steps or --epochs, not both.")
flags.register_multi_flags_validator(
    ["dataset", "preset"],
    lambda f: tuple(datasets.spec(f["dataset"]).shape)
    == tuple(presets.config(f["preset"]).input_shape),
    message="--dataset and --preset disagree on the event shape: use an image preset "
            "of the dataset's size (e.g. digits_density for digits, bench_mnist or "
            "mnist_density_paper for mnist, bench_cifar_small for cifar10) or "
            "toy2d_density for the 2-D sets.")

_MODEL_FLAGS = ("logdet", "n_terms", "n_samples", "n_exact_terms", "probe", "neumann_gradient",
                "coeff", "power_iterations")


def config_from_flags() -> DensityTrainConfig:
    """Resolves the flags into a `DensityTrainConfig`."""
    train_steps = FLAGS.train_steps
    if FLAGS.epochs is not None:
        size = datasets.num_examples(FLAGS.dataset, "train")
        train_steps = max(1, round(FLAGS.epochs * size / FLAGS.batch_size))
    if train_steps is None:
        train_steps = 2000
    model_dir = FLAGS.model_dir or os.path.join("runs", f"{FLAGS.preset}_{FLAGS.dataset}")
    export_dir = (FLAGS.export_dir if FLAGS.export_dir is not None
                  else os.path.join("saved_models", FLAGS.preset))
    overrides = {k: FLAGS[k].value for k in _MODEL_FLAGS if FLAGS[k].value is not None}
    return DensityTrainConfig(
        dataset=FLAGS.dataset, preset=FLAGS.preset, model_dir=model_dir, export_dir=export_dir,
        batch_size=FLAGS.batch_size, train_steps=train_steps, optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.lr, warmup_steps=FLAGS.warmup_steps,
        weight_decay=FLAGS.weight_decay,
        strategy=FLAGS.strategy, seed=FLAGS.seed, eval_every=FLAGS.eval_every,
        checkpoint_every=FLAGS.checkpoint_every, log_every=FLAGS.log_every,
        eval_examples=FLAGS.eval_examples, num_samples=FLAGS.num_samples,
        jit_compile=FLAGS.jit_compile, model_overrides=overrides)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = train_density(config_from_flags())
    if "samples_png" not in results:
        return  # a non-chief worker: the chief reports, saves and exports
    print(f"test bits/dim: {results['test_bits_per_dim']:.4f}")
    print(f"samples: {results['samples_png']}")
    if "export_dir" in results:
        print(f"SavedModel: {results['export_dir']}")


if __name__ == "__main__":
    app.run(main)
