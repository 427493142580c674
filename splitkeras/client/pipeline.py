"""`PipelinedSteps`: up to `depth` U-shaped steps in flight on the device (docs/training.md,
"Pipelining").

The runners are those of `splitkeras.steps.StepLoop`, in data-flow order: the device's head
(local runners), ONE remote server stage, the device's tail (local runners, the last one
holds the labels). `push(k, ...)` runs step *k*'s head forward here and hands the server's
forward of *k* to a request thread (`submit`), so that it travels while the device finishes
earlier steps; when `depth` steps are in flight, the oldest is finished: its server answer,
the tail's forward and label step, then the backwards in reverse (the server's backward
from this thread: backwards are FIFO, one at a time). `flush()` finishes the rest.

The order is fixed: push(k) runs after step k - depth was finished, so at depth *d* the
head's and the server's forward of step *k* miss the updates of steps k-d+1 .. k-1 (up to
d-1); each update is applied to the weights of the moment (no weight stashing); the tail
sees every update. Depth 1 is the sequential step.

Example:
    >>> steps = PipelinedSteps([head, remote, tail], depth=2)          # doctest: +SKIP
    >>> done = steps.push(0, {"image": x0}, y0)   # [] : step 0 in flight  # doctest: +SKIP
    >>> done = steps.push(1, {"image": x1}, y1)   # [(0, logs of step 0)]  # doctest: +SKIP
    >>> done += steps.flush()                     # [(1, logs of step 1)]  # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from splitkeras.errors import TrainingError
from splitkeras.steps import accumulate_gradients

__all__ = ["PipelinedSteps", "MAX_PIPELINE_DEPTH", "check_depth", "pipeline_for", "pipelined_epoch"]

MAX_PIPELINE_DEPTH = 4
Submit = Callable[..., "Future[Any]"]


def check_depth(depth: Any) -> int:
    """`depth` if it is a whole number in 1..MAX_PIPELINE_DEPTH, else `ValueError`."""
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_PIPELINE_DEPTH:
        raise ValueError(f"pipeline_depth must be a whole number from 1 (no pipelining) to "
                         f"{MAX_PIPELINE_DEPTH}, got {depth!r}.")
    return depth


def _add(left: Any, right: Any) -> Any:
    return right if left is None else left + right


@dataclass
class _Flight:
    step: Any
    store: dict[str, Any]
    y: Any
    sample_weight: Any
    server: Future[Any]


class PipelinedSteps:
    """Runs training steps over `runners` with up to `depth` of them in flight.

    Args:
        runners: head runners, the remote stage (`remote_index`), tail runners; the last
            holds the labels.
        depth: steps in flight (1..4).
        remote_index: the position of the remote stage in `runners`.
        submit: runs a remote forward off this thread (default: one request thread); tests
            pass one that runs it at once or in a recorded order.
    """

    def __init__(self, runners: Sequence[Any], depth: int, remote_index: int,
                 submit: Submit | None = None) -> None:
        self.depth = check_depth(depth)
        self.runners = list(runners)
        if not getattr(self.runners[-1], "holds_labels", False) or not 0 < remote_index < len(self.runners) - 1:
            raise TrainingError("Pipelining needs a U-shaped split: device segments before and after one "
                                "server stage, the labels on the device.")
        self.head, self.remote = self.runners[:remote_index], self.runners[remote_index]
        self.tail_feeders, self.label = self.runners[remote_index + 1:-1], self.runners[-1]
        self._pool: ThreadPoolExecutor | None = None
        if submit is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitkeras-pipeline")
            submit = self._pool.submit
        self.submit = submit
        self.in_flight: deque[_Flight] = deque()
        self.waited = 0.0  # seconds this thread waited on the server (answers and backwards)

    def close(self) -> None:
        """Drop what is in flight and stop the request thread."""
        self._abandon()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # ---- the schedule ----------------------------------------------------------------------------
    def push(self, step: Any, store: dict[str, Any], y: Any, sample_weight: Any = None
             ) -> list[tuple[Any, dict[str, Any]]]:
        """Start step `step` (the head's forward here, the server's forward sent); returns the
        (step, logs) of the steps this finished, oldest first."""
        try:
            for runner in self.head:
                outputs = runner.forward(step, [store[n] for n in runner.input_names])
                store.update(zip(runner.output_names, outputs))
            inputs = [store[n] for n in self.remote.input_names]
        except BaseException:
            self._drop(step)
            self._abandon()
            raise
        self.in_flight.append(_Flight(step, store, y, sample_weight,
                                      self.submit(self.remote.forward, step, inputs)))
        done = []
        while len(self.in_flight) >= self.depth:
            done.append(self._finish_oldest())
        return done

    def flush(self) -> list[tuple[Any, dict[str, Any]]]:
        """Finish every step in flight, oldest first."""
        return [self._finish_oldest() for _ in range(len(self.in_flight))]

    def _finish_oldest(self) -> tuple[Any, dict[str, Any]]:
        flight = self.in_flight.popleft()
        step, store = flight.step, flight.store
        try:
            started = time.perf_counter()
            outputs = flight.server.result()
            self.waited += time.perf_counter() - started
            store.update(zip(self.remote.output_names, outputs))
            for runner in self.tail_feeders:
                outputs = runner.forward(step, [store[n] for n in runner.input_names])
                store.update(zip(runner.output_names, outputs))
            feeders = [*self.head, self.remote, *self.tail_feeders]
            regularization: Any = None
            for runner in feeders:
                regularization = _add(regularization, runner.pending_regularization(step))
            input_grads, logs = self.label.train_step(
                step, [store[n] for n in self.label.input_names], flight.y, flight.sample_weight,
                0.0 if regularization is None else regularization)
            grads: dict[str, Any] = {}
            accumulate_gradients(grads, self.label, input_grads)
            for runner in reversed(feeders):
                output_grads = [grads.pop(name, None) for name in runner.output_names]
                started = time.perf_counter()
                input_grads = runner.backward(step, output_grads)
                if runner is self.remote:
                    self.waited += time.perf_counter() - started
                accumulate_gradients(grads, runner, input_grads)
        except BaseException:
            self._drop(step)
            self._abandon()
            raise
        return step, logs

    # ---- failures --------------------------------------------------------------------------------
    def _drop(self, step: Any) -> None:
        for runner in self.runners:
            runner.drop(step)

    def _abandon(self) -> None:
        """A step failed: the later ones in flight are dropped (their server forwards waited
        for, so that nothing is still being sent)."""
        while self.in_flight:
            flight = self.in_flight.popleft()
            try:
                flight.server.result()
            except BaseException:  # noqa: S110 -- the first failure is the one raised
                pass
            self._drop(flight.step)


def pipelined_epoch(client: Any, steps: PipelinedSteps, batches: Any, callbacks: Any, meter: Any
                    ) -> dict[str, Any]:
    """One epoch of `DeviceClient.fit` with `steps` (its batches as `epoch_batches` gives
    them): each batch's `on_train_batch_begin` when it is pushed, its `on_train_batch_end`
    when it is finished; the epoch ends with every step finished. Returns the last logs."""
    import tensorflow as tf

    from splitkeras.training import model_inputs_by_name

    logs: dict[str, Any] = {}
    ends: dict[Any, int] = {}

    def finished(done: list[tuple[Any, dict[str, Any]]]) -> None:
        nonlocal logs
        for step, step_logs in done:
            logs = step_logs
            callbacks.on_train_batch_end(ends.pop(step), {**logs, **meter.logs()})

    for begin_step, end_step, x, y, sample_weight in batches:
        callbacks.on_train_batch_begin(begin_step)
        client._ensure_built(y)
        store = model_inputs_by_name(client.split, x)
        step, started = client._step, time.perf_counter()
        waited = steps.waited
        ends[step] = end_step
        client._step += 1
        client._samples += int(tf.shape(store[client.split.model_inputs[0].name])[0])
        try:
            finished(steps.push(step, store, y, sample_weight))
        finally:
            client._device_seconds += time.perf_counter() - started - (steps.waited - waited)
        if client.stop_training:
            break
    started, waited = time.perf_counter(), steps.waited
    try:
        finished(steps.flush())
    finally:
        client._device_seconds += time.perf_counter() - started - (steps.waited - waited)
    return logs


def pipeline_for(client: Any, depth: int, rounds: bool | None) -> PipelinedSteps | None:
    """The pipelined steps of `client.fit(pipeline_depth=depth)` (a `DeviceClient`), at most
    the server's `max_pending_steps` deep, with a warning when that caps it (None: the
    sequential step after all)."""
    if client.labels_on_server or len(client.stages) != 1 or client.defences or rounds:
        raise TrainingError(f"fit(pipeline_depth={depth}) needs a U-shaped split with one server stage "
                            "(labels on the device), without defences or fleet rounds; train this one "
                            "with pipeline_depth=1.")
    client.open_session()
    allowed = client.transport.max_pending_steps
    if depth > allowed:
        warnings.warn(f"fit(pipeline_depth={depth}): the server lets a session pipeline {allowed} "
                      f"step(s) (splitkeras serve --max-pending-steps); training at depth {allowed}.",
                      stacklevel=3)
        depth = allowed
    if depth == 1:
        return None
    if client.fleet_rounds() is not None:
        raise TrainingError(f"fit(pipeline_depth={depth}): the server runs fleet rounds (--aggregate); "
                            "train with pipeline_depth=1.")
    return PipelinedSteps(client.runners, depth, client.runners.index(client.remote))
