"""`RetryingClient`: one HTTP request to a splitkeras server, repeated on what is transient.

A connection error, a timeout, or 502/503/504: the same request again after
`min(backoff * 2**attempt, max_backoff)` seconds, times a random factor in
`[1 - jitter, 1 + jitter]` so that many devices do not retry in step (at most `retries`
times; a `Retry-After` header is honoured up to `max_backoff`). The defaults (12 retries,
0.5 s doubling to 10 s, jitter 0.25) wait 64 to 107 s in all (`retry_budget()`). Any
other answer that is not a success is a `Refused` (the server's code and message), which
`splitkeras.client.transport.Transport` recovers from or turns into `ProtocolError`.

Bytes are counted as HTTP bodies (headers are not), time as wall-clock seconds inside
requests, retries, backoff and emulated network delay included.

Example:
    >>> client = RetryingClient("http://127.0.0.1:8000")                       # doctest: +SKIP
    >>> client.send("GET", "/healthz", None, None, None, "GET /healthz").json()  # doctest: +SKIP
    {'status': 'ok'}
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from splitkeras import __version__, wire
from splitkeras.client.network import NetworkConditions
from splitkeras.errors import ProtocolError

__all__ = ["RetryingClient", "Refused", "TransportStats", "DEFAULT_TIMEOUT", "RETRY_STATUSES",
           "DEFAULT_RETRIES", "DEFAULT_BACKOFF", "DEFAULT_MAX_BACKOFF", "DEFAULT_JITTER", "retry_budget"]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# The retry budget outlasts a server restart of up to a minute (see `retry_budget`).
DEFAULT_RETRIES, DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF, DEFAULT_JITTER = 12, 0.5, 10.0, 0.25
RETRY_STATUSES = frozenset({502, 503, 504})
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


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


class Refused(Exception):
    """A 4xx answer (or a 5xx that is not retried), parsed; the transport recovers from it
    or turns it into `ProtocolError` (`error()`)."""

    def __init__(self, status: int, code: str, message: str, body: Mapping[str, Any], what: str):
        super().__init__(message)
        self.status, self.code, self.message, self.body, self.what = status, code, message, body, what

    @classmethod
    def from_response(cls, response: httpx.Response, what: str) -> Refused:
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


class RetryingClient:
    """One keep-alive connection to `base_url`; `send` repeats a request on transient failures.

    Args: as `Transport` takes them (`timeout`, `retries`, `backoff`, `max_backoff`,
    `jitter`, `verify`, `network`, `http_transport`). `sleep` and `random` may be replaced
    (tests record the backoff instead of sleeping).
    """

    def __init__(self, base_url: str, *, timeout: httpx.Timeout = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 max_backoff: float = DEFAULT_MAX_BACKOFF, jitter: float = DEFAULT_JITTER,
                 verify: Any = True, network: NetworkConditions | None = None,
                 http_transport: httpx.BaseTransport | None = None) -> None:
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0.")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}.")
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff, self.max_backoff, self.jitter = retries, backoff, max_backoff, jitter
        self.network = network
        self.stats = TransportStats()
        self._stats_lock = threading.Lock()  # a pipelined device sends from two threads
        self.random = random.Random()
        self.sleep: Callable[[float], None] = time.sleep
        self._client = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=http_transport, verify=verify,
            headers={"User-Agent": f"splitkeras-python/{__version__}",
                     "Accept": f"{wire.MEDIA_TYPE}, application/json"},
        )

    def close(self) -> None:
        self._client.close()

    def send(self, method: str, path: str, body: bytes | None, content_type: str | None,
             bearer: str | None, what: str, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """One request, repeated on transient failures. Returns a 2xx response or raises
        `Refused` (4xx, other 5xx) or `ProtocolError` (retries exhausted)."""
        sent = dict(headers or {})
        if content_type:
            sent["Content-Type"] = content_type
        if bearer:
            sent["Authorization"] = f"Bearer {bearer}"
        size = len(body) if body else 0
        started = time.perf_counter()
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    self.count("retries", 1)
                if self.network is not None:
                    self.network.wait(size, "up")
                self.count("requests", 1)
                self.count("bytes_sent", size)
                retry_after: float | None = None
                try:
                    response = self._client.request(method, path, content=body, headers=sent)
                except _TRANSIENT as error:
                    failure, status = f"{type(error).__name__}: {error}".rstrip(": "), 0
                else:
                    self.count("bytes_received", len(response.content))
                    if self.network is not None:
                        self.network.wait(len(response.content), "down")
                    if response.is_success:
                        return response
                    if response.status_code not in RETRY_STATUSES:
                        raise Refused.from_response(response, what)
                    failure, status = f"HTTP {response.status_code} {response.reason_phrase}", \
                        response.status_code
                    retry_after = _retry_after(response)
                if attempt < self.retries:
                    self.sleep(self._delay(attempt, retry_after))
            raise ProtocolError(
                f"Could not complete {what} on {self.base_url} after {self.retries + 1} attempts "
                f"(last: {failure}). Is the server (`splitkeras serve`) running and reachable?",
                status)
        finally:
            self.count("seconds", time.perf_counter() - started)

    def count(self, name: str, amount: float) -> None:
        """Add `amount` to the counter `name` of `stats` (thread-safe)."""
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + amount)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff * 2 ** attempt, self.max_backoff)
        if self.jitter:
            delay *= 1 + self.jitter * (2 * self.random.random() - 1)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay


def retry_budget(retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 max_backoff: float = DEFAULT_MAX_BACKOFF, jitter: float = DEFAULT_JITTER) -> tuple[float, float]:
    """(least, most) seconds a `Transport` waits between attempts before it gives up on a
    request (time spent in the attempts themselves comes on top)."""
    total = sum(min(backoff * 2 ** attempt, max_backoff) for attempt in range(retries))
    return total * (1 - jitter), total * (1 + jitter)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
