"""1-Lipschitz activations for contractive residual branches."""

from __future__ import annotations

import keras
import tensorflow as tf

try:  # Whether a gradient tape is recording (TF-internal; without it, always take the tape path).
    from tensorflow.python.eager.record import could_possibly_record as _tape_is_recording
except ImportError:  # pragma: no cover
    def _tape_is_recording() -> bool:
        return True

__all__ = ["ELU", "LipSwish", "get_activation"]


@tf.custom_gradient
def _elu_with_slope(x: tf.Tensor, y: tf.Tensor, slope: tf.Tensor):
    """``y = elu(x)`` (given) whose vector-Jacobian product is ``u * slope`` (``slope`` given)."""
    def grad(u):
        return u * slope, None, None

    return tf.identity(y), grad


@keras.saving.register_keras_serializable(package="tf_iresnet")
class ELU(keras.layers.Layer):
    """ELU ``y = x`` for ``x > 0``, ``exp(x) - 1`` otherwise, with a backward pass built for
    the log-det's chain of vector-Jacobian products.

    Values and gradients of every order are those of ``tf.nn.elu``. Under a gradient tape the
    slope ``s = elu'(x)`` (``1`` where ``y > 0``, ``y + 1`` elsewhere) is computed once per call
    as an ordinary differentiable tensor, and each vector-Jacobian product through the layer is
    ``u * s``. The n products of an n-term series then share one ``s``: their second-order
    backward is two multiplications each, and the gradient reaching ``s`` is summed over the
    products before it flows back through ``s(y)`` once. TensorFlow's own ``EluGrad`` is
    differentiated per product instead (``EluGrad``, ``Less``, ``Mul``, ``Select``), and keeps
    more of its intermediates; ``benchmarks/README.md`` has the measured effect on the training
    step's time and peak memory. Without a recording tape it is ``tf.nn.elu``.
    """

    def call(self, inputs):
        y = tf.nn.elu(inputs)
        if not _tape_is_recording():
            return y
        slope = tf.where(y > 0, tf.ones([], y.dtype), y + 1.0)
        return _elu_with_slope(inputs, y, slope)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="tf_iresnet")
class LipSwish(keras.layers.Layer):
    """LipSwish activation ``x * sigmoid(beta * x) / 1.1`` (Chen et al., 2019).

    Swish's derivative is bounded by 1.0998 in absolute value for every ``beta > 0``, so dividing
    by 1.1 makes it 1-Lipschitz while keeping it smooth (unlike ELU's second derivative,
    smoothness keeps the log-det's gradient well behaved). ``beta = softplus(beta_raw)`` is a
    trainable scalar (initialised to 1) and stays positive.
    """

    def __init__(self, beta_init: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if beta_init <= 0:
            raise ValueError(f"beta_init must be > 0, got {beta_init}.")
        self.beta_init = float(beta_init)

    def build(self, input_shape):
        raw = float(tf.math.log(tf.math.expm1(self.beta_init)))  # softplus^-1
        self.beta_raw = self.add_weight(
            name="beta_raw", shape=(), initializer=keras.initializers.Constant(raw)
        )

    def call(self, inputs):
        beta = tf.nn.softplus(tf.convert_to_tensor(self.beta_raw))
        return inputs * tf.sigmoid(beta * inputs) / 1.1

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "beta_init": self.beta_init}


_ACTIVATIONS = {
    "elu": lambda name: ELU(name=name),
    "relu": lambda name: keras.layers.Activation("relu", name=name),
    "lipswish": lambda name: LipSwish(name=name),
}


def get_activation(name: str, layer_name: str | None = None) -> keras.layers.Layer:
    """A fresh 1-Lipschitz activation layer: ``"elu"`` (the paper's), ``"relu"``, ``"lipswish"``."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}.")
    return _ACTIVATIONS[name](layer_name)
