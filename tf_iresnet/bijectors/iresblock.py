"""The invertible residual block ``y = x + g(x)`` as a TFP bijector."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from tf_iresnet import fixed_point
from tf_iresnet.bijectors.checks import check_input
from tf_iresnet.fixed_point import InverseConfig
from tf_iresnet.logdet import LogDetConfig, residual_and_logdet, stateless_seed
from tf_iresnet.logdet_in_forward import IN_FORWARD_METHODS, residual_and_logdet_in_forward
from tf_iresnet.recompute import recompute_gradient

tfb = tfp.bijectors

__all__ = ["InvertibleResidualBlock"]


class InvertibleResidualBlock(tfb.Bijector):
    """Invertible residual block ``y = x + g(x)`` with a contractive residual branch g.

    The bijector is a *view*: ``residual_fn`` is a Keras layer or model that owns (and trains)
    every weight; the block only evaluates it. Build the block anew whenever convenient; it
    holds no state. ``residual_fn`` must map ``[B, *event]`` to the same shape, process examples
    independently and be contractive (``Lip(g) < 1``, e.g. built from
    ``tf_iresnet.SpectralNormalization`` layers with ``coeff < 1`` and 1-Lipschitz activations).

    #### Mathematical Details

    Forward: ``y = x + g(x)``.

    Inverse: the unique fixed point of ``x <- y - g(x)`` (Banach; the error after k steps is
    at most ``Lip(g)^k / (1 - Lip(g)) |y - g(y) - y|``), stopped when
    ``|x_{k+1} - x_k| <= atol + rtol |x_{k+1}|`` elementwise over the batch (an
    ``InverseConfig``); ``solver="anderson"`` accelerates it. A solve that misses the tolerance
    within ``max_iter`` evaluations raises (``on_failure="raise"``; in a graph the examples that
    missed it are NaN, also under XLA, see `tf_iresnet.fixed_point.check_converged`) or warns.

    Gradients flow through the inverse (implicit differentiation): for ``x = y - g(x)`` and an
    upstream gradient ``v``, ``dL/dy = w`` with ``w = v - J_g(x)^T w`` (solved by the same
    solver, tolerance and failure mode, one vector-Jacobian product of g per iteration) and
    ``dL/dtheta = -w^T dg(x)/dtheta``. So ``TransformedDistribution.sample`` is differentiable
    in the weights (reparameterized sampling, e.g. reverse-KL fitting).

    Log-determinant: ``log|det(I + J_g)| = sum_{k>=1} (-1)^(k+1) tr(J_g^k) / k``, estimated
    as described in ``tf_iresnet.logdet`` (``"exact"``, ``"series"``, ``"unbiased"``; ``"none"``
    for pure forward passes, e.g. classification or encoding). The forward pass and the
    estimate share one evaluation of g, and the log-det is cached with the forward result, so
    ``forward`` followed by ``forward_log_det_jacobian`` on the same tensor evaluates g once.
    The inverse log-det is ``-fldj(inverse(y))``.

    #### Examples

    ```python
    import keras, tensorflow_probability as tfp, tf_iresnet
    g = keras.Sequential([
        tf_iresnet.SpectralNormalization(keras.layers.Dense(32), coeff=0.9),
        tf_iresnet.LipSwish(),
        tf_iresnet.SpectralNormalization(keras.layers.Dense(2), coeff=0.9),
    ])
    g.build((None, 2))
    block = tf_iresnet.InvertibleResidualBlock(g, event_ndims=1, logdet="exact")
    dist = tfp.distributions.TransformedDistribution(
        tfp.distributions.MultivariateNormalDiag(loc=[0.0, 0.0]), tfp.bijectors.Invert(block))
    dist.log_prob([[0.5, -1.0]])  # log p(x) = log N(x + g(x)) + log|det(I + J_g(x))|
    ```

    #### References

    [1] Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. Invertible Residual Networks. ICML 2019.
    [2] Chen, Behrmann, Duvenaud, Jacobsen. Residual Flows for Invertible Generative Modeling.
        NeurIPS 2019.
    """

    # Forward and inverse return (value, attributes); attributes hold the log-dets so that the
    # log-det computed during the forward pass is reused (as TFP's FFJORD does).
    _cache = cache_util.BijectorCacheWithGreedyAttrs(
        forward_name="_augmented_forward", inverse_name="_augmented_inverse"
    )

    def __init__(
        self,
        residual_fn: Callable[..., tf.Tensor],
        *,
        event_ndims: int,
        logdet: LogDetConfig | str = "series",
        inverse: InverseConfig | None = None,
        n_terms: int | None = None,
        n_samples: int | None = None,
        seed=None,
        recompute: bool = False,
        logdet_in_forward: bool = False,
        validate_args: bool = False,
        name: str | None = None,
    ):
        """Creates the block.

        Args:
          residual_fn: Keras layer/model (or callable accepting ``training=``) computing g; the
            block always calls it with ``training=False`` (spectral-norm power iterations run
            as a step of their own after the optimizer update, never inside a forward pass).
          event_ndims: rank of one event: 1 for vectors ``[D]``, 3 for NHWC images ``[H, W, C]``.
          logdet: the log-det estimator, a `tf_iresnet.LogDetConfig` (method, terms, probes,
            roulette, Neumann gradient), or its method as a string, shorthand for
            ``LogDetConfig(method=logdet)``: ``"exact"``, ``"series"`` (default),
            ``"unbiased"`` or ``"none"``.
          inverse: the fixed-point inverse, a `tf_iresnet.InverseConfig` (solver, tolerance,
            budget, failure mode); ``None`` means ``InverseConfig()``.
          n_terms, n_samples: shortcuts for the two most common estimator settings, the terms
            of the truncated series and the Hutchinson probes per example. With a string
            ``logdet`` they fill in ``LogDetConfig(method=logdet, n_terms=..., n_samples=...)``;
            with a ``LogDetConfig`` they may only repeat its values (a different value raises
            ``ValueError``, rather than silently picking one of the two). ``None``: the
            config's value (defaults 5 and 1).
          seed: stateless seed (int or shape-[2] int tensor) for probes and roulette; ``None``
            draws fresh randomness on every call. Under ``tf.distribute`` pass a seed derived
            from the step so that every replica draws the same roulette count.
          recompute: keep only the block's input for the backward pass and recompute g and the
            log-det there (`tf_iresnet.recompute.recompute_gradient`): same values and
            gradients, the memory of one block instead of all inside a `tf.function`, one more
            forward pass with log-det per block. Both passes use the same seed.
          logdet_in_forward: compute the log-det's gradients (in the input and in the
            branch's variables) during the forward pass and keep only those, not the
            estimate's graph; the backward pass runs g once more for its vector-Jacobian
            product (`tf_iresnet.logdet_in_forward`). Same values and gradients, provided the
            loss weights every example's log-det equally (a batch mean or sum; other weights
            raise in the backward pass). Needs ``logdet`` ``"series"`` or ``"unbiased"`` and
            ``recompute=False``.
          validate_args: check that inputs are finite (forward and inverse). Inputs of
            another dtype than ``residual_fn.compute_dtype`` are always refused (``TypeError``).
          name: name of the bijector.
        """
        parameters = dict(locals())
        if event_ndims not in (1, 3):
            raise ValueError(
                f"event_ndims must be 1 (vector events [D]) or 3 (NHWC image events [H, W, C]), "
                f"got {event_ndims!r}."
            )
        if not callable(residual_fn):
            raise TypeError(f"residual_fn must be a Keras layer or callable, got {residual_fn!r}.")
        self._config = _logdet_config(logdet, n_terms=n_terms, n_samples=n_samples)
        if inverse is None:
            inverse = InverseConfig()
        if not isinstance(inverse, InverseConfig):
            raise TypeError(f"inverse must be an InverseConfig or None, got {inverse!r}.")
        self._inverse_config = inverse
        # Equal settings give equal parameters (hence equal bijectors), however they were spelled.
        parameters.update(logdet=self._config, inverse=inverse, n_terms=None, n_samples=None)
        self._residual_fn = residual_fn
        self._recompute = bool(recompute)
        self._logdet_in_forward = bool(logdet_in_forward)
        if self._logdet_in_forward and self._recompute:
            raise ValueError(
                "logdet_in_forward=True and recompute=True cannot be combined: recompute runs "
                "the whole log-det again in the backward pass, logdet_in_forward differentiates "
                "it in the forward pass; pick one.")
        if self._logdet_in_forward and self._config.method not in IN_FORWARD_METHODS:
            raise ValueError(
                f"logdet_in_forward=True needs logdet one of {IN_FORWARD_METHODS}, got "
                f"{self._config.method!r} ('exact' has no graph worth dropping, 'none' no "
                f"log-det).")
        self._event_ndims = event_ndims
        self._seed = seed
        with tf.name_scope(name or "invertible_residual_block") as name:
            super().__init__(
                forward_min_event_ndims=event_ndims,
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
                name=name,
            )

    @property
    def residual_fn(self):
        """The residual branch g (a Keras layer owning the weights)."""
        return self._residual_fn

    @property
    def logdet_config(self) -> LogDetConfig:
        return self._config

    @property
    def inverse_config(self) -> InverseConfig:
        return self._inverse_config

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    # -- helpers ---------------------------------------------------------------------------

    def _g(self, x: tf.Tensor) -> tf.Tensor:
        gx = self._residual_fn(x, training=False)
        if gx.shape.rank is not None and x.shape.rank is not None:
            if not gx.shape.is_compatible_with(x.shape):
                raise ValueError(
                    f"residual_fn must preserve the shape of its input: got {gx.shape} for input "
                    f"{x.shape} in {self.name}."
                )
        return gx

    def _flatten_batch(self, x: tf.Tensor):
        """Reshapes ``[*batch, *event]`` to ``[prod(batch), *event]`` for the Keras branch."""
        x = check_input(self, x, dtype=getattr(self._residual_fn, "compute_dtype", None),
                        event_ndims=self._event_ndims)
        shape = tf.shape(x)
        event_shape = shape[tf.rank(x) - self._event_ndims:]
        batch_shape = shape[: tf.rank(x) - self._event_ndims]
        static_event = x.shape[-self._event_ndims:]
        flat = tf.reshape(x, tf.concat([[-1], event_shape], axis=0))
        flat.set_shape(tf.TensorShape([None]).concatenate(static_event))
        return flat, batch_shape

    def _unflatten(self, t: tf.Tensor, batch_shape, event: bool):
        if event:
            return tf.reshape(t, tf.concat([batch_shape, tf.shape(t)[1:]], axis=0))
        return tf.reshape(t, batch_shape)

    # -- bijector methods --------------------------------------------------------------------

    def _augmented_forward(self, x):
        flat, batch_shape = self._flatten_batch(x)
        # One seed for both passes of the recompute path (a None seed would draw anew when
        # recomputing).
        seed = stateless_seed(self._seed) if self._recompute else self._seed

        def residual(t):
            gx, ldj = residual_and_logdet(self._g, t, self._config, seed=seed)
            return gx if ldj is None else (gx, ldj)

        if self._logdet_in_forward:
            out = residual_and_logdet_in_forward(self._g, flat, self._config, seed=seed)
        elif self._recompute:
            out = recompute_gradient(residual)(flat)
        else:
            out = residual(flat)
        gx, ldj = (out, None) if self._config.method == "none" else out
        y = self._unflatten(flat + gx, batch_shape, event=True)
        if ldj is None:
            return y, {}
        ldj = self._unflatten(ldj, batch_shape, event=False)
        return y, {"fldj": ldj, "ildj": -ldj}

    def _augmented_inverse(self, y):
        flat, batch_shape = self._flatten_batch(y)
        x = self._differentiable_inverse(flat)
        return self._unflatten(x, batch_shape, event=True), {}

    def _solve(self, g, rhs, what: str) -> tf.Tensor:
        """Solves ``t + g(t) = rhs`` with the block's `InverseConfig`, failing loudly."""
        c = self._inverse_config
        result = fixed_point.solve_fixed_point(
            g, rhs, atol=c.atol, rtol=c.rtol, max_iter=c.max_iter, method=c.solver,
            anderson_memory=c.anderson_memory,
        )
        return fixed_point.check_converged(
            result, max_iter=c.max_iter, atol=c.atol, rtol=c.rtol, on_failure=c.on_failure,
            what=f"{self.name} {what}",
        )

    def _differentiable_inverse(self, y):
        """``x = y - g(x)`` by fixed-point iteration, with its implicit gradient.

        For the upstream gradient ``v = dL/dx``, ``w = dL/dy = (I + J_g(x))^{-T} v`` is the fixed
        point of ``w <- v - J_g(x)^T w`` (a contraction, ``|J_g^T| = |J_g| <= Lip(g) < 1``),
        solved by the same solver and tolerance as the inverse, with one vector-Jacobian
        product of g per iteration; then ``dL/dtheta = -w^T dg(x)/dtheta`` for the weights of g.
        """
        @tf.custom_gradient
        def inverse(y):
            x = self._solve(self._g, y, "fixed-point inverse")
            return x, lambda v, variables=None: self._inverse_grad(x, v, variables)

        # AutoGraph would convert the undecorated Python function and bypass the custom gradient.
        return tf.autograph.experimental.do_not_convert(inverse)(y)

    def _inverse_grad(self, x, v, variables):
        """``(dL/dy, dL/dvariables)`` of the inverse at ``x`` for the upstream gradient v."""
        variables = list(variables or [])
        x_fixed = tf.stop_gradient(x)

        def vjp(w):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(x_fixed)
                gx = self._g(x_fixed)
            return tape.gradient(gx, x_fixed, output_gradients=w)

        w = self._solve(vjp, v, "implicit gradient of the inverse")
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            gx = self._g(x_fixed)
        grads = tape.gradient(gx, variables, output_gradients=-w)
        return w, grads

    def _forward(self, x):
        return self._augmented_forward(x)[0]

    def _inverse(self, y):
        return self._augmented_inverse(y)[0]

    def _forward_log_det_jacobian(self, x):
        if self._config.method == "none":
            raise ValueError(
                f"{self.name} was built with logdet='none'; build the block with "
                f"logdet='exact', 'series' or 'unbiased' to get a log-determinant."
            )
        cached = self._cache.forward_attributes(x)
        if "fldj" not in cached:
            _, attrs = self._augmented_forward(x)
            cached.update(attrs)
        return cached["fldj"]

    def _inverse_log_det_jacobian(self, y):
        if self._config.method == "none":
            return self._forward_log_det_jacobian(y)  # raises the explanatory error
        cached = self._cache.inverse_attributes(y)
        if "ildj" not in cached:
            x = self.inverse(y)
            _, attrs = self._augmented_forward(x)
            cached.update(attrs)
        return cached["ildj"]


def _logdet_config(logdet: LogDetConfig | str, *, n_terms: int | None,
                   n_samples: int | None) -> LogDetConfig:
    """The block's ``LogDetConfig`` from ``logdet`` (config or method string) and shortcuts."""
    shortcuts = {k: v for k, v in (("n_terms", n_terms), ("n_samples", n_samples))
                 if v is not None}
    if isinstance(logdet, str):
        return LogDetConfig(method=logdet, **shortcuts)
    if not isinstance(logdet, LogDetConfig):
        raise TypeError(f"logdet must be a LogDetConfig or a method string, got {logdet!r}.")
    for field, value in shortcuts.items():
        if getattr(logdet, field) != value:
            raise ValueError(
                f"{field}={value!r} contradicts logdet=LogDetConfig(..., {field}="
                f"{getattr(logdet, field)!r}); set {field} in the LogDetConfig only."
            )
    return logdet
