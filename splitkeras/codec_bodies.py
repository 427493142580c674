"""The arithmetic of the lossy codecs, and the checks a decoder makes on their parts.

Every operation is float32 IEEE arithmetic in a fixed order (no fused multiply-add),
so ``mobile_export/src/codecs.js`` (``Math.fround`` after each operation) writes the
same bytes. See ``splitkeras.codecs`` for the formats; ``splitkeras.wire`` calls
`expand` before writing a body and `collapse` after reading one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, MutableMapping
from typing import Any, NoReturn

import numpy as np

from splitkeras.codecs import Codec
from splitkeras.errors import WireFormatError

__all__ = ["bfloat16_bits", "bfloat16_values", "int8_encode", "int8_decode", "topk_indices",
           "expand", "collapse", "Residuals"]

Residuals = MutableMapping[str, np.ndarray]
_PARTS = ("scale", "offset", "indices", "shape")
_ONE = np.float32(1.0)
_RANGE = np.float32(255.0)


def _bad(name: str, problem: str) -> NoReturn:
    raise WireFormatError(f"tensor '{name}': {problem}")


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (NaN stays a quiet NaN)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def int8_encode(name: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine 8-bit codes per channel of the last axis: ``(codes U8, scale, offset)``.

    ``offset`` is the channel's minimum, ``scale = (max - min) / 255`` (1 when the
    channel is constant), ``code = rint((x - offset) * (1 / scale))``; decoding
    gives back x within ``scale / 2`` plus a few float32 roundings.
    """
    array = np.ascontiguousarray(values, np.float32)
    channels = array.shape[-1] if array.ndim else 1
    rows = array.reshape(-1, channels) if channels else array.reshape(0, 0)
    if rows.shape[0] == 0:
        return (np.zeros(array.shape, np.uint8), np.ones(channels, np.float32),
                np.zeros(channels, np.float32))
    low, high = rows.min(axis=0) + np.float32(0), rows.max(axis=0) + np.float32(0)  # -0 -> +0
    with np.errstate(over="ignore", invalid="ignore"):
        span = high - low
    if not np.isfinite(span).all():
        _bad(name, "non-finite values, or a channel spanning beyond float32, cannot be sent as int8; "
                   "send float32 or rescale")
    scale = span / _RANGE
    scale[scale == 0] = _ONE
    inverse = _ONE / scale
    work = np.subtract(rows, low)
    np.multiply(work, inverse, out=work)
    np.rint(work, out=work)
    return work.astype(np.uint8).reshape(array.shape), scale, low


