"""The log-det estimators: seeds (TFP's sanitize/split conventions, stateless int seeds) and the
Neumann-gradient estimate against its definition."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tf_iresnet.logdet import (
    LogDetConfig,
    _probe,
    _sample_roulette,
    _signed_reweighting,
    _term_weight,
    residual_and_logdet,
    stateless_seed,
)


def _g(x):
    return 0.5 * tf.tanh(x)


def test_int_and_tensor_seeds_are_stateless():
    # TFP's sanitize_seed reads an int as a stateful seed (another value on every call); ours
    # does not, eagerly and in a graph executed twice.
    np.testing.assert_array_equal(stateless_seed(3), stateless_seed(3))
    assert not np.array_equal(stateless_seed(3), stateless_seed(4))
    graph = tf.function(lambda: stateless_seed(3))
    np.testing.assert_array_equal(graph(), graph())
    np.testing.assert_array_equal(graph(), stateless_seed(3))
    seed = stateless_seed(tf.constant([5, 6], tf.int64))
    assert seed.dtype == tf.int32 and seed.shape == [2]
    np.testing.assert_array_equal(seed, [5, 6])


def test_none_draws_a_fresh_seed_on_every_call():
    assert not np.array_equal(stateless_seed(None), stateless_seed(None))
    graph = tf.function(lambda: stateless_seed(None))
    assert not np.array_equal(graph(), graph())


@pytest.mark.parametrize("method", ["series", "unbiased"])
def test_estimates_are_deterministic_given_a_seed_and_fresh_without(method):
    # max_roulette_terms=4: the unbiased estimator's seeds are used as with the default 30,
    # which unrolls 30 conditional terms into each traced estimate.
    config = LogDetConfig(method=method, n_samples=2, max_roulette_terms=4)
    x = tf.random.stateless_normal([8, 3], seed=[1, 2])

    @tf.function
    def estimate(x, seed):
        return residual_and_logdet(_g, x, config, seed=seed)[1]

    @tf.function
    def estimate_unseeded(x):
        return residual_and_logdet(_g, x, config, seed=None)[1]

    a = estimate(tf.identity(x), tf.constant([3, 4]))
    np.testing.assert_array_equal(estimate(tf.identity(x), tf.constant([3, 4])), a)
    assert not np.array_equal(estimate(tf.identity(x), tf.constant([3, 5])), a)
    np.testing.assert_array_equal(residual_and_logdet(_g, x, config, seed=7)[1],
                                  residual_and_logdet(_g, x, config, seed=7)[1])
    assert not np.array_equal(estimate_unseeded(tf.identity(x)),
                              estimate_unseeded(tf.identity(x)))


def _weighted_g(dim=5, seed=0):
    """A nonlinear contractive g(x) = 0.3 tanh(x W) + 0.1 x^2 W' in float64, and its weights."""
    rng = np.random.default_rng(seed)
    w = tf.Variable(rng.normal(size=(dim, dim)) / np.sqrt(dim), dtype=tf.float64)
    w2 = tf.Variable(rng.normal(size=(dim, dim)) / dim, dtype=tf.float64)

    def g(x):
        return 0.3 * tf.tanh(x @ w) + 0.1 * (x * x) @ w2

    return g, [w, w2]


def _neumann_by_definition(g, x, config, seed, weights):
    """The Neumann estimate and its gradient computed as defined, with all n + 1 products:
    value ``sum_k (s_k / k) <w_k, v>`` from ``w_k = v^T J^k`` (k = 1..n), gradient that of
    ``(u^T J) v`` with ``u = sum_k s_k w_(k-1)`` held fixed. Same probes and roulette count as
    `residual_and_logdet` draws from ``seed``."""
    roulette_seed, probe_seed = tfp.random.split_seed(stateless_seed(seed), 2)
    n = (config.n_exact_terms + _sample_roulette(config, roulette_seed)
         if config.method == "unbiased" else config.n_terms)
    n = int(n)
    probe_seeds = tfp.random.split_seed(probe_seed, config.n_samples)
    with tf.GradientTape() as outer:
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            gx = g(x)
        values, surrogates = [], []
        for s in range(config.n_samples):
            v = _probe(tf.shape(x), x.dtype, config.probe, probe_seeds[s])
            w, u, value = v, tf.zeros_like(v), 0.0
            for k in range(1, n + 1):
                u += float(_signed_reweighting(config, k)) * w
                w = tf.stop_gradient(tape.gradient(gx, x, output_gradients=w))
                value += float(_term_weight(config, k, tf.float64)) * tf.reduce_sum(w * v, axis=1)
            values.append(value + tf.zeros([x.shape[0]], x.dtype))
            surrogates.append(tf.reduce_sum(
                tape.gradient(gx, x, output_gradients=tf.stop_gradient(u)) * v, axis=1)
                if n else tf.zeros([x.shape[0]], x.dtype))
        surrogate = tf.add_n(surrogates) / config.n_samples
        loss = tf.reduce_sum(surrogate)
    return (tf.add_n(values) / config.n_samples).numpy(), [
        gr.numpy() for gr in outer.gradient(loss, weights,
                                            unconnected_gradients=tf.UnconnectedGradients.ZERO)]


