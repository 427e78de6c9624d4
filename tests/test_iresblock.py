"""InvertibleResidualBlock: inverse, log-det estimators, TFP composition, gradients, errors."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tf_iresnet
from tf_iresnet import InverseConfig, InvertibleResidualBlock, LogDetConfig

tfb = tfp.bijectors
tfd = tfp.distributions


def _dense_g(dim=4, coeff=0.9, seed=0):
    tf.keras.utils.set_random_seed(seed)
    g = tf_iresnet.dense_branch(dim, (16,), coeff=coeff, activation="elu")
    tf_iresnet.converge_spectral_norms(g)
    return g


def _conv_g(shape=(4, 4, 2), coeff=0.9, seed=0):
    tf.keras.utils.set_random_seed(seed)
    g = tf_iresnet.conv_branch(shape, 4, coeff=coeff)
    tf_iresnet.converge_spectral_norms(g)
    return g


def _exact_logdet(g, x):
    """slogdet(I + dg/dx) per example, computed independently of the library."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        gx = g(x)
    jac = tape.batch_jacobian(gx, x)
    d = int(np.prod(x.shape[1:]))
    jac = tf.reshape(jac, [-1, d, d])
    return tf.linalg.slogdet(tf.eye(d) + jac)[1].numpy(), jac.numpy()


def _linear_g(eigenvalues=(0.6, -0.5, 0.4, 0.2), seed=0):
    """g(x) = A x with a symmetric A of the given eigenvalues: log det(I + A) is known."""
    import keras

    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    a = (q * np.asarray(eigenvalues)) @ q.T
    g = keras.Sequential([keras.layers.Dense(len(eigenvalues), use_bias=False)])
    g.build((None, len(eigenvalues)))
    g.layers[0].kernel.assign(a.T.astype("float32"))
    return g, float(np.sum(np.log1p(eigenvalues)))


@pytest.fixture(scope="module")
def dense_g():
    return _dense_g()


@pytest.fixture(scope="module")
def conv_g():
    return _conv_g()


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_inverse_of_forward(kind, compiled, solver, dense_g, conv_g):
    g, ndims = (dense_g, 1) if kind == "dense" else (conv_g, 3)
    x = tf.random.stateless_normal([5, 4] if ndims == 1 else [5, 4, 4, 2], seed=[1, 2])
    block = InvertibleResidualBlock(g, event_ndims=ndims, logdet="none",
                                    inverse=InverseConfig(solver=solver))

    def roundtrip(x):
        y = block.forward(x)
        return y, block.inverse(tf.identity(y))

    if compiled:
        roundtrip = tf.function(roundtrip)
    y, x_rec = roundtrip(x)
    assert np.abs(y.numpy() - x.numpy()).max() > 1e-2  # the block does something
    # Banach: |x_k - x| <= |x_k - x_{k-1}| Lip/(1 - Lip) with Lip <= 0.9^2; tolerance 1e-5.
    np.testing.assert_allclose(x_rec.numpy(), x.numpy(), atol=1e-4)


def test_inverse_under_xla(conv_g):
    x = tf.random.stateless_normal([3, 4, 4, 2], seed=[3, 4])
    block = InvertibleResidualBlock(conv_g, event_ndims=3, logdet="none")
    y = block.forward(x)
    inv = tf.function(lambda y: block.inverse(y), jit_compile=True)
    np.testing.assert_allclose(inv(tf.identity(y)).numpy(), x.numpy(), atol=1e-4)


def test_anderson_needs_fewer_evaluations():
    g = _dense_g(dim=6, coeff=0.98, seed=3)
    x = tf.random.stateless_normal([8, 6], seed=[5, 6]) * 3.0
    y = x + g(x)
    results = {
        m: tf_iresnet.solve_fixed_point(g, y, method=m, atol=1e-5, rtol=1e-5, max_iter=500)
        for m in ("fixed_point", "anderson")
    }
    for r in results.values():
        assert bool(r.converged)
        np.testing.assert_allclose(r.x.numpy(), x.numpy(), atol=2e-4)
    assert int(results["anderson"].iterations) < int(results["fixed_point"].iterations)


