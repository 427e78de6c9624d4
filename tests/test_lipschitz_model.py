"""Tests for tf_iresnet.lipschitz.model: the model-level walk, report and convergence."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _lipschitz import (
    C_IN,
    COEFF,
    HW,
    scale_kernel,
    small_model,
    spectral_norm,
    state_of,
    true_conv_norm,
    unit,
)

from tf_iresnet.lipschitz.layer import SpectralNormalization
from tf_iresnet.lipschitz.model import (
    converge_spectral_norms,
    lipschitz_report,
    spectral_norm_layers,
)

pytestmark = pytest.mark.usefixtures("keras_seed")


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
        scale_kernel(layer, 6.0)  # raw norms well above coeff: normalization active
    before = [state_of(layer) for layer in sn_layers]

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
    assert spectral_norm(jacobian) <= bound
    assert spectral_norm(jacobian) < 1.0  # the residual branch is a contraction here


def test_converge_spectral_norms_warns_on_cap(caplog):
    model = small_model()
    with caplog.at_level("WARNING", logger="tf_iresnet.lipschitz.model"):
        converge_spectral_norms(model, tol=0.0, max_iterations=2)
    assert "did not reach tol" in caplog.text


def test_converge_spectral_norms():
    model = small_model()
    sn_layers = spectral_norm_layers(model)
    for layer in sn_layers:
        scale_kernel(layer, 6.0)
        layer.u.assign(unit(np.random.default_rng(2).standard_normal(layer.u.shape)))
    converge_spectral_norms(model, tol=1e-6, max_iterations=1000)
    assert true_conv_norm(sn_layers[0]) <= COEFF * (1 + 1e-3)
    dense_norm = spectral_norm(sn_layers[1].normalized_kernel().numpy())
    assert dense_norm == pytest.approx(COEFF, rel=1e-4)
