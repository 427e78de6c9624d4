"""i-ResNet density models: multi-scale convolutional flows and fully connected flows."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_iresnet import fixed_point, shared_blocks
from tf_iresnet.bijectors import (
    ActNorm,
    ActNormState,
    InvertibleResidualBlock,
    Squeeze,
    centering,
    data_dependent_init,
    logit_preprocessing,
)
from tf_iresnet.bijectors.multiscale import MultiScale
from tf_iresnet.datasets.core import bits_per_dim
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.invertible_gradient import forward_and_log_det
from tf_iresnet.logdet import PROBES, LogDetConfig, stateless_seed
from tf_iresnet.logdet_in_forward import IN_FORWARD_METHODS
from tf_iresnet.residual import conv_branch, dense_branch

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["GRADIENT_MEMORY", "DensityConfig", "IResNetFlow", "build_density_model"]

# Backward passes of the training step, from the most activation memory to the least (see
# `DensityConfig.gradient_memory`).
GRADIENT_MEMORY = ("stored", "logdet_in_forward", "invertible")


@dataclasses.dataclass(frozen=True)
class DensityConfig:
    """Architecture and estimator settings of an i-ResNet density model.

    Attributes:
      input_shape: event shape, ``(H, W, C)`` for images or ``(D,)`` for vectors.
      num_levels: quantization levels of the data (256 for 8-bit images, 17 for digits) used for
        bits/dim; None for continuous data.
      architecture: ``"conv"`` (multi-scale convolutional flow) or ``"dense"`` (fully connected).
      initial_squeeze: squeeze the input before the first scale (the paper's CIFAR model).
      blocks: residual blocks per scale (one scale for ``"dense"``).
      hidden_channels: hidden width of every residual branch (channels or units).
      strides: per scale, 2 squeezes before the scale, 1 does not (default: all 1).
      factor_out: factor out half the channels after each non-final scale.
      coeff: spectral-norm coefficient c in (0, 1).
      power_iterations: power iterations per training step and layer.
      activation: ``"elu"`` (paper), ``"lipswish"`` or ``"relu"``.
      kernel_size: outer kernel size of the conv branches.
      dense_hidden_layers: hidden layers of a dense branch.
      actnorm: an ActNorm before every residual block.
      preprocessing: ``"center"`` (x - 0.5, the official code), ``"logit"`` or ``"none"``.
      logit_alpha: alpha of the logit preprocessing.
      prior: ``"learned"`` (diagonal Gaussian with trained mean and scale) or ``"fixed"`` N(0, I).
      logdet: training estimator (``"series"``, ``"unbiased"``, ``"exact"``).
      n_terms, n_samples, n_exact_terms: training estimator settings.
      neumann_gradient: the memory-saving Neumann-series gradient of Residual Flows (default;
        the same expectation as the plain gradient of the estimate, see
        ``tests/test_neumann_gradient.py``); False differentiates the estimate itself (the
        reference code's gradient).
      recompute: recompute every residual block in the training step's backward pass instead
        of keeping its intermediates (gradient checkpointing; same values and gradients, less
        memory, more time: see ``benchmarks/README.md``).
      gradient_memory: the training step's backward pass, from the most memory to the least:
        ``"stored"`` (the usual backward pass over the activations stored by the forward pass:
        per block g's and the log-det estimate's); ``"logdet_in_forward"`` (every block
        differentiates its log-det in the forward pass and keeps only those gradients, one
        tensor of the block input's size and one copy of its branch's weights, and runs g once
        more in the backward pass, `tf_iresnet.logdet_in_forward`; needs ``logdet``
        ``"series"`` or ``"unbiased"`` and a loss that averages or sums the log-dets over the
        batch, which the training task's does); ``"invertible"``: the backward pass rebuilds
        every step's input from its output (fixed-point inverse at ``reconstruction_tol``) and
        recomputes it, so activation memory does not grow with depth
        (`tf_iresnet.invertible_gradient`; one inverse and one more forward pass per block).
        In every mode but ``logdet_in_forward`` (and ``recompute=True``) the traced training
        step runs the blocks of one scale through one shared function
        (`tf_iresnet.shared_blocks`), so its graph does not grow with depth either.
      reconstruction_tol: atol and rtol of the fixed-point inverse of every block in the
        ``"invertible"`` backward pass (a missed tolerance raises).
      probe: Hutchinson probe distribution of every estimate, ``"gaussian"`` or
        ``"rademacher"``.
      eval_logdet: estimator for evaluation and export (``"exact"`` for small events). Its
        series terms run in a `tf.while_loop` (the Neumann-gradient form of
        `tf_iresnet.logdet`): same values, a graph that does not grow with the terms (an
        unrolled 20-term, 4-probe series is 80 vector-Jacobian products per block in the
        traced graph), and a gradient, if one is taken, that is the Neumann-series one.
      eval_n_terms: series terms for evaluation when ``eval_logdet="series"``.
      eval_n_samples: Hutchinson probes for evaluation.
    """

    input_shape: tuple[int, ...]
    num_levels: int | None = 256
    architecture: str = "conv"
    initial_squeeze: bool = False
    blocks: tuple[int, ...] = (4,)
    hidden_channels: int = 64
    strides: tuple[int, ...] | None = None
    factor_out: bool = True
    coeff: float = 0.9
    power_iterations: int = 5
    activation: str = "elu"
    kernel_size: int = 3
    dense_hidden_layers: int = 2
    actnorm: bool = True
    preprocessing: str = "center"
    logit_alpha: float = 0.05
    prior: str = "learned"
    logdet: str = "series"
    n_terms: int = 5
    n_samples: int = 1
    n_exact_terms: int = 2
    neumann_gradient: bool = True
    recompute: bool = False
    gradient_memory: str = "stored"
    reconstruction_tol: float = 1e-6
    probe: str = "gaussian"
    eval_logdet: str = "series"
    eval_n_terms: int = 20
    eval_n_samples: int = 4

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        strides = self.strides or (1,) * len(self.blocks)
        object.__setattr__(self, "strides", tuple(int(s) for s in strides))
        if self.architecture not in ("conv", "dense"):
            raise ValueError(f"architecture must be 'conv' or 'dense', got {self.architecture!r}.")
        if self.architecture == "conv" and len(self.input_shape) != 3:
            raise ValueError(f"conv models need input_shape (H, W, C), got {self.input_shape}.")
        if self.architecture == "dense" and (len(self.input_shape) != 1 or len(self.blocks) != 1):
            raise ValueError("dense models need input_shape (D,) and a single scale of blocks.")
        if len(self.strides) != len(self.blocks) or any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"strides must be 1 or 2, one per scale; got {self.strides}.")
        if not 0.0 < self.coeff < 1.0:
            raise ValueError(f"coeff must be in the open interval (0, 1), got {self.coeff}.")
        if self.preprocessing not in ("center", "logit", "none"):
            raise ValueError(f"preprocessing must be center, logit or none: {self.preprocessing!r}")
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {self.probe!r}.")
        if self.gradient_memory not in GRADIENT_MEMORY:
            raise ValueError(f"gradient_memory must be one of {GRADIENT_MEMORY}, got "
                             f"{self.gradient_memory!r}.")
        if self.gradient_memory == "invertible" and self.recompute:
            raise ValueError("gradient_memory='invertible' already recomputes every block; "
                             "use it with recompute=False.")
        if self.gradient_memory == "logdet_in_forward":
            if self.recompute:
                raise ValueError("gradient_memory='logdet_in_forward' differentiates the "
                                 "log-det in the forward pass and recompute=True recomputes "
                                 "it in the backward pass; use it with recompute=False.")
            if self.logdet not in IN_FORWARD_METHODS:
                raise ValueError(f"gradient_memory='logdet_in_forward' needs logdet one of "
                                 f"{IN_FORWARD_METHODS}, got {self.logdet!r}.")
        if not self.reconstruction_tol > 0.0:
            raise ValueError(f"reconstruction_tol must be > 0, got {self.reconstruction_tol}.")
        if self.prior not in ("learned", "fixed"):
            raise ValueError(f"prior must be 'learned' or 'fixed', got {self.prior!r}.")

    @property
    def event_size(self) -> int:
        """D, the number of dimensions of one event."""
        return int(np.prod(self.input_shape))


@keras.saving.register_keras_serializable(package="tf_iresnet")
class IResNetFlow(keras.Model):
    """An i-ResNet normalizing flow; the Keras model owns every weight.

    Data-to-latent structure (``architecture="conv"``): preprocessing, optional initial squeeze, then
    per scale: squeeze if its stride is 2, ``blocks[i]`` times (ActNorm, residual block), and
    half the channels factored out after every non-final scale; the latent ``z`` (size D) has a
    diagonal Gaussian prior. ``architecture="dense"``: ActNorm and fully connected residual blocks.

    ``distribution()`` returns a ``tfd.TransformedDistribution`` over data events built from
    the current weights (a view; rebuild it after training steps), so users can ``sample``,
    ``log_prob`` and compose it with TFP. ``call(x)`` returns ``log p(x)`` in nats, ``[B]``.
    """

    def __init__(self, config: DensityConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        branches, actnorms = [], []
        self._plan = []  # per scale: list of ("squeeze",) / ("block", index)
        c = config
        if c.architecture == "dense":
            dim = c.input_shape[0]
            scale = []
            for _ in range(c.blocks[0]):
                scale.append(("block", len(branches)))
                if c.actnorm:
                    actnorms.append(ActNormState(name=f"actnorm_{len(actnorms)}"))
                    actnorms[-1].build((None, dim))
                branches.append(dense_branch(
                    dim, (c.hidden_channels,) * c.dense_hidden_layers, coeff=c.coeff,
                    power_iterations=c.power_iterations, activation=c.activation,
                    name=f"branch_{len(branches)}"))
            self._plan.append(scale)
        else:
            h, w, ch = c.input_shape
            for s, (n_blocks, stride) in enumerate(zip(c.blocks, c.strides, strict=True)):
                scale = []
                squeezes = int(stride == 2) + int(s == 0 and c.initial_squeeze)
                for _ in range(squeezes):
                    if h % 2 or w % 2:
                        raise ValueError(f"Cannot squeeze a {h}x{w} input at scale {s}.")
                    h, w, ch = h // 2, w // 2, ch * 4
                    scale.append(("squeeze",))
                for b in range(n_blocks):
                    scale.append(("block", len(branches)))
                    if c.actnorm:
                        actnorms.append(ActNormState(name=f"actnorm_{len(actnorms)}"))
                        actnorms[-1].build((None, h, w, ch))
                    branches.append(conv_branch(
                        (h, w, ch), c.hidden_channels, coeff=c.coeff,
                        power_iterations=c.power_iterations, kernel_size=c.kernel_size,
                        activation=c.activation, leading_activation=not (s == 0 and b == 0),
                        name=f"branch_{len(branches)}"))
                self._plan.append(scale)
                if c.factor_out and s < len(c.blocks) - 1:
                    ch = ch - ch // 2
        # Sublayers are attributes, not list items: tf.train.Checkpoint follows attributes of a
        # Keras 3 model but not layers held in Python lists (their non-trainable state, ActNorm's
        # flag and the power-iteration vectors, would be lost).
        self._num_blocks = len(branches)
        for i, branch in enumerate(branches):
            setattr(self, f"branch_{i}", branch)
        for i, state in enumerate(actnorms):
            setattr(self, f"actnorm_{i}", state)
        dim = c.event_size
        trainable_prior = c.prior == "learned"
        self.prior_loc = self.add_weight(name="prior_loc", shape=(dim,), initializer="zeros",
                                         trainable=trainable_prior)
        self.prior_log_scale = self.add_weight(name="prior_log_scale", shape=(dim,),
                                               initializer="zeros", trainable=trainable_prior)
        self.built = True  # every weight exists now; no input is needed to build

    @property
    def branches(self) -> list[keras.Sequential]:
        """The residual branches g, in data-to-latent order."""
        return [getattr(self, f"branch_{i}") for i in range(self._num_blocks)]

    @property
    def actnorms(self) -> list[ActNormState]:
        """The ActNorm states, one per block (empty without ActNorm)."""
        if not self.config.actnorm:
            return []
        return [getattr(self, f"actnorm_{i}") for i in range(self._num_blocks)]

    def get_config(self):
        return {"config": dataclasses.asdict(self.config), "name": self.name}

    @classmethod
    def from_config(cls, config):
        fields = dict(config["config"])
        if "kind" in fields:  # the field's name before 2026-12
            fields["architecture"] = fields.pop("kind")
        return cls(DensityConfig(**fields), name=config.get("name"))

    # -- views ---------------------------------------------------------------------------------

    def _estimator_kwargs(self, mode: str) -> dict:
        c = self.config
        if mode == "train":
            return dict(logdet=LogDetConfig(
                method=c.logdet, n_terms=c.n_terms, n_samples=c.n_samples,
                n_exact_terms=c.n_exact_terms, neumann_gradient=c.neumann_gradient,
                probe=c.probe), recompute=c.recompute,
                logdet_in_forward=c.gradient_memory == "logdet_in_forward")
        if mode == "eval":
            return dict(logdet=LogDetConfig(method=c.eval_logdet, n_terms=c.eval_n_terms,
                                            n_samples=c.eval_n_samples, probe=c.probe,
                                            neumann_gradient=c.eval_logdet != "exact"))
        if mode == "none":
            return dict(logdet="none")
        raise ValueError(f"mode must be 'train', 'eval' or 'none', got {mode!r}.")

    def bijector(self, *, mode: str = "eval", seed=None, validate_args: bool = False,
                 **block_kwargs) -> MultiScale:
        """The data-to-latent bijector ``x [*input_shape] -> z [D]`` over the current weights.

        Args:
          mode: ``"train"`` (training estimator), ``"eval"`` (evaluation estimator) or
            ``"none"`` (no log-det: encoding and decoding only).
          seed: stateless seed for the log-det estimators (each block gets its own stream).
          validate_args: every bijector checks that its inputs are finite (NaN or Inf raise
            ``InvalidArgumentError`` naming it). Inputs of another dtype than the model's are
            always refused (``TypeError``).
          **block_kwargs: overrides for every ``InvertibleResidualBlock`` (e.g.
            ``inverse=InverseConfig(solver="anderson", atol=1e-6)``).
        """
        c = self.config
        kwargs = {**self._estimator_kwargs(mode), **block_kwargs}
        va = dict(validate_args=validate_args)
        dtype = self.compute_dtype
        ndims = len(c.input_shape)
        n_blocks = len(self.branches)
        seeds = ([None] * n_blocks if seed is None
                 else tfp.random.split_seed(stateless_seed(seed), max(n_blocks, 1)))
        scales = []
        for s, plan in enumerate(self._plan):
            steps = []
            if s == 0 and c.preprocessing != "none":
                steps.append(centering(dtype=dtype, **va) if c.preprocessing == "center"
                             else logit_preprocessing(c.logit_alpha, dtype=dtype, **va))
            for item in plan:
                if item[0] == "squeeze":
                    steps.append(Squeeze(**va))
                    continue
                i = item[1]
                if c.actnorm:
                    steps.append(ActNorm(self.actnorms[i], event_ndims=ndims,
                                         name=f"actnorm_{i}", **va))
                steps.append(InvertibleResidualBlock(
                    self.branches[i], event_ndims=ndims, seed=seeds[i],
                    name=f"block_{i}", **va, **kwargs))
            scales.append(tfb.Chain(list(reversed(steps)), name=f"scale_{s}", **va))
        return MultiScale(scales, c.input_shape, factor_out=c.factor_out and c.architecture == "conv",
                          compute_logdet=getattr(kwargs["logdet"], "method", kwargs["logdet"]) != "none",
                          dtype=dtype, **va)

    def prior(self) -> tfd.Distribution:
        """The latent distribution, a diagonal Gaussian over ``[D]``."""
        return tfd.MultivariateNormalDiag(
            loc=tf.convert_to_tensor(self.prior_loc),
            scale_diag=tf.exp(tf.convert_to_tensor(self.prior_log_scale)))

    def distribution(self, *, mode: str = "eval", seed=None, validate_args: bool = False,
                     **block_kwargs) -> tfd.TransformedDistribution:
        """The model density over data events, ``event_shape = input_shape``: the prior pushed
        through the inverse flow. Its ``sample(n, seed=...)`` is the model's sampling path and
        is differentiable in the weights (implicit gradient of every block's inverse).
        ``validate_args=True``: NaN or Inf inputs (``log_prob``) or latents raise (see
        `bijector`)."""
        flow = self.bijector(mode=mode, seed=seed, validate_args=validate_args, **block_kwargs)
        return tfd.TransformedDistribution(self.prior(), tfb.Invert(flow, validate_args=validate_args),
                                           validate_args=validate_args, name="iresnet_flow")

    # -- computations ---------------------------------------------------------------------------

    def initialize(self, x: tf.Tensor) -> None:
        """Data-dependent initialization of every ActNorm from the batch ``x``: each state is
        set from the statistics of its own input, in flow order. Run it once, eagerly (in
        cross-replica context under a strategy), before training; the views never initialize.

        Raises:
          ValueError: the batch gives non-finite statistics.
        """
        with data_dependent_init():
            self.bijector(mode="none").forward(tf.identity(x))

    def log_prob_parts(self, x: tf.Tensor, *, mode: str = "train",
                       seed=None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(log p(z), log|det dz/dx|)`` per example, ``[B]`` each, in nats."""
        c = self.config
        if mode == "train" and c.gradient_memory == "invertible":
            # Both passes of every block must draw the same probes: fix the seed here.
            flow = self.bijector(mode=mode, seed=stateless_seed(seed))
            tol = c.reconstruction_tol
            z, logdet = forward_and_log_det(
                flow, x, InverseConfig(atol=tol, rtol=tol, max_iter=300))
            return self.prior().log_prob(z), logdet
        flow = self.bijector(mode=mode, seed=seed)
        if mode == "train":
            # Traced, the blocks of one signature share one function: a graph that does not
            # grow with depth (same values and gradients).
            shared = shared_blocks.forward_and_log_det(flow, x)
            if shared is not None:
                return self.prior().log_prob(shared[0]), shared[1]
        z = flow.forward(x)
        return self.prior().log_prob(z), flow.forward_log_det_jacobian(
            x, event_ndims=len(c.input_shape))

    def call(self, x, training=False):
        log_pz, logdet = self.log_prob_parts(x, mode="train" if training else "eval")
        return log_pz + logdet

    def bits_per_dim(self, log_prob: tf.Tensor) -> tf.Tensor:
        """Bits/dim of the discrete data: ``-log p(x) / (D ln 2) + log2(L)`` for x in [0, 1]."""
        return bits_per_dim(log_prob, self.config.event_size, self.config.num_levels)

    def encode(self, x: tf.Tensor) -> tf.Tensor:
        """``z = f(x)``, ``[B, D]`` (no log-det)."""
        return self.bijector(mode="none").forward(x)

    def decode(self, z: tf.Tensor, **block_kwargs) -> tf.Tensor:
        """``x = f^{-1}(z)`` by fixed-point inversion of every block, ``[B, *input_shape]``."""
        return self.bijector(mode="none", **block_kwargs).inverse(z)

    def decode_with_stats(self, z: tf.Tensor, **block_kwargs):
        """``(x, max iterations over blocks, max final residual over blocks, converged)``.

        ``converged`` (bool scalar) is whether every block met its tolerance; check it when
        the inverse runs compiled or with ``on_failure="warn"`` (unconverged examples are NaN
        in graphs with ``on_failure="raise"``)."""
        with fixed_point.collect_inverse_stats() as stats:
            x = self.decode(z, **block_kwargs)
        iterations = tf.reduce_max(tf.stack([s.iterations for s in stats]))
        residual = tf.reduce_max(tf.stack([s.residual for s in stats]))
        converged = tf.reduce_all(tf.stack([s.converged for s in stats]))
        return x, iterations, residual, converged

    def sample(self, n: int, seed, **block_kwargs) -> tf.Tensor:
        """``n`` samples ``[n, *input_shape]``: ``distribution().sample(n, seed=seed)`` (a
        prior draw from the stateless ``seed``, then the fixed-point inverse; ``block_kwargs``
        as for `decode`, e.g. ``inverse=InverseConfig(on_failure="warn")``). The export's ``sample`` endpoint
        takes the same path, so equal seeds give equal images."""
        return self.distribution(mode="none", **block_kwargs).sample(n, seed=seed)


def build_density_model(config: DensityConfig, name: str | None = None) -> IResNetFlow:
    """Builds (creates all weights of) the density model described by ``config``."""
    return IResNetFlow(config, name=name or "iresnet_flow")
