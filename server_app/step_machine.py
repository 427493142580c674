"""Exactly-once steps per (session, step): the state machine of docs/protocol.md.

`StepMachine` decides whether a request runs, is a retry (the cached bytes, nothing runs)
or is refused (`RequestRefused`, nothing changes). What runs is a `StepExecutor`'s: the
machine knows no model and imports no TensorFlow. Bodies are decoded before and encoded
after the executor's call (`TensorBodies`), so an executor sees arrays only.

Every method runs on the service's one writer thread, the executor's calls included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from server_app.bodies import TensorBodies
from server_app.sessions import PendingForward, Session, SessionStore
from server_app.wal import Record
from splitkeras.codecs import parse_codec
from splitkeras.errors import RequestRefused

__all__ = ["StepKey", "StepExecutor", "StepMachine"]

StepKey = tuple[str, int]  # (session id, step)


class StepExecutor(Protocol):
    """What runs a step. `forward(key)` keeps what `backward(key)` needs until then or `drop(key)`."""

    def forward(self, key: StepKey, inputs: list[np.ndarray]) -> tuple[list[Any], float]:
        """Training-mode forward: (outputs, regularization loss). Keeps nothing if it raises."""
        ...

    def backward(self, key: StepKey, output_grads: list[np.ndarray]) -> list[Any | None]:
        """Apply the update of `key`'s forward; one gradient per input (None: not needed)."""
        ...

    def train(self, key: StepKey, inputs: list[np.ndarray], y: Any,
              sample_weight: np.ndarray | None) -> tuple[list[Any | None], dict[str, Any]]:
        """One step with the labels here: (input gradients, loss and metrics of this step)."""
        ...

    def predict(self, inputs: list[np.ndarray]) -> list[Any]:
        """Inference-mode forward; changes nothing."""
        ...

    def drop(self, key: StepKey) -> None:
        """Forget `key`'s forward (no-op if there is none)."""
        ...


