"""Activation normalization (Kingma & Dhariwal, 2018) with data-dependent initialization."""

from __future__ import annotations

import contextlib
import threading

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tf_iresnet.bijectors.checks import check_input

tfb = tfp.bijectors

__all__ = ["ActNorm", "ActNormState", "data_dependent_init"]


@contextlib.contextmanager
def data_dependent_init():
    """Within this context, a forward pass of an `ActNorm` view over an uninitialized state
    first initializes the state from its input batch (`ActNormState.initialize`).

    The only place where a view assigns variables, on purpose: models call it from their
    explicit ``initialize(x)``, eagerly and in cross-replica context, once before training.
    Outside it, every view is pure (`tf.function`, ``strategy.run``, XLA, ``tf.vectorized_map``
    see no assignment and no data-dependent control flow).

    Raises:
      RuntimeError: entered inside a `tf.function` (initialization must run eagerly).
    """
    if not tf.executing_eagerly():
        raise RuntimeError("ActNorm's data-dependent initialization runs eagerly only: call the "
                           "model's initialize(x) outside tf.function and strategy.run.")
    _INIT.active = getattr(_INIT, "active", 0) + 1
    try:
        yield
    finally:
        _INIT.active -= 1


_INIT = threading.local()


def _initializing() -> bool:
    return getattr(_INIT, "active", 0) > 0


@keras.saving.register_keras_serializable(package="tf_iresnet")
class ActNormState(keras.layers.Layer):
    """Keras layer owning ActNorm's weights: per-channel ``loc``, ``log_scale`` and a flag.

    ``initialized`` is a non-trainable int32 variable, so it is saved in checkpoints and
    ``.weights.h5`` files with the rest (the reference code loses it, re-initializing a restored
    model on its next batch). The variables use ``only_first_replica`` aggregation.

    Calling the layer applies the normalization with the stored values; `initialize` sets them
    from a batch.
    """

    def __init__(self, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.eps = float(eps)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("ActNormState needs a static channel (last) dimension.")
        agg = "only_first_replica"
        self.loc = self.add_weight(name="loc", shape=(channels,), initializer="zeros",
                                   aggregation=agg)
        self.log_scale = self.add_weight(name="log_scale", shape=(channels,),
                                         initializer="zeros", aggregation=agg)
        self.initialized = self.add_weight(name="initialized", shape=(), dtype="int32",
                                           initializer="zeros", trainable=False, aggregation=agg)

    def initialize(self, x: tf.Tensor) -> None:
        """Sets ``loc = -mean``, ``log_scale = -log(std + eps)`` per channel over all other
        axes of ``x`` (so that this batch comes out zero-mean, unit-variance) and the flag.

        Raises:
          ValueError: the statistics of ``x`` are not finite (NaN or Inf in the batch): a
            non-finite batch never becomes the initialization.
        """
        x = tf.convert_to_tensor(x)
        if not self.built:
            self.build(x.shape)
        mean, var = tf.nn.moments(tf.stop_gradient(x), axes=list(range(x.shape.rank - 1)))
        loc, log_scale = -mean, -tf.math.log(tf.sqrt(var) + self.eps)
        if not bool(tf.reduce_all(tf.math.is_finite(tf.concat([loc, log_scale], 0)))):
            raise ValueError(f"{self.name}: the initialization batch has non-finite values "
                             "(NaN or Inf), so ActNorm cannot be initialized from it.")
        self.loc.assign(loc)
        self.log_scale.assign(log_scale)
        self.initialized.assign(1)

    def parameters(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The stored ``(loc, log_scale)``."""
        return tf.convert_to_tensor(self.loc), tf.convert_to_tensor(self.log_scale)

    def call(self, inputs):
        loc, log_scale = self.parameters()
        return (inputs + loc) * tf.exp(log_scale)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


class ActNorm(tfb.Bijector):
    """Per-channel affine bijector ``y = (x + loc) * exp(log_scale)``, a view over ActNormState.

    #### Mathematical Details

    For events ``[H, W, C]`` (``event_ndims=3``) or ``[C]`` (``event_ndims=1``),
    ``log|det J| = (H * W) * sum_c log_scale_c`` (``sum_c log_scale_c`` for vectors).
    The view is pure: it reads the state. Inside `data_dependent_init` (a model's explicit
    ``initialize``), a forward pass over an uninitialized state first sets ``loc`` and
    ``log_scale`` so that the output of that batch has zero mean and unit variance per channel.

    Args:
      state: the ``ActNormState`` Keras layer that owns the weights; a new one is created when
        None (reach it as ``.state`` and track it in your Keras model so it is trained/saved).
      event_ndims: 3 for NHWC images, 1 for vectors.
      validate_args: check that inputs are finite.
      name: the bijector's name.

    Inputs must have the state's dtype (``TypeError`` naming it otherwise).
    """

    def __init__(self, state: ActNormState | None = None, *, event_ndims: int = 3,
                 validate_args: bool = False, name: str = "actnorm"):
        parameters = dict(locals())
        if event_ndims not in (1, 3):
            raise ValueError(f"event_ndims must be 1 or 3, got {event_ndims!r}.")
        if state is None:
            state = ActNormState()
        if not isinstance(state, ActNormState):
            raise TypeError(f"state must be an ActNormState layer, got {type(state).__name__}.")
        self._state = state
        self._event_ndims = event_ndims
        with tf.name_scope(name) as name:
            super().__init__(forward_min_event_ndims=event_ndims, validate_args=validate_args,
                             parameters=parameters, name=name)

    @property
    def state(self) -> ActNormState:
        return self._state

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def _check(self, x):
        return check_input(self, x, dtype=self._state.compute_dtype,
                           event_ndims=self._event_ndims)

    def _loc_and_log_scale(self, x, initialize: bool = False):
        if not self._state.built:
            self._state.build(x.shape)
        if initialize and _initializing() and not int(self._state.initialized.numpy()):
            self._state.initialize(x)
        return self._state.parameters()

    def _forward(self, x):
        x = self._check(x)
        loc, log_scale = self._loc_and_log_scale(x, initialize=True)
        return (x + loc) * tf.exp(log_scale)

    def _inverse(self, y):
        y = self._check(y)
        loc, log_scale = self._loc_and_log_scale(y)
        return y * tf.exp(-log_scale) - loc

    def _forward_log_det_jacobian(self, x):
        x = self._check(x)
        _, log_scale = self._loc_and_log_scale(x, initialize=True)
        return self._ldj(log_scale, tf.shape(x))

    def _inverse_log_det_jacobian(self, y):
        y = self._check(y)
        return -self._ldj(self._loc_and_log_scale(y)[1], tf.shape(y))

    def _ldj(self, log_scale, shape):
        pixels = tf.reduce_prod(shape[-self._event_ndims:-1]) if self._event_ndims > 1 else 1
        return tf.cast(pixels, log_scale.dtype) * tf.reduce_sum(log_scale)
