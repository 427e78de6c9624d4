"""Model-level helpers: find, update, converge and report every `SpectralNormalization` layer."""

from __future__ import annotations

import logging
import math
from typing import Any

import keras

from tf_iresnet.lipschitz.layer import (
    SpectralNormalization,
    _check_method,
    _check_power_iterations,
    _check_tol,
    folded_kernels,
)

_LOG = logging.getLogger(__name__)


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


def folded_spectral_norms(model: keras.layers.Layer):
    """A context in which every `SpectralNormalization` of ``model`` computes with its
    normalized kernel ``W / max(1, sigma / coeff)`` as a constant (`layer.folded_kernels`):
    functions traced inside, such as a SavedModel's serving endpoints, run no power iteration
    and compute no sigma. Converge the estimates first (`converge_spectral_norms`)."""
    return folded_kernels(spectral_norm_layers(model))


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
