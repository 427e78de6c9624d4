"""Contractive residual branches g for invertible residual blocks."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tf_iresnet.activations import get_activation
from tf_iresnet.lipschitz import SpectralNormalization

__all__ = ["conv_branch", "dense_branch"]


def conv_branch(
    input_shape: Sequence[int],
    hidden_channels: int,
    *,
    coeff: float = 0.9,
    power_iterations: int = 1,
    kernel_size: int = 3,
    activation: str = "elu",
    leading_activation: bool = True,
    name: str | None = None,
) -> keras.Sequential:
    """The i-ResNet convolutional branch, built for NHWC inputs of shape ``input_shape``.

    ``phi -> conv kxk (C -> hidden) -> phi -> conv 1x1 (hidden -> hidden) -> phi ->
    conv kxk (hidden -> C)``, each convolution spectrally normalized to operator norm
    ``<= coeff`` at the input resolution, so ``Lip(g) <= coeff^3`` with 1-Lipschitz phi.
    The first block of a network drops the leading phi (``leading_activation=False``).

    Args:
      input_shape: ``(H, W, C)`` of one event (static; spectral norms are per resolution).
      hidden_channels: width of the hidden convolutions.
      coeff: spectral-norm coefficient in (0, 1).
      power_iterations: power iterations per training call.
      kernel_size: size of the outer convolutions (3 in the paper).
      activation: ``"elu"`` (paper), ``"lipswish"`` or ``"relu"``.
      leading_activation: start with an activation.
    """
    h, w, c = input_shape

    def sn(conv):
        return SpectralNormalization(conv, coeff=coeff, power_iterations=power_iterations)

    layers = []
    if leading_activation:
        layers.append(get_activation(activation))
    layers += [
        sn(keras.layers.Conv2D(hidden_channels, kernel_size, padding="same")),
        get_activation(activation),
        sn(keras.layers.Conv2D(hidden_channels, 1, padding="same")),
        get_activation(activation),
        sn(keras.layers.Conv2D(c, kernel_size, padding="same")),
    ]
    branch = keras.Sequential(layers, name=name)
    branch.build((None, h, w, c))
    return branch


def dense_branch(
    dim: int,
    hidden_units: int | Sequence[int],
    *,
    coeff: float = 0.9,
    power_iterations: int = 1,
    activation: str = "lipswish",
    name: str | None = None,
) -> keras.Sequential:
    """A fully connected contractive branch ``[B, dim] -> [B, dim]`` (for vector data).

    ``dense -> phi -> ... -> dense`` with one hidden layer per entry of ``hidden_units``; each
    dense layer spectrally normalized to norm ``<= coeff``.
    """
    if isinstance(hidden_units, int):
        hidden_units = (hidden_units, hidden_units)
    layers = []
    for units in hidden_units:
        layers += [
            SpectralNormalization(keras.layers.Dense(units), coeff=coeff,
                                  power_iterations=power_iterations),
            get_activation(activation),
        ]
    layers.append(SpectralNormalization(keras.layers.Dense(dim), coeff=coeff,
                                        power_iterations=power_iterations))
    branch = keras.Sequential(layers, name=name)
    branch.build((None, dim))
    return branch
