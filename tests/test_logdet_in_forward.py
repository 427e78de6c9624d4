"""The log-det's gradients computed in the forward pass (gradient_memory="logdet_in_forward"):
the values and gradients of the stored path, and a clear error for unequal log-det weights."""

import contextlib
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_iresnet
from tf_iresnet import InvertibleResidualBlock, LogDetConfig
from tf_iresnet.logdet_in_forward import residual_and_logdet_in_forward
from tf_iresnet.models.density import DensityConfig, build_density_model

ESTIMATORS = {
    "series": LogDetConfig(method="series", n_terms=3),
    "neumann": LogDetConfig(method="series", n_terms=3, neumann_gradient=True),
    # A low roulette cap keeps the plain unbiased gradient's unrolled graph small.
    "unbiased": LogDetConfig(method="unbiased", n_exact_terms=1, max_roulette_terms=2),
    "unbiased_neumann": LogDetConfig(method="unbiased", n_exact_terms=1, neumann_gradient=True),
}
SEED = (5, 6)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def _assert_same(got, want, rtol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        # An unconnected variable (none here but the last bias's log-det term) may come back
        # as None on one path and zeros on the other.
        g = np.zeros_like(w) if g is None and w is not None else g
        w = np.zeros_like(g) if w is None and g is not None else w
        if w is not None:
            assert _rel(g, w) <= rtol, (_rel(g, w), np.shape(w))


# ------------------------------------------------------------------------- one conv block


def _branch():
    keras.utils.set_random_seed(0)
    return tf_iresnet.conv_branch((4, 4, 2), 4, coeff=0.9, activation="lipswish")


def _block(branch, config, in_forward):
    return InvertibleResidualBlock(branch, event_ndims=3, logdet=config, seed=tf.constant(SEED),
                                   logdet_in_forward=in_forward)


def _block_loss_and_grads(block, x, weights):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = block.forward(x)
        ldj = block.forward_log_det_jacobian(x, event_ndims=3)
        # Any per-example weights on y; the log-det's weights are the caller's.
        loss = tf.reduce_sum(tf.sin(y)) - tf.reduce_sum(weights * ldj)
    return loss, ldj, tape.gradient(loss, [x, *block.residual_fn.trainable_variables])


def _compiled(block, compiled):
    """``(x, weights) -> (loss, ldj, grads)`` of ``block``, in a `tf.function` or eager."""
    def fn(x, weights):
        return _block_loss_and_grads(block, x, weights)

    return tf.function(fn) if compiled else fn


@pytest.mark.parametrize("estimator,compiled", [
    (e, c) if (e, c) != ("unbiased", True)
    else pytest.param(e, c, marks=pytest.mark.slow)  # the unrolled plain gradient: 5 s to trace
    for e in ESTIMATORS for c in (False, True)])
def test_block_values_and_gradients_equal_the_stored_path(estimator, compiled):
    branch = _branch()
    x = tf.random.stateless_normal([3, 4, 4, 2], seed=[1, 2])
    weights = tf.fill([3], 0.7)  # a batch mean or sum: equal weights
    want_loss, want_ldj, want = _compiled(_block(branch, ESTIMATORS[estimator], False),
                                          compiled)(x, weights)
    loss, ldj, got = _compiled(_block(branch, ESTIMATORS[estimator], True), compiled)(x, weights)
    np.testing.assert_allclose(ldj, want_ldj, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert len(got) == 1 + len(branch.trainable_variables) >= 5
    _assert_same(got, want)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_unequal_log_det_weights_raise(compiled):
    branch = _branch()
    x = tf.random.stateless_normal([3, 4, 4, 2], seed=[1, 2])
    block = _block(branch, ESTIMATORS["neumann"], True)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="needs the same upstream gradient on the log-det of every example"):
        _compiled(block, compiled)(x, tf.constant([1.0, 2.0, 3.0]))


def test_under_xla_unequal_weights_give_nan_gradients():
    keras.utils.set_random_seed(0)
    branch = tf_iresnet.dense_branch(2, (4,), coeff=0.9)
    block = InvertibleResidualBlock(branch, event_ndims=1, logdet=ESTIMATORS["neumann"],
                                    seed=tf.constant(SEED), logdet_in_forward=True)
    x = tf.random.stateless_normal([3, 2], seed=[1, 2])

    @tf.function(jit_compile=True)
    def grads(x, weights):
        with tf.GradientTape() as tape:
            ldj = block.forward_log_det_jacobian(x, event_ndims=1)
            loss = tf.reduce_sum(weights * ldj)
        return tape.gradient(loss, branch.trainable_variables)

    assert all(np.isfinite(g.numpy()).all() for g in grads(x, tf.fill([3], 2.0)))
    # XLA drops the assertion: the gradients are NaN then, never silently wrong.
    assert all(np.isnan(g.numpy()).all() for g in grads(x, tf.constant([1.0, 2.0, 3.0])))


def test_a_loss_without_the_log_det_needs_no_equal_weights():
    branch = _branch()
    x = tf.random.stateless_normal([3, 4, 4, 2], seed=[1, 2])
    got = []
    for in_forward in (False, True):
        block = _block(branch, ESTIMATORS["neumann"], in_forward)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.linspace(1.0, 2.0, 3)[:, None, None, None]
                                 * block.forward(x))
        got.append(tape.gradient(loss, [x, *branch.trainable_variables]))
    _assert_same(got[1], got[0])


