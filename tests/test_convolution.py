"""tf_iresnet.convolution: the adjoint-form convolution and the filter-gradient forms equal TF's,
to second order."""

import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet import convolution
from tf_iresnet.convolution import (
    FILTER_GRADIENT_FORMS,
    adjoint_kernel,
    conv2d,
    filter_gradient,
    filter_gradient_form,
)


def _reference(x, kernel, strides=(1, 1), padding="SAME", dilations=(1, 1)):
    return tf.nn.convolution(x, kernel, strides=list(strides), padding=padding,
                             dilations=list(dilations), data_format="NHWC")


def _first_and_second_order(conv, x, kernel, v, u):
    """``y``, the vector-Jacobian product ``dx = v^T dy/dx``, ``d<dx, u>/dx`` and
    ``d<dx, u>/dW`` (the second-order terms the log-det's gradients use) and ``dW = v^T dy/dW``."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch([x, kernel])
        with tf.GradientTape() as inner:
            inner.watch([x, kernel])
            y = conv(tf.nn.elu(x), kernel)
        dx, dk = inner.gradient(y, [x, kernel], output_gradients=v)
        s = tf.reduce_sum(dx * u)
    return [y, dx, dk, *outer.gradient(s, [x, kernel])]


@pytest.mark.parametrize("kernel_hw", [(3, 3), (1, 1), (5, 3)])
@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("channels", [(3, 4), (4, 3)])
@pytest.mark.parametrize("plain", [False, True])
def test_values_and_gradients_equal_tf_to_second_order(kernel_hw, traced, channels, plain,
                                                       monkeypatch):
    # plain=True: the choices made on TF's plain kernels (the filter gradient of a kernel with
    # fewer outputs than inputs from the output's patches).
    monkeypatch.setattr(convolution, "_plain_cpu_kernels", lambda: plain)
    c_in, c_out = channels
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 5, 6, c_in)))  # float64: round-off far below the checks
    kernel = tf.constant(rng.normal(size=(*kernel_hw, c_in, c_out)))
    v = tf.constant(rng.normal(size=(2, 5, 6, c_out)))
    u = tf.constant(rng.normal(size=(2, 5, 6, c_in)))

    def ours(a, k):
        return conv2d(a, k, adjoint_form=True)

    fn = tf.function(_first_and_second_order) if traced else _first_and_second_order
    got = fn(ours, x, kernel, v, u)
    expected = _first_and_second_order(_reference, x, kernel, v, u)
    for name, g, e in zip(["y", "dx", "dW", "d2/dx", "d2/dW"], got, expected, strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)


def test_the_adjoint_kernel_gives_the_exact_adjoint():
    # <conv(x, W), y> = <x, conv(y, W*)> for stride-1 SAME convolutions with odd kernels.
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(3, 7, 4, 5)))
    y = tf.constant(rng.normal(size=(3, 7, 4, 2)))
    kernel = tf.constant(rng.normal(size=(3, 5, 5, 2)))
    lhs = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME") * y)
    rhs = tf.reduce_sum(x * tf.nn.conv2d(y, adjoint_kernel(kernel), 1, "SAME"))
    np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=1e-12)
    assert adjoint_kernel(kernel).shape == (3, 5, 2, 5)


@pytest.mark.parametrize("config", [
    {"kernel_hw": (2, 2)},                      # even: SAME pads asymmetrically
    {"strides": (2, 2)},
    {"dilations": (2, 2)},
    {"padding": "VALID"},
])
def test_other_configurations_fall_back_to_tf(config):
    rng = np.random.default_rng(2)
    kernel_hw = config.pop("kernel_hw", (3, 3))
    x = tf.constant(rng.normal(size=(2, 8, 8, 3)))
    kernel = tf.constant(rng.normal(size=(*kernel_hw, 3, 4)))
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = conv2d(x, kernel, adjoint_form=True, **config)
    v = tf.ones_like(y)
    got = [y, *tape.gradient(y, [x, kernel], output_gradients=v)]
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y_ref = _reference(x, kernel, **config)
    expected = [y_ref, *tape.gradient(y_ref, [x, kernel], output_gradients=v)]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-12)


def test_xla_keeps_the_weights_as_parameters_through_nested_functions():
    """A jit-compiled gradient through a nested traced function (as the shared block functions
    are) must take the weights as run-time parameters. With TF's own gradients of the adjoint's
    reverse and transpose, XLA made every input a compile-time constant (and recompiled the
    step at every call)."""
    weight = tf.Variable(tf.random.stateless_normal([3, 3, 4, 4], seed=[1, 2]) * 0.1)
    x = tf.random.stateless_normal([2, 6, 6, 4], seed=[3, 4])

    @tf.function
    def block(inputs, kernel):
        return inputs + conv2d(tf.nn.elu(inputs), kernel, adjoint_form=True)

    @tf.function(jit_compile=True)
    def grads(inputs):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(block(inputs, tf.convert_to_tensor(weight)) ** 2)
        return tape.gradient(loss, weight)

    hlo = grads.experimental_get_compiler_ir(x)(stage="hlo")
    entry = hlo[hlo.index("ENTRY"):]
    assert entry.count("parameter(") == 2, entry  # the input and the weight, neither folded
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum((x + _reference(tf.nn.elu(x), weight)) ** 2)
    np.testing.assert_allclose(grads(x).numpy(), tape.gradient(loss, weight).numpy(),
                               rtol=2e-4, atol=1e-5)


def test_the_automatic_choice_follows_xla_and_the_kernel_set():
    plain = convolution._plain_cpu_kernels()
    assert convolution.adjoint_form_is_faster() == plain  # eagerly: the kernel set decides

    @tf.function(jit_compile=True)
    def compiled():
        return tf.constant(convolution.adjoint_form_is_faster())

    @tf.function
    def traced():
        return tf.constant(convolution.adjoint_form_is_faster())

    assert bool(compiled()) is True
    assert bool(traced()) is plain


@pytest.mark.parametrize("kernel_hw", [(3, 3), (1, 1), (5, 3)])
@pytest.mark.parametrize("form", FILTER_GRADIENT_FORMS)
def test_filter_gradient_forms_equal_tf_to_second_order(kernel_hw, form):
    if form == "matmul" and kernel_hw != (1, 1):
        pytest.skip("matmul is the 1x1 form")
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(3, 6, 5, 4)))
    d_outputs = tf.constant(rng.normal(size=(3, 6, 5, 2)))
    shape = [*kernel_hw, 4, 2]
    m = tf.constant(rng.normal(size=shape))

    def values(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, d_outputs])
            d_kernel = fn(x, d_outputs)
            s = tf.reduce_sum(d_kernel * m)
        return [d_kernel, *tape.gradient(s, [x, d_outputs])]

    got = values(lambda a, b: filter_gradient(a, b, shape, form=form))
    expected = values(lambda a, b: tf.raw_ops.Conv2DBackpropFilter(
        input=a, filter_sizes=shape, out_backprop=b, strides=[1, 1, 1, 1], padding="SAME"))
    for name, g, e in zip(["dW", "d/dx", "d/d_outputs"], got, expected, strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)


def test_filter_gradient_refuses_unknown_forms():
    x, d = tf.zeros([1, 4, 4, 2]), tf.zeros([1, 4, 4, 3])
    with pytest.raises(ValueError, match="form must be one of"):
        filter_gradient(x, d, [3, 3, 2, 3], form="fft")
    with pytest.raises(ValueError, match="needs a 1x1 kernel"):
        filter_gradient(x, d, [3, 3, 2, 3], form="matmul")


def _form_under_xla(kernel_shape):
    seen = []

    @tf.function(jit_compile=True)
    def compiled():
        seen.append(filter_gradient_form(kernel_shape))
        return tf.constant(0.0)

    compiled()
    return seen[0]


def test_the_filter_gradient_form_follows_the_measurements(monkeypatch):
    for plain in (False, True):
        monkeypatch.setattr(convolution, "_plain_cpu_kernels", lambda plain=plain: plain)
        assert filter_gradient_form([1, 1, 128, 128]) == "matmul"
        assert filter_gradient_form([3, 3, 12, 128]) == "tf"
        assert filter_gradient_form([3, 3, 128, 12]) == ("output_patches" if plain else "tf")
        assert _form_under_xla([1, 1, 8, 8]) == "tf"  # XLA emits TF's op itself
