"""TFP's generic bijector properties, checked for every bijector of the project.

Written for this project (TFP's ``bijector_test_util`` is not in the wheel), after the checks
of TFP's ``bijector_properties_test.py``: bijective and finite, ``fldj == -ildj`` at the image,
``fldj`` against the autodiff Jacobian (``batch_jacobian`` + ``slogdet``), event-shape
functions against the calls (and refusing shapes the calls cannot take), dtype, finiteness
checks with ``validate_args``, batch shapes, caching; then the model distributions
(``tf.vectorized_map`` over ``log_prob``, finite gradients). Every case is tiny (4x4 images,
2- to 4-dimensional vectors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tf_iresnet
from tf_iresnet import ActNorm, ActNormState, InvertibleResidualBlock, LogDetConfig
from tf_iresnet.bijectors import Squeeze, ZeroChannelPad, centering, logit_preprocessing
from tf_iresnet.models.classifier import ClassifierConfig, IResNetClassifier
from tf_iresnet.models.density import DensityConfig, IResNetFlow

tfb = tfp.bijectors
tfd = tfp.distributions


def _dense_g(dim=4, seed=0):
    tf.keras.utils.set_random_seed(seed)
    g = tf_iresnet.dense_branch(dim, (16,), coeff=0.8, activation="elu")
    tf_iresnet.converge_spectral_norms(g)
    return g


def _conv_g(shape=(4, 4, 2), seed=0):
    tf.keras.utils.set_random_seed(seed)
    g = tf_iresnet.conv_branch(shape, 4, coeff=0.8)
    tf_iresnet.converge_spectral_norms(g)
    return g


def _actnorm_state(channels, seed=0):
    state = ActNormState()
    state.build((None, channels))
    state.loc.assign(tf.random.stateless_normal([channels], [seed, 1]) * 0.3)
    state.log_scale.assign(tf.random.stateless_normal([channels], [seed, 2]) * 0.3)
    state.initialized.assign(1)
    return state


DENSE_G, CONV_G = _dense_g(), _conv_g()
STATE_VEC, STATE_IMG = _actnorm_state(4), _actnorm_state(2, seed=1)

TINY_CONV = DensityConfig(input_shape=(4, 4, 1), num_levels=17, initial_squeeze=True,
                          blocks=(1, 1), hidden_channels=4, strides=(1, 2), coeff=0.8,
                          eval_logdet="exact")
TINY_DENSE = DensityConfig(input_shape=(2,), num_levels=None, architecture="dense", blocks=(2,),
                           hidden_channels=8, activation="lipswish", preprocessing="none",
                           coeff=0.8, eval_logdet="exact")
TINY_HYBRID = ClassifierConfig(input_shape=(4, 4, 1), num_classes=3, num_levels=17,
                               blocks=(1, 1), hidden_channels=(4, 4), strides=(1, 2),
                               hybrid_weight=1.0, eval_logdet="exact", coeff=0.8)


def _density_model(config):
    tf.keras.utils.set_random_seed(0)
    model = IResNetFlow(config)
    model.initialize(_data(config.input_shape, 16, seed=3))
    tf_iresnet.converge_spectral_norms(model)
    return model


def _hybrid_model():
    tf.keras.utils.set_random_seed(0)
    model = IResNetClassifier(TINY_HYBRID)
    model.initialize(_data(TINY_HYBRID.input_shape, 16, seed=3))
    tf_iresnet.converge_spectral_norms(model)
    return model


def _data(event_shape, n=3, seed=0, unit=True):
    shape = [n, *event_shape]
    if unit:  # images in (0, 1): the domain of the preprocessing
        return tf.random.stateless_uniform(shape, [seed, 7], minval=0.05, maxval=0.95)
    return tf.random.stateless_normal(shape, [seed, 7])


MODELS = {}


def _model(name):
    if name not in MODELS:
        MODELS[name] = (_hybrid_model() if name == "hybrid"
                        else _density_model(TINY_CONV if name == "conv" else TINY_DENSE))
    return MODELS[name]


@dataclasses.dataclass
class Case:
    """One bijector under test.

    Attributes:
      make: ``validate_args -> bijector``.
      event_shape: the forward input's event shape.
      event_ndims: event rank for the log-dets (forward side).
      unit: inputs in (0, 1) (else standard normal).
      logdet: "exact" (compare to the Jacobian to 1e-4), "stochastic" (the mean of 256 draws
        to 0.1), "zero" (constant 0, checked), or None (no log-det: logdet="none").
      bijective: False for ZeroChannelPad (injective: the inverse is checked on the image).
      dtype: the dtype the bijector requires (None: any).
      inverse_ndims: event rank of the inverse side (default ``event_ndims``).
    """

    make: Callable[[bool], tfb.Bijector]
    event_shape: tuple
    event_ndims: int
    unit: bool = False
    logdet: str | None = "exact"
    bijective: bool = True
    dtype: str | None = "float32"
    inverse_ndims: int | None = None


def _block(g, ndims, logdet, **kw):
    return lambda va: InvertibleResidualBlock(g, event_ndims=ndims, logdet=logdet, seed=[5, 6],
                                              validate_args=va, **kw)


CASES = {
    "block_dense_exact": Case(_block(DENSE_G, 1, "exact"), (4,), 1),
    "block_dense_series": Case(_block(DENSE_G, 1, LogDetConfig("series", n_terms=10,
                                                               n_samples=4)), (4,), 1,
                               logdet="stochastic"),
    "block_dense_neumann": Case(_block(DENSE_G, 1, LogDetConfig(
        "series", n_terms=10, n_samples=4, neumann_gradient=True)), (4,), 1,
        logdet="stochastic"),
    "block_dense_unbiased": Case(_block(DENSE_G, 1, LogDetConfig(
        "unbiased", n_exact_terms=4, n_samples=4)), (4,), 1, logdet="stochastic"),
    "block_dense_none": Case(_block(DENSE_G, 1, "none"), (4,), 1, logdet=None),
    "block_dense_anderson": Case(_block(DENSE_G, 1, "exact", inverse=tf_iresnet.InverseConfig(
        solver="anderson", atol=1e-6, rtol=1e-6)), (4,), 1),
    "block_conv_exact": Case(_block(CONV_G, 3, "exact"), (4, 4, 2), 3),
    "block_conv_series": Case(_block(CONV_G, 3, LogDetConfig("series", n_terms=10,
                                                             n_samples=4)), (4, 4, 2), 3,
                              logdet="stochastic"),
    "actnorm_vector": Case(lambda va: ActNorm(STATE_VEC, event_ndims=1, validate_args=va),
                           (4,), 1),
    "actnorm_image": Case(lambda va: ActNorm(STATE_IMG, event_ndims=3, validate_args=va),
                          (4, 4, 2), 3),
    "squeeze": Case(lambda va: Squeeze(validate_args=va), (4, 4, 2), 3, logdet="zero",
                    dtype=None),
    "zero_channel_pad": Case(lambda va: ZeroChannelPad(3, validate_args=va), (4, 4, 2), 3,
                             logdet="zero", bijective=False, dtype=None),
    "centering": Case(lambda va: centering(validate_args=va), (4, 4, 1), 3, unit=True),
    "logit": Case(lambda va: logit_preprocessing(0.05, validate_args=va), (4, 4, 1), 3,
                  unit=True),
    "multiscale_conv": Case(lambda va: _model("conv").bijector(mode="eval", validate_args=va),
                            (4, 4, 1), 3, unit=True, inverse_ndims=1),
    "multiscale_dense": Case(lambda va: _model("dense").bijector(mode="eval", validate_args=va),
                             (2,), 1, inverse_ndims=1),
    "hybrid_flow": Case(lambda va: _model("hybrid").flow(logdet="exact", validate_args=va),
                        (4, 4, 1), 3, unit=True),
}
IDS = list(CASES)


def _x(case, n=3, seed=0):
    return _data(case.event_shape, n, seed, unit=case.unit)


def _inverse_ndims(case):
    return case.inverse_ndims or case.event_ndims


@pytest.mark.parametrize("name", IDS)
def test_bijective_and_finite(name):
    case = CASES[name]
    bij = case.make(False)
    x = _x(case)
    y = bij.forward(x)
    assert np.isfinite(y.numpy()).all()
    x_back = bij.inverse(tf.identity(y))  # tf.identity: not the cached x
    np.testing.assert_allclose(x_back.numpy(), x.numpy(), atol=1e-4)
    if case.bijective:
        y_other = tf.identity(bij.forward(_x(case, seed=1)))
        y_again = bij.forward(tf.identity(bij.inverse(y_other)))
        np.testing.assert_allclose(y_again.numpy(), y_other.numpy(), atol=1e-4)


@pytest.mark.parametrize("name", [n for n in IDS if CASES[n].logdet])
def test_fldj_is_minus_ildj_at_the_image(name):
    case = CASES[name]
    bij = case.make(False)
    x = _x(case)
    fldj = bij.forward_log_det_jacobian(x, event_ndims=case.event_ndims)
    y = tf.identity(bij.forward(tf.identity(x)))
    ildj = bij.inverse_log_det_jacobian(y, event_ndims=_inverse_ndims(case))
    # Stochastic estimators use fixed seeds: the same probes at inverse(y) ~ x.
    np.testing.assert_allclose(fldj.numpy(), -ildj.numpy(), atol=1e-4)


def _autodiff_logdet(bij, x, event_ndims):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bij.forward(x)
    jac = tape.batch_jacobian(y, x)
    d = int(np.prod(x.shape[1:]))
    return tf.linalg.slogdet(tf.reshape(jac, [-1, d, d]))[1].numpy()


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n == "block_dense_unbiased" else n  # 256 draws
    for n in IDS if CASES[n].logdet and CASES[n].bijective])
def test_fldj_matches_the_autodiff_jacobian(name):
    case = CASES[name]
    bij = case.make(False)
    x = _x(case, n=2)
    expected = _autodiff_logdet(bij, tf.identity(x), case.event_ndims)
    if case.logdet == "stochastic":  # unbiased (or nearly): the mean of 256 draws
        reps = tf.repeat(x, 128, axis=0)
        draws = tf.function(lambda t: bij.forward_log_det_jacobian(
            t, event_ndims=case.event_ndims))(reps)
        got = tf.reshape(draws, [2, 128]).numpy().mean(axis=1)
        np.testing.assert_allclose(got, expected, atol=0.1)
    else:
        got = bij.forward_log_det_jacobian(tf.identity(x), event_ndims=case.event_ndims)
        np.testing.assert_allclose(np.broadcast_to(got.numpy(), expected.shape), expected,
                                   atol=1e-4)


def test_logdet_none_has_no_log_det():
    bij = CASES["block_dense_none"].make(False)
    with pytest.raises(ValueError, match="logdet='none'"):
        bij.forward_log_det_jacobian(_data((4,), unit=False), event_ndims=1)


@pytest.mark.parametrize("name", IDS)
def test_event_shape_functions_agree_with_the_calls(name):
    case = CASES[name]
    bij = case.make(False)
    x = _x(case, n=2)
    y = bij.forward(x)
    assert bij.forward_event_shape(x.shape) == y.shape
    assert bij.inverse_event_shape(y.shape) == x.shape
    np.testing.assert_array_equal(bij.forward_event_shape_tensor(tf.shape(x)).numpy(),
                                  y.shape.as_list())
    np.testing.assert_array_equal(bij.inverse_event_shape_tensor(tf.shape(y)).numpy(),
                                  x.shape.as_list())
    assert bij.experimental_batch_shape() == []  # views have no parameter batch


BAD_SHAPES = [  # (case, direction, shape): shapes the calls refuse
    ("squeeze", "forward", [5, 4, 2]),
    ("squeeze", "inverse", [2, 2, 6]),
    ("zero_channel_pad", "inverse", [4, 4, 3]),
    ("zero_channel_pad", "inverse", [4, 4, 2]),
    ("multiscale_conv", "forward", [4, 4, 2]),
    ("multiscale_conv", "forward", [8, 8, 1]),
    ("multiscale_conv", "inverse", [15]),
    ("multiscale_dense", "forward", [3]),
    ("multiscale_dense", "inverse", [4]),
]


@pytest.mark.parametrize("name, direction, shape", BAD_SHAPES)
def test_event_shape_functions_refuse_what_the_calls_refuse(name, direction, shape):
    bij = CASES[name].make(False)
    with pytest.raises(ValueError, match="cannot take shape|expected|expects"):
        getattr(bij, f"{direction}_event_shape")(shape)
    with pytest.raises(ValueError, match="cannot take shape|expected|expects"):
        getattr(bij, f"{direction}_event_shape_tensor")(tf.constant(shape))
    with pytest.raises(ValueError):  # and the call itself
        getattr(bij, direction)(tf.zeros([1, *shape]))


@pytest.mark.parametrize("name", ["squeeze", "zero_channel_pad", "multiscale_conv"])
def test_event_shape_tensor_checks_run_time_shapes_with_validate_args(name):
    bij = CASES[name].make(True)
    bad = {"squeeze": [5, 4, 2], "zero_channel_pad": [4, 4, 3], "multiscale_conv": [4, 4, 2]}
    direction = "inverse" if name == "zero_channel_pad" else "forward"
    fn = tf.function(lambda s: getattr(bij, f"{direction}_event_shape_tensor")(s),
                     input_signature=[tf.TensorSpec([3], tf.int32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="cannot take shape"):
        fn(tf.constant(bad[name]))


@pytest.mark.parametrize("name", IDS)
def test_dtype(name):
    case = CASES[name]
    bij = case.make(False)
    x64 = tf.cast(_x(case), tf.float64)
    if case.dtype is None:  # permutations and paddings take any dtype
        assert bij.forward(x64).dtype == tf.float64
        return
    with pytest.raises(TypeError, match=r"float64.*float32"):
        bij.forward(x64)
    y64 = tf.cast(bij.forward(_x(case)), tf.float64)
    with pytest.raises(TypeError, match=r"float64.*float32"):
        bij.inverse(y64)


@pytest.mark.parametrize("name", IDS)
def test_validate_args_refuses_non_finite_input(name):
    case = CASES[name]
    bij = case.make(True)
    x = _x(case, n=2).numpy()
    y = bij.forward(tf.constant(x)).numpy()
    for bad in (np.nan, np.inf):
        xb, yb = x.copy(), y.copy()
        xb.flat[1], yb.flat[1] = bad, bad
        with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
            bij.forward(tf.constant(xb))
        with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
            bij.inverse(tf.constant(yb))
    # Without validate_args a NaN simply propagates (no check is paid for).
    xb = x.copy()
    xb.flat[1] = np.nan
    assert np.isnan(case.make(False).forward(tf.constant(xb)).numpy()).any()


@pytest.mark.parametrize("name", IDS)
def test_batch_shapes(name):
    case = CASES[name]
    bij = case.make(False)
    x = _x(case, n=6)
    x23 = tf.reshape(x, [2, 3, *case.event_shape])
    y, y23 = bij.forward(x), bij.forward(x23)
    np.testing.assert_allclose(tf.reshape(y23, y.shape).numpy(), y.numpy(), atol=1e-6)
    if case.logdet in ("exact", "zero"):
        ldj23 = bij.forward_log_det_jacobian(x23, event_ndims=case.event_ndims)
        ldj = bij.forward_log_det_jacobian(x, event_ndims=case.event_ndims)
        ldj23 = np.broadcast_to(ldj23.numpy(), [2, 3])
        np.testing.assert_allclose(ldj23.reshape(-1), np.broadcast_to(ldj.numpy(), [6]),
                                   atol=1e-5)
    # Event only, no batch dimension.
    np.testing.assert_allclose(bij.forward(x[0]).numpy(), y[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("name", IDS)
def test_caching(name):
    case = CASES[name]
    bij = case.make(False)
    x = _x(case)
    y = bij.forward(x)
    assert bij.inverse(y) is x  # TFP's cache: the inverse of a forward result is its input
    assert bij.forward(x) is y
    assert bij.inverse(tf.identity(y)) is not x  # tf.identity defeats it


def test_block_forward_and_log_det_share_one_evaluation():
    calls = []

    def g(t, training=False):
        calls.append(1)
        return DENSE_G(t, training=training)

    block = InvertibleResidualBlock(g, event_ndims=1, logdet="exact")
    x = _data((4,), unit=False)
    block.forward(x)
    n = len(calls)
    block.forward_log_det_jacobian(x, event_ndims=1)
    assert len(calls) == n  # cached with the forward result
    block.forward_log_det_jacobian(tf.identity(x), event_ndims=1)
    assert len(calls) > n


# -- the model distributions -----------------------------------------------------------------

DISTRIBUTIONS = {
    "density_conv": lambda va: _model("conv").distribution(mode="eval", validate_args=va),
    "density_dense": lambda va: _model("dense").distribution(mode="eval", validate_args=va),
    "hybrid": lambda va: _model("hybrid").distribution(validate_args=va),
}
EVENTS = {"density_conv": (4, 4, 1), "density_dense": (2,), "hybrid": (4, 4, 1)}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_distribution_dtype_and_validate_args(name):
    dist = DISTRIBUTIONS[name](True)
    x = _data(EVENTS[name], 2, unit=name != "density_dense")
    assert np.isfinite(dist.log_prob(x).numpy()).all()
    with pytest.raises(TypeError, match=r"float64.*float32"):
        dist.log_prob(tf.cast(x, tf.float64))
    for bad in (np.nan, np.inf):
        xb = x.numpy()
        xb.flat[0] = bad
        with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
            dist.log_prob(tf.constant(xb))


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_distribution_vectorized_map_and_gradients(name):
    dist = DISTRIBUTIONS[name](False)
    x = _data(EVENTS[name], 3, unit=name != "density_dense")
    direct = dist.log_prob(tf.identity(x))
    mapped = tf.function(lambda t: tf.vectorized_map(dist.log_prob, t))(tf.identity(x))
    np.testing.assert_allclose(mapped.numpy(), direct.numpy(), atol=1e-4)
    model = _model(name.replace("density_", ""))
    weights = model.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(dist.log_prob(tf.identity(x)))
    grads = tape.gradient(loss, [x, *weights])
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads[:1])
    finite = [g for g in grads[1:] if g is not None]
    assert finite and all(np.isfinite(g.numpy()).all() for g in finite)


def test_actnorm_never_initializes_from_a_non_finite_batch():
    state = ActNormState()
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        state.initialize(x)
    assert int(state.initialized.numpy()) == 0
    np.testing.assert_array_equal(state.loc.numpy(), 0.0)
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"), tf_iresnet.bijectors.data_dependent_init():
        ActNorm(state, event_ndims=1).forward(tf.constant(x))
    assert int(state.initialized.numpy()) == 0
