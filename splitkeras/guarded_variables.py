"""The variables a guarded step may change: read into a snapshot, checked against the guard's
bounds after the update, and restored when the update breaks a rule (`splitkeras.engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from splitkeras.guard import UpdateGuard

__all__ = ["GuardedVariables"]


class GuardedVariables:
    """Variables a guarded step may change: read into a snapshot, checked, restored.

    The check: every float variable's sum is finite (NaN or Inf anywhere makes it so; a
    finite sum can only overflow for values far over any bound), and the largest |w| of the
    `bounded` ones (the trainable weights). `snapshot_ops` and `check_ops` trace into the
    caller's `tf.function` (an update reads, applies and checks in ONE call); a few small
    variables (moving statistics, seed states) are read and checked in NumPy instead, which
    costs less than a function call.
    """

    SMALL = 1 << 16  # elements

    def __init__(self, variables: Sequence[Any], bounded: Sequence[Any]) -> None:
        self.variables = list(variables)
        self.floats = [v for v in self.variables if v.dtype.is_floating]
        self.bounded = [v for v in bounded if v.dtype.is_floating and v.shape.num_elements() != 0]
        self.small = sum(int(v.shape.num_elements() or 0) for v in self.variables) <= self.SMALL

        def restore(saved: list[tf.Tensor]) -> None:
            for variable, value in zip(self.variables, saved):
                variable.assign(value)

        self._read = tf.function(self.snapshot_ops)
        self._check = tf.function(self.check_ops)
        self._restore = tf.function(restore)

    def snapshot_ops(self) -> list[tf.Tensor]:
        """The values now (TensorFlow copies a variable's buffer before it updates one that is
        still read, so they stay as they are)."""
        return [v.read_value() for v in self.variables]

    def check_ops(self) -> tuple[tf.Tensor, tf.Tensor]:
        finite = tf.reduce_all(tf.stack([tf.math.is_finite(tf.reduce_sum(v)) for v in self.floats])) \
            if self.floats else tf.constant(True)
        biggest = tf.reduce_max(tf.stack(
            [tf.cast(tf.maximum(tf.reduce_max(v), -tf.reduce_min(v)), tf.float32) for v in self.bounded])) \
            if self.bounded else tf.zeros((), tf.float32)
        return finite, biggest

    def read(self) -> list[Any]:
        if not self.variables:
            return []
        if self.small:
            return [np.array(v.numpy(), copy=True) for v in self.variables]
        return self._read()

    def check(self, guard: UpdateGuard, step_kept: bool = False) -> None:
        if not self.variables:
            return
        if self.small:
            finite = all(np.isfinite(v.numpy()).all() for v in self.floats)
            biggest = max((float(np.max(np.abs(v.numpy()))) for v in self.bounded), default=0.0)
        else:
            finite_t, biggest_t = self._check()
            finite, biggest = bool(finite_t), float(biggest_t)
        guard.bound_weight(biggest, finite, step_kept)

    def restore(self, saved: Sequence[Any]) -> None:
        if self.variables:
            self._restore([tf.convert_to_tensor(value) for value in saved])
