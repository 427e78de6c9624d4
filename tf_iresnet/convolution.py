"""A 2-D convolution whose input gradient is itself a forward convolution.

For a stride-1 ``"SAME"`` convolution with an odd ``kh x kw`` kernel ``W [kh, kw, in, out]``
(symmetric zero padding of ``(k - 1) / 2``), the adjoint of ``x -> conv2d(x, W)`` is the
stride-1 ``"SAME"`` convolution with the *adjoint kernel*

    W*[i, j, o, c] = W[kh - 1 - i, kw - 1 - j, c, o]

(spatially flipped, input and output channels swapped). So the vector-Jacobian product
``dy -> dy^T dconv/dx`` can run as an ordinary forward convolution instead of TensorFlow's
``Conv2DBackpropInput``. This matters for i-ResNets, whose log-det series evaluates that product
``n_terms`` times per block and step:

* TF's plain (non-oneDNN) CPU ``Conv2DBackpropInput`` is 1.4-3.2x slower than the equivalent
  forward convolution at the narrow outputs of a residual branch (``hidden -> C``);
* under XLA, a ``Conv2DBackpropInput`` inside a ``tf.while_loop`` or ``tf.cond`` body (the
  Neumann series, the Russian-roulette terms) keeps a non-canonical kernel layout and is emitted
  as naive loops instead of an Eigen call: the body runs about 6x slower than unrolled. The
  adjoint kernel is computed once, outside the loop, so the body's convolution is canonical.

With oneDNN (TF's default on CPUs with AVX-512) outside XLA, TF's own ``Conv2DBackpropInput``
is as fast or faster, so `conv2d` uses the adjoint form only where it wins: in XLA-compiled
graphs, and on CPUs running TF's plain kernels. ``benchmarks/README.md`` (fifth session) has
the figures. The kernel gradient stays TF's ``Conv2DBackpropFilter``. Both gradients are built
from differentiable ops and the adjoint kernel is an input of the op, so higher-order gradients
(the Neumann gradient differentiates a vector-Jacobian product in the weights) are exact.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util
from tensorflow.python.util import _pywrap_util_port

__all__ = ["FILTER_GRADIENT_FORMS", "adjoint_form_is_faster", "adjoint_kernel", "conv2d",
           "filter_gradient", "filter_gradient_form"]


def adjoint_kernel(kernel: tf.Tensor) -> tf.Tensor:
    """``W*``: the kernel ``[kh, kw, out, in]`` of the adjoint of a stride-1 SAME convolution.

    Args:
      kernel: ``[kh, kw, in, out]`` with odd ``kh`` and ``kw``.
    """
    return _adjoint_kernel(kernel)


@tf.custom_gradient
def _adjoint_kernel(kernel: tf.Tensor):
    # The map is linear and its adjoint is the same flip-and-swap. Its own gradient keeps the
    # reverse axes and the permutation inside the backward pass: TF's gradients of ReverseV2
    # and Transpose read those constants from the forward op, and when the forward pass is a
    # traced function of its own (the shared block functions), XLA then needs them as
    # compile-time outputs of that function and treats every input of the step as a constant:
    # it would recompile the whole step at every call.
    def flip_swap(k):
        return tf.transpose(tf.reverse(k, axis=[0, 1]), [0, 1, 3, 2])

    return flip_swap(kernel), flip_swap


@tf.custom_gradient
def _same_conv2d(x: tf.Tensor, kernel: tf.Tensor, adjoint: tf.Tensor):
    outputs = tf.nn.conv2d(x, kernel, strides=1, padding="SAME", data_format="NHWC")
    # A Python list, not tf.shape(kernel): XLA needs the filter sizes as a compile-time
    # constant, and a shape read inside a traced gradient function can make it treat the
    # kernel's value as one, recompiling at every step.
    kernel_shape = kernel.shape.as_list()

    def grad(d_outputs):
        # The adjoint of the adjoint is the kernel itself: second-order gradients (the Neumann
        # gradient differentiates a vector-Jacobian product) stay forward convolutions too.
        d_x = _same_conv2d(d_outputs, adjoint, kernel)
        d_kernel = filter_gradient(x, d_outputs, kernel_shape)
        # The outputs do not depend on `adjoint` itself; its link to `kernel` is the
        # differentiable `adjoint_kernel(kernel)` outside this op.
        return d_x, d_kernel, tf.zeros_like(adjoint)

    return outputs, grad


def _shifted(t: tf.Tensor, kh: int, kw: int) -> list[tf.Tensor]:
    """The ``kh * kw`` windows ``t_pad[:, 2ph - i : 2ph - i + H, 2pw - j : 2pw - j + W]`` of a
    SAME-padded ``[B, H, W, C]`` tensor, in the kernel's ``(i, j)`` order."""
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    h, w = t.shape[1], t.shape[2]
    padded = tf.pad(t, [[0, 0], [ph, ph], [pw, pw], [0, 0]])
    return [padded[:, 2 * ph - i:2 * ph - i + h, 2 * pw - j:2 * pw - j + w, :]
            for i in range(kh) for j in range(kw)]


