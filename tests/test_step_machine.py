"""The step state machine alone, on a fake executor (no model, no TensorFlow in the machine):
exactly-once retries, the refusals with their codes and `expected_step`, the TTL sweep,
recovery after a restart, and that a refused request changes nothing. The same rules are
tested through HTTP on a real segment in test_server_asgi.py.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from server_app.bodies import TensorBodies
from server_app.sessions import InMemorySessionStore, Session
from server_app.step_machine import StepKey, StepMachine
from splitkeras import wire
from splitkeras.errors import RequestRefused, WireFormatError
from splitkeras.tensor_spec import TensorSpec

INPUTS = [TensorSpec("h", (None, 3), "float32")]
OUTPUTS = [TensorSpec("m", (None, 2), "float32")]
MODEL_OUTPUTS = [TensorSpec("logits", (None, 2), "float32")]
TTL = 5.0


class FakeExecutor:
    """Outputs 2*x[:, :2], input gradients 3*g padded; counts every call and keeps 'tapes'."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.pending: dict[StepKey, int] = {}
        self.output_scale = 2.0

    def forward(self, key: StepKey, inputs: list[np.ndarray]) -> tuple[list[Any], float]:
        self.calls.append(("forward", key))
        self.pending[key] = len(inputs[0])
        return [self.output_scale * inputs[0][:, :2]], 0.25

    def backward(self, key: StepKey, output_grads: list[np.ndarray]) -> list[Any | None]:
        self.calls.append(("backward", key))
        del self.pending[key]
        g = output_grads[0]
        return [3.0 * np.concatenate([g, g[:, :1]], axis=1)]

    def train(self, key: StepKey, inputs: list[np.ndarray], y: Any,
              sample_weight: np.ndarray | None) -> tuple[list[Any | None], dict[str, Any]]:
        self.calls.append(("train", key))
        return [0.5 * inputs[0]], {"loss": np.float32(1.5), "accuracy": 0.5}

    def predict(self, inputs: list[np.ndarray]) -> list[Any]:
        self.calls.append(("predict", None))
        return [inputs[0][:, :2]]

    def drop(self, key: StepKey) -> None:
        self.calls.append(("drop", key))
        self.pending.pop(key, None)

    def ran(self, kind: str) -> int:
        return sum(1 for k, _ in self.calls if k == kind)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Machine:
    """A StepMachine on a fake executor, a store, a fake clock, and one open session."""

    def __init__(self, mode: str = "u_shaped", wire_dtype: str = "float32") -> None:
        self.store = InMemorySessionStore()
        self.executor = FakeExecutor()
        self.clock = Clock()
        self.applied_hooks = 0
        loss = "sparse_categorical_crossentropy" if mode == "labels_on_server" else None
        self.bodies = TensorBodies(INPUTS, OUTPUTS, MODEL_OUTPUTS, loss, max_batch=8)
        self.steps = StepMachine(self.store, self.executor, self.bodies, mode, TTL,
                                 on_applied=self._hook, clock=self.clock)
        self.session = Session("s1", "hash", wire_dtype)
        self.store.add(self.session)

    def _hook(self) -> None:
        self.applied_hooks += 1

    def state(self) -> Any:
        """Everything a refusal must leave alone."""
        return copy.deepcopy(([(s.persisted(), s.last_forward, s.last_backward) for s in self.store],
                              self.steps.applied_steps, self.applied_hooks,
                              list(self.executor.calls), dict(self.executor.pending)))


def x(batch: int = 2, seed: int = 0) -> bytes:
    return wire.encode({"h": np.random.default_rng(seed).standard_normal((batch, 3)).astype(np.float32)})


def g(batch: int = 2, seed: int = 1) -> bytes:
    return wire.encode({"m": np.random.default_rng(seed).standard_normal((batch, 2)).astype(np.float32)})


