"""`Transport`: the device's side of the split-learning protocol (`docs/protocol.md`).

It sends safetensors bodies over one keep-alive connection
(`splitkeras.client.retries`, the only other module that imports httpx), maps the
device's step numbers onto the server session's (a step's number travels in the
`Splitkeras-Step` header, `splitkeras.protocol`), and recovers from what a flaky
network and a restarting server do, in one place:

* A connection error, a timeout, or 502/503/504: the same request again with a
  jittered doubling backoff (`RetryingClient`): the defaults wait 64 to 107 s in
  all (`retry_budget()`), so a device rides out a server restart or redeploy of up
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
  backward), in a new session. The same for a backward refused because an older
  step of the session is pending (a server that pipelines accepted the next forward
  beside the abandoned one), and for `pipeline_full` on a forward.
* Any other refusal: `ProtocolError` with the server's message and HTTP status.

One case cannot be told apart from the device: a backward whose update was
applied, whose answer was lost *and* whose server then restarted without the
answer, is applied again when the step is resent. It needs three failures at once.

Example:
    >>> transport = Transport("http://127.0.0.1:8000", key="s3cret")     # doctest: +SKIP
    >>> transport.open_session("float16")["mode"]                          # doctest: +SKIP
    'u_shaped'
    >>> outputs, metadata = transport.forward(0, {"encode": activation})    # doctest: +SKIP
    >>> input_grads = transport.backward(0, {"middle_2": grad})             # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np

from splitkeras import __version__, codecs, protocol, wire
from splitkeras.client.network import NetworkConditions
from splitkeras.client.retries import (
    DEFAULT_BACKOFF,
    DEFAULT_JITTER,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    RETRY_STATUSES,
    Refused,
    RetryingClient,
    TransportStats,
    retry_budget,
)
from splitkeras.codecs import Codec
from splitkeras.errors import ProtocolError, WireFormatError

__all__ = ["Transport", "TransportStats", "DEFAULT_TIMEOUT", "RETRY_STATUSES", "DEFAULT_RETRIES",
           "DEFAULT_BACKOFF", "DEFAULT_MAX_BACKOFF", "DEFAULT_JITTER", "retry_budget"]

_MAX_RECOVERIES = 4  # protocol recoveries (new session, resent forward) per call
_MAX_HELD = 64  # forward bodies held for a resend (the pending steps'; older ones are let go)
_Answer = tuple[dict[str, np.ndarray], dict[str, str]]  # tensors by name, metadata


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

    One transport per device loop. A pipelined loop (`splitkeras.client.pipeline`) sends
    forwards from its request thread while backwards go from the loop's: the counters,
    the held forward bodies and a new session after a refusal are safe for that. Step
    numbers are the device's; the transport maps them onto the session's.
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
        self._http = RetryingClient(base_url, timeout=timeout, retries=retries, backoff=backoff,
                                    max_backoff=max_backoff, jitter=jitter, verify=verify,
                                    network=network, http_transport=http_transport)
        self.base_url = self._http.base_url
        self.key = key
        self.wire_dtype = "float32"
        self.compress: str | None = None  # the SPEC asked for at open (None: wire_dtype both ways)
        self.codecs: dict[str, Codec] = codecs.parse_compress("float32")  # what the server agreed
        # top-k error feedback of what this device sends, per direction and tensor name
        self.residuals: dict[str, dict[str, np.ndarray]] = {"forward": {}, "backward": {}}
        self.session: dict[str, Any] | None = None
        self._offset: int | None = None  # server step - device step
        self._forward_bodies: dict[int, bytes] = {}  # the steps awaiting their backwards
        self._recovery = threading.RLock()  # one new session at a time (a pipelined device)

    @property
    def stats(self) -> TransportStats:
        """What the transport has cost so far (bytes, seconds, requests, retries, recoveries)."""
        return self._http.stats

    @property
    def network(self) -> NetworkConditions | None:
        """The emulated link (`None`: none); may be changed between requests."""
        return self._http.network

    @network.setter
    def network(self, value: NetworkConditions | None) -> None:
        self._http.network = value

    @property
    def max_pending_steps(self) -> int:
        """How many steps the server lets this session pipeline (1 before a session is open,
        or from a server without pipelining)."""
        value = (self.session or {}).get("max_pending_steps", 1)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1

    @property
    def retries(self) -> int:
        return self._http.retries

    @retries.setter
    def retries(self, value: int) -> None:
        self._http.retries = value

    @property
    def backoff(self) -> float:
        return self._http.backoff

    @backoff.setter
    def backoff(self, value: float) -> None:
        self._http.backoff = value

    @property
    def max_backoff(self) -> float:
        return self._http.max_backoff

    @max_backoff.setter
    def max_backoff(self, value: float) -> None:
        self._http.max_backoff = value

    @property
    def jitter(self) -> float:
        return self._http.jitter

    @jitter.setter
    def jitter(self, value: float) -> None:
        self._http.jitter = value

    def __repr__(self) -> str:
        session = self.session["session_id"] if self.session else None
        return f"<Transport {self.base_url} session={session}>"

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close_connection(self) -> None:
        """Close the connection only: the session stays open on the server (a chain's server
        keeps its downstream sessions across its own restart)."""
        self._http.close()

    def close(self) -> None:
        """Close the session (best effort) and the connection."""
        try:
            self.close_session()
        except ProtocolError:
            pass
        finally:
            self._http.close()

    # ---- sessions ------------------------------------------------------------------------------
    def open_session(self, wire_dtype: str = "float32", compress: str | None = None) -> dict[str, Any]:
        """Open a session (needs the key); returns the server's description of it. `compress`
        is a codec SPEC per direction (`splitkeras.codecs`; default: `wire_dtype` both ways)."""
        if wire_dtype not in wire.WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {wire.WIRE_DTYPES}, got {wire_dtype!r}.")
        asked = codecs.parse_compress(wire_dtype if compress is None else compress)
        request: dict[str, Any] = {"wire_dtype": wire_dtype, "client": f"splitkeras-python/{__version__}"}
        if compress is not None:
            request["compress"] = codecs.format_compress(asked)
        body = json.dumps(request)
        try:
            response = self._http.send("POST", "/v1/sessions", body.encode(), "application/json",
                                  self.key, "POST /v1/sessions")
        except Refused as refusal:
            error = refusal.error()
            if refusal.status == 401 and not self.key:
                error = ProtocolError(f"{error} No key was given: pass key=..., `--key`, or set "
                                      "SPLITKERAS_SERVER_KEY.", 401)
            raise error from None
        session = response.json()
        agreed = session.get("codecs") or {d: wire_dtype for d in codecs.DIRECTIONS}
        self.codecs = codecs.parse_compress(agreed)
        if self.codecs != asked:
            raise ProtocolError(f"The server opened the session with codecs {codecs.format_compress(self.codecs)}, "
                                f"not the {codecs.format_compress(asked)} asked for; upgrade the server.")
        self.session, self.wire_dtype, self.compress, self._offset = session, wire_dtype, compress, None
        return dict(session)

    def close_session(self) -> None:
        """Close the session on the server (its pending step is dropped)."""
        if self.session is None:
            return
        path, token = self._session_path(), str(self.session["token"])
        self.session, self._offset = None, None
        self._forward_bodies.clear()
        try:
            self._http.send("DELETE", path, None, None, token, f"DELETE {path}")
        except Refused as refusal:
            if refusal.code != protocol.UNKNOWN_SESSION:
                raise refusal.error() from None

    def session_state(self) -> dict[str, Any]:
        """The session's counters: `next_step`, `pending_step`, `applied_steps`."""
        path = self._session_path()
        try:
            return dict(self._http.send("GET", path, None, None, self._token(), f"GET {path}").json())
        except Refused as refusal:
            raise refusal.error() from None

    # ---- steps ---------------------------------------------------------------------------------
    def forward(self, step: int, tensors: Mapping[str, Any]) -> _Answer:
        """Send the server segment's inputs for `step`; returns its outputs and metadata
        (`regularization_loss`). The body is kept until the step's backward succeeds."""
        body = self._encode(tensors, "forward")
        with self._recovery:
            self._forward_bodies[step] = body
            while len(self._forward_bodies) > _MAX_HELD:  # steps given up long ago
                del self._forward_bodies[min(self._forward_bodies)]
        return self._decode(self._forward(step, body), "forward")

    def backward(self, step: int, grads: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Send the gradients of the server outputs for `step`; returns the input gradients."""
        body = self._encode(grads, "backward")
        refusal: Refused | None = None
        for _ in range(_MAX_RECOVERIES):
            seen = self._seen()
            try:
                data = self._step("backward", step, body)
            except Refused as error:
                refusal = error
                if error.code == protocol.UNKNOWN_SESSION or self._older_pending(step, error):
                    self._reopen(step, seen)
                elif error.code not in protocol.LOST_FORWARD_CODES:
                    raise error.error() from None
                forward_body = self._forward_bodies.get(step)
                if forward_body is None:
                    raise ProtocolError(
                        f"The server lost the forward pass of step {step} ({error.code}) and this "
                        "transport no longer holds its body to resend: call forward() again.",
                        error.status) from None
                self._http.count("recoveries", 1)
                self._forward(step, forward_body)
                continue
            with self._recovery:
                self._forward_bodies.pop(step, None)
            return self._decode(data, "backward")[0]
        assert refusal is not None
        raise refusal.error()

    def train(self, step: int, tensors_with_labels: Mapping[str, Any]) -> _Answer:
        """Labels on the server: inputs + `label:<output>` (+ `sample_weight`) for `step`;
        returns the input gradients and metadata (`loss`, each metric)."""
        labels = [name for name in tensors_with_labels if name.startswith("label:") or name == "sample_weight"]
        body = self._encode(tensors_with_labels, "forward", labels)
        return self._decode(self._with_session_recovery("train", step, body), "train")

    def predict(self, tensors: Mapping[str, Any]) -> _Answer:
        """Inference-mode outputs of the server segment and metadata (nothing changes on the
        server)."""
        body = self._encode(tensors, "predict")
        return self._decode(self._with_session_recovery("predict", None, body), "predict")

    # ---- recovery --------------------------------------------------------------------------------
    def _forward(self, step: int, body: bytes) -> bytes:
        return self._with_session_recovery("forward", step, body)

    def _with_session_recovery(self, route: str, step: int | None, body: bytes) -> bytes:
        refusal: Refused | None = None
        for _ in range(_MAX_RECOVERIES):
            seen = self._seen()
            try:
                return self._step(route, step, body)
            except Refused as error:
                refusal = error
                if error.code in (protocol.UNKNOWN_SESSION, protocol.PIPELINE_FULL):
                    self._reopen(step, seen)  # pipeline_full: steps of ours that will never finish
                elif error.code == protocol.STEP_OUT_OF_ORDER and step is not None:
                    self._resync(step, error)
                else:
                    raise error.error() from None
                self._http.count("recoveries", 1)
        assert refusal is not None
        raise refusal.error()

    def _seen(self) -> str | None:
        """The id of the session a request is about to go to (to tell, after a refusal,
        whether the other thread of a pipelined loop opened a new one meanwhile)."""
        return None if self.session is None else str(self.session["session_id"])

    def _older_pending(self, step: int, refusal: Refused) -> bool:
        """A backward refused because an older step of this session is pending: a step the
        device gave up on (backwards are FIFO, and this device sends them in order)."""
        expected = refusal.expected_step
        return (refusal.code == protocol.STEP_OUT_OF_ORDER and expected is not None
                and self._offset is not None and expected < step + self._offset)

    def _reopen(self, step: int | None, seen: str | None = None) -> None:
        """A new session (the old one is gone or stuck); `step` continues at its next_step.
        When another thread already replaced the session `seen` was, that one is kept."""
        with self._recovery:
            if seen is not None and self._seen() not in (None, seen):
                return
            bodies = dict(self._forward_bodies)  # still to be resent in the new session
            if self.session is not None:
                try:
                    self.close_session()
                except ProtocolError:
                    pass
            session = self.open_session(self.wire_dtype, self.compress)
            self._forward_bodies = bodies
            if step is not None:
                self._offset = int(session["next_step"]) - step

    def _resync(self, step: int, refusal: Refused) -> None:
        state = self.session_state()
        pending = state.get("pending_step")
        if pending is not None and pending != self._server_step(step):
            self._reopen(step)  # a step of ours that will never get its backward
            return
        expected = refusal.expected_step
        self._offset = (expected if expected is not None else int(state["next_step"])) - step

    # ---- HTTP ------------------------------------------------------------------------------------
    def _session_id(self) -> str:
        if self.session is None:
            raise ProtocolError("No session is open: call open_session() first.")
        return str(self.session["session_id"])

    def _session_path(self) -> str:
        return f"/v1/sessions/{self._session_id()}"

    def _token(self) -> str:
        if self.session is None:
            self.open_session(self.wire_dtype, self.compress)
        assert self.session is not None
        return str(self.session["token"])

    def _server_step(self, step: int) -> int:
        if self.session is None:
            self.open_session(self.wire_dtype, self.compress)
        assert self.session is not None
        if self._offset is None:
            self._offset = int(self.session["next_step"]) - step
        return step + self._offset

    def _step(self, route: str, step: int | None, body: bytes) -> bytes:
        """POST a tensor route; a step's number goes in the `Splitkeras-Step` header, so the
        URL is the same at every step (a browser would cache one CORS preflight for it)."""
        token = self._token()
        path = protocol.step_path(self._session_id(), route)
        if step is None:
            return self._http.send("POST", path, body, wire.MEDIA_TYPE, token, f"POST {path}").content
        server_step = self._server_step(step)
        what = f"{route} of step {step} (POST {path}, {protocol.STEP_HEADER}: {server_step})"
        return self._http.send("POST", path, body, wire.MEDIA_TYPE, token, what,
                               {protocol.STEP_HEADER: str(server_step)}).content

    # ---- bodies ----------------------------------------------------------------------------------
    def _codec(self, route: str) -> Codec:
        """The codec of a route's bodies: forward and train bodies and forward answers travel
        "forward", backward bodies and the input gradients answered "backward"; predict as the
        forward codec when plain, else float32."""
        if route == "predict":
            return codecs.parse_codec(self.codecs["forward"].label_dtype)
        return self.codecs["forward" if route == "forward" else "backward"]

    def _encode(self, tensors: Mapping[str, Any], direction: str, uncompressed: Sequence[str] = ()) -> bytes:
        codec = self._codec(direction)
        return wire.encode({name: np.asarray(value) for name, value in tensors.items()}, codec=codec,
                           residuals=self.residuals.get(direction), uncompressed=uncompressed)

    def _decode(self, data: bytes, route: str) -> _Answer:
        try:
            return wire.decode(data, codec=self._codec(route))
        except WireFormatError as error:
            raise ProtocolError(f"The server's {route} response is not a valid tensor body: {error}") \
                from None

