"""Tests for tf_iresnet.lipschitz.solvers: power iteration and Lanczos converge to the exact
operator norm."""

import keras
import pytest
import tensorflow as tf
from _lipschitz import (
    COEFF,
    CONV_CASES,
    CONV_IDS,
    conv_sn,
    layer_matrix,
    randomize_state,
    raw_conv_norm,
    scale_kernel,
    spectral_norm,
    true_conv_norm,
)

from tf_iresnet.lipschitz.layer import SpectralNormalization

pytestmark = pytest.mark.usefixtures("keras_seed")


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("strides,padding,dilation", CONV_CASES, ids=CONV_IDS)
def test_conv_normalized_norm_and_upper_bound(strides, padding, dilation, method):
    layer = conv_sn(strides, padding, dilation)
    layer.layer.kernel.assign(tf.random.normal(layer.layer.kernel.shape))
    randomize_state(layer, seed=strides + 10 * dilation)
    raw = raw_conv_norm(layer)
    assert raw > 2.0 * COEFF, "the normalization must be active in this test"
    # With a stale state the check below fails: it is not vacuous.
    assert true_conv_norm(layer) > COEFF * 1.1

    # Power iteration needs many more iterations on convolutions (clustered singular values).
    budget = {"lanczos": {}, "power": {"power_iterations": 3000}}[method]
    estimate = float(layer.lipschitz_estimate(method=method, **budget))
    true_norm = true_conv_norm(layer)
    bound = float(layer.lipschitz_upper_bound())

    assert estimate == pytest.approx(COEFF, rel=1e-6)
    assert true_norm <= COEFF * (1 + 1e-3)
    assert true_norm >= COEFF * (1 - 1e-3)  # and the normalization is not overly cautious
    assert float(layer.sigma()) == pytest.approx(raw, rel=1e-3)
    assert bound >= true_norm * (1 - 1e-5)
    assert bound <= 2.0 * true_norm


def test_dense_estimate_matches_svd():
    layer = SpectralNormalization(keras.layers.Dense(5), coeff=COEFF)
    layer.build((None, 6))
    scale_kernel(layer, 4.0)
    exact_raw = spectral_norm(layer.layer.kernel.numpy())
    assert exact_raw > 2.0 * COEFF

    estimate = float(layer.lipschitz_estimate(power_iterations=500, tol=1e-7))
    assert float(layer.sigma()) == pytest.approx(exact_raw, rel=1e-4)
    assert estimate == pytest.approx(COEFF, rel=1e-6)
    normalized = spectral_norm(layer.normalized_kernel().numpy())
    assert normalized <= COEFF * (1 + 1e-4)
    assert normalized == pytest.approx(COEFF, rel=1e-4)
    # The layer's output uses that kernel; the bound is the exact SVD norm.
    assert spectral_norm(layer_matrix(layer, (6,))) == pytest.approx(normalized, rel=1e-5)
    assert float(layer.lipschitz_upper_bound()) == pytest.approx(normalized, rel=1e-6)


def test_dense_lanczos_is_exact_after_rank_steps():
    # The Krylov space of a 6 x 5 map is exhausted after at most 5 steps: Lanczos stops there
    # with the exact norm, where power iteration would still be converging.
    layer = SpectralNormalization(keras.layers.Dense(5), coeff=COEFF)
    layer.build((None, 6))
    randomize_state(layer, seed=3)
    sigma, iterations, converged = layer._iterate_to_tolerance(100, 0.0, "lanczos")
    assert bool(converged) and int(iterations) <= 6
    assert float(sigma) == pytest.approx(spectral_norm(layer.layer.kernel.numpy()), rel=1e-6)


def test_lipschitz_estimate_in_tf_function():
    layer = conv_sn(2, "valid")
    layer.layer.kernel.assign(tf.random.normal(layer.layer.kernel.shape))
    randomize_state(layer, seed=4)
    estimate = tf.function(lambda: layer.lipschitz_estimate(200))()
    assert float(estimate) == pytest.approx(COEFF, rel=1e-6)
    assert true_conv_norm(layer) <= COEFF * (1 + 1e-3)
