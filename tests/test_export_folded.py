"""Serving without the spectral-norm machinery: the export folds W / max(1, sigma / c) into
constants, so its endpoints run no power iteration and compute no sigma."""

import numpy as np
import tensorflow as tf

import tf_iresnet
from tf_iresnet.export.density import _EVAL_SEED, EXPORT_INVERSE, export_density_model
from tf_iresnet.models.density import DensityConfig, build_density_model

CONFIG = DensityConfig(input_shape=(4, 4, 1), num_levels=256, initial_squeeze=True,
                       blocks=(1, 1), hidden_channels=4, strides=(1, 2), eval_n_terms=3,
                       eval_n_samples=1)


def _model():
    tf.keras.utils.set_random_seed(0)
    model = build_density_model(CONFIG)
    x = tf.random.stateless_uniform([5, 4, 4, 1], seed=[1, 2])
    model.initialize(x)
    tf_iresnet.converge_spectral_norms(model)
    return model, x


def _op_types(concrete):
    types = [op.type for op in concrete.graph.get_operations()]
    for fn in concrete.graph._functions.values():  # while-loop bodies and other nested graphs
        types += [node.op for node in fn.definition.node_def]
    return types


def test_folded_graphs_have_one_convolution_per_layer_and_read_no_kernel():
    model, x = _model()
    layers = tf_iresnet.lipschitz.spectral_norm_layers(model)
    spec = tf.TensorSpec([None, 4, 4, 1], tf.float32)
    plain = _op_types(tf.function(model.encode).get_concrete_function(spec))
    with tf_iresnet.lipschitz.folded_spectral_norms(model):
        folded_fn = tf.function(model.encode)
        folded = _op_types(folded_fn.get_concrete_function(spec))
    # sigma = <u, A v> costs one more (batch-1) convolution per layer; folded: none.
    assert plain.count("Conv2D") == 2 * len(layers)
    assert folded.count("Conv2D") == len(layers)
    # Only ActNorm and the prior are read: no kernel, no u or v.
    assert folded.count("ReadVariableOp") == plain.count("ReadVariableOp") - 3 * len(layers)
    np.testing.assert_allclose(folded_fn(x), model.encode(x), rtol=1e-6, atol=1e-6)


def test_exported_outputs_equal_the_models(tmp_path):
    model, x = _model()
    export_density_model(model, str(tmp_path), converge=False)
    # After export the model computes with its variables again (the context has ended).
    kernels_before = [k.numpy() for k in model.trainable_variables]
    loaded = tf.saved_model.load(str(tmp_path))
    z = model.encode(x)
    np.testing.assert_allclose(loaded.encode(x), z, rtol=1e-6, atol=1e-6)
    want = model.distribution(mode="eval", seed=_EVAL_SEED).log_prob(tf.identity(x))
    np.testing.assert_allclose(loaded.log_prob(x), want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(loaded.decode(z), model.decode(z, **EXPORT_INVERSE),
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(kernels_before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
