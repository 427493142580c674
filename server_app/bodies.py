"""The tensor bodies of the step routes: decoded and checked, or encoded, for one segment.

Only bytes <-> arrays here; what runs on the arrays is a `StepExecutor`'s business
(`server_app.step_machine`). Every decode checks the body against the specs (names,
shape, dtype, batch 1..max_batch, no NaN/Inf) and the session's codec for that direction
(`splitkeras.codecs`: activations and forward answers "forward", gradients "backward"),
and raises `WireFormatError` or a `RequestRefused("bad_tensor")` before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server_app.train_body import TrainBody
from splitkeras import codec_bodies, wire
from splitkeras.tensor_spec import TensorSpec

__all__ = ["TensorBodies"]


class TensorBodies:
    """Bodies for a segment with `inputs` and `outputs`.

    Args:
        inputs: the segment's input specs (forward, predict and train bodies).
        outputs: the segment's output specs (forward answers, backward bodies).
        model_outputs: the whole model's outputs (one label each in a train body).
        loss: the compiled loss (which labels are class ids), or None.
        max_batch: the largest batch a body may carry.
        codecs: the codec families sessions may use (the body limits allow the largest).
    """

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 model_outputs: Sequence[TensorSpec], loss: Any, max_batch: int,
                 codecs: Sequence[str] = ("float32",)) -> None:
        self.input_specs, self.output_specs = list(inputs), list(outputs)
        self.max_batch = max_batch
        self.train_body = TrainBody(self.input_specs, model_outputs, loss, max_batch)
        # the largest body of each accepted family ("topk" at a fraction of 1, the worst case)
        worst = [("topk:1+int8" if family == "topk" else family) for family in codecs]
        worst += ["topk:1"] if "topk" in codecs else []
        inputs_limit = wire.max_body_bytes(self.input_specs, max_batch, worst)
        self.limits = {
            "forward": inputs_limit,
            "predict": inputs_limit,
            "backward": wire.max_body_bytes(self.output_specs, max_batch, worst),
            # labels may be int64 class ids or float targets: budget 8 bytes per element
            "train": inputs_limit + 2 * wire.max_body_bytes(self.train_body.label_specs, max_batch),
        }

    def _decode(self, body: bytes, specs: list[TensorSpec], codec: str) -> list[np.ndarray]:
        tensors, _ = wire.decode(body, specs, max_batch=self.max_batch, codec=codec)
        return [tensors[s.name] for s in specs]

    def inputs(self, body: bytes, codec: str = "float32") -> list[np.ndarray]:
        """The segment's inputs, in order (forward, predict), under the forward `codec`."""
        return self._decode(body, self.input_specs, codec)

    def output_grads(self, body: bytes, codec: str = "float32") -> list[np.ndarray]:
        """One gradient per segment output, in order (backward), under the backward `codec`."""
        return self._decode(body, self.output_specs, codec)

    def train_batch(self, body: bytes, codec: str = "float32") -> tuple[list[np.ndarray], Any, np.ndarray | None]:
        """`(inputs, y, sample_weight)` of a train body: inputs under the forward `codec`."""
        floating = [s.name for s in self.input_specs if np.dtype(s.dtype).kind == "f"]
        tensors, _ = wire.decode(body, None, max_batch=self.max_batch, codec=codec, compressed=floating)
        return self.train_body.parse(tensors)

    def encode_outputs(self, outputs: Sequence[Any], codec: str,
                       metadata: Mapping[str, str] | None = None,
                       residuals: codec_bodies.Residuals | None = None) -> bytes:
        """The outputs (forward answers, predictions) under the forward `codec`."""
        return wire.encode({s.name: t for s, t in zip(self.output_specs, outputs)},
                           codec=codec, metadata=metadata, residuals=residuals)

    def encode_input_grads(self, grads: Sequence[Any], codec: str, metadata: Mapping[str, str],
                           residuals: codec_bodies.Residuals | None = None) -> bytes:
        """The gradients of the inputs that have one (`None`: an input that needs none), under
        the backward `codec`."""
        return wire.encode({s.name: g for s, g in zip(self.input_specs, grads) if g is not None},
                           codec=codec, metadata=metadata, residuals=residuals)
