"""Estimators of ``log|det(I + J_g(x))|`` for a contractive residual branch g.

For ``Lip(g) < 1`` the matrix logarithm has the convergent power series

    log det(I + J) = tr log(I + J) = sum_{k>=1} (-1)^(k+1) tr(J^k) / k,

and each trace is estimated with Hutchinson's estimator ``tr(A) = E[v^T A v]`` (``E[v v^T] = I``).
One probe ``v`` is shared by all k: ``w_k = v^T J^k`` is a chain of vector-Jacobian products
(``w_k = vjp(w_{k-1})``), so k terms cost k backward passes through g and one forward pass.

Estimators (all return per-example values, shape ``[B]``):

* ``"exact"``: ``slogdet(I + J)`` from the full Jacobian (``batch_jacobian``); small events only.
* ``"series"``: the series truncated after ``n_terms`` terms (Behrmann et al., 2019); biased.
* ``"unbiased"``: Russian roulette (Chen et al., 2019): ``n_exact_terms`` terms always, plus a
  random number ``N`` of further terms (``Geometric`` or ``Poisson``), term k weighted by
  ``1 / P(N >= k - n_exact_terms)``, which makes the estimator unbiased.

With ``neumann_gradient=True`` the gradient comes from the Neumann series of
``d log det(I + J) = tr((I + J)^-1 dJ) = sum_{k>=0} (-1)^k tr(J^k dJ)``: the vector
``u = sum_k (-1)^k v^T J^k`` is computed outside the gradient (``stop_gradient``), and only one
differentiable product ``(u^T J) v`` is kept, so memory does not grow with the number of terms.
The returned *value* is still the log-det estimate (the surrogate only carries the gradient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf
import tensorflow_probability as tfp

METHODS = ("exact", "series", "unbiased", "none")
PROBES = ("gaussian", "rademacher")
ROULETTES = ("geometric", "poisson")


@dataclasses.dataclass(frozen=True)
class LogDetConfig:
    """Settings of a log-det estimator.

    Attributes:
      method: one of ``METHODS``; ``"none"`` skips the log-det (forward pass only).
      n_terms: terms of the truncated series (``"series"``).
      n_samples: Hutchinson probes per example (averaged).
      probe: ``"gaussian"`` or ``"rademacher"``.
      n_exact_terms: terms always computed by ``"unbiased"``.
      roulette: distribution of the extra term count N for ``"unbiased"``.
      roulette_param: success probability p of ``Geometric(p)`` (N = failures before the first
        success, so ``P(N >= m) = (1 - p)^m``) or rate of ``Poisson``.
      max_roulette_terms: hard cap on N (keeps graphs finite; with the defaults the capped mass
        ``P(N > cap)`` is below 1e-9).
      neumann_gradient: memory-saving gradient (see the module docstring).
    """

    method: str = "series"
    n_terms: int = 5
    n_samples: int = 1
    probe: str = "gaussian"
    n_exact_terms: int = 2
    roulette: str = "geometric"
    roulette_param: float = 0.5
    max_roulette_terms: int = 30
    neumann_gradient: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"logdet must be one of {METHODS}, got {self.method!r}.")
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {self.probe!r}.")
        if self.roulette not in ROULETTES:
            raise ValueError(f"roulette must be one of {ROULETTES}, got {self.roulette!r}.")
        for field, low in (("n_terms", 1), ("n_samples", 1), ("n_exact_terms", 0),
                           ("max_roulette_terms", 1)):
            value = getattr(self, field)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{field} must be an integer >= {low}, got {value!r}.")
        if self.roulette == "geometric" and not 0.0 < self.roulette_param < 1.0:
            raise ValueError(
                f"roulette_param (geometric success probability) must be in (0, 1), "
                f"got {self.roulette_param}."
            )
        if self.roulette == "poisson" and not self.roulette_param > 0.0:
            raise ValueError(f"roulette_param (Poisson rate) must be > 0, got {self.roulette_param}.")

    @property
    def max_terms(self) -> int:
        """Largest number of series terms a single estimate can use."""
        if self.method == "unbiased":
            return self.n_exact_terms + self.max_roulette_terms
        return self.n_terms

    def survival(self, m: tf.Tensor) -> tf.Tensor:
        """``P(N >= m)`` for the roulette's N, m >= 0 (float)."""
        m = tf.cast(m, tf.float32)
        if self.roulette == "geometric":
            return tf.pow(1.0 - self.roulette_param, m)
        rate = tf.constant(self.roulette_param, tf.float32)
        # P(N >= m) = 1 - CDF(m - 1) = regularized lower incomplete gamma P(m, rate) for m >= 1.
        return tf.where(m <= 0.0, 1.0, tf.math.igamma(tf.maximum(m, 1.0), rate))


