"""One traced function per block signature, called for every block of that signature.

Traced naively, a training step holds a copy of every residual block's graph (forward pass,
log-det estimate, their gradients), so the memory of the traced step, not of the activations,
grows with depth: about 45 MB per block on bench cifar-small widths (``benchmarks/README.md``,
"Depth"). The blocks of one scale compute the same function of different weights, so here an
ActNorm and the residual block after it form a *unit*, units with the same structure, shapes and
settings share one `tf.function` (kept out of line, ``_noinline``, so the runtime does not copy
its body into every call site), and each call passes that unit's weights as arguments. The
function runs the first unit's (the template's) Keras layers inside a `keras.StatelessScope`
that substitutes the weights it was given. Gradients flow through the calls as usual: TF
differentiates the shared function once, and the gradient of every call's weight arguments
reaches that unit's variables through the reads.

`tf_iresnet.invertible_gradient` uses the same units for its rebuild-and-recompute backward
pass. Eagerly (nothing is traced) the same Python code runs directly.
"""

from __future__ import annotations

import dataclasses
import json

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.bijectors import chain as chain_lib

from tf_iresnet.bijectors.actnorm import ActNorm
from tf_iresnet.bijectors.checks import check_input
from tf_iresnet.bijectors.iresblock import InvertibleResidualBlock
from tf_iresnet.bijectors.multiscale import MultiScale
from tf_iresnet.lipschitz.layer import folded_kernels_active
from tf_iresnet.logdet import stateless_seed

tfb = tfp.bijectors

__all__ = ["Unit", "UnitFunction", "forward_and_log_det", "group_units", "run_scales", "steps"]

# The attribute that keeps a function call out of line (TF's function inliner skips it).
NOINLINE = {"_noinline": True}


def steps(scale: tfb.Bijector) -> list[tfb.Bijector]:
    """A scale's bijectors in data-to-latent order (a Chain applies its last bijector first)."""
    # tfb.Chain of non-composite bijectors (the residual blocks) is a `_Chain`, Chain's base.
    if isinstance(scale, chain_lib._Chain):
        return list(reversed(scale.bijectors))
    return [scale]


def broadcast(ldj: tf.Tensor, batch: tf.Tensor, dtype) -> tf.Tensor:
    """A log-det (scalar or ``[B]``) as a ``[B]`` tensor of ``dtype``."""
    return tf.broadcast_to(tf.cast(ldj, dtype), [batch])


def _strip_names(config):
    if isinstance(config, dict):
        return {k: _strip_names(v) for k, v in config.items() if k != "name"}
    if isinstance(config, list | tuple):
        return [_strip_names(v) for v in config]
    return config


@dataclasses.dataclass(frozen=True, eq=False)
class Unit:
    """An optional ActNorm and the residual block after it, with the Keras weights they read.

    ``trainable`` and ``frozen`` list the unit's variables (the ActNorm state's, then the
    branch's) in an order that is the same for every unit of one signature.
    """

    actnorm: ActNorm | None
    block: InvertibleResidualBlock

    @property
    def layers(self) -> list[keras.layers.Layer]:
        return ([self.actnorm.state] if self.actnorm is not None else []) + [
            self.block.residual_fn]

    @property
    def trainable(self) -> list[keras.Variable]:
        return [v for layer in self.layers for v in layer.trainable_variables]

    @property
    def frozen(self) -> list[keras.Variable]:
        return [v for layer in self.layers for v in layer.non_trainable_variables]

    def signature(self) -> str:
        """Equal for units that one traced function computes (structure, shapes, settings)."""
        b = self.block
        return json.dumps([
            [_strip_names(keras.layers.serialize(layer)) for layer in self.layers],
            [[list(v.shape), str(v.dtype)] for v in self.trainable + self.frozen],
            repr(b.logdet_config), repr(b.inverse_config), b._event_ndims, b.validate_args,
            b._recompute, b._logdet_in_forward,
            None if self.actnorm is None else self.actnorm.validate_args,
        ], sort_keys=True, default=repr)

    @property
    def custom_variable_gradient(self) -> bool:
        """The block differentiates in variables it reads itself (``recompute``,
        ``logdet_in_forward``): it cannot run on weight values in a `keras.StatelessScope`."""
        return self.block._recompute or self.block._logdet_in_forward

    def seed(self) -> tf.Tensor | None:
        """The block's stateless seed; None for a stochastic log-det without a fixed seed."""
        if self.block._seed is None:
            needs = self.block.logdet_config.method in ("series", "unbiased")
            return None if needs else stateless_seed(0)  # unused by "exact" and "none"
        return stateless_seed(self.block._seed)

    def views(self, seed) -> list[tfb.Bijector]:
        """Fresh views (no cached results) of the unit, the block drawing from ``seed``."""
        block = self.block.copy(seed=seed)
        return [block] if self.actnorm is None else [self.actnorm.copy(), block]

    def values(self) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """The current ``(trainable, frozen)`` values; only the trainable carry gradients (a
        tape does not watch the frozen, non-trainable variables, and the spectral norms hold
        u and v constant)."""
        return ([tf.convert_to_tensor(v) for v in self.trainable],
                [tf.convert_to_tensor(v) for v in self.frozen])


