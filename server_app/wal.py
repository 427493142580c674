"""The write-ahead log: what the server needs to redo every state change since the last
checkpoint, made durable before the answer leaves.

Each record is what changed the server's state, in the order the one writer applied it:
a session opened or closed, a forward (it moves BatchNormalization statistics and seed
generators), a backward or train step (an update), a pending step dropped. A record holds
the request's body as it arrived (and, on a server of a chain, the next server's answers),
so replaying the records from the checkpoint redoes the same computation: with op
determinism the weights, optimizer state and session counters come back bitwise, and a
retry of an applied step after a restart gets the same bytes.

File format (`wal.log` beside the checkpoint): records one after another, each
`u32 length | u32 crc32 | payload`, little-endian; the payload is an 8-byte header length,
a JSON header (`seq`, `kind`, fields, blob sizes) and the blobs. A record is durable once
`append` returns (write + fsync). A torn or corrupt tail (a crash inside a write) is cut
off at the next start: it was never acknowledged. After a checkpoint that includes every
record (its `wal_seq`), the log starts over.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Record", "WriteAheadLog", "WAL_NAME"]

WAL_NAME = "wal.log"
_FRAME = struct.Struct("<II")


@dataclass
class Record:
    """One logged state change: `kind` ("open", "close", "forward", "backward", "train",
    "drop"; a micro-batched group's "group_forward", "group_backward", "group_pending", see
    `server_app.group_steps`), its fields (`session`, `step`, ...), and its blobs (request
    bodies, answers)."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)
    seq: int = 0

    def encode(self) -> bytes:
        header = json.dumps({"seq": self.seq, "kind": self.kind, "fields": self.fields,
                             "blobs": [len(b) for b in self.blobs]}, separators=(",", ":")).encode()
        payload = b"".join([len(header).to_bytes(8, "little"), header, *self.blobs])
        return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> Record:
        size = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8:8 + size])
        blobs, offset = [], 8 + size
        for length in header["blobs"]:
            blobs.append(payload[offset:offset + length])
            offset += length
        if offset != len(payload):
            raise ValueError("record length does not match its blobs")
        return cls(header["kind"], header["fields"], blobs, int(header["seq"]))


class WriteAheadLog:
    """An append-only log in `folder` (see the module docstring).

    Args:
        folder: where `wal.log` lives (the checkpoint folder).
        fsync: make each append durable (False only for tests that measure its cost).
    """

    def __init__(self, folder: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / WAL_NAME
        self.fsync = fsync
        self.last_seq = 0
        self.appended = 0  # records written by this process (for metrics)
        self._handle: Any = None

    def records(self, after: int = 0) -> Iterator[Record]:
        """The intact records with `seq > after`, in order; a torn or corrupt tail is cut off
        (truncated on disk, so that new records follow the last good one)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        offset, good = 0, 0
        while offset + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, offset)
            start, end = offset + _FRAME.size, offset + _FRAME.size + length
            if end > len(data) or zlib.crc32(data[start:end]) != crc:
                break
            try:
                record = Record.decode(data[start:end])
            except (ValueError, KeyError, json.JSONDecodeError):
                break
            offset = good = end
            self.last_seq = max(self.last_seq, record.seq)
            if record.seq > after:
                yield record
        if good < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good)
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, record: Record) -> int:
        """Write `record` with the next sequence number and make it durable; returns the seq.
        Raises OSError when the disk refuses (nothing is acknowledged then)."""
        if self._handle is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "ab")  # noqa: SIM115 - kept open between appends
        record.seq = self.last_seq + 1
        position = self._handle.tell()
        try:
            self._handle.write(record.encode())
            self._handle.flush()
            if self.fsync:
                os.fsync(self._handle.fileno())
        except OSError:
            try:  # leave no partial record behind for the next append to follow
                self._handle.truncate(position)
            except OSError:
                pass
            self.close()
            raise
        self.last_seq = record.seq
        self.appended += 1
        return record.seq

    def reset(self) -> None:
        """Start over (after a checkpoint that includes every record); seq numbers go on."""
        self.close()
        if self.path.exists():
            with open(self.path, "r+b") as handle:
                handle.truncate(0)
                handle.flush()
                os.fsync(handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass
            self._handle = None
