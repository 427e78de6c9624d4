"""The ELU layer: the values and gradients (first and second order) of ``tf.nn.elu``."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet.activations import ELU, get_activation


def _branch(act):
    """``g(x) = W2 act(W1 x)``, fixed weights, so two activations give comparable values."""
    w1 = tf.constant(np.random.default_rng(0).normal(size=(6, 8)), tf.float32)
    w2 = tf.constant(np.random.default_rng(1).normal(size=(8, 6)) * 0.3, tf.float32)
    return lambda x: tf.matmul(act(tf.matmul(x, w1)), w2)


def _series_and_gradient(act, x, v, terms=3):
    """A 3-term ``sum_k w_k . v`` with ``w_k = v^T J^k`` (the log-det's VJP chain) and its
    gradient with respect to x: the second derivative of the activation enters here."""
    g = _branch(act)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape(persistent=True) as inner:
            inner.watch(x)
            gx = g(x)
        w, total = v, 0.0
        for _ in range(terms):
            w = inner.gradient(gx, x, output_gradients=w)
            total += tf.reduce_sum(w * v)
    return gx, total, outer.gradient(total, x)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_elu_matches_tf_elu_to_second_order(compiled):
    x = tf.constant(np.random.default_rng(2).normal(size=(5, 6)) * 2.0, tf.float32)
    v = tf.constant(np.random.default_rng(3).normal(size=(5, 6)), tf.float32)
    ours = ELU()
    fn = tf.function(_series_and_gradient) if compiled else _series_and_gradient
    gx, total, grad = fn(ours, x, v)
    gx_ref, total_ref, grad_ref = fn(tf.nn.elu, x, v)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(total, total_ref, rtol=1e-5)
    # The second-order part (elu''(a) = exp(a) for a < 0) is a sizeable share of this gradient:
    # without it the gradient is another one.
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-5)
    assert float(tf.reduce_max(tf.abs(grad_ref))) > 1e-2


def test_elu_first_order_gradient_and_plain_forward():
    x = tf.constant([[-3.0, -0.5, 0.0, 0.5, 2.0]])
    layer = get_activation("elu")
    assert isinstance(layer, ELU)
    np.testing.assert_allclose(layer(x), tf.nn.elu(x), rtol=1e-7)  # no tape: plain tf.nn.elu
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    np.testing.assert_allclose(tape.gradient(y, x), [[np.exp(-3.0), np.exp(-0.5), 1.0, 1.0, 1.0]],
                               rtol=1e-6)


def test_elu_serializes():
    model = keras.Sequential([keras.Input((3,)), ELU(name="act")])
    clone = keras.Sequential.from_config(model.get_config())
    assert isinstance(clone.layers[0], ELU)