FILTER_GRADIENT_FORMS = ("tf", "matmul", "output_patches")


def filter_gradient_form(kernel_shape: Sequence[int]) -> str:
    """The fastest measured way to compute `filter_gradient` here for a ``[kh, kw, in, out]``
    kernel: ``"matmul"`` for 1x1 kernels, ``"output_patches"`` for wider kernels with fewer
    outputs than inputs on TF's plain CPU kernels, else ``"tf"``; always ``"tf"`` when the
    graph is compiled by XLA (which emits TF's op itself)."""
    kh, kw, c_in, c_out = kernel_shape
    if _in_xla_context():
        return "tf"
    if kh == kw == 1:
        return "matmul"
    if _plain_cpu_kernels() and c_out < c_in:
        return "output_patches"
    return "tf"


def filter_gradient(x: tf.Tensor, d_outputs: tf.Tensor, kernel_shape: Sequence[int],
                    form: str | None = None) -> tf.Tensor:
    """``dL/dW`` of a stride-1 SAME convolution ``y = conv2d(x, W)`` from ``d_outputs = dL/dy``.

    ``dW[i, j, c, o] = sum_{b, h, w} x[b, h, w, c] d_outputs_pad[b, h - i + 2ph, w - j + 2pw, o]``
    (``ph, pw`` the padding). TF's ``Conv2DBackpropFilter`` computes it as one op; here it can
    also be one matrix product, which TF's plain CPU kernels run several times faster when the
    kernel has few outputs (``[3, 3, 128, 12]`` at 16x16, batch 64: 15.3 against 3.8 ms):

    * ``"matmul"`` (1x1 kernels): ``x^T d_outputs`` over the ``B H W`` rows;
    * ``"output_patches"``: ``x^T P`` with P the ``kh kw`` shifted windows of ``d_outputs``
      side by side (``[B H W, kh kw out]``), reshaped to ``[kh, kw, in, out]``;
    * ``"tf"``: ``Conv2DBackpropFilter``.

    All three are differentiable to any order.

    Args:
      x: ``[B, H, W, in]``.
      d_outputs: ``[B, H, W, out]``.
      kernel_shape: ``[kh, kw, in, out]``, odd kh and kw, static.
      form: one of ``FILTER_GRADIENT_FORMS``; None picks `filter_gradient_form`.

    Returns:
      ``[kh, kw, in, out]``.
    """
    kh, kw, c_in, c_out = (int(d) for d in kernel_shape)
    form = filter_gradient_form(kernel_shape) if form is None else form
    if form not in FILTER_GRADIENT_FORMS:
        raise ValueError(f"form must be one of {FILTER_GRADIENT_FORMS} or None, got {form!r}.")
    if form == "matmul":
        if (kh, kw) != (1, 1):
            raise ValueError(f"form='matmul' needs a 1x1 kernel, got kernel_shape "
                             f"{list(kernel_shape)}; use 'output_patches' or 'tf'.")
        d_kernel = tf.matmul(tf.reshape(x, [-1, c_in]), tf.reshape(d_outputs, [-1, c_out]),
                             transpose_a=True)
        return tf.reshape(d_kernel, [1, 1, c_in, c_out])
    if form == "output_patches":
        patches = tf.concat(_shifted(d_outputs, kh, kw), axis=-1)
        d_kernel = tf.matmul(tf.reshape(x, [-1, c_in]),
                             tf.reshape(patches, [-1, kh * kw * c_out]), transpose_a=True)
        return tf.transpose(tf.reshape(d_kernel, [c_in, kh, kw, c_out]), [1, 2, 0, 3])
    return tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=[kh, kw, c_in, c_out], out_backprop=d_outputs,
        strides=[1, 1, 1, 1], padding="SAME", data_format="NHWC")


