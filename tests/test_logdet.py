"""Seeds of the log-det estimators: TFP's sanitize/split conventions, stateless int seeds."""

import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet.logdet import LogDetConfig, residual_and_logdet, stateless_seed


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
