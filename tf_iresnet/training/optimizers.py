"""Optimizers whose traced update is one fused op per variable.

Keras builds an optimizer's update in Python, one copy of the update's arithmetic per
variable: in the traced training step of a deep flow that is some 30 graph nodes per
variable, hundreds per residual block, and the step's graph grows with depth. `Adamax` runs
TF's fused ``ResourceApplyAdaMax`` kernel instead (what the TF 2 Keras optimizers ran), the
same arithmetic on the same slots, so checkpoints are those of `keras.optimizers.Adamax`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["Adamax"]


def _handle(variable) -> tf.Tensor:
    """The resource handle of a Keras or TF variable (inside a distributed update: of the
    component on the current device)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


@keras.saving.register_keras_serializable(package="tf_iresnet")
class Adamax(keras.optimizers.Adamax):
    """`keras.optimizers.Adamax` with its traced per-variable update fused into one op.

    Kingma & Ba's Adamax for the 1-based step t: ``m <- beta_1 m + (1 - beta_1) g``,
    ``u <- max(beta_2 u, |g|)``, ``variable <- variable - lr m / ((1 - beta_1^t)(u + eps))``.
    Eagerly it is Keras' own update.
    """

    def update_step(self, gradient, variable, learning_rate):
        if tf.executing_eagerly():
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        local_step = tf.cast(self.iterations + 1, dtype)
        tf.raw_ops.ResourceApplyAdaMax(
            var=_handle(variable), m=_handle(self._m[index]), v=_handle(self._u[index]),
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), local_step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))
