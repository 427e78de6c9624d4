"""Solvers for the top singular triple of an `_OperatorSpec` operator.

`_power_iteration` (a fixed number of steps, for training), `_power_iteration_to_tolerance`
and restarted Golub-Kahan-Lanczos (`_lanczos_to_tolerance`) to a relative residual, and
`_solver`, the cache of their compiled `tf.function`s.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from tf_iresnet.lipschitz.operators import (
    _EPS,
    _bilinear,
    _matvec,
    _normalize,
    _OperatorSpec,
    _rmatvec,
)

# Lanczos steps per restart cycle (the bases hold this many vectors of each space).
_LANCZOS_RESTART = 32

_METHODS = ("lanczos", "power")


def _power_iteration(
    spec: _OperatorSpec, kernel: tf.Tensor, u: tf.Tensor, v: tf.Tensor, num_iterations: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """``num_iterations`` steps of ``v <- normalize(A^T u)``, ``u <- normalize(A v)``.

    A Python loop (unrolled in a graph): meant for the few iterations of a training step.
    """
    v_shape = tuple(v.shape)
    for _ in range(num_iterations):
        v = _normalize(_rmatvec(spec, kernel, u, v_shape), v)
        u = _normalize(_matvec(spec, kernel, v), u)
    return u, v


def _power_iteration_without_gradient(
    spec: _OperatorSpec, kernel: tf.Tensor, u: tf.Tensor, v: tf.Tensor, num_iterations: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """`_power_iteration` with the kernel, u and v held constant: no gradient flows through."""
    u, v = _power_iteration(spec, tf.stop_gradient(kernel), tf.stop_gradient(u),
                            tf.stop_gradient(v), num_iterations)
    return tf.stop_gradient(u), tf.stop_gradient(v)


# The training step's power iterations: one traced function per (operator, shapes, count),
# called out of line by every layer of that shape, so a step's graph holds one copy of the
# loop (and of its gradient stops), not one per layer (they would grow the step's memory with
# the depth of the model).
_shared_power_iteration = tf.function(_power_iteration_without_gradient, autograph=False,
                                      experimental_attributes={"_noinline": True})


def _power_iteration_in_place(
    spec: _OperatorSpec, kernel: tf.Variable, u: tf.Variable, v: tf.Variable, num_iterations: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """`_power_iteration_without_gradient` from the variables ``u``, ``v``, which it updates;
    returns the new ``(u, v)``."""
    new_u, new_v = _power_iteration_without_gradient(
        spec, kernel.read_value(), u.read_value(), v.read_value(), num_iterations)
    u.assign(new_u)
    v.assign(new_v)
    return new_u, new_v


# The same with the reads and assignments inside: one call node per layer in the step's graph.
# tf.function traces once per variable shape, not per variable.
_shared_power_iteration_in_place = tf.function(
    _power_iteration_in_place, autograph=False, experimental_attributes={"_noinline": True})


def _power_iteration_to_tolerance(
    spec: _OperatorSpec,
    kernel: tf.Tensor,
    u: tf.Tensor,
    v: tf.Tensor,
    max_iterations: tf.Tensor,
    tol: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Power iteration until the relative residual ``||A^T u - sigma v|| / sigma <= tol``.

    After an iteration ``A v = sigma u`` holds exactly, so the residual is the whole distance of
    (sigma, u, v) from a singular triple: (sigma, u, v) is an exact singular triple of a matrix
    within ``||A^T u - sigma v||`` of A. The residual is a by-product of the next iteration's
    ``A^T u``. (Stopping on the change of sigma instead stops far too early on convolutions,
    whose top singular values are clustered, ``s_1 / s_2 ~ 1.002``: sigma then creeps up by
    less than 1e-4 per iteration while still 1e-3 below the norm.)

    Returns ``(u, v, sigma, iterations, converged)``: at most ``max_iterations`` iterations;
    ``converged`` is False when it stopped on the cap.
    """
    v_shape = tuple(v.shape)
    sigma0 = _bilinear(spec, kernel, u, v)
    inf = tf.constant(math.inf, dtype=sigma0.dtype)

    def cond(i, u, v, sigma, residual):
        del u, v
        return tf.logical_and(i < max_iterations, residual > tol * tf.abs(sigma))

    def body(i, u, v, sigma, residual):
        del residual
        atu = _rmatvec(spec, kernel, u, v_shape)
        residual = tf.norm(tf.reshape(atu - sigma * v, [-1]))  # of the incoming (u, v)
        v = _normalize(atu, v)
        av = _matvec(spec, kernel, v)
        u = _normalize(av, u)
        return i + 1, u, v, tf.reduce_sum(u * av), residual

    i, u, v, sigma, residual = tf.while_loop(
        cond, body, (tf.constant(0, tf.int32), u, v, sigma0, inf)
    )
    return u, v, sigma, i, residual <= tol * tf.abs(sigma)


