"""1-Lipschitz activations for contractive residual branches."""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["LipSwish", "get_activation"]


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
    "elu": lambda name: keras.layers.Activation("elu", name=name),
    "relu": lambda name: keras.layers.Activation("relu", name=name),
    "lipswish": lambda name: LipSwish(name=name),
}


def get_activation(name: str, layer_name: str | None = None) -> keras.layers.Layer:
    """A fresh 1-Lipschitz activation layer: ``"elu"`` (the paper's), ``"relu"``, ``"lipswish"``."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}.")
    return _ACTIVATIONS[name](layer_name)