def _has_adjoint_form(kernel_shape: Sequence[int | None], strides: Sequence[int],
                      padding: str, dilations: Sequence[int]) -> bool:
    kh, kw = kernel_shape[0], kernel_shape[1]
    return (padding == "SAME" and tuple(strides) == (1, 1) and tuple(dilations) == (1, 1)
            and kh is not None and kw is not None and kh % 2 == 1 and kw % 2 == 1)


@functools.cache
def _plain_cpu_kernels() -> bool:
    """TF runs its plain (Eigen) CPU kernels: no oneDNN, no GPU."""
    return not _pywrap_util_port.IsMklEnabled() and not tf.config.list_physical_devices("GPU")


def _in_xla_context() -> bool:
    """The graph being traced is compiled by XLA (``jit_compile=True``, or nested in one)."""
    return (not tf.executing_eagerly()
            and bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())))


def adjoint_form_is_faster() -> bool:
    """Whether `conv2d` uses the adjoint form here: when the graph being traced is compiled by
    XLA (``tf.function(jit_compile=True)``, or nested in one), or TF runs its plain CPU
    kernels (measured faster in both cases; see the module docstring)."""
    return _in_xla_context() or _plain_cpu_kernels()


def conv2d(
    x: tf.Tensor,
    kernel: tf.Tensor,
    *,
    strides: Sequence[int] = (1, 1),
    padding: str = "SAME",
    dilations: Sequence[int] = (1, 1),
    adjoint_form: bool | None = None,
) -> tf.Tensor:
    """``tf.nn.convolution(x, kernel, ...)`` in NHWC, with the fast adjoint where it applies.

    Stride-1, undilated ``"SAME"`` convolutions with odd kernel sizes can get the input
    gradient as a forward convolution with `adjoint_kernel` (see the module docstring); every
    other configuration runs `tf.nn.convolution` (which computes a dilated convolution as
    space-to-batch around a plain one, so that its gradient exists without oneDNN). The values
    are those of `tf.nn.convolution`; gradients agree to float32 round-off.

    Args:
      x: ``[batch, H, W, in]``.
      kernel: ``[kh, kw, in, out]``.
      strides, dilations: ``(sh, sw)`` and ``(dh, dw)``.
      padding: ``"SAME"`` or ``"VALID"``.
      adjoint_form: use the adjoint form where it applies (True) or never (False); None
        (default) decides by `adjoint_form_is_faster`.

    Returns:
      ``[batch, H', W', out]``.
    """
    if adjoint_form is None:
        adjoint_form = adjoint_form_is_faster()
    if (adjoint_form and kernel.shape.is_fully_defined()
            and _has_adjoint_form(kernel.shape, strides, padding, dilations)):
        return _same_conv2d(x, kernel, adjoint_kernel(kernel))
    return tf.nn.convolution(x, kernel, strides=list(strides), padding=padding,
                             dilations=list(dilations), data_format="NHWC")
