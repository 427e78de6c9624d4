"""Maximum-likelihood training of an i-ResNet density model, end to end.

``train_density(config)`` is what ``python -m train.density`` runs after parsing its flags:
data pipeline, model under the chosen ``tf.distribute`` strategy, the custom training loop
(``tf_iresnet.training.Trainer``), TensorBoard logs, evaluation on the test split at a set
interval, checkpoints and resumption, a sample grid and the SavedModel export.
"""

from __future__ import annotations

import dataclasses
import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_iresnet import datasets
from tf_iresnet.export.density import export_density_model
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.models.density import DensityConfig, IResNetFlow
from tf_iresnet.spectral_norm import lipschitz_report, update_spectral_norms
from tf_iresnet.tasks import common
from tf_iresnet.tasks.common import OPTIMIZERS as OPTIMIZERS  # re-exported for train.density
from tf_iresnet.training import (
    WarmupSchedule,
    image_summary,
    save_image_grid,
    summaries,
)

# (global batch size, peak learning rate) per kind of data. A 2-D example costs next to nothing,
# and the thin structures of the toy sets need large batches: moons, 2000 steps of
# toy2d_density, gave 2.08 test bits/dim at (512, 1e-2) and 2.42 at (64, 3e-3), in the same
# wall time (about 2 minutes on 2 cores).
_DATA_DEFAULTS = {datasets.core.IMAGE: (64, 3e-3), datasets.core.VECTOR: (512, 1e-2)}


def data_defaults(dataset: str) -> tuple[int, float]:
    """``(batch_size, learning_rate)`` defaults of a training run on ``dataset``."""
    return _DATA_DEFAULTS[datasets.spec(dataset).kind]


@dataclasses.dataclass(frozen=True)
class DensityTrainConfig:
    """Everything a density run needs (written to ``model_dir/config.json``).

    Attributes:
      dataset: a ``tf_iresnet.datasets`` name.
      preset: a ``tf_iresnet.presets`` density preset.
      model_dir: checkpoints, config and TensorBoard logs.
      export_dir: SavedModel destination ('' to skip the export).
      batch_size: global batch size (split over replicas).
      train_steps: optimizer steps in total (resumed runs continue up to it).
      optimizer: ``adamax`` (the paper's), ``adam`` or ``sgd``.
      learning_rate: peak learning rate, reached at the end of the warm-up.
      warmup_steps: linear warm-up length in steps.
      weight_decay: decoupled weight decay (0 for none).
      strategy: ``tf_iresnet.training.make_strategy`` name.
      seed: seeds data order, dequantization noise, estimator probes and initialization.
      eval_every, checkpoint_every, log_every: intervals in steps.
      eval_examples: test examples per evaluation (0: the whole split).
      num_samples: samples in the final PNG grid and TensorBoard images.
      jit_compile: XLA-compile the forward and backward pass.
      model_overrides: DensityConfig fields replaced in the preset (estimator, coeff, ...).
    """

    dataset: str = "digits"
    preset: str = "digits_density"
    model_dir: str = "runs/digits_density"
    export_dir: str = "saved_models/digits_density"
    batch_size: int = 64
    train_steps: int = 1000
    optimizer: str = "adamax"
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    strategy: str = "auto"
    seed: int = 0
    eval_every: int = 250
    checkpoint_every: int = 250
    log_every: int = 25
    eval_examples: int = 2000
    num_samples: int = 64
    jit_compile: bool = False
    model_overrides: dict = dataclasses.field(default_factory=dict)


def model_config(cfg: DensityTrainConfig) -> DensityConfig:
    """The preset's model config with the run's overrides, checked against the dataset."""
    model_cfg = common.preset_config(cfg.preset, DensityConfig, cfg.model_overrides,
                                     f"Preset {cfg.preset!r} is not a density model preset.")
    spec = datasets.spec(cfg.dataset)
    if tuple(spec.shape) != tuple(model_cfg.input_shape):
        raise common.ConfigError(
            f"Dataset {cfg.dataset!r} has events of shape {tuple(spec.shape)} but preset "
            f"{cfg.preset!r} expects {tuple(model_cfg.input_shape)}; pick a matching "
            f"--preset (e.g. digits_density for digits, toy2d_density for 2-D sets).")
    return common.with_dataset_levels(model_cfg, cfg.dataset)


