"""Fixed-point solvers on a map with a known solution."""

import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet.fixed_point import check_converged, solve_fixed_point


def _contraction(lip, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, dim)).astype("float32")
    w *= lip / np.linalg.norm(w, 2)
    return lambda x: tf.tanh(x @ w)


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_solves_to_tolerance(method):
    g = _contraction(0.9)
    x = tf.random.stateless_normal([6, 5], seed=[1, 2])
    y = x + g(x)
    r = solve_fixed_point(g, y, method=method, atol=1e-6, rtol=0.0, max_iter=300)
    assert bool(r.converged) and float(r.residual) <= 1e-6
    np.testing.assert_allclose(r.x.numpy(), x.numpy(), atol=1e-5)
    compiled = tf.function(
        lambda y: solve_fixed_point(g, y, method=method, atol=1e-6, rtol=0.0, max_iter=300).x,
        jit_compile=True)
    np.testing.assert_allclose(compiled(y).numpy(), x.numpy(), atol=1e-5)


def test_anderson_saves_evaluations_near_lipschitz_one():
    # A symmetric map with eigenvalues up to 0.95 in the near-linear range of tanh: Picard
    # needs about log(1e-5) / log(0.95) ~ 220 steps.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))
    w = ((q * np.linspace(-0.95, 0.95, 8)) @ q.T).astype("float32")

    def g(x):
        return tf.tanh(x @ w)

    x = tf.random.stateless_normal([4, 8], seed=[3, 4]) * 0.3
    y = x + g(x)
    plain = solve_fixed_point(g, y, atol=1e-5, max_iter=2000)
    fast = solve_fixed_point(g, y, atol=1e-5, max_iter=2000, method="anderson")
    assert bool(plain.converged) and bool(fast.converged)
    assert int(fast.iterations) * 2 < int(plain.iterations)


def test_budget_and_errors():
    g = _contraction(0.9)
    y = tf.random.normal([2, 5]) * 10
    r = solve_fixed_point(g, y, max_iter=1)
    assert not bool(r.converged) and int(r.iterations) == 1
    with pytest.raises(RuntimeError, match="did not converge"):
        check_converged(r, max_iter=1, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="method must be one of"):
        solve_fixed_point(g, y, method="broyden")
    with pytest.raises(ValueError, match="max_iter"):
        solve_fixed_point(g, y, max_iter=0)
