"""recompute_gradient: same values and gradients as the plain function, nested tapes allowed."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet.recompute import recompute_gradient


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    model.build((None, 3))
    return model


def _fn(model):
    """``(y, <v, J^T v>)``: a function that takes a gradient inside, like the log-det."""
    v = tf.constant([[0.3, -1.0, 0.5]])

    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
        w = tape.gradient(y, x, output_gradients=tf.broadcast_to(v, tf.shape(y)))
        return y, tf.reduce_sum(w * v, axis=1)

    return fn


@pytest.mark.parametrize("compiled", [True, False], ids=["tf.function", "eager"])
def test_values_and_gradients_equal_the_plain_function(compiled):
    model = _model()
    x = tf.random.stateless_normal([5, 3], seed=[1, 2])
    fn = _fn(model)

    def loss_and_grads(f, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, t = f(x)
            loss = tf.reduce_sum(y**2) + tf.reduce_sum(t**3)
        return loss, tape.gradient(loss, [x, *model.trainable_variables])

    if compiled:
        loss_and_grads = tf.function(loss_and_grads)
    plain, plain_grads = loss_and_grads(fn, x)
    ours, our_grads = loss_and_grads(recompute_gradient(fn), x)
    np.testing.assert_allclose(ours, plain, rtol=1e-6)
    assert len(our_grads) == 5
    for a, b in zip(our_grads, plain_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_unused_output_has_zero_gradient():
    model = _model()
    x = tf.random.stateless_normal([4, 3], seed=[3, 4])
    fn = _fn(model)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(recompute_gradient(fn)(x)[1])
    ours = tape.gradient(loss, model.trainable_variables)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fn(x)[1])
    plain = tape.gradient(loss, model.trainable_variables)
    # The last bias does not enter J: None for the plain tape, zeros (or None) for ours.
    assert plain[-1] is None
    for a, b, v in zip(ours, plain, model.trainable_variables, strict=True):
        a = tf.zeros_like(v) if a is None else a
        b = tf.zeros_like(v) if b is None else b
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_backward_pass_runs_the_recompute_function():
    calls = []
    model = _model()

    def forward(x):
        calls.append("forward")
        return model(x)

    def again(x):
        calls.append("recompute")
        return model(x)

    @tf.function
    def step(x):  # the Python calls happen while tracing
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(recompute_gradient(forward, again)(x))
        calls.append("backward")
        return tape.gradient(loss, model.trainable_variables)

    grads = step(tf.ones([2, 3]))
    assert calls == ["forward", "backward", "recompute"]
    assert all(g is not None for g in grads)
