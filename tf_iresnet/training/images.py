"""Image grids for samples and reconstructions: PNG files and TensorBoard image summaries.

Pure TensorFlow (`tf.io.encode_png`), no plotting library, so it works on any filesystem
`tf.io.gfile` knows and inside headless training jobs.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from tf_iresnet.training.config import atomic_write


def make_image_grid(
    images: tf.Tensor | np.ndarray,
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 1.0,
) -> tf.Tensor:
    """Tiles a batch of images into one uint8 image.

    Args:
      images: float tensor [N, H, W, C] with values in [0, 1] (clipped), C in {1, 3, 4}.
      nrow: images per row of the grid; the grid has ceil(N / nrow) rows.
      padding: pixels of `pad_value` around and between images.
      pad_value: border intensity in [0, 1]. Default 1 (white).

    Returns:
      uint8 tensor [rows * (H + padding) + padding, nrow * (W + padding) + padding, C]; empty
      cells (when N is not a multiple of `nrow`) are filled with `pad_value`.

    Raises:
      ValueError: for a tensor that is not rank 4, has 0 images, a channel count PNG cannot
        store, or `nrow < 1`.
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"images must have shape [N, H, W, C], got {images.shape}.")
    n, h, w, c = images.shape
    if not n:
        raise ValueError("images holds no image.")
    if c not in (1, 3, 4):
        raise ValueError(f"PNG needs 1, 3 or 4 channels, got {c}.")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}.")
    images = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 1.0)
    cols = min(nrow, n)
    rows = -(-n // cols)
    fill = tf.fill([rows * cols - n, h, w, c], tf.constant(pad_value, tf.float32))
    images = tf.concat([images, fill], axis=0)
    p = padding
    images = tf.pad(images, [[0, 0], [p, 0], [p, 0], [0, 0]], constant_values=pad_value)
    grid = tf.reshape(images, [rows, cols, h + p, w + p, c])
    grid = tf.transpose(grid, [0, 2, 1, 3, 4])
    grid = tf.reshape(grid, [rows * (h + p), cols * (w + p), c])
    grid = tf.pad(grid, [[0, p], [0, p], [0, 0]], constant_values=pad_value)
    return tf.cast(tf.round(grid * 255.0), tf.uint8)


def save_image_grid(
    images: tf.Tensor | np.ndarray, path: str, nrow: int = 8, padding: int = 2
) -> str:
    """Writes `images` ([N, H, W, C] floats in [0, 1]) as one PNG grid to `path`.

    Parent directories are created. See `make_image_grid` for the layout. Returns `path`.
    """
    grid = make_image_grid(images, nrow=nrow, padding=padding)
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    atomic_write(path, tf.io.encode_png(grid).numpy())
    return path


def image_summary(
    name: str,
    images: tf.Tensor | np.ndarray,
    step: int | tf.Tensor,
    nrow: int = 8,
    max_images: int = 64,
) -> bool:
    """Logs the first `max_images` of `images` ([N, H, W, C] in [0, 1]) as one grid image.

    Writes with `tf.summary.image` to the default writer (set one with `writer.as_default()`);
    returns False, writing nothing, when there is none (e.g. on non-chief workers).
    """
    images = tf.convert_to_tensor(images)[:max_images]
    grid = make_image_grid(images, nrow=nrow)
    return bool(tf.summary.image(name, grid[tf.newaxis], step=step))