def make_optimizer(cfg: DensityTrainConfig) -> keras.optimizers.Optimizer:
    return common.make_optimizer(cfg.optimizer, WarmupSchedule(cfg.learning_rate,
                                                               cfg.warmup_steps),
                                 weight_decay=cfg.weight_decay)


def make_train_step(cfg: DensityTrainConfig):
    """The per-replica step: mean bits/dim of the batch as the loss (a scaled NLL)."""

    def train_step(model: IResNetFlow, x, step):
        # One seed per step, equal on every replica: the same roulette count everywhere.
        # Spectral-norm power iterations run after the update (power_iteration_step), so the
        # forward pass itself assigns no variables.
        log_pz, logdet = model.log_prob_parts(x, mode="train", training=False,
                                              seed=common.step_seed(cfg.seed, step), data_init=False)
        bpd = model.bits_per_dim(log_pz + logdet)
        d = float(model.config.event_size)
        return tf.reduce_mean(bpd), {
            "bits_per_dim": tf.reduce_mean(bpd),
            "log_pz_per_dim": tf.reduce_mean(log_pz) / d,
            "logdet_per_dim": tf.reduce_mean(logdet) / d,
        }

    return train_step


def power_iteration_step(model: IResNetFlow, step) -> None:
    """After each update: ``power_iterations`` power iterations on every normalized layer."""
    del step
    update_spectral_norms(model)


class Evaluator:
    """Test-split evaluation and TensorBoard visuals, run on the chief."""

    def __init__(self, model: IResNetFlow, cfg: DensityTrainConfig):
        self.model = model
        self.cfg = cfg
        self.spec = datasets.spec(cfg.dataset)
        self.is_image = self.spec.kind == "image"
        self.test = datasets.load(
            cfg.dataset, "test", batch_size=min(cfg.batch_size, 256), shuffle=False,
            repeat=False, drop_remainder=False, seed=cfg.seed + 1,
            num_examples=cfg.eval_examples or None)
        self._log_prob = tf.function(self._log_prob_parts, reduce_retracing=True)
        self._invert = tf.function(self._reconstruct, reduce_retracing=True)

    def _log_prob_parts(self, x):
        return self.model.log_prob_parts(x, mode="eval", seed=(self.cfg.seed, 12345))

    def _reconstruct(self, x):
        z = self.model.encode(x)
        x_rec, iterations, residual = self.model.decode_with_stats(
            z, inverse=InverseConfig(on_failure="warn"))
        return x_rec, iterations, residual

    def __call__(self, step: int) -> dict[str, float]:
        log_pz, logdet, n, first = [], [], 0, None
        for x in self.test:
            lpz, ldj = self._log_prob(x)
            log_pz.append(lpz.numpy())
            logdet.append(ldj.numpy())
            n += int(x.shape[0])
            first = x if first is None else first
        log_pz, logdet = np.concatenate(log_pz), np.concatenate(logdet)
        log_px = log_pz + logdet
        d = self.model.config.event_size
        bpd = self.model.bits_per_dim(tf.constant(log_px)).numpy()
        x = first[: self.cfg.num_samples]
        x_rec, iterations, residual = self._invert(x)
        results = {
            "bits_per_dim": float(bpd.mean()),
            "log_pz_per_dim": float(log_pz.mean() / d),
            "logdet_per_dim": float(logdet.mean() / d),
            "reconstruction_max_abs_error": float(tf.reduce_max(tf.abs(x_rec - x))),
            "inverse_iterations_max": float(iterations),
            "inverse_residual_max": float(residual),
        }
        report = lipschitz_report(self.model, upper_bounds=False)
        estimates = [r["estimate"] for r in report["layers"]]
        for r in report["blocks"]:
            summaries.scalar(f"lipschitz/{r['name']}", r["estimate"], step=step)
        for r in report["layers"]:
            summaries.scalar(f"lipschitz_layers/{r['name']}", r["estimate"], step=step)
        results["lipschitz_layer_max"] = max(estimates)
        tf.summary.histogram("lipschitz/layer_estimates", estimates, step=step)
        if self.is_image:
            samples = self.model.sample(self.cfg.num_samples, seed=(self.cfg.seed, step),
                                        inverse=InverseConfig(on_failure="warn"))
            image_summary("images/data", x, step)
            image_summary("images/reconstructions", tf.clip_by_value(x_rec, 0.0, 1.0), step)
            image_summary("images/samples", tf.clip_by_value(samples, 0.0, 1.0), step)
        else:
            image_summary("images/density", self.density_heatmap()[None], step)
            samples = self.model.sample(2000, seed=(self.cfg.seed, step),
                                        inverse=InverseConfig(on_failure="warn"))
            image_summary("images/samples", histogram_image(samples.numpy())[None], step)
        return results

    def density_heatmap(self, size: int = 128, bound: float = 4.0) -> tf.Tensor:
        """p(x) on a ``size x size`` grid over ``[-bound, bound]^2``, as an image in [0, 1]."""
        axis = tf.linspace(-bound, bound, size)
        xx, yy = tf.meshgrid(axis, -axis)  # image rows go downwards
        grid = tf.reshape(tf.stack([xx, yy], -1), [-1, 2])
        log_p = tf.concat([tf.add(*self._log_prob(chunk)) for chunk in tf.split(grid, 8)], 0)
        p = tf.exp(log_p - tf.reduce_max(log_p))
        return tf.reshape(p, [size, size, 1])


