"""In-graph input checks for exported endpoints: errors that say what was expected.

Exported signatures are fully typed (``[None, *event_shape]`` float32), so TF itself refuses a
wrong shape or dtype, naming the expected spec; these checks add what a signature cannot say
(finite values, images in [0, 1]) and keep the shape message for callers of untyped functions.
The checks are plain TF ops, so they survive export and run without tf_iresnet installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf


def _shape_matches(x: tf.Tensor, pattern: str) -> tf.Tensor:
    # The runtime shape as text, matched against a regex: a signature's caller may feed another
    # rank than the placeholder's, and graph optimizations fold rank and static dimensions of
    # the placeholder, so numeric comparisons of the shape can fail instead of the assert.
    text = tf.strings.reduce_join(tf.strings.as_string(tf.shape(x)), separator=",")
    return tf.strings.regex_full_match(text, pattern)


def check_images(x: tf.Tensor, event_shape: Sequence[int], name: str = "images") -> tf.Tensor:
    """Asserts ``x`` is float32 ``[B, *event_shape]`` with finite values in [0, 1]."""
    shape_str = "[batch, " + ", ".join(str(d) for d in event_shape) + "]"
    message = f"{name} must have shape {shape_str} (float32, NHWC, values in [0, 1]); got shape"
    pattern = r"\d+" + "".join(f",{d}" for d in event_shape)
    shape_check = tf.debugging.Assert(_shape_matches(x, pattern), [message, tf.shape(x)])
    with tf.control_dependencies([shape_check]):
        flat = tf.reshape(x, [-1])  # any rank: the reductions below never fail on the rank
        checks = [
            tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(flat)),
                                [f"{name} must be finite (no NaN or Inf)."]),
            tf.debugging.Assert(
                tf.logical_and(tf.reduce_all(flat >= 0.0), tf.reduce_all(flat <= 1.0)),
                [f"{name} values must lie in [0, 1]; got min", tf.reduce_min(flat), "max",
                 tf.reduce_max(flat)]),
        ]
    with tf.control_dependencies([shape_check, *checks]):
        out = tf.identity(x)
    out.set_shape([None, *event_shape])
    return out


def check_vectors(z: tf.Tensor, dim: int, name: str = "z", bounded: bool = False) -> tf.Tensor:
    """Asserts ``z`` is float32 ``[B, dim]`` and finite (and in [0, 1] if ``bounded``)."""
    if bounded:
        return check_images(z, [dim], name)
    shape_check = tf.debugging.Assert(_shape_matches(z, rf"\d+,{dim}"), [
        f"{name} must have shape [batch, {dim}] (float32); got", tf.shape(z)])
    with tf.control_dependencies([shape_check]):
        finite_check = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(tf.reshape(z, [-1]))),
                                           [f"{name} must be finite (no NaN or Inf)."])
    with tf.control_dependencies([shape_check, finite_check]):
        out = tf.identity(z)
    out.set_shape([None, dim])
    return out


def map_nonempty(fn: Callable[[tf.Tensor], Any], x: tf.Tensor) -> Any:
    """``fn(x)`` that also serves an empty batch: for ``B = 0``, ``fn`` runs on one example of
    zeros and every output keeps its first 0 rows, so the result is empty with the right
    shape; for ``B > 0`` it is exactly ``fn(x)``. One trace of ``fn``.

    (Reshapes that infer ``-1``, ``batch_jacobian`` and some kernels fail on an empty batch.)
    """
    n = tf.shape(x)[0]
    filler = tf.zeros(tf.concat([[1], tf.shape(x)[1:]], 0), x.dtype)
    inputs = tf.cond(n > 0, lambda: x, lambda: filler)
    inputs.set_shape(x.shape)
    return tf.nest.map_structure(lambda t: t[:n], fn(inputs))
