"""`Transport`: the device's side of the split-learning protocol (`docs/protocol.md`).

The only module of splitkeras that imports httpx. It sends safetensors bodies
over one keep-alive connection, maps the device's step numbers onto the
server session's, and recovers from what a flaky network and a restarting
server do, in one place:

* A connection error, a timeout, or 502/503/504: the same request again after
  `min(backoff * 2**attempt, max_backoff)` seconds, times a random factor in
  `[1 - jitter, 1 + jitter]` so that many devices do not retry in step (at most
  `retries` times; a `Retry-After` header is honoured up to `max_backoff`). The
  defaults (12 retries, 0.5 s doubling to 10 s, jitter 0.25) wait 64 to 107 s in
  all (`retry_budget()`): a device rides out a server restart or redeploy of up
  to a minute. Safe because the server's steps are idempotent per (session,
  step): a repeated forward or backward returns the same bytes and applies nothing.
* 404 `unknown_session` (the server restarted without its session state): a new
  session, continuing at its `next_step`; a pending backward resends its forward first.
* 409 `forward_lost` / `step_expired` / `step_out_of_order` on a backward (the
  server lost the step's forward pass): the step's forward again, with the
  *same* bytes, then its backward.
* 409 `step_out_of_order` on a forward or train: continue at the server's
  `expected_step`; or, when the server holds a step of this session that will
  never finish (the device was interrupted between a forward and its
  backward), in a new session.
* Any other refusal: `ProtocolError` with the server's message and HTTP status.

One case cannot be told apart from the device: a backward whose update was
applied, whose answer was lost *and* whose server then restarted without the
answer, is applied again when the step is resent. It needs three failures at once.

Bytes are counted as HTTP bodies (headers are not), time as wall-clock seconds
inside requests, retries, backoff and emulated network delay included.

Example:
    >>> transport = Transport("http://127.0.0.1:8000", key="s3cret")     # doctest: +SKIP
    >>> transport.open_session("float16")["mode"]                          # doctest: +SKIP
    'u_shaped'
    >>> outputs, metadata = transport.forward(0, {"encode": activation})    # doctest: +SKIP
    >>> input_grads = transport.backward(0, {"middle_2": grad})             # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from splitkeras import __version__, wire
from splitkeras.client.network import NetworkConditions
from splitkeras.errors import ProtocolError, WireFormatError

__all__ = ["Transport", "TransportStats", "DEFAULT_TIMEOUT", "RETRY_STATUSES", "DEFAULT_RETRIES",
           "DEFAULT_BACKOFF", "DEFAULT_MAX_BACKOFF", "DEFAULT_JITTER", "retry_budget"]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# The retry budget outlasts a server restart of up to a minute (see `retry_budget`).
DEFAULT_RETRIES, DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF, DEFAULT_JITTER = 12, 0.5, 10.0, 0.25
RETRY_STATUSES = frozenset({502, 503, 504})
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_LOST_FORWARD = frozenset({"forward_lost", "step_expired", "step_out_of_order"})
_MAX_RECOVERIES = 4  # protocol recoveries (new session, resent forward) per call
_Answer = tuple[dict[str, np.ndarray], dict[str, str]]  # tensors by name, metadata


@dataclass
class TransportStats:
    """What the transport has cost so far.

    Attributes:
        bytes_sent, bytes_received: HTTP body bytes (retries included).
        seconds: wall-clock seconds inside requests (backoff and emulated delay included).
        requests: HTTP requests sent, retries included.
        retries: requests repeated after a transient failure.
        recoveries: protocol recoveries (new session, resent forward, step resync).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    requests: int = 0
    retries: int = 0
    recoveries: int = 0


