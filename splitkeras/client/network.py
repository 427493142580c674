"""`NetworkConditions`: an emulated network link, for experiments.

This is emulation, not measurement: the transport *sleeps* `latency_s +
bytes * 8 / bandwidth_bps` before each request goes out (for the request body)
and after each response comes in (for the response body), on top of whatever
the real network costs. It lets a laptop test show what a phone on 3G would see
(`NetworkConditions(latency_s=0.1, bandwidth_bps=1e6)`) without a phone.
It does not drop, reorder or corrupt packets.

The link is shared: with several requests in flight (a pipelined device,
`DeviceClient.fit(pipeline_depth=2)`), the bandwidth part of the transfers in one
direction is serialised, as on one radio link (a transfer waits until the ones
before it in that direction have gone through); only the latency overlaps. The
uplink (request bodies) and the downlink (response bodies) are separate. One request
at a time sleeps exactly `delay(bytes)` per direction, as before.

Example:
    >>> link = NetworkConditions(latency_s=0.05, bandwidth_bps=8e6)
    >>> round(link.delay(1_000_000), 3)   # 1 MB at 8 Mbit/s, plus latency
    1.05
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

__all__ = ["NetworkConditions", "DIRECTIONS"]

DIRECTIONS = ("up", "down")  # request bodies, response bodies


class _Link:
    """When each direction of the link is free again (monotonic seconds)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.free_at = dict.fromkeys(DIRECTIONS, 0.0)


@dataclass(frozen=True)
class NetworkConditions:
    """An emulated link: one-way latency and bandwidth, applied per direction per request.

    Attributes:
        latency_s: seconds added to each direction of each request (>= 0).
        bandwidth_bps: bits per second of the link, or `None` for unlimited; shared by the
            requests in flight in one direction.
    """

    latency_s: float = 0.0
    bandwidth_bps: float | None = None
    _link: _Link = field(default_factory=_Link, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.latency_s, (int, float)) and math.isfinite(self.latency_s)
                and self.latency_s >= 0):
            raise ValueError(
                f"latency_s must be a finite number of seconds >= 0, got {self.latency_s!r}.")
        if self.bandwidth_bps is not None and not (
                isinstance(self.bandwidth_bps, (int, float)) and self.bandwidth_bps > 0):
            raise ValueError(
                f"bandwidth_bps must be bits per second > 0 (or None for unlimited), "
                f"got {self.bandwidth_bps!r}."
            )

    def transfer(self, size_bytes: int) -> float:
        """Seconds `size_bytes` occupy the link (0 when the bandwidth is unlimited)."""
        return 0.0 if self.bandwidth_bps is None else size_bytes * 8 / self.bandwidth_bps

    def delay(self, size_bytes: int) -> float:
        """Seconds one direction of a request carrying `size_bytes` takes on an idle link."""
        return self.latency_s + self.transfer(size_bytes)

    def wait(self, size_bytes: int, direction: str = "up") -> float:
        """Sleep until `size_bytes` sent now in `direction` ("up" or "down") have arrived: the
        transfer starts when the link is free in that direction, then the latency. Returns
        the seconds slept."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
        transfer = self.transfer(size_bytes)
        with self._link.lock:
            now = time.monotonic()
            start = max(now, self._link.free_at[direction])
            self._link.free_at[direction] = start + transfer
        seconds = start + transfer + self.latency_s - now
        if seconds > 0:
            time.sleep(seconds)
        return max(seconds, 0.0)
