"""A `tf.function` called without its per-call dispatch, once its concrete function is known.

Each eager call of a `tf.function` binds its arguments to the function's signature, computes
their trace type and looks it up in the function's cache (`tracing_compilation.
trace_function`), binds them again for the concrete function found and flattens them: about
1-2 ms of Python per call on a shared CPU, as much as the small segments' kernels take.
`FlatCall` wraps the `tf.function` and, per input signature (the shapes and dtypes of the
tensors, the values of everything else, the nesting), keeps the concrete function that the
dispatch chose and calls it with the flat tensors (`ConcreteFunction._call_flat`, the very
call the dispatch ends in), so the graph run and its results are the same to the last bit.

- The first call of a signature goes through the `tf.function` as usual (it traces, creates
  variables on a first call, retraces with a relaxed shape for a new batch size under
  `reduce_retracing`); only then is its concrete function looked up (in the cache, no new
  trace) and kept, after checking that its flat inputs are the tensors `FlatCall` picks out.
- Arguments it cannot key (NumPy arrays, objects), calls in a graph (inside a caller's
  `tf.function`) and a TensorFlow without these private APIs (TF 2.21) go through the
  `tf.function` every time: the same results, without the saving.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["FlatCall"]

_SCALARS = (bool, int, float, str, bytes, type(None))


class _Unkeyed(Exception):
    """An argument that `FlatCall` does not key: the call goes through the `tf.function`."""


def _walk(value: Any, flat: list[tf.Tensor]) -> Any:
    """The signature key of `value`, appending its tensors to `flat` in `tf.nest` order."""
    if isinstance(value, tf.Tensor):
        flat.append(value)
        return (tuple(value.shape), value.dtype)
    if isinstance(value, _SCALARS):
        return (type(value), value)
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_walk(item, flat) for item in value))
    if type(value) is dict:
        keys = sorted(value)  # tf.nest flattens a dict in sorted key order
        return (dict, tuple(keys), tuple(_walk(value[key], flat) for key in keys))
    raise _Unkeyed


def _key(args: tuple[Any, ...]) -> tuple[Any, list[tf.Tensor]]:
    flat: list[tf.Tensor] = []
    return tuple(_walk(arg, flat) for arg in args), flat


class FlatCall:
    """`function(*args)` (a `tf.function`), with the concrete function kept per signature.

    Example:
        >>> step = FlatCall(tf.function(lambda x, scale: x * scale))
        >>> step(tf.ones([2]), 3.0)  # traced and dispatched as usual; its concrete function kept
        >>> step(tf.zeros([2]), 3.0)  # the kept concrete function, called with [x]
    """

    def __init__(self, function: Any) -> None:
        self.function = function
        self._concrete: dict[Any, Any] = {}  # signature -> concrete function (None: dispatch)

    def __call__(self, *args: Any) -> Any:
        if not tf.executing_eagerly():
            return self.function(*args)
        try:
            key, flat = _key(args)
        except _Unkeyed:
            return self.function(*args)
        concrete = self._concrete.get(key, False)
        if concrete is False:
            result = self.function(*args)
            self._concrete[key] = self._look_up(args, flat)
            return result
        if concrete is None:
            return self.function(*args)
        return concrete._call_flat(flat, concrete.captured_inputs)

    def _look_up(self, args: tuple[Any, ...], flat: list[tf.Tensor]) -> Any:
        """The concrete function the dispatch calls for `args` (None: keep dispatching)."""
        try:
            from tensorflow.python.eager.polymorphic_function import (
                function_type_utils,
                tracing_compilation,
            )

            function = self.function
            bound = function_type_utils.canonicalize_function_inputs(
                args, {}, function._function_type, function._default_values, function._is_pure)
            config = function._no_variable_creation_config if function._created_variables \
                else function._variable_creation_config
            if config is None:
                return None
            concrete = tracing_compilation.trace_function(bound.args, bound.kwargs, config)
            expected = concrete.function_type.unpack_inputs(
                concrete.function_type.bind(*bound.args, **bound.kwargs))
            if len(expected) != len(flat) or any(a is not b for a, b in zip(expected, flat)):
                return None
            if not callable(getattr(concrete, "_call_flat", None)):
                return None
            return concrete
        except (AttributeError, TypeError, ImportError):
            return None
