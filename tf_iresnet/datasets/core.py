"""Shared pieces of the data pipelines: the dataset description, bits/dim, split checks, batching.

Everything here is independent of where the examples come from (tfds, scikit-learn or a
generator); `images.py` and `toy2d.py` build on it and `registry.py` ties them together.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
import tensorflow as tf

__all__ = ["DatasetSpec", "bits_per_dim"]

IMAGE = "image"
VECTOR = "vector"

# Random streams derived from the user seed, so that the dequantization noise, the augmentation
# and the toy samplers never reuse each other's random numbers.
STREAM_AUGMENT = 1
STREAM_DEQUANTIZE = 2


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a dataset yields, for building models and reporting metrics without loading it.

    Attributes:
      name: the registry name passed to `load` (e.g. "cifar10", "8gaussians").
      modality: "image" (float32 NHWC in [0, 1]) or "vector" (float32 points in R^d).
      shape: the event shape of one example: (H, W, C) for images, (2,) for the toy sets.
      num_levels: gray levels per channel of the quantized source images (256 for 8-bit data,
        17 for scikit-learn's digits); None for continuous vector data.
      num_classes: number of label classes, or None when the set has no labels.
      train_split: split name to train on ("train").
      test_split: split name to report results on ("test").
      source: where examples come from: "tfds", "sklearn" or "generated".
      splits: every split name `load` accepts for this dataset.
    """

    name: str
    modality: str
    shape: tuple[int, ...]
    num_levels: int | None
    num_classes: int | None
    train_split: str
    test_split: str
    source: str
    splits: tuple[str, ...] = ("train", "test")

    @property
    def event_size(self) -> int:
        """D, the number of scalar dimensions of one example (H * W * C for images)."""
        return math.prod(self.shape)


def bits_per_dim(
    log_prob,
    spec_or_event_size: DatasetSpec | int | tuple[int, ...],
    num_levels: int | None = None,
):
    """Converts a log-density in nats into bits per dimension.

    For images scaled to x = v / L in [0, 1] (v the integer level, L the number of levels), a
    density p(x) on the unit cube corresponds to the discrete model P(v) ~= p(x) * L^-D over
    the integer grid, so

        bits/dim = -log P(v) / (D ln 2) = -log p(x) / (D ln 2) + log2(L).

    A uniform density on [0, 1]^D (log p = 0) therefore scores exactly log2(L), i.e. 8 bits/dim
    for 8-bit data. With uniform dequantization this is an upper bound on the discrete model's
    code length. For continuous vector data (num_levels None) there is no grid and the result is
    simply -log p(x) / (D ln 2).

    Args:
      log_prob: log p(x) in nats, a float or array/tensor of any shape (e.g. [B]).
      spec_or_event_size: a `DatasetSpec`, an event shape, or D as an int.
      num_levels: L. Defaults to the spec's `num_levels` when a spec is given; must then agree
        with it. None (with an int or shape) means continuous data.

    Returns:
      Bits per dimension with the shape and type of `log_prob` (a tensor stays a tensor).

    Raises:
      ValueError: if D or L is not a positive integer, or L disagrees with the spec.
    """
    if isinstance(spec_or_event_size, DatasetSpec):
        spec = spec_or_event_size
        if num_levels is None:
            num_levels = spec.num_levels
        elif num_levels != spec.num_levels:
            raise ValueError(
                f"num_levels={num_levels} disagrees with dataset {spec.name!r}, which has "
                f"num_levels={spec.num_levels}."
            )
        event_size = spec.event_size
    elif isinstance(spec_or_event_size, tuple | list):
        event_size = math.prod(int(d) for d in spec_or_event_size)
    else:
        event_size = spec_or_event_size
    if (
        isinstance(event_size, bool)
        or not isinstance(event_size, int | np.integer)
        or event_size <= 0
    ):
        raise ValueError(f"The event size D must be a positive integer, got {event_size!r}.")
    if num_levels is not None and (
        isinstance(num_levels, bool)
        or not isinstance(num_levels, int | np.integer)
        or num_levels < 1
    ):
        raise ValueError(f"num_levels must be a positive integer or None, got {num_levels!r}.")
    bits = -log_prob / (int(event_size) * math.log(2.0))
    if num_levels is not None:
        bits = bits + math.log2(int(num_levels))
    return bits


_SPLIT_TOKEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(\[[^\[\]]*\])?$")


