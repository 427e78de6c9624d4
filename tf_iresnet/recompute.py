"""Gradient checkpointing for functions that take gradients inside (the log-det's products).

The training step of an i-ResNet keeps, for every block, the activations of g and of each of
the n vector-Jacobian products of the log-det series, because the backward pass differentiates
through all of them. `recompute_gradient` keeps only a block's input instead and runs the block
again, under a tape, when the backward pass reaches it: peak memory becomes that of one block
(plus the inputs of all), for one more forward pass with log-det per block (about a third more
arithmetic with the 5-term series).

`tf.recompute_grad` cannot be used here: it runs the function with tape recording stopped, so
the tape inside the log-det estimator records nothing and its vector-Jacobian products come back
``None``.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

__all__ = ["recompute_gradient"]


def _after(x: tf.Tensor, signal: tf.Tensor) -> tf.Tensor:
    """``x``, with a data dependency on ``signal`` (non-empty).

    A computation on the result cannot start before ``signal`` exists, and Grappler's
    common-subexpression elimination cannot merge it with the same computation on ``x``. XLA
    ignores control dependencies, so a data dependency is the ordering both respect. The added
    term is 0, but only at run time: ``flag == flag`` holds for every boolean.
    """
    flag = tf.cast(tf.reshape(signal, [-1])[:1], tf.bool)
    zero = tf.where(tf.equal(flag, flag), tf.zeros([1], x.dtype),
                    tf.fill([1], tf.constant(float("nan"), x.dtype)))
    return x + tf.reshape(zero, [])


def recompute_gradient(
    forward_fn: Callable[[tf.Tensor], tf.Tensor | tuple[tf.Tensor, ...]],
    recompute_fn: Callable[[tf.Tensor], tf.Tensor | tuple[tf.Tensor, ...]] | None = None,
) -> Callable[[tf.Tensor], tf.Tensor | tuple[tf.Tensor, ...]]:
    """Wraps ``forward_fn(x)`` so that its backward pass recomputes it instead of storing it.

    Args:
      forward_fn: ``x -> tensor or tuple of tensors``, differentiable in x and in the variables
        it reads; it may use gradient tapes inside. It must be deterministic (stateless seeds
        fixed outside), or the recomputation differentiates another function.
      recompute_fn: the function run again in the backward pass (default: ``forward_fn``). It
        must return the same values; pass it when ``forward_fn`` has side effects that must not
        happen twice (e.g. a power iteration that updates variables and then uses them).

    Returns:
      A function with the same values as ``forward_fn`` and the same first-order gradients with
      respect to x and to every variable ``forward_fn`` reads. Inside a `tf.function` the
      backward graph refers only to x and the variables, so the intermediates of
      ``forward_fn`` are freed after the forward pass. Eagerly, the tape records
      ``forward_fn``'s operations as usual and differentiates them (same gradients, no memory
      saved). Gradients of the gradient are not supported.
    """
    recompute_fn = recompute_fn or forward_fn

    @tf.custom_gradient
    def wrapped(x):
        outputs = forward_fn(x)

        def grad(*output_grads, variables=None):
            variables = list(variables or [])
            flat_outputs = tf.nest.flatten(outputs)
            output_grads = [tf.zeros_like(o) if g is None else g
                            for o, g in zip(flat_outputs, output_grads, strict=True)]
            x_again = _after(x, output_grads[0])
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(x_again)
                tape.watch(variables)
                again = tf.nest.flatten(recompute_fn(x_again))
            grads = tape.gradient(again, [x_again, *variables], output_gradients=output_grads)
            return grads[0], grads[1:]

        return outputs, grad

    # AutoGraph would convert the undecorated Python function and bypass the custom gradient.
    return tf.autograph.experimental.do_not_convert(wrapped)