class _Refused(Exception):
    """A 4xx answer, parsed; turned into `ProtocolError` unless the transport recovers."""

    def __init__(self, status: int, code: str, message: str, body: Mapping[str, Any], what: str):
        super().__init__(message)
        self.status, self.code, self.message, self.body, self.what = status, code, message, body, what

    @classmethod
    def from_response(cls, response: httpx.Response, what: str) -> _Refused:
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            error = {}
            code = "http_error"
            text = " ".join(response.text.split())[:200]
            message = f"HTTP {response.status_code} {response.reason_phrase}"
            message += f": {text}" if text else ""
        return cls(response.status_code, code, message, error, what)

    @property
    def expected_step(self) -> int | None:
        value = self.body.get("expected_step")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def error(self) -> ProtocolError:
        return ProtocolError(
            f"The server refused {self.what} ({self.status} {self.code}): {self.message}", self.status)


class Transport:
    """A keep-alive HTTP client for one device session of a splitkeras server.

    Args:
        base_url: the server, e.g. `"http://127.0.0.1:8000"`.
        key: the server key that opens a session (`splitkeras serve` prints where it is).
        timeout: an `httpx.Timeout`; default 30 s per request, 5 s to connect.
        retries: how many times a request is repeated after a transient failure.
        backoff: seconds before the first retry; doubles with each retry.
        max_backoff: the longest wait between two attempts (before jitter).
        jitter: each wait is multiplied by a random factor in [1 - jitter, 1 + jitter]
            (0: exactly the doubling backoff).
        verify: TLS verification for `https://` servers, as httpx takes it: True (the
            system's CAs) or an `ssl.SSLContext`, e.g. `ssl.create_default_context(cafile=
            "ca.pem")` for a private CA or a self-signed certificate.
        network: emulate a slower link (`NetworkConditions`); `None` adds nothing.
        http_transport: an `httpx.BaseTransport` to send through (tests:
            `httpx.MockTransport`, or the in-process app's).

    Not thread-safe: one transport per device loop. Step numbers are the
    device's; the transport maps them onto the session's.
    """

    def __init__(
        self,
        base_url: str,
        *,
        key: str | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        jitter: float = DEFAULT_JITTER,
        verify: Any = True,
        network: NetworkConditions | None = None,
        http_transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0.")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}.")
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self._random = random.Random()
        self.network = network
        self.wire_dtype = "float32"
        self.session: dict[str, Any] | None = None
        self.stats = TransportStats()
        self._offset: int | None = None  # server step - device step
        self._forward_bodies: dict[int, bytes] = {}  # the step awaiting its backward
        self._sleep: Callable[[float], None] = time.sleep
        self._client = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=http_transport, verify=verify,
            headers={"User-Agent": f"splitkeras-python/{__version__}",
                     "Accept": f"{wire.MEDIA_TYPE}, application/json"},
        )

    def __repr__(self) -> str:
        session = self.session["session_id"] if self.session else None
        return f"<Transport {self.base_url} session={session}>"

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the session (best effort) and the connection."""
        try:
            self.close_session()
        except ProtocolError:
            pass
        finally:
            self._client.close()

    # ---- sessions ------------------------------------------------------------------------------
    def open_session(self, wire_dtype: str = "float32") -> dict[str, Any]:
        """Open a session (needs the key); returns the server's description of it."""
        if wire_dtype not in wire.WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {wire.WIRE_DTYPES}, got {wire_dtype!r}.")
        body = json.dumps({"wire_dtype": wire_dtype, "client": f"splitkeras-python/{__version__}"})
        try:
            response = self._send("POST", "/v1/sessions", body.encode(), "application/json",
                                  self.key, "POST /v1/sessions")
        except _Refused as refusal:
            error = refusal.error()
            if refusal.status == 401 and not self.key:
                error = ProtocolError(f"{error} No key was given: pass key=..., `--key`, or set "
                                      "SPLITKERAS_SERVER_KEY.", 401)
            raise error from None
        session = response.json()
        self.session, self.wire_dtype, self._offset = session, wire_dtype, None
        return dict(session)

    def close_session(self) -> None:
        """Close the session on the server (its pending step is dropped)."""
        if self.session is None:
            return
        path, token = self._session_path(), str(self.session["token"])
        self.session, self._offset = None, None
        self._forward_bodies.clear()
        try:
            self._send("DELETE", path, None, None, token, f"DELETE {path}")
        except _Refused as refusal:
            if refusal.code != "unknown_session":
                raise refusal.error() from None

    def session_state(self) -> dict[str, Any]:
        """The session's counters: `next_step`, `pending_step`, `applied_steps`."""
        path = self._session_path()
        try:
            return dict(self._send("GET", path, None, None, self._token(), f"GET {path}").json())
        except _Refused as refusal:
            raise refusal.error() from None

    # ---- steps ---------------------------------------------------------------------------------
    def forward(self, step: int, tensors: Mapping[str, Any]) -> _Answer:
        """Send the server segment's inputs for `step`; returns its outputs and metadata
        (`regularization_loss`). The body is kept until the step's backward succeeds."""
        body = self._encode(tensors)
        self._forward_bodies = {step: body}
        return self._decode(self._forward(step, body), "forward")

    def backward(self, step: int, grads: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Send the gradients of the server outputs for `step`; returns the input gradients."""
        body = self._encode(grads)
        refusal: _Refused | None = None
        for _ in range(_MAX_RECOVERIES):
            try:
                data = self._step("backward", step, body)
            except _Refused as error:
                refusal = error
                if error.code == "unknown_session":
                    self._reopen(step)
                elif error.code not in _LOST_FORWARD:
                    raise error.error() from None
                forward_body = self._forward_bodies.get(step)
                if forward_body is None:
                    raise ProtocolError(
                        f"The server lost the forward pass of step {step} ({error.code}) and this "
                        "transport no longer holds its body to resend: call forward() again.",
                        error.status) from None
                self.stats.recoveries += 1
                self._forward(step, forward_body)
                continue
            self._forward_bodies.pop(step, None)
            return self._decode(data, "backward")[0]
        assert refusal is not None
        raise refusal.error()

    def train(self, step: int, tensors_with_labels: Mapping[str, Any]) -> _Answer:
        """Labels on the server: inputs + `label:<output>` (+ `sample_weight`) for `step`;
        returns the input gradients and metadata (`loss`, each metric)."""
        body = self._encode(tensors_with_labels)
        return self._decode(self._with_session_recovery("train", step, body), "train")

    def predict(self, tensors: Mapping[str, Any]) -> _Answer:
        """Inference-mode outputs of the server segment and metadata (nothing changes on the
        server)."""
        body = self._encode(tensors)
        return self._decode(self._with_session_recovery("predict", None, body), "predict")

    # ---- recovery --------------------------------------------------------------------------------
    def _forward(self, step: int, body: bytes) -> bytes:
        return self._with_session_recovery("forward", step, body)

    def _with_session_recovery(self, route: str, step: int | None, body: bytes) -> bytes:
        refusal: _Refused | None = None
        for _ in range(_MAX_RECOVERIES):
            try:
                return self._step(route, step, body)
            except _Refused as error:
                refusal = error
                if error.code == "unknown_session":
                    self._reopen(step)
                elif error.code == "step_out_of_order" and step is not None:
                    self._resync(step, error)
                else:
                    raise error.error() from None
                self.stats.recoveries += 1
        assert refusal is not None
        raise refusal.error()

    def _reopen(self, step: int | None) -> None:
        """A new session (the old one is gone or stuck); `step` continues at its next_step."""
        bodies = dict(self._forward_bodies)  # still to be resent in the new session
        if self.session is not None:
            try:
                self.close_session()
            except ProtocolError:
                pass
        session = self.open_session(self.wire_dtype)
        self._forward_bodies = bodies
        if step is not None:
            self._offset = int(session["next_step"]) - step

    def _resync(self, step: int, refusal: _Refused) -> None:
        state = self.session_state()
        pending = state.get("pending_step")
        if pending is not None and pending != self._server_step(step):
            self._reopen(step)  # a step of ours that will never get its backward
            return
        expected = refusal.expected_step
        self._offset = (expected if expected is not None else int(state["next_step"])) - step

    # ---- HTTP ------------------------------------------------------------------------------------
    def _session_path(self) -> str:
        if self.session is None:
            raise ProtocolError("No session is open: call open_session() first.")
        return f"/v1/sessions/{self.session['session_id']}"

    def _token(self) -> str:
        if self.session is None:
            self.open_session(self.wire_dtype)
        assert self.session is not None
        return str(self.session["token"])

    def _server_step(self, step: int) -> int:
        if self.session is None:
            self.open_session(self.wire_dtype)
        assert self.session is not None
        if self._offset is None:
            self._offset = int(self.session["next_step"]) - step
        return step + self._offset

    def _step(self, route: str, step: int | None, body: bytes) -> bytes:
        token = self._token()
        path = self._session_path() + (f"/steps/{self._server_step(step)}/{route}"
                                       if step is not None else f"/{route}")
        what = f"{route} of step {step} (POST {path})" if step is not None else f"POST {path}"
        return self._send("POST", path, body, wire.MEDIA_TYPE, token, what).content

    def _send(self, method: str, path: str, body: bytes | None, content_type: str | None,
              bearer: str | None, what: str) -> httpx.Response:
        """One request, repeated on transient failures. Returns a 2xx response or raises
        `_Refused` (4xx, other 5xx) or `ProtocolError` (retries exhausted)."""
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        size = len(body) if body else 0
        started = time.perf_counter()
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    self.stats.retries += 1
                if self.network is not None:
                    self.network.wait(size)
                self.stats.requests += 1
                self.stats.bytes_sent += size
                retry_after: float | None = None
                try:
                    response = self._client.request(method, path, content=body, headers=headers)
                except _TRANSIENT as error:
                    failure, status = f"{type(error).__name__}: {error}".rstrip(": "), 0
                else:
                    self.stats.bytes_received += len(response.content)
                    if self.network is not None:
                        self.network.wait(len(response.content))
                    if response.is_success:
                        return response
                    if response.status_code not in RETRY_STATUSES:
                        raise _Refused.from_response(response, what)
                    failure, status = f"HTTP {response.status_code} {response.reason_phrase}", \
                        response.status_code
                    retry_after = _retry_after(response)
                if attempt < self.retries:
                    delay = min(self.backoff * 2 ** attempt, self.max_backoff)
                    if self.jitter:
                        delay *= 1 + self.jitter * (2 * self._random.random() - 1)
                    if retry_after is not None:
                        delay = max(delay, min(retry_after, self.max_backoff))
                    self._sleep(delay)
            raise ProtocolError(
                f"Could not complete {what} on {self.base_url} after {self.retries + 1} attempts "
                f"(last: {failure}). Is the server (`splitkeras serve`) running and reachable?",
                status)
        finally:
            self.stats.seconds += time.perf_counter() - started

    # ---- bodies ----------------------------------------------------------------------------------
    def _encode(self, tensors: Mapping[str, Any]) -> bytes:
        return wire.encode({name: np.asarray(value) for name, value in tensors.items()},
                           wire_dtype=self.wire_dtype)

    def _decode(self, data: bytes, route: str) -> _Answer:
        try:
            return wire.decode(data)
        except WireFormatError as error:
            raise ProtocolError(f"The server's {route} response is not a valid tensor body: {error}") \
                from None


def retry_budget(retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 max_backoff: float = DEFAULT_MAX_BACKOFF, jitter: float = DEFAULT_JITTER) -> tuple[float, float]:
    """(least, most) seconds a `Transport` waits between attempts before it gives up on a
    request (time spent in the attempts themselves comes on top)."""
    total = sum(min(backoff * 2 ** attempt, max_backoff) for attempt in range(retries))
    return total * (1 - jitter), total * (1 + jitter)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (for a local server)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_ready(base_url: str, *, timeout: float = 120.0,
                     alive: Callable[[], bool] | None = None) -> None:
    """Poll `GET /readyz` until the server answers 200.

    Args:
        base_url: e.g. `"http://127.0.0.1:8000"`.
        timeout: seconds to wait in all.
        alive: optional check (e.g. that the server process still runs); when it returns
            False, waiting stops at once.

    Raises:
        ProtocolError: the server was not ready in time, or `alive()` turned False.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ProtocolError(f"The server at {base_url} stopped while starting.")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ProtocolError(f"The server at {base_url} was not ready after {timeout:g} s.")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
