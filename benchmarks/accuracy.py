r"""Accuracy figures of the core: inverse iterations, log-det errors, Lipschitz gaps.

    python -m benchmarks.accuracy            # prints one JSON object

* ``inverse``: evaluations of g that the plain fixed-point iteration and Anderson acceleration
  need to reach atol = rtol = 1e-5 for g(x) = tanh(A x), A symmetric with |A| = c (the slow
  case: Lip(g) = c near 0), batch 64 of 16-d points, and the error reached.
* ``logdet``: for a dense spectral-normalized branch (c = 0.9) and a linear branch with
  eigenvalues over [-0.9, 0.9]: the exact truncation bias of the n-term series (from the full
  Jacobian) against ``slogdet``, and for the 5-term series and the unbiased estimator the
  standard deviation of a one-probe estimate and the error of the mean of 1024 draws.
* ``lipschitz``: for random 3x3 convolutions on 8x8 inputs (strides 1, 2; paddings same,
  valid), the true operator norm after ``lipschitz_estimate`` (SVD of the full operator
  matrix), relative to the coefficient, and the ratio of the FFT upper bound to the true norm.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import tensorflow as tf

import tf_iresnet


def _symmetric_map(lip: float, dim: int, seed: int = 0) -> np.ndarray:
    """A symmetric matrix with eigenvalues spread over [-lip, lip] (its norm is lip)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return ((q * np.linspace(-lip, lip, dim)) @ q.T).astype("float32")


def _inverse_figures() -> dict:
    """Worst case for the iteration: g(x) = tanh(A x) with Lip(g) = |A| = c near the origin."""
    out = {}
    for coeff in (0.9, 0.97, 0.99):
        a = tf.constant(_symmetric_map(coeff, 16))

        def g(x, a=a):
            return tf.tanh(x @ a)

        x = tf.random.stateless_normal([64, 16], seed=[1, 2]) * 0.5
        y = x + g(x)
        row = {}
        for method in ("fixed_point", "anderson"):
            r = tf_iresnet.solve_fixed_point(g, y, method=method, atol=1e-5, rtol=1e-5,
                                             max_iter=5000)
            row[method] = {"g_evaluations": int(r.iterations),
                           "max_abs_error": float(tf.reduce_max(tf.abs(r.x - x)))}
        out[f"lip_{coeff}"] = row
    return out


def _truncated_series(jac: np.ndarray, n: int) -> np.ndarray:
    out, power = np.zeros(len(jac)), np.broadcast_to(np.eye(jac.shape[-1]), jac.shape)
    for k in range(1, n + 1):
        power = power @ jac
        out += (-1) ** (k + 1) * np.trace(power, axis1=1, axis2=2) / k
    return out


def _logdet_figures() -> dict:
    """Truncation bias (exact, from the Jacobian) and one-probe standard deviation."""
    out = {}
    keras.utils.set_random_seed(1)
    dense = tf_iresnet.dense_branch(8, (32, 32), coeff=0.9, activation="elu")
    for layer in tf_iresnet.lipschitz.spectral_norm_layers(dense):
        layer.layer.kernel.assign(layer.layer.kernel * 10.0)
    tf_iresnet.converge_spectral_norms(dense)
    linear = keras.Sequential([keras.layers.Dense(8, use_bias=False)])
    linear.build((None, 8))
    linear.layers[0].kernel.assign(_symmetric_map(0.9, 8).T)
    x = tf.random.stateless_normal([16, 8], seed=[3, 4])
    for name, g in (("dense_branch_c0.9", dense), ("linear_eigs_pm0.9", linear)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            gx = g(x)
        jac = tape.batch_jacobian(gx, x).numpy().astype(np.float64)
        exact = np.linalg.slogdet(np.eye(8) + jac)[1]
        row = {"mean_abs_logdet": float(np.abs(exact).mean())}
        for n in (1, 2, 3, 5, 10, 20):
            row[f"series_{n}_bias"] = float(np.abs(_truncated_series(jac, n) - exact).mean())
        xs = tf.repeat(x, 256, axis=0)
        for label, kwargs in (("series_5", dict(logdet="series", n_terms=5)),
                              ("unbiased", dict(logdet="unbiased"))):
            draws = np.stack([
                tf_iresnet.InvertibleResidualBlock(g, event_ndims=1, seed=s, **kwargs)
                .forward_log_det_jacobian(tf.identity(xs), event_ndims=1).numpy()
                for s in range(4)]).reshape(4, 16, 256)
            row[f"{label}_one_probe_std"] = float(draws.std(axis=(0, 2)).mean())
            row[f"{label}_mean_error_1024_draws"] = float(
                np.abs(draws.mean(axis=(0, 2)) - exact).mean())
        out[name] = row
    return out


def _lipschitz_figures() -> dict:
    rows = {}
    for strides in (1, 2):
        for padding in ("same", "valid"):
            keras.utils.set_random_seed(2)
            layer = tf_iresnet.SpectralNormalization(
                keras.layers.Conv2D(4, 3, strides=strides, padding=padding), coeff=0.9)
            layer.build((None, 8, 8, 3))
            layer.layer.kernel.assign(layer.layer.kernel * 10.0)
            estimate = float(layer.lipschitz_estimate())
            kernel = layer.normalized_kernel()
            basis = tf.reshape(tf.eye(8 * 8 * 3), [-1, 8, 8, 3])
            cols = tf.nn.conv2d(basis, kernel, strides=strides, padding=padding.upper())
            matrix = tf.reshape(cols, [8 * 8 * 3, -1]).numpy()
            true = float(np.linalg.svd(matrix, compute_uv=False)[0])
            bound = float(layer.lipschitz_upper_bound())
            rows[f"stride{strides}_{padding}"] = {
                "estimate": estimate, "true_norm": true,
                "true_over_coeff_minus_1": true / 0.9 - 1.0, "bound_over_true": bound / true}
    return rows


def main() -> None:
    print(json.dumps({"inverse": _inverse_figures(), "logdet": _logdet_figures(),
                      "lipschitz": _lipschitz_figures()}, indent=2))


if __name__ == "__main__":
    main()
