"""Tests for tf_iresnet.lipschitz.fft_bound: the FFT bound of a convolution's operator norm."""

import keras
import pytest
from _lipschitz import (
    C_IN,
    C_OUT,
    COEFF,
    HW,
    scale_kernel,
    spectral_norm,
    true_conv_norm,
)

from tf_iresnet.lipschitz.layer import SpectralNormalization

pytestmark = pytest.mark.usefixtures("keras_seed")


def test_one_by_one_conv_bound_is_exact():
    # A 1x1 convolution applies the same C_in x C_out matrix at every pixel: its norm is the
    # norm of that matrix, and the frequency-domain bound has no slack.
    layer = SpectralNormalization(keras.layers.Conv2D(C_OUT, 1), coeff=COEFF)
    layer.build((None, HW, HW, C_IN))
    scale_kernel(layer, 0.3)
    matrix_norm = spectral_norm(layer.layer.kernel.numpy()[0, 0])
    assert matrix_norm < COEFF
    assert true_conv_norm(layer) == pytest.approx(matrix_norm, rel=1e-5)
    assert float(layer.lipschitz_upper_bound()) == pytest.approx(matrix_norm, rel=1e-5)
