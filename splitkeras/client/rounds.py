"""The device's side of fleet rounds (`splitkeras serve --aggregate fedavg|relay`).

`FleetRounds` runs inside `DeviceClient.fit` when the server announces aggregation in its
open-session answer (`"aggregation": {"mode", "round_steps", ...}`): before the first step
it downloads the global device weights (a device that joins late starts from the latest);
after each round (`round_steps` steps, or an epoch) it uploads its device segments'
weights with the samples it trained on, waits for the round to close (a long poll), and
takes the new global weights. The optimizer state stays the device's own. At the end of
`fit` a partial round is uploaded too, so the last steps count.

An upload for a round that closed meanwhile (`round_closed`: the device was too slow) is
dropped; the device takes the latest global weights and goes on.

Example:
    >>> client.fit(x, y, epochs=3)          # rounds as the server announces  # doctest: +SKIP
    >>> client.fit(x, y, epochs=3, rounds=False)   # this device keeps its own  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from splitkeras import fleet, wire
from splitkeras.client.retries import Refused as _Refused
from splitkeras.client.transport import Transport
from splitkeras.errors import ProtocolError

__all__ = ["FleetRounds", "RoundStats"]

_WAIT_SECONDS = 20.0  # under the transport's 30 s read timeout


class RoundStats:
    """Bytes and rounds of the fleet routes (included in the transport's totals too)."""

    def __init__(self) -> None:
        self.rounds = 0
        self.uploaded_bytes = 0
        self.downloaded_bytes = 0
        self.dropped_uploads = 0


class FleetRounds:
    """Rounds of aggregation for the device segments `segments` over `transport`.

    Args:
        transport: the session's transport (the first server stage).
        segments: `(name, keras model)` of every device segment.
        announced: the server's `aggregation` entry of the open-session answer.
        max_wait_seconds: how long to wait for a round to close before giving up.
    """

    def __init__(self, transport: Transport, segments: Sequence[tuple[str, Any]], announced: dict[str, Any],
                 max_wait_seconds: float | None = None) -> None:
        self.transport, self.segments = transport, list(segments)
        self.mode = str(announced["mode"])
        self.round_steps: int | None = announced.get("round_steps")
        deadline = float(announced.get("deadline_seconds") or 60.0)
        self.max_wait_seconds = max_wait_seconds if max_wait_seconds is not None else 2 * deadline + 60.0
        self.round = 0
        self.steps = self.samples = 0
        self.stats = RoundStats()

    # ---- the hooks fit calls --------------------------------------------------------------------
    def begin(self) -> None:
        """Start from the latest global device weights."""
        self._take(self._download(None))
        self.steps = self.samples = 0

    def after_step(self, samples: int) -> None:
        self.steps += 1
        self.samples += samples
        if self.round_steps is not None and self.steps >= self.round_steps:
            self.sync()

    def end_epoch(self) -> None:
        if self.round_steps is None and self.steps:
            self.sync()

    def finish(self) -> None:
        """Upload a partial round at the end of fit (the last steps count too)."""
        if self.steps:
            self.sync()

    # ---- one round's end ----------------------------------------------------------------------
    def sync(self) -> None:
        """Upload this round's weights, wait for the round to close, take the global weights."""
        finished = self.round
        try:
            self._upload(finished)
        except _Refused as refusal:
            if refusal.code != "round_closed":
                raise refusal.error() from None
            self.stats.dropped_uploads += 1  # too late for that round: take the latest and go on
        started = time.monotonic()
        while True:
            round_number, weights = self._download(finished, wait=_WAIT_SECONDS)
            if round_number > finished:
                break
            if time.monotonic() - started > self.max_wait_seconds:
                raise ProtocolError(f"Round {finished} did not close within {self.max_wait_seconds:g} s on "
                                    f"{self.transport.base_url} (its quorum and deadline are the server's "
                                    "--round-quorum and --round-deadline).")
        self._take((round_number, weights))
        self.stats.rounds += 1
        self.steps = self.samples = 0

    # ---- HTTP, through the transport (retries and recoveries included) -----------------------
    def _path(self) -> str:
        self.transport._token()  # opens the session if there is none
        assert self.transport.session is not None
        return f"/v1/sessions/{self.transport.session['session_id']}/fleet"

    def _send(self, method: str, route: str, body: bytes | None) -> Any:
        """One fleet request; a session the server closed meanwhile (idle, evicted) is opened
        again once, as the step routes do."""
        for attempt in range(2):
            path = f"{self._path()}{route}"
            try:
                return self.transport._http.send(method, path, body, wire.MEDIA_TYPE if body else None,
                                                 self.transport._token(), f"{method} {path.split('?')[0]}")
            except _Refused as refusal:
                if refusal.code != "unknown_session" or attempt:
                    raise
                self.transport._reopen(None)
                self.transport.stats.recoveries += 1
        raise AssertionError("unreachable")

    def _upload(self, round_number: int) -> None:
        body = wire.encode(fleet.device_weights(self.segments), wire_dtype=self.transport.wire_dtype,
                           metadata={"samples": str(max(self.samples, 1))})
        self._send("POST", f"/rounds/{round_number}/weights", body)
        self.stats.uploaded_bytes += len(body)

    def _download(self, after: int | None, wait: float = 0.0) -> tuple[int, dict[str, Any]]:
        query = "" if after is None else f"?after={after}&wait={wait:g}"
        try:
            response = self._send("GET", f"/weights{query}", None)
        except _Refused as refusal:
            raise refusal.error() from None
        self.stats.downloaded_bytes += len(response.content)
        tensors, metadata = wire.decode(response.content)
        return int(metadata["round"]), tensors

    def _take(self, answer: tuple[int, dict[str, Any]]) -> None:
        self.round, weights = answer
        fleet.assign_device_weights(self.segments, weights)
