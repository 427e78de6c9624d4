"""Injective zero-channel padding (the i-ResNet classifier's first layer)."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

from tf_iresnet.bijectors.checks import check_input, check_static_event_shape, static_or_assert

tfb = tfp.bijectors

__all__ = ["ZeroChannelPad"]


class ZeroChannelPad(tfb.Bijector):
    """Appends ``channels`` zero channels: ``[..., C] -> [..., C + channels]``.

    Injective, not bijective: the forward map embeds the data in a larger space (so a residual
    stage can be wider than the input), the inverse drops the padding channels and is exact on
    the image of the forward map. The embedding is an isometry, so its log-volume change is 0,
    which is what this bijector reports (a density on the padded space is only defined on the
    embedded subspace; use it for classification and feature inversion). The inverse refuses
    inputs with no more than ``channels`` channels; ``validate_args=True`` checks finiteness.
    """

    def __init__(self, channels: int, event_ndims: int = 3, validate_args: bool = False,
                 name: str = "zero_channel_pad"):
        parameters = dict(locals())
        if not isinstance(channels, int) or channels < 0:
            raise ValueError(f"channels must be a non-negative integer, got {channels!r}.")
        self._channels = channels
        with tf.name_scope(name) as name:
            super().__init__(forward_min_event_ndims=event_ndims, is_constant_jacobian=True,
                             validate_args=validate_args, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def _expected(self):
        return f"[..., C] with C > {self._channels} (the padded channels)"

    def _inverse_fits(self, shape) -> bool:
        shape = tf.TensorShape(shape)
        if shape.rank is None:
            return True
        return shape.rank >= 1 and (shape[-1] is None or shape[-1] > self._channels)

    def _forward(self, x):
        x = check_input(self, x, event_ndims=self.forward_min_event_ndims)
        pad = tf.zeros(tf.concat([tf.shape(x)[:-1], [self._channels]], 0), x.dtype)
        return tf.concat([x, pad], axis=-1)

    def _inverse(self, y):
        y = check_input(self, y, event_ndims=self.forward_min_event_ndims)
        check_static_event_shape(self, y.shape, self._inverse_fits(y.shape), self._expected(),
                                 "inverse")
        return y[..., : tf.shape(y)[-1] - self._channels]

    def _forward_log_det_jacobian(self, x):
        return tf.zeros([], x.dtype)

    def _inverse_log_det_jacobian(self, y):
        return tf.zeros([], y.dtype)

    def _forward_event_shape(self, s):
        return s[:-1].concatenate([None if s[-1] is None else s[-1] + self._channels])

    def _inverse_event_shape(self, s):
        check_static_event_shape(self, s, self._inverse_fits(s), self._expected(), "inverse")
        return s[:-1].concatenate([None if s[-1] is None else s[-1] - self._channels])

    def _forward_event_shape_tensor(self, s):
        return tf.concat([s[:-1], s[-1:] + self._channels], 0)

    def _inverse_event_shape_tensor(self, s):
        checks = static_or_assert(self, s, self._inverse_fits,
                                  lambda t: t[-1] > self._channels, self._expected(), "inverse")
        with tf.control_dependencies(checks):
            return tf.concat([s[:-1], s[-1:] - self._channels], 0)