def test_exact_logdet_matches_slogdet(dense_g, conv_g):
    for g, x in [(dense_g, tf.random.stateless_normal([6, 4], seed=[7, 8])),
                 (conv_g, tf.random.stateless_normal([3, 4, 4, 2], seed=[9, 1]))]:
        block = InvertibleResidualBlock(g, event_ndims=x.shape.rank - 1, logdet="exact")
        expected, _ = _exact_logdet(g, x)
        got = block.forward_log_det_jacobian(x, event_ndims=x.shape.rank - 1).numpy()
        assert np.abs(expected).max() > 1e-2
        np.testing.assert_allclose(got, expected, atol=1e-4)
        ildj = block.inverse_log_det_jacobian(
            tf.identity(block.forward(x)), event_ndims=x.shape.rank - 1)
        np.testing.assert_allclose(ildj.numpy(), -expected, atol=1e-4)


def _truncated_series(jac, n):
    """E[series estimate with n terms] = sum_{k<=n} (-1)^(k+1) tr(J^k) / k, exactly."""
    out, power = 0.0, np.eye(jac.shape[-1])
    for k in range(1, n + 1):
        power = power @ jac
        out += (-1) ** (k + 1) * np.trace(power) / k
    return out


def test_series_converges_to_exact(dense_g):
    x0 = tf.random.stateless_normal([1, 4], seed=[2, 3])
    exact, jac = _exact_logdet(dense_g, x0)
    errors = [abs(_truncated_series(jac[0].astype(np.float64), n) - exact[0])
              for n in (1, 2, 5, 10, 20)]
    assert all(a >= b - 1e-7 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-4 < errors[0]
    # The Monte Carlo estimator is unbiased for the truncated series: many probes (a batch of
    # copies of x0, one probe each) average to it, and with 20 terms to the exact log-det.
    xs = tf.repeat(x0, 4000, axis=0)
    for n in (2, 20):
        block = InvertibleResidualBlock(
            dense_g, event_ndims=1, seed=11,
            logdet=LogDetConfig(method="series", n_terms=n, probe="rademacher"))
        est = block.forward_log_det_jacobian(xs, event_ndims=1).numpy()
        se = est.std() / np.sqrt(len(est))
        assert abs(est.mean() - _truncated_series(jac[0], n)) < 3 * se + 1e-5
    assert abs(est.mean() - exact[0]) < 3 * se + 1e-4


def test_unbiased_within_three_standard_errors():
    g, exact = _linear_g()
    xs = tf.zeros([64, 4])  # J = A everywhere; one probe per row, one roulette count per call
    for roulette, param in (("geometric", 0.5), ("poisson", 2.0)):

        @tf.function
        def estimate(seed, roulette=roulette, param=param):
            block = InvertibleResidualBlock(g, event_ndims=1, seed=seed, logdet=LogDetConfig(
                method="unbiased", n_exact_terms=1, roulette=roulette, roulette_param=param))
            return tf.reduce_mean(block.forward_log_det_jacobian(xs, event_ndims=1))

        # Calls are independent draws (fresh count and probes); rows within a call share N.
        means = np.array([float(estimate(tf.constant([i, 7]))) for i in range(400)])
        se = means.std() / np.sqrt(len(means))
        assert abs(means.mean() - exact) < 3 * se, (roulette, means.mean(), exact, se)
    # The biased truncated series is far off here (its 1-term mean is tr(A) = 0.7 against 0.296): this test
    # can fail.
    one_term = InvertibleResidualBlock(g, event_ndims=1, logdet="series", n_terms=1, seed=1)
    est = one_term.forward_log_det_jacobian(tf.zeros([4000, 4]), event_ndims=1).numpy()
    assert abs(est.mean() - exact) > 3 * se + 3 * est.std() / np.sqrt(len(est))


def test_unbiased_seed_reproducible_and_fresh(dense_g):
    x = tf.random.stateless_normal([4, 4], seed=[1, 1])

    def ldj(seed):
        b = InvertibleResidualBlock(dense_g, event_ndims=1, logdet="unbiased", seed=seed)
        return b.forward_log_det_jacobian(tf.identity(x), event_ndims=1).numpy()

    np.testing.assert_array_equal(ldj(7), ldj(7))
    assert not np.array_equal(ldj(None), ldj(None))


@pytest.mark.filterwarnings("ignore:Using stateful random seeds")
def test_replicas_of_a_step_draw_the_same_roulette_and_probes():
    # The training loop seeds every block with (seed, step): the replicas of one step must get
    # the same estimate for the same input, and the next step a fresh one. With seed=None each
    # replica draws its own randomness, which the same check catches.
    from tf_iresnet.tasks.common import step_seed
    from tf_iresnet.training import make_strategy

    g, _ = _linear_g()
    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    xs = tf.zeros([8, 4])

    def per_replica(step, seeded):
        seed = step_seed(0, step) if seeded else None
        block = InvertibleResidualBlock(
            g, event_ndims=1, logdet=LogDetConfig(method="unbiased", n_exact_terms=1), seed=seed)
        return block.forward_log_det_jacobian(tf.identity(xs), event_ndims=1)

    @tf.function
    def run(step, seeded):
        return strategy.experimental_local_results(
            strategy.run(per_replica, args=(step, seeded)))

    a0, b0 = (r.numpy() for r in run(tf.constant(0), True))
    a1, _ = (r.numpy() for r in run(tf.constant(1), True))
    np.testing.assert_array_equal(a0, b0)
    assert not np.array_equal(a0, a1)
    c0, d0 = (r.numpy() for r in run(tf.constant(0), False))
    assert not np.array_equal(c0, d0)


def test_neumann_gradient_value_and_gradient(dense_g):
    # Same probes: the same value. The gradients agree only in expectation over the probes
    # (for one probe, v^T J^(j) dJ J^(k-1-j) v differs from v^T J^(k-1) dJ v), so both are
    # compared with the exact log-det's gradient, averaged over 256 probes per example (16
    # copies of each example in the batch, 16 probes each).
    x = tf.repeat(tf.random.stateless_normal([16, 4], seed=[8, 8]), 16, axis=0)

    def value_and_grads(**kwargs):
        block = InvertibleResidualBlock(dense_g, event_ndims=1, seed=5,
                                        logdet=LogDetConfig(**kwargs))
        with tf.GradientTape() as tape:
            ldj = block.forward_log_det_jacobian(tf.identity(x), event_ndims=1)
            total = tf.reduce_sum(ldj)
        grads = tape.gradient(total, dense_g.trainable_variables)
        assert sum(g is not None for g in grads) == 3  # both kernels, the hidden bias
        return ldj.numpy(), [g for g in grads if g is not None]

    _, exact = value_and_grads(method="exact")
    results = {neumann: value_and_grads(method="series", n_terms=20, n_samples=16,
                                        neumann_gradient=neumann) for neumann in (False, True)}
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for neumann in (False, True):
        for ours, want in zip(results[neumann][1], exact, strict=True):
            scale = float(tf.reduce_max(tf.abs(want)))
            np.testing.assert_allclose(ours.numpy(), want.numpy(), atol=0.1 * scale)
    # The two estimators differ for a given probe: this test would not tell them apart
    # if one of them were silently replaced by the other.
    diff = max(float(tf.reduce_max(tf.abs(a - b)))
               for a, b in zip(results[False][1], results[True][1], strict=True))
    assert diff > 1e-4


def test_neumann_gradient_with_the_unbiased_estimator():
    # Same seed, same roulette count and probes: the Neumann option changes only the gradient.
    # Over many draws both gradients average to the gradient of the true log-det, which a linear
    # branch g(x) = A x gives exactly: d log det(I + A) / dA.
    g, _ = _linear_g(eigenvalues=(0.7, -0.6, 0.5, 0.3))
    kernel = g.layers[0].kernel
    x = tf.zeros([16, 4])

    @tf.function
    def value_and_grad(seed, neumann):
        block = InvertibleResidualBlock(g, event_ndims=1, seed=seed, logdet=LogDetConfig(
            method="unbiased", n_exact_terms=1, neumann_gradient=neumann))
        with tf.GradientTape() as tape:
            ldj = tf.reduce_mean(block.forward_log_det_jacobian(tf.identity(x), event_ndims=1))
        return ldj, tape.gradient(ldj, kernel)

    with tf.GradientTape() as tape:
        exact = tf.linalg.slogdet(tf.eye(4) + tf.transpose(tf.convert_to_tensor(kernel)))[1]
    exact_grad = tape.gradient(exact, kernel).numpy()
    draws = {True: [], False: []}
    for i in range(300):
        for neumann in (True, False):
            draws[neumann].append(value_and_grad(tf.constant([i, 4]), neumann))
    for (v_n, _), (v_p, _) in zip(draws[True], draws[False], strict=True):
        np.testing.assert_allclose(v_n.numpy(), v_p.numpy(), rtol=1e-5, atol=1e-6)
    for neumann in (True, False):
        grads = np.stack([gr.numpy() for _, gr in draws[neumann]])
        se = grads.std(0) / np.sqrt(len(grads))
        assert np.all(np.abs(grads.mean(0) - exact_grad) < 4 * se + 1e-3), neumann


def test_forward_and_logdet_share_one_evaluation(dense_g):
    calls = []

    def counting_g(x, training=False):
        calls.append(1)
        return dense_g(x, training=training)

    block = InvertibleResidualBlock(counting_g, event_ndims=1, logdet="series")
    x = tf.random.normal([3, 4])
    block.forward(x)
    block.forward_log_det_jacobian(x, event_ndims=1)
    assert len(calls) == 1


def test_transformed_distribution(conv_g):
    base = tfd.Independent(tfd.Normal(tf.zeros([4, 4, 2]), 1.0), reinterpreted_batch_ndims=3)
    block = InvertibleResidualBlock(conv_g, event_ndims=3, logdet="exact")
    dist = tfd.TransformedDistribution(base, block)
    y = tf.random.stateless_normal([3, 4, 4, 2], seed=[6, 6])
    x = block.inverse(tf.identity(y))
    expected = base.log_prob(x) + block.inverse_log_det_jacobian(tf.identity(y), event_ndims=3)
    np.testing.assert_allclose(dist.log_prob(y).numpy(), expected.numpy(), rtol=1e-5, atol=1e-4)
    # And -fldj at the preimage, computed independently.
    exact, _ = _exact_logdet(conv_g, x)
    np.testing.assert_allclose(dist.log_prob(y).numpy(), base.log_prob(x).numpy() - exact,
                               atol=1e-3)
    assert dist.event_shape == [4, 4, 2] and dist.batch_shape == []
    samples = dist.sample(4, seed=[1, 2])
    assert samples.shape == [4, 4, 4, 2]
    assert np.isfinite(dist.log_prob(samples).numpy()).all()


def test_chain_with_actnorm_squeeze_and_tfp(conv_g):
    tf.keras.utils.set_random_seed(1)
    g2 = tf_iresnet.conv_branch((2, 2, 8), 8)
    flow = tfb.Chain([
        InvertibleResidualBlock(g2, event_ndims=3, logdet="exact"),
        tf_iresnet.Squeeze(),
        tf_iresnet.ActNorm(event_ndims=3),
        InvertibleResidualBlock(conv_g, event_ndims=3, logdet="exact"),
        tfb.Shift(-0.5),
    ])
    base = tfd.Independent(tfd.Normal(tf.zeros([2, 2, 8]), 1.0), reinterpreted_batch_ndims=3)
    dist = tfd.TransformedDistribution(base, tfb.Invert(flow))
    assert dist.event_shape == [4, 4, 2]
    x = tf.random.stateless_uniform([2, 3, 4, 4, 2], seed=[2, 2])  # two batch dims
    lp = dist.log_prob(x)
    assert lp.shape == [2, 3] and np.isfinite(lp.numpy()).all()
    # Log-likelihood = base log-prob of the latent + the sum of each layer's exact log-det.
    z = flow.forward(x)
    ldj = flow.forward_log_det_jacobian(x, event_ndims=3)
    np.testing.assert_allclose(lp.numpy(), (base.log_prob(z) + ldj).numpy(), rtol=1e-5)
    s = dist.sample(3, seed=[3, 3])
    assert s.shape == [3, 4, 4, 2] and np.isfinite(dist.log_prob(s).numpy()).all()
    np.testing.assert_allclose(flow.inverse(tf.identity(z)).numpy(), x.numpy(), atol=2e-4)


def test_every_weight_gets_a_finite_gradient(conv_g):
    state = tf_iresnet.ActNormState()
    flow = tfb.Chain([
        InvertibleResidualBlock(conv_g, event_ndims=3, logdet="series"),
        tf_iresnet.ActNorm(state, event_ndims=3),
    ])
    base = tfd.Independent(tfd.Normal(tf.zeros([4, 4, 2]), 1.0), reinterpreted_batch_ndims=3)
    dist = tfd.TransformedDistribution(base, tfb.Invert(flow))
    x = tf.random.stateless_uniform([8, 4, 4, 2], seed=[4, 5])
    with tf_iresnet.bijectors.data_dependent_init():
        dist.log_prob(x)  # initializes ActNorm
    variables = conv_g.trainable_variables + state.trainable_variables
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(dist.log_prob(tf.identity(x)))
    grads = tape.gradient(loss, variables)
    for v, gr in zip(variables, grads, strict=True):
        assert gr is not None, v.path
        assert np.isfinite(gr.numpy()).all() and np.abs(gr.numpy()).sum() > 0, v.path


def test_settings_are_part_of_identity(dense_g):
    a = InvertibleResidualBlock(dense_g, event_ndims=1, n_terms=5)
    b = InvertibleResidualBlock(dense_g, event_ndims=1, n_terms=6)
    c = InvertibleResidualBlock(dense_g, event_ndims=1, n_terms=5)
    assert a != b and a == c
    assert InvertibleResidualBlock(_dense_g(seed=4), event_ndims=1) != a


def test_nonconvergence_is_reported():
    g = _dense_g(dim=4, coeff=0.95, seed=2)
    x = tf.random.stateless_normal([4, 4], seed=[9, 9]) * 5
    y = x + g(x)
    block = InvertibleResidualBlock(g, event_ndims=1, inverse=InverseConfig(max_iter=2),
                                    logdet="none")
    with pytest.raises(tf_iresnet.InverseNotConvergedError, match="did not converge.*residual"):
        block.inverse(tf.identity(y))
    with pytest.raises(tf.errors.InvalidArgumentError, match="did not converge"):
        tf.function(lambda t: block.inverse(t))(tf.identity(y))
    warn = InvertibleResidualBlock(g, event_ndims=1, logdet="none",
                                   inverse=InverseConfig(max_iter=2, on_failure="warn"))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        warn.inverse(tf.identity(y))


def test_bad_arguments(dense_g):
    with pytest.raises(ValueError, match="event_ndims must be 1 .* or 3"):
        InvertibleResidualBlock(dense_g, event_ndims=2)
    with pytest.raises(ValueError, match="logdet must be one of"):
        InvertibleResidualBlock(dense_g, event_ndims=1, logdet="magic")
    with pytest.raises(ValueError, match="n_terms must be an integer >= 1"):
        InvertibleResidualBlock(dense_g, event_ndims=1, n_terms=0)
    with pytest.raises(ValueError, match="InverseConfig.solver must be one of"):
        InvertibleResidualBlock(dense_g, event_ndims=1, inverse=InverseConfig(solver="newton"))
    with pytest.raises(ValueError, match="roulette_param"):
        InvertibleResidualBlock(dense_g, event_ndims=1,
                                logdet=LogDetConfig(method="unbiased", roulette_param=1.5))
    with pytest.raises(TypeError, match="residual_fn"):
        InvertibleResidualBlock(3, event_ndims=1)
    block = InvertibleResidualBlock(dense_g, event_ndims=3)
    with pytest.raises(ValueError, match="expects events of rank 3"):
        block.forward(tf.zeros([4, 4]))
    none_block = InvertibleResidualBlock(dense_g, event_ndims=1, logdet="none")
    with pytest.raises(ValueError, match="logdet='none'"):
        none_block.forward_log_det_jacobian(tf.zeros([2, 4]), event_ndims=1)
    checked = InvertibleResidualBlock(dense_g, event_ndims=1, validate_args=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        checked.forward(tf.constant([[np.nan, 0.0, 0.0, 0.0]]))


def test_shape_mismatch_branch_is_refused():
    import keras

    g = keras.Sequential([keras.layers.Dense(3)])
    g.build((None, 4))
    with pytest.raises(ValueError, match="must preserve the shape"):
        InvertibleResidualBlock(g, event_ndims=1, logdet="none").forward(tf.zeros([2, 4]))


@pytest.mark.parametrize("logdet", ["exact", "series", "unbiased"])
def test_forward_and_logdet_under_xla(logdet, conv_g):
    x0 = tf.random.stateless_normal([1, 4, 4, 2], seed=[2, 7])
    x = tf.repeat(x0, 256, axis=0)  # one probe per row: the batch mean is a Monte Carlo mean

    def run(x, seed):
        block = InvertibleResidualBlock(conv_g, event_ndims=3, seed=seed, logdet=LogDetConfig(
            method=logdet, neumann_gradient=logdet == "unbiased"))
        return block.forward(x), block.forward_log_det_jacobian(x, event_ndims=3)

    compiled = tf.function(run, jit_compile=True)
    y_xla, ldj_xla = compiled(x, tf.constant([3, 4]))
    np.testing.assert_allclose(y_xla.numpy(), run(x, [3, 4])[0].numpy(), atol=1e-5)
    exact, _ = _exact_logdet(conv_g, x0)
    if logdet == "exact":
        np.testing.assert_allclose(ldj_xla.numpy(), exact[0], atol=1e-4)
        return
    # XLA draws its own (reproducible) random stream from a seed: check its statistics.
    np.testing.assert_array_equal(compiled(x, tf.constant([3, 4]))[1].numpy(), ldj_xla.numpy())
    assert not np.array_equal(compiled(x, tf.constant([5, 4]))[1].numpy(), ldj_xla.numpy())
    se = ldj_xla.numpy().std() / np.sqrt(len(ldj_xla))
    assert abs(ldj_xla.numpy().mean() - exact[0]) < 4 * se + 1e-3


@pytest.mark.parametrize("logdet,neumann", [("series", False), ("series", True),
                                            ("unbiased", False), ("exact", False),
                                            ("none", False)])
def test_recompute_gives_the_same_values_and_gradients(conv_g, logdet, neumann):
    x = tf.random.stateless_normal([3, 4, 4, 2], seed=[5, 6])

    @tf.function
    def value_and_grads(x, recompute):
        block = InvertibleResidualBlock(
            conv_g, event_ndims=3, recompute=recompute, seed=tf.constant([7, 8]),
            # The unbiased estimator unrolls n_exact_terms + max_roulette_terms conditional
            # terms (32 by default): 2 + 4 trace as the same code in a fraction of the time.
            logdet=LogDetConfig(method=logdet, n_terms=3, max_roulette_terms=4,
                                neumann_gradient=neumann))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = block.forward(x)
            loss = tf.reduce_sum(tf.sin(y))
            if logdet != "none":
                loss += tf.reduce_sum(block.forward_log_det_jacobian(x, event_ndims=3))
        return loss, tape.gradient(loss, [x, *conv_g.trainable_variables])

    plain_loss, plain = value_and_grads(x, False)
    loss, grads = value_and_grads(x, True)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    for a, b in zip(grads, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_recompute_uses_the_forward_passs_probes_when_the_seed_is_none():
    # g(x) = a x in one dimension, one term: the estimate is a v^2 and its gradient in a is v^2.
    # A recomputation that drew a fresh probe would return another v'^2.
    g, _ = _linear_g(eigenvalues=(0.5,))
    block = InvertibleResidualBlock(g, event_ndims=1, logdet="series", n_terms=1,
                                    recompute=True)

    @tf.function
    def value_and_grad(x):
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(block.forward_log_det_jacobian(x, event_ndims=1))
        return total, tape.gradient(total, g.layers[0].kernel)

    for _ in range(3):
        total, grad = value_and_grad(tf.zeros([6, 1]))
        np.testing.assert_allclose(grad.numpy().ravel(), [total.numpy() / 0.5], rtol=1e-5)


def test_forward_passes_never_run_the_power_iteration():
    # The block evaluates g with training=False: with or without recompute, a forward pass
    # with log-det and its gradient leave the power-iteration vectors u, v unchanged, and the
    # two paths agree.
    results = []
    for recompute in (False, True):
        tf.keras.utils.set_random_seed(0)
        g = tf_iresnet.conv_branch((4, 4, 2), 4, coeff=0.9)  # fresh u, v: every iteration moves them
        before = [w.numpy() for w in g.non_trainable_weights]
        assert before
        block = InvertibleResidualBlock(g, event_ndims=3, logdet="series", n_terms=2,
                                        recompute=recompute, seed=3)

        @tf.function
        def value_and_grads(x, g=g, block=block):
            with tf.GradientTape() as tape:
                ldj = block.forward_log_det_jacobian(x, event_ndims=3)
                total = tf.reduce_sum(ldj)
            return ldj, tape.gradient(total, g.trainable_variables)

        ldj, grads = value_and_grads(tf.random.stateless_normal([2, 4, 4, 2], seed=[1, 1]))
        state = [w.numpy() for w in g.non_trainable_weights]
        for a, b in zip(state, before, strict=True):
            np.testing.assert_array_equal(a, b)
        # The last bias does not enter the Jacobian: no gradient, with or without recompute.
        results.append((ldj.numpy(), [0.0 if gr is None else gr.numpy() for gr in grads]))
    (ldj0, grads0), (ldj1, grads1) = results
    np.testing.assert_allclose(ldj1, ldj0, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads1, grads0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_string_logdet_is_shorthand_for_a_config(dense_g):
    short = InvertibleResidualBlock(dense_g, event_ndims=1, logdet="unbiased", n_terms=7,
                                    n_samples=2)
    assert short.logdet_config == LogDetConfig(method="unbiased", n_terms=7, n_samples=2)
    assert short.inverse_config == InverseConfig()
    full = InvertibleResidualBlock(
        dense_g, event_ndims=1, logdet=LogDetConfig(method="unbiased", n_terms=7, n_samples=2))
    assert full == short
    assert InvertibleResidualBlock(dense_g, event_ndims=1).logdet_config == LogDetConfig()
    # A shortcut may repeat the config's value.
    same = InvertibleResidualBlock(dense_g, event_ndims=1, logdet=LogDetConfig(n_terms=3),
                                   n_terms=3)
    assert same.logdet_config.n_terms == 3


def test_shortcut_contradicting_the_config_raises(dense_g):
    with pytest.raises(ValueError, match="n_terms=4 contradicts .*n_terms=3"):
        InvertibleResidualBlock(dense_g, event_ndims=1, logdet=LogDetConfig(n_terms=3),
                                n_terms=4)
    with pytest.raises(ValueError, match="n_samples=1 contradicts .*n_samples=2"):
        InvertibleResidualBlock(dense_g, event_ndims=1, logdet=LogDetConfig(n_samples=2),
                                n_samples=1)
    with pytest.raises(TypeError, match="logdet must be a LogDetConfig"):
        InvertibleResidualBlock(dense_g, event_ndims=1, logdet=5)
    with pytest.raises(TypeError, match="inverse must be an InverseConfig"):
        InvertibleResidualBlock(dense_g, event_ndims=1, inverse="anderson")
    with pytest.raises(TypeError, match="training"):
        InvertibleResidualBlock(dense_g, event_ndims=1, training=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="newton"), "InverseConfig.solver must be one of"),
    (dict(on_failure="ignore"), "InverseConfig.on_failure must be one of"),
    (dict(atol=0.0, rtol=0.0), "atol and rtol must be >= 0 and not both 0"),
    (dict(atol=-1e-5), "atol and rtol must be >= 0"),
    (dict(max_iter=0), "InverseConfig.max_iter must be an integer >= 1"),
    (dict(max_iter=2.5), "InverseConfig.max_iter must be an integer >= 1"),
    (dict(anderson_memory=0), "InverseConfig.anderson_memory must be an integer >= 1"),
])
def test_inverse_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InverseConfig(**kwargs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        InverseConfig().max_iter = 3


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_new_constructor_inverse_and_exact_logdet(dense_g, solver):
    # Through the config objects: inverse(forward(x)) = x to the configured tolerance, and the
    # log-det against slogdet of the independently computed batch_jacobian.
    x = tf.random.stateless_normal([6, 4], seed=[3, 9])
    block = InvertibleResidualBlock(
        dense_g, event_ndims=1, logdet=LogDetConfig(method="exact"),
        inverse=InverseConfig(solver=solver, atol=1e-6, rtol=1e-6, max_iter=300,
                              anderson_memory=3))
    y = block.forward(x)
    np.testing.assert_allclose(block.inverse(tf.identity(y)).numpy(), x.numpy(), atol=1e-4)
    exact, _ = _exact_logdet(dense_g, x)
    np.testing.assert_allclose(block.forward_log_det_jacobian(tf.identity(x), event_ndims=1),
                               exact, atol=1e-5)
    # A budget too small for the tolerance is reported, so max_iter is really used.
    tight = InvertibleResidualBlock(dense_g, event_ndims=1, logdet="none",
                                    inverse=InverseConfig(solver=solver, atol=1e-7, rtol=0.0,
                                                          max_iter=2))
    with pytest.raises(tf_iresnet.InverseNotConvergedError):
        tight.inverse(tf.identity(y))
