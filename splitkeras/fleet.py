"""Device weights of a fleet: how they are named on the wire, averaged and compared.

A fleet of devices trains one split against one server. With aggregation on
(`splitkeras serve --aggregate fedavg|relay`, docs/protocol.md "Fleet rounds") the
devices' segments are made one model again at the end of each round: the server holds
the *global device weights* and each device uploads its own, which the server averages
(SplitFed, sample-weighted FedAvg) or takes as they come (relay: the next device starts
where the previous one ended). This module is the arithmetic and the naming both sides
share; it needs NumPy only.

Every weight of every device segment (`model.weights`: trainable weights and
non-trainable ones such as BatchNormalization moving statistics; not seed-generator
states, not optimizer slots, which stay each device's own) crosses as one tensor named
`"<segment>/<variable path>"`, e.g. `"head/conv2d/kernel"`.

FedAvg, exactly: for each weight, `sum_k n_k * w_k` over the round's uploads in arrival
order, in float64, divided by `sum_k n_k`, then rounded to the weight's dtype. The products
and sums are exact in float64 for float32 weights and counts below 2**29, so the average of
one upload, or of identical uploads, is that upload bitwise.

Example:
    >>> a = {"head/w": np.array([1.0, 2.0], np.float32)}
    >>> b = {"head/w": np.array([3.0, 4.0], np.float32)}
    >>> fedavg([(a, 1), (b, 3)])["head/w"]
    array([2.5, 3.5], dtype=float32)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from splitkeras.tensor_spec import TensorSpec

__all__ = ["AGGREGATE_MODES", "weight_names", "device_weights", "assign_device_weights", "weight_specs",
           "fedavg", "update_norm"]

AGGREGATE_MODES = ("fedavg", "relay")


def weight_names(segment: str, model: Any) -> list[str]:
    """The wire names of `model.weights` of the device segment `segment`, in order."""
    names = [f"{segment}/{variable.path}" for variable in model.weights]
    if len(set(names)) != len(names):  # two variables with one path: number them instead
        names = [f"{segment}/{index}" for index in range(len(names))]
    return names


def device_weights(segments: Iterable[tuple[str, Any]]) -> dict[str, np.ndarray]:
    """The weights of `(segment name, keras model)` pairs, by wire name (copies)."""
    weights: dict[str, np.ndarray] = {}
    for segment, model in segments:
        for name, variable in zip(weight_names(segment, model), model.weights):
            weights[name] = np.array(variable.numpy(), copy=True)
    return weights


def assign_device_weights(segments: Iterable[tuple[str, Any]], weights: Mapping[str, np.ndarray]) -> None:
    """Assign `weights` (by wire name, every one present) to the models' variables."""
    for segment, model in segments:
        for name, variable in zip(weight_names(segment, model), model.weights):
            variable.assign(np.asarray(weights[name], dtype=variable.dtype))


def weight_specs(weights: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    """The `TensorSpec`s an upload must match: each weight's name, full shape and dtype."""
    return [TensorSpec(name, tuple(int(d) for d in value.shape), str(value.dtype))
            for name, value in weights.items()]


def fedavg(uploads: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """The sample-weighted average of `(weights, samples)` uploads (see the module docstring)."""
    if not uploads:
        raise ValueError("fedavg needs at least one upload.")
    total = sum(int(samples) for _, samples in uploads)
    if total <= 0:
        raise ValueError("fedavg needs a positive number of samples in all.")
    averaged: dict[str, np.ndarray] = {}
    for name, first in uploads[0][0].items():
        accumulator = np.zeros(np.shape(first), np.float64)
        for weights, samples in uploads:
            accumulator += np.float64(samples) * np.asarray(weights[name], np.float64)
        averaged[name] = (accumulator / np.float64(total)).astype(np.asarray(first).dtype)
    return averaged


def update_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """The global L2 norm of `weights - reference` over every tensor, in float64."""
    total = 0.0
    for name, value in weights.items():
        delta = np.asarray(value, np.float64) - np.asarray(reference[name], np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)
