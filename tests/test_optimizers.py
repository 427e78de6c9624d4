"""tf_iresnet.training.optimizers.Adamax: Keras' Adamax, traced as one fused op per variable.

Under MirroredStrategy it is covered by the density training tests that resume under two
replicas (tests/test_train_density.py); a strategy of its own here would share the process's
collective instance keys with theirs."""

import keras
import numpy as np
import tensorflow as tf

from tf_iresnet.training.optimizers import Adamax


def _run(optimizer_cls, strategy, steps=4):
    with strategy.scope():
        variables = [keras.Variable(np.linspace(-1.0, 1.0, 12).reshape(3, 4).astype("float32")),
                     keras.Variable(np.arange(5, dtype="float32"))]
        optimizer = optimizer_cls(learning_rate=0.05)
        optimizer.build(variables)

    @tf.function
    def step(t):
        def replica():
            grads = [tf.sin(v * t + 1.0) for v in variables]
            optimizer.apply_gradients(zip(grads, variables, strict=True))
        strategy.run(replica)

    for t in range(steps):
        step(tf.constant(float(t + 1)))
    return [v.numpy() for v in variables], [s.numpy() for s in optimizer.variables]


def test_traced_updates_equal_keras_adamax():
    want, want_slots = _run(keras.optimizers.Adamax, tf.distribute.get_strategy())
    got, got_slots = _run(Adamax, tf.distribute.get_strategy())
    assert not np.allclose(got[0], np.linspace(-1.0, 1.0, 12).reshape(3, 4))  # it moved
    for g, w in zip(got + got_slots, want + want_slots, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_eager_update_and_slot_names_are_keras_own():
    v = keras.Variable(np.ones(3, "float32"))
    a, k = Adamax(0.1), keras.optimizers.Adamax(0.1)
    w = keras.Variable(np.ones(3, "float32"))
    a.apply_gradients([(tf.constant([1.0, -2.0, 0.5]), v)])
    k.apply_gradients([(tf.constant([1.0, -2.0, 0.5]), w)])
    np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=1e-7)
    # The same slots (checkpoints track them by these names): the learning rate, momentum, norm.
    assert [s.name.split("_")[-1] for s in a.variables] == [
        s.name.split("_")[-1] for s in k.variables]
    assert {"momentum", "norm"} <= {s.name.split("_")[-1] for s in a.variables}


def test_two_updates_in_one_traced_function_each_read_their_step():
    # The update's scalars (beta_1^t, ...) are made once per update, not once per trace: the
    # second update of one function uses t + 1, as Keras' Adamax does.
    def run(optimizer_cls):
        variables = [keras.Variable(np.linspace(-1.0, 1.0, 6).astype("float32")),
                     keras.Variable(np.ones([2, 2], "float32"))]
        optimizer = optimizer_cls(learning_rate=0.1)
        optimizer.build(variables)

        @tf.function
        def two_steps():
            for t in (1.0, 2.0):
                optimizer.apply_gradients(
                    [(tf.cos(v * t), v) for v in variables])

        two_steps()
        two_steps()
        return [v.numpy() for v in variables + list(optimizer.variables)]

    for got, want in zip(run(Adamax), run(keras.optimizers.Adamax), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
