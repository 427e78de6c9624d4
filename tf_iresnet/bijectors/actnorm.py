"""Activation normalization (Kingma & Dhariwal, 2018) with data-dependent initialization."""

from __future__ import annotations

import keras
import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = ["ActNorm", "ActNormState"]


@keras.saving.register_keras_serializable(package="tf_iresnet")
class ActNormState(keras.layers.Layer):
    """Keras layer owning ActNorm's weights: per-channel ``loc``, ``log_scale`` and a flag.

    ``initialized`` is a non-trainable int32 variable, so it is saved in checkpoints and
    ``.weights.h5`` files with the rest (the reference code loses it, re-initializing a restored
    model on its next batch). Variables assigned during a forward pass use
    ``only_first_replica`` aggregation, so under ``tf.distribute`` the first replica's batch
    statistics initialize every replica.

    Calling the layer applies the normalization (and initializes on the first batch), so it
    can also be used as a plain Keras layer.
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

    def parameters_for(self, x: tf.Tensor, data_init: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
        """``(loc, log_scale)``, first setting them from ``x``'s statistics if uninitialized.

        Initialization makes the output zero-mean, unit-variance per channel over all other
        axes of ``x``: ``loc = -mean``, ``log_scale = -log(std + eps)``. With
        ``data_init=False`` the stored values are returned as they are: use it inside a
        distributed step (``strategy.run``), where a conditional assignment would need a
        cross-replica synchronization that TF does not support inside control flow; initialize
        beforehand with one call in cross-replica context.
        """
        if not self.built:
            self.build(x.shape)
        if not data_init:
            return tf.convert_to_tensor(self.loc), tf.convert_to_tensor(self.log_scale)

        def init():
            axes = list(range(x.shape.rank - 1))
            mean, var = tf.nn.moments(tf.stop_gradient(x), axes=axes)
            loc = -mean
            log_scale = -tf.math.log(tf.sqrt(var) + self.eps)
            self.loc.assign(loc)
            self.log_scale.assign(log_scale)
            self.initialized.assign(1)
            return loc, log_scale

        def current():
            return tf.convert_to_tensor(self.loc), tf.convert_to_tensor(self.log_scale)

        if tf.executing_eagerly():
            return init() if int(self.initialized.numpy()) == 0 else current()
        return tf.cond(tf.equal(tf.convert_to_tensor(self.initialized), 0), init, current)

    def call(self, inputs):
        loc, log_scale = self.parameters_for(inputs)
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
    The first forward pass through an uninitialized state sets ``loc`` and ``log_scale`` so that
    the output of that batch has zero mean and unit variance per channel. The inverse never
    initializes.

    Args:
      state: the ``ActNormState`` Keras layer that owns the weights; a new one is created when
        None (reach it as ``.state`` and track it in your Keras model so it is trained/saved).
      event_ndims: 3 for NHWC images, 1 for vectors.
      data_init: initialize an uninitialized state from the first forward batch (see
        ``ActNormState.parameters_for`` for when to turn it off).
    """

    def __init__(self, state: ActNormState | None = None, *, event_ndims: int = 3,
                 data_init: bool = True, validate_args: bool = False, name: str = "actnorm"):
        parameters = dict(locals())
        if event_ndims not in (1, 3):
            raise ValueError(f"event_ndims must be 1 or 3, got {event_ndims!r}.")
        if state is None:
            state = ActNormState()
        if not isinstance(state, ActNormState):
            raise TypeError(f"state must be an ActNormState layer, got {type(state).__name__}.")
        self._state = state
        self._event_ndims = event_ndims
        self._data_init = bool(data_init)
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
        if x.shape.rank is not None and x.shape.rank < self._event_ndims:
            raise ValueError(
                f"{self.name} expects events of rank {self._event_ndims}; got shape {x.shape}.")

    def _forward(self, x):
        self._check(x)
        loc, log_scale = self._state.parameters_for(x, self._data_init)
        return (x + loc) * tf.exp(log_scale)

    def _inverse(self, y):
        self._check(y)
        if not self._state.built:
            self._state.build(y.shape)
        return y * tf.exp(-tf.convert_to_tensor(self._state.log_scale)) - self._state.loc

    def _forward_log_det_jacobian(self, x):
        self._check(x)
        _, log_scale = self._state.parameters_for(x, self._data_init)
        return self._ldj(log_scale, tf.shape(x))

    def _inverse_log_det_jacobian(self, y):
        self._check(y)
        return -self._ldj(tf.convert_to_tensor(self._state.log_scale), tf.shape(y))

    def _ldj(self, log_scale, shape):
        pixels = tf.reduce_prod(shape[-self._event_ndims:-1]) if self._event_ndims > 1 else 1
        return tf.cast(pixels, log_scale.dtype) * tf.reduce_sum(log_scale)
