"""Tests for tf_iresnet.lipschitz.operators: the operator is the layer's linear map, the adjoint is
exact, the iterates stay unit vectors."""

import numpy as np
import pytest
import tensorflow as tf
from _lipschitz import (
    C_IN,
    CONV_CASES,
    CONV_IDS,
    HW,
    conv_sn,
    true_conv_norm,
)

from tf_iresnet.lipschitz import operators

pytestmark = pytest.mark.usefixtures("keras_seed")


@pytest.mark.parametrize("strides,padding,dilation", CONV_CASES, ids=CONV_IDS)
def test_conv_adjoint_identity_and_operator(strides, padding, dilation):
    layer = conv_sn(strides, padding, dilation, use_bias=False)
    spec, kernel = layer._spec, layer.layer.kernel
    v = tf.random.normal(layer.v.shape, dtype=tf.float64)
    u = tf.random.normal(layer.u.shape, dtype=tf.float64)
    kernel64 = tf.cast(kernel, tf.float64)
    av = operators._matvec(spec, kernel64, v)
    atu = operators._rmatvec(spec, kernel64, u, tuple(v.shape))
    assert atu.shape == v.shape
    np.testing.assert_allclose(
        tf.reduce_sum(av * u).numpy(), tf.reduce_sum(v * atu).numpy(), rtol=1e-10
    )
    # A is the wrapped Conv2D's own linear map at the build-time input size.
    np.testing.assert_allclose(
        operators._matvec(spec, kernel, tf.cast(v, tf.float32)).numpy(),
        layer.layer(tf.cast(v, tf.float32)).numpy(),
        atol=1e-5,
    )


def test_state_stays_unit_with_zero_kernel():
    layer = conv_sn()
    layer.layer.kernel.assign(tf.zeros_like(layer.layer.kernel))
    layer(tf.random.normal([1, HW, HW, C_IN]), training=True)
    assert np.linalg.norm(layer.u.numpy()) == pytest.approx(1.0, rel=1e-5)
    assert np.linalg.norm(layer.v.numpy()) == pytest.approx(1.0, rel=1e-5)
    layer.layer.kernel.assign(tf.random.normal(layer.layer.kernel.shape))
    true_raw = true_conv_norm(layer)  # the normalization cannot be active: sigma ~ 0
    layer.lipschitz_estimate(500, tol=1e-7)
    assert float(layer.sigma()) == pytest.approx(true_raw, rel=1e-3)
