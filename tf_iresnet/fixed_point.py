"""Fixed-point solvers for inverting a contractive residual map.

The inverse of ``y = x + g(x)`` with ``Lip(g) < 1`` is the unique fixed point of
``F(x) = y - g(x)`` (Banach). Two solvers are offered:

* ``"fixed_point"``: Picard iteration ``x_{k+1} = F(x_k)`` from ``x_0 = y``; the error shrinks
  like ``Lip(g)^k``.
* ``"anderson"``: type-II Anderson acceleration (Walker & Ni, 2011): the next iterate is the
  affine combination of the last ``m`` values of ``F`` whose residuals ``F(x_i) - x_i``
  combine to the smallest norm, solved per example. It reaches the same tolerance with fewer
  evaluations of ``g`` whenever ``Lip(g)`` is close to 1.

Both stop as soon as every element of the batch satisfies
``|F(x_k) - x_k| <= atol + rtol * |F(x_k)|`` and return ``F(x_k)``; ``iterations`` counts the
evaluations of ``g``. Both are ``tf.while_loop``s, so they run eagerly, inside ``tf.function``
and under XLA.

A solve that misses its tolerance is never returned silently (`check_converged`): eagerly it
raises `InverseNotConvergedError`; in a graph the examples that missed it come back as NaN,
and a run-time assertion fires too where assertions run (plain graphs; XLA drops assertions,
so there the NaN, and ``FixedPointResult.converged``, are the signal). This is what TFP's
``ScalarFunctionWithInferredInverse(require_convergence=True)`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterator

import tensorflow as tf

SOLVERS = ("fixed_point", "anderson")
ON_FAILURE = ("raise", "warn")

# Anderson's least-squares systems get this relative Tikhonov term (times the largest squared
# residual norm in the history) to stay regular when the residuals become nearly collinear.
# The mixing parameter is 1: the next iterate combines the F values only (Walker & Ni's beta).
_ANDERSON_RIDGE = 1e-8


@dataclasses.dataclass(frozen=True)
class InverseConfig:
    """Settings of the fixed-point inverse of a residual block.

    Attributes:
      solver: ``"fixed_point"`` (Picard iteration) or ``"anderson"`` (Anderson acceleration).
      atol, rtol: elementwise stopping tolerance ``|F(x) - x| <= atol + rtol |F(x)|``, both
        >= 0 and not both 0.
      max_iter: budget of evaluations of g (integer >= 1).
      on_failure: ``"raise"`` or ``"warn"`` when the solve misses the tolerance within budget.
      anderson_memory: past iterates combined by ``"anderson"`` (integer >= 1).
    """

    solver: str = "fixed_point"
    atol: float = 1e-5
    rtol: float = 1e-5
    max_iter: int = 100
    on_failure: str = "raise"
    anderson_memory: int = 5

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"InverseConfig.solver must be one of {SOLVERS}, got {self.solver!r}.")
        if self.on_failure not in ON_FAILURE:
            raise ValueError(
                f"InverseConfig.on_failure must be one of {ON_FAILURE}, got {self.on_failure!r}."
            )
        if not (self.atol >= 0 and self.rtol >= 0 and self.atol + self.rtol > 0):
            raise ValueError(
                f"InverseConfig.atol and rtol must be >= 0 and not both 0, got "
                f"atol={self.atol}, rtol={self.rtol}."
            )
        for field in ("max_iter", "anderson_memory"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InverseConfig.{field} must be an integer >= 1, got {value!r}.")


class InverseNotConvergedError(RuntimeError):
    """Raised (eagerly) when a fixed-point inverse misses its tolerance within its budget."""


@dataclasses.dataclass
class FixedPointResult:
    """Outcome of a solve.

    Attributes:
      x: the solution, same shape as ``y``.
      iterations: int32 scalar, evaluations of ``g`` used.
      residual: float scalar, ``max |F(x) - x|`` at the last iterate (the step that produced x).
      converged: bool scalar, whether the tolerance was met (by every example).
      example_converged: bool ``[B]``, whether each example met the tolerance.
    """

    x: tf.Tensor
    iterations: tf.Tensor
    residual: tf.Tensor
    converged: tf.Tensor
    example_converged: tf.Tensor | None = None


_COLLECTORS = threading.local()


@contextlib.contextmanager
def collect_inverse_stats() -> Iterator[list[FixedPointResult]]:
    """Collects the ``FixedPointResult`` of every solve run inside the ``with`` block.

    Works eagerly and while tracing a ``tf.function`` (the collected tensors then belong to
    that graph: return them from the function). Used to log inverse iterations and residuals
    of a whole flow without changing the bijector API::

        with collect_inverse_stats() as stats:
            x = flow.inverse(z)
        max_iterations = tf.reduce_max([s.iterations for s in stats])
    """
    stack = getattr(_COLLECTORS, "stack", None)
    if stack is None:
        stack = _COLLECTORS.stack = []
    collected: list[FixedPointResult] = []
    stack.append(collected)
    try:
        yield collected
    finally:
        stack.pop()


def _converged(x: tf.Tensor, fx: tf.Tensor, atol: float, rtol: float) -> tf.Tensor:
    return tf.reduce_all(tf.abs(fx - x) <= atol + rtol * tf.abs(fx))


def _example_converged(x: tf.Tensor, fx: tf.Tensor, atol: float, rtol: float) -> tf.Tensor:
    """``[B]`` bool: every element of the example meets ``|F(x) - x| <= atol + rtol |F(x)|``.

    NaN compares false, so a diverged example counts as unconverged."""
    ok = tf.abs(fx - x) <= atol + rtol * tf.abs(fx)
    return tf.reduce_all(tf.reshape(ok, [tf.shape(x)[0], -1]), axis=1)


def _picard(fn, y, atol, rtol, max_iter):
    def cond(k, x, fx, done):
        del x, fx
        return tf.logical_and(k < max_iter, tf.logical_not(done))

    def body(k, x, fx, done):
        del x, done
        x_new = fx
        f_new = fn(x_new)
        return k + 1, x_new, f_new, _converged(x_new, f_new, atol, rtol)

    f0 = fn(y)
    k, x, fx, _ = tf.while_loop(
        cond, body, (tf.constant(1), y, f0, _converged(y, f0, atol, rtol))
    )
    return fx, k, tf.reduce_max(tf.abs(fx - x)), _example_converged(x, fx, atol, rtol)


def _anderson(fn, y, atol, rtol, max_iter, memory):
    batch = tf.shape(y)[0]
    flat = lambda t: tf.reshape(t, [batch, -1])  # noqa: E731
    shape = tf.shape(y)
    dim = tf.shape(flat(y))[1]
    xs = tf.zeros([batch, memory, dim], y.dtype)
    fs = tf.zeros([batch, memory, dim], y.dtype)
    f0 = fn(y)
    xs = tf.tensor_scatter_nd_update(xs, _slot(batch, 0), flat(y))
    fs = tf.tensor_scatter_nd_update(fs, _slot(batch, 0), flat(f0))

    def cond(k, x, fx, xs, fs, done):
        del x, fx, xs, fs
        return tf.logical_and(k < max_iter, tf.logical_not(done))

    def body(k, x, fx, xs, fs, done):
        del x, done
        n_valid = tf.minimum(k, memory)
        valid = tf.cast(tf.range(memory) < n_valid, y.dtype)  # [m]
        g = fs - xs  # residuals, [B, m, D]
        gram = tf.linalg.matmul(g, g, transpose_b=True)  # [B, m, m]
        scale = tf.reduce_max(tf.linalg.diag_part(gram), axis=-1, keepdims=True)[..., None]
        mask2 = valid[:, None] * valid[None, :]
        eye = tf.eye(memory, dtype=y.dtype)
        # Invalid slots get a unit diagonal and a zero right-hand side, so their weight is 0.
        h = gram * mask2 + _ANDERSON_RIDGE * (scale + 1e-30) * eye * valid + eye * (1.0 - valid)
        rhs = tf.broadcast_to(valid[None, :, None], [batch, memory, 1])
        alpha = tf.linalg.solve(h, rhs)[..., 0]
        alpha = alpha / tf.reduce_sum(alpha, axis=-1, keepdims=True)
        mix_f = tf.einsum("bm,bmd->bd", alpha, fs)
        x_new = tf.reshape(mix_f, shape)
        f_new = fn(x_new)
        slot = _slot(batch, k % memory)
        xs = tf.tensor_scatter_nd_update(xs, slot, flat(x_new))
        fs = tf.tensor_scatter_nd_update(fs, slot, flat(f_new))
        return k + 1, x_new, f_new, xs, fs, _converged(x_new, f_new, atol, rtol)

    k, x, fx, _, _, _ = tf.while_loop(
        cond, body, (tf.constant(1), y, f0, xs, fs, _converged(y, f0, atol, rtol))
    )
    return fx, k, tf.reduce_max(tf.abs(fx - x)), _example_converged(x, fx, atol, rtol)


def _slot(batch, index):
    """Scatter indices ``[[b, index] for b in range(batch)]`` for a [B, m, D] history buffer."""
    b = tf.range(batch)
    return tf.stack([b, tf.fill([batch], tf.cast(index, tf.int32))], axis=1)


def solve_fixed_point(
    g: Callable[[tf.Tensor], tf.Tensor],
    y: tf.Tensor,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    max_iter: int = 100,
    method: str = "fixed_point",
    anderson_memory: int = 5,
) -> FixedPointResult:
    """Solves ``x + g(x) = y`` for x by iterating ``x <- y - g(x)`` from ``x = y``.

    Args:
      g: the contractive residual branch, ``[B, ...] -> [B, ...]`` (same shape).
      y: the output to invert, ``[B, ...]``.
      atol, rtol: elementwise stopping tolerance on ``|F(x) - x|``.
      max_iter: budget of evaluations of ``g``.
      method: ``"fixed_point"`` (Picard) or ``"anderson"``.
      anderson_memory: number of past iterates Anderson combines (mixing parameter 1 and a
        relative ridge of 1e-8 on its least-squares systems, see ``_ANDERSON_RIDGE``).

    Returns:
      A ``FixedPointResult``; it does not raise: see ``check_converged``.
    """
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}.")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
    y = tf.convert_to_tensor(y)

    def fn(x):
        return y - g(x)

    if method == "fixed_point":
        x, k, res, ok = _picard(fn, y, atol, rtol, max_iter)
    else:
        if anderson_memory < 1:
            raise ValueError(f"anderson_memory must be >= 1, got {anderson_memory}.")
        x, k, res, ok = _anderson(fn, y, atol, rtol, max_iter, anderson_memory)
    result = FixedPointResult(x=x, iterations=k, residual=res, converged=tf.reduce_all(ok),
                              example_converged=ok)
    for collected in getattr(_COLLECTORS, "stack", ()):
        collected.append(result)
    return result


def check_converged(
    result: FixedPointResult, *, max_iter: int, atol: float, rtol: float, on_failure: str = "raise",
    what: str = "fixed-point inverse",
) -> tf.Tensor:
    """Reports a solve that missed its tolerance and returns ``result.x``.

    ``on_failure="raise"``: eagerly this raises ``InverseNotConvergedError``. In a graph the
    examples that missed the tolerance are returned as NaN (the others unchanged) and an
    assertion with the residual reached fires at run time; under XLA (``jit_compile=True``),
    which drops assertions, the NaN remains, so an unconverged inverse is never a silently
    wrong value. Check ``result.converged`` (or `collect_inverse_stats`) for the flag.

    ``on_failure="warn"``: returns the last iterate unchanged, with a warning (eagerly) or a
    message printed to stderr (graphs; not under XLA, which cannot print).
    """
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}.")
    msg = (
        f"{what} did not converge within max_iter={max_iter} evaluations of g "
        f"(atol={atol:g}, rtol={rtol:g}); residual max|x - (y - g(x))| reached:"
    )
    hint = ("The residual branch may not be contractive (is Lip(g) < 1? run "
            "lipschitz_estimate / converge_spectral_norms), or raise InverseConfig.max_iter.")
    if tf.executing_eagerly():
        if not bool(result.converged):
            text = f"{msg} {float(result.residual):.3g}. {hint}"
            if on_failure == "raise":
                raise InverseNotConvergedError(text)
            warnings.warn(text, RuntimeWarning, stacklevel=3)
        return result.x
    if on_failure == "raise":
        check = tf.debugging.Assert(result.converged, [msg, result.residual, hint], summarize=1)
        with tf.control_dependencies([check]):
            return nan_unconverged(result)

    def _warn():
        tf.print("WARNING:", msg, result.residual, hint, output_stream="file://stderr")
        return tf.constant(True)

    done = tf.cond(result.converged, lambda: tf.constant(True), _warn)
    with tf.control_dependencies([done]):
        return tf.identity(result.x)


def nan_unconverged(result: FixedPointResult) -> tf.Tensor:
    """``result.x`` with every example that missed the tolerance replaced by NaN."""
    x = result.x
    ok = result.example_converged
    if ok is None:
        ok = tf.fill(tf.shape(x)[:1], result.converged)
    mask = tf.reshape(ok, tf.concat([tf.shape(ok), tf.ones([tf.rank(x) - 1], tf.int32)], 0))
    return tf.where(mask, x, tf.constant(float("nan"), x.dtype))
