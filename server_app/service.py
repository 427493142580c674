"""The server segment as a service: the parts of `server_app` put together, one writer.

`SegmentHost` (the model, its checkpoint and `.keras` file), `ServerKey` and tokens
(`keys`), a `SessionStore` and the `StepMachine` that runs the protocol's steps on a
`ChainExecutor` (this segment and, in a chain, the next server). This module knows
nothing of HTTP: it takes and returns bytes (safetensors bodies) and raises
`RequestRefused` for refusals. All TensorFlow work and every state change run on ONE
worker thread (`run`), in arrival order, so updates from many devices are applied one at
a time and a refused request changes nothing.

The segment's runner has an `UpdateGuard` (`splitkeras.guard`, unless `guard` is off): a
step that would poison the shared weights is refused, counted on its session, and a
session with `max_refused_steps` refusals is closed. Sessions close after
`session_ttl_seconds` without a request (their pending forwards and cached answers freed);
when `max_sessions` are open, a new one replaces the least recently used idle one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from server_app import keys
from server_app.bodies import TensorBodies
from server_app.chain import ChainExecutor
from server_app.group_steps import GroupSteps
from server_app.micro_batch import MicroBatcher
from server_app.segment_host import SegmentHost
from server_app.sessions import InMemorySessionStore, Session, SessionStore
from server_app.settings import ServerSettings
from server_app.step_machine import StepMachine
from server_app.strategy import GlobalStepTicker, check_replay
from server_app.strategy import describe as describe_strategy
from server_app.wal import Record, WriteAheadLog
from splitkeras import codecs, wire
from splitkeras.errors import GUARD_CODES, ManifestError, RequestRefused
from splitkeras.guard import UpdateGuard

if TYPE_CHECKING:
    from server_app.fleet_host import FleetHost

__all__ = ["SegmentService", "Session"]

T = TypeVar("T")
log = logging.getLogger("splitkeras.server")


class SegmentService:
    """Loads the server segment of a split and runs the protocol of `docs/protocol.md`."""

    def __init__(self, settings: ServerSettings, sessions: SessionStore | None = None) -> None:
        self.settings = settings
        self.host = host = SegmentHost(settings)
        self.entry, self.mode, self.segment, self.runner = host.entry, host.mode, host.segment, host.runner
        self.served = served = host.served
        self.checkpoint_dir = host.checkpoint_dir
        self.bodies = TensorBodies(served.inputs, served.outputs, host.manifest.model_outputs,
                                   host.loss, settings.max_batch, settings.accepted_codecs)
        self.body_limits = self.bodies.limits
        guard_config = settings.guard_config()
        self.guard = self.runner.guard = UpdateGuard(guard_config) if guard_config else None
        self.clock: Callable[[], float] = time.monotonic
        self.sessions: SessionStore = sessions if sessions is not None else InMemorySessionStore()
        own_key = settings.key or keys.load_or_create_key(settings.key_file)
        self.server_key = keys.ServerKey(own_key)
        self.executor = ChainExecutor(self.runner, served, label_specs=host.manifest.model_outputs,
                                      next_url=settings.next_url, next_key=settings.next_key or own_key)
        self.wal = WriteAheadLog(self.checkpoint_dir)
        self.durable = True  # False after a failed log write, until a checkpoint succeeds
        self.steps = StepMachine(self.sessions, self.executor, self.bodies, self.mode,
                                 settings.step_ttl_seconds, on_applied=self._after_step,
                                 journal=self._journal, ensure_durable=self.ensure_durable,
                                 # micro-batching and --strategy keep one pending step per session: pipelining
                                 # is not built (micro-batching) or not tested (tf.distribute) with them
                                 max_pending_steps=1 if settings.batch_window_ms > 0 or settings.strategy != "off"
                                 else settings.max_pending_steps)
        # micro-batching (off unless --batch-window-ms): groups of sessions, one update each
        self.groups = GroupSteps(self.steps, self.executor, self.guard, on_refused=self._count_refusal)
        self.micro = MicroBatcher(self)
        if self.micro.enabled and (self.mode != "u_shaped" or served.next is not None):
            raise ManifestError("--batch-window-ms micro-batches forward/backward steps of a lone server: this "
                                f"split's server segment runs in mode '{self.mode}'"
                                f"{' in a chain (--next)' if served.next is not None else ''}. Serve it without "
                                "--batch-window-ms.")
        if self.micro.enabled and settings.strategy != "off":
            raise ManifestError(f"--batch-window-ms does not combine with --strategy {settings.strategy} (not built "
                                "yet): serve with one of the two.")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitkeras-writer")
        self._since_checkpoint = 0
        self.refused_steps = 0  # refused by the guards since the start
        self.resumed_from: int | None = None
        self.replayed = 0
        self.fleet: FleetHost | None = None  # rounds of device aggregation (--aggregate), server_app.fleet_host
        if settings.aggregate != "off":
            from server_app.fleet_host import FleetHost

            self.fleet = FleetHost(settings, host.manifest, self.checkpoint_dir, self._journal, self.clock)
            self.body_limits["fleet_weights"] = self.fleet.aggregator.body_limit
        state = host.load_checkpoint()
        wal_seq = 0
        if state is not None:
            self.steps.restore(int(state.get("applied_steps", 0)), state.get("sessions", []))
            self.executor.restore(state.get("downstream", {}))
            if self.guard is not None:  # the relative bounds go on where they were
                try:
                    self.guard.restore(state.get("guard") or {})
                except (TypeError, ValueError, AttributeError) as error:
                    raise ManifestError(f"The checkpoint in '{self.checkpoint_dir}' holds unreadable guard "
                                        f"scales ({error}). Move it away to start fresh, or put back a good "
                                        "copy.") from None
            self.resumed_from = self.steps.applied_steps
            wal_seq = int(state.get("wal_seq", 0))
        self._replay(wal_seq)
        self.ticker: GlobalStepTicker | None = None  # --strategy multi-worker: idle global steps
        if settings.strategy == "multi-worker":  # every worker starts from the most advanced checkpoint
            self.runner.applied_updates = int(((state or {}).get("distributed") or {}).get("applied_updates", 0))
            self.runner.sync_from_latest()
            self.ticker = GlobalStepTicker(self.runner, self._writer.submit, settings.global_step_ms / 1000,
                                           after_update=self._after_step)

    # ---- the write-ahead log -------------------------------------------------------------------
    def _replay(self, after: int) -> None:
        """Redo what the log holds past the checkpoint, then checkpoint (the log starts over)."""
        if self.settings.strategy == "multi-worker":
            check_replay(self.settings, [record.kind for record in self.wal.records(after=after)])
        for record in self.wal.records(after=after):
            try:
                if record.kind.startswith("fleet_"):
                    if self.fleet is not None:
                        self.fleet.aggregator.replay(record)
                    continue
                if record.kind.startswith("group_"):
                    self.groups.replay(record)
                    self.replayed += 1
                    continue
                self.steps.replay(record)
            except RequestRefused as refusal:  # cannot happen for a log this server wrote
                log.error("Could not replay log record %d (%s): %s", record.seq, record.kind, refusal)
                continue
            self.replayed += 1
        self.wal.last_seq = max(self.wal.last_seq, after)
        if self.replayed:
            log.warning("Replayed %d logged changes since the checkpoint (applied steps: %d).",
                        self.replayed, self.steps.applied_steps)
            self.save_checkpoint()

    def _journal(self, record: Record) -> None:
        """Append `record` durably; a failed write makes the server not durable (503)."""
        try:
            self.wal.append(record)
        except OSError as error:
            self.durable = False
            log.error("Could not write the log in '%s': %s", self.checkpoint_dir, error)
            raise self._not_durable(error) from None

    def _not_durable(self, error: OSError) -> RequestRefused:
        return RequestRefused("not_durable", f"The server cannot make steps durable ({error.strerror or error}"
                              f" in its checkpoint folder); nothing was acknowledged. Retry later.")

    def ensure_durable(self) -> None:
        """Before a step is run or a cached answer is given: after a failed log write, a
        checkpoint must succeed first (it holds every change the log missed)."""
        if self.durable:
            return
        try:
            self.save_checkpoint()
        except OSError as error:
            raise self._not_durable(error) from None
        self.durable = True

    @property
    def applied_steps(self) -> int:
        return self.steps.applied_steps

    # ---- checkpoint, segment file --------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write variables, optimizer state, sessions and the log position atomically, then
        start the log over (worker thread only)."""
        if self.fleet is not None:  # first: a crash before the next file replays the rest from the log
            self.fleet.aggregator.save(self.checkpoint_dir, self.wal.last_seq)
        self.host.save_checkpoint(self.steps.applied_steps, self.steps.persisted(),
                                  self.executor.persisted(), wal_seq=self.wal.last_seq,
                                  guard=self.guard.state() if self.guard is not None else None,
                                  distributed={"applied_updates": self.runner.applied_updates}
                                  if self.settings.strategy != "off" else None)
        self.wal.reset()
        try:
            for record in self.steps.pending_records() + self.groups.pending_records():  # tapes: not in it
                self.wal.append(record)
        except OSError:
            self.durable = False  # nothing is acknowledged until a checkpoint logs them again
            raise
        self._since_checkpoint = 0

    def _after_step(self) -> None:
        self._since_checkpoint += 1
        # multi-worker: after every update (a peer's too), before its answer (docs/scaling.md)
        if self._since_checkpoint >= self.settings.checkpoint_every or self.settings.strategy == "multi-worker":
            try:
                self.save_checkpoint()
            except OSError as error:  # the step is applied: answer it; retry at the next step
                log.error("Could not write the checkpoint to '%s': %s", self.checkpoint_dir, error)

    def save_segment(self) -> None:
        self.host.save_segment()

    def checkpoint_dir_writable(self) -> bool:
        return self.host.checkpoint_dir_writable()

    # ---- running on the single writer --------------------------------------------------------
    async def run(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, function, *args)

    def close(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        self._writer.submit(self._shutdown).result()
        self._writer.shutdown(wait=True)

    def _shutdown(self) -> None:
        try:
            self.save_checkpoint()
        except OSError as error:  # still write the .keras below; /readyz already said 503
            log.error("Could not write the checkpoint at shutdown: %s", error)
        self.save_segment()
        if self.fleet is not None:
            self.fleet.save_segments()
        self.executor.close()
        self.wal.close()

    # ---- sessions ----------------------------------------------------------------------------
    def check_key(self, key: str | None) -> None:
        self.server_key.check(key)

    def session(self, session_id: str, token: str | None) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise RequestRefused("unknown_session",
                                 f"No session '{session_id}' (closed, or never opened). Open a new "
                                 "one with POST /v1/sessions.")
        keys.check_token(token, session.token_hash)
        session.last_seen = self.clock()
        return session

    def open_session(self, wire_dtype: str, compress: str | dict[str, str] | None = None) -> tuple[Session, str]:
        if wire_dtype not in wire.WIRE_DTYPES:
            raise RequestRefused("bad_request",
                                 f"wire_dtype must be one of {list(wire.WIRE_DTYPES)}, got '{wire_dtype}'.")
        try:
            chosen = codecs.parse_compress(wire_dtype if compress is None else compress)
            codecs.check_accepted(chosen, self.settings.accepted_codecs)
        except ValueError as error:
            raise RequestRefused("bad_request", str(error)) from None
        if len(self.sessions) >= self.settings.max_sessions:
            idle = [s for s in self.sessions if s.pending_step is None]
            if not idle:
                raise RequestRefused("too_many_sessions",
                                     f"The server holds {len(self.sessions)} sessions, its limit, and each "
                                     "has a step in progress. Try again later, or close unused sessions "
                                     "(DELETE /v1/sessions/{id}).")
            oldest = min(idle, key=lambda s: -1.0 if s.last_seen is None else s.last_seen)
            log.info("Session %s replaced (the least recently used idle one of %d)", oldest.session_id,
                     len(self.sessions))
            self._let_go(oldest)
        self.ensure_durable()
        token = keys.new_token()
        session = Session(session_id=secrets.token_hex(8), token_hash=keys.hash_token(token),
                          wire_dtype=wire_dtype, last_seen=self.clock(),
                          codecs={d: c.spec for d, c in chosen.items()})
        self._journal(Record("open", {"session": session.session_id, "data": session.persisted()}))
        self.sessions.add(session)
        return session, token

    def close_session(self, session: Session) -> None:
        self.steps.close(session)
        self.executor.close_session(session.session_id)

    def _let_go(self, session: Session) -> None:
        """Close a session the device did not close (idle, replaced): its pending forward and
        cached answers are freed; a chain's next server is not waited on."""
        try:
            self.steps.close(session)
        except RequestRefused:  # the log cannot record the close now: keep it, try again later
            return
        self.executor.close_session(session.session_id, notify=False)

    def sweep_idle(self) -> int:
        """Close the sessions without a request for `session_ttl_seconds`. Returns how many."""
        now, ttl = self.clock(), self.settings.session_ttl_seconds
        closed = 0
        for session in self.sessions:
            if session.last_seen is None:  # restored from a checkpoint: its time starts now
                session.last_seen = now
            elif now - session.last_seen > ttl:
                self._let_go(session)
                closed += 1
        if closed:
            log.info("Closed %d idle session(s) (no request for %g s)", closed, ttl)
            _release_memory()
        return closed

    def describe(self) -> dict[str, Any]:
        """What this server serves: its segment and, in a chain, the rest of the chain."""
        return {"segment": self.entry.name, "mode": self.mode, "max_batch": self.settings.max_batch,
                "max_pending_steps": self.steps.max_pending_steps,
                "inputs": [s.to_json() for s in self.served.inputs],
                "outputs": [s.to_json() for s in self.served.outputs],
                "aggregation": None if self.fleet is None else self.fleet.aggregator.describe()}

    # ---- the steps (worker thread) -----------------------------------------------------------
    def sweep_expired(self) -> int:
        """Drop pending steps older than the TTL (and close a round past its deadline). Returns
        how many steps."""
        if self.fleet is not None:
            try:
                self.fleet.aggregator.sweep()
            except RequestRefused:  # the log refuses: the round closes at a later sweep
                pass
        dropped = self.steps.sweep_expired()
        self.groups.sweep()
        return dropped

    def forward(self, session: Session, step: int, body: bytes) -> bytes:
        return self._guarded(session, step, self.steps.forward, body)

    def backward(self, session: Session, step: int, body: bytes) -> bytes:
        return self._guarded(session, step, self.steps.backward, body)

    def train(self, session: Session, step: int, body: bytes) -> bytes:
        return self._guarded(session, step, self.steps.train, body)

    def forward_group(self, items: list[tuple[Session, int, bytes]]) -> list[bytes | BaseException]:
        """One micro-batched union forward (`server_app.group_steps`): an answer per item."""
        with self._answer_limit([session for session, _, _ in items]):
            return self.groups.forward(items)

    def backward_group(self, group_id: int, items: list[tuple[Session, int, bytes]]) -> list[bytes | BaseException]:
        """A group's one backward and update from the backwards that came: an answer per item."""
        with self._answer_limit([session for session, _, _ in items]):
            return self.groups.backward(group_id, items)

    @contextlib.contextmanager
    def _answer_limit(self, sessions: list[Session]) -> Iterator[None]:
        if self.guard is not None and sessions:  # the tightest codec's range of the group
            self.guard.answer_limit = min(wire.largest_value(s.codec(d)) for s in sessions
                                          for d in codecs.DIRECTIONS)
        try:
            yield
        finally:
            if self.guard is not None:
                self.guard.answer_limit = None

    def _guarded(self, session: Session, step: int, route: Callable[[Session, int, bytes], bytes],
                 body: bytes) -> bytes:
        if self.guard is not None:  # an answer it cannot encode refuses the step before its update
            self.guard.answer_limit = min(wire.largest_value(session.codec(d)) for d in codecs.DIRECTIONS)
        try:
            return route(session, step, body)
        except BaseException as error:
            self._after_failure(session, step, error)
            raise
        finally:
            if self.guard is not None:  # a replayed step was accepted once: no bound then
                self.guard.answer_limit = None

    def _after_failure(self, session: Session, step: int, error: BaseException) -> None:
        """A step failed: if it consumed the pending forward, the session says so
        (`step_expired`); a guard's refusal counts on the session, which is closed at
        `max_refused_steps` (the refusal then says so, with `session_closed`)."""
        if session.pending_step == step and not self.executor.has_pending((session.session_id, step)) and \
                self.groups.group_of(session.session_id, step) is None:
            self.steps.expire(session)
        self._count_refusal(session, step, error)

    def _count_refusal(self, session: Session, step: int, error: BaseException) -> None:
        """A guard's refusal counts on the session, closed at `max_refused_steps`."""
        if not isinstance(error, RequestRefused) or error.code not in GUARD_CODES:
            return
        session.refused_steps += 1
        self.refused_steps += 1
        limit = self.settings.max_refused_steps
        log.warning("Session %s: step %d refused (%s), %d refused so far", session.session_id, step, error.code,
                    session.refused_steps)
        if session.refused_steps >= limit and self.sessions.get(session.session_id) is session:
            self._let_go(session)
            error.message += (f" The session sent {session.refused_steps} refused steps, the server's limit "
                              f"(max_refused_steps): it is closed.")
            error.args = (error.message,)
            error.details["session_closed"] = True

    def status(self, detailed: bool) -> tuple[bool, dict[str, Any]]:
        """Readiness: (ready, what to say). Without `detailed`, only whether it is ready."""
        writable = self.checkpoint_dir_writable()
        lost = getattr(self.runner, "lost", None)  # --strategy: a worker of the cluster is lost
        ready = writable and self.durable and lost is None
        if not detailed:
            return ready, {"status": "ready" if ready else "worker_lost" if lost else "not_ready"}
        status = "ready" if ready else "checkpoint_dir_not_writable" if not writable else \
            "worker_lost" if lost else "not_durable"
        body: dict[str, Any] = {
            "status": status, "segment": self.entry.name,
            "mode": self.mode, "applied_steps": self.applied_steps, "sessions": len(self.sessions),
            "resumed_from": self.resumed_from, "replayed": self.replayed,
            "refused_steps": self.refused_steps, "updates": self.steps.updates}
        if self.micro.enabled:
            body["micro_batching"] = {"window_ms": self.settings.batch_window_ms,
                                      "max_devices_per_batch": self.settings.max_devices_per_batch,
                                      "backward_timeout_seconds": self.settings.batch_backward_timeout_seconds,
                                      "open_groups": len(self.groups.groups),
                                      "applied_groups": self.groups.applied_groups}
        if self.guard is not None:
            body["guard"] = self.guard.describe()
        if self.fleet is not None:
            body["aggregation"] = self.fleet.aggregator.state()
        if self.settings.strategy != "off":
            body["distributed"] = describe_strategy(self.runner, self.settings.strategy)
        return ready, body

    def predict(self, session: Session, body: bytes) -> bytes:
        return self.steps.predict(session, body)


def _release_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise), so closing many
    sessions shows in the process's RSS."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
