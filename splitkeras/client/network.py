"""`NetworkConditions`: an emulated network link, for experiments.

This is emulation, not measurement: the transport *sleeps* `latency_s +
bytes * 8 / bandwidth_bps` before each request goes out (for the request body)
and after each response comes in (for the response body), on top of whatever
the real network costs. It lets a laptop test show what a phone on 3G would see
(`NetworkConditions(latency_s=0.1, bandwidth_bps=1e6)`) without a phone.
It does not drop, reorder or corrupt packets.

Example:
    >>> link = NetworkConditions(latency_s=0.05, bandwidth_bps=8e6)
    >>> round(link.delay(1_000_000), 3)   # 1 MB at 8 Mbit/s, plus latency
    1.05
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

__all__ = ["NetworkConditions"]


@dataclass(frozen=True)
class NetworkConditions:
    """An emulated link: one-way latency and bandwidth, applied per direction per request.

    Attributes:
        latency_s: seconds added to each direction of each request (>= 0).
        bandwidth_bps: bits per second of the link, or `None` for unlimited.
    """

    latency_s: float = 0.0
    bandwidth_bps: float | None = None

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

    def delay(self, size_bytes: int) -> float:
        """Seconds one direction of a request carrying `size_bytes` takes on this link."""
        transfer = 0.0 if self.bandwidth_bps is None else size_bytes * 8 / self.bandwidth_bps
        return self.latency_s + transfer

    def wait(self, size_bytes: int) -> float:
        """Sleep for `delay(size_bytes)`; returns the seconds slept."""
        seconds = self.delay(size_bytes)
        if seconds > 0:
            time.sleep(seconds)
        return seconds
