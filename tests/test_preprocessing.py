"""Logit preprocessing and LipSwish."""

import numpy as np
import pytest
import tensorflow as tf

import tf_iresnet


def test_logit_preprocessing_logdet_and_inverse():
    bij = tf_iresnet.logit_preprocessing(alpha=0.05)
    x = tf.random.stateless_uniform([3, 5], seed=[1, 1])
    y = bij.forward(x)
    s = 0.05 + 0.9 * x
    np.testing.assert_allclose(y.numpy(), np.log(s / (1 - s)), rtol=1e-5)
    expected = np.sum(np.log(0.9) - np.log(s) - np.log(1 - s), axis=-1)
    np.testing.assert_allclose(bij.forward_log_det_jacobian(x, event_ndims=1).numpy(), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(bij.inverse(y).numpy(), x.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        tf_iresnet.logit_preprocessing(0.5)


def test_lipswish_is_one_lipschitz():
    layer = tf_iresnet.LipSwish()
    x = tf.linspace(-10.0, 10.0, 20001)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    slope = tape.gradient(y, x).numpy()
    assert np.abs(slope).max() <= 1.0
    assert np.abs(slope).max() > 0.99  # tight: the 1/1.1 factor is what it has to be
    np.testing.assert_allclose(y.numpy(), x.numpy() / (1 + np.exp(-x.numpy())) / 1.1, rtol=1e-5,
                               atol=1e-7)
    restored = tf_iresnet.LipSwish.from_config(layer.get_config())
    assert restored.beta_init == 1.0
    with pytest.raises(ValueError, match="activation must be one of"):
        tf_iresnet.activations.get_activation("tanhh")
