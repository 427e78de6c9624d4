"""A backward pass whose activation memory does not grow with depth (RevNet-style).

An i-ResNet flow is invertible, so its backward pass does not need the activations of the
forward pass: walking the steps from the last to the first, each step's input is rebuilt from
its output (ActNorm, squeeze and preprocessing in closed form, a residual block by its
fixed-point inverse at a tight tolerance), the step's forward pass and log-det are run again
from that input under a tape, and the gradient is passed on to the step before. The factored-out
latents are the flow's outputs, kept as usual. Only the latent ``z`` (size of the input) and
one step's intermediates are alive at any time, whatever the number of blocks
(Gomez et al., 2017; Behrmann et al., 2019).

*A graph that does not grow with depth either.* Inside a `tf.function`, an ActNorm and the
residual block after it form a *unit*; units whose branches have the same structure and shapes
(the blocks of one scale) share one traced forward function and one traced backward function
(rebuild, recompute, gradient), called for every unit with that unit's weights as arguments
(read through a `keras.StatelessScope`) and kept out of line (``_noinline``). Without this, the
traced step holds a copy of every block's forward, log-det, rebuild loop and recomputation, and
its graph, not the activations, dominates the memory of deep models (about 45 MB per block on
bench cifar-small widths, see ``benchmarks/README.md``). Eagerly the same Python code runs
directly.

Cost: one fixed-point inverse and one more forward pass with log-det per block. The gradients
are those of the stored backward pass up to the reconstruction error (tolerance ``atol + rtol
|x|`` per block). A reconstruction that misses its tolerance raises (eagerly
``InverseNotConvergedError``, in graphs an ``InvalidArgumentError``); under XLA, which drops
assertions, it turns the gradients into NaN: never a silently wrong gradient.
"""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.bijectors import chain as chain_lib

from tf_iresnet import fixed_point
from tf_iresnet.bijectors.actnorm import ActNorm
from tf_iresnet.bijectors.iresblock import InvertibleResidualBlock
from tf_iresnet.bijectors.multiscale import MultiScale
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.logdet import stateless_seed
from tf_iresnet.recompute import _after

tfb = tfp.bijectors

__all__ = ["RECONSTRUCTION", "forward_and_log_det"]

# The default tolerance of the reconstruction: Lip(g) = 0.9 leaves an error of at most
# 0.9 / 0.1 = 9 times the last step, so about 1e-5 per block.
RECONSTRUCTION = InverseConfig(atol=1e-6, rtol=1e-6, max_iter=300)


def _steps(scale: tfb.Bijector) -> list[tfb.Bijector]:
    """A scale's bijectors in data-to-latent order (a Chain applies its last bijector first)."""
    # tfb.Chain of non-composite bijectors (the residual blocks) is a `_Chain`, Chain's base.
    if isinstance(scale, chain_lib._Chain):
        return list(reversed(scale.bijectors))
    return [scale]


def _broadcast(ldj: tf.Tensor, batch: tf.Tensor, dtype) -> tf.Tensor:
    return tf.broadcast_to(tf.cast(ldj, dtype), [batch])


def _rebuild_input(step: tfb.Bijector, y: tf.Tensor, config: InverseConfig) -> tf.Tensor:
    """The input of ``step`` from its output ``y`` (``[B, *event]``), without gradient."""
    y = tf.stop_gradient(y)
    if not isinstance(step, InvertibleResidualBlock):
        return tf.stop_gradient(step.inverse(tf.identity(y)))  # closed form

    def g(t):
        return step.residual_fn(t, training=False)

    result = fixed_point.solve_fixed_point(
        g, y, atol=config.atol, rtol=config.rtol, max_iter=config.max_iter,
        method=config.solver, anderson_memory=config.anderson_memory)
    x = fixed_point.check_converged(
        result, max_iter=config.max_iter, atol=config.atol, rtol=config.rtol, on_failure="raise",
        what=f"{step.name} reconstruction in the invertible backward pass")
    # XLA drops the assertion above: a missed tolerance then gives NaN, not a wrong gradient.
    poison = tf.where(result.converged, tf.constant(0.0, x.dtype),
                      tf.constant(float("nan"), x.dtype))
    return tf.stop_gradient(x + poison)


