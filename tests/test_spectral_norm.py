"""Tests for tf_iresnet.spectral_norm: exact operator norms, adjoints, gradients, state, I/O."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet import spectral_norm as sn_lib
from tf_iresnet.spectral_norm import (
    SpectralNormalization,
    converge_spectral_norms,
    lipschitz_report,
    spectral_norm_layers,
)
from tf_iresnet.training import make_strategy

COEFF = 0.9
HW = 8
C_IN = 3
C_OUT = 4

# (strides, padding, dilation_rate)
CONV_CASES = [
    (1, "same", 1),
    (1, "valid", 1),
    (2, "same", 1),
    (2, "valid", 1),
    (1, "same", 2),
    (1, "valid", 2),
]
CONV_IDS = [f"s{s}-{p}-d{d}" for s, p, d in CONV_CASES]


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


def _conv_sn(strides=1, padding="same", dilation=1, coeff=COEFF, power_iterations=1, **kw):
    layer = SpectralNormalization(
        keras.layers.Conv2D(
            C_OUT, 3, strides=strides, padding=padding, dilation_rate=dilation, **kw
        ),
        coeff=coeff,
        power_iterations=power_iterations,
    )
    layer.build((None, HW, HW, C_IN))
    return layer


def _scale_kernel(layer, factor):
    layer.layer.kernel.assign(layer.layer.kernel * factor)


def _matrix_of(fn, in_shape):
    """The matrix of the affine map's linear part x -> fn(x) - fn(0), one column per basis vector.

    Applied to a layer with linear activation (inference mode), this is the operator the layer
    actually applies with its normalized kernel. Returns [out_dim, in_dim].
    """
    n = int(np.prod(in_shape))
    basis = tf.reshape(tf.eye(n), [n, *in_shape])
    outputs = fn(basis) - fn(tf.zeros([1, *in_shape]))
    return tf.reshape(outputs, [n, -1]).numpy().T


def _layer_matrix(layer, in_shape):
    return _matrix_of(lambda x: layer(x, training=False), in_shape)


def _spectral_norm(matrix):
    return float(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0])


def _true_conv_norm(layer):
    return _spectral_norm(_layer_matrix(layer, (HW, HW, C_IN)))


def _raw_conv_norm(layer):
    """True norm of the wrapped Conv2D itself (no normalization), via a plain Keras copy."""
    config = dict(layer.layer.get_config(), name=None)
    plain = keras.layers.Conv2D.from_config(config)
    plain.build((None, HW, HW, C_IN))
    plain.set_weights(layer.layer.get_weights())
    return _spectral_norm(_matrix_of(plain, (HW, HW, C_IN)))


def _state(layer):
    return layer.u.numpy().copy(), layer.v.numpy().copy()


def _unit(x):
    return x / np.linalg.norm(x)


def _randomize_state(layer, seed):
    rng = np.random.default_rng(seed)
    layer.u.assign(_unit(rng.standard_normal(layer.u.shape)).astype(np.float32))
    layer.v.assign(_unit(rng.standard_normal(layer.v.shape)).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Exact norms.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("strides,padding,dilation", CONV_CASES, ids=CONV_IDS)
def test_conv_normalized_norm_and_upper_bound(strides, padding, dilation, method):
    layer = _conv_sn(strides, padding, dilation)
    layer.layer.kernel.assign(tf.random.normal(layer.layer.kernel.shape))
    _randomize_state(layer, seed=strides + 10 * dilation)
    raw = _raw_conv_norm(layer)
    assert raw > 2.0 * COEFF, "the normalization must be active in this test"
    # With a stale state the check below fails: it is not vacuous.
    assert _true_conv_norm(layer) > COEFF * 1.1

    # Power iteration needs many more iterations on convolutions (clustered singular values).
    budget = {"lanczos": {}, "power": {"power_iterations": 3000}}[method]
    estimate = float(layer.lipschitz_estimate(method=method, **budget))
    true_norm = _true_conv_norm(layer)
    bound = float(layer.lipschitz_upper_bound())

    assert estimate == pytest.approx(COEFF, rel=1e-6)
    assert true_norm <= COEFF * (1 + 1e-3)
    assert true_norm >= COEFF * (1 - 1e-3)  # and the normalization is not overly cautious
    assert float(layer.sigma()) == pytest.approx(raw, rel=1e-3)
    assert bound >= true_norm * (1 - 1e-5)
    assert bound <= 2.0 * true_norm


@pytest.mark.parametrize("strides,padding", [(1, "same"), (2, "valid")])
def test_conv_below_coeff_is_untouched(strides, padding):
    layer = _conv_sn(strides, padding)
    _scale_kernel(layer, 0.2)
    layer.lipschitz_estimate()
    true_norm = _true_conv_norm(layer)
    assert true_norm < COEFF
    np.testing.assert_array_equal(layer.normalized_kernel().numpy(), layer.layer.kernel.numpy())
    assert float(layer.lipschitz_estimate(0)) == pytest.approx(true_norm, rel=1e-3)
    assert float(layer.lipschitz_upper_bound()) >= true_norm * (1 - 1e-5)


def test_one_by_one_conv_bound_is_exact():
    # A 1x1 convolution applies the same C_in x C_out matrix at every pixel: its norm is the
    # norm of that matrix, and the frequency-domain bound has no slack.
    layer = SpectralNormalization(keras.layers.Conv2D(C_OUT, 1), coeff=COEFF)
    layer.build((None, HW, HW, C_IN))
    _scale_kernel(layer, 0.3)
    matrix_norm = _spectral_norm(layer.layer.kernel.numpy()[0, 0])
    assert matrix_norm < COEFF
    assert _true_conv_norm(layer) == pytest.approx(matrix_norm, rel=1e-5)
    assert float(layer.lipschitz_upper_bound()) == pytest.approx(matrix_norm, rel=1e-5)


def test_dense_estimate_matches_svd():
    layer = SpectralNormalization(keras.layers.Dense(5), coeff=COEFF)
    layer.build((None, 6))
    _scale_kernel(layer, 4.0)
    exact_raw = _spectral_norm(layer.layer.kernel.numpy())
    assert exact_raw > 2.0 * COEFF

    estimate = float(layer.lipschitz_estimate(power_iterations=500, tol=1e-7))
    assert float(layer.sigma()) == pytest.approx(exact_raw, rel=1e-4)
    assert estimate == pytest.approx(COEFF, rel=1e-6)
    normalized = _spectral_norm(layer.normalized_kernel().numpy())
    assert normalized <= COEFF * (1 + 1e-4)
    assert normalized == pytest.approx(COEFF, rel=1e-4)
    # The layer's output uses that kernel; the bound is the exact SVD norm.
    assert _spectral_norm(_layer_matrix(layer, (6,))) == pytest.approx(normalized, rel=1e-5)
    assert float(layer.lipschitz_upper_bound()) == pytest.approx(normalized, rel=1e-6)


def test_dense_lanczos_is_exact_after_rank_steps():
    # The Krylov space of a 6 x 5 map is exhausted after at most 5 steps: Lanczos stops there
    # with the exact norm, where power iteration would still be converging.
    layer = SpectralNormalization(keras.layers.Dense(5), coeff=COEFF)
    layer.build((None, 6))
    _randomize_state(layer, seed=3)
    sigma, iterations, converged = layer._iterate_to_tolerance(100, 0.0, "lanczos")
    assert bool(converged) and int(iterations) <= 6
    assert float(sigma) == pytest.approx(_spectral_norm(layer.layer.kernel.numpy()), rel=1e-6)


def test_lipschitz_estimate_in_tf_function():
    layer = _conv_sn(2, "valid")
    layer.layer.kernel.assign(tf.random.normal(layer.layer.kernel.shape))
    _randomize_state(layer, seed=4)
    estimate = tf.function(lambda: layer.lipschitz_estimate(200))()
    assert float(estimate) == pytest.approx(COEFF, rel=1e-6)
    assert _true_conv_norm(layer) <= COEFF * (1 + 1e-3)


def test_dense_accepts_higher_rank_inputs():
    layer = SpectralNormalization(keras.layers.Dense(5, activation="tanh"))
    x = tf.random.normal([2, 3, 6])
    y = layer(x)
    expected = tf.tanh(tf.einsum("bti,io->bto", x, layer.normalized_kernel()) + layer.layer.bias)
    np.testing.assert_allclose(y.numpy(), expected.numpy(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Operator, adjoint, power iteration.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strides,padding,dilation", CONV_CASES, ids=CONV_IDS)
def test_conv_adjoint_identity_and_operator(strides, padding, dilation):
    layer = _conv_sn(strides, padding, dilation, use_bias=False)
    spec, kernel = layer._spec, layer.layer.kernel
    v = tf.random.normal(layer.v.shape, dtype=tf.float64)
    u = tf.random.normal(layer.u.shape, dtype=tf.float64)
    kernel64 = tf.cast(kernel, tf.float64)
    av = sn_lib._matvec(spec, kernel64, v)
    atu = sn_lib._rmatvec(spec, kernel64, u, tuple(v.shape))
    assert atu.shape == v.shape
    np.testing.assert_allclose(
        tf.reduce_sum(av * u).numpy(), tf.reduce_sum(v * atu).numpy(), rtol=1e-10
    )
    # A is the wrapped Conv2D's own linear map at the build-time input size.
    np.testing.assert_allclose(
        sn_lib._matvec(spec, kernel, tf.cast(v, tf.float32)).numpy(),
        layer.layer(tf.cast(v, tf.float32)).numpy(),
        atol=1e-5,
    )


def _expected_power_step(layer, u, v, iterations):
    """Independent power iteration: A is the wrapped Conv2D (no bias), A^T u its VJP."""
    assert not layer.layer.use_bias
    for _ in range(iterations):
        v_var = tf.Variable(np.zeros_like(v))
        with tf.GradientTape() as tape:
            inner = tf.reduce_sum(layer.layer(v_var) * u)
        v = _unit(tape.gradient(inner, v_var).numpy())
        u = _unit(layer.layer(v).numpy())
    return u, v


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
def test_training_updates_state_inference_does_not(mode):
    layer = _conv_sn(2, "same", use_bias=False, power_iterations=2)
    layer.layer.kernel.assign(tf.random.normal(layer.layer.kernel.shape))
    x = tf.random.normal([2, HW, HW, C_IN])
    u0, v0 = layer.u.numpy(), layer.v.numpy()
    # Perturb the stored state so that an update is visible.
    u0 = _unit(u0 + 0.5 * np.random.default_rng(0).standard_normal(u0.shape)).astype(np.float32)
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


def test_power_iterations_zero_freezes_state():
    layer = _conv_sn(power_iterations=0)
    u0, v0 = _state(layer)
    layer(tf.random.normal([1, HW, HW, C_IN]), training=True)
    np.testing.assert_array_equal(layer.u.numpy(), u0)
    np.testing.assert_array_equal(layer.v.numpy(), v0)
    assert float(layer.lipschitz_estimate(0)) == float(
        tf.minimum(layer.sigma(), COEFF)
    )  # estimate(0) reads the stored state ...
    np.testing.assert_array_equal(layer.u.numpy(), u0)  # ... and does not change it


def test_state_stays_unit_with_zero_kernel():
    layer = _conv_sn()
    layer.layer.kernel.assign(tf.zeros_like(layer.layer.kernel))
    layer(tf.random.normal([1, HW, HW, C_IN]), training=True)
    assert np.linalg.norm(layer.u.numpy()) == pytest.approx(1.0, rel=1e-5)
    assert np.linalg.norm(layer.v.numpy()) == pytest.approx(1.0, rel=1e-5)
    layer.layer.kernel.assign(tf.random.normal(layer.layer.kernel.shape))
    true_raw = _true_conv_norm(layer)  # the normalization cannot be active: sigma ~ 0
    layer.lipschitz_estimate(500, tol=1e-7)
    assert float(layer.sigma()) == pytest.approx(true_raw, rel=1e-3)


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
        layer = _conv_sn(2, "same")
        x = tf.random.normal([2, HW, HW, C_IN])
    else:
        layer = _conv_sn(1, "same", 2)
        x = tf.random.normal([2, HW, HW, C_IN])
    _scale_kernel(layer, 5.0)
    layer.lipschitz_estimate(20)
    u, v = (tf.constant(a) for a in _state(layer))
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
        layer = _conv_sn(1, "same", use_bias=False, power_iterations=1)
    # TF 2.21 lets replicas write different values into a MirroredVariable with aggregation
    # NONE (no error, copies diverge): the aggregation has to be checked explicitly.
    for state in (layer.u, layer.v):
        assert state.aggregation == "only_first_replica"
        assert state.value.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA
    u0 = _unit(layer.u.numpy() + np.random.default_rng(1).standard_normal(layer.u.shape))
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


def _small_model():
    return keras.Sequential(
        [
            keras.Input((HW, HW, C_IN)),
            SpectralNormalization(keras.layers.Conv2D(C_OUT, 3, padding="same"), coeff=COEFF),
            keras.layers.Flatten(),
            SpectralNormalization(keras.layers.Dense(3), coeff=COEFF),
        ]
    )


def _train_a_little(model):
    for _ in range(3):
        model(tf.random.normal([2, HW, HW, C_IN]), training=True)


def test_save_weights_round_trip(tmp_path):
    model = _small_model()
    _train_a_little(model)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    restored = _small_model()
    restored.load_weights(path)
    for a, b in zip(spectral_norm_layers(model), spectral_norm_layers(restored), strict=True):
        np.testing.assert_array_equal(a.u.numpy(), b.u.numpy())
        np.testing.assert_array_equal(a.v.numpy(), b.v.numpy())
        np.testing.assert_array_equal(a.normalized_kernel(), b.normalized_kernel())


def test_tf_checkpoint_round_trip(tmp_path):
    model = _small_model()
    _train_a_little(model)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    restored = _small_model()
    tf.train.Checkpoint(model=restored).read(path).assert_consumed()
    for a, b in zip(spectral_norm_layers(model), spectral_norm_layers(restored), strict=True):
        np.testing.assert_array_equal(a.u.numpy(), b.u.numpy())
        np.testing.assert_array_equal(a.v.numpy(), b.v.numpy())


def test_keras_file_round_trip(tmp_path):
    model = _small_model()
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
    layer = _conv_sn()
    with pytest.raises(ValueError, match="spatial size"):
        layer(tf.zeros([1, HW + 2, HW, C_IN]))


def test_bad_diagnostic_arguments():
    layer = SpectralNormalization(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="Build"):
        layer.lipschitz_upper_bound()
    conv = _conv_sn()
    with pytest.raises(ValueError, match="tol"):
        conv.lipschitz_estimate(10, tol=-1.0)
    with pytest.raises(ValueError, match="method"):
        conv.lipschitz_estimate(10, method="svd")
    with pytest.raises(ValueError, match="power_iterations"):
        conv.lipschitz_estimate(-3)
    with pytest.raises(ValueError, match="max_iterations"):
        converge_spectral_norms(conv, max_iterations=-1)


# --------------------------------------------------------------------------------------------
# Model-level helpers.
# --------------------------------------------------------------------------------------------


class _Block(keras.layers.Layer):
    """g = conv3x3 -> elu -> conv3x3, the shape of an i-ResNet residual branch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = SpectralNormalization(keras.layers.Conv2D(5, 3, padding="same"), coeff=COEFF)
        self.conv2 = SpectralNormalization(
            keras.layers.Conv2D(C_IN, 3, padding="same"), coeff=COEFF
        )

    def build(self, input_shape):
        self.conv1.build(input_shape)
        self.conv2.build((*input_shape[:-1], 5))

    def call(self, x, training=None):
        return self.conv2(tf.nn.elu(self.conv1(x, training=training)), training=training)


