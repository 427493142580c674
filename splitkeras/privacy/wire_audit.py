"""Search recorded request and response bodies for the device's inputs and labels.

The byte-level promise of split learning is that raw inputs and labels never leave the
device. `scan_bodies` checks it on what really crossed: every body is searched

* as bytes, for each sample's row of inputs and each batch's label vector, in every
  dtype the wire can carry them in (`F32`, `F16`, and the integer dtypes labels travel
  in), so a leak in any byte order of the rows is found sample by sample;
* as decoded tensors (safetensors bodies; JSON bodies are skipped), for rows near-equal
  to any input sample (a window of any row: a leak padded or rounded to float16 is
  found) and for columns that hold a batch's labels (as class ids, in order or permuted,
  or as one-hot rows).

Example:
    >>> findings = scan_bodies(bodies, inputs=x, batches=[(x[:16], y[:16])])  # doctest: +SKIP
    >>> assert not findings, findings
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitkeras import wire
from splitkeras.errors import WireFormatError

__all__ = ["Finding", "scan_bodies"]

FLOAT_DTYPES = ("<f4", "<f2")
LABEL_DTYPES = ("<i8", "<i4", "<f4", "<f2", "u1")


@dataclass(frozen=True)
class Finding:
    """One place where a secret was found: which body, what kind of match, what."""

    body: int
    kind: str  # "bytes" or "decoded"
    what: str

    def __str__(self) -> str:
        return f"body {self.body}: {self.kind} {self.what}"


def _rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).reshape(len(x), -1)


def _byte_patterns(inputs: np.ndarray, batches: Sequence[tuple[Any, Any]]) -> list[tuple[bytes, str]]:
    patterns: list[tuple[bytes, str]] = []
    rows = _rows(inputs)
    for dtype in FLOAT_DTYPES:
        for index, row in enumerate(rows):
            if np.any(row != 0):
                patterns.append((row.astype(dtype).tobytes(), f"input sample {index} as {dtype}"))
    for number, (_, labels) in enumerate(batches):
        labels = np.asarray(labels)
        ids = labels.reshape(len(labels), -1)
        for dtype in LABEL_DTYPES:
            patterns.append((ids.astype(dtype).tobytes(), f"labels of batch {number} as {dtype}"))
        if ids.shape[1] == 1 and np.issubdtype(ids.dtype, np.integer):
            classes = max(int(ids.max()) + 1, 2)
            one_hot = np.eye(classes)[ids[:, 0]]
            for dtype in FLOAT_DTYPES:
                patterns.append((one_hot.astype(dtype).tobytes(), f"one-hot labels of batch {number} as {dtype}"))
    return patterns


def _near(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: a equals b to float16 rounding."""
    return np.abs(a - b) <= 1e-3 * np.abs(b) + 1e-6


def _decoded_findings(tensors: dict[str, np.ndarray], inputs: np.ndarray,
                      batches: Sequence[tuple[Any, Any]]) -> list[str]:
    found = []
    samples = _rows(inputs).astype(np.float64)
    width = samples.shape[1]
    informative = np.count_nonzero(samples, axis=1) >= min(2, width)
    for name, tensor in tensors.items():
        if tensor.ndim == 0 or not np.issubdtype(tensor.dtype, np.number) or tensor.size == 0:
            continue
        rows = tensor.reshape(len(tensor), -1).astype(np.float64)
        for start in range(0, rows.shape[1] - width + 1):
            window = rows[:, start:start + width]  # [batch, width]
            match = np.all(_near(window[:, None, :], samples[None, :, :]), axis=2) & informative[None, :]
            if match.any():
                row, sample = np.argwhere(match)[0]
                found.append(f"tensor '{name}' row {row} holds input sample {sample} (columns {start}..)")
                break
        for number, (_, labels) in enumerate(batches):
            ids = np.asarray(labels).reshape(len(labels), -1).astype(np.float64)
            if len(ids) != len(rows) or ids.shape[1] != 1 or len(np.unique(ids)) < 2:
                continue
            for column in range(rows.shape[1]):
                values = rows[:, column]
                if np.all(_near(values, ids[:, 0])):
                    found.append(f"tensor '{name}' column {column} holds the labels of batch {number}")
                elif np.all(np.abs(values - np.round(values)) < 1e-3) and \
                        np.array_equal(np.sort(np.round(values)), np.sort(ids[:, 0])):
                    found.append(f"tensor '{name}' column {column} holds the labels of batch {number}, "
                                 "permuted")
    return found


def scan_bodies(bodies: Iterable[bytes], inputs: Any, batches: Sequence[tuple[Any, Any]] = ()
                ) -> list[Finding]:
    """Every place in `bodies` where an input sample or a batch's labels can be found.

    Args:
        bodies: the recorded request and response bodies, in any order.
        inputs: the device's input samples, `[samples, ...]` (each row is searched).
        batches: the `(x, y)` batches the device trained on (their labels are searched
            batch by batch: a label alone is one byte, too short to mean anything).

    Returns:
        The findings; empty when nothing was found.
    """
    inputs = np.asarray(inputs)
    patterns = _byte_patterns(inputs, batches)
    findings: list[Finding] = []
    for number, body in enumerate(bodies):
        data = bytes(body)
        for pattern, what in patterns:
            if pattern in data:
                findings.append(Finding(number, "bytes", what))
        try:
            tensors, _ = wire.decode(data, allow_nonfinite=True)
        except WireFormatError:
            continue  # JSON (sessions, errors) or empty
        findings.extend(Finding(number, "decoded", what) for what in _decoded_findings(tensors, inputs, batches))
    return findings
