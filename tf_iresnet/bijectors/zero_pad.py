"""Injective zero-channel padding (the i-ResNet classifier's first layer)."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = ["ZeroChannelPad"]


class ZeroChannelPad(tfb.Bijector):
    """Appends ``channels`` zero channels: ``[..., C] -> [..., C + channels]``.

    Injective, not bijective: the forward map embeds the data in a larger space (so a residual
    stage can be wider than the input), the inverse drops the padding channels and is exact on
    the image of the forward map. The embedding is an isometry, so its log-volume change is 0,
    which is what this bijector reports (a density on the padded space is only defined on the
    embedded subspace; use it for classification and feature inversion).
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

    def _forward(self, x):
        pad = tf.zeros(tf.concat([tf.shape(x)[:-1], [self._channels]], 0), x.dtype)
        return tf.concat([x, pad], axis=-1)

    def _inverse(self, y):
        return y[..., : y.shape[-1] - self._channels]

    def _forward_log_det_jacobian(self, x):
        return tf.zeros([], x.dtype)

    def _inverse_log_det_jacobian(self, y):
        return tf.zeros([], y.dtype)

    def _forward_event_shape(self, s):
        return s[:-1].concatenate([None if s[-1] is None else s[-1] + self._channels])

    def _inverse_event_shape(self, s):
        return s[:-1].concatenate([None if s[-1] is None else s[-1] - self._channels])

    def _forward_event_shape_tensor(self, s):
        return tf.concat([s[:-1], s[-1:] + self._channels], 0)

    def _inverse_event_shape_tensor(self, s):
        return tf.concat([s[:-1], s[-1:] - self._channels], 0)
