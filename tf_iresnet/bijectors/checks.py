"""Input checks shared by the bijectors: dtype, rank, event shape and (``validate_args``)
finiteness, with messages that name the bijector and say what it accepts."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = ["InputCheck", "check_input", "check_static_event_shape", "static_or_assert"]


def check_input(bijector: tfb.Bijector, x, *, dtype: tf.dtypes.DType | str | None = None,
                event_ndims: int | None = None, event_shape=None,
                what: str = "input") -> tf.Tensor:
    """Returns ``x`` as a tensor after checking it against what ``bijector`` accepts.

    Args:
      bijector: the bijector whose input this is (its ``name`` and ``validate_args`` are used).
      x: the input, ``[*batch, *event]``.
      dtype: the floating dtype required (that of the bijector's weights); ``None``: any.
      event_ndims: minimum rank (the event rank); ``None``: no rank check.
      event_shape: the static event shape required (entries ``None`` match anything).
      what: how the message calls ``x``.

    Raises:
      TypeError: ``x`` has another dtype than ``dtype``.
      ValueError: the rank or a static event dimension does not fit.

    With ``bijector.validate_args`` the result carries a run-time check that every value is
    finite (NaN or Inf raise ``InvalidArgumentError`` naming the bijector).
    """
    if dtype is not None:
        dtype = tf.as_dtype(dtype)
        if isinstance(x, tf.Tensor | tf.Variable) and x.dtype.base_dtype != dtype:
            raise TypeError(
                f"{bijector.name}: {what} has dtype {x.dtype.name}, but this bijector computes "
                f"in {dtype.name} (the dtype of the model weights); cast the {what} with "
                f"tf.cast(x, {dtype.name!r}).")
        x = tf.convert_to_tensor(x, dtype_hint=dtype)
        if x.dtype != dtype:
            raise TypeError(f"{bijector.name}: {what} has dtype {x.dtype.name}, expected "
                            f"{dtype.name}.")
    else:
        x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    if event_ndims is not None and rank is not None and rank < event_ndims:
        raise ValueError(f"{bijector.name} expects events of rank {event_ndims} with optional "
                         f"leading batch dimensions; got a {what} of shape {x.shape}.")
    if event_shape is not None and rank is not None:
        expected = tf.TensorShape(event_shape)
        if rank < expected.rank or not x.shape[rank - expected.rank:].is_compatible_with(
                expected):
            raise ValueError(f"{bijector.name} expects events of shape {expected} (with "
                             f"optional leading batch dimensions); got a {what} of shape "
                             f"{x.shape}.")
    if bijector.validate_args:
        x = tf.debugging.assert_all_finite(
            x, f"{bijector.name}: {what} contains NaN or Inf; inputs must be finite "
               "(validate_args=True).")
    return x


def check_static_event_shape(bijector: tfb.Bijector, shape: tf.TensorShape, ok: bool,
                             expected: str, direction: str) -> None:
    """Raises the ``ValueError`` of a ``*_event_shape`` call on a shape the bijector cannot take."""
    if not ok:
        raise ValueError(f"{bijector.name}.{direction}_event_shape: cannot take shape {shape}; "
                         f"expected {expected}.")


def static_or_assert(bijector: tfb.Bijector, shape_tensor: tf.Tensor, static_ok, tensor_ok,
                     expected: str, direction: str) -> list:
    """For a ``*_event_shape_tensor`` call: raise now if ``shape_tensor`` is known statically
    and ``static_ok(TensorShape)`` is False, else (with ``validate_args``) the run-time
    assertions ``tensor_ok(shape_tensor)`` (a boolean tensor) to add as control dependencies."""
    static = tf.get_static_value(shape_tensor)
    if static is not None:
        shape = tf.TensorShape([int(d) for d in static])
        check_static_event_shape(bijector, shape, bool(static_ok(shape)), expected, direction)
        return []
    if not bijector.validate_args:
        return []
    return [tf.debugging.Assert(tensor_ok(shape_tensor), [
        f"{bijector.name}.{direction}_event_shape_tensor: cannot take shape", shape_tensor,
        f"expected {expected}."])]


class InputCheck(tfb.Bijector):
    """The identity, checking its inputs: dtype always, finiteness with ``validate_args``.

    Put at both ends of a chain of TFP bijectors (e.g. the preprocessing), so that a wrong
    input, in either direction, gets a message naming the model's dtype instead of a
    conversion or kernel error deep inside.

    Args:
      dtype: the required dtype (``None``: any).
      validate_args: check that inputs are finite.
      name: the bijector's name.
    """

    def __init__(self, dtype=tf.float32, validate_args: bool = False, name: str = "input_check"):
        parameters = dict(locals())
        self._required = None if dtype is None else tf.as_dtype(dtype)
        with tf.name_scope(name) as name:
            super().__init__(forward_min_event_ndims=0, is_constant_jacobian=True,
                             validate_args=validate_args, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    # "Any dtype" to TFP in both directions, so that a chain with this check at its ends does
    # not convert its input (failing with a message that names no bijector) before it runs.
    def _inverse_dtype(self, y_dtype, **kwargs):
        del y_dtype, kwargs
        return None

    def _forward_dtype(self, x_dtype, **kwargs):
        del x_dtype, kwargs
        return None

    def _forward(self, x):
        return check_input(self, x, dtype=self._required)

    def _inverse(self, y):
        return check_input(self, y, dtype=self._required)

    def _forward_log_det_jacobian(self, x):
        return tf.zeros([], x.dtype)
