"""The log-det's gradients computed in the forward pass, so none of its graph is kept.

A training step of an i-ResNet differentiates, for every residual block ``y = x + g(x)``,

    L(g(x), l(x)),    l_i(x) = estimate of log|det(I + J_g(x_i))|  (one value per example i),

and the stored backward pass keeps, per block, the activations of g *and* those of the log-det
estimate (the chain of vector-Jacobian products, or with the Neumann gradient the one
differentiable product ``(u^T J) v`` and what its double backward needs) until the backward pass
reaches the block. `residual_and_logdet_in_forward` instead differentiates the estimate right
away, inside the block's forward pass (the memory-efficient log-det estimator of Residual
Flows, Chen et al., 2019):

    a = d(sum_i l_i)/dx          ([B, ...], the size of x),
    b = d(sum_i l_i)/dtheta      (the size of the branch's variables),

keeps only ``a`` and ``b`` and frees the estimate's graph. The backward pass then needs g's
vector-Jacobian product at x only, which it gets by running g (one forward pass, no log-det)
again under a tape:

    dL/dx     = J_g(x)^T dL/dg  +  (dL/dl_i) a_i      per example i,
    dL/dtheta = (dg/dtheta)^T dL/dg  +  w b           if dL/dl_i = w for every i.

Why this is exact: ``l_i`` depends on example i's input only, so ``a_i = dl_i/dx_i`` and the
x-gradient holds for any upstream weights. The variables are shared by all examples:
``dL/dtheta`` needs ``sum_i (dL/dl_i) dl_i/dtheta``, which equals ``w b`` exactly when all the
weights are the same ``w``, i.e. when the loss uses the log-dets through their batch mean or sum
(as every loss of this project does, also per replica under a `tf.distribute` strategy). The
backward pass checks that (to a relative 1e-6, for rounding): unequal weights raise an
``InvalidArgumentError`` (eagerly and in graphs; under XLA, which drops assertions, the
gradients are NaN instead), never a silently wrong gradient.

Memory: per block the backward pass keeps x, ``a`` (one more tensor of x's size) and ``b`` (one
copy of the branch's variables), against g's hidden activations and the estimate's vjp graph
on the stored path; the transient memory of one block's estimate and its gradient is freed
before the next block runs. Cost: the estimate's backward pass moves into the forward pass,
and g's forward and backward pass run once more per block (the stored path backpropagates
``dL/dg`` and the estimate's gradient through g's graph together; here the backward pass runs
g again for ``dL/dg`` alone). Measured in ``benchmarks/README.md``.

As with `tf_iresnet.recompute.recompute_gradient`, the saving needs a `tf.function` (eagerly
the outer tape still records the forward pass: same gradients, no memory saved), g must be
deterministic (it is run twice; the random probes and roulette count are drawn once, in the
forward pass, so they are automatically the ones the gradient used), and gradients of the
gradient are not supported. Variables read by g are watched by the inner tape if trainable;
gradients for others get no log-det term.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tf_iresnet.logdet import LogDetConfig, residual_and_logdet
from tf_iresnet.recompute import _after

__all__ = ["IN_FORWARD_METHODS", "WEIGHT_RTOL", "residual_and_logdet_in_forward"]

# The stochastic estimators whose gradient is worth moving into the forward pass ("exact" is
# for small events and tests, "none" has no log-det).
IN_FORWARD_METHODS = ("series", "unbiased")
# Upstream log-det gradients that differ by more than this (relative to the largest) are
# "unequal weights"; a batch mean or sum gives exactly equal ones.
WEIGHT_RTOL = 1e-6


def _common_weight(dlogdet: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(w, poison)``: the upstream weight shared by every example's log-det, and 0 (NaN if
    the weights differ, for XLA), with an assertion on equal weights as a control input."""
    n = tf.cast(tf.size(dlogdet), dlogdet.dtype)
    weight = tf.math.divide_no_nan(tf.reduce_sum(dlogdet), n)
    # Both are -inf for an empty batch, which counts as equal.
    spread = tf.reduce_max(tf.abs(dlogdet - weight))
    scale = tf.reduce_max(tf.abs(dlogdet))
    equal = spread <= WEIGHT_RTOL * scale
    check = tf.debugging.Assert(equal, [
        # No quotes: graphs print them escaped.
        "gradient_memory=logdet_in_forward (InvertibleResidualBlock(logdet_in_forward=True)) "
        "needs the same upstream gradient on the log-det of every example: its parameter "
        "gradient is stored summed over the batch in the forward pass, which is right only for "
        "a loss that uses the log-dets through their batch mean or sum. Got dL/dlogdet from",
        tf.reduce_min(dlogdet), "to", tf.reduce_max(dlogdet),
        ". For per-example weights use gradient_memory=stored (logdet_in_forward=False)."],
        summarize=1)
    with tf.control_dependencies([check]):
        poison = tf.where(equal, tf.constant(0.0, dlogdet.dtype),
                          tf.constant(float("nan"), dlogdet.dtype))
    return weight, poison


