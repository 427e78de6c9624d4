"""Helpers shared by the tests of tf_iresnet.lipschitz: small layers, exact norms, state."""

import keras
import numpy as np
import tensorflow as tf

from tf_iresnet.lipschitz import SpectralNormalization

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


def conv_sn(strides=1, padding="same", dilation=1, coeff=COEFF, power_iterations=1, **kw):
    layer = SpectralNormalization(
        keras.layers.Conv2D(
            C_OUT, 3, strides=strides, padding=padding, dilation_rate=dilation, **kw
        ),
        coeff=coeff,
        power_iterations=power_iterations,
    )
    layer.build((None, HW, HW, C_IN))
    return layer


def scale_kernel(layer, factor):
    layer.layer.kernel.assign(layer.layer.kernel * factor)


def matrix_of(fn, in_shape):
    """The matrix of the affine map's linear part x -> fn(x) - fn(0), one column per basis vector.

    Applied to a layer with linear activation (inference mode), this is the operator the layer
    actually applies with its normalized kernel. Returns [out_dim, in_dim].
    """
    n = int(np.prod(in_shape))
    basis = tf.reshape(tf.eye(n), [n, *in_shape])
    outputs = fn(basis) - fn(tf.zeros([1, *in_shape]))
    return tf.reshape(outputs, [n, -1]).numpy().T


def layer_matrix(layer, in_shape):
    return matrix_of(lambda x: layer(x, training=False), in_shape)


def spectral_norm(matrix):
    return float(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0])


def true_conv_norm(layer):
    return spectral_norm(layer_matrix(layer, (HW, HW, C_IN)))


def raw_conv_norm(layer):
    """True norm of the wrapped Conv2D itself (no normalization), via a plain Keras copy."""
    config = dict(layer.layer.get_config(), name=None)
    plain = keras.layers.Conv2D.from_config(config)
    plain.build((None, HW, HW, C_IN))
    plain.set_weights(layer.layer.get_weights())
    return spectral_norm(matrix_of(plain, (HW, HW, C_IN)))


def state_of(layer):
    return layer.u.numpy().copy(), layer.v.numpy().copy()


def unit(x):
    return x / np.linalg.norm(x)


def randomize_state(layer, seed):
    rng = np.random.default_rng(seed)
    layer.u.assign(unit(rng.standard_normal(layer.u.shape)).astype(np.float32))
    layer.v.assign(unit(rng.standard_normal(layer.v.shape)).astype(np.float32))


def small_model():
    return keras.Sequential(
        [
            keras.Input((HW, HW, C_IN)),
            SpectralNormalization(keras.layers.Conv2D(C_OUT, 3, padding="same"), coeff=COEFF),
            keras.layers.Flatten(),
            SpectralNormalization(keras.layers.Dense(3), coeff=COEFF),
        ]
    )
