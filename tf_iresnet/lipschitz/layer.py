"""`SpectralNormalization`: a Keras layer normalizing a `Dense` or `Conv2D` by its operator norm.

Also the argument checks shared with the model-level helpers (`tf_iresnet.lipschitz.model`).
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import keras
import tensorflow as tf

from tf_iresnet.convolution import conv2d
from tf_iresnet.lipschitz.fft_bound import _conv2d_norm_upper_bound
from tf_iresnet.lipschitz.operators import _bilinear, _OperatorSpec
from tf_iresnet.lipschitz.solvers import (
    _METHODS,
    _power_iteration_without_gradient,
    _shared_power_iteration,
    _shared_power_iteration_in_place,
    _solver,
)

# Per thread, a stack of {id(layer): constant kernel}: the folded kernels in force (see
# `folded_kernels`).
_FOLDED = threading.local()


def _folded_kernel(layer) -> tf.Tensor | None:
    for folded in reversed(getattr(_FOLDED, "stack", ())):
        if id(layer) in folded:
            return folded[id(layer)]
    return None


def folded_kernels_active() -> bool:
    """Whether a `folded_kernels` context is in force in this thread."""
    return any(getattr(_FOLDED, "stack", ()))


@contextlib.contextmanager
def folded_kernels(layers: Iterable[SpectralNormalization]) -> Iterator[None]:
    """Inside, each of ``layers`` computes with the constant ``W / max(1, sigma / coeff)``
    of its current weights and u, v (computed once, on entry, eagerly).

    Functions traced inside (e.g. the endpoints of a SavedModel export) then run no power
    iteration and compute no sigma: the normalized kernels are constants of their graph, and
    the outputs are those of the layers at entry (``training=True`` no longer updates u, v).
    Not differentiable in the kernel. Exit restores the usual computation.
    """
    folded = {}
    with tf.init_scope():  # eager constants even when entered while tracing
        for layer in layers:
            layer._check_built("folded_kernels")
            folded[id(layer)] = tf.constant(layer.normalized_kernel().numpy())
    stack = getattr(_FOLDED, "stack", None)
    if stack is None:
        stack = _FOLDED.stack = []
    stack.append(folded)
    try:
        yield
    finally:
        stack.remove(folded)


# Power iterations run (eagerly) when the layer is built, so that the state is a sensible
# estimate (and the normalization active) from the first call, before any training step has
# updated it. Eager and of a fixed count, they trace nothing: a Lanczos solve to a tolerance
# (`_iterate_to_tolerance`) costs a trace of its `tf.function` per layer shape, most of the
# cost of building a small model. From random unit vectors, 10 iterations reach 0.96 to 0.9999
# of the norm on the digits models' layers (Lanczos: 1.0000).
_BUILD_POWER_ITERATIONS = 10


def _check_coeff(coeff: Any) -> float:
    if (
        isinstance(coeff, bool)
        or not isinstance(coeff, numbers.Real)
        or not 0.0 < float(coeff) < 1.0
    ):
        raise ValueError(
            "`coeff` must be a real number in the open interval (0, 1), so that the normalized "
            f"map is a contraction; got coeff={coeff!r}."
        )
    return float(coeff)


def _check_power_iterations(power_iterations: Any, name: str = "power_iterations") -> int:
    if (
        isinstance(power_iterations, bool)
        or not isinstance(power_iterations, numbers.Integral)
        or power_iterations < 0
    ):
        raise ValueError(f"`{name}` must be a non-negative int; got {name}={power_iterations!r}.")
    return int(power_iterations)


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not float(tol) >= 0.0:
        raise ValueError(f"`tol` must be a non-negative float; got tol={tol!r}.")
    return float(tol)


def _check_method(method: Any) -> str:
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}; got method={method!r}.")
    return method


def _check_wrapped_layer(layer: Any) -> None:
    supported = (
        "SpectralNormalization supports keras.layers.Dense and keras.layers.Conv2D "
        "(data_format='channels_last', groups=1, not quantized)"
    )
    if not isinstance(layer, keras.layers.Dense | keras.layers.Conv2D):
        raise TypeError(f"{supported}; got {type(layer).__name__}: {layer!r}.")
    if isinstance(layer, keras.layers.Conv2D):
        if layer.data_format != "channels_last":
            raise TypeError(f"{supported}; got a Conv2D with data_format={layer.data_format!r}.")
        if layer.groups != 1:
            raise TypeError(f"{supported}; got a Conv2D with groups={layer.groups}.")
    if getattr(layer, "quantization_mode", None) is not None:
        raise TypeError(f"{supported}; got a layer quantized with {layer.quantization_mode!r}.")


@keras.saving.register_keras_serializable(package="tf_iresnet")
class SpectralNormalization(keras.layers.Layer):
    """Soft spectral normalization of a `Dense` or `Conv2D` layer, by its true operator norm.

    Wraps a layer computing ``y = act(A_W x + b)`` and computes instead
    ``y = act(A_{W_n} x + b)`` with

    ``W_n = W / max(1, sigma / coeff)``,

    where ``sigma`` estimates ``||A_W||_2``, the largest singular value of the linear map
    ``x -> A_W x``. Below ``coeff`` the kernel is used as is; above, it is rescaled to norm
    ``coeff`` (up to the estimation error). The wrapped layer's kernel variable is never
    modified: the optimizer updates W and the normalization is applied on every call.

    #### Mathematical Details

    *The operator.* For a `Dense` layer with kernel ``W`` of shape ``[in, out]``,
    ``A v = W^T v`` and ``||A||_2`` is the largest singular value of W (inputs of any rank: the
    map acts on the last axis, and a block-diagonal map has the norm of its block). For a
    `Conv2D`, ``A v = conv2d(v, W)`` on an input of the static spatial size ``H x W`` seen at
    build time, with the layer's strides, padding and dilation: this is the map whose norm bounds
    the layer's Lipschitz constant, and it depends on the input size, the stride and the padding,
    not only on the kernel.

    *Power iteration.* The layer keeps two non-trainable unit vectors, ``v`` in the input space
    (shape ``[in]`` or ``[1, H, W, C_in]``) and ``u`` in the output space (``[out]`` or
    ``[1, H', W', C_out]``). One iteration is

    ``v <- normalize(A^T u)``,  ``u <- normalize(A v)``,

    with ``A^T`` the exact adjoint (`tf.nn.conv2d_transpose` for convolutions). The estimate is
    ``sigma = <u, A v>``, computed with u, v held fixed (`tf.stop_gradient`), so the gradient
    reaches the kernel through sigma: ``d sigma / dW = u v^T`` (for a convolution, the
    correlation of v and u), the gradient of the top singular value at convergence. Dropping it
    (as `keras.layers.SpectralNormalization` does) biases the gradient.

    *State.* u and v persist across steps: each training call (``training=True``) runs
    ``power_iterations`` more iterations from them, so the estimate keeps tracking a slowly
    changing W. Inference calls use the stored state unchanged. Power iteration converges from
    below, so the true norm after normalization can exceed ``coeff`` slightly (one power
    iteration per step tracks a slowly changing W, but convolutions have clustered top singular
    values and power iteration converges slowly on them): use `lipschitz_estimate` (or
    `converge_spectral_norms`, both Lanczos by default) to converge the state to a tolerance,
    e.g. after each optimizer step, before export and after loading weights, and
    `lipschitz_upper_bound` for a rigorous bound. When the layer is built, the state is
    initialized to random unit vectors and then refined by 10 power iterations if the build
    runs eagerly, so that the normalization is active from the first call: sigma is then a
    lower estimate of the norm, typically a few percent below it (converge it as above for
    the measured value). (A layer first built inside a `tf.function` keeps random u, v until
    its first training call or `lipschitz_estimate`.)

    *Distribution.* u and v are created with ``aggregation="only_first_replica"``: every
    replica computes the same update from the same mirrored kernel, and the first replica's
    value is written to all copies, so assigning them inside ``strategy.run`` is allowed.

    *Precision.* The normalization runs in the variable dtype (float32 under a mixed policy);
    only the normalized kernel and bias are cast to the compute dtype.

    #### Examples

    ```python
    import keras
    from tf_iresnet.lipschitz import SpectralNormalization, lipschitz_report

    conv = SpectralNormalization(keras.layers.Conv2D(16, 3, padding="same"), coeff=0.9)
    y = conv(keras.random.normal([4, 32, 32, 8]), training=True)  # [4, 32, 32, 16]
    conv.lipschitz_estimate(power_iterations=200, tol=1e-5)      # ~<= 0.9
    conv.lipschitz_upper_bound()                                 # rigorous, >= true norm
    ```

    #### References

    [1] Takeru Miyato, Toshiki Kataoka, Masanori Koyama, Yuichi Yoshida. Spectral
        Normalization for Generative Adversarial Networks. ICLR 2018.
        https://arxiv.org/abs/1802.05957
    [2] Jens Behrmann, Will Grathwohl, Ricky T. Q. Chen, David Duvenaud, Joern-Henrik Jacobsen.
        Invertible Residual Networks. ICML 2019. https://arxiv.org/abs/1811.00995
    [3] Hanie Sedghi, Vineet Gupta, Philip M. Long. The Singular Values of Convolutional
        Layers. ICLR 2019. https://arxiv.org/abs/1805.10408
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        coeff: float = 0.9,
        power_iterations: int = 1,
        **kwargs: Any,
    ) -> None:
        """Wraps ``layer``.

        Args:
          layer: an unbuilt or built `keras.layers.Dense`, or a `keras.layers.Conv2D` with
            ``data_format="channels_last"`` and ``groups=1`` (any strides, padding, dilation,
            bias and activation). Its kernel is read, never written.
          coeff: float in (0, 1); the bound on the operator norm of the normalized map.
            Default 0.9.
          power_iterations: non-negative int; power iterations run by each training call.
            Default 1. 0 freezes the estimate during training (update it with
            `lipschitz_estimate`).
          **kwargs: `keras.layers.Layer` arguments (``name``, ``dtype``, ...). ``dtype``
            defaults to the wrapped layer's dtype policy.

        Raises:
          TypeError: ``layer`` is not a supported layer.
          ValueError: ``coeff`` not in (0, 1), or ``power_iterations`` not a non-negative int.
        """
        _check_wrapped_layer(layer)
        coeff = _check_coeff(coeff)
        power_iterations = _check_power_iterations(power_iterations)
        kwargs.setdefault("dtype", layer.dtype_policy)
        # The normalization is computed in the variable dtype, whatever the compute dtype: turn
        # off Keras' variable autocasting inside `call` (inputs are cast by hand instead).
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        self.layer = layer
        self.coeff = coeff
        self.power_iterations = power_iterations
        self._is_conv = isinstance(layer, keras.layers.Conv2D)
        if self._is_conv:
            self._spec = _OperatorSpec(
                operator="conv2d",
                strides=tuple(int(s) for s in layer.strides),
                padding=layer.padding.upper(),
                dilations=tuple(int(d) for d in layer.dilation_rate),
            )
        else:
            self._spec = _OperatorSpec(operator="dense")
        self._input_hw: tuple[int, int] | None = None

    # -- construction ------------------------------------------------------------------------

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        """Builds the wrapped layer and creates the power-iteration state u and v.

        Args:
          input_shape: the input shape. Dense: ``[..., in]``. Conv2D: ``[batch, H, W, C_in]``
            with static H and W (the operator is the convolution at that size).

        Raises:
          ValueError: a Conv2D input whose spatial size is not static.
          TypeError: the wrapped layer was quantized after wrapping.
        """
        input_shape = tuple(input_shape)
        _check_wrapped_layer(self.layer)
        if self._is_conv:
            if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
                raise ValueError(
                    f"SpectralNormalization({self.layer.name}) needs a static spatial size: the "
                    "norm of a convolution depends on the input's height and width. Got "
                    f"input_shape={input_shape}; give the model an input shape such as "
                    "(None, 32, 32, channels)."
                )
            self._input_hw = (int(input_shape[1]), int(input_shape[2]))
        if not self.layer.built:
            self.layer.build(input_shape)
        kernel_in = int(self.layer.kernel.shape[-2])
        if input_shape[-1] is not None and int(input_shape[-1]) != kernel_in:
            raise ValueError(
                f"SpectralNormalization({self.layer.name}): the wrapped layer was built for "
                f"{kernel_in} input features/channels, got input_shape={input_shape}."
            )

        if self._is_conv:
            v_shape = (1, *self._input_hw, kernel_in)
            u_shape = tuple(self.layer.compute_output_shape((1, *self._input_hw, kernel_in)))
            if any(d is None or d <= 0 for d in u_shape):
                raise ValueError(
                    f"SpectralNormalization({self.layer.name}): input_shape={input_shape} gives "
                    f"an empty convolution output {u_shape}."
                )
        else:
            v_shape = (kernel_in,)
            u_shape = (int(self.layer.kernel.shape[-1]),)
        self.v = self.add_weight(
            name="v",
            shape=v_shape,
            initializer=_RandomUnitVector(),
            trainable=False,
            aggregation="only_first_replica",
        )
        self.u = self.add_weight(
            name="u",
            shape=u_shape,
            initializer=_RandomUnitVector(),
            trainable=False,
            aggregation="only_first_replica",
        )
        # Align u and v with the kernel now, so that sigma is a meaningful (if rough) estimate
        # before the first training step. Only when building eagerly: a layer first built while
        # a tf.function is being traced has a kernel that is not initialized yet.
        if tf.executing_eagerly():
            u, v = _power_iteration_without_gradient(
                self._spec, self._kernel(), *self._state(), _BUILD_POWER_ITERATIONS)
            self.u.assign(u)
            self.v.assign(v)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple:
        return self.layer.compute_output_shape(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "layer": keras.layers.serialize(self.layer),
                "coeff": self.coeff,
                "power_iterations": self.power_iterations,
            }
        )
        return config

    @classmethod
    def from_config(
        cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None
    ) -> SpectralNormalization:
        config = dict(config)
        config.pop("autocast", None)
        layer = keras.layers.deserialize(config.pop("layer"), custom_objects=custom_objects)
        return cls(layer, **config)

    # -- maths ---------------------------------------------------------------------------------

    def _kernel(self) -> tf.Tensor:
        """The wrapped layer's kernel as a tensor in the variable dtype."""
        return tf.convert_to_tensor(self.layer.kernel)

    def _state(self) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)

    def power_iterate(self, iterations: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Runs ``iterations`` (default ``power_iterations``) plain power iterations from the
        stored u, v on the current kernel, stores and returns the new ``(u, v)``.

        What ``call(training=True)`` does before normalizing. Training loops that XLA-compile
        their forward pass under a mirrored strategy call this after the optimizer update
        instead (an assignment to a mirrored variable inside a nested compiled function needs a
        cross-replica synchronization TF cannot do there).
        """
        self._check_built("power_iterate")
        iterations = self.power_iterations if iterations is None else iterations
        if iterations <= 0:
            return self._state()
        plain = self._plain_variables()
        if plain is not None:
            return _shared_power_iteration_in_place(self._spec, *plain, iterations)
        u, v = _shared_power_iteration(self._spec, self._kernel(), *self._state(), iterations)
        self.u.assign(u)
        self.v.assign(v)
        return u, v

    def _plain_variables(self) -> tuple[tf.Variable, tf.Variable, tf.Variable] | None:
        """The kernel, u and v as plain `tf.Variable`s, which a traced function may read and
        assign itself; None when any of them is distributed (its assignment synchronizes
        replicas), stands for a tensor (in a `keras.StatelessScope`, or autocast) or is not a
        variable."""
        out = []
        for var in (self.layer.kernel, self.u, self.v):
            value = var.value if isinstance(var, keras.Variable) else var
            if (not isinstance(value, tf.Variable)
                    or isinstance(value, tf.distribute.DistributedValues)):
                return None
            out.append(value)
        return tuple(out)

    def _normalize_kernel(self, kernel: tf.Tensor, u: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """``W / max(1, <u, A_W v> / coeff)`` with u, v constant, differentiable in W."""
        u, v = tf.stop_gradient(u), tf.stop_gradient(v)
        sigma = _bilinear(self._spec, kernel, u, v)
        return kernel / tf.maximum(tf.ones_like(sigma), sigma / self.coeff)

    def _iterate_to_tolerance(
        self, max_iterations: int, tol: float, method: str = "lanczos"
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Refines the stored u, v to relative residual ``tol`` and stores them.

        Returns ``(sigma, iterations, converged)`` (tensors).
        """
        u, v = self._state()
        kernel = tf.stop_gradient(self._kernel())
        solver = _solver(method, self._spec, kernel, u, v)
        u, v, sigma, iterations, converged = solver(
            kernel,
            u,
            v,
            tf.constant(max_iterations, tf.int32),
            tf.constant(tol, kernel.dtype),
        )
        self.u.assign(u)
        self.v.assign(v)
        return sigma, iterations, converged

    def _check_built(self, method: str) -> None:
        if not self.built:
            raise ValueError(
                f"Build {self.name} (call it on an input, or call build(input_shape)) before "
                f"calling {method}()."
            )

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        """Applies the wrapped layer with the normalized kernel.

        Args:
          inputs: Dense: ``[..., in]``; Conv2D: ``[batch, H, W, C_in]`` with the H, W seen at
            build time.
          training: Python bool or None. If truthy, first runs ``power_iterations`` power
            iterations from the stored u, v and stores the result (outside the gradient);
            otherwise the stored state is used unchanged.

        Returns:
          Dense: ``[..., out]``; Conv2D: ``[batch, H', W', C_out]``, in the compute dtype.
        """
        if self._is_conv:
            hw = tuple(inputs.shape[1:3])
            if any(d is not None and d != e for d, e in zip(hw, self._input_hw, strict=True)):
                raise ValueError(
                    f"{self.name} was built for inputs of spatial size {self._input_hw}, and "
                    f"its normalization bounds the convolution at that size only; got inputs "
                    f"of shape {tuple(inputs.shape)}."
                )
        kernel = _folded_kernel(self)
        if kernel is None:
            kernel = self._kernel()
            if training and self.power_iterations > 0:
                u, v = self.power_iterate()
            else:
                u, v = self._state()
            kernel = self._normalize_kernel(kernel, u, v)

        compute_dtype = self.compute_dtype
        if inputs.dtype.is_floating and inputs.dtype != compute_dtype:
            inputs = tf.cast(inputs, compute_dtype)
        kernel = tf.cast(kernel, compute_dtype)
        if self._is_conv:
            outputs = conv2d(inputs, kernel, strides=self._spec.strides,
                             padding=self._spec.padding, dilations=self._spec.dilations)
        else:
            outputs = tf.matmul(inputs, kernel)
        if self.layer.use_bias:
            outputs = tf.nn.bias_add(outputs, tf.cast(self.layer.bias, compute_dtype))
        if self.layer.activation is not None:
            outputs = self.layer.activation(outputs)
        return outputs

    # -- diagnostics ---------------------------------------------------------------------------

    def sigma(self) -> tf.Tensor:
        """The current raw estimate ``<u, A_W v>`` of ``||A_W||_2`` (stored state, no update).

        Returns:
          scalar tensor in the variable dtype; a lower bound on the unnormalized norm up to
          rounding once u and v are aligned.
        """
        self._check_built("sigma")
        u, v = self._state()
        return _bilinear(self._spec, self._kernel(), u, v)

    def normalized_kernel(self) -> tf.Tensor:
        """``W_n = W / max(1, sigma / coeff)`` from the stored u, v (no update).

        Differentiable in the kernel (through W and sigma). Same shape as the wrapped kernel.
        """
        self._check_built("normalized_kernel")
        u, v = self._state()
        return self._normalize_kernel(self._kernel(), u, v)

    def lipschitz_estimate(
        self, power_iterations: int = 200, tol: float = 1e-4, method: str = "lanczos"
    ) -> tf.Tensor:
        """Converges the estimate of ``||A_W||`` and returns the normalized layer's norm.

        Refines the stored u, v with up to ``power_iterations`` iterations, each one product
        with A and one with A^T, until the relative residual ``||A^T u - sigma v|| / sigma``
        (with ``A v = sigma u``) is at most ``tol``, and stores them: from then on the
        normalization (training and inference) uses this estimate. ``power_iterations=0``
        changes nothing.

        * ``method="lanczos"`` (default): restarted Golub-Kahan-Lanczos bidiagonalization
          started from the stored v (see `solvers._lanczos_cycle`); u, v become the top Ritz
          vectors.
        * ``method="power"``: the training step's power iteration, run to the same criterion.

        The top singular values of a convolution are clustered (``s_1 / s_2 ~ 1.002`` on an
        8x8 input), which makes power iteration slow. Measured from random u, v on 3x3 convs
        (8x8 to 32x32, 3 to 64 channels): Lanczos reaches the criterion at tol=1e-4 in 16-67
        iterations with relative error of sigma <= 1e-5; power iteration needs 230-1400
        iterations, and at tol=1e-3 can stop 2e-3 below the norm, near the second singular
        value. Both estimates approach the norm from below, and the residual only proves that
        sigma is close to *some* singular value: `lipschitz_upper_bound` gives a guarantee.

        Args:
          power_iterations: non-negative int, the maximal number of iterations. Default 200.
          tol: non-negative float, relative residual at which to stop. Default 1e-4.
          method: ``"lanczos"`` or ``"power"``. Default ``"lanczos"``.

        Returns:
          scalar tensor, ``sigma / max(1, sigma / coeff) = min(sigma, coeff)``: the estimated
          operator norm of the normalized map.

        Raises:
          ValueError: bad ``power_iterations``, ``tol`` or ``method``.
        """
        self._check_built("lipschitz_estimate")
        power_iterations = _check_power_iterations(power_iterations)
        tol = _check_tol(tol)
        method = _check_method(method)
        if power_iterations > 0:
            sigma, _, _ = self._iterate_to_tolerance(power_iterations, tol, method)
        else:
            sigma = self.sigma()
        return sigma / tf.maximum(tf.ones_like(sigma), sigma / self.coeff)

    def lipschitz_upper_bound(self) -> tf.Tensor:
        """A rigorous upper bound on the operator norm of the normalized linear map.

        Dense: the exact largest singular value of ``W_n`` (SVD). Conv2D: the Sedghi et al.
        bound, the largest singular value over the 2-D DFT of the (dilated) kernel zero-padded
        to the grid ``(H + e_h - 1) x (W + e_w - 1)``, which bounds the zero-padded, strided
        convolution at H x W (see `fft_bound._conv2d_norm_upper_bound`). Uses the stored u, v
        (no update).
        Cost: SVDs of ``(H + e_h - 1)(floor((W + e_w - 1) / 2) + 1)`` complex ``C_in x C_out``
        matrices; measured on 2 CPU cores, 3x3 kernels: ~6 s for 128 channels at 32x32, ~40 s
        for 512 channels at 16x16.

        Returns:
          float64 scalar tensor.
        """
        self._check_built("lipschitz_upper_bound")
        kernel = tf.stop_gradient(self.normalized_kernel())
        if self._is_conv:
            return _conv2d_norm_upper_bound(kernel, self._input_hw, self._spec.dilations)
        return tf.linalg.svd(tf.cast(kernel, tf.float64), compute_uv=False)[0]


class _RandomUnitVector:
    """Initializer: a standard normal sample divided by its norm (uniform on the sphere).

    Seeded once at construction like Keras' unseeded initializers, so `keras.utils.
    set_random_seed` makes it reproducible; stateless, so it can run when variables are lifted
    out of a `tf.function`.
    """

    def __init__(self) -> None:
        self._normal = keras.initializers.RandomNormal(mean=0.0, stddev=1.0)

    def __call__(self, shape: tuple[int, ...], dtype: Any = None) -> tf.Tensor:
        sample = tf.convert_to_tensor(self._normal(shape, dtype=dtype))
        return sample / tf.norm(tf.reshape(sample, [-1]))
