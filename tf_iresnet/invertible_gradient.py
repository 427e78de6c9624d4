"""A backward pass whose activation memory does not grow with depth (RevNet-style).

An i-ResNet flow is invertible, so its backward pass does not need the activations of the
forward pass: walking the steps from the last to the first, each step's input is rebuilt from
its output (ActNorm, squeeze and preprocessing in closed form, a residual block by its
fixed-point inverse at a tight tolerance), the step's forward pass and log-det are run again
from that input under a tape, and the gradient is passed on to the step before. The factored-out
latents are the flow's outputs, kept as usual. Only the latent ``z`` (size of the input) and
one step's intermediates are alive at any time, whatever the number of blocks
(Gomez et al., 2017; Behrmann et al., 2019).

*A graph that does not grow with depth either.* Inside a `tf.function`, the units (an ActNorm
and the residual block after it) of one signature, the blocks of a scale, share one traced
forward function and one traced backward function (rebuild, recompute, gradient), called for
every unit with that unit's weights as arguments (`tf_iresnet.shared_blocks`). Without this,
the traced step holds a copy of every block's forward, log-det, rebuild loop and
recomputation, and its graph, not the activations, dominates the memory of deep models.
Eagerly the same Python code runs directly.

Cost: one fixed-point inverse and one more forward pass with log-det per block. The gradients
are those of the stored backward pass up to the reconstruction error (tolerance ``atol + rtol
|x|`` per block). A reconstruction that misses its tolerance raises (eagerly
``InverseNotConvergedError``, in graphs an ``InvalidArgumentError``); under XLA, which drops
assertions, it turns the gradients into NaN: never a silently wrong gradient.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_iresnet import fixed_point
from tf_iresnet.bijectors.iresblock import InvertibleResidualBlock
from tf_iresnet.bijectors.multiscale import MultiScale
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.recompute import _after
from tf_iresnet.shared_blocks import (
    NOINLINE,
    Unit,
    UnitFunction,
    broadcast,
    group_units,
    run_scales,
    shared_functions,
    steps,
)

tfb = tfp.bijectors

__all__ = ["RECONSTRUCTION", "forward_and_log_det"]

# The default tolerance of the reconstruction: Lip(g) = 0.9 leaves an error of at most
# 0.9 / 0.1 = 9 times the last step, so about 1e-5 per block.
RECONSTRUCTION = InverseConfig(atol=1e-6, rtol=1e-6, max_iter=300)


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


def _unit_seed(unit: Unit) -> tf.Tensor:
    seed = unit.seed()
    if seed is None:
        raise ValueError(
            f"{unit.block.name} has seed=None: the invertible backward pass runs every block "
            "again and must draw the same probes; build the flow with a seed "
            "(e.g. model.bijector(mode='train', seed=...)).")
    return seed


class _UnitFunctions(UnitFunction):
    """`UnitFunction`'s forward pass and the backward pass ``(trainable, frozen, y, dy, dldj,
    seed) -> (input, d/d input, d/d trainable)`` that rebuilds the unit's input from its output
    ``y`` and recomputes the unit under a tape; one traced copy of each per signature."""

    def __init__(self, template: Unit, ndims: int, reconstruction: InverseConfig,
                 traced: bool):
        super().__init__(template, ndims, traced)
        self.reconstruction = reconstruction
        self.backward = (tf.function(self._backward, autograph=False,
                                     experimental_attributes=NOINLINE)
                         if traced else self._backward)

    def _backward(self, trainable, frozen, y, dy, dldj, seed):
        with self.scope(trainable, frozen):
            h = y
            for step in reversed(self.template.views(seed)):
                h = _rebuild_input(step, h, self.reconstruction)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(h)
            tape.watch(trainable)
            with self.scope(trainable, frozen):
                out, ldj = self.apply(self.template.views(seed), tf.identity(h))
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
    scales = [group_units(steps(s)) for s in flow.scales]
    units = [u for items in scales for u in items if isinstance(u, Unit)]
    traced = not tf.executing_eagerly()
    for unit in units:
        if unit.custom_variable_gradient:
            raise ValueError(f"{unit.block.name} has recompute or logdet_in_forward set; the "
                             "invertible backward pass recomputes every block itself: build "
                             "the flow's blocks without them.")
    seeds = {unit: _unit_seed(unit) for unit in units}
    by_unit = shared_functions(
        units, lambda t: _UnitFunctions(t, ndims, reconstruction, traced))
    unit_values = {unit: unit.values() for unit in units}
    frozen = {unit: unit_values[unit][1] for unit in units}
    # The trainable values are inputs of the custom gradient, so their gradients reach the
    # variables through the reads in `Unit.values`.
    sizes = [len(unit.trainable) for unit in units]
    values = [v for unit in units for v in unit_values[unit][0]]
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
        latents, ldj = run_scales(
            scales, x,
            lambda unit, h: by_unit[unit].forward(trainable[unit], frozen[unit], h, seeds[unit]),
            factor_out=factor_out, ndims=ndims)
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
                    if isinstance(item, Unit):
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
                        step_ldj = broadcast(item.forward_log_det_jacobian(t, event_ndims=ndims),
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
