"""The contract of a `SessionStore`, for every store: add its factory to `STORES`.

`StepMachine` mutates the sessions it gets, so `get` must hand back the object that was
added; a checkpoint keeps `Session.persisted()`, so that must round-trip through JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from server_app.sessions import InMemorySessionStore, Session, SessionStore

STORES: list[Callable[[], SessionStore]] = [InMemorySessionStore]


@pytest.fixture(params=STORES, ids=lambda factory: factory.__name__)
def store(request: pytest.FixtureRequest) -> SessionStore:
    return request.param()


def session(session_id: str = "a1", **fields: Any) -> Session:
    return Session(session_id=session_id, token_hash="f" * 64, wire_dtype="float32", **fields)


def test_it_satisfies_the_protocol(store: SessionStore) -> None:
    for name in ("get", "add", "remove", "__len__", "__iter__"):
        assert callable(getattr(store, name)), name


def test_add_then_get_returns_the_same_object(store: SessionStore) -> None:
    kept = session()
    store.add(kept)
    assert store.get("a1") is kept
    kept.next_step, kept.pending_step = 4, 4  # the step machine changes it in place
    found = store.get("a1")
    assert found is not None and (found.next_step, found.pending_step) == (4, 4)


def test_a_missing_id_is_none(store: SessionStore) -> None:
    assert store.get("nope") is None
    store.add(session())
    assert store.get("nope") is None and store.get("A1") is None


def test_remove(store: SessionStore) -> None:
    store.add(session("a1"))
    store.add(session("b2"))
    store.remove("a1")
    assert store.get("a1") is None and store.get("b2") is not None and len(store) == 1
    store.remove("a1")  # again, and an id never added: not an error
    store.remove("never")
    assert len(store) == 1


def test_an_id_cannot_be_added_twice(store: SessionStore) -> None:
    first = session()
    store.add(first)
    with pytest.raises(ValueError, match="a1"):
        store.add(session())
    assert store.get("a1") is first and len(store) == 1


def test_len_and_iteration(store: SessionStore) -> None:
    assert len(store) == 0 and list(store) == []
    added = [session(f"s{i}") for i in range(5)]
    for s in added:
        store.add(s)
    assert len(store) == 5
    assert sorted(s.session_id for s in store) == [f"s{i}" for i in range(5)]
    assert all(any(s is a for a in added) for s in store)


def test_removing_while_iterating_is_allowed(store: SessionStore) -> None:
    for i in range(4):
        store.add(session(f"s{i}"))
    for s in store:
        store.remove(s.session_id)
    assert len(store) == 0


def test_persisted_round_trip(store: SessionStore) -> None:
    """What a checkpoint writes (JSON) gives the same session back, with the applied step's
    answer (a retry after a restart must get it) and without the pending forward's."""
    original = session("c3", next_step=7, pending_step=7, pending_since=12.5, lost_step=None, expired_step=6,
                       applied_steps=5, pending_batch=2, last_forward=(7, b"fwd"), last_backward=(6, b"bwd"),
                       refused_steps=2, last_seen=123.5)
    data = json.loads(json.dumps(original.persisted()))
    assert "last_forward" not in data and data["last_backward"] == [6, "Yndk"]
    assert "last_seen" not in data and data["refused_steps"] == 2  # a monotonic time means nothing later
    restored = Session(**data)
    store.add(restored)
    found = store.get("c3")
    assert found is restored
    assert found.persisted() == original.persisted()
    assert found.last_forward is None and found.last_backward == (6, b"bwd") and found.last_seen is None
    assert found.public() == {"session_id": "c3", "wire_dtype": "float32", "next_step": 7, "pending_step": 7,
                              "pending_steps": [7], "applied_steps": 5, "refused_steps": 2,
                              "codecs": {"forward": "float32", "backward": "float32"}}
