"""ActNorm: explicit data-dependent init, pure views, exact log-det, inverse, saved state."""

import numpy as np
import pytest
import tensorflow as tf

import tf_iresnet


def test_data_dependent_init_and_logdet():
    x = tf.random.stateless_normal([16, 4, 4, 3], seed=[1, 2]) * 3.0 + 1.0
    bij = tf_iresnet.ActNorm(event_ndims=3)
    with tf_iresnet.bijectors.data_dependent_init():
        y = bij.forward(x).numpy()
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1.0, atol=1e-3)
    assert int(bij.state.initialized.numpy()) == 1
    # A second batch does not re-initialize, inside the context or not.
    loc = bij.state.loc.numpy().copy()
    with tf_iresnet.bijectors.data_dependent_init():
        bij.forward(x * 2.0)
    bij.forward(x * 3.0)
    np.testing.assert_array_equal(bij.state.loc.numpy(), loc)
    # log-det against the Jacobian of one example (diagonal, H*W copies of each channel).
    x1 = x[:1]
    with tf.GradientTape() as tape:
        tape.watch(x1)
        y1 = bij.forward(x1)
    jac = tf.reshape(tape.batch_jacobian(y1, x1), [1, 48, 48])
    expected = tf.linalg.slogdet(jac)[1].numpy()
    np.testing.assert_allclose(bij.forward_log_det_jacobian(x1, event_ndims=3).numpy(), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(bij.inverse(tf.identity(bij.forward(x))).numpy(), x.numpy(),
                               atol=1e-5)


def test_views_are_pure_outside_the_init_context():
    state = tf_iresnet.ActNormState()
    state.build((None, 5))
    bij = tf_iresnet.ActNorm(state, event_ndims=1)
    x = tf.random.stateless_normal([64, 5], seed=[3, 3]) * 0.1 - 2.0
    # Eagerly and in tf.function, a forward pass reads the (identity) state and assigns nothing.
    np.testing.assert_array_equal(bij.forward(x).numpy(), x.numpy())
    np.testing.assert_array_equal(tf.function(lambda t: bij.forward(t))(x).numpy(), x.numpy())
    assert int(state.initialized.numpy()) == 0
    # tf.vectorized_map over the view works: no data-dependent control flow inside.
    mapped = tf.vectorized_map(lambda t: bij.forward(t[None])[0], x)
    np.testing.assert_array_equal(mapped.numpy(), x.numpy())
    state.initialize(x)
    y = tf.function(lambda t: bij.forward(t))(x).numpy()
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    assert int(state.initialized.numpy()) == 1
    np.testing.assert_allclose(bij.forward_log_det_jacobian(x, event_ndims=1).numpy(),
                               state.log_scale.numpy().sum(), rtol=1e-6)


def test_init_refuses_non_finite_batches_and_graphs():
    state = tf_iresnet.ActNormState()
    x = tf.random.stateless_normal([16, 3], seed=[4, 4])
    bad = tf.tensor_scatter_nd_update(x, [[0, 1]], [float("nan")])
    with pytest.raises(ValueError, match="non-finite"):
        state.initialize(bad)
    assert int(state.initialized.numpy()) == 0
    np.testing.assert_array_equal(state.loc.numpy(), 0.0)
    bij = tf_iresnet.ActNorm(state, event_ndims=1)
    with pytest.raises(ValueError, match="non-finite"), \
            tf_iresnet.bijectors.data_dependent_init():
        bij.forward(bad)
    assert int(state.initialized.numpy()) == 0

    @tf.function
    def init_in_graph(t):
        with tf_iresnet.bijectors.data_dependent_init():
            return bij.forward(t)

    with pytest.raises(RuntimeError, match="eagerly"):
        init_in_graph(x)


def test_validate_args_rejects_non_finite_inputs():
    bij = tf_iresnet.ActNorm(event_ndims=1, validate_args=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be finite"):
        bij.forward(tf.constant([[1.0, float("inf")]]))


def test_checkpoint_restores_initialized_state(tmp_path):
    import keras

    model = keras.Sequential([tf_iresnet.ActNormState()])
    model.build((None, 4, 4, 3))
    x = tf.random.stateless_normal([8, 4, 4, 3], seed=[5, 5]) + 3.0
    model.layers[0].initialize(x)
    path = str(tmp_path / "actnorm.weights.h5")
    model.save_weights(path)
    fresh = keras.Sequential([tf_iresnet.ActNormState()])
    fresh.build((None, 4, 4, 3))
    assert int(fresh.layers[0].initialized.numpy()) == 0
    fresh.load_weights(path)
    assert int(fresh.layers[0].initialized.numpy()) == 1
    np.testing.assert_array_equal(fresh.layers[0].loc.numpy(), model.layers[0].loc.numpy())
    # Restored: a new batch is normalized with the saved statistics, not re-initialized.
    np.testing.assert_allclose(fresh(x * 5).numpy(), model(x * 5).numpy())


def test_bad_arguments():
    with pytest.raises(ValueError, match="event_ndims must be 1 or 3"):
        tf_iresnet.ActNorm(event_ndims=2)
    with pytest.raises(TypeError, match="ActNormState"):
        tf_iresnet.ActNorm(state="nope")
    with pytest.raises(ValueError, match="expects events of rank 3"):
        tf_iresnet.ActNorm(event_ndims=3).forward(tf.zeros([4, 3]))
