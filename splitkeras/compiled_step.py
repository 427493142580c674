"""A segment's forward and backward as two compiled calls, with no eager tape between them.

When an eager `tf.GradientTape` watches a `tf.function` call, TensorFlow runs a *forward
function* (the function's outputs followed by the intermediates its gradient needs) and
records a *backward function* (output gradients and those intermediates in, input
gradients out); `tape.gradient` later walks the tape and calls it. `ForwardBackward` holds
that very pair and calls it directly: `forward` runs the forward function once and keeps
its flat outputs (the residuals), `backward_ops` traces the backward function into the
caller's `tf.function`, so that the VJP and the optimizer's update run as ONE call. The
functions are TensorFlow's own, built from the same graph, so the arithmetic is the
tape's to the last bit (`tests/test_compiled_step.py`).

The pair is reached through private TensorFlow APIs (`ConcreteFunction.
_select_forward_and_backward_functions`, `_TapeGradientFunctions._wrap_backward_function`,
TF 2.21). `forward_backward_pair` is the only place that touches them: it returns None
when they are not there or do not behave as expected, and the runner then keeps the
eager-tape path (`splitkeras.engine.SegmentRunner`), with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

__all__ = ["ForwardBackward", "forward_backward_pair"]


class ForwardBackward:
    """TensorFlow's first-order forward/backward pair of one concrete function.

    Args:
        concrete: the concrete function (`tf.function(...).get_concrete_function(...)`).
        call: what `concrete._select_forward_and_backward_functions` returned for a
            first-order eager tape (a `_ForwardBackwardCall`).
        n_inputs: how many of the flat arguments are the caller's (the rest are captures).
    """

    def __init__(self, concrete: Any, call: Any, n_inputs: int) -> None:
        self.concrete = concrete
        self._functions = call._functions  # the _FirstOrderTapeGradientFunctions a tape records
        self._forward, _ = call.forward()
        self.captures = list(concrete.captured_inputs)
        self.n_inputs = n_inputs
        structure = concrete.structured_outputs
        self._structure = structure
        self.n_outputs = len(tf.nest.flatten(structure, expand_composites=True))
        self._position = {id(c): n_inputs + i for i, c in enumerate(self.captures)}

    def forward(self, flat_inputs: Sequence[tf.Tensor]) -> tuple[Any, list[tf.Tensor]]:
        """Run the forward function: (the structured outputs, every flat output to keep)."""
        flat = list(self._forward.call_flat(*flat_inputs, *self.captures))
        return tf.nest.pack_sequence_as(self._structure, flat[: self.n_outputs],
                                        expand_composites=True), flat

    def position_of(self, variable: tf.Variable) -> int | None:
        """Where the gradient of `variable` is among `backward_ops`' results (None: unread)."""
        return self._position.get(id(variable.handle))

    def backward_ops(self, output_gradients: Sequence[Any], residuals: Sequence[tf.Tensor]
                     ) -> list[Any]:
        """The backward function on the output gradients (one per output; None counts as 0,
        as on a tape) and the forward's residuals: one gradient per flat argument (the
        caller's inputs, then the captures), None where there is none. Traceable."""
        functions = self._functions
        wrapper, _ = functions._wrap_backward_function(functions._forward_graph, functions._backward,
                                                       list(residuals))
        return list(wrapper(*output_gradients))


def forward_backward_pair(function: Any, inputs: Sequence[tf.Tensor]) -> ForwardBackward | None:
    """The forward/backward pair a first-order eager tape would record for `function(inputs)`
    (a `tf.function` taking one list of tensors), or None (with a warning) when this
    TensorFlow does not offer it as TF 2.21 does."""
    try:
        from tensorflow.python.ops import gradients_util

        concrete = function.get_concrete_function(list(inputs))
        flat = list(inputs) + list(concrete.captured_inputs)
        call = concrete._select_forward_and_backward_functions(
            flat, gradients_util.POSSIBLE_GRADIENT_TYPES_FIRST_ORDER, True)
        pair = ForwardBackward(concrete, call, len(inputs))
        if not callable(getattr(pair._functions, "_wrap_backward_function", None)) \
                or pair._functions._backward is None:
            raise AttributeError("the first-order tape functions have no backward function")
        return pair
    except (AttributeError, TypeError, ImportError) as error:
        warnings.warn(
            f"splitkeras: this TensorFlow ({tf.__version__}) does not expose the forward/backward "
            f"function pair of a tf.function as TF 2.21 does ({type(error).__name__}: {error}); "
            "segment steps fall back to an eager GradientTape (same results, slower).",
            RuntimeWarning, stacklevel=2)
        return None


