"""gradient_memory="invertible": the backward pass rebuilds inputs from outputs instead of
storing activations; its gradients are those of the stored backward pass."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import tf_iresnet
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.invertible_gradient import forward_and_log_det
from tf_iresnet.models.density import DensityConfig, build_density_model

# 4x4x1 -> squeeze -> 2x2x4 (2 blocks) -> factor out 2 -> squeeze -> 1x1x8 (1 block).
CONFIG = DensityConfig(input_shape=(4, 4, 1), num_levels=256, initial_squeeze=True,
                       blocks=(2, 1), hidden_channels=4, strides=(1, 2), n_terms=2,
                       activation="lipswish")
ESTIMATORS = {
    "series": dict(logdet="series", neumann_gradient=False),
    "neumann": dict(logdet="series", neumann_gradient=True),
    # The plain unbiased gradient unrolls 32 conditional terms: slow to trace. Its Neumann
    # form is the default and traces a loop.
    "unbiased": dict(logdet="unbiased", neumann_gradient=True),
}


def _model(**overrides):
    tf.keras.utils.set_random_seed(0)
    model = build_density_model(dataclasses.replace(CONFIG, **overrides))
    x = tf.random.stateless_uniform([6, 4, 4, 1], seed=[3, 4])
    model.initialize(x)
    tf_iresnet.converge_spectral_norms(model)
    return model, x


def _loss_and_grads(model, x, seed):
    with tf.GradientTape() as tape:
        tape.watch(x)
        log_pz, logdet = model.log_prob_parts(x, mode="train", seed=seed)
        # Per-example weights: the two parts' gradients are checked separately.
        loss = -tf.reduce_sum(log_pz * tf.linspace(1.0, 2.0, 6)) - tf.reduce_sum(logdet)
    return loss, tape.gradient(loss, [x, *model.trainable_variables])


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # traced: slow
def test_gradients_equal_the_stored_backward_pass(estimator, compiled):
    # The reference: the stored backward pass run eagerly (no shared block functions).
    stored, x = _model(**ESTIMATORS[estimator])
    invertible, _ = _model(**ESTIMATORS[estimator], gradient_memory="invertible")
    seed = tf.constant([5, 6])
    want_loss, want = _loss_and_grads(stored, x, seed)
    fn = tf.function(_loss_and_grads) if compiled else _loss_and_grads
    # Traced, the stored pass also runs every block through its scale's shared function.
    for model in (invertible, stored) if compiled else (invertible,):
        loss, got = fn(model, x, seed)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if w is not None:
                assert _rel(g, w) < 1e-4, (_rel(g, w), w.shape)


def test_a_reconstruction_that_misses_its_tolerance_raises():
    model, x = _model(blocks=(1, 1))  # one block per scale: a miss in either is reported
    flow = model.bijector(mode="train", seed=(1, 2))
    hopeless = InverseConfig(atol=1e-30, rtol=0.0, max_iter=2)

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            z, ldj = forward_and_log_det(flow, x, hopeless)
            loss = tf.reduce_sum(z) + tf.reduce_sum(ldj)
        return tape.gradient(loss, x)

    with pytest.raises(tf_iresnet.InverseNotConvergedError, match="reconstruction"):
        grads(x)
    with pytest.raises(tf.errors.InvalidArgumentError, match="reconstruction"):
        tf.function(grads)(x)


@pytest.mark.slow  # about 30 s on 2 busy cores (XLA compilation)
def test_under_xla_a_missed_tolerance_gives_nan_gradients():
    model, x = _model(blocks=(1, 1))
    flow = model.bijector(mode="train", seed=(1, 2))

    @tf.function(jit_compile=True)
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            z, ldj = forward_and_log_det(flow, x, InverseConfig(atol=1e-30, rtol=0.0, max_iter=2))
            loss = tf.reduce_sum(z) + tf.reduce_sum(ldj)
        return tape.gradient(loss, x)

    # XLA drops assertions: the gradient is NaN then, never silently wrong.
    assert np.all(np.isnan(grads(x).numpy()))


def test_every_step_is_rebuilt_one_at_a_time():
    from tf_iresnet.shared_blocks import steps as _steps

    model, _ = _model()
    assert len(model.bijector(mode="train").scales) == 2
    steps = [type(s).__name__ for scale in model.bijector(mode="train").scales
             for s in _steps(scale)]
    assert steps.count("InvertibleResidualBlock") == 3 and steps.count("ActNorm") == 3
    assert steps.count("Squeeze") == 2


def _traced_nodes(model, x):
    """Nodes of the traced training gradient: its graph and every function of its library."""
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            log_pz, logdet = model.log_prob_parts(x, mode="train", seed=tf.constant([1, 2]))
            loss = -tf.reduce_mean(log_pz + logdet)
        return tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function(x).graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


@pytest.mark.parametrize("memory", ["stored", "invertible"])
def test_the_traced_graph_does_not_grow_with_depth(memory):
    # The blocks of one scale share one traced function (forward; for "invertible" also the
    # backward one): from 2 to 4 blocks per scale (4 more blocks) the graph grows by the calls
    # and weight reads only. Measured: 200 and 244 nodes; one more copy of a block's graph
    # would add over 1000 (the stored step grew by 4100 before blocks were shared).
    x = tf.random.stateless_uniform([6, 4, 4, 1], seed=[3, 4])
    nodes = [_traced_nodes(build_density_model(dataclasses.replace(
        CONFIG, blocks=(k, k), gradient_memory=memory)), x) for k in (2, 4)]
    assert nodes[1] - nodes[0] < 4 * 100, nodes


@pytest.mark.parametrize("memory", ["stored", "invertible"])
def test_the_whole_training_step_does_not_grow_with_depth(memory, tmp_path):
    # The Trainer's step as the density task builds it: gradient, Adamax, power iterations.
    # Outside the shared functions an added block costs its variables' captures, reads and
    # fused updates and one call per layer. Measured, 2 -> 4 blocks per scale (4 more blocks):
    # 300 (stored) and 344 (invertible) nodes; 908 and 952 before Adamax made its scalars once
    # per update and the power iterations read and assigned inside their shared function.
    from tf_iresnet.tasks.density import DensityTrainConfig, make_optimizer, make_train_step
    from tf_iresnet.tasks.run import power_iteration_step
    from tf_iresnet.training import Trainer

    x = tf.random.stateless_uniform([6, 4, 4, 1], seed=[3, 4])
    task = DensityTrainConfig(preset="digits_density", batch_size=6, seed=0)
    nodes = []
    for k in (2, 4):
        model = build_density_model(dataclasses.replace(
            CONFIG, blocks=(k, k), gradient_memory=memory))
        model.initialize(x)
        trainer = Trainer(strategy=tf.distribute.get_strategy(), model=model,
                          optimizer=make_optimizer(task), train_step_fn=make_train_step(task),
                          model_dir=str(tmp_path / f"{memory}{k}"), total_steps=10,
                          post_step_fn=power_iteration_step, progress=False)
        graph = trainer._step_function.get_concrete_function(x).graph.as_graph_def()
        nodes.append(len(graph.node) + sum(len(f.node_def) for f in graph.library.function))
    assert nodes[1] - nodes[0] < 4 * 120, nodes


def test_a_flow_without_seeds_is_refused():
    model, x = _model()
    with pytest.raises(ValueError, match="seed=None"):
        forward_and_log_det(model.bijector(mode="train"), x)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="gradient_memory must be one of"):
        dataclasses.replace(CONFIG, gradient_memory="none")
    with pytest.raises(ValueError, match="recompute=False"):
        dataclasses.replace(CONFIG, gradient_memory="invertible", recompute=True)


def test_under_mirrored_strategy_with_replica_consistent_seeds():
    # Two replicas (conftest splits the CPU in two), the same batch and step seed on both:
    # every replica's gradients equal the stored backward pass's, and each other's.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    grads = {}
    for memory in ("stored", "invertible"):
        with strategy.scope():
            model, x = _model(blocks=(1, 1), gradient_memory=memory)

        @tf.function
        def step(x, model=model):
            # The weights' gradients ([0] is x's, which replica 1 does not see watched).
            return strategy.run(lambda x: _loss_and_grads(model, x, tf.constant([9, 1]))[1][1:],
                                args=(x,))

        per_replica = step(x)
        grads[memory] = [None if g is None else
                         [None if r is None else r.numpy()
                          for r in strategy.experimental_local_results(g)]
                         for g in per_replica]
    # Both modes see the same weights (the first ActNorm's get None on replica 1 in both: the
    # same batch tensor is given to both replicas, and the first ActNorm reads it directly).
    assert sum(g is not None for g in grads["stored"]) > 10
    for got, want in zip(grads["invertible"], grads["stored"], strict=True):
        assert (got is None) == (want is None)
        if want is None:
            continue
        for replica in range(2):
            if want[replica] is None:
                continue
            assert _rel(got[replica], want[replica]) < 1e-4
        if got[1] is not None:  # the same probes on both (other probes: differences ~ 1)
            np.testing.assert_allclose(got[0], got[1], rtol=1e-5, atol=1e-6)


def test_binary_flags_reach_the_model_config():
    # Neumann gradient by default; --gradient_memory and --noneumann_gradient override it.
    from _binaries import config as binary_config

    from tf_iresnet.tasks.density import model_config

    out = {}
    for args in ([], ["--gradient_memory=invertible", "--noneumann_gradient"]):
        c = model_config(binary_config("density", args))
        out[len(args)] = [c.gradient_memory, c.neumann_gradient]
    assert out == {0: ["stored", True], 2: ["invertible", False]}