class StepMachine:
    """The protocol's step rules over `store`'s sessions, running steps on `executor`.

    Args:
        store: the sessions.
        executor: runs forward/backward/train/predict.
        bodies: decodes request bodies and encodes answers.
        mode: `"u_shaped"` (forward/backward) or `"labels_on_server"` (train).
        ttl_seconds: how long a pending step waits for its backward (`sweep_expired`).
        max_pending_steps: how many forwards of a session may wait for their backwards at
            once (pipelining, docs/protocol.md; 1: none).
        on_applied: called after each applied update (e.g. to checkpoint every N).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, store: SessionStore, executor: StepExecutor, bodies: TensorBodies, mode: str,
                 ttl_seconds: float, on_applied: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 journal: Callable[[Record], None] | None = None,
                 ensure_durable: Callable[[], None] = lambda: None, max_pending_steps: int = 1) -> None:
        if max_pending_steps < 1:
            raise ValueError(f"max_pending_steps must be >= 1, got {max_pending_steps}.")
        self.store, self.executor, self.bodies, self.mode = store, executor, bodies, mode
        self.ttl_seconds, self.max_pending_steps = ttl_seconds, max_pending_steps
        self.on_applied, self.clock = on_applied, clock
        self.journal, self.ensure_durable = journal, ensure_durable
        self.applied_steps = 0
        self.updates = 0  # optimizer updates since this process started (a micro-batched group: one)
        self.replaying = False
        self._last_blobs: list[bytes] = []

    # ---- the write-ahead log (server_app.wal) ------------------------------------------------
    def _log(self, kind: str, session_id: str, step: int | None, body: bytes | None = None) -> None:
        """Make this change durable before it is acknowledged (raises `RequestRefused
        "not_durable"` when the log cannot be written). Nothing is logged while replaying."""
        if self.journal is None or self.replaying:
            return
        answers: list[bytes] = getattr(self.executor, "take_answers", lambda: [])()
        blobs = ([] if body is None else [body]) + list(answers)
        self.journal(Record(kind, {"session": session_id, "step": step}, blobs))
        self._last_blobs = blobs

    def pending_records(self) -> list[Record]:
        """For a checkpoint: the forwards still pending, to be logged again after it (their
        tapes are not in the checkpoint)."""
        return [Record("pending", {"session": s.session_id, "step": step}, list(blobs))
                for s in self.store for step in s.pending_steps
                if (blobs := s.pending[step].blobs if step in s.pending else None) is not None]

    def replay(self, record: Record) -> None:
        """Redo one logged change (at start, from the checkpoint on): the same request, with a
        chain's next-server answers taken from the record instead of the network."""
        self.replaying = True
        feed: Callable[[list[bytes] | None], None] | None = None
        try:
            session = self.store.get(str(record.fields.get("session")))
            if record.kind == "open":
                self.store.add(Session(**record.fields["data"]))
                return
            if session is None:
                return  # closed later in the log's history, or evicted: nothing left to redo
            feed = getattr(self.executor, "feed_answers", None)
            if feed is not None:
                feed(record.blobs[1:])
            if record.kind == "close":
                self.close(session)
            elif record.kind == "drop":
                self._drop(session)
            elif record.kind in ("forward", "backward", "train"):
                getattr(self, record.kind)(session, int(record.fields["step"]), record.blobs[0])
            elif record.kind == "pending":  # rebuild the tape; the checkpoint has its side effects
                with self.executor.isolated():  # type: ignore[attr-defined]
                    self.forward(session, int(record.fields["step"]), record.blobs[0])
            step = int(record.fields["step"]) if record.fields.get("step") is not None else None
            if record.kind in ("forward", "pending") and step in session.pending:
                session.pending[step].blobs = list(record.blobs)
                session.pending_blobs = session.pending[session.pending_steps[0]].blobs  # the oldest's
        finally:
            self.replaying = False
            if feed is not None:
                feed(None)

    # ---- sessions across restarts ------------------------------------------------------------
    def restore(self, applied_steps: int, sessions: Iterable[dict[str, Any]]) -> None:
        """Take back the counters and sessions of a checkpoint. A step that was pending lost
        its forward with the process (and so did every later pending one): their backwards get
        `forward_lost` until they are resent, the oldest first."""
        self.applied_steps = applied_steps
        for data in sessions:
            session = Session(**data)
            lost = session.clear_pending()
            if lost:
                session.set_lost(lost)
                session.next_step = lost[0]
            self.store.add(session)

    def persisted(self) -> list[dict[str, Any]]:
        return [s.persisted() for s in self.store]

    def close(self, session: Session) -> None:
        self._log("close", session.session_id, None)
        for step in session.pending_steps:
            self.executor.drop((session.session_id, step))
        self.store.remove(session.session_id)

    def sweep_expired(self) -> int:
        """Drop pending steps older than the TTL (with every later pending step of the session:
        backwards are FIFO, they could never come). Returns how many sessions lost steps."""
        now = self.clock()
        dropped = 0
        for session in list(self.store):
            if session.pending_step is not None and now - session.pending_since > self.ttl_seconds:
                try:
                    self._log("drop", session.session_id, session.pending_step)
                except RequestRefused:
                    return dropped  # the log refuses: keep the step until it can be logged
                self._drop(session)
                dropped += 1
        return dropped

    def _drop(self, session: Session) -> None:
        """Drop every pending step of the session (their forwards may be sent again)."""
        dropped = session.clear_pending()
        if not dropped:
            return
        for step in dropped:
            self.executor.drop((session.session_id, step))
        session.set_expired(dropped)
        session.next_step = dropped[0]

    def expire(self, session: Session) -> None:
        """The executor no longer holds the session's pending step (a refusal consumed its
        forward): its backward gets `step_expired`, and the forward may be sent again. Logged
        like a TTL drop (if the log refuses, the next request checkpoints first)."""
        if session.pending_step is None:
            return
        try:
            self._log("drop", session.session_id, session.pending_step)
        except RequestRefused:
            pass
        self._drop(session)

    # ---- refusals ----------------------------------------------------------------------------
    def _out_of_order(self, session: Session, step: int, route: str) -> RequestRefused:
        if route == "backward" and step in session.lost_steps:
            return RequestRefused("forward_lost",
                                  f"The forward pass of step {step} was lost when the server restarted. "
                                  f"Send forward for step {step} again with the same activations, then "
                                  "backward.", expected_step=step)
        if route == "backward" and step in session.expired_steps:
            return RequestRefused("step_expired",
                                  f"Step {step} waited longer than {self.ttl_seconds:g} s for its "
                                  f"backward and was dropped. Send forward for step {step} again.",
                                  expected_step=step)
        if session.pending_step is not None:
            return RequestRefused("step_out_of_order",
                                  f"Step {session.pending_step} is waiting for its backward; got "
                                  f"{route} for step {step}.", expected_step=session.pending_step)
        return RequestRefused("step_out_of_order",
                              f"Expected {route if route != 'backward' else 'forward'} for step "
                              f"{session.next_step} or later, got {route} for step {step}.",
                              expected_step=session.next_step)

    def _require_mode(self, route: str) -> None:
        wanted = "labels_on_server" if route == "train" else "u_shaped"
        if self.mode != wanted:
            other = "train" if self.mode == "labels_on_server" else "forward/backward"
            raise RequestRefused("wrong_mode",
                                 f"This split's server segment runs in mode '{self.mode}': use {other}, "
                                 f"not {route}.")

    def _require_open(self, session: Session) -> None:
        # the session object was looked up before this job reached the writer: it may be closed now
        if self.store.get(session.session_id) is not session:
            raise RequestRefused("unknown_session",
                                 f"Session '{session.session_id}' was closed. Open a new one with "
                                 "POST /v1/sessions.")

    def _check_forward(self, session: Session, step: int) -> None:
        """A new forward must be newer than every pending one and `next_step`, with fewer than
        `max_pending_steps` pending (a server without pipelining refuses as before)."""
        pending, limit = session.pending_steps, self.max_pending_steps
        if self.replaying:  # what the log holds was accepted (perhaps under a larger limit)
            limit = len(pending) + 1
        if step < session.next_step or (pending and (step <= pending[-1] or limit == 1)):
            raise self._out_of_order(session, step, "forward")
        if len(pending) >= limit:
            raise RequestRefused("pipeline_full",
                                 f"{len(pending)} steps of this session wait for their backwards (steps "
                                 f"{pending[0]}..{pending[-1]}), the server's limit (max_pending_steps "
                                 f"{self.max_pending_steps}): send the backward of step {pending[0]} "
                                 f"before forward {step}.", expected_step=pending[0])

    # ---- the steps ---------------------------------------------------------------------------
    def forward(self, session: Session, step: int, body: bytes) -> bytes:
        inputs, cached = self.forward_check(session, step, body)
        if cached is not None:
            return cached
        key = (session.session_id, step)
        outputs, regularization = self.executor.forward(key, inputs)
        try:
            response = self.forward_answer(session, step, outputs, regularization)
        except BaseException:
            self.executor.drop(key)  # e.g. an output beyond float16's range: no step is left pending
            raise
        try:
            self._log("forward", session.session_id, step, body)
        except BaseException:
            self.executor.drop(key)  # not durable: not acknowledged, nothing left pending
            raise
        self.forward_finish(session, step, inputs, response, self._last_blobs)
        return response

    # the phases of a forward, shared with the micro-batched groups (server_app.micro_batch)
    def forward_check(self, session: Session, step: int, body: bytes) -> tuple[list[np.ndarray], bytes | None]:
        """Refuse what may not run (nothing changes); (decoded inputs, the cached answer of a
        retry or None)."""
        self._require_mode("forward")
        self._require_open(session)
        if not self.replaying:
            self.ensure_durable()
        inputs = self.bodies.inputs(body, session.codec("forward"))  # a retry's body is checked too
        if step in session.pending:
            return inputs, session.pending[step].answer  # a retry: same bytes, nothing runs
        if session.last_forward and session.last_forward[0] == step and session.next_step > step:
            return inputs, session.last_forward[1]
        self._check_forward(session, step)
        return inputs, None

    def forward_answer(self, session: Session, step: int, outputs: list[Any], regularization: Any) -> bytes:
        return self.bodies.encode_outputs(
            outputs, session.codec("forward"),
            {"step": str(step), "regularization_loss": repr(float(regularization))},
            session.residuals_of("forward"))

    def forward_finish(self, session: Session, step: int, inputs: list[np.ndarray], response: bytes,
                       blobs: list[bytes] | None) -> None:
        """The forward ran and is logged: the step is pending (after the others), its answer cached."""
        batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else None
        session.add_pending(step, PendingForward(self.clock(), batch, response, None if self.replaying else blobs))
        session.set_lost([s for s in session.lost_steps if s > step])
        session.set_expired([s for s in session.expired_steps if s > step])
        session.last_forward = (step, response)

    def backward(self, session: Session, step: int, body: bytes) -> bytes:
        grads, cached = self.backward_check(session, step, body)
        if cached is not None:
            return cached
        input_grads = self.executor.backward((session.session_id, step), grads)
        response = self.backward_answer(session, step, input_grads)
        self._logged_applied("backward", session, step, body, response)
        return response

    def backward_check(self, session: Session, step: int, body: bytes) -> tuple[list[np.ndarray], bytes | None]:
        """Refuse what may not run (nothing changes); (decoded output gradients, the cached
        answer of a retry or None)."""
        self._require_mode("backward")
        self._require_open(session)
        if not self.replaying:
            self.ensure_durable()
        grads = self.bodies.output_grads(body, session.codec("backward"))
        if session.pending_step != step:  # backwards are FIFO: the oldest pending step only
            cached = session.cached_backward(step) if step < session.next_step else None
            if cached is not None:
                return grads, cached
            raise self._out_of_order(session, step, "backward")
        batch = int(grads[0].shape[0]) if grads and grads[0].ndim else None
        if session.pending_batch is not None and batch != session.pending_batch:
            raise RequestRefused("bad_tensor",
                                 f"The gradients have batch size {batch}, but the forward pass of step "
                                 f"{step} had {session.pending_batch}: send one gradient per output "
                                 "sample, shaped like the forward response.")
        return grads, None

    def backward_answer(self, session: Session, step: int, input_grads: list[Any]) -> bytes:
        return self.bodies.encode_input_grads(input_grads, session.codec("backward"), {"step": str(step)},
                                              session.residuals_of("backward"))

    def train(self, session: Session, step: int, body: bytes) -> bytes:
        self._require_mode("train")
        self._require_open(session)
        if not self.replaying:
            self.ensure_durable()
        inputs, y, sample_weight = self.bodies.train_batch(body, session.codec("forward"))
        if session.last_backward and session.last_backward[0] == step and session.next_step > step:
            return session.last_backward[1]
        if step < session.next_step:
            raise self._out_of_order(session, step, "train")
        input_grads, logs = self.executor.train((session.session_id, step), inputs, y, sample_weight)
        metadata = {"step": str(step)}
        metadata.update({k: repr(float(v)) for k, v in logs.items()})
        response = self.bodies.encode_input_grads(input_grads, session.codec("backward"), metadata,
                                                  session.residuals_of("backward"))
        self._logged_applied("train", session, step, body, response)
        return response

    def _logged_applied(self, kind: str, session: Session, step: int, body: bytes,
                        response: bytes) -> None:
        """The update is applied: log it, then count it (and maybe checkpoint). When the log
        refuses, the step still counts in memory (its answer is cached for the retry) but is
        not acknowledged: the next request checkpoints first (`ensure_durable`)."""
        try:
            self._log(kind, session.session_id, step, body)
        except BaseException:
            self.applied(session, step, response, checkpoint=False)
            raise
        self.applied(session, step, response)

    def applied(self, session: Session, step: int, response: bytes, checkpoint: bool = True,
                count_update: bool = True) -> None:
        """`step`'s update is applied: its answer cached, the session's next step, the counts.
        `count_update=False`: one member of a micro-batched group (its group counts one update)."""
        if count_update:
            self.updates += 1
        session.keep_backward(step, response, self.max_pending_steps)  # before the checkpoint: retries
        if session.pending_step == step:
            session.pop_oldest()
        session.next_step = step + 1
        session.applied_steps += 1
        self.applied_steps += 1
        if checkpoint and not self.replaying:
            self.on_applied()

    def predict(self, session: Session, body: bytes) -> bytes:
        self._require_open(session)
        exact = parse_codec(session.codec("forward")).label_dtype  # predict is not compressed lossily
        outputs = self.executor.predict(self.bodies.inputs(body, exact))
        return self.bodies.encode_outputs(outputs, exact)
