"""Space-to-depth squeeze for NHWC images."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

from tf_iresnet.bijectors.checks import check_input, check_static_event_shape, static_or_assert

tfb = tfp.bijectors

__all__ = ["Squeeze"]


class Squeeze(tfb.Bijector):
    """Trades spatial resolution for channels: ``[H, W, C] -> [H/2, W/2, 4C]``.

    Forward is ``tf.nn.space_to_depth(x, 2)`` (each 2x2 patch becomes 4 channels, in the same
    order as the reference i-ResNet code); inverse is ``tf.nn.depth_to_space``. A permutation,
    so ``log|det J| = 0``. H and W must be divisible by the block size b (forward), C by b^2
    (inverse): the calls and ``forward_event_shape`` / ``inverse_event_shape`` (and their
    ``_tensor`` versions) refuse other shapes. Any dtype; ``validate_args=True`` checks that
    inputs are finite.
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

    def _expected(self, direction):
        b = self._block_size
        if direction == "forward":
            return f"[..., H, W, C] with H and W divisible by {b}"
        return f"[..., H, W, C] with C divisible by {b * b}"

    def _fits(self, shape, direction) -> bool:
        """Whether a static shape (dimensions may be None) can be taken."""
        shape = tf.TensorShape(shape)
        if shape.rank is not None and shape.rank < 3:
            return False
        if shape.rank is None:
            return True
        b = self._block_size
        dims = shape[-3:-1] if direction == "forward" else shape[-1:]
        mod = b if direction == "forward" else b * b
        return all(d is None or d % mod == 0 for d in dims)

    def _apply(self, fn, x, direction):
        x = check_input(self, x, event_ndims=3)
        check_static_event_shape(self, x.shape, self._fits(x.shape, direction),
                                 self._expected(direction), direction)
        shape = tf.shape(x)
        batch = shape[:-3]
        out = fn(tf.reshape(x, tf.concat([[-1], shape[-3:]], 0)), self._block_size)
        return tf.reshape(out, tf.concat([batch, tf.shape(out)[1:]], 0))

    def _forward(self, x):
        return self._apply(tf.nn.space_to_depth, x, "forward")

    def _inverse(self, y):
        return self._apply(tf.nn.depth_to_space, y, "inverse")

    def _forward_log_det_jacobian(self, x):
        return tf.zeros([], dtype=x.dtype)

    def _forward_event_shape(self, input_shape):
        check_static_event_shape(self, input_shape, self._fits(input_shape, "forward"),
                                 self._expected("forward"), "forward")
        h, w, c = input_shape[-3:]
        b = self._block_size
        return input_shape[:-3].concatenate(
            [None if h is None else h // b, None if w is None else w // b,
             None if c is None else c * b * b])

    def _inverse_event_shape(self, output_shape):
        check_static_event_shape(self, output_shape, self._fits(output_shape, "inverse"),
                                 self._expected("inverse"), "inverse")
        h, w, c = output_shape[-3:]
        b = self._block_size
        return output_shape[:-3].concatenate(
            [None if h is None else h * b, None if w is None else w * b,
             None if c is None else c // (b * b)])

    def _tensor_ok(self, s, direction):
        b = self._block_size
        if direction == "forward":
            return tf.reduce_all(tf.equal(tf.math.floormod(s[-3:-1], b), 0))
        return tf.reduce_all(tf.equal(tf.math.floormod(s[-1:], b * b), 0))

    def _forward_event_shape_tensor(self, input_shape):
        b = self._block_size
        checks = static_or_assert(self, input_shape, lambda s: self._fits(s, "forward"),
                                  lambda s: self._tensor_ok(s, "forward"),
                                  self._expected("forward"), "forward")
        with tf.control_dependencies(checks):
            return tf.concat([input_shape[:-3], input_shape[-3:-1] // b,
                              input_shape[-1:] * b * b], 0)

    def _inverse_event_shape_tensor(self, output_shape):
        b = self._block_size
        checks = static_or_assert(self, output_shape, lambda s: self._fits(s, "inverse"),
                                  lambda s: self._tensor_ok(s, "inverse"),
                                  self._expected("inverse"), "inverse")
        with tf.control_dependencies(checks):
            return tf.concat(
                [output_shape[:-3], output_shape[-3:-1] * b, output_shape[-1:] // (b * b)], 0)
