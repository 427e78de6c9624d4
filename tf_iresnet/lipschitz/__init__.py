"""Spectral normalization of dense and convolutional layers, with Lipschitz diagnostics.

An i-ResNet block ``y = x + g(x)`` is invertible when ``Lip(g) < 1``. With 1-Lipschitz
activations, ``Lip(g)`` is at most the product of the operator norms of g's linear maps, so each
of them is rescaled to have norm at most ``coeff < 1``. For a convolution the norm that matters
is the norm of the convolution *as a linear map on the layer's input*, at the input's spatial
size, with the layer's strides, padding and dilation; not the norm of the kernel reshaped into a
matrix, which can be several times smaller.

The package provides:

* `SpectralNormalization` (`layer`): a Keras layer wrapping a `keras.layers.Dense` or
  `keras.layers.Conv2D`, which estimates the operator norm by power iteration with persistent
  state and applies the soft normalization ``W / max(1, sigma / coeff)``.
* `lipschitz_report`, `spectral_norm_layers`, `update_spectral_norms`,
  `converge_spectral_norms` (`model`): model-level helpers to inspect the constraint, to run the
  training step's power iterations, and to converge the power-iteration state before export or
  after loading weights.

Internals: `operators` (the linear map and its adjoint), `solvers` (power iteration, Lanczos),
`fft_bound` (the FFT upper bound of a convolution's norm, Sedghi et al.).
"""

from tf_iresnet.lipschitz.layer import SpectralNormalization
from tf_iresnet.lipschitz.model import (
    converge_spectral_norms,
    folded_spectral_norms,
    lipschitz_report,
    spectral_norm_layers,
    update_spectral_norms,
)

__all__ = [
    "SpectralNormalization",
    "converge_spectral_norms",
    "folded_spectral_norms",
    "lipschitz_report",
    "spectral_norm_layers",
    "update_spectral_norms",
]
