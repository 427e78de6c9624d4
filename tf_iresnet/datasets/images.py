"""Image datasets: scikit-learn's 8x8 digits (offline) and the TFDS image sets.

Every image pipeline yields float32 NHWC batches in [0, 1]:

- `dequantize=True` (density training): uniform dequantization x = (v + u) / L with v the
  integer level in {0, ..., L-1} and u ~ U[0, 1) drawn per pixel from a stateless RNG keyed on
  (seed, batch index). u is kept 2^-16 away from 0 and 1, so floor(x * L) == v holds exactly in
  float32; the clipped mass (~3e-5 per pixel) is immaterial for bits/dim.
- `dequantize=False` (evaluation, classification): the bin centre x = (v + 0.5) / L.

Augmentation (`augment=True`, for classifiers only; density models must see the data
distribution as is): a random 32x32 crop of the image zero-padded by 4 pixels on each side, plus
a random horizontal flip for cifar10/cifar100. svhn_cropped gets the crop but no flip (digits
are not mirror-symmetric). digits, mnist, fashion_mnist and celeb_a are never augmented.

celeb_a is downscaled as is usual for flows: the central `CELEB_A_CROP` x `CELEB_A_CROP` square
of the 218x178 photo, resized (bilinear, antialiased) to `CELEB_A_SIZE` (32; 64 for the
`celeb_a_64` variant) and rounded back to uint8, so it stays a 256-level dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

from tf_iresnet.datasets import core

__all__ = ["CELEB_A_CROP", "CELEB_A_SIZE", "DIGITS_NUM_TRAIN", "DIGITS_SPLIT_SEED"]

# scikit-learn's digits: 1797 images, 8x8, levels 0..16. A fixed permutation, then the first
# DIGITS_NUM_TRAIN images are "train" and the remaining 297 are "test".
DIGITS_SPLIT_SEED = 0
DIGITS_NUM_TRAIN = 1500
DIGITS_LEVELS = 17

CELEB_A_CROP = 148
CELEB_A_SIZE = 32

# Shuffle buffer for the tfds sets (examples, uint8); the digits are shuffled as a whole.
TFDS_SHUFFLE_BUFFER = 10_000

_NO_AUGMENT = "none"
_CROP = "crop"
_CROP_FLIP = "crop_flip"


@dataclasses.dataclass(frozen=True)
class _Source:
    """How to read one image dataset (private companion of its `DatasetSpec`)."""

    tfds_name: str | None = None
    augmentation: str = _NO_AUGMENT
    resize_to: int | None = None  # centre crop + resize (celeb_a)
    cache: bool = True  # keep decoded uint8 examples in memory after the first epoch


def _spec(name, shape, num_levels, num_classes, source, splits=("train", "test")):
    return core.DatasetSpec(
        name=name,
        modality=core.IMAGE,
        shape=shape,
        num_levels=num_levels,
        num_classes=num_classes,
        train_split="train",
        test_split="test",
        source=source,
        splits=splits,
    )


SPECS: dict[str, core.DatasetSpec] = {
    "digits": _spec("digits", (8, 8, 1), DIGITS_LEVELS, 10, "sklearn"),
    "mnist": _spec("mnist", (28, 28, 1), 256, 10, "tfds"),
    "fashion_mnist": _spec("fashion_mnist", (28, 28, 1), 256, 10, "tfds"),
    "cifar10": _spec("cifar10", (32, 32, 3), 256, 10, "tfds"),
    "cifar100": _spec("cifar100", (32, 32, 3), 256, 100, "tfds"),
    "svhn_cropped": _spec(
        "svhn_cropped", (32, 32, 3), 256, 10, "tfds", splits=("train", "test", "extra")
    ),
    "celeb_a": _spec(
        "celeb_a",
        (CELEB_A_SIZE, CELEB_A_SIZE, 3),
        256,
        None,
        "tfds",
        splits=("train", "validation", "test"),
    ),
    "celeb_a_64": _spec(
        "celeb_a_64", (64, 64, 3), 256, None, "tfds", splits=("train", "validation", "test")
    ),
}

_SOURCES: dict[str, _Source] = {
    "digits": _Source(),
    "mnist": _Source("mnist"),
    "fashion_mnist": _Source("fashion_mnist"),
    "cifar10": _Source("cifar10", augmentation=_CROP_FLIP),
    "cifar100": _Source("cifar100", augmentation=_CROP_FLIP),
    "svhn_cropped": _Source("svhn_cropped", augmentation=_CROP),
    # 162,770 training faces: too many to cache decoded in memory.
    "celeb_a": _Source("celeb_a", resize_to=CELEB_A_SIZE, cache=False),
    "celeb_a_64": _Source("celeb_a", resize_to=64, cache=False),
}


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits in the fixed split order: uint8 [1797, 8, 8, 1] levels 0..16, int32 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(bunch.target))
    images = bunch.images[order].astype(np.uint8)[..., None]
    labels = bunch.target[order].astype(np.int32)
    return images, labels


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed digits split: (uint8 [N, 8, 8, 1] in 0..16, int32 [N]); N = 1500 or 297."""
    images, labels = _digits_arrays()
    part = slice(None, DIGITS_NUM_TRAIN) if split == "train" else slice(DIGITS_NUM_TRAIN, None)
    return images[part], labels[part]