@pytest.mark.parametrize("config", [
    LogDetConfig(method="series", n_terms=1, neumann_gradient=True),
    LogDetConfig(method="series", n_terms=5, n_samples=2, neumann_gradient=True),
    LogDetConfig(method="series", n_terms=4, probe="rademacher", neumann_gradient=True),
    LogDetConfig(method="unbiased", n_exact_terms=2, max_roulette_terms=6,
                 neumann_gradient=True),
], ids=["series1", "series5x2", "series4_rademacher", "unbiased"])
def test_neumann_estimate_and_gradient_equal_their_definition(config):
    # The estimate reads its last term off the surrogate; value and gradient must still be the
    # definition's, to float64 round-off.
    g, weights = _weighted_g()
    x = tf.random.stateless_normal([6, 5], seed=[3, 1], dtype=tf.float64)
    for seed in range(4):
        with tf.GradientTape() as tape:
            ldj = residual_and_logdet(g, tf.identity(x), config, seed=seed)[1]
            loss = tf.reduce_sum(ldj)
        grads = tape.gradient(loss, weights)
        want_value, want_grads = _neumann_by_definition(g, x, config, seed, weights)
        np.testing.assert_allclose(ldj.numpy(), want_value, rtol=1e-11, atol=1e-12)
        for ours, want in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(ours.numpy(), want, rtol=1e-10, atol=1e-12)


def test_neumann_estimate_takes_n_products_per_probe():
    # n terms cost n vector-Jacobian products per probe, the differentiable one included: as many
    # as the unrolled series without the Neumann gradient, not one more.
    calls = []

    @tf.custom_gradient
    def counted(x):
        def grad(dy):
            calls.append(1)
            return dy
        return tf.identity(x), grad

    def g(x):
        return _g(counted(x))

    x = tf.random.stateless_normal([4, 3], seed=[1, 1])
    for n_terms, n_samples in ((1, 1), (2, 1), (5, 3)):
        for neumann in (True, False):
            calls.clear()
            config = LogDetConfig(method="series", n_terms=n_terms, n_samples=n_samples,
                                  neumann_gradient=neumann)
            residual_and_logdet(g, tf.identity(x), config, seed=1)
            assert len(calls) == n_terms * n_samples, (n_terms, n_samples, neumann)


def test_unbiased_neumann_estimate_without_exact_terms():
    # n_exact_terms=0: the roulette leaves no term at all with probability p, and then the
    # estimate and its gradient are 0; otherwise the value equals the unrolled estimator's for
    # the same draws (same seed).
    g, weights = _weighted_g()
    x = tf.random.stateless_normal([6, 5], seed=[2, 2], dtype=tf.float64)
    base = dict(method="unbiased", n_exact_terms=0, max_roulette_terms=5)

    @tf.function
    def value_and_grads(seed, neumann):
        with tf.GradientTape() as tape:
            ldj = residual_and_logdet(g, tf.identity(x), LogDetConfig(
                **base, neumann_gradient=neumann), seed=seed)[1]
            loss = tf.reduce_sum(ldj)
        return ldj, tape.gradient(loss, weights,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)

    empty = 0
    for i in range(12):
        seed = tf.constant([i, 9])
        value, grads = value_and_grads(seed, True)
        plain, _ = value_and_grads(seed, False)
        np.testing.assert_allclose(value.numpy(), plain.numpy(), rtol=1e-11, atol=1e-12)
        if not np.any(value.numpy()):
            empty += 1
            assert all(not np.any(gr.numpy()) for gr in grads)
    assert 0 < empty < 12  # both cases occurred
