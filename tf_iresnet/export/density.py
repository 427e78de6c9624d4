"""Export a density model as a SavedModel usable without tf_iresnet, Keras or TFP.

Endpoints (images: float32 NHWC ``[B, H, W, C]`` of the model's size, values in [0, 1];
vector models: float32 ``[B, D]``). Every signature is fully typed (``saved_model_cli show
--all`` lists ``(-1, 8, 8, 1)`` for the digits models), so a serving user sees what to send and a
wrong shape fails with TF's binding error, which names the expected ``TensorSpec``:

* ``log_prob(x) -> [B]``: log-density of the dequantized data in nats (evaluation estimator,
  deterministic: probes come from a fixed seed).
* ``bits_per_dim(x) -> [B]``: ``-log p(x) / (D ln 2) + log2(L)``.
* ``sample(n, seed) -> [n, *event]``: prior draws from stateless seeds, then the fixed-point
  inverse, in chunks of `SAMPLE_CHUNK` samples (chunk ``i`` draws from the seed
  ``[seed, i]``), so memory stays bounded and the same seed gives the same samples. ``n`` must
  be in ``[1, MAX_SAMPLES]``. Images are clipped to [0, 1].
* ``encode(x) -> z [B, D]`` and ``decode(z) -> x``.

Empty batches (``B = 0``) give empty results. Values outside the domain (non-finite, images
outside [0, 1]) fail with a message saying what was expected (`tf_iresnet.export.checks`);
``decode`` and ``sample`` fail (``InvalidArgumentError`` naming the block) rather than return
an inverse that did not converge to `EXPORT_INVERSE`'s tolerance.

Before export the spectral-norm power iterations are converged, so the exported weights are
the ones whose Lipschitz constants were measured, and ``decode(encode(x))`` reconstructs x.
The normalized kernels ``W / max(1, sigma / c)`` are then folded into constants of the serving
graphs (`tf_iresnet.lipschitz.folded_spectral_norms`): the endpoints run no power iteration and
compute no sigma.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_iresnet.export.checks import check_images, check_vectors, map_nonempty
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.lipschitz import converge_spectral_norms, folded_spectral_norms
from tf_iresnet.models.density import IResNetFlow


def sample_seed(seed, chunk=0) -> tf.Tensor:
    """The model seed of chunk ``chunk`` of the export's ``sample(n, seed)``:
    ``model.sample(m, sample_seed(s, i), **EXPORT_INVERSE)`` gives the exported samples
    ``i * SAMPLE_CHUNK`` to ``i * SAMPLE_CHUNK + m - 1`` (before the clip to [0, 1] of images);
    for ``n <= SAMPLE_CHUNK``, ``model.sample(n, sample_seed(s), ...)`` gives them all."""
    return tf.stack([tf.cast(seed, tf.int32), tf.cast(chunk, tf.int32)])


# Samples per inverse pass of the export's ``sample`` (bounds its memory) and per call.
SAMPLE_CHUNK = 256
MAX_SAMPLES = 65536


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

    def log_prob(x):
        return model.distribution(mode="eval", seed=_EVAL_SEED).log_prob(x)

    def log_prob_fn(x):
        return map_nonempty(log_prob, check_x(x))

    def encode_fn(x):
        return map_nonempty(model.encode, check_x(x))

    def decode_fn(z):
        return map_nonempty(lambda t: model.decode(t, **EXPORT_INVERSE),
                            check_vectors(z, dim, "z"))

    def sample_fn(n, seed):
        with tf.control_dependencies([
                tf.debugging.assert_positive(n, message="n (number of samples) must be >= 1"),
                tf.debugging.assert_less_equal(
                    n, MAX_SAMPLES, message=f"n (number of samples) must be <= {MAX_SAMPLES} "
                    f"per call (call sample again with other seeds for more)")]):
            n = tf.identity(n)
        num_chunks = (n + SAMPLE_CHUNK - 1) // SAMPLE_CHUNK

        def chunk(i, samples):
            m = tf.minimum(SAMPLE_CHUNK, n - i * SAMPLE_CHUNK)
            x = model.sample(m, seed=sample_seed(seed, i), **EXPORT_INVERSE)
            return i + 1, samples.write(i, x)

        _, samples = tf.while_loop(
            lambda i, _: i < num_chunks, chunk,
            (tf.constant(0), tf.TensorArray(tf.float32, size=num_chunks,
                                            element_shape=[None, *shape], infer_shape=False)))
        x = samples.concat()
        x.set_shape([None, *shape])
        return tf.clip_by_value(x, 0.0, 1.0) if is_image else x

    x_spec = tf.TensorSpec([None, *shape], tf.float32, name="x")
    z_spec = tf.TensorSpec([None, dim], tf.float32, name="z")
    archive = keras.export.ExportArchive()
    archive.track(model)
    # Normalized kernels folded into constants: no power iteration or sigma when serving.
    # The endpoints are plain functions, which the archive traces without autograph (their
    # loops and conditions are explicit TF control flow); bits_per_dim calls the traced
    # log_prob instead of tracing the model's log-density a second time.
    with folded_spectral_norms(model):
        log_prob_endpoint = archive.add_endpoint("log_prob", log_prob_fn,
                                                 input_signature=[x_spec])

        def bits_fn(x):
            return model.bits_per_dim(log_prob_endpoint(x))

        archive.add_endpoint("bits_per_dim", bits_fn, input_signature=[x_spec])
        archive.add_endpoint("encode", encode_fn, input_signature=[x_spec])
        archive.add_endpoint("decode", decode_fn, input_signature=[z_spec])
        archive.add_endpoint(
            "sample", sample_fn,
            input_signature=[tf.TensorSpec([], tf.int32, name="n"),
                             tf.TensorSpec([], tf.int32, name="seed")])
        archive.write_out(export_dir, verbose=False)
    return export_dir
