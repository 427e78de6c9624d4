"""The invertible residual block ``y = x + g(x)`` as a TFP bijector."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from tf_iresnet import fixed_point
from tf_iresnet.logdet import LogDetConfig, as_stateless_seed, residual_and_logdet
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
    ``|x_{k+1} - x_k| <= inverse_atol + inverse_rtol |x_{k+1}|`` elementwise over the batch.
    ``inverse_solver="anderson"`` accelerates it. A solve that misses the tolerance within
    ``inverse_max_iter`` evaluations raises (``inverse_on_failure="raise"``) or warns.
    Gradients do not flow through the inverse.

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
        logdet: str = "series",
        n_terms: int = 5,
        n_samples: int = 1,
        probe: str = "gaussian",
        n_exact_terms: int = 2,
        roulette: str = "geometric",
        roulette_param: float = 0.5,
        max_roulette_terms: int = 30,
        neumann_gradient: bool = False,
        recompute: bool = False,
        training: bool = False,
        seed=None,
        inverse_solver: str = "fixed_point",
        inverse_atol: float = 1e-5,
        inverse_rtol: float = 1e-5,
        inverse_max_iter: int = 100,
        inverse_on_failure: str = "raise",
        anderson_memory: int = 5,
        validate_args: bool = False,
        name: str | None = None,
    ):
        """Creates the block.

        Args:
          residual_fn: Keras layer/model (or callable accepting ``training=``) computing g.
          event_ndims: rank of one event: 1 for vectors ``[D]``, 3 for NHWC images ``[H, W, C]``.
          logdet: ``"exact"``, ``"series"``, ``"unbiased"`` or ``"none"``.
          n_terms: terms of the truncated series (``"series"``). Default 5 (the paper's).
          n_samples: Hutchinson probes per example. Default 1.
          probe: ``"gaussian"`` or ``"rademacher"`` probe vectors.
          n_exact_terms: terms always computed by ``"unbiased"``. Default 2.
          roulette: ``"geometric"`` or ``"poisson"`` extra-term count for ``"unbiased"``.
          roulette_param: geometric success probability (default 0.5) or Poisson rate.
          max_roulette_terms: cap on the extra terms (``P(N > 30) < 1e-9`` at the default).
          neumann_gradient: memory-saving gradient whose memory does not grow with the number
            of terms; the returned log-det value is unchanged.
          recompute: keep only the block's input for the backward pass and recompute g and the
            log-det there (`tf_iresnet.recompute.recompute_gradient`): same values and
            gradients, the memory of one block instead of all inside a `tf.function`, one more
            forward pass with log-det per block.
          training: passed to ``residual_fn`` on the forward pass (spectral normalization runs
            its power iteration when True). The inverse always evaluates g with False.
          seed: stateless seed (int or shape-[2] int tensor) for probes and roulette; ``None``
            draws fresh randomness on every call. Under ``tf.distribute`` pass a seed derived
            from the step so that every replica draws the same roulette count.
          inverse_solver: ``"fixed_point"`` or ``"anderson"``.
          inverse_atol, inverse_rtol: inverse tolerance (default 1e-5 each).
          inverse_max_iter: budget of g evaluations for the inverse (default 100).
          inverse_on_failure: ``"raise"`` or ``"warn"`` when the inverse does not converge.
          anderson_memory: iterates combined by Anderson acceleration.
          validate_args: check inputs are finite and of the right rank.
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
        if inverse_solver not in fixed_point.SOLVERS:
            raise ValueError(
                f"inverse_solver must be one of {fixed_point.SOLVERS}, got {inverse_solver!r}."
            )
        if inverse_on_failure not in fixed_point.ON_FAILURE:
            raise ValueError(
                f"inverse_on_failure must be one of {fixed_point.ON_FAILURE}, "
                f"got {inverse_on_failure!r}."
            )
        if not (inverse_atol >= 0 and inverse_rtol >= 0 and inverse_atol + inverse_rtol > 0):
            raise ValueError(
                f"inverse_atol and inverse_rtol must be >= 0 and not both 0, got "
                f"{inverse_atol}, {inverse_rtol}."
            )
        if not isinstance(inverse_max_iter, int) or inverse_max_iter < 1:
            raise ValueError(f"inverse_max_iter must be an integer >= 1, got {inverse_max_iter!r}.")
        self._config = LogDetConfig(
            method=logdet, n_terms=n_terms, n_samples=n_samples, probe=probe,
            n_exact_terms=n_exact_terms, roulette=roulette, roulette_param=roulette_param,
            max_roulette_terms=max_roulette_terms, neumann_gradient=neumann_gradient,
        )
        self._residual_fn = residual_fn
        self._recompute = bool(recompute)
        self._event_ndims = event_ndims
        self._training = bool(training)
        self._seed = seed
        self._inverse_solver = inverse_solver
        self._inverse_atol = inverse_atol
        self._inverse_rtol = inverse_rtol
        self._inverse_max_iter = inverse_max_iter
        self._inverse_on_failure = inverse_on_failure
        self._anderson_memory = anderson_memory
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

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    # -- helpers ---------------------------------------------------------------------------

    def _g(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        gx = self._residual_fn(x, training=training)
        if gx.shape.rank is not None and x.shape.rank is not None:
            if not gx.shape.is_compatible_with(x.shape):
                raise ValueError(
                    f"residual_fn must preserve the shape of its input: got {gx.shape} for input "
                    f"{x.shape} in {self.name}."
                )
        return gx

    def _flatten_batch(self, x: tf.Tensor):
        """Reshapes ``[*batch, *event]`` to ``[prod(batch), *event]`` for the Keras branch."""
        x = tf.convert_to_tensor(x)
        rank = x.shape.rank
        if rank is not None and rank < self._event_ndims:
            raise ValueError(
                f"{self.name} expects events of rank {self._event_ndims} "
                f"({'[D]' if self._event_ndims == 1 else '[H, W, C]'}) with optional leading "
                f"batch dimensions; got a tensor of shape {x.shape}."
            )
        shape = tf.shape(x)
        event_shape = shape[tf.rank(x) - self._event_ndims:]
        batch_shape = shape[: tf.rank(x) - self._event_ndims]
        static_event = x.shape[-self._event_ndims:]
        flat = tf.reshape(x, tf.concat([[-1], event_shape], axis=0))
        flat.set_shape(tf.TensorShape([None]).concatenate(static_event))
        if self.validate_args:
            flat = tf.debugging.assert_all_finite(
                flat, f"{self.name}: input contains NaN or Inf; inputs must be finite."
            )
        return flat, batch_shape

    def _unflatten(self, t: tf.Tensor, batch_shape, event: bool):
        if event:
            return tf.reshape(t, tf.concat([batch_shape, tf.shape(t)[1:]], axis=0))
        return tf.reshape(t, batch_shape)

    # -- bijector methods --------------------------------------------------------------------

    def _augmented_forward(self, x):
        flat, batch_shape = self._flatten_batch(x)
        if not self._recompute:
            gx, ldj = residual_and_logdet(
                lambda t: self._g(t, self._training), flat, self._config, seed=self._seed
            )
        else:
            # One seed for both passes (a None seed would draw anew when recomputing), and no
            # second power iteration: the recomputation reads the u, v the forward stored.
            seed = as_stateless_seed(self._seed)

            def residual(training):
                def fn(t):
                    gx, ldj = residual_and_logdet(
                        lambda s: self._g(s, training), t, self._config, seed=seed)
                    return gx if ldj is None else (gx, ldj)
                return fn

            out = recompute_gradient(residual(self._training), residual(False))(flat)
            gx, ldj = (out, None) if self._config.method == "none" else out
        y = self._unflatten(flat + gx, batch_shape, event=True)
        if ldj is None:
            return y, {}
        ldj = self._unflatten(ldj, batch_shape, event=False)
        return y, {"fldj": ldj, "ildj": -ldj}

    def _augmented_inverse(self, y):
        flat, batch_shape = self._flatten_batch(y)
        flat = tf.stop_gradient(flat)
        result = fixed_point.solve_fixed_point(
            lambda t: self._g(t, False), flat,
            atol=self._inverse_atol, rtol=self._inverse_rtol, max_iter=self._inverse_max_iter,
            method=self._inverse_solver, anderson_memory=self._anderson_memory,
        )
        x = fixed_point.check_converged(
            result, max_iter=self._inverse_max_iter, atol=self._inverse_atol,
            rtol=self._inverse_rtol, on_failure=self._inverse_on_failure,
            what=f"{self.name} fixed-point inverse",
        )
        return self._unflatten(tf.stop_gradient(x), batch_shape, event=True), {}

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
