"""Two-dimensional toy densities, sampled on the fly with TensorFlow's stateless RNG.

Each sampler is a pure function `(n, key) -> [n, 2] float32` of a stateless key (int64 [2]),
so a batch is reproducible from `(seed, batch_index)` alone: the training stream is
`Dataset.counter().map(lambda i: sampler(batch_size, key=(seed, i)))`, which needs no Python
generator, no state and runs in parallel. All sets live roughly in [-4, 4]^2.

| name        | picture                                                            |
|-------------|--------------------------------------------------------------------|
| checkerboard| uniform on the 8 "black" squares of a 4x4 board of side-2 squares |
| moons       | two interleaved noisy half circles                                 |
| circles     | two noisy concentric rings, radii 1.5 and 3                        |
| 8gaussians  | 8 Gaussians (std 0.35) on a circle of radius 2*sqrt(2)             |
| pinwheel    | 5 curved arms of Gaussian blobs                                    |
| 2spirals    | two interleaved Archimedean spirals                                |
| swissroll   | a 2-D swiss roll (spiral with growing radius)                      |

Splits: "train" is an infinite i.i.d. stream (finite only with `num_examples`), "test" a fixed
sample of `TOY_TEST_SIZE` points drawn from a fixed key that no training seed can produce.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tf_iresnet.datasets import core

__all__ = ["TOY_TEST_SIZE", "TOY_NAMES", "sample_toy2d"]

TOY_TEST_SIZE = 10_000
# The test sample uses key (TOY_TEST_SEED, -2); training batches use (seed, i >= 0) and
# `sample_toy2d` uses (seed, -1), so the test points never coincide with training draws.
TOY_TEST_SEED = 20190517
_TEST_STREAM = -2
_SAMPLE_STREAM = -1

Sampler = Callable[[int, tf.Tensor], tf.Tensor]


def _keys(key: tf.Tensor, num: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(key, num))


def _uniform(key: tf.Tensor, shape, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=key, minval=low, maxval=high)


def _normal(key: tf.Tensor, shape, stddev: float = 1.0) -> tf.Tensor:
    return tf.random.stateless_normal(shape, seed=key, stddev=stddev)


def _integers(key: tf.Tensor, n, high: int) -> tf.Tensor:
    """n integers uniform in {0, ..., high - 1}, int32."""
    return tf.random.stateless_uniform([n], seed=key, minval=0, maxval=high, dtype=tf.int32)


def _polar(radius: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
    return tf.stack([radius * tf.cos(angle), radius * tf.sin(angle)], axis=-1)


def _checkerboard(n, key):
    k_col, k_row, k_off = _keys(key, 3)
    col = _integers(k_col, n, 4)
    # Same parity for row and column: the occupied squares are those with (row + col) even.
    row = 2 * _integers(k_row, n, 2) + col % 2
    cell = tf.cast(tf.stack([col, row], axis=-1), tf.float32)
    return -4.0 + 2.0 * (cell + _uniform(k_off, [n, 2]))


def _moons(n, key):
    k_which, k_t, k_noise = _keys(key, 3)
    lower = _uniform(k_which, [n]) < 0.5
    t = _uniform(k_t, [n], 0.0, math.pi)
    upper_arc = tf.stack([tf.cos(t), tf.sin(t)], axis=-1)
    lower_arc = tf.stack([1.0 - tf.cos(t), 0.5 - tf.sin(t)], axis=-1)
    points = tf.where(lower[:, None], lower_arc, upper_arc) + _normal(k_noise, [n, 2], 0.1)
    # The unit-scale moons span x in [-1, 2], y in [-0.5, 1]: centre, then stretch to ~[-4, 4].
    return 2.5 * (points - tf.constant([0.5, 0.25]))


def _circles(n, key):
    k_ring, k_angle, k_noise = _keys(key, 3)
    radius = tf.where(_uniform(k_ring, [n]) < 0.5, 1.5, 3.0)
    points = _polar(radius, _uniform(k_angle, [n], 0.0, 2.0 * math.pi))
    return points + _normal(k_noise, [n, 2], 0.2)


def _eight_gaussians(n, key):
    k_comp, k_noise = _keys(key, 2)
    angle = tf.cast(_integers(k_comp, n, 8), tf.float32) * (math.pi / 4.0)
    centres = _polar(tf.fill([n], 2.0 * math.sqrt(2.0)), angle)
    return centres + _normal(k_noise, [n, 2], 0.35)


def _pinwheel(n, key, arms: int = 5, radial_std: float = 0.3, tangential_std: float = 0.1):
    k_arm, k_radial, k_tangential = _keys(key, 3)
    radial = 1.0 + _normal(k_radial, [n], radial_std)
    tangential = _normal(k_tangential, [n], tangential_std)
    # Each arm is a blob on the x axis, rotated by its arm angle plus a twist growing with radius.
    arm = tf.cast(_integers(k_arm, n, arms), tf.float32)
    angle = arm * (2.0 * math.pi / arms) + 0.25 * tf.exp(radial)
    cos, sin = tf.cos(angle), tf.sin(angle)
    points = tf.stack([radial * cos - tangential * sin, radial * sin + tangential * cos], axis=-1)
    return 2.0 * points


def _two_spirals(n, key):
    k_t, k_arm, k_noise = _keys(key, 3)
    # sqrt makes the density along the spiral roughly uniform in arc length; 1.5 turns.
    t = tf.sqrt(_uniform(k_t, [n])) * (3.0 * math.pi)
    sign = tf.where(_uniform(k_arm, [n]) < 0.5, -1.0, 1.0)
    points = sign[:, None] * tf.stack([-t * tf.cos(t), t * tf.sin(t)], axis=-1) / 3.0
    return points + _normal(k_noise, [n, 2], 0.1)


def _swissroll(n, key):
    k_t, k_noise = _keys(key, 2)
    t = 1.5 * math.pi * (1.0 + 2.0 * _uniform(k_t, [n]))
    return _polar(t, t) / 5.0 + _normal(k_noise, [n, 2], 0.2)


_SAMPLERS: dict[str, Sampler] = {
    "checkerboard": _checkerboard,
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
    "swissroll": _swissroll,
}

TOY_NAMES: tuple[str, ...] = tuple(_SAMPLERS)

SPECS: dict[str, core.DatasetSpec] = {
    name: core.DatasetSpec(
        name=name,
        modality=core.VECTOR,
        shape=(2,),
        num_levels=None,
        num_classes=None,
        train_split="train",
        test_split="test",
        source="generated",
    )
    for name in TOY_NAMES
}


def _sampler(name: str) -> Sampler:
    if name not in _SAMPLERS:
        raise ValueError(f"Unknown toy dataset {name!r}; known: {list(TOY_NAMES)}.")
    return _SAMPLERS[name]


def _draw(name: str, n: int, seed: int, stream: int) -> tf.Tensor:
    key = tf.constant([seed, stream], dtype=tf.int64)
    return tf.ensure_shape(_sampler(name)(n, key), [n, 2])


def sample_toy2d(name: str, n: int, seed: int = 0) -> np.ndarray:
    """Draws `n` points of toy set `name`, for plots and tests.

    Args:
      name: one of `TOY_NAMES`.
      n: number of points (positive).
      seed: integer seed; the same (name, n, seed) always gives the same points.

    Returns:
      float32 array of shape [n, 2].
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    return _draw(name, int(n), seed, _SAMPLE_STREAM).numpy()


