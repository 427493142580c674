"""What a `train` body (labels on the server) must hold, checked before anything runs.

Inputs as the segment takes them; one label per model output (`label:<output name>`), with
the output's shape, or class ids in `[0, classes)` for a sparse categorical loss; an optional
`sample_weight` of one number per sample. A bad class id would otherwise give a NaN loss and
a NaN update to the weights every device shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from splitkeras.errors import RequestRefused
from splitkeras.tensor_spec import TensorSpec

__all__ = ["LABEL_PREFIX", "TrainBody"]

LABEL_PREFIX = "label:"


def _loss_for(loss: Any, index: int, output_name: str) -> Any:
    """The compiled loss of one model output (a list or dict of losses gives one per output)."""
    if isinstance(loss, dict):
        return loss.get(output_name)
    if isinstance(loss, (list, tuple)):
        return loss[index] if index < len(loss) else None
    return loss


def _is_sparse_categorical(loss: Any) -> bool:
    """Whether a loss takes class ids (whose range the server must check: an id out of range
    gives a NaN loss, and a NaN update would poison the shared weights)."""
    if loss is None:
        return False
    name = loss if isinstance(loss, str) else (
        getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__)
    text = f"{name} {type(loss).__name__}".lower().replace("_", "")
    return "sparsecategorical" in text


class TrainBody:
    """Checks and converts the tensors of a `train` request.

    Args:
        inputs: the server segment's input specs.
        outputs: the model's output specs (one label each).
        loss: the compiled loss (a loss, or a list/dict of one per output).
        max_batch: the server's largest batch.
    """

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], loss: Any,
                 max_batch: int) -> None:
        self.inputs = list(inputs)
        self.label_specs = [TensorSpec(LABEL_PREFIX + s.name, s.shape, s.dtype) for s in outputs]
        self.class_id_labels = {spec.name for index, (spec, out) in
                                enumerate(zip(self.label_specs, outputs))
                                if _is_sparse_categorical(_loss_for(loss, index, out.name))}
        self.max_batch = max_batch

    def parse(self, tensors: dict[str, np.ndarray]) -> tuple[list[np.ndarray], Any, np.ndarray | None]:
        """`(inputs, y, sample_weight)` ready for `SegmentRunner.train_step`, or `bad_tensor`."""
        labels = self._labels(tensors)
        inputs = [self._checked(tensors, spec) for spec in self.inputs]
        batch = inputs[0].shape[0]
        for spec, value in zip(self.inputs, inputs):
            if value.shape[0] != batch:
                raise RequestRefused("bad_tensor", f"Input '{spec.name}' has batch {value.shape[0]}, "
                                     f"input '{self.inputs[0].name}' has {batch}: send one batch size.")
        labels = {spec.name: self._check_label(spec, labels[spec.name], batch) for spec in self.label_specs}
        sample_weight = tensors.get("sample_weight")
        if sample_weight is not None:
            sample_weight = self._check_sample_weight(sample_weight, batch)
        y = labels[self.label_specs[0].name] if len(labels) == 1 else [labels[s.name] for s in self.label_specs]
        return inputs, y, sample_weight

    def _checked(self, tensors: dict[str, np.ndarray], spec: TensorSpec) -> np.ndarray:
        value = tensors.get(spec.name)
        if value is None:
            raise RequestRefused("bad_tensor", f"The body lacks the input tensor '{spec.name}'.")
        if value.ndim != len(spec.shape) or any(
                d is not None and d != v for d, v in zip(spec.shape[1:], value.shape[1:])):
            raise RequestRefused("bad_tensor",
                                 f"Tensor '{spec.name}' has shape {list(value.shape)}, expected "
                                 f"{['batch' if d is None else d for d in spec.shape]}.")
        if value.dtype != np.dtype(spec.dtype):
            raise RequestRefused("bad_tensor",
                                 f"Tensor '{spec.name}' has dtype {value.dtype}, expected {spec.dtype}.")
        if value.ndim and not 1 <= value.shape[0] <= self.max_batch:
            raise RequestRefused("bad_tensor",
                                 f"Tensor '{spec.name}' has batch size {value.shape[0]}; expected 1 to "
                                 f"{self.max_batch} (the server's max_batch).")
        return value

    def _check_label(self, spec: TensorSpec, value: np.ndarray, batch: int) -> np.ndarray:
        """Labels: the output's shape, or one class id per sample for a sparse categorical loss
        (ids in [0, classes)). Anything else would fail inside the compiled step or, worse, apply
        a NaN update to the shared weights (the decoder has refused NaN and Inf already).
        Returns them in one shape and dtype per output, so the step is traced once."""
        if value.shape[:1] != (batch,):
            raise RequestRefused("bad_tensor", f"Label '{spec.name}' has batch "
                                 f"{list(value.shape[:1])}, the inputs have {batch}.")
        if value.dtype.kind not in "biuf":
            raise RequestRefused("bad_tensor",
                                 f"Label '{spec.name}' has dtype {value.dtype}; expected numbers.")
        sample = tuple(spec.shape[1:])
        classes = sample[-1] if sample else None
        class_ids = spec.name in self.class_id_labels
        if class_ids:  # one class id per sample: [batch] or [batch, 1]
            shapes = [sample[:-1], sample[:-1] + (1,)]
        else:  # the output's shape; [batch] also for an output of one unit
            shapes = [sample] + ([sample[:-1]] if classes == 1 else [])
        if not any(len(shape) == value.ndim - 1 and all(d is None or d == v for d, v in
                                                        zip(shape, value.shape[1:])) for shape in shapes):
            raise RequestRefused("bad_tensor",
                                 f"Label '{spec.name}' has shape {list(value.shape)}; expected "
                                 f"{' or '.join(str(['batch', *shape]) for shape in shapes)}.")
        if class_ids and classes and value.size:
            low, high = value.min(), value.max()
            fractional = value.dtype.kind == "f" and not np.array_equal(value, np.round(value))
            if low < 0 or high >= classes or fractional:
                raise RequestRefused("bad_tensor",
                                     f"Label '{spec.name}' holds class ids from {low} to {high}; expected "
                                     f"whole numbers from 0 to {classes - 1} (the output has {classes} "
                                     "classes).")
        if class_ids:  # as [batch, ...] int32
            return (value[..., 0] if value.ndim == len(spec.shape) else value).astype(np.int32)
        return (value[..., None] if value.ndim < len(spec.shape) else value).astype(np.dtype(spec.dtype))

    @staticmethod
    def _check_sample_weight(value: np.ndarray, batch: int) -> np.ndarray:
        if value.dtype.kind not in "biuf" or tuple(value.shape) != (batch,):
            raise RequestRefused("bad_tensor",
                                 f"sample_weight has shape {list(value.shape)} and dtype {value.dtype}; "
                                 f"expected numbers shaped [{batch}] (one weight per sample).")
        return value.astype(np.float32)

    def _labels(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [s.name for s in self.label_specs]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise RequestRefused("bad_tensor",
                                 f"The labels stay on the server in this split: send them as tensors "
                                 f"named {names}; missing {missing}.")
        allowed = set(names) | {s.name for s in self.inputs} | {"sample_weight"}
        extra = sorted(set(tensors) - allowed)
        if extra:
            raise RequestRefused("bad_tensor", f"Unexpected tensor(s) {extra}; expected {sorted(allowed)}.")
        return {n: tensors[n] for n in names}
