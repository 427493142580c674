"""`ServerView`: what an honest-but-curious server stage receives, step by step.

It wraps a server stage's runner (inside any defence, right before the wire) and keeps
a copy of every tensor that crosses: the activations of each training step, the
gradients of its outputs (U-shaped), the labels (labels on the server) and the input
gradients it computes and sends back. Float tensors are kept as the server decodes them:
rounded to float16 and back when the session's wire dtype is float16.

Example:
    >>> view = ServerView(runner, wire_dtype="float32")          # doctest: +SKIP
    >>> loop = StepLoop([head, view, tail]); ...                 # doctest: +SKIP
    >>> view.gradients[0][view.output_names[0]].shape            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from splitkeras.privacy.defences.base import RunnerWrapper, is_float

__all__ = ["ServerView"]


class ServerView(RunnerWrapper):
    """Records what `inner` (a server stage's runner) receives and sends.

    Attributes:
        steps: the step of each record, in order.
        activations: per step, the tensors received by name.
        gradients: per step (U-shaped), the gradients of the outputs received, by name.
        labels: per step (labels on the server), the labels received.
        sent_gradients: per step, the input gradients sent back, by name.
    """

    def __init__(self, inner: Any, wire_dtype: str = "float32") -> None:
        super().__init__(inner)
        self.wire_dtype = wire_dtype
        self.steps: list[Any] = []
        self.activations: list[dict[str, np.ndarray]] = []
        self.gradients: list[dict[str, np.ndarray]] = []
        self.labels: list[Any] = []
        self.sent_gradients: list[dict[str, np.ndarray]] = []

    def _wire(self, value: Any) -> np.ndarray:
        array = np.array(value)
        if self.wire_dtype == "float16" and is_float(array):
            return array.astype(np.float16).astype(np.float32)
        return array

    def _named(self, names: Sequence[str], values: Sequence[Any]) -> dict[str, np.ndarray]:
        return {n: self._wire(v) for n, v in zip(names, values) if v is not None}

    def forward(self, step: Any, inputs: Sequence[Any]) -> list[Any]:
        self.steps.append(step)
        self.activations.append(self._named(self.input_names, inputs))
        return list(self.inner.forward(step, inputs))

    def backward(self, step: Any, output_gradients: Sequence[Any]) -> list[Any]:
        self.gradients.append(self._named(self.output_names, output_gradients))
        grads = list(self.inner.backward(step, output_gradients))
        self.sent_gradients.append(self._named(self.input_names, grads))
        return grads

    def train_step(self, step: Any, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[Any], dict[str, Any]]:
        self.steps.append(step)
        self.activations.append(self._named(self.input_names, inputs))
        self.labels.append(np.array(y))
        grads, logs = self.inner.train_step(step, inputs, y, sample_weight, other_losses)
        self.sent_gradients.append(self._named(self.input_names, grads))
        return list(grads), logs

    def stacked(self, records: Sequence[dict[str, np.ndarray]], steps: slice | None = None) -> np.ndarray:
        """Each sample's tensors of `records` (flattened, concatenated), rows of the steps
        in `steps` one after the other: `[samples, features]`."""
        chosen = list(records)[steps] if steps is not None else list(records)
        rows = [np.concatenate([t.reshape(len(t), -1) for t in record.values()], axis=1) for record in chosen]
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), np.float32)
