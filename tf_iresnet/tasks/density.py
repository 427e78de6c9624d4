"""Maximum-likelihood training of an i-ResNet density model, end to end.

``train_density(config)`` is what ``python -m train.density`` runs after parsing its flags:
`DensityTask` provides the model, the Adamax optimizer with warm-up, the data, the step (mean
bits/dim), the evaluator (test bits/dim, reconstructions, Lipschitz estimates, samples), the
sample grid and the SavedModel export; `tf_iresnet.tasks.run.run` does the rest (strategy,
ActNorm init, the loop with checkpoints and resumption, TensorBoard logs, final evaluation).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from tf_iresnet import datasets, lipschitz_report
from tf_iresnet.export.density import export_density_model
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.models.density import DensityConfig, IResNetFlow
from tf_iresnet.tasks import common
from tf_iresnet.tasks.common import OPTIMIZERS as OPTIMIZERS  # re-exported for train.density
from tf_iresnet.tasks.run import RunConfig, Task, run
from tf_iresnet.training import (
    WarmupSchedule,
    image_summary,
    save_image_grid,
)

# (global batch size, peak learning rate) per kind of data. A 2-D example costs next to nothing,
# and the thin structures of the toy sets need large batches: moons, 2000 steps of
# toy2d_density, gave 2.08 test bits/dim at (512, 1e-2) and 2.42 at (64, 3e-3), in the same
# wall time (about 2 minutes on 2 cores).
_DATA_DEFAULTS = {datasets.core.IMAGE: (64, 3e-3), datasets.core.VECTOR: (512, 1e-2)}


def data_defaults(dataset: str) -> tuple[int, float]:
    """``(batch_size, learning_rate)`` defaults of a training run on ``dataset``."""
    return _DATA_DEFAULTS[datasets.spec(dataset).modality]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DensityTrainConfig(RunConfig):
    """A density run: the `RunConfig` fields (defaults below where they differ) and these.

    Attributes:
      optimizer: ``adamax`` (the paper's), ``adam`` or ``sgd``.
      warmup_steps: linear learning-rate warm-up length in steps.
      weight_decay: decoupled weight decay (Keras optimizers' ``weight_decay``; 0 for none).
      eval_examples: test examples per evaluation (0: the whole split).
      num_samples: samples in the final PNG grid and TensorBoard images.
      model_overrides: `DensityConfig` fields replaced in the preset (estimator, coeff, ...).
    """

    dataset: str = "digits"
    preset: str = "digits_density"
    model_dir: str = "runs/digits_density_digits"
    export_dir: str = "saved_models/digits_density"
    learning_rate: float = 3e-3
    optimizer: str = "adamax"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    eval_examples: int = 2000
    num_samples: int = 64
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
    """The run's optimizer with its linear warm-up."""
    return common.make_optimizer(cfg.optimizer, WarmupSchedule(cfg.learning_rate,
                                                               cfg.warmup_steps),
                                 weight_decay=cfg.weight_decay)


def make_train_step(cfg: DensityTrainConfig):
    """The per-replica step: mean bits/dim of the batch as the loss (a scaled NLL)."""

    def train_step(model: IResNetFlow, x, step):
        # One seed per step, equal on every replica: the same roulette count everywhere.
        log_pz, logdet = model.log_prob_parts(x, mode="train",
                                              seed=common.step_seed(cfg.seed, step))
        bpd = model.bits_per_dim(log_pz + logdet)
        d = float(model.config.event_size)
        return tf.reduce_mean(bpd), {
            "bits_per_dim": tf.reduce_mean(bpd),
            "log_pz_per_dim": tf.reduce_mean(log_pz) / d,
            "logdet_per_dim": tf.reduce_mean(logdet) / d,
        }

    return train_step


class Evaluator:
    """Test-split evaluation and TensorBoard visuals, run on the chief."""

    def __init__(self, model: IResNetFlow, cfg: DensityTrainConfig):
        self.model = model
        self.cfg = cfg
        self.spec = datasets.spec(cfg.dataset)
        self.is_image = self.spec.modality == "image"
        self.test = datasets.load(
            cfg.dataset, "test", batch_size=min(cfg.batch_size, 256), shuffle=False,
            repeat=False, drop_remainder=False, seed=cfg.seed + 1,
            num_examples=cfg.eval_examples or None, data_dir=cfg.data_dir or None)
        self._log_prob = tf.function(self._log_prob_parts, reduce_retracing=True)
        self._invert = tf.function(self._reconstruct, reduce_retracing=True)

    def _log_prob_parts(self, x):
        return self.model.log_prob_parts(x, mode="eval", seed=(self.cfg.seed, 12345))

    def _reconstruct(self, x):
        z = self.model.encode(x)
        return self.model.decode_with_stats(z, inverse=InverseConfig(on_failure="warn"))

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
        x_rec, iterations, residual, converged = self._invert(x)
        if not bool(converged):
            warnings.warn(f"step {step}: the fixed-point inverse of the test reconstructions did "
                          f"not converge (residual {float(residual):.3g}); the reconstruction "
                          "error is that of the last iterate.", RuntimeWarning, stacklevel=2)
        results = {
            "bits_per_dim": float(bpd.mean()),
            "log_pz_per_dim": float(log_pz.mean() / d),
            "logdet_per_dim": float(logdet.mean() / d),
            "reconstruction_max_abs_error": float(tf.reduce_max(tf.abs(x_rec - x))),
            "inverse_iterations_max": float(iterations),
            "inverse_residual_max": float(residual),
            "inverse_converged": float(bool(converged)),
        }
        report = lipschitz_report(self.model, upper_bounds=False)
        estimates = [r["estimate"] for r in report["layers"]]
        for r in report["blocks"]:
            tf.summary.scalar(f"lipschitz/{r['name']}", r["estimate"], step=step)
        for r in report["layers"]:
            tf.summary.scalar(f"lipschitz_layers/{r['name']}", r["estimate"], step=step)
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


class DensityTask(Task):
    """Maximum-likelihood training of an `IResNetFlow` (see the module docstring)."""

    config_type = DensityTrainConfig

    def __init__(self, config: DensityTrainConfig):
        super().__init__(config)
        self.model_config = model_config(config)  # ConfigError before any strategy exists
        self.spec = datasets.spec(config.dataset)
        self._step = make_train_step(config)

    def build_model(self) -> IResNetFlow:
        return IResNetFlow(self.model_config, name=self.config.preset)

    def build_optimizer(self) -> keras.optimizers.Optimizer:
        return make_optimizer(self.config)

    def train_data(self, start_step: int = 0) -> tf.data.Dataset:
        cfg = self.config
        return datasets.load(cfg.dataset, "train", batch_size=cfg.batch_size, seed=cfg.seed,
                             start_step=start_step, data_dir=cfg.data_dir or None)

    def train_step(self, model: IResNetFlow, batch, step):
        return self._step(model, batch, step)

    def evaluator(self, model: IResNetFlow) -> Evaluator:
        return Evaluator(model, self.config)

    def report(self, model: IResNetFlow, evaluator: Evaluator, final: dict) -> dict:
        """``test_bits_per_dim`` and the sample grid ``samples.png`` (and, for 2-D data, the
        density heat map ``density.png``)."""
        cfg = self.config
        grid_path = os.path.join(cfg.model_dir, "samples.png")
        n = cfg.num_samples
        if self.spec.modality == "image":
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
        return {"test_bits_per_dim": final["bits_per_dim"], "samples_png": grid_path}

    def export(self, model: IResNetFlow, export_dir: str) -> None:
        export_density_model(model, export_dir, converge=False)


def train_density(cfg: DensityTrainConfig) -> dict[str, float]:
    """Trains, evaluates, saves samples and exports (`tf_iresnet.tasks.run.run`).

    Returns:
      The run's results: the loop's last logs, ``final/<metric>``, ``test_bits_per_dim``,
      ``samples_png`` and ``export_dir`` (on the chief).
    """
    return run(DensityTask(cfg))