# ---------------------------------------------------------------- a multi-scale density model

# 4x4x1 -> squeeze -> 2x2x4 (2 blocks) -> factor out 2 -> squeeze -> 1x1x8 (1 block).
CONFIG = DensityConfig(input_shape=(4, 4, 1), num_levels=256, initial_squeeze=True,
                       blocks=(2, 1), hidden_channels=4, strides=(1, 2), n_terms=2,
                       activation="lipswish")
MODEL_ESTIMATORS = {
    "series": dict(logdet="series", neumann_gradient=False),
    "neumann": dict(logdet="series", neumann_gradient=True),
    "unbiased": dict(logdet="unbiased", neumann_gradient=True),
}


def _model(strategy=None, **overrides):
    tf.keras.utils.set_random_seed(0)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_density_model(dataclasses.replace(CONFIG, **overrides))
        x = tf.random.stateless_uniform([6, 4, 4, 1], seed=[3, 4])
        model.initialize(x)
        tf_iresnet.converge_spectral_norms(model)
    return model, x


def _model_loss_and_grads(model, x, seed):
    with tf.GradientTape() as tape:
        tape.watch(x)
        log_pz, logdet = model.log_prob_parts(x, mode="train", seed=seed)
        # Per-example weights on log p(z), a batch mean of the log-det (as bits/dim).
        loss = -tf.reduce_sum(log_pz * tf.linspace(1.0, 2.0, 6)) - tf.reduce_mean(logdet)
    return loss, logdet, tape.gradient(loss, [x, *model.trainable_variables])


@pytest.mark.parametrize("estimator,compiled", [
    # The Neumann gradient (the default) runs in CI; the block tests above cover every
    # estimator, eagerly and traced. Traced model checks take 6-8 s each on 2 busy cores.
    ("neumann", False), ("neumann", True),
    pytest.param("series", False, marks=pytest.mark.slow),
    pytest.param("unbiased", False, marks=pytest.mark.slow),
    pytest.param("series", True, marks=pytest.mark.slow),
    pytest.param("unbiased", True, marks=pytest.mark.slow)])