def test_lipschitz_report():
    model = keras.Sequential(
        [
            keras.Input((HW, HW, C_IN)),
            _Block(name="block_a"),
            _Block(name="block_b"),
            keras.layers.Flatten(),
            SpectralNormalization(keras.layers.Dense(3), coeff=COEFF, name="head"),
        ],
        name="net",
    )
    sn_layers = spectral_norm_layers(model)
    assert [layer.name for layer in sn_layers][-1] == "head" and len(sn_layers) == 5
    for layer in sn_layers:
        _scale_kernel(layer, 6.0)  # raw norms well above coeff: normalization active
    before = [_state(layer) for layer in sn_layers]

    report = lipschitz_report(model)
    for layer, (u, v) in zip(sn_layers, before, strict=True):  # power_iterations=0: read only
        np.testing.assert_array_equal(layer.u.numpy(), u)
        np.testing.assert_array_equal(layer.v.numpy(), v)

    assert set(report) == {"layers", "blocks"}
    assert [e["name"] for e in report["layers"]] == [layer.name for layer in sn_layers]
    for entry, layer in zip(report["layers"], sn_layers, strict=True):
        assert set(entry) == {"name", "estimate", "upper_bound"}
        assert isinstance(entry["estimate"], float) and isinstance(entry["upper_bound"], float)
        assert entry["estimate"] == pytest.approx(min(float(layer.sigma()), COEFF), rel=1e-6)
        assert entry["upper_bound"] == pytest.approx(float(layer.lipschitz_upper_bound()))
    blocks = {e["name"]: e for e in report["blocks"]}
    assert list(blocks) == ["net", "block_a", "block_b"]
    by_name = {e["name"]: e for e in report["layers"]}
    for name in ["block_a", "block_b"]:
        block = model.get_layer(name)
        for key in ["estimate", "upper_bound"]:
            expected = by_name[block.conv1.name][key] * by_name[block.conv2.name][key]
            assert blocks[name][key] == pytest.approx(expected, rel=1e-12)
    assert blocks["net"]["upper_bound"] == pytest.approx(by_name["head"]["upper_bound"])

    cheap = lipschitz_report(model, upper_bounds=False)
    assert [e["estimate"] for e in cheap["layers"]] == [e["estimate"] for e in report["layers"]]
    assert all(e["upper_bound"] is None for e in cheap["layers"] + cheap["blocks"])

    # Converging changes the state, and then every estimate is coeff and every bound is valid.
    converged = lipschitz_report(model, power_iterations=200)
    assert all(e["estimate"] == pytest.approx(COEFF, rel=1e-6) for e in converged["layers"])
    block = model.get_layer("block_a")
    x = tf.random.normal([1, HW, HW, C_IN])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = block(x, training=False)
    jacobian = tape.jacobian(y, x).numpy().reshape(HW * HW * C_IN, HW * HW * C_IN)
    bound = {e["name"]: e for e in converged["blocks"]}["block_a"]["upper_bound"]
    assert _spectral_norm(jacobian) <= bound
    assert _spectral_norm(jacobian) < 1.0  # the residual branch is a contraction here


def test_converge_spectral_norms_warns_on_cap(caplog):
    model = _small_model()
    with caplog.at_level("WARNING", logger="tf_iresnet.spectral_norm"):
        converge_spectral_norms(model, tol=0.0, max_iterations=2)
    assert "did not reach tol" in caplog.text


def test_converge_spectral_norms():
    model = _small_model()
    sn_layers = spectral_norm_layers(model)
    for layer in sn_layers:
        _scale_kernel(layer, 6.0)
        layer.u.assign(_unit(np.random.default_rng(2).standard_normal(layer.u.shape)))
    converge_spectral_norms(model, tol=1e-6, max_iterations=1000)
    assert _true_conv_norm(sn_layers[0]) <= COEFF * (1 + 1e-3)
    dense_norm = _spectral_norm(sn_layers[1].normalized_kernel().numpy())
    assert dense_norm == pytest.approx(COEFF, rel=1e-4)


def test_mixed_precision_policy():
    layer = SpectralNormalization(keras.layers.Dense(4, dtype="mixed_float16"))
    y = layer(tf.random.normal([2, 3]), training=True)
    assert y.dtype == tf.float16
    assert layer.u.dtype == "float32" and layer.layer.kernel.dtype == "float32"
