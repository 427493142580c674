"""Split folders, data and parity checks shared by `test_client.py` and `test_e2e_http.py`.

Two splits of small deterministic models, compiled with Adam (so the optimizer's own
state is part of what must match) and a from-logits cross-entropy with accuracy:

* `u_shaped`: `skip_model` cut at "encode" and "middle_2": head and tail on the
  device, the middle on the server, and the head's `embed` goes straight to the tail
  (its gradient is the sum of the tail's and, through `encode`, the server's).
* `labels_on_server`: `mlp_model` cut at "hidden_1": the head on the device, the rest
  and the labels on the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
from models import mlp_model, skip_model

import splitkeras

TOLERANCE = 1e-5

_rng = np.random.default_rng(0)
DATA = (_rng.standard_normal((64, 6)).astype("float32"), _rng.integers(0, 3, 64).astype("int64"))


def make_split_folder(folder: Path, mode: str) -> Path:
    """Save the `mode` split (see the module docstring) into `folder`."""
    model, cuts = (skip_model(), ["encode", "middle_2"]) if mode == "u_shaped" else \
        (mlp_model(), ["hidden_1"])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    split = splitkeras.split(model, at=cuts)
    assert [s.placement for s in split.segments][-1] == ("device" if mode == "u_shaped" else "server")
    split.save(folder)
    return folder


def max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def device_weight_diff(client: Any, reference: Any) -> float:
    """Largest difference between the client's device segments and the reference's."""
    diffs = [0.0]
    for segment in client.split.segments:
        if segment.placement == "device":
            for a, b in zip(segment.model.get_weights(), reference[segment.name].model.get_weights()):
                diffs.append(max_diff(a, b))
    return max(diffs)


def assert_same_training(client: Any, history: Any, reference: Any, expected: Any,
                         history_too: bool = True, tolerance: float = TOLERANCE) -> dict[str, float]:
    """The client (device weights, and the server's through predict) ended where the
    in-process `reference` did; with `history_too`, the reported loss and metrics too.
    Returns the differences."""
    x, y = DATA
    diffs = {"device_weights": device_weight_diff(client, reference),
             "predictions": max_diff(client.predict(x, verbose=0), reference.predict(x, verbose=0))}
    evaluated = client.evaluate(x, y, verbose=0, return_dict=True)
    for key, value in reference.evaluate(x, y, verbose=0, return_dict=True).items():
        diffs[f"evaluate_{key}"] = max_diff(evaluated[key], value)
    if history_too:
        for key, values in expected.history.items():
            diffs[f"history_{key}"] = max_diff(history.history[key], values)
    assert all(d <= tolerance for d in diffs.values()), diffs
    return diffs
