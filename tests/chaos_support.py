"""The chaos battery, shared by `tests/test_chaos.py` (its short form, in the default suite)
and `benchmarks/chaos.py` (the long form, which writes benchmarks/results/chaos_guards.md).

* `poison_battery`: after honest traffic, each poison (activations x1e30 or x1e5, gradients
  x1e30, -2e19 or x1e5, NaN and Inf, sample weights of -1e30 or 1e30) is sent by an attacker
  session of its own; each must be refused (4xx) with the model as it was (`state()` before
  and after: the predictions of a fixed probe batch, and with the server in this process
  every variable), and the honest device trains on afterwards with finite results.
* `abandoned_sessions`: many sessions each leave a pending forward and go silent; the idle
  sweep must free them (the process's RSS back within 10 % of where it was).
* `many_devices`: devices in threads train through `Transport` against a real socket while
  a quarter of the answers are lost on the way back (so the step is retried); every step
  must be applied exactly once and no answer be a 5xx.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from splitkeras import wire
from splitkeras.protocol import STEP_HEADER, step_path

__all__ = ["Session", "poison_battery", "predictions", "abandoned_sessions", "process_rss", "many_devices",
           "LossyTransport"]


class Session:
    """One device session, spoken to with raw protocol requests."""

    def __init__(self, client: httpx.Client, key: str, rng: np.random.Generator) -> None:
        self.client, self.rng = client, rng
        response = client.post("/v1/sessions", json={"client": "chaos"}, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 201, response.text
        data = response.json()
        self.id, self.token, self.mode = data["session_id"], data["token"], data["mode"]
        self.inputs, self.outputs = data["inputs"], data["outputs"]
        self.step = 0

    def post(self, route: str, tensors: dict[str, Any], step: int | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", "content-type": wire.MEDIA_TYPE}
        if route != "predict":
            headers[STEP_HEADER] = str(self.step if step is None else step)
        return self.client.post(step_path(self.id, route), content=wire.encode(tensors), headers=headers)

    def x(self, batch: int) -> dict[str, np.ndarray]:
        return {s["name"]: self.rng.standard_normal((batch, *s["shape"][1:])).astype(np.float32)
                for s in self.inputs}

    def g(self, batch: int) -> dict[str, np.ndarray]:
        return {s["name"]: (self.rng.standard_normal((batch, *s["shape"][1:])) / batch).astype(np.float32)
                for s in self.outputs}

    def labels(self, batch: int) -> dict[str, np.ndarray]:
        return {"label:logits": self.rng.integers(0, 2, batch).astype(np.int32)}

    def honest_step(self, batch: int = 8) -> list[httpx.Response]:
        if self.mode == "labels_on_server":
            responses = [self.post("train", {**self.x(batch), **self.labels(batch)})]
        else:
            responses = [self.post("forward", self.x(batch))]
            if responses[0].status_code == 200:
                responses.append(self.post("backward", self.g(batch)))
        if all(r.status_code == 200 for r in responses):
            self.step += 1
        return responses


def _scaled(tensors: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    return {k: (v * factor).astype(v.dtype) for k, v in tensors.items()}


def _filled(tensors: dict[str, np.ndarray], value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in tensors.items()}


def _first(tensors: dict[str, np.ndarray], value: float) -> dict[str, np.ndarray]:
    out = {k: np.array(v, copy=True) for k, v in tensors.items()}
    next(iter(out.values())).flat[0] = value
    return out


# name -> (route, build(session, batch) -> tensors, expected status)
U_POISON: dict[str, tuple[str, Callable[[Session, int], dict[str, np.ndarray]], int]] = {
    "activations x1e30": ("forward", lambda s, b: _scaled(s.x(b), 1e30), 422),
    "activations x1e5 (relative bound)": ("forward", lambda s, b: _scaled(s.x(b), 1e5), 422),
    "activations NaN": ("forward", lambda s, b: _first(s.x(b), float("nan")), 400),
    "activations Inf": ("forward", lambda s, b: _first(s.x(b), float("inf")), 400),
    "gradients x1e30": ("backward", lambda s, b: _scaled(s.g(b), 1e30), 422),
    "gradients -2e19 (finite, huge)": ("backward", lambda s, b: _filled(s.g(b), -2e19), 422),
    "gradients x1e5 (relative bound)": ("backward", lambda s, b: _scaled(s.g(b), 1e5), 422),
    "gradients NaN": ("backward", lambda s, b: _first(s.g(b), float("nan")), 400),
}


def _weights(batch: int, value: float) -> np.ndarray:
    weights = np.ones(batch, np.float32)
    weights[0] = value
    return weights


L_POISON: dict[str, tuple[str, Callable[[Session, int], dict[str, np.ndarray]], int]] = {
    "sample_weight -1e30": ("train", lambda s, b: {**s.x(b), **s.labels(b), "sample_weight": _weights(b, -1e30)},
                            422),
    "sample_weight -1": ("train", lambda s, b: {**s.x(b), **s.labels(b), "sample_weight": _weights(b, -1.0)}, 422),
    "sample_weight 1e30": ("train", lambda s, b: {**s.x(b), **s.labels(b), "sample_weight": _weights(b, 1e30)},
                           422),
    "activations x1e30 (train)": ("train", lambda s, b: {**_scaled(s.x(b), 1e30), **s.labels(b)}, 422),
    "activations x1e5 (train, relative bound)": ("train", lambda s, b: {**_scaled(s.x(b), 1e5), **s.labels(b)},
                                                 422),
    "activations NaN (train)": ("train", lambda s, b: {**_first(s.x(b), float("nan")), **s.labels(b)}, 400),
}


@dataclass
class PoisonResult:
    case: str
    route: str
    status: int
    code: str
    expected: int
    unchanged: bool
    step_kept: bool | None = None  # backward: still pending afterwards

    @property
    def ok(self) -> bool:
        return self.status == self.expected and self.unchanged and self.step_kept in (None, True)


def poison_battery(client: httpx.Client, key: str, state: Callable[[], Any], same: Callable[[Any, Any], bool],
                   *, batch: int = 8, warmup_steps: int = 12, seed: int = 0) -> tuple[list[PoisonResult], bool]:
    """Every poison of the server's mode, each refused and changing nothing. Returns the
    results and whether the honest device trained on afterwards (3 steps, all 200, finite)."""
    rng = np.random.default_rng(seed)
    honest = Session(client, key, rng)
    for _ in range(warmup_steps):
        assert all(r.status_code == 200 for r in honest.honest_step(batch))
    cases = L_POISON if honest.mode == "labels_on_server" else U_POISON
    results = []
    for case, (route, build, expected) in cases.items():
        attacker = Session(client, key, rng)
        if route == "backward":  # an honest forward first: the poison is the gradient
            assert attacker.post("forward", attacker.x(batch)).status_code == 200
        before = state()
        response = attacker.post(route, build(attacker, batch))
        after = state()
        code = response.json().get("error", {}).get("code", "") if response.status_code >= 400 else ""
        kept = None
        if route == "backward":
            pending = client.get(f"/v1/sessions/{attacker.id}", headers={"Authorization": f"Bearer {attacker.token}"})
            kept = pending.status_code == 200 and pending.json()["pending_step"] == 0
        results.append(PoisonResult(case, route, response.status_code, code, expected, same(before, after), kept))
    carried_on = True
    for _ in range(3):
        responses = honest.honest_step(batch)
        carried_on &= all(r.status_code == 200 for r in responses)
        carried_on &= all(np.isfinite(t).all() for r in responses for t in wire.decode(r.content)[0].values())
    return results, carried_on


def predictions(client: httpx.Client, key: str, seed: int = 99) -> Callable[[], bytes]:
    """A `state()`: the server's predictions for a fixed batch (predict changes nothing)."""
    probe = Session(client, key, np.random.default_rng(seed))
    x = probe.x(4)

    def state() -> bytes:
        response = probe.post("predict", x)
        assert response.status_code == 200, response.text
        return response.content

    return state


