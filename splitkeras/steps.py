"""The step semantics of `docs/training.md`, executed once: a loop over runners.

A *runner* is anything with the step interface of `splitkeras.engine.SegmentRunner`:
a local Keras segment, a remote server stage seen through HTTP
(`splitkeras.client.remote.RemoteSegment`), or a chain's next server. `StepLoop`
walks an ordered list of them by the names of the tensors they take and give, so
one loop serves every shape of split and every side:

* the in-process trainer (`Split.fit(..., fused=False)`): every segment local;
* the device (`DeviceClient`): its own segments local, each server stage remote;
* a server in a chain: its own segment local, the rest of the chain remote.

For step *k*: `forward(k, store)` runs the training-mode forward of every runner in
order (each keeps what its backward needs); `backward(k, grads)` applies every
runner's update in reverse, from the gradients of its outputs, and returns the
gradients of the loop's inputs; `train(k, store, y, sample_weight)` is a whole step
when the last runner holds the labels: forwards, the label runner's step, backwards.
Gradients of a tensor that several later runners read are summed.

Example:
    >>> loop = StepLoop([head, remote_middle, tail])          # doctest: +SKIP
    >>> grads, logs = loop.train(0, {"image": x}, y)          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from splitkeras.errors import TrainingError

__all__ = ["Runner", "StepLoop", "accumulate_gradients"]


class Runner(Protocol):
    """The step interface every runner has (see `splitkeras.engine.SegmentRunner`)."""

    input_names: list[str]
    output_names: list[str]
    holds_labels: bool

    def forward(self, step: Any, inputs: Sequence[Any]) -> list[Any]: ...

    def pending_regularization(self, step: Any) -> Any: ...

    def backward(self, step: Any, output_gradients: Sequence[Any]) -> list[Any]: ...

    def train_step(self, step: Any, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[Any], dict[str, Any]]: ...

    def predict_with_regularization(self, inputs: Sequence[Any]) -> tuple[list[Any], Any]: ...

    def drop(self, step: Any) -> None: ...


def accumulate_gradients(grads: dict[str, Any], runner: Any, input_grads: Sequence[Any]) -> None:
    """Add a runner's input gradients into `grads` by tensor name: a tensor read by
    several later runners receives the sum of their gradients."""
    for name, grad in zip(runner.input_names, input_grads):
        if grad is not None:
            grads[name] = grad if grads.get(name) is None else grads[name] + grad


def _add(left: Any, right: Any) -> Any:
    return right if left is None else left + right


class StepLoop:
    """Walks `runners` (in data-flow order) through the steps of `docs/training.md`.

    Args:
        runners: the runners; only the last may hold the labels.
    """

    def __init__(self, runners: Sequence[Any]) -> None:
        self.runners = list(runners)
        if any(getattr(r, "holds_labels", False) for r in self.runners[:-1]):
            raise TrainingError("Only the last segment of a step loop can hold the labels.")
        self.label_runner = self.runners[-1] if getattr(self.runners[-1], "holds_labels", False) \
            else None
        self._forwarded: dict[Any, list[Any]] = {}  # step -> runners whose forward ran

    @property
    def feeders(self) -> list[Any]:
        """The runners that run forward/backward (all but a label runner)."""
        return self.runners[:-1] if self.label_runner is not None else list(self.runners)

    # ---- training ------------------------------------------------------------------------------
    def forward(self, step: Any, store: dict[str, Any]) -> dict[str, Any]:
        """The training-mode forward of every feeder, in order; `store` (tensors by name)
        gains their outputs and is returned. A failure drops what the step left pending."""
        done: list[Any] = []
        self._forwarded[step] = done
        try:
            for runner in self.feeders:
                outputs = runner.forward(step, [store[name] for name in runner.input_names])
                done.append(runner)
                store.update(zip(runner.output_names, outputs))
        except BaseException:
            self.drop(step)
            raise
        return store

    def regularization(self, step: Any) -> Any:
        """The regularization losses of step's forwards, summed (reported loss only)."""
        total: Any = None
        for runner in self._forwarded.get(step, []):
            total = _add(total, runner.pending_regularization(step))
        return 0.0 if total is None else total

    def backward(self, step: Any, grads: dict[str, Any]) -> dict[str, Any]:
        """Every forwarded runner's update, in reverse, from `grads` (gradients by tensor
        name; a missing one counts as zero). Returns the gradients left for the tensors
        the loop did not produce: its inputs. A failure drops the step, unless the first
        runner refused it without using it (an error with `step_kept`, e.g. a guard's
        `UpdateRefused`): then the step stays pending and its backward may come again."""
        runners = self._forwarded.pop(step, None)
        if runners is None:
            raise TrainingError(f"No forward of step {step!r} to differentiate: run forward first.")
        grads = dict(grads)
        forwarded = len(runners)
        try:
            while runners:
                runner = runners[-1]
                output_grads = [grads.pop(name, None) for name in runner.output_names]
                input_grads = runner.backward(step, output_grads)
                runners.pop()
                accumulate_gradients(grads, runner, input_grads)
        except BaseException as error:
            if getattr(error, "step_kept", False) and len(runners) == forwarded:
                self._forwarded[step] = runners  # refused before anything ran: still pending
                raise
            self.drop(step)
            raise
        return grads

    def has_pending(self, step: Any) -> bool:
        """Whether `step` was forwarded and waits for its backward."""
        return step in self._forwarded

    def train(self, step: Any, store: dict[str, Any], y: Any, sample_weight: Any = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One whole step (the last runner holds the labels): forwards, the label runner's
        step with the others' regularization added to its reported loss, backwards.
        Returns (gradients of the loop's inputs, the label runner's logs)."""
        last = self.label_runner
        if last is None:
            raise TrainingError("train() needs a last runner that holds the labels.")
        self.forward(step, store)
        try:
            input_grads, logs = last.train_step(step, [store[n] for n in last.input_names], y,
                                                sample_weight, self.regularization(step))
        except BaseException:
            self.drop(step)
            raise
        grads: dict[str, Any] = {}
        accumulate_gradients(grads, last, input_grads)
        return self.backward(step, grads), logs

    def drop(self, step: Any) -> None:
        """Forget a step that will not finish (frees every runner's pending state)."""
        self._forwarded.pop(step, None)
        for runner in self.runners:
            runner.drop(step)

    # ---- inference -----------------------------------------------------------------------------
    def infer(self, store: dict[str, Any], runners: Sequence[Any] | None = None
              ) -> tuple[dict[str, Any], Any]:
        """Inference-mode outputs of `runners` (default: all) into `store`, and the sum of
        their regularization losses (added to the reported loss, as `model.evaluate` does)."""
        total: Any = None
        for runner in self.runners if runners is None else runners:
            outputs, loss = runner.predict_with_regularization([store[n] for n in runner.input_names])
            store.update(zip(runner.output_names, outputs))
            total = _add(total, loss)
        return store, 0.0 if total is None else total
