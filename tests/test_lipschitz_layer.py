"""Tests for tf_iresnet.lipschitz.layer: SpectralNormalization's normalization, state, gradients,
distribution, checkpoints, config and errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _lipschitz import (
    C_IN,
    COEFF,
    HW,
    conv_sn,
    scale_kernel,
    small_model,
    state_of,
    true_conv_norm,
    unit,
)

from tf_iresnet.lipschitz.layer import SpectralNormalization
from tf_iresnet.lipschitz.model import (
    converge_spectral_norms,
    spectral_norm_layers,
)
from tf_iresnet.lipschitz.solvers import _shared_power_iteration_in_place
from tf_iresnet.training import make_strategy

pytestmark = pytest.mark.usefixtures("keras_seed")


@pytest.mark.parametrize("strides,padding", [(1, "same"), (2, "valid")])
def test_conv_below_coeff_is_untouched(strides, padding):
    layer = conv_sn(strides, padding)
    scale_kernel(layer, 0.2)
    layer.lipschitz_estimate()
    true_norm = true_conv_norm(layer)
    assert true_norm < COEFF
    np.testing.assert_array_equal(layer.normalized_kernel().numpy(), layer.layer.kernel.numpy())
    assert float(layer.lipschitz_estimate(0)) == pytest.approx(true_norm, rel=1e-3)
    assert float(layer.lipschitz_upper_bound()) >= true_norm * (1 - 1e-5)


def test_dense_accepts_higher_rank_inputs():
    layer = SpectralNormalization(keras.layers.Dense(5, activation="tanh"))
    x = tf.random.normal([2, 3, 6])
    y = layer(x)
    expected = tf.tanh(tf.einsum("bti,io->bto", x, layer.normalized_kernel()) + layer.layer.bias)
    np.testing.assert_allclose(y.numpy(), expected.numpy(), atol=1e-6)


def _expected_power_step(layer, u, v, iterations):
    """Independent power iteration: A is the wrapped Conv2D (no bias), A^T u its VJP."""
    assert not layer.layer.use_bias
    for _ in range(iterations):
        v_var = tf.Variable(np.zeros_like(v))
        with tf.GradientTape() as tape:
            inner = tf.reduce_sum(layer.layer(v_var) * u)
        v = unit(tape.gradient(inner, v_var).numpy())
        u = unit(layer.layer(v).numpy())
    return u, v


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
def test_training_updates_state_inference_does_not(mode):
    layer = conv_sn(2, "same", use_bias=False, power_iterations=2)
    layer.layer.kernel.assign(tf.random.normal(layer.layer.kernel.shape))
    x = tf.random.normal([2, HW, HW, C_IN])
    u0, v0 = layer.u.numpy(), layer.v.numpy()
    # Perturb the stored state so that an update is visible.
    u0 = unit(u0 + 0.5 * np.random.default_rng(0).standard_normal(u0.shape)).astype(np.float32)
    layer.u.assign(u0)
    u_expected, v_expected = _expected_power_step(layer, u0, v0, 2)

    def infer(x):
        return layer(x, training=False)

    def train(x):
        return layer(x, training=True)

    wrap = {
        "eager": lambda f: f,
        "function": tf.function,
        "jit": lambda f: tf.function(f, jit_compile=True),
    }[mode]
    y_infer = wrap(infer)(x)
    np.testing.assert_array_equal(layer.u.numpy(), u0)
    np.testing.assert_array_equal(layer.v.numpy(), v0)
    y_ref = tf.nn.conv2d(x, layer.normalized_kernel(), 2, "SAME")
    np.testing.assert_allclose(y_infer.numpy(), y_ref.numpy(), atol=1e-5)

    y_train = wrap(train)(x)
    np.testing.assert_allclose(layer.u.numpy(), u_expected, atol=1e-5)
    np.testing.assert_allclose(layer.v.numpy(), v_expected, atol=1e-5)
    assert np.abs(layer.u.numpy() - u0).max() > 1e-2
    # The training output uses the updated state.
    y_ref = tf.nn.conv2d(x, layer.normalized_kernel(), 2, "SAME")
    np.testing.assert_allclose(y_train.numpy(), y_ref.numpy(), atol=1e-5)


def test_layers_of_one_shape_share_one_traced_power_iteration():
    # Traced, each layer's power iterations (reads, iterations, assignments) are one call of a
    # function traced once per shape: the step's graph does not hold a copy per layer.
    layers = [conv_sn(1, "same", use_bias=False, power_iterations=2) for _ in range(3)]
    expected = []
    for i, layer in enumerate(layers):
        layer.layer.kernel.assign(tf.random.normal(layer.layer.kernel.shape, seed=i))
        u0 = unit(layer.u.numpy() + np.random.default_rng(i).standard_normal(layer.u.shape))
        layer.u.assign(u0.astype(np.float32))
        expected.append(_expected_power_step(layer, layer.u.numpy(), layer.v.numpy(), 2))

    @tf.function
    def post_step():
        for layer in layers:
            layer.power_iterate()

    traces = _shared_power_iteration_in_place.experimental_get_tracing_count()
    post_step()
    assert _shared_power_iteration_in_place.experimental_get_tracing_count() - traces <= 1
    ops = [op.type for op in post_step.get_concrete_function().graph.get_operations()]
    assert ops.count("StatefulPartitionedCall") == len(layers), ops
    assert "ReadVariableOp" not in ops and "AssignVariableOp" not in ops, ops
    for layer, (u, v) in zip(layers, expected, strict=True):
        np.testing.assert_allclose(layer.u.numpy(), u, atol=1e-5)
        np.testing.assert_allclose(layer.v.numpy(), v, atol=1e-5)


def test_power_iterations_zero_freezes_state():
    layer = conv_sn(power_iterations=0)
    u0, v0 = state_of(layer)
    layer(tf.random.normal([1, HW, HW, C_IN]), training=True)
    np.testing.assert_array_equal(layer.u.numpy(), u0)
    np.testing.assert_array_equal(layer.v.numpy(), v0)
    assert float(layer.lipschitz_estimate(0)) == float(
        tf.minimum(layer.sigma(), COEFF)
    )  # estimate(0) reads the stored state ...
    np.testing.assert_array_equal(layer.u.numpy(), u0)  # ... and does not change it


# --------------------------------------------------------------------------------------------
# Gradient through sigma.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "conv", "dilated_conv"])
def test_gradient_flows_through_sigma(kind):
    """The gradients to the kernel (through sigma too) and to the input, against a plain
    re-implementation. The dilated case runs on TF's plain CPU kernels, which have no dilated
    Conv2DBackpropInput (`TF_ENABLE_ONEDNN_OPTS=0`)."""
    conv_args = {"conv": {"strides": 2}, "dilated_conv": {"dilations": 2}}.get(kind)
    if kind == "dense":
        layer = SpectralNormalization(keras.layers.Dense(5), coeff=COEFF)
        layer.build((None, 6))
        x = tf.random.normal([4, 6])
    elif kind == "conv":
        layer = conv_sn(2, "same")
        x = tf.random.normal([2, HW, HW, C_IN])
    else:
        layer = conv_sn(1, "same", 2)
        x = tf.random.normal([2, HW, HW, C_IN])
    scale_kernel(layer, 5.0)
    layer.lipschitz_estimate(20)
    u, v = (tf.constant(a) for a in state_of(layer))
    weights = tf.random.normal(layer.compute_output_shape(x.shape))
    kernel_var, bias = layer.layer.kernel, layer.layer.bias

    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=False) * weights)
    grad, grad_x = (g.numpy() for g in tape.gradient(loss, [kernel_var, x]))

    def reference(stop_sigma):
        kernel = tf.Variable(kernel_var.numpy())
        with tf.GradientTape() as tape:
            tape.watch(x)
            if kind == "dense":
                sigma = tf.tensordot(v, tf.linalg.matvec(kernel, u), 1)  # v^T W u
            else:
                sigma = tf.reduce_sum(u * tf.nn.convolution(v, kernel, padding="SAME", **conv_args))
            if stop_sigma:
                sigma = tf.stop_gradient(sigma)
            w_n = kernel / tf.maximum(1.0, sigma / COEFF)
            if kind == "dense":
                y = x @ w_n + bias
            else:
                y = tf.nn.convolution(x, w_n, padding="SAME", **conv_args) + bias
            loss = tf.reduce_sum(y * weights)
        return [g.numpy() for g in tape.gradient(loss, [kernel, x])]

    expected, expected_x = reference(stop_sigma=False)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(grad_x, expected_x, rtol=1e-4, atol=1e-5 * np.abs(expected_x).max())
    # The check can fail: without d(sigma)/dW the gradient is visibly different.
    assert np.abs(grad - reference(stop_sigma=True)[0]).max() > 1e-2 * np.abs(expected).max()


# --------------------------------------------------------------------------------------------
# Distribution, checkpoints, config.
# --------------------------------------------------------------------------------------------


def test_mirrored_strategy_training_call():
    assert len(tf.config.list_logical_devices("CPU")) == 2, (
        "conftest should split the CPU into two logical devices")
    strategy = make_strategy("mirrored")
    with strategy.scope():
        layer = conv_sn(1, "same", use_bias=False, power_iterations=1)
    # TF 2.21 lets replicas write different values into a MirroredVariable with aggregation
    # NONE (no error, copies diverge): the aggregation has to be checked explicitly.
    for state in (layer.u, layer.v):
        assert state.aggregation == "only_first_replica"
        assert state.value.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA
    u0 = unit(layer.u.numpy() + np.random.default_rng(1).standard_normal(layer.u.shape))
    layer.u.assign(u0.astype(np.float32))
    u_expected, v_expected = _expected_power_step(layer, layer.u.numpy(), layer.v.numpy(), 1)
    x = tf.random.normal([2, HW, HW, C_IN])

    @tf.function
    def step(x):
        def replica_fn(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True) ** 2)
            return tape.gradient(loss, layer.layer.kernel)

        return strategy.run(replica_fn, args=(x,))

    grads = strategy.experimental_local_results(step(x))
    assert len(grads) == 2 and all(g is not None for g in grads)
    copies = layer.u.value.values
    assert len(copies) == 2
    for copy in copies:
        np.testing.assert_allclose(copy.numpy(), u_expected, atol=1e-5)
    for copy in layer.v.value.values:
        np.testing.assert_allclose(copy.numpy(), v_expected, atol=1e-5)


def _train_a_little(model):
    for _ in range(3):
        model(tf.random.normal([2, HW, HW, C_IN]), training=True)


def test_save_weights_round_trip(tmp_path):
    model = small_model()
    _train_a_little(model)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    restored = small_model()
    restored.load_weights(path)
    for a, b in zip(spectral_norm_layers(model), spectral_norm_layers(restored), strict=True):
        np.testing.assert_array_equal(a.u.numpy(), b.u.numpy())
        np.testing.assert_array_equal(a.v.numpy(), b.v.numpy())
        np.testing.assert_array_equal(a.normalized_kernel(), b.normalized_kernel())


def test_tf_checkpoint_round_trip(tmp_path):
    model = small_model()
    _train_a_little(model)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    restored = small_model()
    tf.train.Checkpoint(model=restored).read(path).assert_consumed()
    for a, b in zip(spectral_norm_layers(model), spectral_norm_layers(restored), strict=True):
        np.testing.assert_array_equal(a.u.numpy(), b.u.numpy())
        np.testing.assert_array_equal(a.v.numpy(), b.v.numpy())


def test_keras_file_round_trip(tmp_path):
    model = small_model()
    _train_a_little(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    x = tf.random.normal([2, HW, HW, C_IN])
    np.testing.assert_array_equal(model(x).numpy(), restored(x).numpy())
    for a, b in zip(spectral_norm_layers(model), spectral_norm_layers(restored), strict=True):
        np.testing.assert_array_equal(a.u.numpy(), b.u.numpy())


def test_config_round_trip():
    layer = SpectralNormalization(
        keras.layers.Conv2D(5, 3, strides=2, padding="valid", activation="elu"),
        coeff=0.7,
        power_iterations=3,
        name="sn_conv",
    )
    config = layer.get_config()
    clone = SpectralNormalization.from_config(config)
    assert clone.get_config() == config
    assert clone.coeff == 0.7 and clone.power_iterations == 3 and clone.name == "sn_conv"
    assert isinstance(clone.layer, keras.layers.Conv2D)
    assert clone.layer.strides == (2, 2) and clone.layer.padding == "valid"
    assert clone.layer.activation is keras.activations.elu

    generic = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(generic) is SpectralNormalization
    assert generic.get_config() == config


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coeff", [0, 0.0, 1, 1.0, 1.5, -0.1, float("nan"), True, "0.9"])
def test_bad_coeff(coeff):
    with pytest.raises(ValueError, match="coeff"):
        SpectralNormalization(keras.layers.Dense(2), coeff=coeff)


@pytest.mark.parametrize("power_iterations", [-1, 1.5, None, True])
def test_bad_power_iterations(power_iterations):
    with pytest.raises(ValueError, match="power_iterations"):
        SpectralNormalization(keras.layers.Dense(2), power_iterations=power_iterations)


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.layers.Conv1D(2, 3),
        lambda: keras.layers.LSTM(2),
        lambda: keras.layers.DepthwiseConv2D(3),
        lambda: keras.layers.Conv2DTranspose(2, 3),
        lambda: keras.layers.Conv2D(2, 3, data_format="channels_first"),
        lambda: keras.layers.Conv2D(4, 3, groups=2),
        lambda: "dense",
    ],
    ids=["conv1d", "lstm", "depthwise", "conv2d_transpose", "channels_first", "groups", "str"],
)
def test_unsupported_layers(make):
    with pytest.raises(TypeError, match="supports keras.layers.Dense and keras.layers.Conv2D"):
        SpectralNormalization(make())


def test_unknown_spatial_size():
    layer = SpectralNormalization(keras.layers.Conv2D(2, 3))
    with pytest.raises(ValueError, match="static spatial size"):
        layer.build((None, None, None, 3))
    with pytest.raises(ValueError, match="static spatial size"):
        keras.Sequential(
            [keras.Input((None, None, 3)), SpectralNormalization(keras.layers.Conv2D(2, 3))]
        )


def test_wrong_spatial_size_at_call():
    layer = conv_sn()
    with pytest.raises(ValueError, match="spatial size"):
        layer(tf.zeros([1, HW + 2, HW, C_IN]))


def test_bad_diagnostic_arguments():
    layer = SpectralNormalization(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="Build"):
        layer.lipschitz_upper_bound()
    conv = conv_sn()
    with pytest.raises(ValueError, match="tol"):
        conv.lipschitz_estimate(10, tol=-1.0)
    with pytest.raises(ValueError, match="method"):
        conv.lipschitz_estimate(10, method="svd")
    with pytest.raises(ValueError, match="power_iterations"):
        conv.lipschitz_estimate(-3)
    with pytest.raises(ValueError, match="max_iterations"):
        converge_spectral_norms(conv, max_iterations=-1)


# --------------------------------------------------------------------------------------------
# Precision.
# --------------------------------------------------------------------------------------------


def test_mixed_precision_policy():
    layer = SpectralNormalization(keras.layers.Dense(4, dtype="mixed_float16"))
    y = layer(tf.random.normal([2, 3]), training=True)
    assert y.dtype == tf.float16
    assert layer.u.dtype == "float32" and layer.layer.kernel.dtype == "float32"
