"""`TensorSpec`: the name, shape and dtype of one tensor that crosses a cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """One boundary tensor: a model input, or the tensor a layer outputs.

    Attributes:
        name: identifies the tensor across segments. A model input is named
            after its `InputLayer`; a layer output after the layer
            (`"conv2d_3"`), or `"layer.node.index"` when the layer has several
            outputs or is called more than once.
        shape: the shape with `None` for the batch dimension, e.g. `(None, 8, 8, 16)`.
        dtype: a NumPy dtype name, e.g. `"float32"`.

    Example:
        >>> TensorSpec("conv2d_3", (None, 8, 8, 16), "float32").sample_shape
        (8, 8, 16)
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        """The shape of one sample (the batch dimension dropped)."""
        return self.shape[1:]

    @property
    def sample_size(self) -> int | None:
        """Number of elements in one sample, or `None` if a dimension is unknown."""
        size = 1
        for dim in self.sample_shape:
            if dim is None:
                return None
            size *= dim
        return size

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(data["name"]),
            shape=tuple(None if d is None else int(d) for d in data["shape"]),
            dtype=str(data["dtype"]),
        )