def check_split(spec: DatasetSpec, split: str, *, allow_slicing: bool) -> None:
    """Raises ValueError unless `split` names splits of `spec`.

    With `allow_slicing` (tfds sources) the tfds split syntax is accepted on the known names,
    e.g. "train[:10%]" or "train+validation"; the slice itself is left to tfds.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}.")
    tokens = split.replace(" ", "").split("+") if allow_slicing else [split]
    for token in tokens:
        match = _SPLIT_TOKEN.match(token) if allow_slicing else None
        base = match.group(1) if match else token
        if base not in spec.splits:
            hint = " (optionally sliced, e.g. 'train[:10%]')" if allow_slicing else ""
            raise ValueError(
                f"Unknown split {split!r} for dataset {spec.name!r}; known splits: "
                f"{list(spec.splits)}{hint}."
            )


def check_batch_size(batch_size: int) -> None:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int | np.integer)
        or batch_size <= 0
    ):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def check_num_examples(num_examples: int | None) -> None:
    if num_examples is None:
        return
    if (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int | np.integer)
        or num_examples <= 0
    ):
        raise ValueError(f"num_examples must be a positive integer or None, got {num_examples!r}.")


def example_key(seed: int, stream: int, index: tf.Tensor) -> tf.Tensor:
    """A stateless RNG key (shape [2], int64) for element `index` of random stream `stream`."""
    base = tf.constant([seed, stream], dtype=tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def shuffled_pass(ds: tf.data.Dataset, buffer_size: int, seed: int,
                  epoch: tf.Tensor) -> tf.data.Dataset:
    """One pass over `ds` through a shuffle buffer seeded from `(seed, epoch)` alone.

    `Dataset.shuffle` cannot take this per-pass seed: with a tensor seed it fails when the
    global seed is 0 (TF compares the seed pair as Python values), and otherwise mixes in the
    global seed. The `ShuffleDataset` op takes both seeds explicitly.
    """
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    seeds = tf.random.stateless_uniform([2], seed=key, minval=0, maxval=2**62, dtype=tf.int64)
    flat = tf.nest.flatten(ds.element_spec)
    variant = tf.raw_ops.ShuffleDataset(
        input_dataset=tf.data.experimental.to_variant(ds),
        buffer_size=tf.constant(max(1, int(buffer_size)), tf.int64),
        seed=seeds[0], seed2=seeds[1], output_types=[s.dtype for s in flat],
        output_shapes=[s.shape for s in flat], reshuffle_each_iteration=False)
    return tf.data.experimental.from_variant(variant, ds.element_spec)


def batch_pipeline(
    ds: tf.data.Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    shuffle_buffer: int,
    repeat: bool,
    seed: int,
    drop_remainder: bool,
    per_example_fn: Callable | None = None,
    per_batch_fn: Callable | None = None,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Shuffle -> repeat -> per-example map -> batch -> per-batch map -> prefetch.

    The maps receive a stateless RNG key (from `example_key`) derived from `seed` and the
    element's position in the repeated stream, so the whole pipeline is a deterministic function
    of `seed` (given a deterministic source) while parallel map calls stay order-independent.

    Repeated streams are a pure function of `(seed, batch index)`: pass `e` over the data is
    shuffled by `shuffled_pass(..., seed, e)` (not with a shuffle state carried from pass to
    pass), so the stream can start at batch `start_batch` (a resumed run) by starting at its
    pass and skipping less than one pass of source examples; the keys of the maps are those
    of the uninterrupted stream.

    Args:
      ds: a finite dataset of unbatched examples.
      per_example_fn: optional `(key, example) -> example`, before batching (augmentation).
      per_batch_fn: optional `(key, batch) -> batch`, after batching (dequantization).
      start_batch: index of the first batch to yield (repeated streams only; default 0).
    """
    if start_batch < 0 or (start_batch and not repeat):
        raise ValueError(f"start_batch must be 0, or >= 0 with repeat=True; got {start_batch}.")
    first = int(start_batch) * int(batch_size)  # stream position of the first example
    if repeat:
        size = int(ds.cardinality())
        epoch0, offset = (divmod(first, size) if size > 0 else (0, first))

        def one_pass(epoch):
            return shuffled_pass(ds, shuffle_buffer, seed, epoch) if shuffle else ds

        ds = tf.data.Dataset.range(epoch0, tf.int64.max).flat_map(one_pass)
        if offset:
            ds = ds.skip(offset)
    elif shuffle:
        ds = ds.shuffle(max(1, shuffle_buffer), seed=seed)
    if per_example_fn is not None:
        ds = ds.enumerate(start=first).map(
            lambda i, ex: per_example_fn(example_key(seed, STREAM_AUGMENT, i), ex),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)
    if per_batch_fn is not None:
        ds = ds.enumerate(start=int(start_batch)).map(
            lambda j, batch: per_batch_fn(example_key(seed, STREAM_DEQUANTIZE, j), batch),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return ds.prefetch(tf.data.AUTOTUNE)
