"""IResNetFlow: multi-scale bookkeeping checked against an exact change of variables."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tf_iresnet import converge_spectral_norms, presets
from tf_iresnet.models.density import DensityConfig, IResNetFlow

tfd = tfp.distributions

TINY_CONV = DensityConfig(
    input_shape=(4, 4, 1),
    num_levels=17,
    initial_squeeze=True,
    blocks=(2, 1),
    hidden_channels=8,
    strides=(1, 2),
    eval_logdet="exact",
    coeff=0.8,
)
TINY_DENSE = DensityConfig(
    input_shape=(2,),
    num_levels=None,
    architecture="dense",
    blocks=(3,),
    hidden_channels=16,
    activation="lipswish",
    preprocessing="none",
    eval_logdet="exact",
)


def _model(config, seed=0):
    tf.keras.utils.set_random_seed(seed)
    model = IResNetFlow(config)
    x = _data(config, 16, seed)
    model.initialize(x)  # ActNorm data-dependent initialization
    # Perturb the prior so that it is not the identity map.
    model.prior_loc.assign(tf.random.stateless_normal(model.prior_loc.shape, [1, seed]) * 0.1)
    model.prior_log_scale.assign(
        tf.random.stateless_normal(model.prior_log_scale.shape, [2, seed]) * 0.1
    )
    converge_spectral_norms(model)
    return model


def _data(config, n, seed=0):
    shape = [n, *config.input_shape]
    if config.architecture == "conv":
        return tf.random.stateless_uniform(shape, seed=[seed, 9])
    return tf.random.stateless_normal(shape, seed=[seed, 9])


@pytest.mark.parametrize("config", [TINY_CONV, TINY_DENSE], ids=["conv", "dense"])
def test_log_prob_is_the_exact_change_of_variables(config):
    model = _model(config)
    x = _data(config, 3, seed=5)
    # Independent computation: z = f(x) via the encoder, its full Jacobian, the prior.
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = model.encode(x)
    d = config.event_size
    jac = tf.reshape(tape.batch_jacobian(z, x), [-1, d, d])
    expected = model.prior().log_prob(z) + tf.linalg.slogdet(jac)[1]
    got = model.distribution(mode="eval").log_prob(tf.identity(x))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    log_pz, logdet = model.log_prob_parts(tf.identity(x), mode="eval")
    np.testing.assert_allclose((log_pz + logdet).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    # The training estimator (5-term series, one probe) is close on average.
    est = model.distribution(mode="train", seed=[3, 3]).log_prob(tf.repeat(x, 200, axis=0))
    np.testing.assert_allclose(
        tf.reshape(est, [3, 200]).numpy().mean(1), expected.numpy(), atol=0.3
    )


@pytest.mark.parametrize("config", [TINY_CONV, TINY_DENSE], ids=["conv", "dense"])
def test_encode_decode_sample(config):
    model = _model(config)
    x = _data(config, 5, seed=6)
    z = model.encode(x)
    assert z.shape == [5, config.event_size]
    np.testing.assert_allclose(model.decode(tf.identity(z)).numpy(), x.numpy(), atol=1e-4)
    x_rec, iterations, residual, converged = model.decode_with_stats(tf.identity(z))
    assert 1 <= int(iterations) <= 100 and float(residual) < 1e-3 and bool(converged)
    s1 = model.sample(4, seed=[1, 2])
    np.testing.assert_array_equal(s1.numpy(), model.sample(4, seed=[1, 2]).numpy())
    assert s1.shape == [4, *config.input_shape]
    dist = model.distribution()
    assert dist.event_shape == list(config.input_shape) and dist.batch_shape == []
    assert np.isfinite(dist.log_prob(dist.sample(3, seed=[4, 4])).numpy()).all()
    batched = dist.log_prob(tf.reshape(_data(config, 6, 7), [2, 3, *config.input_shape]))
    assert batched.shape == [2, 3]


def test_factor_out_layout_and_parameter_count():
    model = _model(TINY_CONV)
    # 4x4x1 -> squeeze 2x2x4 -> 2 blocks -> factor out 2 -> squeeze 1x1x8 -> 1 block.
    shapes = [b.input_shape for b in model.branches]
    assert shapes == [(None, 2, 2, 4), (None, 2, 2, 4), (None, 1, 1, 8)]
    flow = model.bijector(mode="none")
    assert flow.forward_event_shape([4, 4, 1]) == [16]
    assert flow.inverse_event_shape([16]) == [4, 4, 1]


def test_gradients_reach_every_weight():
    model = _model(TINY_CONV)
    x = _data(TINY_CONV, 8, seed=3)
    with tf.GradientTape() as tape:
        log_pz, logdet = model.log_prob_parts(x, mode="train", seed=[1, 1])
        loss = -tf.reduce_mean(log_pz + logdet)
    grads = tape.gradient(loss, model.trainable_weights)
    for w, g in zip(model.trainable_weights, grads, strict=True):
        assert g is not None and np.isfinite(g.numpy()).all(), w.path


def test_bits_per_dim():
    model = _model(TINY_CONV)
    lp = tf.constant([-10.0, 0.0])
    expected = -lp.numpy() / (16 * np.log(2)) + np.log2(17)
    np.testing.assert_allclose(model.bits_per_dim(lp).numpy(), expected, rtol=1e-6)


@pytest.mark.slow  # over the CI time budget: `make test-slow`
@pytest.mark.parametrize("name, official", [
    ("cifar10_density_paper", 25_028_544),  # the official code's CIFAR10 density model
    ("bench_cifar_small", 0.98e6),  # REFERENCE.md, section 2 (given to two digits)
    ("bench_mnist", 3.75e6),
])
def test_preset_parameter_counts(name, official):
    model = presets.build(name)
    count = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert abs(count - official) <= 0.01 * official, count


def test_probe_setting_reaches_every_block():
    model = _model(dataclasses.replace(TINY_CONV, probe="rademacher"))
    blocks = _blocks(model.bijector(mode="train"))
    assert blocks and all(b.logdet_config.probe == "rademacher" for b in blocks)
    blocks = _blocks(model.bijector(mode="eval"))
    assert all(b.logdet_config.probe == "rademacher" for b in blocks)
    with pytest.raises(ValueError, match="probe must be one of"):
        dataclasses.replace(TINY_CONV, probe="uniform")


def _blocks(bijector):
    """The InvertibleResidualBlocks inside a (nested) bijector."""
    from tf_iresnet import InvertibleResidualBlock

    if isinstance(bijector, InvertibleResidualBlock):
        return [bijector]
    inner = getattr(bijector, "bijectors", None) or getattr(bijector, "scales", None) or []
    return [b for child in inner for b in _blocks(child)]


def test_presets_registry():
    assert {
        "cifar10_density_paper",
        "mnist_density_paper",
        "bench_cifar_small",
        "bench_mnist",
        "bench_cifar_width512_d1",
        "digits_density",
        "toy2d_density",
    } <= set(presets.names())
    with pytest.raises(ValueError, match="Unknown preset"):
        presets.config("nope")
    with pytest.raises(ValueError, match="Unknown config fields"):
        presets.build("digits_density", depth=3)
    model = presets.build("toy2d_density", blocks=(2,))
    assert len(model.branches) == 2


def test_config_errors():
    with pytest.raises(ValueError, match="coeff must be in the open interval"):
        dataclasses.replace(TINY_CONV, coeff=1.0)
    with pytest.raises(ValueError, match="strides must be 1 or 2"):
        dataclasses.replace(TINY_CONV, strides=(1, 3))
    with pytest.raises(ValueError, match="conv models need input_shape"):
        DensityConfig(input_shape=(4, 4))
    with pytest.raises(ValueError, match="Cannot squeeze"):
        IResNetFlow(
            DensityConfig(
                input_shape=(6, 6, 1), initial_squeeze=True, blocks=(1, 1), strides=(1, 2)
            )
        )


def test_checkpoint_holds_every_weight(tmp_path):
    """Every variable (incl. ActNorm flags and power-iteration vectors) round-trips."""
    model = _model(TINY_CONV)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    stored = [
        name for name, _ in tf.train.list_variables(path) if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    ]
    assert len(stored) == len(model.weights)
    fresh = IResNetFlow(TINY_CONV)
    assert all(int(a.initialized.numpy()) == 0 for a in fresh.actnorms)
    tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert all(int(a.initialized.numpy()) == 1 for a in fresh.actnorms)
