"""The Neumann-series gradient has the expectation of the truncated series' gradient.

For a series truncated at n terms, ``d/dtheta tr(J^k) / k = tr(J^(k-1) dJ/dtheta)``, so the
probe average of the Neumann surrogate's gradient converges to the gradient of
``sum_{k<=n} (-1)^(k+1) tr(J^k) / k`` (computed here exactly, from the full Jacobian), in the
branch's parameters and in its input, with an error falling like ``1/sqrt(probes)``.
"""

import numpy as np
import tensorflow as tf

import tf_iresnet
from tf_iresnet import InvertibleResidualBlock, LogDetConfig

N_TERMS = 5


def _conv_g():
    tf.keras.utils.set_random_seed(3)
    g = tf_iresnet.conv_branch((4, 4, 2), 4, coeff=0.9)
    tf_iresnet.converge_spectral_norms(g)
    return g


def _series_of_jacobian(g, x):
    """``sum_{k<=n} (-1)^(k+1) tr(J^k) / k`` per example from the full Jacobian (differentiable)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        gx = g(x, training=False)
    jac = tape.batch_jacobian(gx, x)
    d = int(np.prod(x.shape[1:]))
    jac = tf.reshape(jac, [-1, d, d])
    power, total = jac, 0.0
    for k in range(1, N_TERMS + 1):
        total += (-1) ** (k + 1) * tf.linalg.trace(power) / k
        power = power @ jac
    return total


def test_probe_averaged_neumann_gradient_is_the_series_gradient():
    g = _conv_g()
    weights = g.trainable_variables
    x0 = tf.random.stateless_normal([2, 4, 4, 2], seed=[1, 2])

    with tf.GradientTape() as tape:
        tape.watch(x0)
        exact = tf.reduce_sum(_series_of_jacobian(g, x0))
    want = tape.gradient(exact, [x0, *weights])
    # The Jacobian does not depend on the last bias: keep the weights it depends on.
    weights = [w for w, gr in zip(weights, want[1:], strict=True) if gr is not None]
    assert len(weights) >= 4
    want = [gr for gr in want if gr is not None]
    want = np.concatenate([w.numpy().ravel() for w in want])

    @tf.function
    def neumann_grads(x0, probes, seed):
        # Every example repeated `probes` times, one probe each: the sum over copies is the
        # probe average (times `probes`) of the gradient, in x0 and in the weights.
        block = InvertibleResidualBlock(g, event_ndims=3, seed=seed, logdet=LogDetConfig(
            method="series", n_terms=N_TERMS, neumann_gradient=True))
        with tf.GradientTape() as tape:
            tape.watch(x0)
            x = tf.repeat(x0, probes, axis=0)
            total = tf.reduce_sum(block.forward_log_det_jacobian(x, event_ndims=3))
        grads = tape.gradient(total, [x0, *weights])
        return tf.concat([tf.reshape(gr, [-1]) for gr in grads], 0) / tf.cast(probes, tf.float32)

    errors = {}
    for probes in (16, 256):
        got = neumann_grads(x0, tf.constant(probes), tf.constant([7, probes])).numpy()
        errors[probes] = np.linalg.norm(got - want) / np.linalg.norm(want)
    # 16x the probes: 4x smaller error in expectation (a single draw: allow 2x either way).
    assert errors[256] < 0.1, errors
    assert 2.0 < errors[16] / errors[256] < 8.0, errors
