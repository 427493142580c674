"""A shared server's limits: what it reads, holds and tells, and how it starts.

* body caps before the body is read, the key before the body (in process, ASGI);
* refused steps: counted per session, the session closed at the limit; a refusal that used
  the step's forward leaves the step expired; the gradient clip over HTTP;
* sessions: the idle timeout frees their pending forwards; at the cap the least recently
  used idle session makes room;
* real sockets (uvicorn in a thread, the configuration of `splitkeras serve`): a slow client
  is cut off; TLS with a self-signed certificate made here with `openssl`;
* `splitkeras serve` start-up mistakes, one line each: flag values, bad files, a bad or
  foreign checkpoint, plain HTTP beyond loopback, a second server of the same segment.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from server_fixtures import (
    KEY,
    LiveApp,
    ThreadedServer,
    assert_same_state,
    bearer,
    copy_split,
    make_split,
    settings_for,
    snapshot,
    step_header,
    tensor_headers,
)

from splitkeras import protocol, wire

RNG = np.random.default_rng(3)


def act(batch: int = 2) -> np.ndarray:
    return RNG.standard_normal((batch, 3)).astype(np.float32)


def path(sid: str, route: str) -> str:
    return protocol.step_path(sid, route)


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("limits")
    return {"u_shaped": make_split(root / "u", "u_shaped"),
            "labels_on_server": make_split(root / "l", "labels_on_server")}


@pytest.fixture
def fresh(splits: dict[str, Path], tmp_path: Path) -> Callable[..., Path]:
    return lambda mode="u_shaped", name=None: copy_split(splits[mode], tmp_path / (name or mode))


@pytest.fixture(scope="module")
def u_app(splits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = LiveApp(settings_for(copy_split(splits["u_shaped"], tmp_path_factory.mktemp("u") / "s")))
    yield live
    live.close()


async def _stream(total: int, counter: list[int], chunk: int = 64 * 1024) -> Any:
    while counter[0] < total:
        counter[0] += chunk
        yield b"\0" * chunk


# ------------------------------------------------------------------------------------ body caps


def test_an_unauthenticated_huge_body_is_not_read(u_app: LiveApp) -> None:
    """1 GiB to POST /v1/sessions without the key: chunked, it is refused (401) before the
    body is read; declared, before a byte of it (413)."""
    counter = [0]
    response = u_app.request("POST", "/v1/sessions", content=_stream(2**30, counter))
    assert response.status_code == 401 and counter[0] <= 128 * 1024
    declared = u_app.request("POST", "/v1/sessions", headers={"content-length": str(2**30)}, content=b"")
    assert declared.status_code == 413 and declared.json()["error"]["limit"] == 16 * 1024


def test_every_route_has_a_body_cap(u_app: LiveApp) -> None:
    counter = [0]
    with_key = u_app.request("POST", "/v1/sessions", headers=bearer(KEY), content=_stream(2**30, counter))
    assert with_key.status_code == 413 and counter[0] <= 128 * 1024  # the key is right, the body too big
    for method, route in (("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/v1/sessions/abc"),
                          ("DELETE", "/v1/sessions/abc")):
        response = u_app.request(method, route, headers={"content-length": str(10**6)}, content=b"")
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large", route
    sid, token = u_app.open_session()
    limit = u_app.service.body_limits["forward"]
    over = u_app.request("POST", path(sid, "forward"), headers={**tensor_headers(token), **step_header(0),
                         "content-length": str(limit + 1)}, content=b"")
    assert over.status_code == 413 and over.json()["error"]["limit"] == limit
    assert u_app.post("/v1/sessions", json={"wire_dtype": "float16"}, headers=bearer(KEY)).status_code == 201
    assert u_app.request("POST", "/v1/sessions", headers=bearer(KEY)).status_code == 201  # no body: defaults


# ------------------------------------------------------------------------------- refused steps


def _warm(live: LiveApp, steps: int = 12) -> None:
    sid, token = live.open_session()
    for k in range(steps):
        assert live.post(path(sid, "forward"), step=k, tensors={"h": act()}, token=token).status_code == 200
        assert live.post(path(sid, "backward"), step=k, tensors={"m": act() / 2}, token=token).status_code == 200


def test_a_session_that_keeps_sending_bad_steps_is_closed(fresh: Callable[..., Path]) -> None:
    with LiveApp(settings_for(fresh(), max_refused_steps=3)) as live:
        _warm(live)
        sid, token = live.open_session()
        for attempt in range(1, 4):
            before = live.on_writer(snapshot, live.service)
            response = live.post(path(sid, "forward"), step=0, tensors={"h": act() * 1e30}, token=token)
            assert response.status_code == 422 and response.json()["error"]["code"] == "out_of_bounds"
            error = response.json()["error"]
            if attempt < 3:
                assert "session_closed" not in error
                assert live.get(f"/v1/sessions/{sid}", token=token).json()["refused_steps"] == attempt
                assert_same_state(before, live.on_writer(snapshot, live.service))
            else:
                assert error["session_closed"] is True and "it is closed" in error["message"]
        assert live.post(path(sid, "forward"), step=0, tensors={"h": act()}, token=token).status_code == 404
        assert live.get("/readyz", token=KEY).json()["refused_steps"] == 3


def test_a_refusal_after_the_tape_was_used_expires_the_step(fresh: Callable[..., Path]) -> None:
    """With a weight bound the first update breaks, the backward is refused after its vjp:
    everything is rolled back, and the step says so: its next backward is step_expired and
    a resent forward is taken."""
    with LiveApp(settings_for(fresh(), guard_max_weight=1e-6)) as live:
        sid, token = live.open_session()
        assert live.post(path(sid, "forward"), step=0, tensors={"h": act()}, token=token).status_code == 200
        before = live.on_writer(snapshot, live.service)
        refused = live.post(path(sid, "backward"), step=0, tensors={"m": act()}, token=token)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "update_refused"
        after = live.on_writer(snapshot, live.service)
        assert_same_state({**before, "sessions": {}, "pending": []}, {**after, "sessions": {}, "pending": []})
        assert after["pending"] == [] and after["sessions"][sid][:2] == (0, None)
        again = live.post(path(sid, "backward"), step=0, tensors={"m": act()}, token=token)
        assert again.status_code == 409 and again.json()["error"]["code"] == "step_expired"
        assert live.post(path(sid, "forward"), step=0, tensors={"h": act()}, token=token).status_code == 200


def test_the_gradient_clip_applies_to_what_a_device_sends(fresh: Callable[..., Path]) -> None:
    """Over HTTP, --max-grad-norm 0.01 gives the weights of an unclipped server that was sent
    the clipped gradients."""
    g = act() * 10
    norm = float(np.linalg.norm(g.astype(np.float64)))
    x = act()
    results = []
    # two copies of the same split (a crashed server's log would be replayed by the next one)
    for settings, grads in ((settings_for(fresh(name="clipped"), max_grad_norm=0.01), g),
                            (settings_for(fresh(name="plain"), guard=False), (g * (0.01 / norm)).astype(np.float32))):
        with LiveApp(settings) as live:
            sid, token = live.open_session()
            assert live.post(path(sid, "forward"), step=0, tensors={"h": x}, token=token).status_code == 200
            assert live.post(path(sid, "backward"), step=0, tensors={"m": grads}, token=token).status_code == 200
            results.append(live.on_writer(snapshot, live.service))
    for a, b in zip(results[0]["model"], results[1]["model"]):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------- sessions


def test_idle_sessions_close_and_free_their_pending_forwards(fresh: Callable[..., Path]) -> None:
    with LiveApp(settings_for(fresh(), session_ttl_seconds=60)) as live:
        service = live.service
        opened = [live.open_session() for _ in range(5)]
        for sid, token in opened[:3]:
            assert live.post(path(sid, "forward"), step=0, tensors={"h": act()}, token=token).status_code == 200
        assert len(service.runner._pending) == 3
        now = service.clock()
        service.clock = lambda: now + 30
        live.get(f"/v1/sessions/{opened[0][0]}", token=opened[0][1])  # seen at +30 s: stays
        service.clock = lambda: now + 61
        live.on_writer(service.sweep_idle)
        assert [s.session_id for s in service.sessions] == [opened[0][0]]
        assert list(service.runner._pending) == [(opened[0][0], 0)]
        gone = live.post(path(opened[1][0], "backward"), step=0, tensors={"m": act()}, token=opened[1][1])
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_session"


def test_a_restored_session_gets_a_full_ttl(fresh: Callable[..., Path]) -> None:
    folder = fresh()
    with LiveApp(settings_for(folder, session_ttl_seconds=60)) as live:
        sid, token = live.open_session()
    with LiveApp(settings_for(folder, session_ttl_seconds=60)) as again:
        service = again.service
        assert service.sessions.get(sid).last_seen is None  # not persisted: a monotonic time
        again.on_writer(service.sweep_idle)  # its time starts now
        assert service.sessions.get(sid) is not None and service.sessions.get(sid).last_seen is not None
        now = service.clock()
        service.clock = lambda: now + 61
        again.on_writer(service.sweep_idle)
        assert service.sessions.get(sid) is None
        assert again.get(f"/v1/sessions/{sid}", token=token).status_code == 404


def test_at_the_cap_the_least_recently_used_idle_session_makes_room(fresh: Callable[..., Path]) -> None:
    with LiveApp(settings_for(fresh(), max_sessions=3)) as live:
        a, b, c = (live.open_session() for _ in range(3))
        assert live.post(path(a[0], "forward"), step=0, tensors={"h": act()}, token=a[1]).status_code == 200  # busy
        live.get(f"/v1/sessions/{b[0]}", token=b[1])  # b seen after c
        d = live.open_session()  # c, the least recently used idle one, makes room
        ids = {s.session_id for s in live.service.sessions}
        assert ids == {a[0], b[0], d[0]}
        for session in (b, d):  # now every one is busy
            answer = live.post(path(session[0], "forward"), step=0, tensors={"h": act()}, token=session[1])
            assert answer.status_code == 200
        full = live.post("/v1/sessions", json={}, headers=bearer(KEY))
        assert full.status_code == 429 and full.json()["error"]["code"] == "too_many_sessions"
        assert "each has a step in progress" in full.json()["error"]["message"]


# ------------------------------------------------------------------------------- real sockets


@pytest.fixture(scope="module")
def socket_server(splits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = copy_split(splits["u_shaped"], tmp_path_factory.mktemp("sock") / "s")
    with ThreadedServer(settings_for(folder, read_timeout_seconds=1.0)) as server:
        yield server


@pytest.mark.parametrize("sent", [b"", b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Le",
                                  b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\n"
                                  b"Content-Length: 100\r\n\r\n{\"wire"],
                         ids=["nothing", "half_a_head", "half_a_body"])
def test_a_slow_client_is_cut_off(socket_server: ThreadedServer, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", socket_server.port), timeout=10) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed, no answer
        assert 0.8 < time.monotonic() - started < 5
    assert httpx.get(f"{socket_server.url}/healthz").status_code == 200  # others are served


def test_a_trickling_head_does_not_extend_its_deadline(socket_server: ThreadedServer) -> None:
    with socket.create_connection(("127.0.0.1", socket_server.port), timeout=10) as sock:
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /healthz HTTP/1.1\r\nHost: " + b"x" * 40 + b"\r\n\r\n":
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
            assert sock.recv(1024) == b""
            raise OSError("closed")
        assert time.monotonic() - started < 5


def test_a_keep_alive_client_is_served_request_after_request(socket_server: ThreadedServer) -> None:
    with httpx.Client(base_url=socket_server.url) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(0.3)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no `openssl` to make a self-signed certificate (and no `cryptography` in .venv)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_with_a_self_signed_certificate(fresh: Callable[..., Path], tmp_path: Path) -> None:
    import ssl

    from splitkeras.client import Transport

    cert, key = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    with ThreadedServer(settings_for(fresh()), tls_cert=str(cert), tls_key=str(key)) as server:
        assert server.url.startswith("https://")
        assert httpx.get(f"{server.url}/readyz", verify=trust).json() == {"status": "ready"}
        with pytest.raises(httpx.ConnectError):  # not trusted without the certificate
            httpx.get(f"{server.url}/readyz")
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{server.port}/readyz")
        transport = Transport(server.url, key=KEY, verify=trust)
        transport.open_session()
        outputs, _ = transport.forward(0, {"h": act()})
        assert np.isfinite(transport.backward(0, {"m": act()})["h"]).all() and outputs["m"].shape == (2, 3)
        transport.close()


# ---------------------------------------------------------------------------------- start-up


def _serve(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    from splitkeras.cli import main

    code = main(["serve", *args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def _checkpoint_of(folder: Path, settings: dict[str, Any]) -> None:
    with LiveApp(settings_for(folder, checkpoint_dir=folder / "checkpoints", **settings)):
        pass  # a graceful stop writes the checkpoint


START_UP = [
    ("max_batch_0", lambda f, t: ["--max-batch", "0"], 2, "argument --max-batch: expected a finite number >= 1, "
     "got '0'"),
    ("checkpoint_every_-1", lambda f, t: ["--checkpoint-every", "-1"], 2, "argument --checkpoint-every: expected "
     "a finite number >= 1, got '-1'"),
    ("step_ttl_nan", lambda f, t: ["--step-ttl", "nan"], 2, "argument --step-ttl: expected a finite number > 0, "
     "got 'nan'"),
    ("session_ttl_0", lambda f, t: ["--session-ttl", "0"], 2, "argument --session-ttl: expected a finite number > 0"),
    ("guard_factor_1", lambda f, t: ["--guard-factor", "1"], 2, "argument --guard-factor: expected a finite number "
     "> 1"),
    ("max_grad_norm_inf", lambda f, t: ["--max-grad-norm", "inf"], 2, "argument --max-grad-norm: expected a finite"),
    ("port_too_big", lambda f, t: ["--port", "70000"], 2, "argument --port: expected a finite number >= 0 and <= "
     "65535"),
    ("max_batch_word", lambda f, t: ["--max-batch", "many"], 2, "argument --max-batch: expected a whole number, "
     "got 'many'"),
    ("env_value", lambda f, t: ["--env", "SPLITKERAS_MAX_SESSIONS=0"], 2, "serve: --max-sessions (or "
     "SPLITKERAS_MAX_SESSIONS): Input should be greater than or equal to 1"),
    ("host_not_loopback", lambda f, t: ["--host", "0.0.0.0"], 1, "--host 0.0.0.0 would serve plain HTTP beyond "
     "this machine"),
    ("port_in_use", "port", 1, "Cannot listen on 127.0.0.1:{port}: Address already in use."),
    ("tls_key_missing", lambda f, t: ["--tls-cert", str(f / "split.json")], 1, "TLS needs both --tls-cert and "
     "--tls-key"),
    ("tls_not_a_cert", lambda f, t: ["--tls-cert", str(f / "split.json"), "--tls-key", str(f / "split.json")], 1,
     "Cannot use --tls-cert"),
    ("keras_missing", lambda f, t: (f / "middle.keras").unlink() or [], 1, "Model file '{f}/middle.keras' does not "
     "exist."),
    ("keras_truncated", lambda f, t: (f / "middle.keras").write_bytes((f / "middle.keras").read_bytes()[:400]) and [],
     1, "Cannot read '{f}/middle.keras' as a Keras model file"),
    ("keras_garbage", lambda f, t: (f / "middle.keras").write_bytes(b"\x93garbage" * 100) and [], 1,
     "Cannot read '{f}/middle.keras' as a Keras model file"),
    ("checkpoint_garbage", lambda f, t: (f / "checkpoints").mkdir() or
     (f / "checkpoints" / "server.ckpt.npz").write_bytes(b"\x93NUMPY garbage" * 50) and [], 1,
     "The checkpoint in '{f}/checkpoints' cannot be read"),
    ("checkpoint_truncated", lambda f, t: (f / "checkpoints").mkdir() or
     (f / "checkpoints" / "server.ckpt.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40) and [], 1,
     "The checkpoint in '{f}/checkpoints' cannot be read"),
    ("checkpoint_of_another_split", "other", 1, "The checkpoint in '{f}/checkpoints' belongs to another segment"),
    ("checkpoint_of_another_segment", "renamed", 1, "The checkpoint in '{f}/checkpoints' belongs to segment 'tail', "
     "not 'middle'"),
]


@pytest.mark.parametrize("case, prepare, code, message", START_UP, ids=[c[0] for c in START_UP])
def test_every_start_up_mistake_is_one_line(case: str, prepare: Any, code: int, message: str,
                                            fresh: Callable[..., Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fresh()
    taken = None
    if prepare == "other":  # the labels-on-server split's checkpoint (its segment 'tail') under this one
        other = fresh("labels_on_server")
        _checkpoint_of(other, {})
        shutil.copytree(other / "checkpoints", folder / "checkpoints")
        message = message.replace("another segment", "another segment or optimizer")
        args: list[str] = []
    elif prepare == "renamed":  # a checkpoint whose variables fit, saved for another segment's name
        _checkpoint_of(folder, {})
        import json

        from server_app import checkpoint

        state = json.loads((folder / "checkpoints" / checkpoint.STATE).read_text())
        arrays = dict(np.load(folder / "checkpoints" / checkpoint.ARRAYS))
        state["segment"] = "tail"
        arrays["__state__"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
        np.savez(folder / "checkpoints" / checkpoint.ARRAYS, **arrays)
        args = []
    elif prepare == "port":  # something else listens there
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = message.replace("{port}", str(port))
        args = ["--port", str(port)]
    else:
        args = prepare(folder, tmp_path)
    if args[:1] == ["--env"]:
        name, value = args[1].split("=")
        monkeypatch.setenv(name, value)
        args = []
    returned, lines = _serve([str(folder), "--key", "k", *args], capsys)
    if taken is not None:
        taken.close()
    expected = message.replace("{f}", str(folder))
    assert returned == code and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and expected in lines[0], lines


def test_a_second_server_of_the_same_segment_exits_with_one_line(fresh: Callable[..., Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from server_app.launch import ServerLock

    folder = fresh()
    with ServerLock(folder, "middle"):
        code, lines = _serve([str(folder), "--key", "k"], capsys)
    assert code == 1 and len(lines) == 1
    assert lines[0] == (f"error: Another splitkeras server (pid {os.getpid()}) already serves segment 'middle' of "
                        f"{folder} (lock {folder}/.splitkeras/serve-middle.lock). Stop it first; one server per "
                        "segment.")
    with ServerLock(folder, "middle"):  # released: the next one takes it
        pass
    with ServerLock(folder, "middle"), ServerLock(folder, "other_segment"):  # a chain's servers: one lock each
        pass


def test_the_server_environment_keeps_memory_returnable(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from splitkeras.cli.serve import server_environment

    monkeypatch.delenv("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", raising=False)
    server_environment()
    assert os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] == "1"
    monkeypatch.setenv("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "0")
    server_environment()  # an operator's choice stays
    assert os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] == "0"


def test_wire_bodies_still_fit(u_app: LiveApp) -> None:
    """The middleware's caps are the routes' own: a body of max_batch samples passes."""
    sid, token = u_app.open_session()
    x = RNG.standard_normal((8, 3)).astype(np.float32)
    response = u_app.request("POST", path(sid, "forward"), headers={**tensor_headers(token), **step_header(0)},
                             content=wire.encode({"h": x}))
    assert response.status_code == 200


def test_cors_is_off_by_default_and_on_for_the_named_origins(fresh: Callable[..., Path]) -> None:
    """`--cors-origin ORIGIN`: a page of ORIGIN may call the server (its preflight is answered
    and may be cached for 2 h); any other origin, and every origin without the flag, gets no
    CORS headers, so the browser keeps the answer from the page."""
    preflight = {"Origin": "https://app.example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,splitkeras-step"}
    with LiveApp(settings_for(fresh(name="plain"))) as live:
        answer = live.request("OPTIONS", "/v1/sessions", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
    with LiveApp(settings_for(fresh(name="cors"), cors_origins=["https://app.example.org"])) as live:
        answer = live.request("OPTIONS", "/v1/sessions/abc/forward", headers=preflight)
        assert answer.status_code == 200, answer.text  # the step header is allowed
        assert answer.headers["access-control-allow-origin"] == "https://app.example.org"
        assert answer.headers["access-control-max-age"] == "7200"
        allowed = {h.strip() for h in answer.headers["access-control-allow-headers"].lower().split(",")}
        assert {"authorization", "content-type", "splitkeras-step"} <= allowed
        # a 503 not_durable's Retry-After is readable by the page (not a safelisted header)
        step = live.request("POST", "/v1/sessions/abc/forward", headers={"Origin": "https://app.example.org"})
        assert step.status_code == 404  # no such session
        assert step.headers["access-control-allow-origin"] == "https://app.example.org"
        assert "retry-after" in step.headers["access-control-expose-headers"].lower()
        other = live.request("OPTIONS", "/v1/sessions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        ready = live.request("GET", "/readyz", headers={"Origin": "https://app.example.org"})
        assert ready.headers["access-control-allow-origin"] == "https://app.example.org"