def _sample_roulette(config: LogDetConfig, seed) -> tf.Tensor:
    """Draws the extra term count N (int32 scalar) from a stateless RNG."""
    if config.roulette == "geometric":
        u = tf.random.stateless_uniform([], seed=seed, minval=1e-12, maxval=1.0, alg="philox")
        n = tf.floor(tf.math.log(u) / tf.math.log1p(-config.roulette_param))
    else:
        n = tf.random.stateless_poisson([], seed=seed, lam=config.roulette_param, dtype=tf.float32)
    return tf.cast(tf.minimum(n, float(config.max_roulette_terms)), tf.int32)


# Random numbers use an explicit algorithm (Philox) rather than a per-device auto-selection.
# A given seed gives the same draws eagerly and in graphs; XLA-compiled code draws another
# (equally valid) stream from the same seed.
def _probe(shape, dtype, distribution: str, seed) -> tf.Tensor:
    if distribution == "gaussian":
        return tf.random.stateless_normal(shape, seed=seed, dtype=dtype, alg="philox")
    bits = tf.random.stateless_uniform(shape, seed=seed, minval=0, maxval=2, dtype=tf.int32,
                                       alg="philox")
    return tf.cast(2 * bits - 1, dtype)


def stateless_seed(seed) -> tf.Tensor:
    """``tfp.random.sanitize_seed``, except that a Python int is a *stateless* seed too.

    TFP reads an int as a stateful seed (``sanitize_seed(3)`` differs on every call), which
    would make ``seed=3`` non-deterministic; here it maps to the stateless seed
    ``[0, seed mod 2^31]``. A shape-[2] int tensor is used as is (cast to int32) and ``None``
    draws a fresh seed from TF's global RNG on every execution, as in TFP.
    """
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed = (0, seed % 2**31)
    elif tf.is_tensor(seed):
        seed = tf.cast(seed, tf.int32)
    return tfp.random.sanitize_seed(seed)


def _event_sum(t: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.reshape(t, [tf.shape(t)[0], -1]), axis=1)