def centre_crop_resize(image: tf.Tensor, crop: int, size: int) -> tf.Tensor:
    """uint8 [H, W, C] -> uint8 [size, size, C]: central crop x crop square, resized, rounded."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    top = (height - crop) // 2
    left = (width - crop) // 2
    square = tf.image.crop_to_bounding_box(image, top, left, crop, crop)
    resized = tf.image.resize(
        tf.cast(square, tf.float32), [size, size], method="bilinear", antialias=True
    )
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def uniform_dequantize(key: tf.Tensor, images: tf.Tensor, num_levels: int) -> tf.Tensor:
    """Integer levels v in [0, L) (any int dtype) -> float32 (v + u) / L, u ~ U[0, 1) per pixel."""
    v = tf.cast(images, tf.float32)
    eps = 2.0**-16
    u = tf.random.stateless_uniform(tf.shape(v), seed=key, minval=eps, maxval=1.0 - eps)
    return (v + u) / float(num_levels)


def bin_centres(images: tf.Tensor, num_levels: int) -> tf.Tensor:
    """Integer levels v -> float32 (v + 0.5) / L, the deterministic counterpart of dequantization."""
    return (tf.cast(images, tf.float32) + 0.5) / float(num_levels)


def _augment_fn(augmentation: str, shape: tuple[int, ...]):
    """(key, uint8 [H, W, C]) -> uint8 [H, W, C]: pad-4 random crop, optionally a random flip."""

    def augment(key, image):
        crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
        image = tf.image.stateless_random_crop(padded, shape, seed=crop_key)
        if augmentation == _CROP_FLIP:
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
        return image

    return augment


class DataNotFoundError(ValueError):
    """A tfds dataset that is not prepared in the data directory (nothing is downloaded)."""


def tfds_data_dir(data_dir: str | None) -> str:
    """The directory tfds reads: ``data_dir``, else ``$TFDS_DATA_DIR``, else
    ``~/tensorflow_datasets``."""
    if data_dir:
        return data_dir
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                           "tensorflow_datasets")


def open_tfds(spec: core.DatasetSpec, source: _Source | None = None, split: str = "train", *,
              data_dir: str | None = None, **load_kwargs) -> tf.data.Dataset:
    """``tfds.load(..., download=False)``: the split's dataset, lazily, without ever trying
    the network (no download retries, no wait on an offline machine).

    Raises:
      DataNotFoundError: the dataset is not prepared under the data directory; the message
        says where tfds looked and how to prepare it.
    """
    import tensorflow_datasets as tfds  # slow import, only when a tfds set is used

    source = source or _SOURCES[spec.name]
    try:
        return tfds.load(source.tfds_name, split=split, data_dir=data_dir or None,
                         download=False, **load_kwargs)
    except (AssertionError, tfds.core.DatasetNotFoundError, FileNotFoundError):
        where = tfds_data_dir(data_dir)
        name = source.tfds_name
        raise DataNotFoundError(
            f"Dataset {spec.name!r} (tfds {name!r}) is not prepared in {where} and is never "
            f"downloaded during a run. Prepare it once with "
            f"`tfds build {name} --data_dir={where}` (needs internet; offline: run that on a "
            f"machine online, or with --manual_dir for manually downloaded files, and copy "
            f"{os.path.join(where, name)} here), or point --data_dir (or $TFDS_DATA_DIR) at a "
            f"directory that holds {name}/<version>/.") from None


def _tfds_source(
    spec: core.DatasetSpec,
    source: _Source,
    split: str,
    *,
    data_dir: str | None,
    shuffle_files: bool,
    seed: int,
    with_labels: bool,
) -> tf.data.Dataset:
    """Reads a split through `tfds.load`; yields uint8 images (and int32 labels).

    Never downloads: see `open_tfds` (a missing dataset raises `DataNotFoundError`).
    """
    import tensorflow_datasets as tfds  # slow import, only when a tfds set is used

    # The file order must not depend on how many passes an iterator made before (a resumed run
    # starts a fresh one): the same order on every pass; `core.batch_pipeline` reshuffles.
    read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False,
                                  try_autocache=False)
    ds = open_tfds(spec, source, split, data_dir=data_dir, shuffle_files=shuffle_files,
                   read_config=read_config)

    def select(example):
        image = example["image"]
        if source.resize_to is not None:
            image = centre_crop_resize(image, CELEB_A_CROP, source.resize_to)
        image = tf.ensure_shape(image, spec.shape)
        if with_labels:
            return image, tf.cast(example["label"], tf.int32)
        return image

    return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)


def load_images(
    spec: core.DatasetSpec,
    split: str,
    *,
    batch_size: int,
    shuffle: bool,
    repeat: bool,
    dequantize: bool,
    augment: bool,
    with_labels: bool,
    seed: int,
    data_dir: str | None,
    drop_remainder: bool,
    num_examples: int | None,
    start_step: int = 0,
) -> tf.data.Dataset:
    """The pipeline behind `load` for image sets: float32 [B, H, W, C] in [0, 1] (, int32 [B])."""
    source = _SOURCES[spec.name]
    if spec.source == "sklearn":
        images, labels = digits_split(split)
        if num_examples is not None:
            images, labels = images[:num_examples], labels[:num_examples]
        ds = tf.data.Dataset.from_tensor_slices((images, labels) if with_labels else images)
        shuffle_buffer = len(images)
    else:
        ds = _tfds_source(
            spec,
            source,
            split,
            data_dir=data_dir,
            # With num_examples the subset must not change between epochs: read files in order.
            shuffle_files=shuffle and num_examples is None,
            seed=seed,
            with_labels=with_labels,
        )
        if num_examples is not None:
            ds = ds.take(num_examples)
        if source.cache and "extra" not in split:
            ds = ds.cache()
        shuffle_buffer = (
            TFDS_SHUFFLE_BUFFER if num_examples is None else min(num_examples, TFDS_SHUFFLE_BUFFER)
        )

    augment_image = None
    if augment and source.augmentation != _NO_AUGMENT:
        augment_image = _augment_fn(source.augmentation, spec.shape)

    def augment_example(key, example):
        if with_labels:
            return augment_image(key, example[0]), example[1]
        return augment_image(key, example)

    num_levels = spec.num_levels

    def to_unit_interval(key, batch):
        images = batch[0] if with_labels else batch
        if dequantize:
            x = uniform_dequantize(key, images, num_levels)
        else:
            x = bin_centres(images, num_levels)
        return (x, batch[1]) if with_labels else x

    return core.batch_pipeline(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        repeat=repeat,
        seed=seed,
        drop_remainder=drop_remainder,
        per_example_fn=augment_example if augment_image is not None else None,
        per_batch_fn=to_unit_interval,
        start_batch=start_step,
    )
