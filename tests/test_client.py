"""The device client: `Transport` against an in-memory fake of the protocol
(`httpx.MockTransport`), then `DeviceClient` against the real server app in process
(Starlette's test transport), then the `train` command's one-line errors.

End-to-end runs over a real socket live in `test_e2e_http.py`.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from splitkeras import wire
from splitkeras.client import NetworkConditions, Transport
from splitkeras.errors import ProtocolError, RequestRefused
from splitkeras.protocol import STEP_HEADER, parse_step

KEY = "test-key"
URL = "http://splitkeras.test"


# ---- an in-memory server that follows docs/protocol.md ---------------------------------------------
class FakeServer:
    """One segment `b = 2 * a` (U-shaped) or a loss `sum(a)` (labels on server), with the
    step state machine of the protocol. `before` faults run before a request is handled
    (an exception or a response replaces it); `drop` names routes whose next answer is
    lost after the server has acted on the request."""

    def __init__(self, mode: str = "u_shaped") -> None:
        self.mode = mode
        self.sessions: dict[str, dict[str, Any]] = {}
        self.applied = 0
        self.opened = 0
        self.log: list[tuple[str, str, bytes]] = []
        self.steps: list[str | None] = []  # the Splitkeras-Step header of each request in the log
        self.before: list[Callable[[httpx.Request], Any]] = []
        self.drop: list[str] = []

    # -- faults and restarts --
    def restart(self, keep_sessions: bool = True) -> None:
        if not keep_sessions:
            self.sessions.clear()
        for session in self.sessions.values():
            if session["pending"] is not None:
                session["lost"], session["next"], session["pending"] = session["pending"], session["pending"], None
            session["last_forward"] = session["last_backward"] = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.log.append((request.method, request.url.path, body))
        self.steps.append(request.headers.get(STEP_HEADER))
        if self.before:
            fault = self.before.pop(0)(request)
            if isinstance(fault, Exception):
                raise fault
            if isinstance(fault, httpx.Response):
                return fault
        response = self.handle(request, body)
        route = request.url.path.rsplit("/", 1)[-1]
        if route in self.drop:
            self.drop.remove(route)
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    # -- the protocol --
    @staticmethod
    def error(status: int, code: str, message: str, **extra: Any) -> httpx.Response:
        return httpx.Response(status, json={"error": {"code": code, "message": message, **extra}})

    @staticmethod
    def tensors(data: dict[str, np.ndarray], **metadata: str) -> httpx.Response:
        return httpx.Response(200, content=wire.encode(data, metadata=metadata or None),
                              headers={"content-type": wire.MEDIA_TYPE})

    def handle(self, request: httpx.Request, body: bytes) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        bearer = request.headers.get("authorization", "")[7:]
        if parts == ["v1", "sessions"] and request.method == "POST":
            if bearer != KEY:
                return self.error(401, "unauthorized", "Opening a session needs the server key.")
            self.opened += 1
            sid = f"s{self.opened}"
            self.sessions[sid] = dict(token=f"t{self.opened}", next=0, pending=None, lost=None,
                                      last_forward=None, last_backward=None, applied=0,
                                      wire=json.loads(body)["wire_dtype"])
            return httpx.Response(201, json={"session_id": sid, "token": f"t{self.opened}",
                                             "wire_dtype": "float32", "segment": "middle",
                                             "mode": self.mode, "max_batch": 64, "next_step": 0,
                                             "inputs": [], "outputs": []})
        session = self.sessions.get(parts[2])
        if session is None:
            return self.error(404, "unknown_session", f"No session '{parts[2]}'.")
        if bearer != session["token"]:
            return self.error(401, "unauthorized", "Wrong token.")
        if request.method == "DELETE":
            del self.sessions[parts[2]]
            return httpx.Response(204)
        if request.method == "GET":
            return httpx.Response(200, json={"session_id": parts[2], "next_step": session["next"],
                                             "pending_step": session["pending"],
                                             "applied_steps": session["applied"]})
        if parts[3] == "predict":
            tensors, _ = wire.decode(body)
            return self.tensors({"b": 2 * tensors["a"]})
        try:  # the step number, refused as the server refuses it
            step = parse_step(request.headers.get_list(STEP_HEADER))
        except RequestRefused as refusal:
            return self.error(400, refusal.code, refusal.message)
        return getattr(self, parts[3])(session, step, body)

    def out_of_order(self, session: dict[str, Any], step: int, route: str) -> httpx.Response:
        if route == "backward" and step == session["lost"]:
            return self.error(409, "forward_lost", f"Forward of step {step} lost.", expected_step=step)
        expected = session["pending"] if session["pending"] is not None else session["next"]
        return self.error(409, "step_out_of_order", f"Expected step {expected}, got {step}.",
                          expected_step=expected)

    def forward(self, session: dict[str, Any], step: int, body: bytes) -> httpx.Response:
        cached = session["last_forward"]
        if cached and cached[0] == step and (session["pending"] == step or session["next"] > step):
            return cached[1]
        if session["pending"] is not None or step < session["next"]:
            return self.out_of_order(session, step, "forward")
        tensors, _ = wire.decode(body)
        session["pending"], session["lost"] = step, None
        session["last_forward"] = (step, self.tensors({"b": 2 * tensors["a"]}, regularization_loss="0.25"))
        return session["last_forward"][1]

    def finish(self, session: dict[str, Any], step: int) -> None:
        session["pending"], session["next"] = None, step + 1
        session["applied"] += 1
        self.applied += 1

    def backward(self, session: dict[str, Any], step: int, body: bytes) -> httpx.Response:
        if session["pending"] != step:
            cached = session["last_backward"]
            if cached and cached[0] == step:
                return cached[1]
            return self.out_of_order(session, step, "backward")
        grads, _ = wire.decode(body)
        self.finish(session, step)
        session["last_backward"] = (step, self.tensors({"a": 2 * grads["b"]}))
        return session["last_backward"][1]

    def train(self, session: dict[str, Any], step: int, body: bytes) -> httpx.Response:
        cached = session["last_backward"]
        if cached and cached[0] == step and session["next"] > step:
            return cached[1]
        if step < session["next"]:
            return self.out_of_order(session, step, "train")
        tensors, _ = wire.decode(body)
        if "label:out" not in tensors:
            return self.error(400, "bad_tensor", "The body lacks 'label:out'.")
        self.finish(session, step)
        session["last_backward"] = (step, self.tensors({"a": np.ones_like(tensors["a"])},
                                                       loss="1.5", accuracy="0.5"))
        return session["last_backward"][1]

    def routes(self) -> list[str]:
        """Each request as "METHOD PATH", and " step K" for its Splitkeras-Step header."""
        return [f"{method} {path}" + ("" if step is None else f" step {step}")
                for (method, path, _), step in zip(self.log, self.steps, strict=True)]


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


def make_transport(fake: FakeServer, **options: Any) -> tuple[Transport, list[float]]:
    options = {"backoff": 0.2, "jitter": 0.0, **options}  # exact waits (the defaults are tested apart)
    transport = Transport(URL, key=KEY, http_transport=httpx.MockTransport(fake.handler), **options)
    sleeps: list[float] = []
    transport._http.sleep = sleeps.append  # record the backoff instead of sleeping
    return transport, sleeps


A = np.arange(6, dtype=np.float32).reshape(2, 3)


def one_step(transport: Transport, step: int) -> dict[str, np.ndarray]:
    outputs, metadata = transport.forward(step, {"a": A + step})
    np.testing.assert_array_equal(outputs["b"], 2 * (A + step))
    assert metadata["regularization_loss"] == "0.25"
    return transport.backward(step, {"b": np.ones_like(A)})


# ---- transport: happy path ---------------------------------------------------------------------------
def test_session_uses_the_key_then_the_token_and_counts_bytes(fake: FakeServer) -> None:
    transport, _ = make_transport(fake)
    session = transport.open_session("float16")
    assert session["mode"] == "u_shaped" and transport.wire_dtype == "float16"
    grads = one_step(transport, 0)
    np.testing.assert_array_equal(grads["a"], np.full_like(A, 2.0))
    assert transport.session_state()["next_step"] == 1
    transport.close()
    assert fake.sessions == {}
    assert fake.routes()[:3] == ["POST /v1/sessions", "POST /v1/sessions/s1/forward step 0",
                                 "POST /v1/sessions/s1/backward step 0"]
    assert transport.stats.bytes_sent == sum(len(body) for _, _, body in fake.log)  # bodies only
    assert transport.stats.bytes_received > 2 * A.nbytes
    assert transport.stats.requests == 5 and transport.stats.retries == 0
    # float16 was negotiated: the activations went out as F16
    forward_body = fake.log[1][2]
    assert b'"F16"' in forward_body


def test_device_steps_map_onto_the_session_steps(fake: FakeServer) -> None:
    transport, _ = make_transport(fake)
    for step in (10, 11, 12):  # a device that has trained before starts a new session at 0
        one_step(transport, step)
    steps = [p for p in fake.routes() if " step " in p]
    assert steps[-1] == "POST /v1/sessions/s1/backward step 2"
    # one URL per route, whatever the step: the number is the Splitkeras-Step header
    assert {p.split(" step ")[0] for p in steps} == {"POST /v1/sessions/s1/forward", "POST /v1/sessions/s1/backward"}
    assert [p.split(" step ")[1] for p in steps] == ["0", "0", "1", "1", "2", "2"]
    assert fake.applied == 3


# ---- transport: retries -----------------------------------------------------------------------------
def test_connection_errors_are_retried_with_exponential_backoff(fake: FakeServer) -> None:
    transport, sleeps = make_transport(fake, backoff=0.2)
    transport.open_session()
    refuse = lambda request: httpx.ConnectError("connection refused", request=request)  # noqa: E731
    fake.before = [refuse, refuse, refuse]
    one_step(transport, 0)
    assert sleeps == [0.2, 0.4, 0.8]
    assert transport.stats.retries == 3 and fake.applied == 1


def test_backoff_is_capped_and_retry_after_is_honoured(fake: FakeServer) -> None:
    transport, sleeps = make_transport(fake, backoff=0.5, max_backoff=3.0)
    transport.open_session()
    timeout = lambda request: httpx.ReadTimeout("timed out", request=request)  # noqa: E731
    fake.before = [timeout, lambda r: httpx.Response(503, headers={"retry-after": "2.5"}),
                   lambda r: httpx.Response(502), lambda r: httpx.Response(504), timeout]
    one_step(transport, 0)
    assert sleeps == [0.5, 2.5, 2.0, 3.0, 3.0]  # 0.5 * 2**k, Retry-After 2.5, capped at 3
    assert fake.applied == 1


def test_the_default_retry_budget_outlasts_a_restart_of_a_minute(fake: FakeServer) -> None:
    """12 retries, 0.5 s doubling to 10 s, each wait x [0.75, 1.25]: 64 to 107 s of waiting
    before a request is given up, so a device carries on through a redeploy."""
    from splitkeras.client.transport import retry_budget

    least, most = retry_budget()
    assert 60 < least < 65 and most < 110
    transport = Transport(URL, key=KEY, http_transport=httpx.MockTransport(fake.handler))
    assert (transport.retries, transport.backoff, transport.max_backoff, transport.jitter) == (12, 0.5, 10.0, 0.25)
    sleeps: list[float] = []
    transport._http.sleep = sleeps.append
    transport._http.random.seed(1)
    transport.open_session()
    fake.before = [lambda r: httpx.ConnectError("connection refused", request=r)] * 12
    one_step(transport, 0)  # the 13th attempt gets through
    assert len(sleeps) == 12 and least <= sum(sleeps) <= most
    nominal = [min(0.5 * 2 ** k, 10.0) for k in range(12)]
    assert all(0.75 * n <= s <= 1.25 * n for s, n in zip(sleeps, nominal))
    assert len({round(s / n, 6) for s, n in zip(sleeps, nominal)}) > 1  # jittered, not in lockstep
    with pytest.raises(ValueError, match="jitter"):
        Transport(URL, jitter=1.0)


def test_a_lost_backward_answer_is_not_applied_twice(fake: FakeServer) -> None:
    transport, sleeps = make_transport(fake)
    fake.drop = ["backward"]
    grads = one_step(transport, 0)
    np.testing.assert_array_equal(grads["a"], np.full_like(A, 2.0))
    assert fake.applied == 1  # the retry got the cached answer
    backward_bodies = [body for _, path, body in fake.log if path.endswith("/backward")]
    assert len(backward_bodies) == 2 and backward_bodies[0] == backward_bodies[1]
    assert len(sleeps) == 1


def test_a_lost_forward_answer_resends_the_same_bytes(fake: FakeServer) -> None:
    transport, _ = make_transport(fake)
    fake.drop = ["forward"]
    one_step(transport, 0)
    forwards = [body for _, path, body in fake.log if path.endswith("/forward")]
    assert len(forwards) == 2 and forwards[0] == forwards[1]
    assert fake.applied == 1


def test_retries_exhausted_raise_one_clear_protocol_error(fake: FakeServer) -> None:
    transport, sleeps = make_transport(fake, retries=2)
    transport.open_session()
    fake.before = [lambda r: httpx.ConnectError("connection refused", request=r)] * 3
    with pytest.raises(ProtocolError) as info:
        transport.forward(0, {"a": A})
    message = str(info.value)
    assert "after 3 attempts" in message and "ConnectError: connection refused" in message
    assert URL in message and "splitkeras serve" in message
    assert info.value.status_code == 0 and sleeps == [0.2, 0.4]


def test_a_refusal_is_not_retried_and_carries_the_servers_message(fake: FakeServer) -> None:
    transport, sleeps = make_transport(fake)
    transport.open_session()
    with pytest.raises(ProtocolError) as info:
        transport.train(0, {"a": A})  # no label: 400 bad_tensor
    assert info.value.status_code == 400
    assert str(info.value) == ("The server refused train of step 0 (POST /v1/sessions/s1/train, Splitkeras-Step: 0) "
                               "(400 bad_tensor): The body lacks 'label:out'.")
    assert sleeps == [] and sum("train" in r for r in fake.routes()) == 1


def test_a_wrong_key_says_so() -> None:
    fake = FakeServer()
    transport = Transport(URL, key=None, http_transport=httpx.MockTransport(fake.handler))
    with pytest.raises(ProtocolError) as info:
        transport.open_session()
    assert info.value.status_code == 401
    assert "(401 unauthorized): Opening a session needs the server key." in str(info.value)
    assert "No key was given: pass key=..., `--key`, or set SPLITKERAS_SERVER_KEY." in str(info.value)


def test_an_error_body_that_is_not_json_is_reported_readably(fake: FakeServer) -> None:
    transport, _ = make_transport(fake)
    transport.open_session()
    fake.before = [lambda r: httpx.Response(418, text="<html><b>I'm a\n teapot</b></html>")]
    with pytest.raises(ProtocolError, match=r"\(418 http_error\): HTTP 418 I'm a teapot: "
                                            r"<html><b>I'm a teapot</b></html>"):
        transport.forward(0, {"a": A})


def test_a_malformed_answer_is_a_protocol_error(fake: FakeServer) -> None:
    transport, _ = make_transport(fake)
    transport.open_session()
    fake.before = [lambda r: httpx.Response(200, content=b"\x01\x00")]
    with pytest.raises(ProtocolError, match="The server's forward response is not a valid tensor "
                                            "body: body is 2 bytes"):
        transport.forward(0, {"a": A})


# ---- transport: server restarts ---------------------------------------------------------------------
def test_an_unknown_session_is_reopened_and_the_step_resent(fake: FakeServer) -> None:
    transport, _ = make_transport(fake)
    one_step(transport, 0)
    transport.forward(1, {"a": A + 1})
    fake.restart(keep_sessions=False)  # the server lost its sessions between forward and backward
    grads = transport.backward(1, {"b": np.ones_like(A)})
    np.testing.assert_array_equal(grads["a"], np.full_like(A, 2.0))
    assert transport.session["session_id"] == "s2"
    assert fake.routes()[-3:] == ["POST /v1/sessions", "POST /v1/sessions/s2/forward step 0",
                                  "POST /v1/sessions/s2/backward step 0"]
    one_step(transport, 2)  # device step 2 is the new session's step 1
    assert fake.routes()[-1] == "POST /v1/sessions/s2/backward step 1"
    assert fake.applied == 3 and transport.stats.recoveries == 1


def test_forward_lost_resends_the_same_forward_bytes_then_backward(fake: FakeServer) -> None:
    transport, _ = make_transport(fake)
    transport.forward(0, {"a": A})
    fake.restart(keep_sessions=True)  # sessions back from the checkpoint, the tape gone
    transport.backward(0, {"b": np.ones_like(A)})
    forwards = [body for _, path, body in fake.log if path.endswith("/forward")]
    assert len(forwards) == 2 and forwards[0] == forwards[1]
    assert fake.routes()[-3:] == ["POST /v1/sessions/s1/backward step 0",
                                  "POST /v1/sessions/s1/forward step 0",
                                  "POST /v1/sessions/s1/backward step 0"]
    assert fake.applied == 1


def test_a_server_behind_the_device_is_resynced_to_its_expected_step(fake: FakeServer) -> None:
    transport, _ = make_transport(fake)
    one_step(transport, 0)
    one_step(transport, 1)
    fake.sessions["s1"]["next"] = 5  # e.g. the server's counters moved on
    one_step(transport, 2)
    assert fake.routes()[-4:] == ["POST /v1/sessions/s1/forward step 2", "GET /v1/sessions/s1",
                                  "POST /v1/sessions/s1/forward step 5",
                                  "POST /v1/sessions/s1/backward step 5"]
    one_step(transport, 3)
    assert fake.routes()[-1] == "POST /v1/sessions/s1/backward step 6"


def test_a_step_left_pending_by_an_interrupted_device_moves_to_a_new_session(fake: FakeServer) -> None:
    transport, _ = make_transport(fake)
    transport.forward(0, {"a": A})  # ... and the device crashed before the backward
    one_step(transport, 1)
    assert "DELETE /v1/sessions/s1" in fake.routes()
    assert fake.routes()[-1] == "POST /v1/sessions/s2/backward step 0"
    assert fake.applied == 1


def test_labels_on_server_train(fake: FakeServer) -> None:
    fake.mode = "labels_on_server"
    transport, _ = make_transport(fake)
    fake.drop = ["train"]
    grads, metadata = transport.train(0, {"a": A, "label:out": np.array([1, 2])})
    np.testing.assert_array_equal(grads["a"], np.ones_like(A))
    assert metadata["loss"] == "1.5" and fake.applied == 1


# ---- network emulation ------------------------------------------------------------------------------
def test_network_conditions_delay_and_validation() -> None:
    link = NetworkConditions(latency_s=0.1, bandwidth_bps=8_000)
    assert link.delay(0) == pytest.approx(0.1)
    assert link.delay(1000) == pytest.approx(1.1)
    assert NetworkConditions().delay(10**9) == 0.0
    with pytest.raises(ValueError, match="latency_s must be a finite number of seconds >= 0"):
        NetworkConditions(latency_s=-1)
    with pytest.raises(ValueError, match="bandwidth_bps must be bits per second > 0"):
        NetworkConditions(bandwidth_bps=0)


def test_network_emulation_adds_at_least_the_expected_delay(fake: FakeServer) -> None:
    link = NetworkConditions(latency_s=0.02, bandwidth_bps=400_000)
    transport, _ = make_transport(fake, network=link)
    transport.open_session()
    sent0, received0 = transport.stats.bytes_sent, transport.stats.bytes_received
    big = np.ones((4, 500), np.float32)  # 8000 bytes: 0.16 s at 400 kbit/s
    started = time.perf_counter()
    transport.forward(0, {"a": big})
    elapsed = time.perf_counter() - started
    expected = link.delay(transport.stats.bytes_sent - sent0) + \
        link.delay(transport.stats.bytes_received - received0)
    assert expected > 0.3
    assert elapsed >= expected
    assert transport.stats.seconds >= expected


# ---- DeviceClient against the real server app, in process -------------------------------------------
@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from client_support import make_split_folder

    root = tmp_path_factory.mktemp("splits")
    return {"u_shaped": make_split_folder(root / "u_shaped", "u_shaped"),
            "labels_on_server": make_split_folder(root / "labels_on_server", "labels_on_server")}


def _in_process_server(folder: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from server_app import ServerSettings, create_app

    return TestClient(create_app(ServerSettings(split_dir=folder, key=KEY, checkpoint_every=1000)))


class DroppingTransport(httpx.BaseTransport):
    """Hands requests to `inner` and loses every first answer of each step's routes."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.seen: set[tuple[str, str | None]] = set()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        step = (request.url.path, request.headers.get(STEP_HEADER))
        if step[1] is not None and step not in self.seen:
            self.seen.add(step)
            response.read()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response