def _lanczos_cycle(
    spec: _OperatorSpec,
    kernel: tf.Tensor,
    v: tf.Tensor,
    u_shape: tuple[int, ...],
    restart: int,
    max_steps: tf.Tensor,
    tol: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Golub-Kahan-Lanczos bidiagonalization from unit ``v``, and its top Ritz triple.

    Builds orthonormal bases ``V = [v_1, ..., v_j]`` (input space) and ``U = [u_1, ..., u_j]``
    (output space) of Krylov spaces of ``A^T A`` and ``A A^T`` with

    ``alpha_i u_i = A v_i - beta_{i-1} u_{i-1}``,  ``beta_i v_{i+1} = A^T u_i - alpha_i v_i``,

    so that ``A V = U B`` and ``A^T U = V B^T + beta_j v_{j+1} e_j^T`` with B the j x j upper
    bidiagonal matrix (alphas on the diagonal, betas above). Full reorthogonalization (twice)
    against the stored bases keeps float32 round-off from creating spurious copies of the top
    singular value. The top singular triple ``(theta, y_l, y_r)`` of B gives the Ritz vectors
    ``u = U y_l``, ``v = V y_r`` with ``A v = theta u`` and residual ``||A^T u - theta v|| =
    beta_j |y_l[j]|``; ``theta <= ||A||``. One step costs one product with A and one with A^T,
    like a power iteration, but converges much faster when the top singular values are
    clustered, as they are for convolutions.

    Stops after ``max_steps <= restart`` steps, when the relative residual is at most ``tol``,
    or on breakdown (an exhausted Krylov space, where theta is exact).

    Returns ``(u, v, theta, steps, converged)``.
    """
    dtype = kernel.dtype
    v_shape = tuple(v.shape)
    u_shape = tuple(u_shape)
    n_v = math.prod(v_shape)
    n_u = math.prod(u_shape)
    # Relative size of alpha below which the Krylov space counts as exhausted.
    breakdown = tf.constant(100.0 * np.finfo(dtype.as_numpy_dtype).eps, dtype)

    def a_mul(x):
        return tf.reshape(_matvec(spec, kernel, tf.reshape(x, v_shape)), [-1])

    def at_mul(y):
        return tf.reshape(_rmatvec(spec, kernel, tf.reshape(y, u_shape), v_shape), [-1])

    def orthogonalize(x, basis):
        # Classical Gram-Schmidt twice; rows of `basis` not filled yet are zero and inert.
        for _ in range(2):
            x = x - tf.linalg.matvec(basis, tf.linalg.matvec(basis, x), transpose_a=True)
        return x

    def top_ritz(alphas, betas, j):
        # B_j: alphas[:j] on the diagonal, betas[:j-1] above it; the zero padding only adds
        # zero singular values.
        live = tf.cast(tf.range(restart - 1) < j - 1, dtype)
        b = tf.linalg.diag(alphas) + tf.linalg.diag(betas[:-1] * live, k=1)
        s, y_l, y_r = tf.linalg.svd(b)
        return s[0], y_l[:, 0], y_r[:, 0]

    def set_row(matrix, index, row):
        return tf.tensor_scatter_nd_update(matrix, [[index]], row[None])

    def set_entry(vector, index, value):
        return tf.tensor_scatter_nd_update(vector, [[index]], value[None])

    v_basis = set_row(tf.zeros([restart + 1, n_v], dtype), 0, tf.reshape(v, [-1]))
    u_basis = tf.zeros([restart, n_u], dtype)
    alphas = tf.zeros([restart], dtype)
    betas = tf.zeros([restart], dtype)

    def cond(j, v_basis, u_basis, alphas, betas, done):
        del v_basis, u_basis, alphas, betas
        return tf.logical_and(j < max_steps, tf.logical_not(done))

    def body(j, v_basis, u_basis, alphas, betas, done):
        del done
        v_j = v_basis[j]
        last = tf.maximum(j - 1, 0)
        previous = tf.where(j > 0, betas[last], tf.zeros([], dtype)) * u_basis[last]
        p = orthogonalize(a_mul(v_j) - previous, u_basis)
        alpha = tf.norm(p)
        u_j = p / tf.maximum(alpha, _EPS)
        u_basis = set_row(u_basis, j, u_j)
        r = orthogonalize(at_mul(u_j) - alpha * v_j, v_basis)
        beta = tf.norm(r)
        v_basis = set_row(v_basis, j + 1, r / tf.maximum(beta, _EPS))
        alphas = set_entry(alphas, j, alpha)
        betas = set_entry(betas, j, beta)
        theta, y_l, _ = top_ritz(alphas, betas, j + 1)
        scale = tf.maximum(theta, _EPS)
        residual = beta * tf.abs(y_l[j])
        done = (residual <= tol * scale) | (alpha <= breakdown * scale)
        return j + 1, v_basis, u_basis, alphas, betas, done

    j, v_basis, u_basis, alphas, betas, done = tf.while_loop(
        cond,
        body,
        (tf.constant(0, tf.int32), v_basis, u_basis, alphas, betas, tf.constant(False)),
    )
    theta, y_l, y_r = top_ritz(alphas, betas, j)
    u = tf.reshape(tf.linalg.matvec(u_basis, y_l, transpose_a=True), u_shape)
    v = tf.reshape(tf.linalg.matvec(v_basis[:restart], y_r, transpose_a=True), v_shape)
    # Renormalize against round-off (the Ritz vectors are unit in exact arithmetic).
    return _normalize(u, u), _normalize(v, v), theta, j, done


def _lanczos_to_tolerance(
    spec: _OperatorSpec,
    kernel: tf.Tensor,
    u: tf.Tensor,
    v: tf.Tensor,
    max_iterations: tf.Tensor,
    tol: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Restarted Golub-Kahan-Lanczos to a relative residual ``tol``.

    Cycles of at most `_LANCZOS_RESTART` steps (the memory: that many vectors of each space),
    each started from the previous cycle's top Ritz vector v, until a cycle converges or
    ``max_iterations`` steps have run in total.

    Returns ``(u, v, sigma, iterations, converged)``, like `_power_iteration_to_tolerance`.
    """
    restart = _LANCZOS_RESTART
    u_shape = tuple(u.shape)
    sigma0 = _bilinear(spec, kernel, u, v)

    def cond(total, u, v, sigma, done):
        del u, v, sigma
        return tf.logical_and(total < max_iterations, tf.logical_not(done))

    def body(total, u, v, sigma, done):
        del u, sigma, done
        steps = tf.minimum(restart, max_iterations - total)
        u, v, sigma, used, done = _lanczos_cycle(spec, kernel, v, u_shape, restart, steps, tol)
        return total + used, u, v, sigma, done

    total, u, v, sigma, done = tf.while_loop(
        cond, body, (tf.constant(0, tf.int32), u, v, sigma0, tf.constant(False))
    )
    return u, v, sigma, total, done


_SOLVERS: dict[tuple, Any] = {}


def _solver(method: str, spec: _OperatorSpec, kernel: tf.Tensor, u: tf.Tensor, v: tf.Tensor):
    """The compiled solver for one operator configuration.

    One `tf.function` per (method, operator, shapes, dtype), each traced once: a single function
    retraced for every layer shape of a model would trigger TF's retracing warnings.
    """
    key = (method, spec, tuple(kernel.shape), tuple(u.shape), tuple(v.shape), kernel.dtype)
    solver = _SOLVERS.get(key)
    if solver is None:
        impl = _lanczos_to_tolerance if method == "lanczos" else _power_iteration_to_tolerance

        def run(kernel, u, v, max_iterations, tol):
            return impl(spec, kernel, u, v, max_iterations, tol)

        solver = _SOLVERS[key] = tf.function(run, autograph=False)
    return solver
