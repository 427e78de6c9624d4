"""The density SavedModel's contract: typed signatures, shape errors through both call paths,
empty batches, chunked and bounded sampling, no silently unconverged inverse.

(The end-to-end export of a trained model, reloaded in a fresh process without the project, is
in tests/test_train_density.py.)"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet.export import density as export
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.models.density import DensityConfig, IResNetFlow

TINY_DIGITS = DensityConfig(input_shape=(8, 8, 1), num_levels=17, blocks=(1, 1),
                            hidden_channels=8, strides=(1, 2), eval_logdet="exact")
TINY_2D = DensityConfig(input_shape=(2,), num_levels=None, architecture="dense", blocks=(1,),
                        hidden_channels=8, preprocessing="none", eval_logdet="exact")
CHUNK = 4  # a small SAMPLE_CHUNK, so a few samples span several chunks


def _model(cfg):
    keras.utils.set_random_seed(0)
    model = IResNetFlow(cfg)
    x = (tf.random.stateless_uniform([16, *cfg.input_shape], seed=[1, 1])
         if len(cfg.input_shape) == 3 else tf.random.stateless_normal([16, 2], seed=[1, 1]))
    model.initialize(x)
    return model


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    model = _model(TINY_DIGITS)
    path = str(tmp_path_factory.mktemp("export") / "digits")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "SAMPLE_CHUNK", CHUNK)
        export.export_density_model(model, path)
    return model, tf.saved_model.load(path)


def test_signatures_are_fully_typed(digits):
    _, m = digits
    for name in ("log_prob", "bits_per_dim", "encode"):
        (spec,) = m.signatures[name].structured_input_signature[1].values()
        assert spec.shape.as_list() == [None, 8, 8, 1] and spec.dtype == tf.float32
    (spec,) = m.signatures["decode"].structured_input_signature[1].values()
    assert spec.shape.as_list() == [None, 64]


@pytest.mark.parametrize("name, key, bad, expected", [
    ("log_prob", "x", tf.zeros([2, 8, 8, 3]), "[batch, 8, 8, 1]"),
    ("bits_per_dim", "x", tf.zeros([8, 8, 1]), "[batch, 8, 8, 1]"),
    ("encode", "x", tf.zeros([2, 4, 4, 4]), "[batch, 8, 8, 1]"),
    ("decode", "z", tf.zeros([2, 65]), "[batch, 64]"),
])
def test_wrong_shapes_name_the_expected_one_on_both_call_paths(digits, name, key, bad,
                                                                expected):
    _, m = digits
    with pytest.raises(TypeError, match=r"TensorSpec\(shape=\(None, " +
                       expected[len("[batch, "):-1]):
        getattr(m, name)(bad)
    # A signature does not check its inputs' shapes itself: the in-graph check does.
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(expected)):
        m.signatures[name](**{key: bad})


def test_empty_batches_give_empty_results(digits):
    _, m = digits
    empty = tf.zeros([0, 8, 8, 1])
    assert m.log_prob(empty).shape == (0,)
    assert m.bits_per_dim(empty).shape == (0,)
    assert m.encode(empty).shape == (0, 64)
    assert m.decode(tf.zeros([0, 64])).shape == (0, 8, 8, 1)
    for name in ("log_prob", "bits_per_dim", "encode"):
        (out,) = m.signatures[name](x=empty).values()
        assert out.shape[0] == 0
    # and a non-empty batch is unchanged by the guard
    x = tf.random.stateless_uniform([3, 8, 8, 1], seed=[4, 5])
    model = digits[0]
    want = model.distribution(mode="eval", seed=(20190609, 1)).log_prob(x)
    np.testing.assert_allclose(m.log_prob(x).numpy(), want.numpy(), rtol=1e-5)


def test_sample_is_chunked_and_bounded(digits):
    model, m = digits
    n, seed = 2 * CHUNK + 1, 7
    samples = m.sample(tf.constant(n), tf.constant(seed)).numpy()
    assert samples.shape == (n, 8, 8, 1)
    expected = np.concatenate([
        model.sample(min(CHUNK, n - i * CHUNK), export.sample_seed(seed, i),
                     **export.EXPORT_INVERSE).numpy() for i in range(3)])
    np.testing.assert_allclose(samples, np.clip(expected, 0.0, 1.0), atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"must be <= {export.MAX_SAMPLES}"):
        m.sample(tf.constant(export.MAX_SAMPLES + 1), tf.constant(1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be >= 1"):
        m.sample(tf.constant(0), tf.constant(1))


def test_unconverged_inverse_fails_decode_and_sample(tmp_path, monkeypatch):
    model = _model(TINY_2D)
    monkeypatch.setattr(export, "EXPORT_INVERSE",
                        dict(inverse=InverseConfig(atol=1e-12, rtol=0.0, max_iter=1)))
    m = tf.saved_model.load(export.export_density_model(model, str(tmp_path / "toy")))
    z = tf.random.stateless_normal([4, 2], seed=[1, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="converge"):
        m.decode(z)
    with pytest.raises(tf.errors.InvalidArgumentError, match="converge"):
        m.sample(tf.constant(4), tf.constant(1))
