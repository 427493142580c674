"""Guarded steps: compute, check, commit (the `guard` of `splitkeras.engine.SegmentRunner`).

Every guarded step is computed, checked and only then committed: the variables it may
change (`GuardedVariables`) are read into a snapshot just before the update, in the same
call, and put back when the new state or what the step computed breaks a rule of the
`UpdateGuard`. `GuardedSteps` holds these parts of the runner; the runner is its only user.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from splitkeras.errors import UpdateRefused
from splitkeras.guard import Measured, UpdateGuard
from splitkeras.guarded_variables import GuardedVariables

__all__ = ["GuardedSteps"]


class GuardedSteps:
    """The guarded parts of `SegmentRunner` (a mixin: it reads the runner's state)."""

    if TYPE_CHECKING:  # what the runner provides
        model: Any
        optimizer: Any
        input_names: list[str]
        output_names: list[str]
        _guarded: dict[str, GuardedVariables]
        _tf_variables: list[Any]
        _pending: dict[Any, Any]

        def _inputs(self, values: Sequence[Any]) -> list[tf.Tensor]: ...

        def _run_forward(self, xs: list[tf.Tensor]) -> Any: ...

        def _apply_impl(self, grads: list[Any], scale: tf.Tensor | None = None) -> None: ...

        def _train_impl(self, xs: list[tf.Tensor], y: Any, sample_weight: Any,
                        other_losses: tf.Tensor) -> Any: ...

    def _guarded_apply_impl(self, grads: list[tf.Tensor], scale: tf.Tensor | None = None) -> Any:
        state = self._variables("update")
        saved = state.snapshot_ops()
        self._apply_impl(grads, scale)
        return saved, *state.check_ops()

    def _guarded_train_impl(self, xs: list[tf.Tensor], y: Any, sample_weight: Any,
                            other_losses: tf.Tensor) -> Any:
        state = self._variables("train")
        saved = state.snapshot_ops()
        grads, logs, y_pred = self._train_impl(xs, y, sample_weight, other_losses)
        return grads, logs, y_pred, saved, *state.check_ops()

    def _variables(self, kind: str) -> GuardedVariables:
        """What a guarded step changes: a forward the non-trainable variables (moving
        statistics, seed states), an update the weights and the optimizer's variables, a
        label step all of them."""
        found = self._guarded.get(kind)
        if found is None:
            model_vars = [v.value for v in self.model.variables]
            trainable = set(id(v) for v in self._tf_variables)
            optimizer_vars = [v.value for v in self.optimizer.variables]
            if kind == "forward":
                variables = [v for v in model_vars if id(v) not in trainable]
            elif kind == "update":
                variables = self._tf_variables + optimizer_vars
            else:
                variables = model_vars + [v for v in optimizer_vars if id(v) not in set(map(id, model_vars))]
            bounded = [] if kind == "forward" else self._tf_variables
            found = self._guarded[kind] = GuardedVariables(variables, bounded)
        return found

    def _guarded_forward(self, guard: UpdateGuard, step: Any, inputs: Sequence[Any]) -> list[tf.Tensor]:
        xs = self._inputs(inputs)
        measured = guard.measure_all("input", self.input_names, xs)
        state = self._variables("forward")
        saved = state.read()
        pending = self._run_forward(xs)
        try:
            measured += guard.measure_all("output", self.output_names, pending.outputs)
            measured += guard.measure_all("regularization", ["regularization"], [pending.regularization])
            state.check(guard)
        except UpdateRefused:
            state.restore(saved)  # the moving statistics and seed states of before
            raise
        self._pending[step] = pending
        guard.accept(measured)
        return list(pending.outputs)

    def _commit_or_roll_back(self, guard: UpdateGuard, kind: str, saved: Sequence[Any], finite: Any,
                             biggest: Any, measure: Any = None) -> list[Measured]:
        """After an update that returned its snapshot and check: `measure()` checks what it
        computed; if that or the new state breaks a rule, the snapshot is put back."""
        state = self._variables(kind)
        try:
            measured: list[Measured] = measure() if measure is not None else []
            guard.bound_weight(float(biggest), bool(finite))
        except UpdateRefused:
            state.restore(saved)
            raise
        return measured
