"""Sessions and where they are kept.

`Session` is one device's step counters and cached answers. A `SessionStore` keeps them
by id; `StepMachine` mutates the objects it gets, so a store hands back the very object
that was added until it is removed. `InMemorySessionStore` is a dict. Another store
(SQLite, say) must pass `tests/test_session_store.py`: append its factory there.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

__all__ = ["Session", "SessionStore", "InMemorySessionStore"]


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
                "applied_steps": self.applied_steps, "refused_steps": self.refused_steps}

    def __post_init__(self) -> None:
        if isinstance(self.last_backward, list):  # as persisted: [step, base64 of the answer]
            step, answer = self.last_backward
            self.last_backward = (int(step), base64.b64decode(answer))

    def persisted(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON-ready); `Session(**persisted())` restores it."""
        data = asdict(self)
        for transient in ("last_forward", "last_seen", "pending_blobs", "residuals"):
            data.pop(transient)
        if self.last_backward is not None:
            data["last_backward"] = [self.last_backward[0], base64.b64encode(self.last_backward[1]).decode()]
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
