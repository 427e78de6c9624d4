"""Export a density model as a SavedModel usable without tf_iresnet, Keras or TFP.

Endpoints (images: float32 NHWC in [0, 1]; vector models: float32 ``[B, D]``):

* ``log_prob(x) -> [B]``: log-density of the dequantized data in nats (evaluation estimator,
  deterministic: probes come from a fixed seed).
* ``bits_per_dim(x) -> [B]``: ``-log p(x) / (D ln 2) + log2(L)``.
* ``sample(n, seed) -> [n, *event]``: prior draw from a stateless seed, then the fixed-point
  inverse; the same seed gives the same samples. Images are clipped to [0, 1].
* ``encode(x) -> z [B, D]`` and ``decode(z) -> x``.

Before export the spectral-norm power iterations are converged, so the exported weights are
the ones whose Lipschitz constants were measured, and ``decode(encode(x))`` reconstructs x.
The normalized kernels ``W / max(1, sigma / c)`` are then folded into constants of the serving
graphs (`tf_iresnet.lipschitz.folded_spectral_norms`): the endpoints run no power iteration and
compute no sigma.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_iresnet.export.checks import check_images, check_vectors
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.lipschitz import converge_spectral_norms, folded_spectral_norms
from tf_iresnet.models.density import IResNetFlow


def sample_seed(seed) -> tf.Tensor:
    """The model seed of the export's ``sample(n, seed)``: ``model.sample(n, sample_seed(s),
    **EXPORT_INVERSE)`` gives the exported samples (before the clip to [0, 1] of images)."""
    return tf.stack([tf.cast(seed, tf.int32), tf.constant(0, tf.int32)])


# Tighter than the library default so that decode(encode(x)) is within 1e-4 of x.
EXPORT_INVERSE = dict(inverse=InverseConfig(atol=1e-6, rtol=1e-6, max_iter=500))
_EVAL_SEED = (20190609, 1)


def export_density_model(model: IResNetFlow, export_dir: str, *, converge: bool = True) -> str:
    """Writes the SavedModel to ``export_dir`` and returns the path."""
    if converge:
        converge_spectral_norms(model)
    cfg = model.config
    shape = list(cfg.input_shape)
    is_image = cfg.architecture == "conv"
    dim = cfg.event_size

    def check_x(x):
        return check_images(x, shape) if is_image else check_vectors(x, dim, "x")

    def log_prob_fn(x):
        x = check_x(x)
        return model.distribution(mode="eval", seed=_EVAL_SEED).log_prob(x)

    def bits_fn(x):
        return model.bits_per_dim(log_prob_fn(x))

    def encode_fn(x):
        return model.encode(check_x(x))

    def decode_fn(z):
        return model.decode(check_vectors(z, dim, "z"), **EXPORT_INVERSE)

    def sample_fn(n, seed):
        tf.debugging.assert_positive(n, message="n (number of samples) must be >= 1")
        x = model.sample(n, seed=sample_seed(seed), **EXPORT_INVERSE)
        return tf.clip_by_value(x, 0.0, 1.0) if is_image else x

    x_spec = tf.TensorSpec([None] * (len(shape) + 1), tf.float32, name="x")
    z_spec = tf.TensorSpec([None, None], tf.float32, name="z")
    archive = keras.export.ExportArchive()
    archive.track(model)
    # Normalized kernels folded into constants: no power iteration or sigma when serving.
    with folded_spectral_norms(model):
        archive.add_endpoint("log_prob", tf.function(log_prob_fn), input_signature=[x_spec])
        archive.add_endpoint("bits_per_dim", tf.function(bits_fn), input_signature=[x_spec])
        archive.add_endpoint("encode", tf.function(encode_fn), input_signature=[x_spec])
        archive.add_endpoint("decode", tf.function(decode_fn), input_signature=[z_spec])
        archive.add_endpoint(
            "sample", tf.function(sample_fn),
            input_signature=[tf.TensorSpec([], tf.int32, name="n"),
                             tf.TensorSpec([], tf.int32, name="seed")])
        archive.write_out(export_dir, verbose=False)
    return export_dir
