"""Sessions and where they are kept.

`Session` is one device's step counters and cached answers. A `SessionStore` keeps them
by id; `StepMachine` mutates the objects it gets, so a store hands back the very object
that was added until it is removed. `InMemorySessionStore` is a dict. Another store
(SQLite, say) must pass `tests/test_session_store.py`: append its factory there.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = ["Session", "PendingForward", "SessionStore", "InMemorySessionStore"]


@dataclass
class PendingForward:
    """One forward waiting for its backward: when it came, its batch size, its cached answer
    (a retry gets these bytes) and its logged blobs (re-logged by a checkpoint)."""

    since: float
    batch: int | None
    answer: bytes
    blobs: list[bytes] | None = None


@dataclass
class Session:
    session_id: str
    token_hash: str
    wire_dtype: str
    next_step: int = 0
    pending_step: int | None = None
    pending_since: float = 0.0
    lost_step: int | None = None  # pending when the server restarted
    expired_step: int | None = None
    applied_steps: int = 0
    pending_batch: int | None = None  # batch size of the pending forward (its gradients must match)
    refused_steps: int = 0  # steps the guards refused (out_of_bounds, update_refused)
    # cached responses (step, bytes) for exactly-once retries; the applied step's answer is
    # persisted (a checkpoint taken right after an update must still answer its retry)
    last_forward: tuple[int, bytes] | None = None
    last_backward: tuple[int, bytes] | None = None
    # monotonic time of the session's last request in this process (None: none yet); not persisted
    last_seen: float | None = None
    # the pending forward's logged blobs (its body, a chain's next-server answers): a checkpoint
    # taken while it is pending logs them again, so its tape can be rebuilt after a crash
    pending_blobs: list[bytes] | None = None
    # the codec of each direction ({"forward": spec, "backward": spec}; None: `wire_dtype` both ways)
    codecs: dict[str, str] | None = None
    # top-k error feedback of the answers this server encodes, per direction and tensor; not
    # persisted (after a restart it starts again from zero: at most one step's dropped share lost)
    residuals: dict[str, dict[str, Any]] | None = None
    # pipelining (docs/protocol.md, "Pipelining"): every pending step, oldest first (`pending_step`
    # and the `pending_*` fields above describe the oldest); the steps lost with a restart or
    # dropped by the TTL, oldest first (`lost_step` / `expired_step`: the oldest of them); the
    # answers of the applied steps before `last_backward` (their backward retries), oldest first
    pending_steps: list[int] = field(default_factory=list)
    lost_steps: list[int] = field(default_factory=list)
    expired_steps: list[int] = field(default_factory=list)
    earlier_backwards: list[tuple[int, bytes]] = field(default_factory=list)
    # the pending forwards by step (not persisted: their tapes die with the process)
    pending: dict[int, PendingForward] = field(default_factory=dict, repr=False)

    # ---- the pending steps (every change goes through these, so the fields agree) -----------
    def add_pending(self, step: int, forward: PendingForward) -> None:
        """`step`'s forward is pending (newer than every pending one)."""
        self.pending[step] = forward
        self.pending_steps.append(step)
        self._sync_oldest()

    def pop_oldest(self) -> int | None:
        """Forget the oldest pending step (its backward was applied, or it is dropped)."""
        if not self.pending_steps:
            return None
        step = self.pending_steps.pop(0)
        self.pending.pop(step, None)
        self._sync_oldest()
        return step

    def clear_pending(self) -> list[int]:
        """Forget every pending step; returns them, oldest first."""
        steps = list(self.pending_steps)
        self.pending.clear()
        self.pending_steps.clear()
        self._sync_oldest()
        return steps

    def set_lost(self, steps: list[int]) -> None:
        self.lost_steps = sorted(steps)
        self.lost_step = self.lost_steps[0] if self.lost_steps else None

    def set_expired(self, steps: list[int]) -> None:
        self.expired_steps = sorted(steps)
        self.expired_step = self.expired_steps[0] if self.expired_steps else None

    def cached_backward(self, step: int) -> bytes | None:
        """The answer of an applied step's backward (or train), if it is still kept."""
        for applied, answer in [*self.earlier_backwards, *([self.last_backward] if self.last_backward else [])]:
            if applied == step:
                return answer
        return None

    def keep_backward(self, step: int, answer: bytes, keep: int) -> None:
        """`step`'s answer becomes `last_backward`; the `keep - 1` before it stay for retries."""
        if self.last_backward is not None and keep > 1:
            self.earlier_backwards = [*self.earlier_backwards, self.last_backward][-(keep - 1):]
        else:
            self.earlier_backwards = []
        self.last_backward = (step, answer)

    def _sync_oldest(self) -> None:
        oldest = self.pending.get(self.pending_steps[0]) if self.pending_steps else None
        self.pending_step = self.pending_steps[0] if self.pending_steps else None
        if oldest is None:
            self.pending_blobs, self.pending_batch = None, None
        else:
            self.pending_since, self.pending_batch, self.pending_blobs = oldest.since, oldest.batch, oldest.blobs

    def codec(self, direction: str) -> str:
        """The codec spec of `direction` ("forward" or "backward")."""
        return self.codecs[direction] if self.codecs else self.wire_dtype

    def residuals_of(self, direction: str) -> dict[str, Any]:
        """The top-k residuals of the answers in `direction` (created empty)."""
        if self.residuals is None:
            self.residuals = {}
        return self.residuals.setdefault(direction, {})

    def public(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "wire_dtype": self.wire_dtype,
                "codecs": {d: self.codec(d) for d in ("forward", "backward")},
                "next_step": self.next_step, "pending_step": self.pending_step,
                "pending_steps": list(self.pending_steps),
                "applied_steps": self.applied_steps, "refused_steps": self.refused_steps}

    def __post_init__(self) -> None:
        if isinstance(self.last_backward, list):  # as persisted: [step, base64 of the answer]
            step, answer = self.last_backward
            self.last_backward = (int(step), base64.b64decode(answer))
        self.earlier_backwards = [(int(step), base64.b64decode(answer) if isinstance(answer, str) else answer)
                                  for step, answer in self.earlier_backwards]
        if self.pending_step is not None and not self.pending_steps:  # as a checkpoint before pipelining
            self.pending_steps = [self.pending_step]
        if self.lost_step is not None and not self.lost_steps:
            self.lost_steps = [self.lost_step]
        if self.expired_step is not None and not self.expired_steps:
            self.expired_steps = [self.expired_step]

    def persisted(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON-ready); `Session(**persisted())` restores it."""
        data = asdict(self)
        for transient in ("last_forward", "last_seen", "pending_blobs", "residuals", "pending"):
            data.pop(transient)
        if self.last_backward is not None:
            data["last_backward"] = [self.last_backward[0], base64.b64encode(self.last_backward[1]).decode()]
        data["earlier_backwards"] = [[step, base64.b64encode(answer).decode()]
                                     for step, answer in self.earlier_backwards]
        return data


class SessionStore(Protocol):
    """The sessions by id. `get` returns the object `add` was given (mutated in place)."""

    def get(self, session_id: str) -> Session | None: ...

    def add(self, session: Session) -> None:
        """Keep `session`; `ValueError` if its id is taken."""
        ...

    def remove(self, session_id: str) -> None:
        """Forget the session; an unknown id is not an error."""
        ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Session]: ...


class InMemorySessionStore:
    """Sessions in a dict (they survive a restart through the checkpoint)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def __getitem__(self, session_id: str) -> Session:
        """`store[id]`, `KeyError` if unknown: for tests and debugging, not part of `SessionStore`."""
        return self._sessions[session_id]

    def add(self, session: Session) -> None:
        if session.session_id in self._sessions:
            raise ValueError(f"A session with id '{session.session_id}' is already stored.")
        self._sessions[session.session_id] = session

    def remove(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))
