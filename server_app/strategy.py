"""The server side of `--strategy` (`splitkeras.distributed`): the runner, the idle ticks, the status.

* `strategy_scope(settings)`: the scope the segment is loaded and its optimizer built under
  (a no-op context without `--strategy`).
* `build_runner`: a `DistributedRunner` for the segment (refusing what it cannot run).
* `GlobalStepTicker`: under `--strategy multi-worker`, every `global_step_ms` without a global
  step, the writer runs an idle one (count 0, zeros), so a peer's global step never waits for
  this worker's devices: the k-th global steps of the workers pair up.
* `describe(runner)`: what `/readyz` (with the key) tells about the cluster, with a digest of the
  trainable weights (equal on every worker after each global step; the tests compare them).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from server_app.settings import ServerSettings
from splitkeras.errors import ManifestError

__all__ = ["strategy_scope", "build_runner", "GlobalStepTicker", "describe", "check_replay"]

log = logging.getLogger("splitkeras.server")


def _strategy(settings: ServerSettings) -> Any:
    from splitkeras import distributed

    return distributed.start(settings.strategy, settings.replicas, settings.collective_timeout_seconds)


@contextlib.contextmanager
def strategy_scope(settings: ServerSettings) -> Iterator[None]:
    """`strategy.scope()` of `--strategy` (variables made inside are mirrored), else nothing."""
    if settings.strategy == "off":
        yield
        return
    with _strategy(settings).scope():
        yield


def build_runner(settings: ServerSettings, segment: Any, optimizer: Any, model_inputs: list[str],
                 holds_labels: bool) -> Any:
    """The segment's `DistributedRunner` (inside `strategy_scope`)."""
    from splitkeras import distributed

    if settings.guard:
        raise ManifestError("--strategy runs without the guards for now (their checks do not run under "
                            "tf.distribute yet): add --no-guard, or serve without --strategy.")
    distributed.check_segment(segment.model, holds_labels)
    names = set(model_inputs)
    return distributed.DistributedRunner(segment, optimizer, strategy=_strategy(settings),
                                         input_gradients=[s.name not in names for s in segment.inputs])


def check_replay(settings: ServerSettings, kinds: list[str]) -> None:
    """A multi-worker cluster cannot redo one worker's applied steps alone (each was a global step
    with its peers): a log that holds some past the checkpoint is refused at start."""
    applied = sum(1 for kind in kinds if kind in ("backward", "train"))
    if settings.strategy == "multi-worker" and applied:
        raise ManifestError(f"The log in '{settings.resolved_checkpoint_dir}' holds {applied} applied step(s) past the "
                            "checkpoint, which a multi-worker cluster cannot redo on one worker. Move the "
                            "log (wal.log) away to resume every worker from its checkpoint.")


class GlobalStepTicker:
    """Runs `tick` on the writer every `interval` seconds without a global step (see the module
    docstring), and `after_update` after one that applied a peer's steps; stops at `stop()` or when
    the runner reports a lost worker."""

    def __init__(self, runner: Any, submit: Callable[[Callable[[], Any]], Future[Any]], interval: float,
                 after_update: Callable[[], None] = lambda: None) -> None:
        self.runner, self.submit, self.interval, self.after_update = runner, submit, interval, after_update
        self._stop = threading.Event()
        self._seen = -1
        self._thread = threading.Thread(target=self._loop, name="splitkeras-global-steps", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.runner.lost is not None:
                return
            if self.runner.global_steps != self._seen:  # the writer ran one since the last look
                self._seen = self.runner.global_steps
                continue
            try:
                self.submit(self._tick).result()
            except RuntimeError:  # the writer is shut down
                return
            except Exception:  # noqa: BLE001 - reported by the runner (`lost`), logged there
                continue

    def _tick(self) -> None:
        if self.runner.lost is None and not self._stop.is_set():
            if self.runner.global_step(None, 0.0) > 0:  # a peer's device steps: this worker's checkpoint too
                self.after_update()
            self._seen = self.runner.global_steps

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def weights_digest(runner: Any) -> str:
    """SHA-256 of every local replica's trainable weights, in order (identical copies on all
    workers give one digest)."""
    digest = hashlib.sha256()
    for copies in runner.replica_weights():
        first = copies[0]
        if any(not (c == first).all() for c in copies[1:]):
            return "replicas_differ"
        digest.update(first.tobytes())
    return digest.hexdigest()


def describe(runner: Any, strategy: str) -> dict[str, Any]:
    return {"strategy": strategy, "replicas": runner.replicas, "local_replicas": runner.local_replicas,
            "workers": runner.workers, "worker_index": runner.worker_index, "global_steps": runner.global_steps,
            "applied_updates": runner.applied_updates, "lost": runner.lost, "weights_sha256": weights_digest(runner)}