def exact_logdet(tape: tf.GradientTape, gx: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """``log|det(I + dg/dx)|`` per example from the full Jacobian; x, gx: ``[B, ...]``."""
    jac = tape.batch_jacobian(gx, x)
    batch = tf.shape(x)[0]
    dim = tf.reduce_prod(tf.shape(x)[1:])
    jac = tf.reshape(jac, [batch, dim, dim])
    # log|det M| = sum log|R_ii| for M = QR; unlike slogdet, QR compiles under XLA.
    r = tf.linalg.qr(tf.eye(dim, dtype=jac.dtype) + jac, full_matrices=False).r
    return tf.reduce_sum(tf.math.log(tf.abs(tf.linalg.diag_part(r))), axis=-1)


def _exact_residual_and_logdet(g, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(g(x), exact_logdet)``, also for an empty batch.

    ``batch_jacobian`` divides by the batch size, so an empty batch goes through one example of
    zeros whose results are dropped: ``[0, ...]`` inputs give ``[0, ...]`` and ``[0]`` outputs.
    A non-empty batch is computed exactly as without the guard. A static batch size (XLA) needs
    no branch.
    """
    def compute(inputs):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(inputs)
            g_inputs = g(inputs)
        return g_inputs, exact_logdet(tape, g_inputs, inputs)

    batch = x.shape[0]
    if batch is not None and batch > 0:
        return compute(x)
    one = tf.zeros(tf.concat([[1], tf.shape(x)[1:]], 0), x.dtype)
    if batch == 0:
        gx, logdet = compute(one)
        return gx[:0], logdet[:0]
    n = tf.shape(x)[0]
    inputs = tf.cond(n > 0, lambda: x, lambda: one)
    gx, logdet = compute(inputs)
    return gx[:n], logdet[:n]


def residual_and_logdet(
    g: Callable[[tf.Tensor], tf.Tensor],
    x: tf.Tensor,
    config: LogDetConfig,
    seed=None,
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Evaluates ``g(x)`` once and estimates ``log|det(I + J_g(x))|`` from that evaluation.

    Args:
      g: residual branch ``[B, ...] -> [B, ...]``, examples processed independently.
      x: ``[B, ...]`` input.
      config: estimator settings.
      seed: stateless seed (int or shape-[2] int tensor) for probes and the roulette; ``None``
        draws a fresh one from TF's global RNG (different on every call and replica).

    Returns:
      ``(g(x), logdet)`` with logdet of shape ``[B]`` (``None`` for ``method="none"``).
    """
    if config.method == "none":
        return g(x), None
    seed = stateless_seed(seed)
    if config.method == "exact":
        return _exact_residual_and_logdet(g, x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        gx = g(x)

    def vjp(w):
        return tape.gradient(gx, x, output_gradients=w,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)

    roulette_seed, probe_seed = tfp.random.split_seed(seed, 2)
    if config.method == "unbiased":
        n_total = config.n_exact_terms + _sample_roulette(config, roulette_seed)
    else:
        n_total = tf.constant(config.n_terms, tf.int32)
    probe_seeds = tfp.random.split_seed(probe_seed, config.n_samples)

    estimates = []
    for s in range(config.n_samples):
        v = _probe(tf.shape(x), x.dtype, config.probe, probe_seeds[s])
        if config.neumann_gradient:
            estimates.append(_neumann_estimate(vjp, v, n_total, config))
            continue
        w = v
        total = tf.zeros([tf.shape(x)[0]], x.dtype)
        for k in range(1, config.max_terms + 1):
            active = k <= n_total
            if config.method == "unbiased" and k > config.n_exact_terms:
                # Only the first n_total products are evaluated (dynamic count, static graph).
                w = tf.cond(active, lambda w=w: vjp(w), lambda w=w: tf.zeros_like(w))
            else:
                w = vjp(w)
            weight = tf.cast(active, x.dtype) * _term_weight(config, k, x.dtype)
            total += weight * _event_sum(w * v)
        estimates.append(total)
    logdet = tf.add_n(estimates) / config.n_samples
    return gx, logdet


def _signed_reweighting(config: LogDetConfig, k) -> tf.Tensor:
    """``(-1)^(k+1) / P(N >= k - n_exact_terms)`` for term k >= 1 (int or int32 tensor); the
    roulette reweighting is 1 for the always-computed terms and for ``"series"``."""
    k = tf.convert_to_tensor(k, tf.int32)
    w = tf.where(k % 2 == 1, 1.0, -1.0)
    if config.method == "unbiased":
        w = w / config.survival(tf.maximum(k - config.n_exact_terms, 0))  # survival(0) = 1
    return w


def _term_weight(config: LogDetConfig, k, dtype) -> tf.Tensor:
    """Coefficient of ``v^T J^k v`` in the estimate, k >= 1, in ``dtype``."""
    return tf.cast(_signed_reweighting(config, k), dtype) / tf.cast(k, dtype)


def _neumann_estimate(vjp, v: tf.Tensor, n_total: tf.Tensor, config: LogDetConfig) -> tf.Tensor:
    """The log-det estimate of one probe with the Neumann-series gradient.

    The gradient of the estimate in the weights is that of the surrogate ``S = (u^T J) v`` with
    the gradient vector ``u = sum_{k=1}^n s_k w_{k-1}`` held fixed (``w_k = v^T J^k``, ``s_k``
    the sign ``(-1)^(k+1)`` times the roulette reweighting of term k, n = ``n_total``):
    ``d/dtheta (u^T J v) = sum_k s_k v^T J^(k-1) dJ v`` = ``d/dtheta`` of the estimate, since
    ``d tr(J^k) / k = tr(J^(k-1) dJ)`` (Chen et al., 2019).

    The products ``w_1 .. w_(n-1)`` run in a `tf.while_loop` outside the gradient: one loop
    body's buffers serve every term, so memory does not grow with n (an unrolled chain keeps
    one set of ``x``-sized tensors per term), and the graph does not grow either. The last
    product is not computed on its own: ``u^T J = sum_{k=1}^n s_k w_k`` by linearity, so the
    surrogate's value already holds ``s_n <w_n, v>``, and the estimate

        ``sum_{k=1}^n (s_k / k) <w_k, v> = sum_{k<n} s_k (1/k - 1/n) <w_k, v> + S / n``

    needs n vector-Jacobian products per probe in all (the differentiable one included), not
    n + 1: one backward pass through g fewer per block, probe and step.
    """
    dtype = v.dtype
    batch = tf.shape(v)[0]
    n = tf.cast(tf.maximum(n_total, 1), dtype)

    def body(k, w, partial, grad_vec):
        # Entering with w = w_(k-1): term k's contribution to the gradient vector.
        s_k = tf.cast(_signed_reweighting(config, k), dtype)
        grad_vec += s_k * w
        w = tf.stop_gradient(vjp(w))
        partial += (_term_weight(config, k, dtype) - s_k / n) * _event_sum(w * v)
        return k + 1, w, partial, grad_vec

    state = (tf.constant(1), tf.stop_gradient(v), tf.zeros([batch], dtype), tf.zeros_like(v))
    if config.max_terms > 1:
        state = tf.while_loop(lambda k, *_: k < n_total, body, state,
                              maximum_iterations=config.max_terms - 1)
    _, w_last, partial, grad_vec = state
    # Term n's contribution, s_n w_(n-1); none when the roulette leaves no term at all (n = 0).
    s_last = tf.cast(_signed_reweighting(config, tf.maximum(n_total, 1)), dtype)
    s_last *= tf.cast(n_total >= 1, dtype)
    grad_vec = tf.stop_gradient(grad_vec + s_last * w_last)
    surrogate = _event_sum(vjp(grad_vec) * v)
    total = tf.stop_gradient(partial + surrogate / n)
    return total + surrogate - tf.stop_gradient(surrogate)
