"""Atomic checkpoints of the server segment: variables, optimizer state, session state.

`server.ckpt.npz` holds the arrays and `state.json` the counters and sessions. Each is
written to a temporary file, fsynced and renamed (`atomic_write_bytes`), so a crash at
any moment leaves the previous checkpoint or the new one, never a torn file. The state is
also stored inside the `.npz` (`__state__`), so arrays and counters always come back as one
pair even when a crash falls between the two renames; `state.json` is its readable copy.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from splitkeras.errors import ManifestError
from splitkeras.manifest import atomic_write_bytes

__all__ = ["save_checkpoint", "load_checkpoint", "ARRAYS", "STATE"]

ARRAYS = "server.ckpt.npz"
STATE = "state.json"
_STATE_KEY = "__state__"


def save_checkpoint(folder: Path, model_vars: list[Any], optimizer_vars: list[Any],
                    state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    state = dict(state, model_variables=len(model_vars), optimizer_variables=len(optimizer_vars))
    state_bytes = (json.dumps(state, indent=1) + "\n").encode()
    arrays: dict[str, Any] = {f"model_{i}": np.asarray(v) for i, v in enumerate(model_vars)}
    arrays.update({f"optimizer_{i}": np.asarray(v) for i, v in enumerate(optimizer_vars)})
    arrays[_STATE_KEY] = np.frombuffer(state_bytes, dtype=np.uint8)
    np.savez(buffer, **arrays)
    atomic_write_bytes(folder / ARRAYS, buffer.getvalue())
    atomic_write_bytes(folder / STATE, state_bytes)


def load_checkpoint(folder: Path, model_vars: list[Any], optimizer_vars: list[Any]) -> dict[str, Any] | None:
    """Assign a saved checkpoint to the variables; returns its state, or None if there is none."""
    if not (folder / ARRAYS).exists():
        return None
    with np.load(folder / ARRAYS) as data:
        if _STATE_KEY in data:  # the state saved with these very arrays
            state = json.loads(data[_STATE_KEY].tobytes())
        elif (folder / STATE).exists():
            state = json.loads((folder / STATE).read_text())
        else:
            return None
        if state.get("model_variables") != len(model_vars) or \
                state.get("optimizer_variables") != len(optimizer_vars):
            raise ManifestError(
                f"The checkpoint in '{folder}' belongs to another segment or optimizer "
                f"({state.get('model_variables')} model / {state.get('optimizer_variables')} optimizer "
                f"variables, expected {len(model_vars)} / {len(optimizer_vars)}). Move it away to start fresh."
            )
        for prefix, variables in (("model", model_vars), ("optimizer", optimizer_vars)):
            for i, variable in enumerate(variables):
                value = data[f"{prefix}_{i}"]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ManifestError(f"Checkpoint variable {prefix}_{i} has shape {value.shape}, "
                                        f"expected {tuple(variable.shape)}.")
                variable.assign(value)
    return state