class CompiledSteps:
    """The compiled forward and backward of one `SegmentRunner`, per input signature.

    `forward(xs)` runs TF's forward function (one call) and returns the outputs, the
    regularization and what `backward` needs; `backward(...)` runs the backward function
    and the optimizer's update as ONE `tf.function` call (with a guard: between the
    snapshot and the check of the variables it changes, as the eager-tape path does).
    `available` turns False (for good) when this TensorFlow has no pair to offer.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.available = True
        self._by_signature: dict[tuple[Any, ...], tuple[ForwardBackward, Any, Any]] = {}

    def _entry(self, xs: Sequence[tf.Tensor]) -> tuple[ForwardBackward, Any, Any] | None:
        key = tuple((tuple(x.shape), x.dtype) for x in xs)
        entry = self._by_signature.get(key)
        if entry is None:
            pair = forward_backward_pair(self.runner._forward_fn, xs)
            if pair is None:
                self.available = False
                return None
            options = dict(jit_compile=self.runner.jit_compile)
            entry = self._by_signature[key] = (
                pair,
                tf.function(lambda *a: self._backward_ops(pair, *a), **options),
                tf.function(lambda *a: self._guarded_backward_ops(pair, *a), **options))
        return entry

    def forward(self, xs: list[tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor, Any] | None:
        """(outputs, regularization, what `backward` takes), or None: use the eager tape."""
        entry = self._entry(xs)
        if entry is None:
            return None
        (outputs, regularization), residuals = entry[0].forward(xs)
        return list(outputs), regularization, (entry, residuals)

    def backward(self, kept: Any, seeds: list[tf.Tensor], scale: tf.Tensor | None, measured: list[Any]
                 ) -> list[tf.Tensor | None]:
        """VJP and update in one call, from `forward`'s `kept`; returns the input gradients.
        With a guard (`measured`: what it has measured of this step so far), the input
        gradients are checked after the call and a refusal puts the snapshot back, as the
        check of the new variables does."""
        (_, backward, guarded_backward), residuals = kept
        runner, guard = self.runner, self.runner.guard
        scaled = scale is not None
        scale = tf.ones((), tf.float64) if scale is None else scale
        if guard is None or not runner.trainable:
            input_gradients = list(backward(seeds, residuals, scale, scaled))
            if guard is not None:
                measured += guard.measure_all("input_grad", runner.input_names, input_gradients)
                guard.accept(measured)
            return input_gradients
        found, saved, finite, biggest = guarded_backward(seeds, residuals, scale, scaled)
        input_gradients = list(found)
        measured += runner._commit_or_roll_back(
            guard, "update", saved, finite, biggest,
            lambda: guard.measure_all("input_grad", runner.input_names, input_gradients))
        guard.accept(measured)
        return input_gradients

    def _backward_ops(self, pair: ForwardBackward, seeds: list[tf.Tensor], residuals: list[tf.Tensor],
                      scale: tf.Tensor, scaled: bool) -> list[Any]:
        runner = self.runner
        grads = pair.backward_ops(seeds, residuals)
        if runner.trainable:
            positions = [pair.position_of(v) for v in runner._tf_variables]
            runner._apply_impl([None if p is None else grads[p] for p in positions],
                               scale if scaled else None)
        return [grads[i] if need else None for i, need in enumerate(runner.input_gradients)]

    def _guarded_backward_ops(self, pair: ForwardBackward, seeds: list[tf.Tensor], residuals: list[tf.Tensor],
                              scale: tf.Tensor, scaled: bool) -> Any:
        state = self.runner._variables("update")
        saved = state.snapshot_ops()
        input_grads = self._backward_ops(pair, seeds, residuals, scale, scaled)
        return input_grads, saved, *state.check_ops()