def int8_decode(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``codes * scale + offset`` in float32, channels along the last axis."""
    channels = scale.shape[0]
    rows = codes.reshape(-1, channels) if channels else codes.reshape(0, 0)
    out = rows.astype(np.float32)  # exact; then two in-place passes (faster than a mixed-type one)
    with np.errstate(over="ignore"):  # a decoder refuses the Inf that results
        np.multiply(out, scale, out=out)
        np.add(out, offset, out=out)
    return out.reshape(codes.shape)


def topk_indices(flat: np.ndarray, kept: int) -> np.ndarray:
    """The flat indices (I32, increasing) of the `kept` largest magnitudes; ties go to the
    lower index. Magnitudes are compared as float32 bit patterns (sign bit cleared), so the
    choice is exact and the same in JavaScript."""
    magnitude = flat.view(np.uint32) & np.uint32(0x7FFFFFFF)
    count = magnitude.size
    if kept >= count:
        return np.arange(count, dtype=np.int32)
    threshold = np.partition(magnitude, count - kept)[count - kept]
    chosen = magnitude > threshold
    ties = np.flatnonzero(magnitude == threshold)[: kept - int(np.count_nonzero(chosen))]
    chosen[ties] = True
    return np.flatnonzero(chosen).astype(np.int32)


def _topk(name: str, values: np.ndarray, codec: Codec, residuals: Residuals | None) -> dict[str, np.ndarray]:
    dense = np.array(values, np.float32, order="C", copy=True)
    if dense.size >= 2**31 or any(dim >= 2**31 for dim in dense.shape):
        _bad(name, "has too many values for top-k indices (int32); send it as int8 or float32")
    previous = None if residuals is None else residuals.get(name)
    if previous is not None and previous.shape == dense.shape:
        np.add(dense, previous, out=dense)
    flat = dense.reshape(-1)
    indices = topk_indices(flat, codec.kept(flat.size))
    kept = flat[indices]
    parts: dict[str, np.ndarray] = {}
    if codec.values == "int8":
        codes, scale, offset = int8_encode(name, kept.reshape(-1, 1))  # one channel
        codes = codes.reshape(-1)
        parts.update({name: codes, f"{name}/scale": scale, f"{name}/offset": offset})
        sent = int8_decode(codes, scale, offset)
    else:
        parts[name] = kept
        sent = kept
    parts[f"{name}/indices"] = indices
    parts[f"{name}/shape"] = np.array(dense.shape, np.int32)
    if residuals is not None:
        flat[indices] = kept - sent  # what was dropped, and the rounding of what was kept
        residuals[name] = dense
    return parts


def expand(tensors: Mapping[str, Any], codec: Codec, residuals: Residuals | None = None,
           uncompressed: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The entries that carry `tensors` under a lossy `codec` (floating ones compressed,
    the `uncompressed` names and non-floating tensors as they are)."""
    entries: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or "/" in name:
            raise WireFormatError(f"tensor name {name!r} is not allowed with codec '{codec.spec}': "
                                  "'/' separates a tensor's parts; rename it")
        array = np.asarray(value)
        if array.dtype.kind != "f" and array.dtype.name != "bfloat16" or name in uncompressed:
            entries[name] = array
        elif codec.family == "int8":
            codes, scale, offset = int8_encode(name, array)
            entries.update({name: codes, f"{name}/scale": scale, f"{name}/offset": offset})
        else:
            entries.update(_topk(name, array, codec, residuals))
    return entries


class _Entries:
    """A body's arrays and their safetensors codes, consumed part by part."""

    def __init__(self, arrays: Mapping[str, np.ndarray], codes: Mapping[str, str]) -> None:
        self.arrays, self.codes = dict(arrays), codes

    def pop(self, name: str, code: str, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
        array = self.arrays.pop(name)
        if self.codes[name] != code or (array.ndim != 1 if shape is None else array.shape != shape):
            wanted = f"a rank-1 {code} tensor" if shape is None else f"{code} of shape {list(shape)}"
            hint = "" if shape is None else " (truncated values?)"
            _bad(name.split("/")[0], f"{what} must be {wanted}, got {self.codes[name]} of shape "
                                     f"{list(array.shape)}{hint}")
        return array


def _take(raw: _Entries, name: str, part: str, code: str) -> np.ndarray:
    key = f"{name}/{part}"
    if key not in raw.arrays:
        _bad(name, f"the part '{key}' is missing")
    return raw.pop(key, code, None, f"the part '{key}'")


def _scales(raw: _Entries, name: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    scale = _take(raw, name, "scale", "F32")
    offset = _take(raw, name, "offset", "F32")
    if scale.shape[0] != channels or offset.shape[0] != channels:
        _bad(name, f"{scale.shape[0]} scales and {offset.shape[0]} offsets for {channels} channels "
                   "(the last axis): send one of each per channel")
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        _bad(name, f"the scale of channel {int(np.argmax(bad))} is not finite and > 0")
    if not np.isfinite(offset).all():
        _bad(name, f"the offset of channel {int(np.argmax(~np.isfinite(offset)))} is not finite")
    return scale, offset


def _codes(raw: _Entries, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return raw.pop(name, "U8", shape, "int8 codes")


def _collapse_topk(raw: _Entries, name: str, codec: Codec) -> np.ndarray:
    shape_part = _take(raw, name, "shape", "I32")
    if shape_part.shape[0] > 8 or (shape_part < 0).any():
        _bad(name, f"the dense shape {shape_part.tolist()} must be at most 8 dimensions >= 0")
    shape = tuple(int(dim) for dim in shape_part)
    count = int(np.prod(shape, dtype=np.int64))
    if count >= 2**31:
        _bad(name, f"the dense shape {list(shape)} holds {count} values, over the int32 index range")
    indices = _take(raw, name, "indices", "I32")
    kept = codec.kept(count) if count else 0
    if indices.shape[0] != kept:
        _bad(name, f"{indices.shape[0]} indices, but {codec.spec} of {count} values keeps {kept}")
    if codec.values == "int8":
        values = int8_decode(_codes(raw, name, (kept,)), *_scales(raw, name, 1))
    else:
        values = raw.pop(name, "F32", (kept,), "top-k values")
    if kept:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= count:
            at = int(np.argmax((indices < 0) | (indices >= count)))
            _bad(name, f"index {int(indices[at])} at position {at} is out of range for {count} values")
        steps = np.diff(indices)
        if (steps <= 0).any():
            at = int(np.argmax(steps <= 0)) + 1
            if steps[at - 1] == 0:
                _bad(name, f"index {int(indices[at])} appears twice (positions {at - 1} and {at})")
            _bad(name, f"indices must be strictly increasing: {int(indices[at])} at position {at} "
                       f"follows {int(indices[at - 1])}")
    dense = np.zeros(count, np.float32)
    dense[indices] = values
    return dense.reshape(shape)


def collapse(arrays: Mapping[str, np.ndarray], codes: Mapping[str, str],
             codec: Codec) -> tuple[dict[str, np.ndarray], set[str]]:
    """Check and decode the entries of a body written under a lossy `codec`; entries
    without parts come back as they are. Returns the tensors and the names that were
    compressed. Raises `WireFormatError` for any defect."""
    raw = _Entries(arrays, codes)
    names = [name for name in raw.arrays if "/" not in name]
    dense: dict[str, np.ndarray] = {}
    compressed: set[str] = set()
    for name in names:
        has_parts = any(f"{name}/{part}" in raw.arrays for part in _PARTS)
        if not has_parts:
            dense[name] = raw.arrays.pop(name)
        elif codec.family == "int8":
            compressed.add(name)
            shape = raw.arrays[name].shape
            scale, offset = _scales(raw, name, shape[-1] if shape else 1)
            dense[name] = int8_decode(_codes(raw, name, shape), scale, offset)
        else:
            compressed.add(name)
            dense[name] = _collapse_topk(raw, name, codec)
    if raw.arrays:
        stray = ", ".join(f"'{key}'" for key in raw.arrays)
        raise WireFormatError(f"entries {stray} belong to no tensor of codec '{codec.spec}' "
                              "(a part's tensor is missing, or the body uses another codec)")
    return dense, compressed
