"""Rounds of device aggregation (`splitkeras serve --aggregate fedavg|relay`).

The server holds the *global device weights* (every weight of every device segment,
named as in `splitkeras.fleet`) and counts rounds from 0. A device downloads the global
weights, trains `round_steps` steps (or an epoch), and uploads its device weights for the
round it started from, with the number of samples it trained on. A round closes

* with `fedavg` (SplitFed): once `quorum` devices have uploaded, or `deadline_seconds`
  after its first upload with whatever came (stragglers and drop-outs do not block it);
  the new global weights are the sample-weighted average (`splitkeras.fleet.fedavg`);
* with `relay` (vanilla multi-client split learning): at each upload, which becomes the
  global weights the next device starts from.

An upload is checked before anything changes: the body like every tensor body (names,
full shapes, dtype, finite values; `wire.decode`), its `samples` (a whole number >= 1),
every weight within `max_weight`, and the norm of its update (upload - global weights) at
most `norm_factor` times the median of the accepted updates' norms (this round's and the
last ones'). An accepted upload is written to the write-ahead log before it is
acknowledged; the round state and global weights are saved in `fleet.npz` beside the
server's checkpoint (written before it, with the last log record they include, so a crash
between the two files replays the rest from the log).

Every method runs on the service's one writer thread. This module knows no HTTP.
"""

from __future__ import annotations

import hashlib
import io
import json
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server_app.wal import Record
from splitkeras import fleet, wire
from splitkeras.errors import RequestRefused
from splitkeras.manifest import atomic_write_bytes

__all__ = ["DeviceAggregator", "FLEET_FILE", "Upload"]

FLEET_FILE = "fleet.npz"
NORM_HISTORY = 16  # accepted update norms the relative bound looks at
MAX_SAMPLES = 2**31 - 1


@dataclass
class Upload:
    """One device's accepted upload in the open round."""

    session: str
    samples: int
    weights: dict[str, np.ndarray]
    digest: str