def test_model_values_and_gradients_equal_the_stored_path(estimator, compiled):
    # Two scales of one block each (4x4x1 -> 2x2x4, factor out 2 -> 1x1x8).
    stored, x = _model(blocks=(1, 1), **MODEL_ESTIMATORS[estimator])
    ours, _ = _model(blocks=(1, 1), **MODEL_ESTIMATORS[estimator],
                     gradient_memory="logdet_in_forward")
    seed = tf.constant([7, 8])
    fn = tf.function(_model_loss_and_grads) if compiled else _model_loss_and_grads
    want_loss, want_ldj, want = fn(stored, x, seed)
    loss, ldj, got = fn(ours, x, seed)
    np.testing.assert_allclose(ldj, want_ldj, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert sum(w is not None for w in want) > 8
    _assert_same(got, want)


def test_trains_under_mirrored_strategy_like_the_stored_path():
    # Two replicas (conftest splits the CPU in two), one SGD step of the training task's loss
    # (mean bits/dim per replica, divided by the replica count, as the Trainer does): the same
    # loss and weights as the stored path.
    from tf_iresnet.tasks.common import step_seed
    from tf_iresnet.training.strategy import make_strategy

    losses, weights, initial = {}, {}, None
    for memory in ("stored", "logdet_in_forward"):
        strategy = make_strategy("mirrored")
        assert strategy.num_replicas_in_sync == 2
        model, x = _model(strategy, blocks=(1,), strides=(1,), gradient_memory=memory)
        initial = [v.numpy() for v in model.trainable_variables]
        with strategy.scope():
            optimizer = keras.optimizers.SGD(learning_rate=0.05)
            optimizer.build(model.trainable_variables)
        batches = iter(strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors(x).repeat().unbatch().batch(6)))

        @tf.function
        def train_step(batch, model=model, optimizer=optimizer, strategy=strategy):
            def replica(part):
                with tf.GradientTape() as tape:
                    log_pz, logdet = model.log_prob_parts(part, mode="train",
                                                          seed=step_seed(0, 0))
                    loss = tf.reduce_mean(model.bits_per_dim(log_pz + logdet))
                    scaled = loss / strategy.num_replicas_in_sync
                grads = tape.gradient(scaled, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
                return scaled

            return strategy.reduce("SUM", strategy.run(replica, args=(batch,)), axis=None)

        losses[memory] = train_step(next(batches)).numpy()
        weights[memory] = [v.numpy() for v in model.trainable_variables]
    np.testing.assert_allclose(losses["logdet_in_forward"], losses["stored"], rtol=1e-6)
    # Float32 round-off of two orders of the same products: a bias that starts at 0 holds only
    # its first update, so its relative difference is the gradient's (1.2e-6 seen on plain
    # kernels, where the input gradients are adjoint-form convolutions).
    _assert_same(weights["logdet_in_forward"], weights["stored"], rtol=3e-6)
    assert max(_rel(w, w0) for w, w0 in zip(weights["stored"], initial, strict=True)) > 1e-3


# ------------------------------------------------------------------------- configuration


def test_bad_configurations_are_refused():
    branch = _branch()
    with pytest.raises(ValueError, match="recompute=True cannot be combined"):
        InvertibleResidualBlock(branch, event_ndims=3, logdet_in_forward=True, recompute=True)
    for method in ("exact", "none"):
        with pytest.raises(ValueError, match=f"needs logdet one of .*got '{method}'"):
            InvertibleResidualBlock(branch, event_ndims=3, logdet=method, logdet_in_forward=True)
        with pytest.raises(ValueError, match="needs a stochastic estimator"):
            residual_and_logdet_in_forward(branch, tf.zeros([1, 4, 4, 2]),
                                           LogDetConfig(method=method))
    with pytest.raises(TypeError, match="LogDetConfig"):
        residual_and_logdet_in_forward(branch, tf.zeros([1, 4, 4, 2]), "series")
    with pytest.raises(ValueError, match="use it with recompute=False"):
        dataclasses.replace(CONFIG, gradient_memory="logdet_in_forward", recompute=True)
    with pytest.raises(ValueError, match="needs logdet one of"):
        dataclasses.replace(CONFIG, gradient_memory="logdet_in_forward", logdet="exact")
    with pytest.raises(ValueError, match="'stored', 'logdet_in_forward', 'invertible'"):
        dataclasses.replace(CONFIG, gradient_memory="tiny")
    # Only the training estimator is affected: evaluation views are plain blocks.
    model = build_density_model(dataclasses.replace(CONFIG, gradient_memory="logdet_in_forward"))
    blocks = [b for s in model.bijector(mode="eval").scales for b in s.bijectors
              if isinstance(b, InvertibleResidualBlock)]
    assert blocks and not any(b._logdet_in_forward for b in blocks)
    blocks = [b for s in model.bijector(mode="train").scales for b in s.bijectors
              if isinstance(b, InvertibleResidualBlock)]
    assert blocks and all(b._logdet_in_forward for b in blocks)
