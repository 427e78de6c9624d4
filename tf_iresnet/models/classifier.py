"""The i-ResNet classifier (Behrmann et al., 2019) and its hybrid variant (Chen et al., 2019).

The network is an *invertible feature extractor* followed by a small head:

    x in [0, 1]^(H x W x C)
      -> centre (x - 0.5)                                  log-det 0
      -> zero-channel padding (C -> C + pad_channels)       injective, log-det 0
      -> stage 1: [squeeze if stride 2] ActNorm, block, ActNorm, block, ...
      -> stage 2: ...                                       each block y = x + g(x), Lip(g) < 1
      -> features z
    z -> BatchNorm -> ReLU -> global average pool -> dense  logits

Every block's residual branch g is `tf_iresnet.conv_branch` with the stage's hidden width; the
very first block of the network drops g's leading activation; the squeeze of a stride-2 stage
happens at the start of its first block, before that block's ActNorm (as in the official
classifier), and the spectral norms are computed at the post-squeeze resolution the
convolutions actually see. One departure: in a padded model the first block's ActNorm comes
before the padding and normalizes the data channels only. Initialized from data, an ActNorm
over the all-zero padding channels would scale them by 1/eps and make their shift train with
a huge effective step (measured on the digits, even with eps 1e-2: features of magnitude 6e4
after ten SGD steps, against 22 with the ActNorm before the padding).

``features(x)`` runs the invertible part, ``invert(z)`` inverts it (fixed-point inverse of each
block with the core's tolerance; a miss raises `tf_iresnet.InverseNotConvergedError` eagerly or
an ``InvalidArgumentError`` in graphs). The padding is injective, so ``invert`` returns the
preimage of the data channels, exact on the image of ``features``.

#### The hybrid model

With ``hybrid_weight > 0`` the same network is also a normalizing flow: with a standard normal
prior on z, ``log p(x) = log N(z; 0, I) + sum_blocks log|det(I + J_g)| + sum_actnorm log|s|``
(the centring and squeezes have log-det 0), the block log-dets coming from the blocks' power
series estimator (`tf_iresnet.logdet`). Training minimises
``cross-entropy + hybrid_weight * bits/dim``. Zero padding would make this the density of the
padded embedding (a density on R^(D + pad) evaluated on a D-dimensional subspace, not a
normalized density of the images), so hybrid configurations must not pad
(``pad_channels=0``, checked): the density is then of the images themselves.

#### The paper's CIFAR-10 preset and the official parameter count

``blocks=(7, 7, 7)``, ``hidden_channels=(32, 64, 128)``, ``strides=(1, 2, 2)``,
``pad_channels=13`` (16 x 32 x 32 after padding, then 64 x 16 x 16 and 256 x 8 x 8) has
4,873,152 trainable parameters: convolutions 4,865,392, ActNorms 4,678, head BatchNorm 512 and
dense 2,570, 0.67% below the official script's 4,905,946. Of the difference, 32,768 =
2 x 16 x 32 x 32 is the learned Gaussian prior (mean and log-std per input dimension) that the
official network allocates even when it only classifies (unused, not created here), and 26 is
the first ActNorm acting on 3 channels instead of 16.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tf_iresnet.activations import get_activation
from tf_iresnet.bijectors import (
    ActNorm,
    ActNormState,
    InvertibleResidualBlock,
    Squeeze,
    ZeroChannelPad,
    centering,
    data_dependent_init,
)
from tf_iresnet.datasets import bits_per_dim
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.logdet import METHODS as LOGDET_METHODS
from tf_iresnet.residual import conv_branch

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = [
    "ClassifierConfig",
    "IResNetClassifier",
    "build_classifier_model",
    "classifier_objective",
]




@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture (and hybrid objective) of an `IResNetClassifier`.

    Attributes:
      input_shape: ``(H, W, C)`` of one image.
      num_classes: number of classes of the dense head.
      num_levels: gray levels of the quantized data (256 for 8-bit images, 17 for digits); only
        used to report bits/dim of hybrid models.
      pad_channels: zero channels appended to the input (13 for the paper's CIFAR classifier).
        Must be 0 for hybrid models (see the module docstring).
      blocks: residual blocks per stage.
      hidden_channels: hidden width of the residual branches, per stage.
      strides: 1 or 2 per stage; 2 squeezes (space-to-depth by 2) at the start of the stage.
      coeff: spectral-norm coefficient, in (0, 1). Default 0.9 (the paper's).
      power_iterations: power iterations per training call of each normalized layer (1 in the
        paper's classifier).
      activation: nonlinearity of the branches: "elu" (the paper's), "relu" or "lipswish".
      actnorm: an ActNorm before every block (the first one before the zero padding: a
        data-initialized ActNorm cannot normalize constant channels).
      bn_momentum: Keras momentum of the head's BatchNorm moving statistics (0.1 is PyTorch's
        ``momentum=0.9`` of the official head: the statistics follow recent batches).
      hybrid_weight: weight of the bits/dim term in the training objective; 0 trains a plain
        classifier, > 0 a hybrid model (which also exports ``log_prob`` and ``bits_per_dim``).
      logdet: log-det estimator of the blocks during hybrid training: "series" (the paper's
        truncated power series), "unbiased" (Russian roulette) or "exact".
      n_terms: terms of the series estimator. Default 5 (the paper's).
      eval_logdet: estimator for evaluation and export ("exact" is affordable for small
        images such as the digits; "series" otherwise).
      eval_n_terms: series terms for evaluation and export.
      inverse_atol, inverse_rtol: tolerance of each block's fixed-point inverse.
      inverse_max_iter: evaluations of g each block's inverse may use.
    """

    input_shape: tuple[int, ...] = (32, 32, 3)
    num_classes: int = 10
    num_levels: int = 256
    pad_channels: int = 0
    blocks: tuple[int, ...] = (7, 7, 7)
    hidden_channels: tuple[int, ...] = (32, 64, 128)
    strides: tuple[int, ...] = (1, 2, 2)
    coeff: float = 0.9
    power_iterations: int = 1
    activation: str = "elu"
    actnorm: bool = True
    bn_momentum: float = 0.1
    hybrid_weight: float = 0.0
    logdet: str = "series"
    n_terms: int = 5
    eval_logdet: str = "series"
    eval_n_terms: int = 10
    inverse_atol: float = 1e-5
    inverse_rtol: float = 1e-5
    inverse_max_iter: int = 200

    def __post_init__(self):
        def positive_ints(name, values, low=1):
            if not values or any(
                isinstance(v, bool) or not isinstance(v, int) or v < low for v in values
            ):
                raise ValueError(f"{name} must be a non-empty tuple of integers >= {low}, got "
                                 f"{values!r}.")

        positive_ints("input_shape", self.input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (H, W, C), got {self.input_shape!r}.")
        positive_ints("blocks", self.blocks)
        positive_ints("hidden_channels", self.hidden_channels)
        if not len(self.blocks) == len(self.hidden_channels) == len(self.strides):
            raise ValueError(
                f"blocks, hidden_channels and strides need one entry per stage; got "
                f"{self.blocks!r}, {self.hidden_channels!r}, {self.strides!r}.")
        if any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"strides must be 1 or 2 per stage, got {self.strides!r}.")
        h, w, _ = self.input_shape
        factor = 2 ** sum(s == 2 for s in self.strides)
        if h % factor or w % factor:
            raise ValueError(
                f"strides {self.strides} squeeze the image {sum(s == 2 for s in self.strides)} "
                f"times, which needs H and W divisible by {factor}; got {h}x{w}.")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
                or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}.")
        if not isinstance(self.pad_channels, int) or self.pad_channels < 0:
            raise ValueError(f"pad_channels must be an integer >= 0, got {self.pad_channels!r}.")
        if not 0.0 < self.coeff < 1.0:
            raise ValueError(f"coeff must be in (0, 1) for invertible blocks, got {self.coeff!r}.")
        if isinstance(self.power_iterations, bool) or not isinstance(self.power_iterations, int) \
                or self.power_iterations < 0:
            raise ValueError(
                f"power_iterations must be an integer >= 0, got {self.power_iterations!r}.")
        get_activation(self.activation)  # raises for an unknown name
        if not self.hybrid_weight >= 0.0:
            raise ValueError(f"hybrid_weight must be >= 0, got {self.hybrid_weight!r}.")
        if self.hybrid_weight > 0 and self.pad_channels:
            raise ValueError(
                f"A hybrid model (hybrid_weight={self.hybrid_weight}) needs pad_channels=0: with "
                f"{self.pad_channels} zero channels the flow's density would be that of the "
                "padded embedding, not of the images. Use a preset without padding (e.g. "
                "digits_hybrid).")
        for name in ("logdet", "eval_logdet"):
            if getattr(self, name) not in LOGDET_METHODS or getattr(self, name) == "none":
                raise ValueError(f"{name} must be 'exact', 'series' or 'unbiased', got "
                                 f"{getattr(self, name)!r}.")
        if self.num_levels < 1 or self.n_terms < 1 or self.eval_n_terms < 1:
            raise ValueError("num_levels, n_terms and eval_n_terms must be >= 1.")

    @property
    def hybrid(self) -> bool:
        """Whether the model is trained (and exported) as a hybrid classifier + density."""
        return self.hybrid_weight > 0

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        """Shape after the zero-channel padding."""
        h, w, c = self.input_shape
        return (h, w, c + self.pad_channels)

    def block_shapes(self) -> list[tuple[bool, tuple[int, int, int], int]]:
        """``(squeeze_first, event_shape, hidden_channels)`` of every block, in order."""
        h, w, c = self.padded_shape
        out = []
        for n, hidden, stride in zip(self.blocks, self.hidden_channels, self.strides,
                                     strict=True):
            for j in range(n):
                squeeze = stride == 2 and j == 0
                if squeeze:
                    h, w, c = h // 2, w // 2, 4 * c
                out.append((squeeze, (h, w, c), hidden))
        return out

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Shape of ``features(x)`` for one image."""
        return self.block_shapes()[-1][1]


class IResNetClassifier(keras.Model):
    """i-ResNet classifier: an invertible feature extractor and a BatchNorm-ReLU-pool-dense head.

    Calling the model returns logits ``[B, num_classes]`` for float32 NHWC images in [0, 1].
    The model owns every weight (ActNorm states, residual branches, head); the TFP bijectors of
    the invertible part are views rebuilt on each call (`bijectors`). See the module docstring
    for the architecture, the hybrid objective and the parameter count of the paper's preset.

    #### Examples

    ```python
    from tf_iresnet import presets
    model = presets.build("digits_classifier")
    logits = model(x)                          # x: float32 [B, 8, 8, 1] in [0, 1]
    z = model.features(x)                      # [B, 2, 2, 128]
    x_again = model.invert(z)                  # fixed-point inverse, tolerance 1e-5 per block
    ```

    Args:
      config: the `ClassifierConfig`.
      name: Keras name of the model.
    """

    def __init__(self, config: ClassifierConfig, name: str | None = None, **kwargs):
        super().__init__(name=name, **kwargs)
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"config must be a ClassifierConfig, got {type(config).__name__}.")
        self.config = config
        plan = config.block_shapes()
        self._squeeze_first = tuple(squeeze for squeeze, _, _ in plan)
        # Sublayers are attributes, not list items: tf.train.Checkpoint (the training loop's
        # checkpoints) tracks a Keras 3 model's attributes but not the layers in its lists, and
        # would then lose ActNorm's `initialized` flag and the power-iteration vectors.
        for i, (_, shape, hidden) in enumerate(plan):
            if config.actnorm:
                state = ActNormState(name=f"actnorm_{i}")
                # The first ActNorm of a padded model acts before the padding (see bijectors).
                state.build((None, *(config.input_shape if i == 0 and config.pad_channels
                                     else shape)))
                setattr(self, f"actnorm_{i}", state)
            setattr(self, f"branch_{i}", conv_branch(
                shape, hidden, coeff=config.coeff, power_iterations=config.power_iterations,
                activation=config.activation, leading_activation=i > 0, name=f"branch_{i}"))
        channels = config.feature_shape[-1]
        self.head_norm = keras.layers.BatchNormalization(
            momentum=config.bn_momentum, epsilon=1e-5, name="head_norm")
        self.head_norm.build((None, *config.feature_shape))
        self.head_dense = keras.layers.Dense(config.num_classes, name="logits")
        self.head_dense.build((None, channels))
        # Every weight exists now, created without data: ActNorm's data-dependent
        # initialization waits for the first batch the model sees.
        self.built = True

    def get_config(self):
        return {"config": dataclasses.asdict(self.config), "name": self.name}

    @classmethod
    def from_config(cls, config):
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config["config"].items()}
        return cls(ClassifierConfig(**fields), name=config.get("name"))

    @property
    def branches(self) -> list[keras.Sequential]:
        """The residual branches g of the blocks, in order."""
        return [getattr(self, f"branch_{i}") for i in range(len(self._squeeze_first))]

    @property
    def actnorm_states(self) -> list[ActNormState]:
        """The ActNorm states of the blocks, in order (empty without ActNorm)."""
        if not self.config.actnorm:
            return []
        return [getattr(self, f"actnorm_{i}") for i in range(len(self._squeeze_first))]

    # -- data-dependent initialization ------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether every ActNorm has been initialized from data (or restored)."""
        return all(int(s.initialized.numpy()) for s in self.actnorm_states)

    def initialize(self, images: tf.Tensor) -> bool:
        """Initializes the ActNorms from a batch of images, eagerly; returns whether it did.

        A no-op once initialized (e.g. after restoring a checkpoint). Call it before
        distributed training, outside ``strategy.run`` and with the same batch on every worker;
        the views never initialize (`tf_iresnet.bijectors.data_dependent_init`).

        Raises:
          ValueError: the batch gives non-finite statistics.
        """
        if self.initialized:
            return False
        with data_dependent_init():
            self.features(images)
        return True

    # -- the invertible part ---------------------------------------------------------------

    def bijectors(self, *, logdet: str = "none", n_terms: int = 5,
                  seed=None, inverse_on_failure: str = "raise",
                  inverse_atol: float | None = None, inverse_rtol: float | None = None,
                  inverse_max_iter: int | None = None, validate_args: bool = False) -> list:
        """The invertible part as TFP bijector views over this model's weights, in forward order.

        Args:
          logdet: block log-det estimator ("none", "series", "unbiased" or "exact").
          n_terms: series terms.
          seed: None (fresh randomness), or a shape-[2] int tensor split into one stateless
            seed per block, e.g. ``[run seed, step]``: the same on every replica.
          inverse_on_failure: "raise" or "warn" when a block's inverse misses its tolerance.
          inverse_atol, inverse_rtol, inverse_max_iter: override the config's inverse tolerance
            and budget (e.g. tighter for export).
          validate_args: every view checks that its inputs are finite (inputs of another
            dtype than the model's are always refused).
        """
        cfg = self.config
        va = dict(validate_args=validate_args)
        views = [centering(dtype=self.compute_dtype, **va)]
        if cfg.pad_channels:
            # Initialized from data, an ActNorm would give the all-zero padding channels the
            # scale 1/eps (1e6), which also multiplies the gradient of their shift; so the
            # first block's ActNorm normalizes the data channels before the padding.
            if cfg.actnorm:
                views.append(ActNorm(self.actnorm_0, name="actnorm_0", **va))
            views.append(ZeroChannelPad(cfg.pad_channels, **va))
        states, branches = self.actnorm_states, self.branches
        block_seeds = (None if seed is None else
                       tfp.random.split_seed(seed, n=len(branches), salt="classifier_blocks"))
        for i, branch in enumerate(branches):
            if self._squeeze_first[i]:
                views.append(Squeeze(**va))
            if cfg.actnorm and not (i == 0 and cfg.pad_channels):
                views.append(ActNorm(states[i], name=f"actnorm_{i}", **va))
            views.append(InvertibleResidualBlock(
                branch, event_ndims=3, logdet=logdet, n_terms=n_terms,
                seed=None if seed is None else block_seeds[i],
                inverse=InverseConfig(
                    atol=inverse_atol or cfg.inverse_atol,
                    rtol=inverse_rtol or cfg.inverse_rtol,
                    max_iter=inverse_max_iter or cfg.inverse_max_iter,
                    on_failure=inverse_on_failure),
                name=f"block_{i}", **va))
        return views

    def _fresh(self, t) -> tf.Tensor:
        """A new tensor object: TFP caches bijector results per input tensor, and the views of
        another call over the same weights compare equal, so an earlier call on the same tensor
        would be returned (e.g. computed outside a gradient tape, or `invert` returning the
        input of `features` instead of inverting)."""
        return tf.identity(tf.convert_to_tensor(t, self.compute_dtype))

    def flow(self, **view_options) -> tfb.Chain:
        """The invertible part as one `tfb.Chain`, ``x [B, *input_shape] -> z [B,
        *feature_shape]`` (``view_options`` as for `bijectors`)."""
        return tfb.Chain(list(reversed(self.bijectors(**view_options))), name="features")

    def features(self, x: tf.Tensor) -> tf.Tensor:
        """The invertible part: ``[B, *input_shape] -> [B, *feature_shape]``."""
        return self.flow().forward(self._fresh(x))

    def invert(self, z: tf.Tensor, on_failure: str = "raise", **inverse_options) -> tf.Tensor:
        """Inverse of `features`: ``[B, *feature_shape] -> [B, *input_shape]``.

        Each block is inverted by fixed-point iteration to the config's tolerance (or
        ``inverse_atol``, ``inverse_rtol``, ``inverse_max_iter`` given here); a block that
        misses it raises `InverseNotConvergedError` eagerly (``InvalidArgumentError`` when run
        in a graph) with ``on_failure="raise"``, or warns with ``"warn"``.
        """
        flow = self.flow(inverse_on_failure=on_failure, **inverse_options)
        return flow.inverse(self._fresh(z))

    def prior(self) -> tfd.Distribution:
        """The hybrid model's latent distribution: standard normal over ``feature_shape``."""
        return tfd.Independent(tfd.Normal(tf.zeros(self.config.feature_shape), 1.0),
                               reinterpreted_batch_ndims=len(self.config.feature_shape))

    def distribution(self, *, logdet: str | None = None, n_terms: int | None = None,
                     seed=None, validate_args: bool = False) -> tfd.TransformedDistribution:
        """The hybrid model's density over images in [0, 1]: `prior` pushed through the
        inverse of `flow`, with the given log-det estimator (default: the config's evaluation
        estimator). Meaningful for hybrid models (``hybrid_weight > 0``; never padded).
        ``validate_args=True``: NaN or Inf inputs raise in every view."""
        self._check_hybrid("distribution")
        cfg = self.config
        flow = self.flow(logdet=logdet or cfg.eval_logdet, n_terms=n_terms or cfg.eval_n_terms,
                         seed=seed, validate_args=validate_args)
        return tfd.TransformedDistribution(self.prior(), tfb.Invert(flow, validate_args=validate_args),
                                           validate_args=validate_args, name="hybrid")

    # -- the head and the objectives ------------------------------------------------------

    def head(self, z: tf.Tensor, training: bool = False) -> tf.Tensor:
        """BatchNorm -> ReLU -> global average pool -> dense: features to logits."""
        h = tf.nn.relu(self.head_norm(z, training=training))
        return self.head_dense(tf.reduce_mean(h, axis=[1, 2]))

    def call(self, inputs, training=False):
        return self.head(self.features(inputs), training=training)

    def log_prob(self, x: tf.Tensor, *, logdet: str | None = None, seed=None) -> tf.Tensor:
        """Log-density (nats) of images in [0, 1] under the hybrid model, ``[B]``
        (`distribution`'s ``log_prob``)."""
        return self.distribution(logdet=logdet, seed=seed).log_prob(self._fresh(x))

    def bits_per_dim(self, x: tf.Tensor, *, logdet: str | None = None, seed=None) -> tf.Tensor:
        """``-log p(x) / (D ln 2) + log2(num_levels)`` of the hybrid model, ``[B]``."""
        return bits_per_dim(self.log_prob(x, logdet=logdet, seed=seed), self.config.input_shape,
                            self.config.num_levels)

    def _check_hybrid(self, what: str):
        if self.config.pad_channels:
            raise ValueError(
                f"{what} needs an unpadded model (pad_channels=0); this one pads "
                f"{self.config.pad_channels} channels, so it has no density on the images.")

    @property
    def num_trainable_parameters(self) -> int:
        """Number of trainable scalars."""
        return int(sum(math.prod(v.shape) for v in self.trainable_weights))


