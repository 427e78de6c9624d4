"""TensorBoard scalar and image summaries that work without the `tensorboard` package.

`tf.summary.scalar` and `tf.summary.image` are implemented by the `tensorboard` package and
raise `TBNotInstalledError` when it is absent, as in this project's environment. The writing
itself is core TensorFlow (`tf.summary.write`), so these functions write the same records
TensorBoard's own summaries do: the value plus `SummaryMetadata` naming the TensorBoard plugin
(`scalars`, `images`) that displays it. Event files stay readable by TensorBoard and by
`tf.compat.v1.train.summary_iterator`.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import summary_pb2

_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
).SerializeToString()

_IMAGE_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"),
    data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
).SerializeToString()


def scalar(name: str, value: float | tf.Tensor, step: int | tf.Tensor | None = None) -> bool:
    """Writes a float32 scalar to the default summary writer, like `tf.summary.scalar`.

    Returns False, writing nothing, when there is no default writer or it is disabled.
    """
    return bool(
        tf.summary.write(name, tf.cast(value, tf.float32), step=step, metadata=_SCALAR_METADATA)
    )


def image(name: str, images: tf.Tensor, step: int | tf.Tensor | None = None) -> bool:
    """Writes uint8 images [N, H, W, C] (C in {1, 3, 4}) as PNGs, like `tf.summary.image`.

    The record is TensorBoard's image format: a string vector [width, height, png_1, ...].
    Returns False, writing nothing, when there is no default writer or it is disabled.
    """
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8 or images.shape.rank != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}.")

    def encode() -> tf.Tensor:
        pngs = tf.map_fn(tf.io.encode_png, images, fn_output_signature=tf.string)
        shape = tf.shape(images)
        return tf.concat([tf.strings.as_string(tf.stack([shape[2], shape[1]])), pngs], axis=0)

    # A callable defers the encoding until the writer records it (skipped without a writer).
    return bool(tf.summary.write(name, encode, step=step, metadata=_IMAGE_METADATA))
