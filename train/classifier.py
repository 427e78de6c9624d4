r"""Trains an i-ResNet classifier (or hybrid classifier + density model) and exports it.

    python -m train.classifier                                   # digits_classifier on digits
    python -m train.classifier --preset=digits_hybrid            # + bits/dim through the log-det
    python -m train.classifier --preset=cifar10_classifier_paper --dataset=cifar10 \
        --strategy=mirrored                                      # the paper's script, 200 epochs

Flags (the shared ones from `train.flags`) are defined by `define_flags` at import, read only
by `config_from_flags` and resolved into a `ClassifierTrainConfig` (written to
``model_dir/config.json``) with the per-dataset defaults and the paper's schedule;
`tf_iresnet.tasks.classifier.train_classifier(config)` does the rest: the chosen
`tf.distribute` strategy, the custom loop with checkpoints and resumption, TensorBoard logs,
test evaluation every ``--eval_every`` steps and at the end, then the spectral norms are
converged and the model is exported.

Optimization follows the official script: SGD with momentum 0.9, an L2 penalty 5e-4 in the loss
(``--l2_penalty``, PyTorch's ``weight_decay``), a linear warm-up over the first 5% of the steps
and the rate multiplied by 0.2 at 30%, 60% and 80% of them: for the paper's 200 CIFAR epochs
that is warm-up over 10 epochs and decays at epochs 60, 120 and 160. Pad-crop-flip augmentation
for CIFAR only. Hybrid models (``--hybrid_weight > 0`` or the ``digits_hybrid`` preset) train on
uniformly dequantized images and minimise ``cross-entropy + hybrid_weight * bits/dim``.
"""

from __future__ import annotations

from absl import app, flags

from tf_iresnet.tasks.classifier import (
    AUGMENTED_DATASETS,
    DATASET_DEFAULTS,
    ClassifierTrainConfig,
    classifier_datasets,
    resolve_model_config,
    schedule_steps,
    train_classifier,
)
from tf_iresnet.tasks.common import run_dirs, steps_for_epochs
from tf_iresnet.tasks.run import default as config_default

from .flags import define_common_flags, run_main, run_task

_MODEL_FLAGS = ("coeff", "power_iterations", "hybrid_weight")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the binary's flags and their validators in ``fv``.

    Called at import on `flags.FLAGS` (so this module cannot share a process with another
    binary's flags); tests pass their own `FlagValues`.
    """
    # Before the common flags: their dataset/preset check also sees --hybrid_weight.
    flags.DEFINE_float("lr", None, "Peak SGD learning rate (default: 0.05 for digits, else "
                       "the paper's 0.1).", flag_values=fv)
    flags.DEFINE_float("l2_penalty", config_default(ClassifierTrainConfig, "l2_penalty"),
                       "Coefficient wd of the L2 term 0.5 * wd * ||w||^2 in the loss (the "
                       "paper's 5e-4; PyTorch SGD's weight_decay).", lower_bound=0.0,
                       flag_values=fv)
    flags.DEFINE_float("hybrid_weight", None,
                       "Weight of bits/dim in the loss; > 0 trains a hybrid model (default: "
                       "the preset's; needs an unpadded preset such as digits_hybrid).",
                       lower_bound=0.0, flag_values=fv)
    define_common_flags(
        task="classifier", default_preset="digits_classifier", default_dataset="digits",
        config_type=ClassifierTrainConfig, dataset_names=classifier_datasets(),
        resolved_by_binary=("batch_size", "eval_every", "checkpoint_every"),
        helps={
            "dataset": "Labelled training data.",
            "export_dir": "SavedModel destination (default saved_models/<preset>; '' skips the "
                          "export).",
            "batch_size": "Global batch size (default: 64 for digits, else 128).",
            "train_steps": "Optimizer steps (or give --epochs).",
            "epochs": "Passes over the training split (default: 30 for digits, else 200).",
            "coeff": "Spectral-norm coefficient in (0, 1) (default: the preset's, 0.9).",
            "power_iterations": "Power iterations per training step (default: the preset's, "
                                "1).",
            "eval_every": "Steps between test evaluations (0: only at the end; default: 200 "
                          "for digits, else 2000).",
            "checkpoint_every": "Steps between checkpoints (0: only at the end; default: as "
                                "--eval_every).",
            "log_every": "Steps between TensorBoard/progress-bar updates.",
        },
        lower_bounds={"train_steps": 1},
        coeff_message="--coeff must be in the open interval (0, 1): the residual branches "
                      "must be contractive to be invertible.",
        check_compatible=_check_model_flags,
        compatible_flags=("preset", "dataset", *_MODEL_FLAGS),
        flag_values=fv)
    flags.register_validator("lr", lambda v: v is None or v > 0.0, flag_values=fv,
                             message="--lr must be > 0.")


def _check_model_flags(values: dict) -> None:
    overrides = {k: values[k] for k in _MODEL_FLAGS if values[k] is not None}
    resolve_model_config(values["preset"], values["dataset"], overrides)  # ValueError


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> ClassifierTrainConfig:
    """Resolves parsed flags into a `ClassifierTrainConfig` (dataset defaults filled in)."""
    batch, epochs, lr, interval = DATASET_DEFAULTS[fv.dataset]
    batch = fv.batch_size or batch
    train_steps = fv.train_steps
    if train_steps is None:
        train_steps = steps_for_epochs(fv.dataset, fv.epochs or epochs, batch)
    warmup, decays = schedule_steps(train_steps)
    overrides = {k: fv[k].value for k in _MODEL_FLAGS if fv[k].value is not None}
    eval_every = interval if fv.eval_every is None else fv.eval_every
    model_dir, export_dir = run_dirs(fv.preset, fv.dataset, fv.model_dir, fv.export_dir)
    return ClassifierTrainConfig(
        dataset=fv.dataset, preset=fv.preset,
        model=resolve_model_config(fv.preset, fv.dataset, overrides),
        model_dir=model_dir, export_dir=export_dir,
        batch_size=batch, train_steps=train_steps, learning_rate=fv.lr or lr,
        l2_penalty=fv.l2_penalty, warmup_steps=warmup, decay_steps=decays,
        augment=fv.dataset in AUGMENTED_DATASETS, strategy=fv.strategy, seed=fv.seed,
        eval_every=eval_every,
        checkpoint_every=eval_every if fv.checkpoint_every is None else fv.checkpoint_every,
        log_every=fv.log_every, jit_compile=fv.jit_compile, data_dir=fv.data_dir)


def main(argv):
    """Entry point of ``python -m train.classifier`` (flags defined by `define_flags`)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = run_task(train_classifier, lambda: config_from_flags(flags.FLAGS))
    if "test_accuracy" in results:
        print(f"test accuracy: {results['test_accuracy']:.4f}")
        if "test_bits_per_dim" in results:
            print(f"test bits/dim: {results['test_bits_per_dim']:.4f}")
        print(f"reconstruction max abs error: {results['reconstruction_max_abs_error']:.3g}")
    if "export_dir" in results:
        print(f"SavedModel: {results['export_dir']}")


define_flags()


def run():
    """Entry point of the ``tf-iresnet-classifier`` console script."""
    run_main(main, __name__)


if __name__ == "__main__":
    run()