class DeviceAggregator:
    """The global device weights and the round state (see the module docstring).

    Args:
        mode: `"fedavg"` or `"relay"`.
        weights: the initial global device weights (the split folder's device segments).
        round_steps: steps per round a device trains; None: one epoch.
        quorum: uploads that close a fedavg round.
        deadline_seconds: a fedavg round closes this long after its first upload.
        norm_factor: the relative bound on an upload's update norm.
        max_weight: the largest |value| an uploaded weight may hold.
        journal: makes a record durable (raises `RequestRefused("not_durable")`).
        clock: monotonic seconds.
    """

    def __init__(self, mode: str, weights: Mapping[str, np.ndarray], *, round_steps: int | None, quorum: int,
                 deadline_seconds: float, norm_factor: float, max_weight: float,
                 journal: Callable[[Record], None], clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in fleet.AGGREGATE_MODES:
            raise ValueError(f"aggregate must be one of {fleet.AGGREGATE_MODES}, got {mode!r}.")
        self.mode, self.round_steps = mode, round_steps
        self.quorum = 1 if mode == "relay" else quorum
        self.deadline_seconds, self.norm_factor, self.max_weight = deadline_seconds, norm_factor, max_weight
        self.journal, self.clock = journal, clock
        self.global_weights = {name: np.array(value, copy=True) for name, value in weights.items()}
        self.specs = fleet.weight_specs(self.global_weights)
        self.body_limit = wire.max_body_bytes(self.specs, 1)
        self.round = 0
        self.uploads: list[Upload] = []
        self.round_started: float | None = None
        self.norms: deque[float] = deque(maxlen=NORM_HISTORY)
        self.acks: dict[str, dict[str, Any]] = {}  # f"{session}:{round}" -> the answer (retries)
        self.last_round: dict[str, Any] | None = None
        self.wal_seq = 0  # the last log record `fleet.npz` includes
        self.replaying = False

    # ---- what devices see --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The aggregation settings a device needs (in the open-session answer)."""
        return {"mode": self.mode, "round_steps": self.round_steps, "quorum": self.quorum,
                "deadline_seconds": self.deadline_seconds, "round": self.round}

    def state(self) -> dict[str, Any]:
        return {**self.describe(), "uploads": len(self.uploads),
                "samples": sum(u.samples for u in self.uploads), "last_round": self.last_round}

    def download(self, wire_dtype: str = "float32") -> bytes:
        """The global device weights as a safetensors body; metadata `round`."""
        return wire.encode(self.global_weights, wire_dtype=wire_dtype,
                           metadata={"round": str(self.round), "mode": self.mode})

    # ---- uploads -----------------------------------------------------------------------------
    def upload(self, session: str, round_number: int, body: bytes) -> dict[str, Any]:
        """Check and take one device's weights for `round_number`; returns the answer."""
        tensors, metadata = wire.decode(body, self.specs)  # names, shapes, dtypes, NaN/Inf: 400
        samples = _samples(metadata)
        digest = hashlib.sha256(body).hexdigest()
        key = f"{session}:{round_number}"
        if key in self.acks:
            if self.acks[key]["digest"] == digest:
                return dict(self.acks[key]["answer"])  # a retry: the same answer, nothing changes
            raise RequestRefused("already_uploaded",
                                 f"This session already uploaded other weights for round {round_number}; "
                                 "one upload per device and round. Download the global weights "
                                 f"(round {self.round}) and train on.", current_round=self.round)
        if round_number != self.round:
            raise RequestRefused("round_closed",
                                 f"Round {round_number} is not open: the global weights are at round "
                                 f"{self.round}. Download them (GET .../fleet/weights), train from them and "
                                 f"upload for round {self.round}.", current_round=self.round)
        largest = max((float(np.max(np.abs(t))) for t in tensors.values() if t.size), default=0.0)
        if largest > self.max_weight:
            raise RequestRefused("out_of_bounds",
                                 f"An uploaded weight has |value| {largest:.3g}, over the server's bound "
                                 f"{self.max_weight:g} (--guard-max-weight): the upload is refused.")
        norm = fleet.update_norm(tensors, self.global_weights)
        reference = statistics.median(self.norms) if self.norms else None
        if reference is not None and reference > 0 and norm > self.norm_factor * reference:
            raise RequestRefused("out_of_bounds",
                                 f"The upload moves the device weights by {norm:.4g} (L2 norm of upload - "
                                 f"global), over {self.norm_factor:g} x the median {reference:.4g} of "
                                 "accepted uploads (--round-norm-factor): the upload is refused.")
        if not self.replaying:
            self.journal(Record("fleet_upload", {"session": session, "round": round_number}, [body]))
        self.uploads.append(Upload(session, samples, {k: np.array(v, copy=True) for k, v in tensors.items()},
                                   digest))
        self.norms.append(norm)
        if self.round_started is None:
            self.round_started = self.clock()
        closes = len(self.uploads) >= self.quorum
        answer = {"round": round_number, "accepted": True, "uploads": len(self.uploads), "closed": closes,
                  "next_round": round_number + 1 if closes else round_number}
        self.acks = {k: v for k, v in self.acks.items() if int(k.rsplit(":", 1)[1]) >= round_number - 1}
        self.acks[key] = {"digest": digest, "answer": answer}
        if closes:
            self._close("quorum")
        return dict(answer)

    def sweep(self) -> bool:
        """Close a fedavg round whose deadline passed (logged first). Returns whether it did."""
        if not self.uploads or self.round_started is None:
            return False
        if self.clock() - self.round_started < self.deadline_seconds:
            return False
        self.journal(Record("fleet_close", {"round": self.round}))
        self._close("deadline")
        return True

    def _close(self, reason: str) -> None:
        uploads = [(u.weights, u.samples) for u in self.uploads]
        self.global_weights = dict(uploads[-1][0]) if self.mode == "relay" else fleet.fedavg(uploads)
        self.last_round = {"round": self.round, "uploads": len(uploads), "reason": reason,
                           "samples": sum(s for _, s in uploads),
                           "sessions": [u.session for u in self.uploads]}
        self.round += 1
        self.uploads, self.round_started = [], None

    # ---- the log and the file ------------------------------------------------------------------
    def replay(self, record: Record) -> None:
        """Redo a logged upload or deadline close (records the file already holds are skipped)."""
        if record.seq <= self.wal_seq:
            return
        self.replaying = True
        try:
            if record.kind == "fleet_upload":
                self.upload(str(record.fields["session"]), int(record.fields["round"]), record.blobs[0])
            elif record.kind == "fleet_close" and int(record.fields["round"]) == self.round and self.uploads:
                self._close("deadline")
        finally:
            self.replaying = False

    def save(self, folder: Path, wal_seq: int) -> None:
        """Write the global weights and the round state to `folder/fleet.npz`, atomically."""
        state = {"mode": self.mode, "round": self.round, "norms": list(self.norms), "acks": self.acks,
                 "last_round": self.last_round, "wal_seq": wal_seq,
                 "uploads": [{"session": u.session, "samples": u.samples, "digest": u.digest}
                             for u in self.uploads]}
        arrays: dict[str, Any] = {f"global/{k}": v for k, v in self.global_weights.items()}
        for index, upload in enumerate(self.uploads):
            arrays.update({f"upload{index}/{k}": v for k, v in upload.weights.items()})
        arrays["__state__"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / FLEET_FILE, buffer.getvalue())
        self.wal_seq = wal_seq

    def load(self, folder: Path) -> bool:
        """Take back `folder/fleet.npz` if there is one; returns whether there was."""
        path = folder / FLEET_FILE
        if not path.exists():
            return False
        with np.load(path) as data:
            state = json.loads(data["__state__"].tobytes())
            names = [s.name for s in self.specs]
            if state.get("mode") != self.mode or sorted(k[7:] for k in data.files if k.startswith("global/")) \
                    != sorted(names):
                raise ValueError(f"'{path}' holds the rounds of another aggregation mode or split "
                                 f"({state.get('mode')}); move it away to start the rounds fresh.")
            self.global_weights = {name: np.array(data[f"global/{name}"]) for name in names}
            self.uploads = [Upload(u["session"], int(u["samples"]),
                                   {name: np.array(data[f"upload{i}/{name}"]) for name in names}, u["digest"])
                            for i, u in enumerate(state["uploads"])]
        self.round, self.acks, self.last_round = int(state["round"]), dict(state["acks"]), state["last_round"]
        self.norms = deque((float(n) for n in state["norms"]), maxlen=NORM_HISTORY)
        self.round_started = self.clock() if self.uploads else None  # the deadline starts again
        self.wal_seq = int(state["wal_seq"])
        return True


def _samples(metadata: Mapping[str, str]) -> int:
    text = metadata.get("samples")
    try:
        samples = int(text) if text is not None and text.strip().isdigit() else -1
    except ValueError:
        samples = -1
    if not 1 <= samples <= MAX_SAMPLES:
        raise RequestRefused("bad_tensor",
                             f"An upload's metadata needs 'samples': the number of samples the device trained "
                             f"on this round, a whole number from 1 to {MAX_SAMPLES}; got {text!r}.")
    return samples
