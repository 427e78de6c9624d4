"""The inverse's implicit gradient, and loud failure of unconverged solves (XLA included)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tf_iresnet
from tf_iresnet import InverseConfig, InvertibleResidualBlock
from tf_iresnet.fixed_point import check_converged, solve_fixed_point

tfd, tfb = tfp.distributions, tfp.bijectors


@pytest.fixture
def float64():
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


def _branch(kind):
    tf.keras.utils.set_random_seed(0)
    if kind == "dense":
        g = tf_iresnet.dense_branch(3, (8,), coeff=0.9, activation="elu")
    else:
        g = tf_iresnet.conv_branch((2, 2, 2), 3, coeff=0.9)
    tf_iresnet.converge_spectral_norms(g)
    return g


def _loss_fn(block, shape, dtype):
    c = tf.random.stateless_normal(shape, [3, 2], dtype=dtype)
    return lambda y: tf.reduce_sum(c * tf.sin(block.inverse(tf.identity(y))))


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_implicit_gradient_matches_finite_differences(kind, float64):
    g = _branch(kind)
    assert g.weights[0].dtype == "float64"
    block = InvertibleResidualBlock(g, event_ndims=1 if kind == "dense" else 3, logdet="none",
                                    inverse=InverseConfig(atol=1e-12, rtol=1e-12, max_iter=500))
    shape = [2, 3] if kind == "dense" else [1, 2, 2, 2]
    y = tf.random.stateless_normal(shape, [1, 2], dtype=tf.float64)
    loss = _loss_fn(block, shape, tf.float64)
    weights = g.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch(y)
        value = loss(y)
    dy, *dw = tape.gradient(value, [y, *weights])
    # The finite differences: the same loss traced once (it reads the weights when called),
    # not one eager inverse per evaluation.
    loss_value = tf.function(loss)
    eps = 1e-6
    fd = np.zeros(shape)
    for i in range(fd.size):
        e = np.zeros(fd.size)
        e[i] = eps
        e = e.reshape(shape)
        fd.flat[i] = (loss_value(y + e) - loss_value(y - e)).numpy() / (2 * eps)
    np.testing.assert_allclose(dy.numpy(), fd, atol=1e-8)  # measured 8e-11 (dense)
    w = weights[0]
    w0 = w.numpy()
    for k in (0, 3):
        bump = np.zeros(w0.size)
        bump[k] = eps
        w.assign(w0 + bump.reshape(w0.shape))
        plus = loss_value(y).numpy()
        w.assign(w0 - bump.reshape(w0.shape))
        minus = loss_value(y).numpy()
        w.assign(w0)
        np.testing.assert_allclose(dw[0].numpy().flat[k], (plus - minus) / (2 * eps), atol=1e-8)
    # The same gradients in tf.function and under XLA.
    def grads(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            value = loss(t)
        return tape.gradient(value, [t, *weights])

    for jit in (False, True):
        out = tf.function(grads, jit_compile=jit)(y)
        np.testing.assert_allclose(out[0].numpy(), dy.numpy(), atol=1e-12)
        np.testing.assert_allclose(out[1].numpy(), dw[0].numpy(), atol=1e-12)


@pytest.mark.parametrize("kind, solver", [("dense", "fixed_point"), ("dense", "anderson"),
                                          ("conv", "fixed_point")])
def test_implicit_gradient_matches_an_unrolled_iteration(kind, solver):
    # float32: the gradient of 60 unrolled steps x <- y - g(x), taken by backpropagation.
    g = _branch(kind)
    block = InvertibleResidualBlock(g, event_ndims=1 if kind == "dense" else 3, logdet="none",
                                    inverse=InverseConfig(solver=solver, atol=1e-7, rtol=1e-7,
                                                          max_iter=300))
    shape = [4, 3] if kind == "dense" else [2, 2, 2, 2]
    y = tf.random.stateless_normal(shape, [1, 2])
    c = tf.random.stateless_normal(shape, [3, 2])
    weights = g.trainable_variables

    @tf.function
    def both(y):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(y)
            implicit = tf.reduce_sum(c * block.inverse(tf.identity(y)))
            _, x = tf.while_loop(lambda k, x: k < 60,
                                 lambda k, x: (k + 1, y - g(x, training=False)), (0, y))
            unrolled = tf.reduce_sum(c * x)
        return tape.gradient(implicit, [y, *weights]), tape.gradient(unrolled, [y, *weights])

    implicit, unrolled = both(y)
    for a, b in zip(implicit, unrolled, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-4, rtol=1e-3)


def test_sample_gives_gradients_to_the_weights():
    g = _branch("dense")
    block = InvertibleResidualBlock(g, event_ndims=1, logdet="exact")
    dist = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(3)), tfb.Invert(block))
    with tf.GradientTape() as tape:
        x = dist.sample(8, seed=[1, 1])
        loss = tf.reduce_mean(tf.reduce_sum(x**2, -1) + dist.log_prob(x))
    grads = tape.gradient(loss, g.trainable_variables)
    assert all(gr is not None and np.isfinite(gr.numpy()).all() for gr in grads)
    assert sum(float(tf.reduce_sum(tf.abs(gr))) for gr in grads) > 0


def _unconverging():
    w = np.eye(3, dtype="float32") * 0.95
    return lambda x, training=False: tf.tanh(x @ w)


@pytest.mark.parametrize("jit", [False, True])
def test_unconverged_inverse_is_nan_in_graphs_and_under_xla(jit):
    g = _unconverging()
    # Example 0 converges at once (y = 0), example 1 needs many steps.
    y = tf.constant([[0.0, 0.0, 0.0], [0.5, -0.4, 0.3]])

    def solve(y):
        r = solve_fixed_point(g, y, max_iter=5)
        x = check_converged(r, max_iter=5, atol=1e-5, rtol=1e-5)
        return x, r.converged, r.example_converged

    if not jit:  # a plain graph: the assertion fires
        with pytest.raises(tf.errors.InvalidArgumentError, match="did not converge"):
            tf.function(solve)(y)
        return
    x, converged, per_example = tf.function(solve, jit_compile=True)(y)
    assert not bool(converged)
    np.testing.assert_array_equal(per_example.numpy(), [True, False])
    assert np.isfinite(x.numpy()[0]).all() and np.isnan(x.numpy()[1]).all()
    # The bijector under XLA: NaN, never a silently wrong value.
    block = InvertibleResidualBlock(g, event_ndims=1, logdet="none",
                                    inverse=InverseConfig(max_iter=5))
    out = tf.function(lambda t: block.inverse(t), jit_compile=True)(tf.identity(y))
    assert np.isnan(out.numpy()[1]).all() and not np.isnan(out.numpy()[0]).any()


def test_unconverged_implicit_gradient_fails_loudly():
    g = _unconverging()
    # The inverse converges (generous budget), the adjoint solve gets too few steps? Both share
    # the budget, so use a tolerance the forward meets at y = 0 but the adjoint cannot.
    block = InvertibleResidualBlock(g, event_ndims=1, logdet="none",
                                    inverse=InverseConfig(max_iter=3, atol=1e-6, rtol=0.0))
    y = tf.zeros([2, 3])
    with tf.GradientTape() as tape:
        tape.watch(y)
        x = block.inverse(tf.identity(y))
        loss = tf.reduce_sum(x * 1.0) + tf.reduce_sum(tf.ones_like(x))
    with pytest.raises(tf_iresnet.InverseNotConvergedError, match="implicit gradient"):
        tape.gradient(loss, y)

    def grad(y):
        with tf.GradientTape() as tape:
            tape.watch(y)
            loss = tf.reduce_sum(block.inverse(tf.identity(y)))
        return tape.gradient(loss, y)

    assert np.isnan(tf.function(grad, jit_compile=True)(y).numpy()).all()