# ------------------------------------------------------------------------------ abandoned sessions


def process_rss(pid: int) -> Callable[[], int]:
    """A process's resident memory in bytes (Linux /proc/PID/statm)."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    return lambda: int(open(f"/proc/{pid}/statm").read().split()[1]) * page


def abandoned_sessions(client: httpx.Client, key: str, rss: Callable[[], int], *, sessions: int, batch: int,
                       timeout: float = 300.0) -> dict[str, float]:
    """`sessions` sessions each leave a pending batch-`batch` forward and go silent; the
    server's idle sweep (a short `--session-ttl`) must close them all and give the memory
    back. RSS (MiB): before, its peak with them, after they were closed."""
    rng = np.random.default_rng(1)

    def ready() -> dict[str, Any]:
        return dict(client.get("/readyz", headers={"Authorization": f"Bearer {key}"}).json())

    for _ in range(3):  # traced functions, allocator pools: warm before the baseline
        warm = Session(client, key, rng)
        assert warm.post("forward", warm.x(batch)).status_code == 200
        client.delete(f"/v1/sessions/{warm.id}", headers={"Authorization": f"Bearer {warm.token}"})
    start = ready()["sessions"]
    time.sleep(0.5)
    before = peak = rss()
    for _ in range(sessions):
        session = Session(client, key, rng)
        response = session.post("forward", session.x(batch))
        assert response.status_code == 200, response.text
        peak = max(peak, rss())
    deadline = time.monotonic() + timeout
    while ready()["sessions"] > start and time.monotonic() < deadline:
        time.sleep(0.5)
    left = ready()["sessions"] - start
    time.sleep(0.5)
    after = rss()
    mib = 2 ** 20
    return {"sessions": sessions, "batch": batch, "rss_before_mib": before / mib, "rss_with_sessions_mib": peak / mib,
            "rss_after_mib": after / mib, "sessions_left": left}


# ------------------------------------------------------------------------------------ many devices


class LossyTransport(httpx.BaseTransport):
    """Hands each request to the server, then loses the answer of a fraction of them (the
    server did the work; the device sees a dropped connection and retries). Counts 5xx."""

    def __init__(self, inner: httpx.BaseTransport, rate: float, seed: int) -> None:
        self.inner, self.rate = inner, rate
        self.rng = np.random.default_rng(seed)
        self.lost = self.server_errors = self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.requests += 1
        if response.status_code >= 500:
            self.server_errors += 1
        if STEP_HEADER in request.headers and self.rng.random() < self.rate:  # a step's answer
            response.read()
            response.close()
            self.lost += 1
            raise httpx.ReadError("answer lost on the way back", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


@dataclass
class DevicesResult:
    devices: int
    steps: int
    sent: int = 0
    applied_by_sessions: int = 0
    applied_by_server: int = 0
    requests: int = 0
    lost: int = 0
    server_errors: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def many_devices(url: str, key: str, applied: Callable[[], int], *, devices: int, steps: int, retry_rate: float,
                 batch: int = 4, timeout: float = 600.0) -> DevicesResult:
    """`devices` threads, each a `Transport` session training `steps` steps, with a quarter
    (`retry_rate`) of the answers lost. `applied()` reads the server's applied-step counter."""
    from splitkeras.client import Transport

    result = DevicesResult(devices, steps)
    start_applied = applied()
    lock = threading.Lock()
    description = httpx.post(f"{url}/v1/sessions", headers={"Authorization": f"Bearer {key}"}).json()
    inputs, outputs = description["inputs"], description["outputs"]

    def device(index: int) -> None:
        rng = np.random.default_rng(1000 + index)
        lossy = LossyTransport(httpx.HTTPTransport(), retry_rate, seed=index)
        transport = Transport(url, key=key, retries=8, backoff=0.01, max_backoff=0.2, http_transport=lossy)
        done = 0
        try:
            transport.open_session()
            for step in range(steps):
                x = {s["name"]: rng.standard_normal((batch, *s["shape"][1:])).astype(np.float32) for s in inputs}
                g = {s["name"]: (rng.standard_normal((batch, *s["shape"][1:])) / batch).astype(np.float32)
                     for s in outputs}
                out, _ = transport.forward(step, x)
                grads = transport.backward(step, g)
                assert all(np.isfinite(v).all() for v in [*out.values(), *grads.values()])
                done += 1
            state = transport.session_state()
            with lock:
                result.applied_by_sessions += int(state["applied_steps"])
        except Exception as error:  # reported, not raised: every thread finishes
            with lock:
                result.failures.append(f"device {index}: {type(error).__name__}: {error}")
        finally:
            with lock:
                result.sent += done
                result.requests += lossy.requests
                result.lost += lossy.lost
                result.server_errors += lossy.server_errors
            transport._client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, timeout - (time.perf_counter() - started)))
    result.seconds = time.perf_counter() - started
    if any(t.is_alive() for t in threads):
        result.failures.append("some devices did not finish in time")
    result.applied_by_server = applied() - start_applied
    return result
