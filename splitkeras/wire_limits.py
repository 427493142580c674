"""How large a valid tensor body can be: the limit a server checks a `Content-Length`
against before it reads a body (`splitkeras.wire.max_body_bytes`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from splitkeras.codecs import Codec, parse_codec
from splitkeras.errors import WireFormatError
from splitkeras.tensor_spec import TensorSpec

__all__ = ["DEFAULT_MAX_HEADER_BYTES", "max_body_bytes"]

DEFAULT_MAX_HEADER_BYTES = 64 * 1024


def max_body_bytes(
    specs: Sequence[TensorSpec],
    max_batch: int,
    wire_dtype: str | Codec | Sequence[str | Codec] = "float32",
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> int:
    """The most bytes a valid body for ``specs`` can take at ``max_batch`` samples.

    A server refuses a larger ``Content-Length`` before reading the body.
    Floating tensors count at the codec's largest size (the largest of several
    codecs, when a list is given: what a server accepting them must allow),
    others at their own.

    Example:
        >>> max_body_bytes([TensorSpec("act", (None, 4), "float32")], 8, "float16")
        65608
    """
    choices = [wire_dtype] if isinstance(wire_dtype, (str, Codec)) else list(wire_dtype)
    try:
        codecs = [parse_codec(choice) for choice in choices]
    except ValueError as error:
        raise WireFormatError(str(error)) from None
    total = 8 + max_header_bytes
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if any(dim is None for dim in spec.shape[1:]):
            shape = "[" + ", ".join("None" if dim is None else str(dim) for dim in spec.shape) + "]"
            raise WireFormatError(f"tensor '{spec.name}': shape {shape} has an unknown non-batch dimension: "
                                  "no size limit")
        size = math.prod(max_batch if dim is None else dim for dim in spec.shape)
        if dtype.kind == "f" or dtype.name == "bfloat16":
            channels = (max_batch if spec.shape[-1] is None else spec.shape[-1]) if spec.shape else 1
            total += max(codec.max_bytes(size, channels) for codec in codecs)
        else:
            total += size * dtype.itemsize
    return total
