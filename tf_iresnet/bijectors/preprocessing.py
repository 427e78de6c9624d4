"""Preprocessing bijectors for dequantized images in [0, 1]."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

from tf_iresnet.bijectors.checks import InputCheck

tfb = tfp.bijectors

__all__ = ["logit_preprocessing", "centering"]


def logit_preprocessing(alpha: float = 0.05, *, dtype=tf.float32,
                        validate_args: bool = False) -> tfb.Bijector:
    """Maps dequantized data ``x in [0, 1]`` to ``logit(alpha + (1 - 2 alpha) x)`` (RealNVP).

    The data-to-latent (forward) direction; its log-det
    ``sum log(1 - 2 alpha) - log s - log(1 - s)`` with ``s = alpha + (1 - 2 alpha) x`` is part of
    the model's likelihood, so bits/dim stay those of the data in [0, 1]. ``alpha`` keeps the
    logit away from infinities at 0 and 1. Inputs of another ``dtype`` are refused with a
    message naming it; ``validate_args=True`` also checks that they are finite.
    """
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha}.")
    return tfb.Chain(
        [InputCheck(dtype, validate_args=validate_args, name="logit_preprocessing_output"),
         tfb.Invert(tfb.Sigmoid(validate_args=validate_args)),
         tfb.Shift(tf.constant(alpha, dtype)), tfb.Scale(tf.constant(1.0 - 2.0 * alpha, dtype)),
         InputCheck(dtype, validate_args=validate_args, name="logit_preprocessing_input")],
        validate_args=validate_args, name="logit_preprocessing",
    )


def centering(shift: float = -0.5, *, dtype=tf.float32,
              validate_args: bool = False) -> tfb.Bijector:
    """``x -> x - 0.5``: the official i-ResNet density code's only preprocessing (log-det 0).

    Inputs of another ``dtype`` are refused with a message naming it; ``validate_args=True``
    also checks that they are finite."""
    return tfb.Chain(
        [InputCheck(dtype, validate_args=validate_args, name="centering_output"),
         tfb.Shift(tf.constant(shift, dtype)),
         InputCheck(dtype, validate_args=validate_args, name="centering_input")],
        validate_args=validate_args, name="centering")