def _client(folder: Path, server: Any, dropping: bool = False, **options: Any) -> Any:
    from splitkeras.client import DeviceClient

    inner = server._transport
    transport = Transport("http://testserver", key=KEY, retries=2, backoff=0.0,
                          http_transport=DroppingTransport(inner) if dropping else inner)
    return DeviceClient(folder, "http://testserver", transport=transport, **options)


@pytest.mark.parametrize("mode", ["u_shaped", "labels_on_server"])
def test_http_training_matches_in_process_training(templates: dict[str, Path], tmp_path: Path,
                                                  mode: str) -> None:
    """Same weights, same batches: the same model, even when every step's first answer is lost."""
    from client_support import DATA, assert_same_training

    import splitkeras

    folder = Path(shutil.copytree(templates[mode], tmp_path / "split"))
    reference = splitkeras.load_split(templates[mode])
    expected = reference.fit(*DATA, batch_size=16, epochs=2, shuffle=False, verbose=0)
    with _in_process_server(folder) as server:
        client = _client(folder, server, dropping=True)
        client.compile()
        history = client.fit(*DATA, batch_size=16, epochs=2, shuffle=False, verbose=0)
        assert client.transport.stats.retries >= 8  # every forward/backward/train answer lost once
        assert_same_training(client, history, reference, expected)
        ready = server.get("/readyz", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert ready["applied_steps"] == 8  # 2 epochs x 4 batches, once each
        client.close()


def test_device_client_checks_the_server_serves_its_split(templates: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(templates["u_shaped"], tmp_path / "split"))
    with _in_process_server(Path(shutil.copytree(templates["labels_on_server"], tmp_path / "other"))) as server:
        client = _client(folder, server)
        with pytest.raises(ProtocolError, match=r"The server at http://testserver serves segment "
                                                r"'tail' \(labels_on_server\), "
                                                r".*this device's split expects 'middle' \(u_shaped\).*"
                                                r"Serve and train the same split folder."):
            client.open_session()


def test_save_writes_the_device_segments_back(templates: dict[str, Path], tmp_path: Path) -> None:
    from client_support import DATA

    import splitkeras

    folder = Path(shutil.copytree(templates["u_shaped"], tmp_path / "split"))
    with _in_process_server(folder) as server:
        client = _client(folder, server)
        client.compile()
        client.fit(*DATA, batch_size=32, epochs=1, verbose=0)
        written = client.save()
        stats = client.stats
        client.close()
    assert [p.name for p in written] == ["head.keras", "tail.keras"]
    loaded = splitkeras.load_split(folder, placements=["device"])
    for segment in ("head", "tail"):
        for a, b in zip(loaded[segment].model.get_weights(), client.split[segment].model.get_weights()):
            np.testing.assert_array_equal(a, b)
    assert stats.steps == 2 and stats.samples == 64 and stats["bytes_sent"] > 0
    assert stats.transport_seconds > 0 and stats.device_seconds > 0


# ---- the train command ------------------------------------------------------------------------------
@pytest.mark.parametrize("arrays, extra, message", [
    ({"x": np.zeros((4, 6))}, [], "has no array 'y' (it holds: x); save the inputs as 'x' and the "
                                  "labels as 'y': np.savez('data.npz', x=..., y=...)"),
    ({"x": np.zeros((4, 6)), "y": np.zeros(3)}, [], "hold different numbers of samples ([3, 4])"),
    ({"x": np.zeros((4, 5)), "y": np.zeros(4)}, [], "the inputs for 'features' have samples of shape "
                                                    "(5,); the model takes (6,)"),
    ({"x": np.zeros((4, 6)), "y": np.zeros(4)}, ["--epochs", "0"], "--epochs and --batch-size must be"),
    ({"x": np.zeros((4, 6)), "y": np.zeros(4)}, ["--optimizer", "nesterovish"],
     "cannot make optimizer 'nesterovish'"),
])
def test_train_command_errors_are_one_line(templates: dict[str, Path], tmp_path: Path, capsys: Any,
                                           monkeypatch: pytest.MonkeyPatch, arrays: dict[str, Any],
                                           extra: list[str], message: str) -> None:
    from splitkeras.cli import main

    monkeypatch.setenv("SPLITKERAS_SERVER_KEY", KEY)
    np.savez(tmp_path / "data.npz", **arrays)
    code = main(["train", str(templates["u_shaped"]), "--server", "http://127.0.0.1:9",
                 "--data", str(tmp_path / "data.npz"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_train_command_needs_a_key_and_a_reachable_server(templates: dict[str, Path], tmp_path: Path,
                                                          capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from splitkeras.cli import main

    monkeypatch.delenv("SPLITKERAS_SERVER_KEY", raising=False)
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 6), np.float32), y=np.zeros(4, np.int64))
    args = ["train", str(templates["u_shaped"]), "--server", "http://127.0.0.1:9",
            "--data", str(tmp_path / "data.npz")]
    assert main(args) == 2
    assert "error: train: no server key; pass --key, set SPLITKERAS_SERVER_KEY" in capsys.readouterr().err
    monkeypatch.setattr("splitkeras.client.retries.time.sleep", lambda s: None)
    assert main([*args, "--key", KEY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Could not complete POST /v1/sessions on http://127.0.0.1:9" in err


def test_the_client_package_exports_its_public_names() -> None:
    import splitkeras.client as client

    assert client.__all__ == ["DeviceClient", "NetworkConditions", "Transport", "free_port",
                              "wait_until_ready"]
    for name in client.__all__:
        assert getattr(client, name).__name__ == name
    with pytest.raises(AttributeError, match="has no attribute 'Session'"):
        client.Session  # noqa: B018


def test_wait_until_ready_stops_when_the_server_process_dies() -> None:
    from splitkeras.client import wait_until_ready
    from splitkeras.errors import ProtocolError

    with pytest.raises(ProtocolError, match="stopped while starting"):
        wait_until_ready("http://127.0.0.1:9", timeout=5, alive=lambda: False)
    with pytest.raises(ProtocolError, match="was not ready after 0.5 s"):
        wait_until_ready("http://127.0.0.1:9", timeout=0.5)


def test_save_refreshes_the_tfjs_bundles_with_the_trained_weights(templates: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """After training, the device's TF.js bundles hold the trained weights, not the split's."""
    import keras
    from client_support import DATA

    import splitkeras
    from converters import load_tfjs_weights

    folder = tmp_path / "split"
    splitkeras.load_split(templates["u_shaped"]).save(folder, tfjs=True)
    before = (folder / "head_tfjs" / "model.json").read_bytes()
    with _in_process_server(folder) as server:
        client = _client(folder, server)
        client.compile()
        client.fit(*DATA, batch_size=32, epochs=1, verbose=0)
        written = client.save()
        client.close()
    assert [p.name for p in written] == ["head.keras", "model.json", "tail.keras", "model.json"]
    assert not list(folder.glob(".*saving*"))
    for segment in ("head", "tail"):
        trained = client.split[segment].model
        reread = keras.models.clone_model(trained)
        load_tfjs_weights(reread, folder / f"{segment}_tfjs")
        for a, b in zip(reread.get_weights(), trained.get_weights()):
            np.testing.assert_array_equal(a, b)
    untrained = splitkeras.load_split(templates["u_shaped"])["head"].model
    assert any(not np.array_equal(a, b) for a, b in zip(untrained.get_weights(),
                                                         client.split["head"].model.get_weights()))
    assert (folder / "head_tfjs" / "model.json").read_bytes() == before  # same topology
