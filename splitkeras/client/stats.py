"""What training over the network costs: totals (`ClientStats`) and per-epoch meters."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ClientStats", "EpochMeter", "BatchMeans"]


@dataclass(frozen=True)
class ClientStats:
    """What training over the network has cost so far.

    Attributes:
        bytes_sent, bytes_received: HTTP body bytes, retries included.
        transport_seconds: wall-clock seconds inside HTTP requests (and emulated delay).
        device_seconds: wall-clock seconds of the device's own segments (steps, evaluation).
        steps: training steps completed.
        samples: training samples seen.
    """

    bytes_sent: int
    bytes_received: int
    transport_seconds: float
    device_seconds: float
    steps: int
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, name: str) -> Any:
        """`stats["bytes_sent"]` as well as `stats.bytes_sent`."""
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)


class EpochMeter:
    """This epoch's transfer: MB sent and received, wall-clock milliseconds per sample."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.start = (time.perf_counter(), client.transport.stats.bytes_sent,
                      client.transport.stats.bytes_received, client._samples)

    def logs(self) -> dict[str, float]:
        started, sent, received, samples = self.start
        stats = self.client.transport.stats
        seen = max(self.client._samples - samples, 1)
        return {"sent_MB": (stats.bytes_sent - sent) / 1e6,
                "received_MB": (stats.bytes_received - received) / 1e6,
                "ms_per_sample": (time.perf_counter() - started) * 1e3 / seen}


class BatchMeans:
    """Running, batch-size weighted means of per-step values (the server's logs)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, logs: dict[str, float], batch: int) -> dict[str, float]:
        self.count += batch
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * batch
        return {key: total / self.count for key, total in self.sums.items()}