def residual_and_logdet_in_forward(
    g: Callable[[tf.Tensor], tf.Tensor],
    x: tf.Tensor,
    config: LogDetConfig,
    seed=None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(g(x), logdet)`` as `tf_iresnet.logdet.residual_and_logdet`, with the log-det's
    gradients computed during the forward pass (see the module docstring).

    Args:
      g: residual branch ``[B, ...] -> [B, ...]``, examples processed independently,
        deterministic (it runs again in the backward pass).
      x: ``[B, ...]`` input.
      config: estimator settings; ``config.method`` must be one of ``IN_FORWARD_METHODS``
        (``"series"`` or ``"unbiased"``), with or without ``neumann_gradient``.
      seed: stateless seed of the probes and the roulette (``None``: fresh randomness); used
        once, in the forward pass.

    Returns:
      ``g(x)`` (``[B, ...]``) and ``logdet`` (``[B]``), the values of
      ``residual_and_logdet(g, x, config, seed)``, with its first-order gradients in x and in
      the (trainable) variables g reads, provided that the loss weights every example's
      log-det equally (batch mean or sum); otherwise the backward pass raises
      ``InvalidArgumentError`` (NaN gradients under XLA).

    Raises:
      ValueError: ``config.method`` is ``"exact"`` or ``"none"``.
    """
    if not isinstance(config, LogDetConfig):
        raise TypeError(f"config must be a LogDetConfig, got {config!r}.")
    if config.method not in IN_FORWARD_METHODS:
        raise ValueError(
            f"The log-det gradient in the forward pass needs a stochastic estimator, one of "
            f"{IN_FORWARD_METHODS}; got method={config.method!r} (use the stored gradient for "
            f"'exact', and 'none' has no log-det).")

    @tf.custom_gradient
    def run(x):
        with tf.GradientTape() as tape:  # also watches the trainable variables g reads
            tape.watch(x)
            gx, logdet = residual_and_logdet(g, x, config, seed=seed)
            total = tf.reduce_sum(logdet)
        watched = list(tape.watched_variables())
        grads = tape.gradient(total, [x, *watched],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        # Only these outlive the forward pass: the estimate's graph is not referenced again.
        x_grad = tf.stop_gradient(grads[0])
        stored = {v.ref(): tf.stop_gradient(d) for v, d in zip(watched, grads[1:], strict=True)}

        def grad(dgx, dlogdet, variables=None):
            variables = list(variables or [])
            var_grads = [None] * len(variables)
            dx = tf.zeros_like(x)
            if dgx is not None:
                # Run g again only once the upstream gradient exists (and so that Grappler
                # cannot merge it with the forward pass's g, which would keep its activations).
                x_again = _after(x, dgx)
                with tf.GradientTape(watch_accessed_variables=False) as inner:
                    inner.watch(x_again)
                    inner.watch(variables)
                    gx_again = g(x_again)
                vjp = inner.gradient(gx_again, [x_again, *variables], output_gradients=dgx)
                dx = vjp[0] if vjp[0] is not None else dx
                var_grads = list(vjp[1:])
            if dlogdet is None:
                return dx, var_grads
            weight, poison = _common_weight(dlogdet)
            per_example = tf.reshape(dlogdet, tf.concat(
                [tf.shape(dlogdet), tf.ones([tf.rank(x) - 1], tf.int32)], 0))
            dx = dx + per_example * x_grad + poison
            for j, v in enumerate(variables):
                extra = stored.get(v.ref())
                if extra is not None:
                    term = weight * extra
                    var_grads[j] = term if var_grads[j] is None else var_grads[j] + term
                if var_grads[j] is not None:
                    var_grads[j] = var_grads[j] + poison
            return dx, var_grads

        return (gx, logdet), grad

    # AutoGraph would convert the undecorated Python function and bypass the custom gradient.
    return tf.autograph.experimental.do_not_convert(run)(x)
