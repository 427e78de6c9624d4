"""Optimizers whose traced update is one fused op per variable.

Keras builds an optimizer's update in Python, one copy of the update's arithmetic per
variable: in the traced training step of a deep flow that is some 30 graph nodes per
variable, hundreds per residual block, and the step's graph grows with depth. `Adamax` runs
TF's fused ``ResourceApplyAdaMax`` kernel instead (what the TF 2 Keras optimizers ran), the
same arithmetic on the same slots, so checkpoints are those of `keras.optimizers.Adamax`. The
scalars of the update (``beta_1^t``, the rate, the betas, epsilon) are computed once per step
and graph, not once per variable.
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


class _ScalarCache:
    """The scalars of the update being traced: made in ``graph`` from ``learning_rate``."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.graph = self.learning_rate = None
        self.by_dtype: dict = {}


@keras.saving.register_keras_serializable(package="tf_iresnet")
class Adamax(keras.optimizers.Adamax):
    """`keras.optimizers.Adamax` with its traced per-variable update fused into one op.

    Kingma & Ba's Adamax for the 1-based step t: ``m <- beta_1 m + (1 - beta_1) g``,
    ``u <- max(beta_2 u, |g|)``, ``variable <- variable - lr m / ((1 - beta_1^t)(u + eps))``.
    Eagerly it is Keras' own update.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Not a dict or tuple attribute: the optimizer's checkpoint tracking would wrap those.
        self._step_scalars = _ScalarCache()

    def apply(self, grads, trainable_variables=None):
        try:
            return super().apply(grads, trainable_variables)
        finally:
            # The next update reads `iterations` anew, and no graph's tensors are kept.
            self._step_scalars.clear()

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # A sum over one replica is the gradient itself; TF's all-reduce in the default replica
        # context still adds a graph node per variable.
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync == 1:
            return list(grads_and_vars)
        return super()._all_reduce_sum_gradients(grads_and_vars)

    def _scalars(self, dtype: tf.DType, learning_rate) -> dict[str, tf.Tensor]:
        """This update's scalars in ``dtype``, made by its first variable's update and shared
        by the others (in the same graph: a loop body or branch makes its own)."""
        cache = self._step_scalars
        graph = tf.compat.v1.get_default_graph()
        if graph is not cache.graph or learning_rate is not cache.learning_rate:
            cache.clear()
            cache.graph, cache.learning_rate = graph, learning_rate
        if dtype not in cache.by_dtype:
            with tf.name_scope("adamax_scalars"):
                local_step = tf.cast(self.iterations + 1, dtype)
                beta_1 = tf.cast(self.beta_1, dtype)
                cache.by_dtype[dtype] = {
                    "beta1_power": tf.pow(beta_1, local_step),
                    "lr": tf.cast(learning_rate, dtype), "beta1": beta_1,
                    "beta2": tf.cast(self.beta_2, dtype),
                    "epsilon": tf.cast(self.epsilon, dtype)}
        return cache.by_dtype[dtype]

    def update_step(self, gradient, variable, learning_rate):
        if tf.executing_eagerly():
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdaMax(
            var=_handle(variable), m=_handle(self._m[index]), v=_handle(self._u[index]),
            grad=tf.cast(gradient, dtype), **self._scalars(tf.as_dtype(dtype), learning_rate))
