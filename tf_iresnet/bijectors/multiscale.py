"""Multi-scale architecture: scales of bijectors with half the channels factored out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from tf_iresnet.bijectors.checks import check_input, check_static_event_shape, static_or_assert

tfb = tfp.bijectors

__all__ = ["MultiScale"]


class MultiScale(tfb.Bijector):
    """Maps an event ``x`` of shape ``input_shape`` to a flat latent ``z`` of size ``D``.

    Scale ``i`` (a bijector on rank-``event_ndims`` events, e.g. a ``tfb.Chain`` of squeeze,
    ActNorm and residual blocks) transforms the current tensor; after every non-final scale
    the first half of the channels is *factored out* (Dinh et al., 2017): it goes straight to
    the latent and the remaining half continues through the next scales. The latent is the
    concatenation of the flattened factored parts and the final output, so ``D`` equals the
    input size. ``log|det J|`` is the sum of the scales' log-dets (splitting and flattening are
    permutations).

    Forward and its log-det are computed together and cached, so a ``TransformedDistribution``
    evaluates every residual branch once per ``log_prob``.

    Args:
      scales: the per-scale bijectors, in data-to-latent order.
      input_shape: static event shape of ``x`` (``(H, W, C)`` or ``(D,)``).
      factor_out: factor out half the channels after each non-final scale.
      compute_logdet: whether the forward pass also computes the log-det (False for encoders
        built with ``logdet="none"`` blocks).
      dtype: the dtype inputs must have (the weights' dtype): another dtype is refused with a
        ``TypeError`` naming it before any scale runs. ``None``: not checked here.
      validate_args: check that inputs are finite (and, in the ``*_event_shape_tensor``
        functions, shapes only known at run time).

    The calls and ``forward_event_shape`` / ``inverse_event_shape`` (and their ``_tensor``
    versions) refuse shapes other than ``[..., *input_shape]`` (forward) and ``[..., D]``
    (inverse).
    """

    _cache = cache_util.BijectorCacheWithGreedyAttrs(
        forward_name="_augmented_forward", inverse_name="_augmented_inverse"
    )

    def __init__(self, scales: Sequence[tfb.Bijector], input_shape: Sequence[int], *,
                 factor_out: bool = True, compute_logdet: bool = True, dtype=None,
                 validate_args: bool = False, name: str = "multiscale"):
        parameters = dict(locals())
        self._scales = list(scales)
        self._input_shape = tuple(int(d) for d in input_shape)
        self._event_ndims = len(self._input_shape)
        self._factor_out = factor_out
        self._compute_logdet = compute_logdet
        self._required_dtype = None if dtype is None else tf.as_dtype(dtype)
        # Static bookkeeping: the shape entering each scale and the factored sizes.
        self._shapes_in, self._parts = [], []
        shape = tf.TensorShape(self._input_shape)
        for i, scale in enumerate(self._scales):
            self._shapes_in.append(shape)
            shape = scale.forward_event_shape(shape)
            if factor_out and i < len(self._scales) - 1:
                channels = shape[-1]
                out = shape[:-1].concatenate([channels // 2])
                self._parts.append(out)
                shape = shape[:-1].concatenate([channels - channels // 2])
        self._parts.append(shape)
        self._dim = int(np.prod(self._input_shape))
        if sum(p.num_elements() for p in self._parts) != self._dim:
            raise ValueError("The scales must preserve the number of dimensions.")
        with tf.name_scope(name) as name:
            super().__init__(forward_min_event_ndims=self._event_ndims,
                             inverse_min_event_ndims=1, validate_args=validate_args,
                             parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    @property
    def scales(self) -> list[tfb.Bijector]:
        return self._scales

    @property
    def event_ndims(self) -> int:
        """Rank of one data event (3 for images, 1 for vectors)."""
        return self._event_ndims

    @property
    def factor_out(self) -> bool:
        """Whether half the channels are factored out after every non-final scale."""
        return self._factor_out

    def _batch(self, t, event_rank):
        return tf.shape(t)[: tf.rank(t) - event_rank]

    def _augmented_forward(self, x):
        x = check_input(self, x, dtype=self._required_dtype, event_shape=self._input_shape)
        batch = self._batch(x, self._event_ndims)
        h = x
        latents, ldj = [], 0.0
        for i, scale in enumerate(self._scales):
            out = scale.forward(h)
            if self._compute_logdet:
                ldj += scale.forward_log_det_jacobian(h, event_ndims=self._event_ndims)
            if self._factor_out and i < len(self._scales) - 1:
                half = out.shape[-1] // 2
                latents.append(out[..., :half])
                out = out[..., half:]
            h = out
        latents.append(h)
        # Explicit sizes, not -1: a reshape cannot infer -1 for an empty batch.
        batch_rank = tf.size(batch)
        flat = [tf.reshape(t, tf.concat([batch, [tf.reduce_prod(tf.shape(t)[batch_rank:])]], 0))
                for t in latents]
        z = tf.concat(flat, axis=-1)
        if not self._compute_logdet:
            return z, {}
        return z, {"fldj": ldj, "ildj": -ldj}

    def _augmented_inverse(self, z):
        z = check_input(self, z, dtype=self._required_dtype, event_shape=[self._dim],
                        what="latent")
        batch = self._batch(z, 1)
        sizes = [p.num_elements() for p in self._parts]
        pieces = tf.split(z, sizes, axis=-1)
        pieces = [tf.reshape(t, tf.concat([batch, p], 0))
                  for t, p in zip(pieces, self._parts, strict=True)]
        h = pieces[-1]
        for i in reversed(range(len(self._scales))):
            if self._factor_out and i < len(self._scales) - 1:
                h = tf.concat([pieces[i], h], axis=-1)
            h = self._scales[i].inverse(h)
        return h, {}

    def _forward(self, x):
        return self._augmented_forward(x)[0]

    def _inverse(self, z):
        return self._augmented_inverse(z)[0]

    def _forward_log_det_jacobian(self, x):
        if not self._compute_logdet:
            raise ValueError(f"{self.name} was built with compute_logdet=False.")
        cached = self._cache.forward_attributes(x)
        if "fldj" not in cached:
            cached.update(self._augmented_forward(x)[1])
        return cached["fldj"]

    def _inverse_log_det_jacobian(self, z):
        cached = self._cache.inverse_attributes(z)
        if "ildj" not in cached:
            x = self.inverse(z)
            cached.update(self._augmented_forward(x)[1])
        return cached["ildj"]

    def _forward_fits(self, shape) -> bool:
        shape = tf.TensorShape(shape)
        if shape.rank is None:
            return True
        n = self._event_ndims
        return shape.rank >= n and shape[shape.rank - n:].is_compatible_with(self._input_shape)

    def _inverse_fits(self, shape) -> bool:
        shape = tf.TensorShape(shape)
        if shape.rank is None:
            return True
        return shape.rank >= 1 and shape[-1:].is_compatible_with([self._dim])

    def _forward_event_shape(self, input_shape):
        check_static_event_shape(self, input_shape, self._forward_fits(input_shape),
                                 f"[..., {', '.join(map(str, self._input_shape))}]", "forward")
        return input_shape[: input_shape.rank - self._event_ndims].concatenate([self._dim])

    def _inverse_event_shape(self, output_shape):
        check_static_event_shape(self, output_shape, self._inverse_fits(output_shape),
                                 f"[..., {self._dim}]", "inverse")
        return output_shape[:-1].concatenate(self._input_shape)

    def _forward_event_shape_tensor(self, input_shape):
        n = self._event_ndims
        checks = static_or_assert(
            self, input_shape, self._forward_fits,
            lambda s: tf.reduce_all(tf.equal(s[tf.size(s) - n:], self._input_shape)),
            f"[..., {', '.join(map(str, self._input_shape))}]", "forward")
        with tf.control_dependencies(checks):
            return tf.concat([input_shape[: tf.size(input_shape) - n], [self._dim]], 0)

    def _inverse_event_shape_tensor(self, output_shape):
        checks = static_or_assert(self, output_shape, self._inverse_fits,
                                  lambda s: tf.equal(s[-1], self._dim), f"[..., {self._dim}]",
                                  "inverse")
        with tf.control_dependencies(checks):
            return tf.concat([output_shape[:-1], self._input_shape], 0)
