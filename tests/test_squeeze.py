"""Squeeze and zero-channel padding bijectors."""

import numpy as np
import pytest
import tensorflow as tf

import tf_iresnet


def test_squeeze_layout_shapes_and_inverse():
    x = tf.reshape(tf.range(2 * 4 * 4 * 3, dtype=tf.float32), [2, 4, 4, 3])
    sq = tf_iresnet.Squeeze()
    y = sq.forward(x)
    assert y.shape == [2, 2, 2, 12]
    # Channel c of pixel (dy, dx) of each 2x2 patch lands at channel (2 dy + dx) * C + c.
    np.testing.assert_array_equal(y[0, 0, 0, 3:6].numpy(), x[0, 0, 1].numpy())
    np.testing.assert_array_equal(y[0, 1, 1, 6:9].numpy(), x[0, 3, 2].numpy())
    np.testing.assert_array_equal(sq.inverse(y).numpy(), x.numpy())
    assert float(sq.forward_log_det_jacobian(x, event_ndims=3)) == 0.0
    assert sq.forward_event_shape([4, 4, 3]) == [2, 2, 12]
    assert sq.inverse_event_shape([2, 2, 12]) == [4, 4, 3]
    xb = tf.zeros([5, 2, 4, 4, 3])
    assert sq.forward(xb).shape == [5, 2, 2, 2, 12]


def test_squeeze_errors():
    with pytest.raises(ValueError, match="divisible by 2"):
        tf_iresnet.Squeeze().forward(tf.zeros([1, 3, 4, 1]))
    with pytest.raises(ValueError, match="block_size"):
        tf_iresnet.Squeeze(block_size=1)


def test_zero_channel_pad():
    pad = tf_iresnet.ZeroChannelPad(13)
    x = tf.random.normal([2, 4, 4, 3])
    y = pad.forward(x)
    assert y.shape == [2, 4, 4, 16]
    np.testing.assert_array_equal(y[..., 3:].numpy(), 0.0)
    np.testing.assert_array_equal(pad.inverse(y).numpy(), x.numpy())
    assert pad.forward_event_shape([4, 4, 3]) == [4, 4, 16]
    with pytest.raises(ValueError, match="non-negative integer"):
        tf_iresnet.ZeroChannelPad(-1)
