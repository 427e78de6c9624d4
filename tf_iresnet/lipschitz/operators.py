"""The linear map a `Dense` or `Conv2D` kernel defines, as pure functions of the kernel.

`_OperatorSpec` describes the map ``A``; `_matvec` and `_rmatvec` apply ``A`` and its exact
adjoint ``A^T``; `_bilinear` is the estimate ``<u, A v>`` of the largest singular value;
`_normalize` keeps iterates unit vectors; `_dilate_kernel` materializes a dilated kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

# Norms below this are treated as zero by the vector normalization.
_EPS = 1e-12


class _OperatorSpec(NamedTuple):
    """Static description of the linear map ``A`` a kernel defines.

    A NamedTuple of Python literals, so that `tf.function` traces by value and layers with the
    same configuration share a trace.

    Attributes:
      operator: ``"dense"`` (``A v = W^T v`` for a kernel ``W`` of shape ``[in, out]``) or
        ``"conv2d"`` (``A v = conv2d(v, W)``, NHWC, kernel ``[kh, kw, in, out]``).
      strides: convolution strides ``(sh, sw)``.
      padding: ``"SAME"`` or ``"VALID"``.
      dilations: convolution dilation rates ``(dh, dw)``.
    """

    operator: str
    strides: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    dilations: tuple[int, int] = (1, 1)


def _matvec(spec: _OperatorSpec, kernel: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    """``A v``: the layer's linear map (no bias, no activation) applied to ``v``.

    Shapes: dense ``v [in] -> [out]``; conv2d ``v [1, H, W, C_in] -> [1, H', W', C_out]``.
    """
    if spec.operator == "dense":
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
    if spec.operator == "dense":
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


def _bilinear(spec: _OperatorSpec, kernel: tf.Tensor, u: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    """``sigma = <u, A v>``, the power-iteration estimate of the largest singular value of A.

    Differentiable in ``kernel``; for fixed unit u, v its gradient is ``d sigma / dW = u v^T``
    in the appropriate layout, which is the gradient of the true top singular value when u, v
    are the top singular vectors.
    """
    return tf.reduce_sum(u * _matvec(spec, kernel, v))


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