def load_toy(
    spec: core.DatasetSpec,
    split: str,
    *,
    batch_size: int,
    shuffle: bool,
    repeat: bool,
    seed: int,
    drop_remainder: bool,
    num_examples: int | None,
    start_step: int = 0,
) -> tf.data.Dataset:
    """The pipeline behind `load` for the toy sets; yields float32 [batch_size, 2]."""
    sampler = _sampler(spec.name)
    if split == spec.train_split and num_examples is None:
        if not repeat:
            raise ValueError(
                f"The 'train' split of {spec.name!r} is an infinite stream; repeat=False needs "
                "num_examples to define a finite set."
            )

        def batch_at(i):
            key = tf.stack([tf.constant(seed, tf.int64), i])
            return tf.ensure_shape(sampler(batch_size, key), [batch_size, 2])

        ds = tf.data.Dataset.counter(start=start_step)
        ds = ds.map(batch_at, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    if split == spec.train_split:
        points = _draw(spec.name, num_examples, seed, _SAMPLE_STREAM)
    else:
        points = _draw(spec.name, TOY_TEST_SIZE, TOY_TEST_SEED, _TEST_STREAM)
        if num_examples is not None:
            points = points[:num_examples]
    ds = tf.data.Dataset.from_tensor_slices(points)
    return core.batch_pipeline(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_buffer=int(points.shape[0]),
        repeat=repeat,
        seed=seed,
        drop_remainder=drop_remainder,
        start_batch=start_step,
    )
