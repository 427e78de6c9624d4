"""A rigorous upper bound on a convolution's operator norm, from the 2-D DFT of its kernel."""

from __future__ import annotations

import tensorflow as tf

from tf_iresnet.lipschitz.operators import _dilate_kernel


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
