"""Preprocessing bijectors for dequantized images in [0, 1]."""

from __future__ import annotations

import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = ["logit_preprocessing", "centering"]


def logit_preprocessing(alpha: float = 0.05) -> tfb.Bijector:
    """Maps dequantized data ``x in [0, 1]`` to ``logit(alpha + (1 - 2 alpha) x)`` (RealNVP).

    The data-to-latent (forward) direction; its log-det
    ``sum log(1 - 2 alpha) - log s - log(1 - s)`` with ``s = alpha + (1 - 2 alpha) x`` is part of
    the model's likelihood, so bits/dim stay those of the data in [0, 1]. ``alpha`` keeps the
    logit away from infinities at 0 and 1.
    """
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha}.")
    return tfb.Chain(
        [tfb.Invert(tfb.Sigmoid()), tfb.Shift(alpha), tfb.Scale(1.0 - 2.0 * alpha)],
        name="logit_preprocessing",
    )


def centering(shift: float = -0.5) -> tfb.Bijector:
    """``x -> x - 0.5``: the official i-ResNet density code's only preprocessing (log-det 0)."""
    return tfb.Shift(shift, name="centering")