def train_body(batch: int = 2, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return wire.encode({"h": rng.standard_normal((batch, 3)).astype(np.float32),
                        "label:logits": rng.integers(0, 2, batch).astype(np.int32)})


def refused(function: Callable[..., Any], *args: Any) -> RequestRefused:
    with pytest.raises(RequestRefused) as caught:
        function(*args)
    return caught.value


# ----------------------------------------------------------------------------- retries


def test_forward_and_backward_retries_return_the_same_bytes_and_run_once() -> None:
    m = Machine()
    first = m.steps.forward(m.session, 0, x())
    assert m.steps.forward(m.session, 0, x()) == first
    assert m.executor.ran("forward") == 1 and m.session.pending_step == 0
    tensors, metadata = wire.decode(first)
    assert tensors["m"].shape == (2, 2)
    assert metadata == {"step": "0", "regularization_loss": "0.25"}

    back = m.steps.backward(m.session, 0, g())
    assert m.steps.backward(m.session, 0, g()) == back
    assert m.steps.forward(m.session, 0, x()) == first  # the forward of a finished step, too
    assert m.executor.ran("backward") == 1 and m.executor.ran("forward") == 1
    assert (m.session.next_step, m.session.pending_step, m.session.applied_steps) == (1, None, 1)
    assert m.steps.applied_steps == 1 and m.applied_hooks == 1
    assert wire.decode(back)[1] == {"step": "0"}


def test_train_retry_returns_the_same_bytes_and_applies_once() -> None:
    m = Machine("labels_on_server")
    first = m.steps.train(m.session, 0, train_body())
    assert m.steps.train(m.session, 0, train_body()) == first
    assert m.executor.ran("train") == 1 and m.steps.applied_steps == 1 and m.applied_hooks == 1
    _, metadata = wire.decode(first)
    assert metadata == {"step": "0", "loss": "1.5", "accuracy": "0.5"}
    assert m.session.next_step == 1


def test_a_retry_with_a_bad_body_is_refused_not_answered_from_the_cache() -> None:
    m = Machine()
    m.steps.forward(m.session, 0, x())
    before = m.state()
    with pytest.raises(WireFormatError):
        m.steps.forward(m.session, 0, x()[:-4])
    assert m.state() == before


def test_a_step_may_skip_ahead_and_predict_changes_nothing() -> None:
    m = Machine()
    m.steps.forward(m.session, 5, x())
    m.steps.backward(m.session, 5, g())
    assert m.session.next_step == 6
    before = m.state()[:3]
    out, metadata = wire.decode(m.steps.predict(m.session, x(3)))
    assert out["m"].shape == (3, 2) and metadata == {}
    assert m.state()[:3] == before


# ---------------------------------------------------------------------------- refusals


def _pending(m: Machine) -> None:
    m.steps.forward(m.session, 0, x())


def _two_done(m: Machine) -> None:
    for k in range(2):
        m.steps.forward(m.session, k, x(seed=k))
        m.steps.backward(m.session, k, g())


OUT_OF_ORDER = [
    ("backward_without_forward", lambda m: None, "backward", 0, 0, r"^Expected forward for step 0 or later, "
     r"got backward for step 0\.$"),
    ("forward_skips_pending", _pending, "forward", 1, 0,
     r"^Step 0 is waiting for its backward; got forward for step 1\.$"),
    ("backward_other_step", _pending, "backward", 1, 0, r"^Step 0 is waiting for its backward; got backward"),
    ("forward_finished_step", _two_done, "forward", 0, 2,
     r"^Expected forward for step 2 or later, got forward for step 0\.$"),
    ("backward_finished_step", _two_done, "backward", 0, 2, r"^Expected forward for step 2 or later"),
]


@pytest.mark.parametrize("prepare,route,step,expected,pattern", [c[1:] for c in OUT_OF_ORDER],
                         ids=[c[0] for c in OUT_OF_ORDER])
def test_out_of_order_steps_are_refused_with_the_expected_step(
        prepare: Callable[[Machine], None], route: str, step: int, expected: int, pattern: str) -> None:
    m = Machine()
    prepare(m)
    before = m.state()
    body = x() if route == "forward" else g()
    error = refused(getattr(m.steps, route), m.session, step, body)
    assert error.code == "step_out_of_order" and error.details == {"expected_step": expected}
    assert error.expected_step == expected
    assert re.search(pattern, error.message), error.message
    assert m.state() == before


def test_train_of_a_finished_step_is_refused() -> None:
    m = Machine("labels_on_server")
    m.steps.train(m.session, 0, train_body())
    m.steps.train(m.session, 1, train_body(seed=1))
    before = m.state()
    error = refused(m.steps.train, m.session, 0, train_body(seed=2))  # not the cached body: a new one
    assert error.code == "step_out_of_order" and error.expected_step == 2
    assert error.message == "Expected train for step 2 or later, got train for step 0."
    assert m.state() == before


REFUSED = [
    ("wrong_mode_train", "u_shaped", None, "train", 0, train_body, "wrong_mode"),
    ("wrong_mode_forward", "labels_on_server", None, "forward", 0, x, "wrong_mode"),
    ("wrong_mode_backward", "labels_on_server", None, "backward", 0, g, "wrong_mode"),
    ("gradient_batch", "u_shaped", _pending, "backward", 0, lambda: g(3), "bad_tensor"),
    ("bad_label", "labels_on_server", None, "train", 0,
     lambda: wire.encode({"h": np.zeros((2, 3), np.float32), "label:logits": np.array([0, 7], np.int32)}),
     "bad_tensor"),
    ("out_of_order", "u_shaped", _pending, "forward", 3, x, "step_out_of_order"),
]


@pytest.mark.parametrize("mode,prepare,route,step,body,code", [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
def test_a_refused_step_changes_nothing(mode: str, prepare: Callable[[Machine], None] | None, route: str,
                                        step: int, body: Callable[[], bytes], code: str) -> None:
    m = Machine(mode)
    if prepare:
        prepare(m)
    before = m.state()
    assert refused(getattr(m.steps, route), m.session, step, body()).code == code
    assert m.state() == before


def test_wrong_mode_messages() -> None:
    m = Machine()
    assert refused(m.steps.train, m.session, 0, train_body()).message == \
        "This split's server segment runs in mode 'u_shaped': use forward/backward, not train."
    m = Machine("labels_on_server")
    assert refused(m.steps.forward, m.session, 0, x()).message == \
        "This split's server segment runs in mode 'labels_on_server': use train, not forward."


def test_a_job_for_a_closed_session_is_refused_and_runs_nothing() -> None:
    m = Machine()
    m.steps.forward(m.session, 0, x())
    m.steps.close(m.session)
    assert m.executor.calls[-1] == ("drop", ("s1", 0)) and not m.executor.pending
    assert m.store.get("s1") is None
    before = m.state()
    for route, body in (("forward", x()), ("backward", g())):
        error = refused(getattr(m.steps, route), m.session, 1, body)
        assert error.code == "unknown_session" and "'s1' was closed" in error.message
    assert refused(m.steps.predict, m.session, x()).code == "unknown_session"
    assert m.state() == before


def test_an_answer_that_cannot_be_encoded_leaves_no_step_pending() -> None:
    m = Machine(wire_dtype="float16")
    m.executor.output_scale = 1e6  # beyond float16's range
    before_session = m.session.persisted()
    with pytest.raises(WireFormatError, match="float16"):
        m.steps.forward(m.session, 0, x())
    assert m.executor.calls == [("forward", ("s1", 0)), ("drop", ("s1", 0))] and not m.executor.pending
    assert m.session.persisted() == before_session and m.session.last_forward is None


# ------------------------------------------------------------------------------- TTL


def test_the_ttl_sweep_drops_old_pending_steps() -> None:
    m = Machine()
    other = Session("s2", "hash", "float32")
    m.store.add(other)
    m.steps.forward(m.session, 0, x())
    m.clock.now += 0.8 * TTL
    m.steps.forward(other, 4, x())
    m.clock.now += 0.2 * TTL  # s1 has waited exactly the TTL: not longer yet
    assert m.steps.sweep_expired() == 0
    m.clock.now += 0.01  # s1 is past the TTL, s2 is not
    assert m.steps.sweep_expired() == 1
    assert m.executor.calls[-1] == ("drop", ("s1", 0)) and list(m.executor.pending) == [("s2", 4)]
    assert (m.session.pending_step, m.session.expired_step, m.session.next_step) == (None, 0, 0)
    assert other.pending_step == 4
    assert m.steps.sweep_expired() == 0  # nothing left to drop in s1

    before = m.state()
    error = refused(m.steps.backward, m.session, 0, g())
    assert error.code == "step_expired" and error.expected_step == 0
    assert error.message == ("Step 0 waited longer than 5 s for its backward and was dropped. "
                             "Send forward for step 0 again.")
    assert m.state() == before
    m.steps.forward(m.session, 0, x())  # the device resends it
    assert m.session.expired_step is None
    m.steps.backward(m.session, 0, g())
    assert m.steps.applied_steps == 1


# --------------------------------------------------------------------------- restart


def test_restore_after_a_restart_marks_the_pending_step_lost() -> None:
    m = Machine()
    m.steps.forward(m.session, 0, x())
    m.steps.backward(m.session, 0, g())
    m.steps.forward(m.session, 1, x(seed=3))
    saved = m.steps.persisted()
    assert saved == [m.session.persisted()] and "last_forward" not in saved[0]
    assert saved[0]["last_backward"][0] == 0  # the applied step's answer survives a restart

    again = Machine()
    again.store.remove("s1")
    again.steps.restore(7, saved)
    session = again.store.get("s1")
    assert session is not None and again.steps.applied_steps == 7
    assert (session.next_step, session.pending_step, session.lost_step, session.applied_steps) == (1, None, 1, 1)
    assert session.last_forward is None and session.last_backward == m.session.last_backward

    before = again.state()
    error = refused(again.steps.backward, session, 1, g())
    assert error.code == "forward_lost" and error.expected_step == 1
    assert error.message == ("The forward pass of step 1 was lost when the server restarted. Send forward "
                             "for step 1 again with the same activations, then backward.")
    assert refused(again.steps.forward, session, 0, x()).expected_step == 1  # no going back
    assert again.state() == before
    resent = again.steps.forward(session, 1, x(seed=3))
    assert resent == m.session.last_forward[1]  # same executor, same activations: the same answer
    assert session.lost_step is None
    again.steps.backward(session, 1, g())
    assert (session.next_step, session.applied_steps, again.steps.applied_steps) == (2, 2, 8)


def test_restore_keeps_sessions_without_a_pending_step_as_they_were() -> None:
    m = Machine()
    data = Session("s9", "h9", "float16", next_step=4, applied_steps=3).persisted()
    m.steps.restore(3, [data])
    session = m.store.get("s9")
    assert session is not None and session.persisted() == data and session.lost_step is None
