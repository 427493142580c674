"""`RemoteSegment`: the server's segment, seen through a `Transport`, with the step
interface of `splitkeras.engine.SegmentRunner`.

The device loop drives its own segments' runners and this one alike:
`forward(k, inputs)` / `pending_regularization(k)` / `backward(k, output_grads)`
for a U-shaped split, `train_step(k, inputs, y, sample_weight, other_losses)` when
the labels are on the server, and `predict(inputs)`. Values go out as NumPy
arrays named by their boundary names and come back in the manifest's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from splitkeras.client.transport import Transport
from splitkeras.errors import ProtocolError, TrainingError
from splitkeras.segments import Segment
from splitkeras.tensor_spec import TensorSpec

__all__ = ["RemoteSegment", "LABEL_PREFIX"]

LABEL_PREFIX = "label:"


class RemoteSegment:
    """The segment placed on the server, trained through `transport`.

    Args:
        segment: the server segment of the device's split (its model is not loaded).
        transport: the session's transport.
        label_specs: the model outputs, when this segment holds the labels.
    """

    def __init__(self, segment: Segment, transport: Transport,
                 label_specs: Sequence[TensorSpec] | None = None) -> None:
        self.segment = segment
        self.transport = transport
        self.input_names = [s.name for s in segment.inputs]
        self.output_names = [s.name for s in segment.outputs]
        self.label_specs = list(label_specs or [])
        self.holds_labels = bool(self.label_specs)
        self._pending: dict[Any, tuple[list[np.ndarray], float]] = {}

    # ---- U-shaped ------------------------------------------------------------------------------
    def forward(self, step: int, inputs: Sequence[Any]) -> list[np.ndarray]:
        """The server's training-mode forward of `step`; it keeps the tape for `backward`."""
        outputs, metadata = self.transport.forward(step, self._named(inputs))
        values = self._ordered(outputs, self.segment.outputs, "forward")
        self._pending[step] = (values, _float(metadata, "regularization_loss", 0.0))
        return values

    def pending_regularization(self, step: int) -> tf.Tensor:
        """The server segment's regularization loss of `step` (reported loss only)."""
        return tf.constant(self._pending[step][1], tf.float32)

    def has_pending(self, step: int) -> bool:
        return step in self._pending

    def drop(self, step: int) -> None:
        self._pending.pop(step, None)

    def backward(self, step: int, output_gradients: Sequence[Any]) -> list[np.ndarray | None]:
        """The server applies `step`'s update; returns one gradient per input (None: not sent)."""
        if step not in self._pending:
            raise TrainingError(f"No forward of the server segment for step {step} to differentiate.")
        outputs, _ = self._pending.pop(step)
        grads = {name: np.zeros_like(out) if grad is None else np.asarray(grad, np.float32)
                 for name, out, grad in zip(self.output_names, outputs, output_gradients)}
        input_grads = self.transport.backward(step, grads)
        return [input_grads.get(name) for name in self.input_names]

    # ---- labels on the server ------------------------------------------------------------------
    def train_step(self, step: int, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[np.ndarray | None], dict[str, float]]:
        """One step with the labels on the server; returns (input grads, this batch's logs).

        `other_losses` (the device segments' regularization) is added to the loss.
        """
        tensors = self._named(inputs)
        tensors.update(self._labels(y))
        if sample_weight is not None:
            if isinstance(sample_weight, (dict, list, tuple)):
                raise TrainingError("With the labels on the server, sample_weight must be one array "
                                    "(one weight per sample), not one per output.")
            tensors["sample_weight"] = np.asarray(sample_weight)
        input_grads, metadata = self.transport.train(step, tensors)
        logs = {}
        for key in metadata:
            if key != "step":
                logs[key] = _float(metadata, key, float("nan"))
        if "loss" in logs:
            logs["loss"] += float(other_losses)
        return [input_grads.get(name) for name in self.input_names], logs

    def _labels(self, y: Any) -> dict[str, np.ndarray]:
        names = [s.name for s in self.label_specs]
        if isinstance(y, dict):
            missing = [n for n in names if n not in y]
            if missing:
                raise TrainingError(f"The labels dict lacks {missing}; the model outputs are {names}.")
            values = [y[n] for n in names]
        elif isinstance(y, (list, tuple)):
            values = list(y)
        else:
            values = [y]
        if len(values) != len(names):
            raise TrainingError(
                f"The model has {len(names)} outputs {names}, received {len(values)} labels.")
        return {LABEL_PREFIX + n: np.asarray(v) for n, v in zip(names, values)}

    # ---- inference -------------------------------------------------------------------------------
    def predict(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """The server segment's inference-mode outputs."""
        return self.predict_with_regularization(inputs)[0]

    def predict_with_regularization(self, inputs: Sequence[Any]) -> tuple[list[np.ndarray], tf.Tensor]:
        """Inference-mode outputs and the server segment's regularization loss (metadata
        `regularization_loss`; 0 when the server does not send it)."""
        outputs, metadata = self.transport.predict(self._named(inputs))
        values = self._ordered(outputs, self.segment.outputs, "predict")
        return values, tf.constant(_float(metadata, "regularization_loss", 0.0), tf.float32)

    # ---- conversions -----------------------------------------------------------------------------
    def _named(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise TrainingError(f"The server segment '{self.segment.name}' takes {len(self.input_names)} "
                                f"inputs {self.input_names}, received {len(inputs)}.")
        return {name: np.asarray(value) for name, value in zip(self.input_names, inputs)}

    def _ordered(self, tensors: dict[str, np.ndarray], specs: Sequence[TensorSpec],
                 route: str) -> list[np.ndarray]:
        values = []
        for spec in specs:
            value = tensors.get(spec.name)
            if value is None or value.ndim != len(spec.shape) or any(
                    d is not None and d != v for d, v in zip(spec.shape[1:], value.shape[1:])):
                got = {name: list(t.shape) for name, t in tensors.items()}
                raise ProtocolError(
                    f"The server's {route} answer does not match this device's split: expected "
                    f"'{spec.name}' with shape {list(spec.shape)}, got {got}. Serve and train the "
                    "same split folder.")
            values.append(value)
        return values


def _float(metadata: dict[str, str], key: str, default: float) -> float:
    try:
        return float(metadata[key])
    except KeyError:
        return default
    except ValueError:
        raise ProtocolError(f"The server sent metadata {key}={metadata[key]!r}, not a number.") from None
