"""Training an i-ResNet classifier (or hybrid classifier + density model), end to end.

``train_classifier(config)`` is what ``python -m train.classifier`` runs after resolving its
flags into a `ClassifierTrainConfig` (written to ``model_dir/config.json``). It uses the shared
machinery of `tf_iresnet.training`: the chosen `tf.distribute` strategy, the custom loop with
checkpoints and resumption, TensorBoard logs (``model_dir/train``: loss, cross-entropy,
accuracy, learning rate; ``model_dir/eval``: test accuracy and loss, per-layer Lipschitz
estimates, the reconstruction error of ``invert(features(x))``, images of inputs and
reconstructions), test evaluation every ``eval_every`` steps and at the end, then the spectral
norms are converged and the model is exported (`tf_iresnet.export.classifier`).

Optimization follows the official script: SGD with momentum 0.9, an L2 penalty 5e-4 in the
loss (PyTorch's ``weight_decay``), a linear warm-up over the first 5% of the steps
and the rate multiplied by 0.2 at 30%, 60% and 80% of them (`schedule_steps`): for the paper's
200 CIFAR epochs that is warm-up over 10 epochs and decays at epochs 60, 120 and 160.
Pad-crop-flip augmentation for CIFAR only. Hybrid models (``hybrid_weight > 0``, e.g. the
``digits_hybrid`` preset) train on uniformly dequantized images and minimise
``cross-entropy + hybrid_weight * bits/dim``.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tf_iresnet import datasets, lipschitz_report, presets
from tf_iresnet.export.classifier import export_classifier
from tf_iresnet.models.classifier import (
    ClassifierConfig,
    build_classifier_model,
    classifier_objective,
)
from tf_iresnet.tasks import common
from tf_iresnet.tasks.run import RunConfig, Task, run
from tf_iresnet.training import (
    WarmupSchedule,
    image_summary,
)

# --- the run configuration ---------------------------------------------------------------------

# Schedule as fractions of the run (exactly the paper's epochs 10 / 60, 120, 160 of 200).
WARMUP_FRACTION = 0.05
DECAY_FRACTIONS = (0.3, 0.6, 0.8)
DECAY_FACTOR = 0.2

# Per dataset: (batch size, epochs, learning rate, eval/checkpoint interval in steps).
DATASET_DEFAULTS = {
    "digits": (64, 30, 0.05, 200),
    "mnist": (128, 200, 0.1, 2000),
    "fashion_mnist": (128, 200, 0.1, 2000),
    "cifar10": (128, 200, 0.1, 2000),
    "cifar100": (128, 200, 0.1, 2000),
    "svhn_cropped": (128, 200, 0.1, 2000),
}
AUGMENTED_DATASETS = ("cifar10", "cifar100")  # pad-crop-flip


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierTrainConfig(RunConfig):
    """A classifier run: the `RunConfig` fields (defaults below where they differ) and these.

    Attributes:
      model: the resolved model config (the preset with the run's overrides).
      momentum: SGD momentum.
      l2_penalty: coefficient ``wd`` of the L2 term ``0.5 * wd * ||w||^2`` over all trainable
        weights added to the loss (PyTorch SGD's ``weight_decay``, the official script's; not
        the decoupled decay of the density task's ``weight_decay``).
      warmup_steps: linear warm-up length.
      decay_steps: steps from which the rate is multiplied by one more ``decay_factor``.
      decay_factor: the step decay factor.
      augment: pad-crop-flip augmentation (CIFAR only).
      num_images: images in the TensorBoard input / reconstruction grids.
    """

    model: ClassifierConfig
    learning_rate: float = 0.1
    log_every: int = 10
    momentum: float = 0.9
    l2_penalty: float = 5e-4
    warmup_steps: int = 0
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = DECAY_FACTOR
    augment: bool = False
    num_images: int = 64


def schedule_steps(train_steps: int) -> tuple[int, tuple[int, ...]]:
    """``(warmup_steps, decay_steps)`` of a run of ``train_steps`` steps."""
    warmup = int(round(WARMUP_FRACTION * train_steps))
    decays = sorted({max(warmup, int(round(f * train_steps))) for f in DECAY_FRACTIONS})
    return warmup, tuple(d for d in decays if 0 < d < train_steps)


def resolve_model_config(preset: str, dataset: str, overrides: dict) -> ClassifierConfig:
    """The preset's config with ``overrides``, checked against the dataset.

    Raises:
      common.ConfigError: not a classifier preset, or a preset for images of another shape or
        another number of classes than the dataset's.
    """
    cfg = common.preset_config(
        preset, ClassifierConfig, overrides,
        f"Preset {preset!r} is not a classifier preset; classifier presets: "
        f"{', '.join(classifier_presets())}.")
    spec = datasets.spec(dataset)
    if spec.num_classes is None or spec.modality != "image":
        raise common.ConfigError(f"Dataset {dataset!r} has no class labels to train a classifier on.")
    if tuple(spec.shape) != tuple(cfg.input_shape) or spec.num_classes != cfg.num_classes:
        raise common.ConfigError(
            f"Dataset {dataset!r} has {spec.num_classes} classes of images of shape "
            f"{tuple(spec.shape)}, but preset {preset!r} expects {cfg.num_classes} classes of "
            f"{tuple(cfg.input_shape)}: pick a matching --preset (digits_classifier or "
            "digits_hybrid for digits, mnist_classifier_paper for mnist, "
            "cifar10_classifier_paper for cifar10, cifar100_classifier_paper for cifar100).")
    return common.with_dataset_levels(cfg, dataset)


def classifier_presets() -> list[str]:
    return [n for n in presets.names() if presets.task(n) == "classifier"]


def classifier_datasets() -> list[str]:
    return [n for n in datasets.names()
            if datasets.spec(n).modality == "image" and datasets.spec(n).num_classes]


# --- training ----------------------------------------------------------------------------------


def make_train_step(cfg: ClassifierTrainConfig):
    """The per-replica step: the batch's mean objective plus the L2 term."""
    def train_step(model, batch, step):
        images, labels = batch
        loss, metrics = classifier_objective(model, images, labels, training=True,
                                             seed=common.step_seed(cfg.seed, step))
        if cfg.l2_penalty:
            l2 = tf.add_n([tf.reduce_sum(tf.square(v)) for v in model.trainable_variables])
            loss = loss + 0.5 * cfg.l2_penalty * l2
        return loss, metrics

    return train_step


class Evaluator:
    """Test-split evaluation and the TensorBoard diagnostics, run on the chief.

    Returns (and the loop logs under ``model_dir/eval``) ``accuracy``, ``loss``, ``xent``,
    ``bits_per_dim`` (hybrid), ``reconstruction_max_abs_error`` of ``invert(features(x))`` on
    the first ``num_images`` test images, ``lipschitz_layer_max`` and ``lipschitz_block_max``;
    writes the per-layer Lipschitz estimates (``lipschitz/<layer>``), their products per
    residual branch (``lipschitz_block/<block>``) and the input and reconstruction grids.
    """

    def __init__(self, model, cfg: ClassifierTrainConfig):
        self.model = model
        self.cfg = cfg
        self.test = datasets.load(
            cfg.dataset, "test", batch_size=256, shuffle=False, repeat=False,
            drop_remainder=False, dequantize=cfg.model.hybrid, with_labels=True,
            seed=cfg.seed + 1, data_dir=cfg.data_dir or None)
        eval_seed = tf.constant([cfg.seed, -1], tf.int32)

        def evaluate(images, labels):
            _, metrics = classifier_objective(model, images, labels, training=False,
                                              seed=eval_seed)
            return metrics

        def reconstruct(images):
            return model.invert(model.features(images), on_failure="warn")

        self._evaluate = tf.function(evaluate, reduce_retracing=True)
        self._reconstruct = tf.function(reconstruct, reduce_retracing=True)

    def __call__(self, step: int) -> dict[str, float]:
        sums, count, first = {}, 0, None
        for images, labels in self.test:
            n = int(images.shape[0])
            for name, value in self._evaluate(images, labels).items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            count += n
            if first is None:
                first = images[: self.cfg.num_images]
        results = {name: total / count for name, total in sums.items()}
        results["loss"] = results["xent"] + self.cfg.model.hybrid_weight * results.get(
            "bits_per_dim", 0.0)
        rec = self._reconstruct(first)
        results["reconstruction_max_abs_error"] = float(tf.reduce_max(tf.abs(rec - first)))
        report = lipschitz_report(self.model, upper_bounds=False)
        for entry in report["layers"]:
            tf.summary.scalar(f"lipschitz/{entry['name']}", entry["estimate"], step=step)
        for entry in report["blocks"]:  # products over each residual branch g
            tf.summary.scalar(f"lipschitz_block/{entry['name']}", entry["estimate"], step=step)
        results["lipschitz_layer_max"] = max(e["estimate"] for e in report["layers"])
        results["lipschitz_block_max"] = max(e["estimate"] for e in report["blocks"])
        image_summary("images/inputs", first, step)
        image_summary("images/reconstructions", tf.clip_by_value(rec, 0.0, 1.0), step)
        return results


class ClassifierTask(Task):
    """Training of an `IResNetClassifier` (see the module docstring)."""

    config_type = ClassifierTrainConfig

    def __init__(self, config: ClassifierTrainConfig):
        super().__init__(config)
        self._step = make_train_step(config)

    def build_model(self):
        return build_classifier_model(self.config.model, name=self.config.preset)

    def build_optimizer(self):
        cfg = self.config
        schedule = WarmupSchedule(cfg.learning_rate, cfg.warmup_steps,
                                  boundaries=cfg.decay_steps, factor=cfg.decay_factor)
        return common.make_optimizer("sgd", schedule, momentum=cfg.momentum)

    def train_data(self, start_step: int = 0):
        cfg = self.config
        return datasets.load(
            cfg.dataset, "train", batch_size=cfg.batch_size, seed=cfg.seed, with_labels=True,
            augment=cfg.augment, dequantize=cfg.model.hybrid, start_step=start_step,
            data_dir=cfg.data_dir or None)

    def init_inputs(self, batch):
        return batch[0]

    def train_step(self, model, batch, step):
        return self._step(model, batch, step)

    def evaluator(self, model):
        return Evaluator(model, self.config)

    def report(self, model, evaluator, final: dict) -> dict:
        """``test_accuracy`` (and ``test_bits_per_dim`` of hybrid models), the reconstruction
        error of ``invert(features(x))`` and the parameter count."""
        out = {"test_accuracy": final["accuracy"],
               "reconstruction_max_abs_error": final["reconstruction_max_abs_error"],
               "trainable_parameters": model.num_trainable_parameters}
        if self.config.model.hybrid:
            out["test_bits_per_dim"] = final["bits_per_dim"]
        return out

    def export(self, model, export_dir: str) -> None:
        export_classifier(model, export_dir, converge=False)


def train_classifier(cfg: ClassifierTrainConfig) -> dict:
    """Trains, evaluates, converges the spectral norms and exports
    (`tf_iresnet.tasks.run.run`); returns the results.

    Returns:
      The loop's last logs, ``final/<metric>``, ``test_accuracy`` (and ``test_bits_per_dim``
      for hybrid models) of the final, converged model, ``reconstruction_max_abs_error``, the
      parameter count and ``export_dir`` when exported. Also written to
      ``model_dir/results.json`` by the chief.
    """
    return run(ClassifierTask(cfg))