def group_units(items: list[tfb.Bijector]) -> list[Unit | tfb.Bijector]:
    """``items`` with every (ActNorm, residual block over a Keras branch) pair, and every such
    block without an ActNorm before it, replaced by a `Unit`."""
    out, i = [], 0
    while i < len(items):
        step, nxt = items[i], items[i + 1] if i + 1 < len(items) else None
        if (isinstance(step, ActNorm) and isinstance(nxt, InvertibleResidualBlock)
                and isinstance(nxt.residual_fn, keras.layers.Layer)):
            out.append(Unit(step, nxt))
            i += 2
        elif (isinstance(step, InvertibleResidualBlock)
              and isinstance(step.residual_fn, keras.layers.Layer)):
            out.append(Unit(None, step))
            i += 1
        else:
            out.append(step)
            i += 1
    return out


class UnitFunction:
    """The forward computation ``(trainable, frozen, h, seed) -> (output, log-det [B])`` of
    the units of one signature: the template's layers with another unit's weight values."""

    def __init__(self, template: Unit, ndims: int, traced: bool):
        self.template, self.ndims = template, ndims
        self.forward = (tf.function(self._forward, autograph=False,
                                    experimental_attributes=NOINLINE)
                        if traced else self._forward)

    def scope(self, trainable, frozen) -> keras.StatelessScope:
        t = self.template
        return keras.StatelessScope(state_mapping=[
            *zip(t.trainable, trainable, strict=True), *zip(t.frozen, frozen, strict=True)])

    def apply(self, views, h):
        batch = tf.shape(h)[0]
        ldj = tf.zeros([batch], h.dtype)
        for step in views:
            h_next = step.forward(h)  # first: the block caches its log-det with the result
            ldj += broadcast(step.forward_log_det_jacobian(h, event_ndims=self.ndims), batch,
                             h.dtype)
            h = h_next
        return h, ldj

    def _forward(self, trainable, frozen, h, seed):
        with self.scope(trainable, frozen):
            return self.apply(self.template.views(seed), h)


def shared_functions(units: list[Unit], make) -> dict[Unit, object]:
    """``make(template)`` once per signature, mapped from every unit of that signature."""
    made, out = {}, {}
    for unit in units:
        key = unit.signature()
        if key not in made:
            made[key] = make(unit)
        out[unit] = made[key]
    return out


def forward_and_log_det(flow: MultiScale, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor] | None:
    """``(z [B, D], log|det dz/dx| [B])`` of a multi-scale flow, every unit computed by its
    signature's shared function (inside a `tf.function`; eagerly the plain computation).

    The values and gradients (the usual backward pass, in x and in every weight) are those of
    ``flow.forward(x)`` and ``flow.forward_log_det_jacobian(x)``. Returns None, for the caller
    to compute those directly, where sharing does not apply: eagerly, for an ``x`` with other
    than one batch dimension, with folded kernels in
    force (`tf_iresnet.lipschitz.folded_kernels` keys them by layer), when a stochastic
    log-det has no fixed seed (each block must then draw its own randomness), or for blocks
    with ``recompute`` or ``logdet_in_forward`` (their custom gradients collect the variables
    they read, and a shared function reads weight values instead).
    """
    x = tf.convert_to_tensor(x)
    ndims = flow.event_ndims
    if tf.executing_eagerly() or folded_kernels_active() or x.shape.rank != ndims + 1:
        return None
    x = check_input(flow, x, dtype=flow._required_dtype, event_shape=flow._input_shape)
    scales = [group_units(steps(s)) for s in flow.scales]
    units = [u for items in scales for u in items if isinstance(u, Unit)]
    seeds = {unit: unit.seed() for unit in units}
    if any(s is None for s in seeds.values()) or any(u.custom_variable_gradient for u in units):
        return None
    functions = shared_functions(units, lambda t: UnitFunction(t, ndims, traced=True))
    latents, ldj = run_scales(
        scales, x, lambda unit, h: functions[unit].forward(*unit.values(), h, seeds[unit]),
        factor_out=flow.factor_out, ndims=ndims)
    batch = tf.shape(x)[0]
    return tf.concat([tf.reshape(t, [batch, -1]) for t in latents], axis=-1), ldj


def run_scales(scales: list[list[Unit | tfb.Bijector]], x: tf.Tensor, unit_fn, *,
               factor_out: bool, ndims: int) -> tuple[list[tf.Tensor], tf.Tensor]:
    """The multi-scale forward pass: ``(latents, log-det [B])`` for ``x [B, *event]``, each
    `Unit` computed by ``unit_fn(unit, h) -> (output, log-det [B])``, the other steps
    directly; half the channels factored out after every non-final scale if ``factor_out``.
    ``latents`` are ``[B, *shape]``, the factored-out ones first."""
    batch = tf.shape(x)[0]
    h, ldj, latents = x, tf.zeros([batch], x.dtype), []
    last = len(scales) - 1
    for i, items in enumerate(scales):
        for item in items:
            if isinstance(item, Unit):
                h, unit_ldj = unit_fn(item, h)
                ldj += unit_ldj
                continue
            h_next = item.forward(h)
            ldj += broadcast(item.forward_log_det_jacobian(h, event_ndims=ndims), batch,
                             x.dtype)
            h = h_next
        if factor_out and i < last:
            half = h.shape[-1] // 2
            latents.append(h[..., :half])
            h = h[..., half:]
    latents.append(h)
    return latents, ldj
