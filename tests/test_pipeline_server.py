"""Pipelining on the server (docs/protocol.md, "Pipelining"): several pending steps per
session. The step machine on the fake executor of test_step_machine.py: the order rules
(`pipeline_full`, FIFO backwards), exactly-once retries of every pending forward and of
the last `max_pending_steps` backwards, the TTL drop, a restart, the write-ahead log's
re-logged pending forwards; then the session-open answer and the state route through the
in-process app.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from server_fixtures import KEY, LiveApp, bearer, make_split, settings_for
from test_step_machine import TTL, Machine, g, refused, x

from server_app.sessions import Session
from server_app.step_machine import StepMachine
from server_app.wal import Record


def pipelined(depth: int) -> Machine:
    m = Machine()
    m.steps.max_pending_steps = depth
    return m


def test_forwards_while_steps_are_pending_up_to_the_limit_then_pipeline_full() -> None:
    m = pipelined(3)
    answers = [m.steps.forward(m.session, k, x(seed=k)) for k in range(3)]
    assert m.session.pending_steps == [0, 1, 2] and m.session.pending_step == 0
    before = m.state()
    error = refused(m.steps.forward, m.session, 3, x(seed=3))
    assert error.code == "pipeline_full" and error.details == {"expected_step": 0}
    assert "send the backward of step 0 before forward 3" in error.message
    assert m.state() == before  # a refusal changes nothing
    for k in range(3):  # each pending forward's retry: its own bytes, nothing runs
        assert m.steps.forward(m.session, k, x(seed=k)) == answers[k]
    assert m.executor.ran("forward") == 3
    m.steps.backward(m.session, 0, g())
    m.steps.forward(m.session, 3, x(seed=3))
    assert m.session.pending_steps == [1, 2, 3]


def test_a_forward_must_be_newer_than_every_pending_step() -> None:
    m = pipelined(4)
    m.steps.forward(m.session, 2, x())
    m.steps.forward(m.session, 5, x(seed=5))
    for step in (1, 3, 4):
        error = refused(m.steps.forward, m.session, step, x(seed=step))
        assert error.code == "step_out_of_order" and error.expected_step == 2
    m.steps.forward(m.session, 6, x(seed=6))  # skipping numbers is allowed, as without pipelining
    assert m.session.pending_steps == [2, 5, 6]


def test_backwards_are_fifo() -> None:
    m = pipelined(4)
    for k in range(3):
        m.steps.forward(m.session, k, x(seed=k))
    before = m.state()
    for step in (1, 2):
        error = refused(m.steps.backward, m.session, step, g())
        assert error.code == "step_out_of_order" and error.expected_step == 0
        assert "Step 0 is waiting for its backward" in error.message
    assert m.state() == before
    for k in range(3):
        m.steps.backward(m.session, k, g(seed=k))
        assert m.session.next_step == k + 1 and m.session.applied_steps == k + 1
    assert m.session.pending_steps == [] and m.session.pending_step is None
    assert m.executor.ran("backward") == 3 and m.steps.applied_steps == 3


def test_the_last_max_pending_backwards_answer_their_retries_once() -> None:
    m = pipelined(3)
    backs = {}
    for k in range(5):
        m.steps.forward(m.session, k, x(seed=k))
        backs[k] = m.steps.backward(m.session, k, g(seed=k))
    for k in (2, 3, 4):  # the last 3 applied steps
        assert m.steps.backward(m.session, k, g(seed=k)) == backs[k]
    assert m.executor.ran("backward") == 5 and m.session.applied_steps == 5
    for k in (0, 1):  # older ones are forgotten: refused, nothing applied
        assert refused(m.steps.backward, m.session, k, g()).code == "step_out_of_order"
    data = json.loads(json.dumps(m.session.persisted()))  # the kept answers survive a checkpoint
    restored = Session(**data)
    assert [restored.cached_backward(k) for k in (2, 3, 4)] == [backs[2], backs[3], backs[4]]


def test_a_ttl_drop_of_the_oldest_drops_every_later_pending_step() -> None:
    m = pipelined(4)
    m.steps.forward(m.session, 0, x())
    m.clock.now += 2
    m.steps.forward(m.session, 1, x(seed=1))
    m.steps.forward(m.session, 2, x(seed=2))
    m.clock.now += TTL - 1  # only step 0 is past the TTL
    assert m.steps.sweep_expired() == 1
    assert m.session.pending_steps == [] and m.session.expired_steps == [0, 1, 2]
    assert m.session.next_step == 0 and m.executor.pending == {}
    for step in (0, 1, 2):
        assert refused(m.steps.backward, m.session, step, g()).code == "step_expired"
    m.steps.forward(m.session, 0, x())  # resent, oldest first
    assert m.session.expired_steps == [1, 2]
    m.steps.backward(m.session, 0, g())
    m.steps.forward(m.session, 1, x(seed=1))
    assert m.session.expired_steps == [2] and m.session.pending_steps == [1]


def test_after_a_restart_every_pending_step_is_forward_lost() -> None:
    m = pipelined(4)
    m.steps.forward(m.session, 0, x())
    m.steps.backward(m.session, 0, g())
    for k in (1, 2, 3):
        m.steps.forward(m.session, k, x(seed=k))
    saved = json.loads(json.dumps(m.steps.persisted()))
    fresh = Machine()
    fresh.store.remove("s1")
    fresh.steps.max_pending_steps = 4
    fresh.steps.restore(1, saved)
    session = fresh.store["s1"]
    assert (session.next_step, session.pending_steps, session.lost_steps) == (1, [], [1, 2, 3])
    assert session.public()["pending_step"] is None and session.public()["pending_steps"] == []
    for step in (1, 2, 3):
        error = refused(fresh.steps.backward, session, step, g())
        assert error.code == "forward_lost" and error.expected_step == step
    for k in (1, 2, 3):  # resent oldest first: the same answers as before the restart
        assert fresh.steps.forward(session, k, x(seed=k)) == m.session.pending[k].answer
        assert session.lost_steps == [s for s in (1, 2, 3) if s > k]
    for k in (1, 2, 3):
        fresh.steps.backward(session, k, g(seed=k))
    assert session.applied_steps == 4 and fresh.executor.ran("backward") == 3


def test_a_checkpoint_relogs_every_pending_forward_and_replay_rebuilds_them() -> None:
    journal: list[Record] = []
    m = pipelined(4)
    m.steps.journal = journal.append
    for k in range(3):
        m.steps.forward(m.session, k, x(seed=k))
    records = m.steps.pending_records()
    assert [(r.kind, r.fields["step"]) for r in records] == [("pending", 0), ("pending", 1), ("pending", 2)]
    assert [r.blobs[0] for r in records] == [x(seed=k) for k in range(3)]
    fresh = Machine()
    fresh.store.remove("s1")
    fresh.steps.max_pending_steps = 1  # replay does not refuse what the log accepted
    fresh.executor.isolated = _null_context  # type: ignore[attr-defined]
    fresh.steps.restore(0, json.loads(json.dumps(m.steps.persisted())))
    for record in records:
        fresh.steps.replay(record)
    session = fresh.store["s1"]
    assert session.pending_steps == [0, 1, 2] and session.lost_steps == []
    assert [session.pending[k].blobs for k in range(3)] == [r.blobs for r in records]
    assert session.pending_blobs == records[0].blobs
    fresh.steps.max_pending_steps = 4
    for k in range(3):
        fresh.steps.backward(session, k, g(seed=k))
    assert session.applied_steps == 3


def test_without_pipelining_a_forward_while_pending_is_out_of_order_as_before() -> None:
    m = Machine()
    assert m.steps.max_pending_steps == 1
    m.steps.forward(m.session, 0, x())
    error = refused(m.steps.forward, m.session, 1, x(seed=1))
    assert error.code == "step_out_of_order" and error.expected_step == 0


def test_close_drops_every_pending_tape() -> None:
    m = pipelined(4)
    for k in range(3):
        m.steps.forward(m.session, k, x(seed=k))
    m.steps.close(m.session)
    assert m.executor.pending == {} and len(m.store) == 0


def test_max_pending_steps_must_be_positive() -> None:
    m = Machine()
    with pytest.raises(ValueError, match="max_pending_steps must be >= 1, got 0"):
        StepMachine(m.store, m.executor, m.bodies, "u_shaped", TTL, max_pending_steps=0)


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ----------------------------------------------------------------------------- through HTTP


def act() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)


def test_open_answer_and_state_say_the_pipeline(tmp_path: Path) -> None:
    live = LiveApp(settings_for(make_split(tmp_path / "u", "u_shaped"), max_pending_steps=3))
    try:
        opened = live.post("/v1/sessions", json={}, headers=bearer(KEY)).json()
        assert opened["max_pending_steps"] == 3
        sid, token = opened["session_id"], opened["token"]
        for k in range(3):
            assert live.post(f"/v1/sessions/{sid}/forward", step=k, tensors={"h": act()}, token=token
                             ).status_code == 200
        state = live.get(f"/v1/sessions/{sid}", token=token).json()
        assert state["pending_step"] == 0 and state["pending_steps"] == [0, 1, 2]
        full = live.post(f"/v1/sessions/{sid}/forward", step=3, tensors={"h": act()}, token=token)
        assert full.status_code == 409 and full.json()["error"]["code"] == "pipeline_full"
        assert full.json()["error"]["expected_step"] == 0
        for k in range(3):  # FIFO through HTTP too
            assert live.post(f"/v1/sessions/{sid}/backward", step=k, tensors={"m": act()}, token=token
                             ).status_code == 200
        assert live.get(f"/v1/sessions/{sid}", token=token).json()["applied_steps"] == 3
    finally:
        live.close()
