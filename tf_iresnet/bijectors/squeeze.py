"""Space-to-depth squeeze for NHWC images."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = ["Squeeze"]


class Squeeze(tfb.Bijector):
    """Trades spatial resolution for channels: ``[H, W, C] -> [H/2, W/2, 4C]``.

    Forward is ``tf.nn.space_to_depth(x, 2)`` (each 2x2 patch becomes 4 channels, in the same
    order as the reference i-ResNet code); inverse is ``tf.nn.depth_to_space``. A permutation,
    so ``log|det J| = 0``. H and W must be even.
    """

    def __init__(self, block_size: int = 2, validate_args: bool = False, name: str = "squeeze"):
        parameters = dict(locals())
        if not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}.")
        self._block_size = block_size
        with tf.name_scope(name) as name:
            super().__init__(
                forward_min_event_ndims=3, is_constant_jacobian=True,
                validate_args=validate_args, parameters=parameters, name=name,
            )

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def _apply(self, fn, x):
        x = tf.convert_to_tensor(x)
        if x.shape.rank is not None and x.shape.rank < 3:
            raise ValueError(f"Squeeze expects NHWC image events [H, W, C]; got shape {x.shape}.")
        shape = tf.shape(x)
        batch = shape[:-3]
        out = fn(tf.reshape(x, tf.concat([[-1], shape[-3:]], 0)), self._block_size)
        return tf.reshape(out, tf.concat([batch, tf.shape(out)[1:]], 0))

    def _forward(self, x):
        if x.shape.rank is not None and x.shape[-3] is not None:
            h, w = x.shape[-3], x.shape[-2]
            if h % self._block_size or w % self._block_size:
                raise ValueError(
                    f"Squeeze needs H and W divisible by {self._block_size}; got H={h}, W={w}."
                )
        return self._apply(tf.nn.space_to_depth, x)

    def _inverse(self, y):
        return self._apply(tf.nn.depth_to_space, y)

    def _forward_log_det_jacobian(self, x):
        return tf.zeros([], dtype=x.dtype)

    def _forward_event_shape(self, input_shape):
        h, w, c = input_shape[-3:]
        b = self._block_size
        return input_shape[:-3].concatenate(
            [None if h is None else h // b, None if w is None else w // b,
             None if c is None else c * b * b])

    def _inverse_event_shape(self, output_shape):
        h, w, c = output_shape[-3:]
        b = self._block_size
        return output_shape[:-3].concatenate(
            [None if h is None else h * b, None if w is None else w * b,
             None if c is None else c // (b * b)])

    def _forward_event_shape_tensor(self, input_shape):
        b = self._block_size
        return tf.concat([input_shape[:-3], input_shape[-3:-1] // b, input_shape[-1:] * b * b], 0)

    def _inverse_event_shape_tensor(self, output_shape):
        b = self._block_size
        return tf.concat(
            [output_shape[:-3], output_shape[-3:-1] * b, output_shape[-1:] // (b * b)], 0)
