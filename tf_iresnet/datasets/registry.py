"""The dataset registry: `names`, `spec` and `load`, one entry point for every pipeline."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_iresnet.datasets import core, images, toy2d

__all__ = ["DataNotFoundError", "check_available", "load", "names", "num_examples", "spec"]

DataNotFoundError = images.DataNotFoundError

# Published split sizes (used to turn --epochs into steps without touching the data).
_SPLIT_SIZES = {
    "digits": {"train": images.DIGITS_NUM_TRAIN, "test": 1797 - images.DIGITS_NUM_TRAIN},
    "mnist": {"train": 60_000, "test": 10_000},
    "fashion_mnist": {"train": 60_000, "test": 10_000},
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
    "svhn_cropped": {"train": 73_257, "test": 26_032, "extra": 531_131},
    "celeb_a": {"train": 162_770, "validation": 19_867, "test": 19_962},
    "celeb_a_64": {"train": 162_770, "validation": 19_867, "test": 19_962},
}

_SPECS: dict[str, core.DatasetSpec] = {**images.SPECS, **toy2d.SPECS}


def names() -> list[str]:
    """Every dataset name `load` accepts: the image sets first, then the toy 2-D sets."""
    return list(_SPECS)


def spec(name: str) -> core.DatasetSpec:
    """The `DatasetSpec` of dataset `name`, without loading anything.

    Raises:
      ValueError: for an unknown name (the message lists the known ones).
    """
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown dataset {name!r}; known datasets: {names()}.") from None


def num_examples(name: str, split: str = "train") -> int:
    """Examples in a split of an image dataset (the toy sets are infinite streams).

    Raises:
      ValueError: for an unknown dataset or split, or a toy 2-D set ("train" is unbounded).
    """
    spec(name)
    if name not in _SPLIT_SIZES:
        raise ValueError(
            f"{name!r} is an infinite generated stream; it has no epochs (give a step count).")
    sizes = _SPLIT_SIZES[name]
    if split not in sizes:
        raise ValueError(f"Unknown split {split!r} of {name!r}; splits: {sorted(sizes)}.")
    return sizes[split]


def check_available(name: str, splits: tuple[str, ...] = ("train", "test"), *,
                    data_dir: str | None = None) -> None:
    """Checks, without reading or downloading anything, that ``load`` can read ``splits``.

    Generated and bundled sets (the toy 2-D sets, digits) are always available; a tfds set must
    be prepared in ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``):
    `load` never downloads.

    Raises:
      ValueError: an unknown dataset or split.
      DataNotFoundError: a tfds set that is not prepared; the message says where tfds looked,
        how to prepare the data (offline too) and how to point ``--data_dir`` at it.
    """
    ds_spec = spec(name)
    for split in splits:
        core.check_split(ds_spec, split, allow_slicing=ds_spec.source == "tfds")
        if ds_spec.source == "tfds":
            images.open_tfds(ds_spec, split=split, data_dir=data_dir)


def load(
    name: str,
    split: str = "train",
    *,
    batch_size: int,
    shuffle: bool = True,
    repeat: bool = True,
    dequantize: bool = True,
    augment: bool = False,
    with_labels: bool = False,
    seed: int = 0,
    data_dir: str | None = None,
    drop_remainder: bool = True,
    num_examples: int | None = None,
    start_step: int = 0,
) -> tf.data.Dataset:
    """Builds a batched, prefetched `tf.data` pipeline for dataset `name`.

    Images come out as float32 [B, H, W, C] in [0, 1] (see `tf_iresnet.datasets.images` for
    dequantization and augmentation); the toy sets as float32 [B, 2] (see `toy2d`). The output
    is a deterministic function of `seed` (shuffle order, dequantization noise, augmentation,
    toy samples), given a deterministic source.

    Args:
      name: a name from `names()`.
      split: "train" or "test" (celeb_a also "validation", svhn_cropped also "extra"); the tfds
        sets accept tfds slicing on those names, e.g. "train[:5000]".
      batch_size: examples per batch (positive).
      shuffle: shuffle examples (and tfds files) with `seed`. No effect on the toy "train"
        stream, which is i.i.d. anyway.
      repeat: loop forever. The toy "train" split is an infinite stream and requires it unless
        `num_examples` makes it a finite sample.
      dequantize: images only: uniform dequantization (v + u) / L if True, bin centres
        (v + 0.5) / L if False. Ignored for vectors.
      augment: classification only (requires `with_labels`): pad-4 random crop (+ horizontal
        flip for cifar10/cifar100; crop only for svhn_cropped; no-op for the other image sets).
        Never augment data for density estimation.
      with_labels: yield (x, label) with int32 labels [B] instead of x.
      seed: integer seed of every random choice in the pipeline.
      data_dir: tfds data directory (None: the tfds default). Nothing is downloaded: a tfds
        set must be prepared there (`check_available`).
      drop_remainder: drop a last, smaller batch.
      num_examples: use only the first `num_examples` examples of the split (for quick tests
        and evaluation); for the toy "train" split, a fixed sample of that many points.
      start_step: index of the first batch (repeated streams only): batch `k` of
        `load(..., start_step=s)` is batch `s + k` of `load(...)`, bit for bit, so a resumed
        run sees the batches of the uninterrupted one. A pass over a finite set is shuffled
        from `(seed, pass)` alone, and starting costs at most one pass of reading.

    Returns:
      A `tf.data.Dataset` of x or (x, label) batches.

    Raises:
      ValueError: unknown dataset or split, batch_size <= 0, num_examples <= 0, augment on a
        vector dataset or without labels, with_labels on an unlabeled dataset, a finite pass
        (repeat=False) over an infinite toy stream, start_step < 0 or without repeat.
      DataNotFoundError: a tfds set that is not prepared in the data directory.
    """
    ds_spec = spec(name)
    core.check_split(ds_spec, split, allow_slicing=ds_spec.source == "tfds")
    core.check_batch_size(batch_size)
    core.check_num_examples(num_examples)
    if with_labels and ds_spec.num_classes is None:
        raise ValueError(f"Dataset {name!r} has no labels; use with_labels=False.")
    if augment and ds_spec.modality != core.IMAGE:
        raise ValueError(f"augment=True is only defined for image datasets, not {name!r}.")
    if augment and not with_labels:
        raise ValueError(
            "augment=True is meant for classifiers (with_labels=True): a density model must be "
            "trained on the unaugmented data distribution."
        )
    if (isinstance(start_step, bool) or not isinstance(start_step, int | np.integer)
            or start_step < 0 or (start_step and not repeat)):
        raise ValueError(
            f"start_step must be a non-negative integer (and > 0 only with repeat=True), got "
            f"{start_step!r}.")
    batch_size = int(batch_size)
    if ds_spec.modality == core.VECTOR:
        return toy2d.load_toy(
            ds_spec,
            split,
            batch_size=batch_size,
            shuffle=shuffle,
            repeat=repeat,
            seed=seed,
            drop_remainder=drop_remainder,
            num_examples=num_examples,
            start_step=int(start_step),
        )
    return images.load_images(
        ds_spec,
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        repeat=repeat,
        dequantize=dequantize,
        augment=augment,
        with_labels=with_labels,
        seed=seed,
        data_dir=data_dir,
        drop_remainder=drop_remainder,
        num_examples=num_examples,
        start_step=int(start_step),
    )