def classifier_objective(model: IResNetClassifier, images: tf.Tensor, labels: tf.Tensor, *,
                         training: bool, seed=None) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """Mean training objective over a batch and its parts.

    ``cross-entropy`` for plain classifiers; ``cross-entropy + hybrid_weight * bits/dim`` for
    hybrid ones, the log-det from the config's training estimator (``logdet``, ``n_terms``)
    when ``training`` and its evaluation estimator otherwise.

    Args:
      model: the classifier.
      images: float32 ``[B, *input_shape]`` in [0, 1] (dequantized for hybrid models).
      labels: int ``[B]``.
      training: training mode (the training estimator, BatchNorm batch statistics); the
        spectral norms' power iterations run after the update, not here.
      seed: shape-[2] int tensor keying the log-det probes (e.g. ``[run seed, step]``).

    Returns:
      ``(loss, metrics)``: scalar loss and a dict with ``xent``, ``accuracy`` and, for hybrid
      models, ``bits_per_dim``.
    """
    cfg = model.config
    labels = tf.cast(labels, tf.int32)
    metrics = {}
    if cfg.hybrid:
        logdet, n_terms = (cfg.logdet, cfg.n_terms) if training else (cfg.eval_logdet,
                                                                      cfg.eval_n_terms)
        density = model.distribution(logdet=logdet, n_terms=n_terms, seed=seed)
        x = model._fresh(images)
        # The features are the flow's forward pass; log_prob(x) reuses it (TFP's cache).
        z = density.bijector.inverse(x)
        bpd = bits_per_dim(density.log_prob(x), cfg.input_shape, cfg.num_levels)
        metrics["bits_per_dim"] = tf.reduce_mean(bpd)
    else:
        z = model.features(images)
    logits = model.head(z, training=training)
    xent = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    metrics["xent"] = xent
    metrics["accuracy"] = tf.reduce_mean(
        tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
    loss = xent + cfg.hybrid_weight * metrics["bits_per_dim"] if cfg.hybrid else xent
    return loss, metrics


def build_classifier_model(config: ClassifierConfig, name: str | None = None
                           ) -> IResNetClassifier:
    """Builds an `IResNetClassifier` (all weights created; build it under a strategy's scope).

    ActNorm states initialize from the first batch the model sees (training or not).
    """
    return IResNetClassifier(config, name=name or "iresnet_classifier")
