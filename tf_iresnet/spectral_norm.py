"""Spectral normalization of dense and convolutional layers, with Lipschitz diagnostics.

An i-ResNet block ``y = x + g(x)`` is invertible when ``Lip(g) < 1``. With 1-Lipschitz
activations, ``Lip(g)`` is at most the product of the operator norms of g's linear maps, so each
of them is rescaled to have norm at most ``coeff < 1``. For a convolution the norm that matters
is the norm of the convolution *as a linear map on the layer's input*, at the input's spatial
size, with the layer's strides, padding and dilation; not the norm of the kernel reshaped into a
matrix, which can be several times smaller.

The module provides:

* `SpectralNormalization`: a Keras layer wrapping a `keras.layers.Dense` or
  `keras.layers.Conv2D`, which estimates the operator norm by power iteration with persistent
  state and applies the soft normalization ``W / max(1, sigma / coeff)``.
* `lipschitz_report`, `spectral_norm_layers`, `converge_spectral_norms`: model-level helpers to
  inspect the constraint and to converge the power-iteration state before export or after
  loading weights.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "SpectralNormalization",
    "converge_spectral_norms",
    "lipschitz_report",
    "spectral_norm_layers",
]

_LOG = logging.getLogger(__name__)

# Lanczos steps run when the layer is built, so that the state is a sensible estimate (and the
# normalization active) from the first call, before any training step has updated it.
_BUILD_MAX_ITERATIONS = 32
_BUILD_TOLERANCE = 1e-4

# Norms below this are treated as zero by the vector normalization.
_EPS = 1e-12

# Lanczos steps per restart cycle (the bases hold this many vectors of each space).
_LANCZOS_RESTART = 32

_METHODS = ("lanczos", "power")


# --------------------------------------------------------------------------------------------
# The linear operators, as pure functions of the kernel.
# --------------------------------------------------------------------------------------------


class _OperatorSpec(NamedTuple):
    """Static description of the linear map ``A`` a kernel defines.

    A NamedTuple of Python literals, so that `tf.function` traces by value and layers with the
    same configuration share a trace.

    Attributes:
      kind: ``"dense"`` (``A v = W^T v`` for a kernel ``W`` of shape ``[in, out]``) or
        ``"conv2d"`` (``A v = conv2d(v, W)``, NHWC, kernel ``[kh, kw, in, out]``).
      strides: convolution strides ``(sh, sw)``.
      padding: ``"SAME"`` or ``"VALID"``.
      dilations: convolution dilation rates ``(dh, dw)``.
    """

    kind: str
    strides: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    dilations: tuple[int, int] = (1, 1)


def _matvec(spec: _OperatorSpec, kernel: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    """``A v``: the layer's linear map (no bias, no activation) applied to ``v``.

    Shapes: dense ``v [in] -> [out]``; conv2d ``v [1, H, W, C_in] -> [1, H', W', C_out]``.
    """
    if spec.kind == "dense":
        return tf.linalg.matvec(kernel, v, transpose_a=True)
    return tf.nn.conv2d(
        v,
        _dilate_kernel(kernel, spec.dilations),
        strides=[1, *spec.strides, 1],
        padding=spec.padding,
    )


def _rmatvec(
    spec: _OperatorSpec, kernel: tf.Tensor, u: tf.Tensor, v_shape: tuple[int, ...]
) -> tf.Tensor:
    """``A^T u``: the adjoint of `_matvec`, so that ``<A v, u> = <v, A^T u>`` for all u, v.

    For a convolution the adjoint is the transposed convolution with the same kernel, strides
    and padding; the explicit ``output_shape`` (the shape of v) removes the ambiguity a strided
    convolution has about its input size, which makes it the exact adjoint. A dilated kernel is
    applied as the zero-filled kernel of its effective size (`_dilate_kernel`), in `_matvec`
    too: TF's plain CPU kernels (without oneDNN) have no dilated ``Conv2DBackpropInput``, and
    neither the transpose nor the gradient of a dilated ``conv2d`` would run there. The batch-1
    power iterations hardly notice the zeros.
    """
    if spec.kind == "dense":
        return tf.linalg.matvec(kernel, u)
    return tf.nn.conv2d_transpose(
        u,
        _dilate_kernel(kernel, spec.dilations),
        output_shape=v_shape,
        strides=[1, *spec.strides, 1],
        padding=spec.padding,
    )


def _normalize(x: tf.Tensor, fallback: tf.Tensor) -> tf.Tensor:
    """``x / ||x||``, or ``fallback`` (a unit vector) when ``x`` is numerically zero.

    Falling back to the previous iterate keeps u and v unit vectors at all times: a zero kernel
    (or a u orthogonal to the range of A) would otherwise set them to zero, and power iteration
    never leaves zero.
    """
    norm = tf.norm(tf.reshape(x, [-1]))
    return tf.where(norm > _EPS, x / tf.maximum(norm, _EPS), fallback)


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


def _bilinear(spec: _OperatorSpec, kernel: tf.Tensor, u: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    """``sigma = <u, A v>``, the power-iteration estimate of the largest singular value of A.

    Differentiable in ``kernel``; for fixed unit u, v its gradient is ``d sigma / dW = u v^T``
    in the appropriate layout, which is the gradient of the true top singular value when u, v
    are the top singular vectors.
    """
    return tf.reduce_sum(u * _matvec(spec, kernel, v))


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


def _dilate_kernel(kernel: tf.Tensor, dilations: tuple[int, int]) -> tf.Tensor:
    """Materialize a dilated kernel: ``[kh, kw, ...] -> [d_h (kh-1) + 1, d_w (kw-1) + 1, ...]``."""
    dh, dw = dilations
    if dh == 1 and dw == 1:
        return kernel
    kh, kw, cin, cout = kernel.shape
    spread = tf.pad(
        kernel[:, None, :, None],
        [[0, 0], [0, dh - 1], [0, 0], [0, dw - 1], [0, 0], [0, 0]],
    )
    spread = tf.reshape(spread, [kh * dh, kw * dw, cin, cout])
    return spread[: dh * (kh - 1) + 1, : dw * (kw - 1) + 1]


def _conv2d_norm_upper_bound(
    kernel: tf.Tensor, input_hw: tuple[int, int], dilations: tuple[int, int]
) -> tf.Tensor:
    """Upper bound on the operator norm of a zero-padded 2-D convolution on an H x W input.

    With the effective (dilated) kernel of size ``e_h x e_w``, the "full" correlation of an
    H x W input equals the circular correlation on the grid ``N_1 x N_2 = (H + e_h - 1) x
    (W + e_w - 1)`` of the input zero-padded to that grid (no wrap-around reaches the input).
    The layer's convolution, for any padding and stride, keeps a subset of those outputs, so it
    is ``P C E`` with E an isometric embedding and P a coordinate projection, and its norm is at
    most ``||C||``. A circular convolution is block-diagonalized by the 2-D DFT (Sedghi et al.,
    2019): ``||C|| = max_w s_max(K^(w))`` with ``K^(w) = sum_{a,b} K[a, b] exp(-2 pi i
    (w_1 a / N_1 + w_2 b / N_2))``, a ``C_in x C_out`` complex matrix per frequency w. The kernel
    is real, so ``K^(-w) = conj(K^(w))`` and half the spectrum (`rfft2d`) suffices.

    Args:
      kernel: ``[kh, kw, C_in, C_out]`` kernel.
      input_hw: the input's spatial size ``(H, W)``.
      dilations: dilation rates.

    Returns:
      float64 scalar; computed in float64 so that rounding does not undercut the bound.
    """
    kernel = _dilate_kernel(tf.cast(kernel, tf.float64), dilations)
    e_h, e_w = kernel.shape[0], kernel.shape[1]
    grid = [input_hw[0] + e_h - 1, input_hw[1] + e_w - 1]
    # rfft2d transforms the two innermost axes: [C_in, C_out, e_h, e_w] -> [C_in, C_out, N1, M].
    spectrum = tf.signal.rfft2d(tf.transpose(kernel, [2, 3, 0, 1]), fft_length=grid)
    spectrum = tf.transpose(spectrum, [2, 3, 0, 1])  # [N1, M, C_in, C_out]

    # One row of frequencies at a time keeps memory at M * C_in * C_out complex numbers.
    def row_max(matrices):
        return tf.reduce_max(tf.linalg.svd(matrices, compute_uv=False))

    per_row = tf.map_fn(row_max, spectrum, fn_output_signature=tf.float64)
    return tf.reduce_max(per_row)


# --------------------------------------------------------------------------------------------
# The layer.
# --------------------------------------------------------------------------------------------


def _check_coeff(coeff: Any) -> float:
    if (
        isinstance(coeff, bool)
        or not isinstance(coeff, numbers.Real)
        or not 0.0 < float(coeff) < 1.0
    ):
        raise ValueError(
            "`coeff` must be a real number in the open interval (0, 1), so that the normalized "
            f"map is a contraction; got coeff={coeff!r}."
        )
    return float(coeff)


def _check_power_iterations(power_iterations: Any, name: str = "power_iterations") -> int:
    if (
        isinstance(power_iterations, bool)
        or not isinstance(power_iterations, numbers.Integral)
        or power_iterations < 0
    ):
        raise ValueError(f"`{name}` must be a non-negative int; got {name}={power_iterations!r}.")
    return int(power_iterations)


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not float(tol) >= 0.0:
        raise ValueError(f"`tol` must be a non-negative float; got tol={tol!r}.")
    return float(tol)


def _check_method(method: Any) -> str:
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}; got method={method!r}.")
    return method


def _check_wrapped_layer(layer: Any) -> None:
    supported = (
        "SpectralNormalization supports keras.layers.Dense and keras.layers.Conv2D "
        "(data_format='channels_last', groups=1, not quantized)"
    )
    if not isinstance(layer, keras.layers.Dense | keras.layers.Conv2D):
        raise TypeError(f"{supported}; got {type(layer).__name__}: {layer!r}.")
    if isinstance(layer, keras.layers.Conv2D):
        if layer.data_format != "channels_last":
            raise TypeError(f"{supported}; got a Conv2D with data_format={layer.data_format!r}.")
        if layer.groups != 1:
            raise TypeError(f"{supported}; got a Conv2D with groups={layer.groups}.")
    if getattr(layer, "quantization_mode", None) is not None:
        raise TypeError(f"{supported}; got a layer quantized with {layer.quantization_mode!r}.")


@keras.saving.register_keras_serializable(package="tf_iresnet")
class SpectralNormalization(keras.layers.Layer):
    """Soft spectral normalization of a `Dense` or `Conv2D` layer, by its true operator norm.

    Wraps a layer computing ``y = act(A_W x + b)`` and computes instead
    ``y = act(A_{W_n} x + b)`` with

    ``W_n = W / max(1, sigma / coeff)``,

    where ``sigma`` estimates ``||A_W||_2``, the largest singular value of the linear map
    ``x -> A_W x``. Below ``coeff`` the kernel is used as is; above, it is rescaled to norm
    ``coeff`` (up to the estimation error). The wrapped layer's kernel variable is never
    modified: the optimizer updates W and the normalization is applied on every call.

    #### Mathematical Details

    *The operator.* For a `Dense` layer with kernel ``W`` of shape ``[in, out]``,
    ``A v = W^T v`` and ``||A||_2`` is the largest singular value of W (inputs of any rank: the
    map acts on the last axis, and a block-diagonal map has the norm of its block). For a
    `Conv2D`, ``A v = conv2d(v, W)`` on an input of the static spatial size ``H x W`` seen at
    build time, with the layer's strides, padding and dilation: this is the map whose norm bounds
    the layer's Lipschitz constant, and it depends on the input size, the stride and the padding,
    not only on the kernel.

    *Power iteration.* The layer keeps two non-trainable unit vectors, ``v`` in the input space
    (shape ``[in]`` or ``[1, H, W, C_in]``) and ``u`` in the output space (``[out]`` or
    ``[1, H', W', C_out]``). One iteration is

    ``v <- normalize(A^T u)``,  ``u <- normalize(A v)``,

    with ``A^T`` the exact adjoint (`tf.nn.conv2d_transpose` for convolutions). The estimate is
    ``sigma = <u, A v>``, computed with u, v held fixed (`tf.stop_gradient`), so the gradient
    reaches the kernel through sigma: ``d sigma / dW = u v^T`` (for a convolution, the
    correlation of v and u), the gradient of the top singular value at convergence. Dropping it
    (as `keras.layers.SpectralNormalization` does) biases the gradient.

    *State.* u and v persist across steps: each training call (``training=True``) runs
    ``power_iterations`` more iterations from them, so the estimate keeps tracking a slowly
    changing W. Inference calls use the stored state unchanged. Power iteration converges from
    below, so the true norm after normalization can exceed ``coeff`` slightly (one power
    iteration per step tracks a slowly changing W, but convolutions have clustered top singular
    values and power iteration converges slowly on them): use `lipschitz_estimate` (or
    `converge_spectral_norms`, both Lanczos by default) to converge the state to a tolerance,
    e.g. after each optimizer step, before export and after loading weights, and
    `lipschitz_upper_bound` for a rigorous bound. When the layer is built, the state is
    initialized to random unit vectors and then refined (up to 32 Lanczos steps, relative
    residual 1e-4) if the build runs eagerly, so that the normalization is active from the
    first call. (A layer first built inside a `tf.function` keeps random u, v until its first
    training call or `lipschitz_estimate`.)

    *Distribution.* u and v are created with ``aggregation="only_first_replica"``: every
    replica computes the same update from the same mirrored kernel, and the first replica's
    value is written to all copies, so assigning them inside ``strategy.run`` is allowed.

    *Precision.* The normalization runs in the variable dtype (float32 under a mixed policy);
    only the normalized kernel and bias are cast to the compute dtype.

    #### Examples

    ```python
    import keras
    from tf_iresnet.spectral_norm import SpectralNormalization, lipschitz_report

    conv = SpectralNormalization(keras.layers.Conv2D(16, 3, padding="same"), coeff=0.9)
    y = conv(keras.random.normal([4, 32, 32, 8]), training=True)  # [4, 32, 32, 16]
    conv.lipschitz_estimate(power_iterations=200, tol=1e-5)      # ~<= 0.9
    conv.lipschitz_upper_bound()                                 # rigorous, >= true norm
    ```

    #### References

    [1] Takeru Miyato, Toshiki Kataoka, Masanori Koyama, Yuichi Yoshida. Spectral
        Normalization for Generative Adversarial Networks. ICLR 2018.
        https://arxiv.org/abs/1802.05957
    [2] Jens Behrmann, Will Grathwohl, Ricky T. Q. Chen, David Duvenaud, Joern-Henrik Jacobsen.
        Invertible Residual Networks. ICML 2019. https://arxiv.org/abs/1811.00995
    [3] Hanie Sedghi, Vineet Gupta, Philip M. Long. The Singular Values of Convolutional
        Layers. ICLR 2019. https://arxiv.org/abs/1805.10408
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        coeff: float = 0.9,
        power_iterations: int = 1,
        **kwargs: Any,
    ) -> None:
        """Wraps ``layer``.

        Args:
          layer: an unbuilt or built `keras.layers.Dense`, or a `keras.layers.Conv2D` with
            ``data_format="channels_last"`` and ``groups=1`` (any strides, padding, dilation,
            bias and activation). Its kernel is read, never written.
          coeff: float in (0, 1); the bound on the operator norm of the normalized map.
            Default 0.9.
          power_iterations: non-negative int; power iterations run by each training call.
            Default 1. 0 freezes the estimate during training (update it with
            `lipschitz_estimate`).
          **kwargs: `keras.layers.Layer` arguments (``name``, ``dtype``, ...). ``dtype``
            defaults to the wrapped layer's dtype policy.

        Raises:
          TypeError: ``layer`` is not a supported layer.
          ValueError: ``coeff`` not in (0, 1), or ``power_iterations`` not a non-negative int.
        """
        _check_wrapped_layer(layer)
        coeff = _check_coeff(coeff)
        power_iterations = _check_power_iterations(power_iterations)
        kwargs.setdefault("dtype", layer.dtype_policy)
        # The normalization is computed in the variable dtype, whatever the compute dtype: turn
        # off Keras' variable autocasting inside `call` (inputs are cast by hand instead).
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        self.layer = layer
        self.coeff = coeff
        self.power_iterations = power_iterations
        self._is_conv = isinstance(layer, keras.layers.Conv2D)
        if self._is_conv:
            self._spec = _OperatorSpec(
                kind="conv2d",
                strides=tuple(int(s) for s in layer.strides),
                padding=layer.padding.upper(),
                dilations=tuple(int(d) for d in layer.dilation_rate),
            )
        else:
            self._spec = _OperatorSpec(kind="dense")
        self._input_hw: tuple[int, int] | None = None

    # -- construction ------------------------------------------------------------------------

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        """Builds the wrapped layer and creates the power-iteration state u and v.

        Args:
          input_shape: the input shape. Dense: ``[..., in]``. Conv2D: ``[batch, H, W, C_in]``
            with static H and W (the operator is the convolution at that size).

        Raises:
          ValueError: a Conv2D input whose spatial size is not static.
          TypeError: the wrapped layer was quantized after wrapping.
        """
        input_shape = tuple(input_shape)
        _check_wrapped_layer(self.layer)
        if self._is_conv:
            if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
                raise ValueError(
                    f"SpectralNormalization({self.layer.name}) needs a static spatial size: the "
                    "norm of a convolution depends on the input's height and width. Got "
                    f"input_shape={input_shape}; give the model an input shape such as "
                    "(None, 32, 32, channels)."
                )
            self._input_hw = (int(input_shape[1]), int(input_shape[2]))
        if not self.layer.built:
            self.layer.build(input_shape)
        kernel_in = int(self.layer.kernel.shape[-2])
        if input_shape[-1] is not None and int(input_shape[-1]) != kernel_in:
            raise ValueError(
                f"SpectralNormalization({self.layer.name}): the wrapped layer was built for "
                f"{kernel_in} input features/channels, got input_shape={input_shape}."
            )

        if self._is_conv:
            v_shape = (1, *self._input_hw, kernel_in)
            u_shape = tuple(self.layer.compute_output_shape((1, *self._input_hw, kernel_in)))
            if any(d is None or d <= 0 for d in u_shape):
                raise ValueError(
                    f"SpectralNormalization({self.layer.name}): input_shape={input_shape} gives "
                    f"an empty convolution output {u_shape}."
                )
        else:
            v_shape = (kernel_in,)
            u_shape = (int(self.layer.kernel.shape[-1]),)
        self.v = self.add_weight(
            name="v",
            shape=v_shape,
            initializer=_RandomUnitVector(),
            trainable=False,
            aggregation="only_first_replica",
        )
        self.u = self.add_weight(
            name="u",
            shape=u_shape,
            initializer=_RandomUnitVector(),
            trainable=False,
            aggregation="only_first_replica",
        )
        # Align u and v with the kernel now, so that sigma is a meaningful (if rough) estimate
        # before the first training step. Only when building eagerly: a layer first built while
        # a tf.function is being traced has a kernel that is not initialized yet.
        if tf.executing_eagerly():
            self._iterate_to_tolerance(_BUILD_MAX_ITERATIONS, _BUILD_TOLERANCE, "lanczos")

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple:
        return self.layer.compute_output_shape(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "layer": keras.layers.serialize(self.layer),
                "coeff": self.coeff,
                "power_iterations": self.power_iterations,
            }
        )
        return config

    @classmethod
    def from_config(
        cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None
    ) -> SpectralNormalization:
        config = dict(config)
        config.pop("autocast", None)
        layer = keras.layers.deserialize(config.pop("layer"), custom_objects=custom_objects)
        return cls(layer, **config)

    # -- maths ---------------------------------------------------------------------------------

    def _kernel(self) -> tf.Tensor:
        """The wrapped layer's kernel as a tensor in the variable dtype."""
        return tf.convert_to_tensor(self.layer.kernel)

    def _state(self) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)

    def power_iterate(self, iterations: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Runs ``iterations`` (default ``power_iterations``) plain power iterations from the
        stored u, v on the current kernel, stores and returns the new ``(u, v)``.

        What ``call(training=True)`` does before normalizing. Training loops that XLA-compile
        their forward pass under a mirrored strategy call this after the optimizer update
        instead (an assignment to a mirrored variable inside a nested compiled function needs a
        cross-replica synchronization TF cannot do there).
        """
        self._check_built("power_iterate")
        iterations = self.power_iterations if iterations is None else iterations
        u, v = self._state()
        if iterations > 0:
            u, v = _power_iteration(
                self._spec, tf.stop_gradient(self._kernel()), u, v, iterations)
            u, v = tf.stop_gradient(u), tf.stop_gradient(v)
            self.u.assign(u)
            self.v.assign(v)
        return u, v

    def _normalize_kernel(self, kernel: tf.Tensor, u: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """``W / max(1, <u, A_W v> / coeff)`` with u, v constant, differentiable in W."""
        u, v = tf.stop_gradient(u), tf.stop_gradient(v)
        sigma = _bilinear(self._spec, kernel, u, v)
        return kernel / tf.maximum(tf.ones_like(sigma), sigma / self.coeff)

    def _iterate_to_tolerance(
        self, max_iterations: int, tol: float, method: str = "lanczos"
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Refines the stored u, v to relative residual ``tol`` and stores them.

        Returns ``(sigma, iterations, converged)`` (tensors).
        """
        u, v = self._state()
        kernel = tf.stop_gradient(self._kernel())
        solver = _solver(method, self._spec, kernel, u, v)
        u, v, sigma, iterations, converged = solver(
            kernel,
            u,
            v,
            tf.constant(max_iterations, tf.int32),
            tf.constant(tol, kernel.dtype),
        )
        self.u.assign(u)
        self.v.assign(v)
        return sigma, iterations, converged

    def _check_built(self, method: str) -> None:
        if not self.built:
            raise ValueError(
                f"Build {self.name} (call it on an input, or call build(input_shape)) before "
                f"calling {method}()."
            )

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        """Applies the wrapped layer with the normalized kernel.

        Args:
          inputs: Dense: ``[..., in]``; Conv2D: ``[batch, H, W, C_in]`` with the H, W seen at
            build time.
          training: Python bool or None. If truthy, first runs ``power_iterations`` power
            iterations from the stored u, v and stores the result (outside the gradient);
            otherwise the stored state is used unchanged.

        Returns:
          Dense: ``[..., out]``; Conv2D: ``[batch, H', W', C_out]``, in the compute dtype.
        """
        if self._is_conv:
            hw = tuple(inputs.shape[1:3])
            if any(d is not None and d != e for d, e in zip(hw, self._input_hw, strict=True)):
                raise ValueError(
                    f"{self.name} was built for inputs of spatial size {self._input_hw}, and "
                    f"its normalization bounds the convolution at that size only; got inputs "
                    f"of shape {tuple(inputs.shape)}."
                )
        kernel = self._kernel()
        if training and self.power_iterations > 0:
            u, v = self.power_iterate()
        else:
            u, v = self._state()
        kernel = self._normalize_kernel(kernel, u, v)

        compute_dtype = self.compute_dtype
        if inputs.dtype.is_floating and inputs.dtype != compute_dtype:
            inputs = tf.cast(inputs, compute_dtype)
        kernel = tf.cast(kernel, compute_dtype)
        if self._is_conv:
            # tf.nn.convolution runs a dilated convolution as space-to-batch around a plain
            # one on CPU (as Keras's Conv2D does), so that its gradient exists without oneDNN.
            outputs = tf.nn.convolution(
                inputs,
                kernel,
                strides=list(self._spec.strides),
                padding=self._spec.padding,
                dilations=list(self._spec.dilations),
                data_format="NHWC",  # explicit: the eager second-order gradient reads it
            )
        else:
            outputs = tf.matmul(inputs, kernel)
        if self.layer.use_bias:
            outputs = tf.nn.bias_add(outputs, tf.cast(self.layer.bias, compute_dtype))
        if self.layer.activation is not None:
            outputs = self.layer.activation(outputs)
        return outputs

    # -- diagnostics ---------------------------------------------------------------------------

    def sigma(self) -> tf.Tensor:
        """The current raw estimate ``<u, A_W v>`` of ``||A_W||_2`` (stored state, no update).

        Returns:
          scalar tensor in the variable dtype; a lower bound on the unnormalized norm up to
          rounding once u and v are aligned.
        """
        self._check_built("sigma")
        u, v = self._state()
        return _bilinear(self._spec, self._kernel(), u, v)

    def normalized_kernel(self) -> tf.Tensor:
        """``W_n = W / max(1, sigma / coeff)`` from the stored u, v (no update).

        Differentiable in the kernel (through W and sigma). Same shape as the wrapped kernel.
        """
        self._check_built("normalized_kernel")
        u, v = self._state()
        return self._normalize_kernel(self._kernel(), u, v)

    def lipschitz_estimate(
        self, power_iterations: int = 200, tol: float = 1e-4, method: str = "lanczos"
    ) -> tf.Tensor:
        """Converges the estimate of ``||A_W||`` and returns the normalized layer's norm.

        Refines the stored u, v with up to ``power_iterations`` iterations, each one product
        with A and one with A^T, until the relative residual ``||A^T u - sigma v|| / sigma``
        (with ``A v = sigma u``) is at most ``tol``, and stores them: from then on the
        normalization (training and inference) uses this estimate. ``power_iterations=0``
        changes nothing.

        * ``method="lanczos"`` (default): restarted Golub-Kahan-Lanczos bidiagonalization
          started from the stored v (see `_lanczos_cycle`); u, v become the top Ritz vectors.
        * ``method="power"``: the training step's power iteration, run to the same criterion.

        The top singular values of a convolution are clustered (``s_1 / s_2 ~ 1.002`` on an
        8x8 input), which makes power iteration slow. Measured from random u, v on 3x3 convs
        (8x8 to 32x32, 3 to 64 channels): Lanczos reaches the criterion at tol=1e-4 in 16-67
        iterations with relative error of sigma <= 1e-5; power iteration needs 230-1400
        iterations, and at tol=1e-3 can stop 2e-3 below the norm, near the second singular
        value. Both estimates approach the norm from below, and the residual only proves that
        sigma is close to *some* singular value: `lipschitz_upper_bound` gives a guarantee.

        Args:
          power_iterations: non-negative int, the maximal number of iterations. Default 200.
          tol: non-negative float, relative residual at which to stop. Default 1e-4.
          method: ``"lanczos"`` or ``"power"``. Default ``"lanczos"``.

        Returns:
          scalar tensor, ``sigma / max(1, sigma / coeff) = min(sigma, coeff)``: the estimated
          operator norm of the normalized map.

        Raises:
          ValueError: bad ``power_iterations``, ``tol`` or ``method``.
        """
        self._check_built("lipschitz_estimate")
        power_iterations = _check_power_iterations(power_iterations)
        tol = _check_tol(tol)
        method = _check_method(method)
        if power_iterations > 0:
            sigma, _, _ = self._iterate_to_tolerance(power_iterations, tol, method)
        else:
            sigma = self.sigma()
        return sigma / tf.maximum(tf.ones_like(sigma), sigma / self.coeff)

    def lipschitz_upper_bound(self) -> tf.Tensor:
        """A rigorous upper bound on the operator norm of the normalized linear map.

        Dense: the exact largest singular value of ``W_n`` (SVD). Conv2D: the Sedghi et al.
        bound, the largest singular value over the 2-D DFT of the (dilated) kernel zero-padded
        to the grid ``(H + e_h - 1) x (W + e_w - 1)``, which bounds the zero-padded, strided
        convolution at H x W (see `_conv2d_norm_upper_bound`). Uses the stored u, v (no update).
        Cost: SVDs of ``(H + e_h - 1)(floor((W + e_w - 1) / 2) + 1)`` complex ``C_in x C_out``
        matrices; measured on 2 CPU cores, 3x3 kernels: ~6 s for 128 channels at 32x32, ~40 s
        for 512 channels at 16x16.

        Returns:
          float64 scalar tensor.
        """
        self._check_built("lipschitz_upper_bound")
        kernel = tf.stop_gradient(self.normalized_kernel())
        if self._is_conv:
            return _conv2d_norm_upper_bound(kernel, self._input_hw, self._spec.dilations)
        return tf.linalg.svd(tf.cast(kernel, tf.float64), compute_uv=False)[0]


class _RandomUnitVector:
    """Initializer: a standard normal sample divided by its norm (uniform on the sphere).

    Seeded once at construction like Keras' unseeded initializers, so `keras.utils.
    set_random_seed` makes it reproducible; stateless, so it can run when variables are lifted
    out of a `tf.function`.
    """

    def __init__(self) -> None:
        self._normal = keras.initializers.RandomNormal(mean=0.0, stddev=1.0)

    def __call__(self, shape: tuple[int, ...], dtype: Any = None) -> tf.Tensor:
        sample = tf.convert_to_tensor(self._normal(shape, dtype=dtype))
        return sample / tf.norm(tf.reshape(sample, [-1]))


# --------------------------------------------------------------------------------------------
# Model-level helpers.
# --------------------------------------------------------------------------------------------


def _children(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers tracked directly by ``layer``, in tracking order (Keras' ``_layers``)."""
    return list(getattr(layer, "_layers", None) or [])


def _walk(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """``model`` and all its sublayers, depth first in tracking order, each once.

    Does not descend into `SpectralNormalization` layers (their child is the wrapped layer).
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"Expected a keras.layers.Layer or keras.Model; got {type(model)}.")
    seen: set[int] = set()
    order: list[keras.layers.Layer] = []
    stack = [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        order.append(layer)
        if not isinstance(layer, SpectralNormalization):
            stack.extend(reversed(_children(layer)))
    return order


def spectral_norm_layers(model: keras.layers.Layer) -> list[SpectralNormalization]:
    """All `SpectralNormalization` layers in ``model`` (itself included), depth first, each once.

    Args:
      model: a Keras layer or model.

    Returns:
      list of `SpectralNormalization` layers.
    """
    return [layer for layer in _walk(model) if isinstance(layer, SpectralNormalization)]


def update_spectral_norms(model: keras.layers.Layer, iterations: int | None = None) -> None:
    """Runs ``power_iterate`` on every spectral-normalized layer of ``model`` (each its own
    ``power_iterations`` unless ``iterations`` is given)."""
    for layer in spectral_norm_layers(model):
        layer.power_iterate(iterations)


def converge_spectral_norms(
    model: keras.layers.Layer,
    tol: float = 1e-4,
    max_iterations: int = 200,
    method: str = "lanczos",
) -> None:
    """Converges the power-iteration state of every spectral-normalized layer of ``model``.

    Runs `SpectralNormalization.lipschitz_estimate` on each built layer: up to
    ``max_iterations`` iterations of ``method``, to relative residual ``tol``. Use before
    exporting or evaluating a trained model, and after loading weights (e.g. when only kernels
    were loaded), so that the normalization uses converged estimates. Logs a warning for each
    layer that hit the cap without converging.

    Args:
      model: a Keras layer or model.
      tol: non-negative float, relative residual at which to stop, see `lipschitz_estimate`.
        Default 1e-4.
      max_iterations: non-negative int, per-layer iteration cap. Default 200.
      method: ``"lanczos"`` (default) or ``"power"``, see `lipschitz_estimate`.
    """
    max_iterations = _check_power_iterations(max_iterations, "max_iterations")
    tol = _check_tol(tol)
    method = _check_method(method)
    if max_iterations == 0:
        return
    for layer in spectral_norm_layers(model):
        if not layer.built:
            continue
        sigma, iterations, converged = layer._iterate_to_tolerance(max_iterations, tol, method)
        if not bool(converged):
            _LOG.warning(
                "The norm estimate of %s did not reach tol=%g in %d iterations (sigma=%.6g).",
                layer.name,
                tol,
                int(iterations),
                float(sigma),
            )


def lipschitz_report(
    model: keras.layers.Layer,
    power_iterations: int = 0,
    tol: float = 1e-4,
    method: str = "lanczos",
    upper_bounds: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Per-layer and per-block Lipschitz estimates and bounds of a model's normalized maps.

    Args:
      model: a Keras layer or model (built).
      power_iterations: non-negative int. 0 (default) reports the stored estimates and changes
        no state; otherwise each layer first runs ``lipschitz_estimate(power_iterations, tol)``,
        which updates its u and v.
      tol: relative tolerance passed to `lipschitz_estimate` when ``power_iterations > 0``.
      method: ``"lanczos"`` (default) or ``"power"``, passed to `lipschitz_estimate`.
      upper_bounds: bool, default True. False skips `lipschitz_upper_bound` (an SVD per
        frequency: minutes for a model with many 512-channel convolutions) and reports
        ``"upper_bound": None``; use it for frequent logging.

    Returns:
      ``{"layers": [...], "blocks": [...]}``, lists of ``{"name", "estimate", "upper_bound"}``
      with Python float values (``upper_bound`` None when ``upper_bounds=False``).

      * ``"layers"``: one entry per built `SpectralNormalization` layer: the estimated norm of
        its normalized map (`lipschitz_estimate`) and the rigorous bound
        (`lipschitz_upper_bound`).
      * ``"blocks"``: one entry per layer (model included) that directly tracks
        `SpectralNormalization` layers: the products of its children's estimates and bounds.
        When those maps are composed in sequence with 1-Lipschitz activations in between (the
        residual branch g of an i-ResNet block), the product of the upper bounds bounds
        ``Lip(g)``, and the product of the estimates is what the normalization aims at.
    """
    power_iterations = _check_power_iterations(power_iterations)
    entries: dict[int, dict[str, Any]] = {}
    layers_out: list[dict[str, Any]] = []
    for layer in spectral_norm_layers(model):
        if not layer.built:
            continue
        entry = {
            "name": layer.name,
            "estimate": float(layer.lipschitz_estimate(power_iterations, tol, method)),
            "upper_bound": float(layer.lipschitz_upper_bound()) if upper_bounds else None,
        }
        entries[id(layer)] = entry
        layers_out.append(entry)

    blocks_out: list[dict[str, Any]] = []
    for layer in _walk(model):
        if isinstance(layer, SpectralNormalization):
            continue
        children = [entries[id(c)] for c in _children(layer) if id(c) in entries]
        # Tracking shows which layers a block owns, not how often it calls them: each counts once.
        children = list({id(c): c for c in children}.values())
        if not children:
            continue
        blocks_out.append(
            {
                "name": layer.name,
                "estimate": math.prod(c["estimate"] for c in children),
                "upper_bound": (
                    math.prod(c["upper_bound"] for c in children) if upper_bounds else None
                ),
            }
        )
    return {"layers": layers_out, "blocks": blocks_out}
