"""In-graph input checks for exported endpoints: errors that say what was expected.

Exported signatures accept ``[None, None, None, None]`` float32 so that a wrong image size
reaches these checks (and their messages) instead of TF's generic signature-mismatch error.
The checks are plain TF ops, so they survive export and run without tf_iresnet installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def check_images(x: tf.Tensor, event_shape: Sequence[int], name: str = "images") -> tf.Tensor:
    """Asserts ``x`` is float32 ``[B, *event_shape]`` with finite values in [0, 1]."""
    shape_str = "[batch, " + ", ".join(str(d) for d in event_shape) + "]"
    expected = tf.constant(list(event_shape), tf.int32)
    rank_ok = tf.equal(tf.rank(x), len(event_shape) + 1)
    checks = [
        tf.debugging.Assert(
            rank_ok,
            [f"{name} must have shape {shape_str} (float32, NHWC, values in [0, 1]); got shape",
             tf.shape(x)]),
    ]
    with tf.control_dependencies(checks):
        dims = tf.cond(rank_ok, lambda: tf.shape(x)[1:], lambda: expected)
        checks.append(tf.debugging.Assert(
            tf.reduce_all(tf.equal(dims, expected)),
            [f"{name} must have shape {shape_str} (float32, NHWC, values in [0, 1]); got shape",
             tf.shape(x)]))
        checks.append(tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(x)), [f"{name} must be finite (no NaN or Inf)."]))
        checks.append(tf.debugging.Assert(
            tf.logical_and(tf.reduce_all(x >= 0.0), tf.reduce_all(x <= 1.0)),
            [f"{name} values must lie in [0, 1]; got min", tf.reduce_min(x), "max",
             tf.reduce_max(x)]))
    with tf.control_dependencies(checks):
        out = tf.identity(x)
    out.set_shape([None, *event_shape])
    return out


def check_vectors(z: tf.Tensor, dim: int, name: str = "z", bounded: bool = False) -> tf.Tensor:
    """Asserts ``z`` is float32 ``[B, dim]`` and finite (and in [0, 1] if ``bounded``)."""
    if bounded:
        return check_images(z, [dim], name)
    shape_ok = tf.logical_and(tf.equal(tf.rank(z), 2),
                              tf.equal(tf.shape(z)[-1], dim))
    checks = [
        tf.debugging.Assert(shape_ok, [f"{name} must have shape [batch, {dim}] (float32); got",
                                       tf.shape(z)]),
        tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(z)),
                            [f"{name} must be finite (no NaN or Inf)."]),
    ]
    with tf.control_dependencies(checks):
        out = tf.identity(z)
    out.set_shape([None, dim])
    return out