def histogram_image(points: np.ndarray, size: int = 128, bound: float = 4.0) -> np.ndarray:
    """A 2-D histogram of ``points [N, 2]`` over ``[-bound, bound]^2`` as an image in [0, 1]."""
    h, _, _ = np.histogram2d(-points[:, 1], points[:, 0], bins=size,
                             range=[[-bound, bound], [-bound, bound]])
    return (h / max(h.max(), 1.0))[..., None].astype("float32")


def train_density(cfg: DensityTrainConfig) -> dict[str, float]:
    """Trains, evaluates, saves samples and exports; returns the final metrics.

    Returns:
      The trainer's last logs plus ``test_bits_per_dim`` and ``export_dir``.
    """
    strategy = common.start_run(cfg.strategy, cfg.seed, cfg.batch_size)
    model_cfg = model_config(cfg)
    spec = datasets.spec(cfg.dataset)
    with strategy.scope():
        model = IResNetFlow(model_cfg, name=cfg.preset)
        optimizer = make_optimizer(cfg)
    train = datasets.load(cfg.dataset, "train", batch_size=cfg.batch_size, seed=cfg.seed)
    evaluator = Evaluator(model, cfg)
    trainer = common.make_trainer(
        cfg, strategy=strategy, model=model, optimizer=optimizer,
        train_step_fn=make_train_step(cfg), eval_fn=evaluator,
        post_step_fn=power_iteration_step,
        config={**dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg)},
    )
    if trainer.restore() == 0:
        # ActNorm's data-dependent init, once, in cross-replica context (see ActNormState).
        model.initialize(next(iter(train.take(1))))
    results = trainer.train(train)
    # Every worker prints it: replicas and workers must end with identical weights.
    checksum = float(sum(tf.reduce_sum(tf.cast(w, tf.float64)) for w in model.weights))
    print(f"final weights checksum: {checksum:.10e}")
    final = common.final_evaluation(trainer, model, evaluator, results)
    if final is None:
        return results
    results["test_bits_per_dim"] = final["bits_per_dim"]
    grid_path = os.path.join(cfg.model_dir, "samples.png")
    n = cfg.num_samples
    if spec.kind == "image":
        samples = tf.clip_by_value(model.sample(n, seed=(cfg.seed, 0)), 0.0, 1.0)
        if samples.shape[1] < 32:  # upscale tiny images (digits are 8x8) to be visible
            factor = 32 // samples.shape[1]
            samples = tf.repeat(tf.repeat(samples, factor, axis=1), factor, axis=2)
        save_image_grid(samples, grid_path, nrow=int(math.ceil(math.sqrt(n))))
    else:
        samples = model.sample(5000, seed=(cfg.seed, 0)).numpy()
        save_image_grid(histogram_image(samples)[None], grid_path, nrow=1)
        save_image_grid(evaluator.density_heatmap()[None],
                        os.path.join(cfg.model_dir, "density.png"), nrow=1)
    results["samples_png"] = grid_path
    if cfg.export_dir:
        export_density_model(model, cfg.export_dir, converge=False)
        results["export_dir"] = cfg.export_dir
        logging.info("Exported SavedModel to %s", cfg.export_dir)
    common.write_results(cfg.model_dir, results)
    return results