@dataclasses.dataclass(frozen=True, eq=False)
class _Unit:
    """An optional ActNorm and the residual block after it, with the Keras weights they read.

    ``trainable`` and ``frozen`` list the unit's variables (ActNorm state's, then the
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
        def strip(c):
            if isinstance(c, dict):
                return {k: strip(v) for k, v in c.items() if k != "name"}
            if isinstance(c, list | tuple):
                return [strip(v) for v in c]
            return c

        b = self.block
        return json.dumps([
            [strip(keras.layers.serialize(layer)) for layer in self.layers],
            [[list(v.shape), str(v.dtype)] for v in self.trainable + self.frozen],
            repr(b.logdet_config), repr(b.inverse_config), b._event_ndims, b.validate_args,
            None if self.actnorm is None else self.actnorm.validate_args,
        ], sort_keys=True, default=repr)

    def views(self, seed) -> list[tfb.Bijector]:
        """Fresh views (no cached results) of the unit, the block drawing from ``seed``."""
        block = self.block.copy(seed=seed)
        return [block] if self.actnorm is None else [self.actnorm.copy(), block]


def _group_units(steps: list[tfb.Bijector]) -> list[_Unit | tfb.Bijector]:
    """``steps`` with every (ActNorm, residual block over a Keras branch) pair, and every such
    block without an ActNorm before it, replaced by a `_Unit`."""
    out, i = [], 0
    while i < len(steps):
        step, nxt = steps[i], steps[i + 1] if i + 1 < len(steps) else None
        if (isinstance(step, ActNorm) and isinstance(nxt, InvertibleResidualBlock)
                and isinstance(nxt.residual_fn, keras.layers.Layer)):
            out.append(_Unit(step, nxt))
            i += 2
        elif (isinstance(step, InvertibleResidualBlock)
              and isinstance(step.residual_fn, keras.layers.Layer)):
            out.append(_Unit(None, step))
            i += 1
        else:
            out.append(step)
            i += 1
    return out


def _unit_seed(unit: _Unit) -> tf.Tensor:
    if unit.block._seed is None and unit.block.logdet_config.method in ("series", "unbiased"):
        raise ValueError(
            f"{unit.block.name} has seed=None: the invertible backward pass runs every block "
            "again and must draw the same probes; build the flow with a seed "
            "(e.g. model.bijector(mode='train', seed=...)).")
    return stateless_seed(0 if unit.block._seed is None else unit.block._seed)


class _UnitFunctions:
    """The forward and the backward computation of the units of one signature.

    Both run the first unit's (the template's) Keras layers with another unit's variable
    values in a `keras.StatelessScope`, so one trace serves every unit of the signature.
    """

    def __init__(self, template: _Unit, ndims: int, reconstruction: InverseConfig,
                 traced: bool):
        self.template, self.ndims, self.reconstruction = template, ndims, reconstruction
        if traced:
            attrs = {"_noinline": True}  # one function body in the graph, not one per block
            self.forward = tf.function(self._forward, autograph=False,
                                       experimental_attributes=attrs)
            self.backward = tf.function(self._backward, autograph=False,
                                        experimental_attributes=attrs)
        else:
            self.forward, self.backward = self._forward, self._backward

    def _scope(self, trainable, frozen):
        t = self.template
        return keras.StatelessScope(state_mapping=[
            *zip(t.trainable, trainable, strict=True), *zip(t.frozen, frozen, strict=True)])

    def _apply(self, views, h):
        batch = tf.shape(h)[0]
        ldj = tf.zeros([batch], h.dtype)
        for step in views:
            h_next = step.forward(h)  # first: the block caches its log-det with the result
            ldj += _broadcast(step.forward_log_det_jacobian(h, event_ndims=self.ndims), batch,
                              h.dtype)
            h = h_next
        return h, ldj

    def _forward(self, trainable, frozen, h, seed):
        """``(output, log-det [B])`` of the unit at ``h``."""
        with self._scope(trainable, frozen):
            return self._apply(self.template.views(seed), h)

    def _backward(self, trainable, frozen, y, dy, dldj, seed):
        """``(input, d/d input, d/d trainable)`` from the output ``y`` and its gradients."""
        with self._scope(trainable, frozen):
            views = self.template.views(seed)
            h = y
            for step in reversed(views):
                h = _rebuild_input(step, h, self.reconstruction)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(h)
            tape.watch(trainable)
            with self._scope(trainable, frozen):
                out, ldj = self._apply(self.template.views(seed), tf.identity(h))
            total = tf.reduce_sum(out * dy) + tf.reduce_sum(ldj * dldj)
        grads = tape.gradient(total, [h, *trainable],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return h, grads[0], grads[1:]


def forward_and_log_det(
    flow: MultiScale, x: tf.Tensor, reconstruction: InverseConfig | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(z, log|det dz/dx|)`` of a multi-scale flow with the depth-independent backward pass.

    Args:
      flow: the data-to-latent `MultiScale` bijector (e.g. ``IResNetFlow.bijector``). Its
        stochastic log-dets must have fixed seeds (not ``None``, else ``ValueError``): the
        backward pass runs every block again and must draw the same probes and roulette
        counts.
      x: ``[B, *input_shape]``, one batch dimension.
      reconstruction: the tolerance and budget of every residual block's inverse in the
        backward pass (default ``RECONSTRUCTION``: atol = rtol = 1e-6, 300 iterations);
        ``on_failure`` is always ``"raise"``.

    Returns:
      ``z`` of shape ``[B, D]`` and the log-det ``[B]``: the values of ``flow.forward(x)`` and
      ``flow.forward_log_det_jacobian(x)``; first-order gradients in x and in every variable
      the flow reads, equal to the stored backward pass's up to the reconstruction error.
      Inside a `tf.function` the backward graph refers to z, x's shape and the variables only,
      so no step's intermediates outlive its forward pass, and the blocks of one signature
      share one traced forward and one traced backward function. Eagerly the tape still
      records the forward pass (same gradients, no memory saved). No gradients of gradients.
    """
    if reconstruction is None:
        reconstruction = RECONSTRUCTION
    if not isinstance(reconstruction, InverseConfig):
        raise TypeError(f"reconstruction must be an InverseConfig or None, got {reconstruction!r}.")
    ndims = flow.event_ndims
    x = tf.convert_to_tensor(x)
    if x.shape.rank is not None and x.shape.rank != ndims + 1:
        raise ValueError(f"x must be [B, *event] with an event of rank {ndims}, got {x.shape}.")
    scales = [_group_units(_steps(s)) for s in flow.scales]
    units = [u for items in scales for u in items if isinstance(u, _Unit)]
    traced = not tf.executing_eagerly()
    functions, by_unit = {}, {}
    for unit in units:
        key = unit.signature()
        if key not in functions:
            functions[key] = _UnitFunctions(unit, ndims, reconstruction, traced)
        by_unit[unit] = functions[key]
    seeds = {unit: _unit_seed(unit) for unit in units}
    frozen = {unit: [tf.stop_gradient(tf.convert_to_tensor(v)) for v in unit.frozen]
              for unit in units}
    # The trainable values are inputs of the custom gradient, so their gradients reach the
    # variables through the reads below.
    sizes = [len(unit.trainable) for unit in units]
    values = [tf.convert_to_tensor(v) for unit in units for v in unit.trainable]
    last = len(scales) - 1
    factor_out = flow.factor_out

    def trainable_of(flat):
        out, start = {}, 0
        for unit, n in zip(units, sizes, strict=True):
            out[unit] = list(flat[start:start + n])
            start += n
        return out

    @tf.custom_gradient
    def run(x, *flat):
        trainable = trainable_of(flat)
        batch = tf.shape(x)[0]
        h, ldj, latents = x, tf.zeros([batch], x.dtype), []
        for i, items in enumerate(scales):
            for item in items:
                if isinstance(item, _Unit):
                    h, unit_ldj = by_unit[item].forward(trainable[item], frozen[item], h,
                                                        seeds[item])
                    ldj += unit_ldj
                    continue
                h_next = item.forward(h)
                ldj += _broadcast(item.forward_log_det_jacobian(h, event_ndims=ndims), batch,
                                  x.dtype)
                h = h_next
            if factor_out and i < last:
                half = h.shape[-1] // 2
                latents.append(h[..., :half])
                h = h[..., half:]
        latents.append(h)
        shapes = [t.shape[1:] for t in latents]
        z = tf.concat([tf.reshape(t, [batch, -1]) for t in latents], axis=-1)

        def grad(dz, dldj, variables=None):
            variables = list(variables or [])
            dz = tf.zeros_like(z) if dz is None else dz
            dldj = tf.zeros_like(ldj) if dldj is None else dldj
            split = [int(np.prod(s)) for s in shapes]

            def unflatten(t):
                return [tf.reshape(p, tf.concat([[batch], s], 0))
                        for p, s in zip(tf.split(t, split, axis=-1), shapes, strict=True)]

            zs, dzs = unflatten(z), unflatten(dz)
            h, dh = zs[-1], dzs[-1]
            unit_grads = {}
            var_grads = [None] * len(variables)
            for i in reversed(range(len(scales))):
                if factor_out and i < last:
                    h, dh = tf.concat([zs[i], h], -1), tf.concat([dzs[i], dh], -1)
                for item in reversed(scales[i]):
                    if isinstance(item, _Unit):
                        h, dh, unit_grads[item] = by_unit[item].backward(
                            trainable[item], frozen[item], h, dh, dldj, seeds[item])
                        continue
                    # Rebuild only once the gradient arriving here exists: the inverses then
                    # run one step ahead of the gradient, not all at once.
                    h_in = _rebuild_input(item, _after(h, dh), reconstruction)
                    with tf.GradientTape(watch_accessed_variables=False) as tape:
                        tape.watch(h_in)
                        tape.watch(variables)
                        t = tf.identity(h_in)  # a new tensor: no cached TFP results
                        out = item.forward(t)
                        step_ldj = _broadcast(item.forward_log_det_jacobian(t, event_ndims=ndims),
                                              batch, x.dtype)
                        total = tf.reduce_sum(out * dh) + tf.reduce_sum(step_ldj * dldj)
                    grads = tape.gradient(total, [h_in, *variables])
                    dh = tf.zeros_like(h_in) if grads[0] is None else grads[0]
                    for j, g in enumerate(grads[1:]):
                        if g is not None:
                            var_grads[j] = g if var_grads[j] is None else var_grads[j] + g
                    h = h_in
            flat_grads = [g for unit in units for g in unit_grads[unit]]
            return (dh, *flat_grads), var_grads

        return (z, ldj), grad

    # AutoGraph would convert the undecorated Python function and bypass the custom gradient.
    return tf.autograph.experimental.do_not_convert(run)(x, *values)
