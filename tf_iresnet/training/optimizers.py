"""Optimizers whose traced update holds one copy of the arithmetic per variable shape.

Keras builds an optimizer's update in Python, one copy of the update's arithmetic per
variable; in a traced training step of a deep flow that is some 30 graph nodes per variable,
hundreds per residual block. `Adamax` computes the update of every variable of one shape and
dtype in one shared traced function (called out of line, like the flow's blocks, see
`tf_iresnet.invertible_gradient`); only the reads and the three assignments stay per
variable. Same arithmetic, same slots and checkpoints as `keras.optimizers.Adamax`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["Adamax"]


def _adamax_update(gradient, m, u, lr, local_step, beta_1, beta_2, epsilon):
    """Kingma & Ba's Adamax: ``(m', u', delta)`` with ``variable' = variable - delta``.

    ``m' = m + (1 - beta_1) (g - m)``, ``u' = max(beta_2 u, |g|)``,
    ``delta = lr m' / ((1 - beta_1^t) (u' + epsilon))`` for the 1-based step t.
    """
    m = m + (gradient - m) * (1.0 - beta_1)
    u = tf.maximum(beta_2 * u, tf.abs(gradient))
    delta = lr * m / ((1.0 - tf.pow(beta_1, local_step)) * (u + epsilon))
    return m, u, delta


_shared_adamax_update = tf.function(_adamax_update, autograph=False,
                                    experimental_attributes={"_noinline": True})


@keras.saving.register_keras_serializable(package="tf_iresnet")
class Adamax(keras.optimizers.Adamax):
    """`keras.optimizers.Adamax` with the per-variable arithmetic in one traced function per
    variable shape (see the module docstring). Eagerly it is Keras' own update."""

    def update_step(self, gradient, variable, learning_rate):
        if tf.executing_eagerly():
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        m, u = self._m[index], self._u[index]
        new_m, new_u, delta = _shared_adamax_update(
            tf.cast(gradient, dtype), tf.convert_to_tensor(m), tf.convert_to_tensor(u),
            tf.cast(learning_rate, dtype), tf.cast(self.iterations + 1, dtype),
            tf.constant(self.beta_1, dtype), tf.constant(self.beta_2, dtype),
            tf.constant(self.epsilon, dtype))
        self.assign(m, new_m)
        self.assign(u, new_u)
        self.assign_sub(variable, delta)
