"""What every defence shares: a runner wrapper around a server stage, the order in which
defences wrap it, and per-sample norms.

A defence acts on what crosses to (or comes back from) one server stage, so it wraps that
stage's runner (the device's `RemoteSegment`, or the server's `SegmentRunner` in the
in-process harness) in a runner with the same step interface
(`splitkeras.steps.Runner`); the device's own segments run unchanged. Inference
(`predict`, `evaluate`) passes through untouched: the defences act on training steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from splitkeras.errors import TrainingError

__all__ = ["Defence", "RunnerWrapper", "apply_defences", "per_sample_norms", "is_float"]


class RunnerWrapper:
    """A runner that hands every call to `inner` (subclasses change some of them)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.input_names: list[str] = list(inner.input_names)
        self.output_names: list[str] = list(inner.output_names)
        self.holds_labels: bool = bool(getattr(inner, "holds_labels", False))

    def forward(self, step: Any, inputs: Sequence[Any]) -> list[Any]:
        return list(self.inner.forward(step, inputs))

    def pending_regularization(self, step: Any) -> Any:
        return self.inner.pending_regularization(step)

    def backward(self, step: Any, output_gradients: Sequence[Any]) -> list[Any]:
        return list(self.inner.backward(step, output_gradients))

    def train_step(self, step: Any, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[Any], dict[str, Any]]:
        grads, logs = self.inner.train_step(step, inputs, y, sample_weight, other_losses)
        return list(grads), logs

    def predict_with_regularization(self, inputs: Sequence[Any]) -> tuple[list[Any], Any]:
        return self.inner.predict_with_regularization(inputs)

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        return self.predict_with_regularization(inputs)[0]

    def has_pending(self, step: Any) -> bool:
        return bool(self.inner.has_pending(step))

    def drop(self, step: Any) -> None:
        self.inner.drop(step)


class Defence:
    """A defence the device turns on: `wrap(runner, mode, model_inputs)` returns the runner
    of a server stage with the defence applied. `outermost` defences (NoPeek) wrap after
    the others, so that they see the activations before any noise."""

    outermost = False
    modes: tuple[str, ...] = ("u_shaped", "labels_on_server")

    def wrap(self, runner: Any, mode: str, model_inputs: Sequence[str]) -> Any:
        raise NotImplementedError

    def check_mode(self, mode: str) -> None:
        if mode not in self.modes:
            raise TrainingError(f"{type(self).__name__} protects {self.protects} and acts only in "
                                f"{' or '.join(self.modes)} splits; this server stage is {mode}. "
                                f"{self.instead}")

    protects = "what the device sends"
    instead = ""


def apply_defences(runners: Sequence[Any], stage_kinds: Sequence[str], modes: Sequence[str],
                   defences: Sequence[Defence], model_inputs: Sequence[str]) -> list[Any]:
    """`runners` with every server stage's runner wrapped by `defences` (given order, the
    `outermost` ones last). `stage_kinds[i]` is `"server"` or `"device"`, `modes[i]` the
    stage's mode. No defences: the same runner objects, untouched."""
    for defence in defences:
        if not isinstance(defence, Defence):
            raise TrainingError(f"defences= takes splitkeras.privacy defences (MaxNorm, GradientNoise, "
                                f"ActivationNoise, NoPeek, RandomizedResponse), got {defence!r}.")
    ordered = [d for d in defences if not d.outermost] + [d for d in defences if d.outermost]
    wrapped = list(runners)
    for index, (kind, mode) in enumerate(zip(stage_kinds, modes)):
        if kind != "server":
            continue
        for defence in ordered:
            defence.check_mode(mode)
            wrapped[index] = defence.wrap(wrapped[index], mode, model_inputs)
    return wrapped


def is_float(value: Any) -> bool:
    return np.asarray(value).dtype.kind == "f"


def per_sample_norms(tensors: Sequence[np.ndarray]) -> np.ndarray:
    """The L2 norm of each sample over all `tensors` (each `[batch, ...]`) together, float64."""
    batch = len(tensors[0])
    squares = np.zeros(batch, np.float64)
    for tensor in tensors:
        squares += np.sum(np.square(np.asarray(tensor, np.float64).reshape(batch, -1)), axis=1)
    return np.sqrt(squares)
