"""The binary tensor wire format: safetensors bodies, encoded and checked.

A body (https://github.com/huggingface/safetensors) is an 8-byte little-endian
header length N, N bytes of UTF-8 JSON mapping each tensor name to its
``dtype``, ``shape`` and ``data_offsets`` (plus an optional ``__metadata__``
object of strings), then the tensors' bytes back to back. Any safetensors
reader or writer interoperates; this module needs NumPy only. ``decode`` is
zero-copy where it can be and, given the expected ``TensorSpec``s, checks
everything a server must not trust, raising only ``WireFormatError``. Its
JavaScript twin, ``mobile_export/src/wire.js``, gives the same messages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from splitkeras.errors import WireFormatError
from splitkeras.tensor_spec import TensorSpec

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "MEDIA_TYPE", "ACCEPTED_MEDIA_TYPES", "WIRE_DTYPES", "largest_value", "DEFAULT_MAX_HEADER_BYTES",
    "encode", "decode", "max_body_bytes", "is_wire_media_type",
]  # fmt: skip

MEDIA_TYPE = "application/vnd.splitkeras.safetensors"
ACCEPTED_MEDIA_TYPES = (MEDIA_TYPE, "application/octet-stream")
WIRE_DTYPES = ("float32", "float16")
DEFAULT_MAX_HEADER_BYTES = 64 * 1024

_METADATA_KEY = "__metadata__"
_MAX_INT = 2**53 - 1  # what JSON numbers hold exactly (and what wire.js accepts)

# safetensors dtype code -> little-endian NumPy dtype.
_CODE_TO_DTYPE: dict[str, np.dtype] = {
    code: np.dtype(numpy_code)
    for code, numpy_code in zip(
        "F64 F32 F16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL".split(),
        "<f8 <f4 <f2 <i8 <i4 <i2 i1 <u8 <u4 <u2 u1 ?".split(),
    )
}
_DTYPE_NAME_TO_CODE = {dtype.name: code for code, dtype in _CODE_TO_DTYPE.items()}
_FLOAT_WIRE_CODES: tuple[str, ...] = ("F32", "F16")


def is_wire_media_type(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` header names a body ``decode`` reads.

    Example:
        >>> is_wire_media_type("application/octet-stream"), is_wire_media_type("text/plain")
        (True, False)
    """
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() in ACCEPTED_MEDIA_TYPES


def _is_floating(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _q(name: str) -> str:  # quotes a name as wire.js does: both give the same messages
    return f"'{name}'"


def _bad(name: str, problem: str) -> NoReturn:
    raise WireFormatError(f"tensor {_q(name)}: {problem}")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _quote_list(names: Sequence[str]) -> str:
    return "[" + ", ".join(map(_q, names)) + "]"


def _format_shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("None" if dim is None else str(dim) for dim in shape) + "]"


def _wire_dtype(wire_dtype: str) -> np.dtype:
    if wire_dtype not in WIRE_DTYPES:
        raise WireFormatError(f"wire_dtype {wire_dtype!r} is not supported; use {WIRE_DTYPES}")
    return np.dtype(wire_dtype).newbyteorder("<")


def largest_value(wire_dtype: str) -> float:
    """The largest finite |x| a float tensor on the wire in `wire_dtype` can carry."""
    return float(np.finfo(_wire_dtype(wire_dtype)).max)


def encode(
    tensors: Mapping[str, np.ndarray | tf.Tensor],
    *,
    wire_dtype: str = "float32",
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Encode named tensors as one safetensors body.

    Floating tensors are cast to ``wire_dtype`` (finite values it cannot hold
    are refused); integer and boolean tensors keep their dtype. Tensors are
    written in the order given.

    Example:
        >>> body = encode({"x": np.ones((2, 3), np.float32)}, metadata={"step": "1"})
        >>> tensors, meta = decode(body)
        >>> tensors["x"].shape, meta
        ((2, 3), {'step': '1'})
    """
    wire = _wire_dtype(wire_dtype)
    header: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise WireFormatError("metadata must map strings to strings")
        header[_METADATA_KEY] = dict(metadata)
    arrays: list[Any] = []  # C-contiguous arrays: buffers for bytes.join
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise WireFormatError(f"tensor name {name!r} is not allowed; use another string")
        array = np.asarray(value)
        if _is_floating(array.dtype):
            target = wire
        elif array.dtype.name in _DTYPE_NAME_TO_CODE:
            target = array.dtype.newbyteorder("<")
        else:
            raise WireFormatError(
                f"tensor {_q(name)} has dtype {array.dtype.name}; the wire carries floating, "
                "integer and boolean tensors"
            )
        try:
            with np.errstate(over="raise"):
                array = np.asarray(array, dtype=target, order="C")  # keeps 0-d arrays 0-d
        except FloatingPointError:
            _bad(name, f"finite values beyond the {wire_dtype} range; send float32 or rescale")
        header[name] = {
            "dtype": _DTYPE_NAME_TO_CODE[target.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    header_bytes = _json(header).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    return b"".join([len(header_bytes).to_bytes(8, "little"), header_bytes, *arrays])


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise WireFormatError(f"header has the key {_q(key)} twice")
        result[key] = value
    return result


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT


def _parse_header(body: memoryview, max_header_bytes: int) -> tuple[dict[str, Any], int]:
    """Read and structurally check the JSON header; return it and where data starts."""
    if len(body) < 8:
        raise WireFormatError(
            f"body is {len(body)} bytes; a safetensors body starts with an 8-byte "
            "little-endian header length"
        )
    header_length = int.from_bytes(body[:8], "little")
    if header_length > max_header_bytes:
        raise WireFormatError(
            f"header length {header_length} is over the limit of {max_header_bytes} bytes"
        )
    if 8 + header_length > len(body):
        raise WireFormatError(
            f"header length {header_length} runs past the end of the {len(body)}-byte body "
            "(truncated body?)"
        )
    try:
        text = bytes(body[8 : 8 + header_length]).decode("utf-8")
    except UnicodeDecodeError as error:
        raise WireFormatError(f"header is not valid UTF-8: {error}") from None
    if not text.startswith("{"):
        raise WireFormatError("header must be a JSON object starting with '{'")
    try:
        header = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as error:
        if isinstance(error, WireFormatError):
            raise
        raise WireFormatError(f"header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise WireFormatError("header must be a JSON object starting with '{'")
    return header, 8 + header_length


def _check_entries(header: dict[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    metadata = header.pop(_METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireFormatError(f"{_METADATA_KEY} must map strings to strings")
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            _bad(name, "entry must be an object with dtype, shape and data_offsets")
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in _CODE_TO_DTYPE:
            supported = ", ".join(_CODE_TO_DTYPE)
            _bad(name, f"dtype {_json(entry['dtype'])} is not supported; supported: {supported}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(map(_is_count, shape)):
            _bad(name, f"shape must be a list of non-negative integers, got {_json(shape)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
            _bad(name, f"data_offsets must be [begin, end] integers >= 0, got {_json(offsets)}")
    return metadata, header


def _check_offsets(entries: dict[str, dict[str, Any]], data_length: int) -> None:
    """Check the tensors tile the data buffer exactly: from 0, no gap, no overlap."""
    for name, entry in entries.items():
        (begin, end), shape, code = entry["data_offsets"], entry["shape"], entry["dtype"]
        if begin > end or end > data_length:
            _bad(name, f"data_offsets [{begin}, {end}] out of range for {data_length} data bytes")
        needed = math.prod(shape) * _CODE_TO_DTYPE[code].itemsize
        if end - begin != needed:
            _bad(
                name,
                f"data_offsets [{begin}, {end}] span {end - begin} bytes but shape "
                f"{_format_shape(shape)} of {code} needs {needed} bytes",
            )
    previous_name, previous_end = "", 0
    in_order = sorted(entries.items(), key=lambda item: item[1]["data_offsets"])
    for index, (name, entry) in enumerate(in_order):
        begin, end = entry["data_offsets"]
        if index == 0 and begin != 0:
            _bad(name, f"data_offsets start at {begin}; the first tensor must start at 0")
        if begin != previous_end:
            problem = "overlap tensor" if begin < previous_end else "leave a gap after tensor"
            where = f"{_q(previous_name)} ending at {previous_end}"
            _bad(name, f"data_offsets [{begin}, {end}] {problem} {where}")
        previous_name, previous_end = name, end
    if previous_end != data_length:
        raise WireFormatError(
            f"{data_length - previous_end} trailing bytes after the last tensor (data buffer "
            f"is {data_length} bytes, tensors end at {previous_end})"
        )


def _check_batch(name: str, batch: int, max_batch: int | None, allow_empty: bool = False) -> None:
    if batch == 0 and not allow_empty:
        _bad(name, "batch size is 0; send at least one sample")
    if max_batch is not None and batch > max_batch:
        _bad(name, f"batch size {batch} is over the limit of {max_batch}; send smaller batches")


def _check_against_specs(
    entries: dict[str, dict[str, Any]], expected: Sequence[TensorSpec], max_batch: int | None
) -> None:
    names = [spec.name for spec in expected]
    if sorted(entries) != sorted(names):
        missing = [name for name in names if name not in entries]
        unexpected = [name for name in entries if name not in names]
        raise WireFormatError(
            f"tensor names do not match: expected {_quote_list(names)}, received "
            f"{_quote_list(list(entries))} (missing: {_quote_list(missing)}; "
            f"unexpected: {_quote_list(unexpected)})"
        )
    batch_owner: str | None = None
    batch_size = 0
    for spec in expected:
        code, shape = entries[spec.name]["dtype"], entries[spec.name]["shape"]
        spec_dtype = np.dtype(spec.dtype)
        allowed = _FLOAT_WIRE_CODES
        if not _is_floating(spec_dtype):
            allowed = (_DTYPE_NAME_TO_CODE.get(spec_dtype.name, "?"),)
        if code not in allowed:
            wanted = f"spec dtype {spec.dtype}; expected {' or '.join(allowed)}"
            _bad(spec.name, f"dtype {code} is not allowed for {wanted}")
        if len(shape) != len(spec.shape):
            _bad(
                spec.name,
                f"shape {_format_shape(shape)} has rank {len(shape)}; expected rank "
                f"{len(spec.shape)} for shape {_format_shape(spec.shape)}",
            )
        for axis, (dim, spec_dim) in enumerate(zip(shape, spec.shape)):
            if spec_dim is not None and dim != spec_dim:
                _bad(
                    spec.name,
                    f"shape {_format_shape(shape)} does not match expected "
                    f"{_format_shape(spec.shape)} (dimension {axis} is {dim}, "
                    f"expected {spec_dim})",
                )
        if not spec.shape or spec.shape[0] is not None:
            continue
        _check_batch(spec.name, shape[0], max_batch)
        if batch_owner is None:
            batch_owner, batch_size = spec.name, shape[0]
        elif shape[0] != batch_size:
            raise WireFormatError(
                f"batch sizes differ between tensors: {_q(batch_owner)} has {batch_size}, "
                f"{_q(spec.name)} has {shape[0]}"
            )


def decode(
    body: bytes | bytearray | memoryview,
    expected: Sequence[TensorSpec] | None = None,
    *,
    max_batch: int | None = None,
    allow_nonfinite: bool = False,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decode and check a safetensors body; return ``(tensors, metadata)``.

    With ``expected``, the body must hold exactly those tensors with their rank
    and non-batch dimensions, one batch size (``1 <= batch <= max_batch``), F32
    or F16 for a floating spec and the exact dtype otherwise; tensors come back
    in the specs' order and dtypes. Without it, any names pass, ``max_batch``
    bounds every first dimension and F16 is widened to float32. NaN or Inf is
    refused unless ``allow_nonfinite``. Arrays needing no cast are read-only
    views into ``body``. Any bad input raises ``WireFormatError``, nothing else.

    Example:
        >>> spec = TensorSpec("act", (None, 4), "float32")
        >>> body = encode({"act": np.zeros((2, 4), np.float32)}, wire_dtype="float16")
        >>> tensors, _ = decode(body, [spec], max_batch=32)
        >>> tensors["act"].dtype, tensors["act"].shape
        (dtype('float32'), (2, 4))
    """
    try:
        view = memoryview(body).cast("B")
    except (TypeError, ValueError) as error:
        raise WireFormatError(f"body must be bytes, got {type(body).__name__}: {error}") from None
    header, data_start = _parse_header(view, max_header_bytes)
    metadata, entries = _check_entries(header)
    _check_offsets(entries, len(view) - data_start)
    if expected is not None:
        _check_against_specs(entries, expected, max_batch)
        targets = {spec.name: np.dtype(spec.dtype) for spec in expected}
    else:
        targets = {}
        for name, entry in entries.items():
            if entry["shape"]:
                _check_batch(name, entry["shape"][0], max_batch, allow_empty=True)
            targets[name] = _CODE_TO_DTYPE["F32" if entry["dtype"] == "F16" else entry["dtype"]]
    tensors: dict[str, np.ndarray] = {}
    for name, target in targets.items():
        entry = entries[name]
        wire = _CODE_TO_DTYPE[entry["dtype"]]
        begin, end = entry["data_offsets"]
        array = np.frombuffer(view, wire, (end - begin) // wire.itemsize, data_start + begin)
        with np.errstate(over="ignore"):  # a float16 spec's overflow shows up as Inf below
            array = array.reshape(entry["shape"]).astype(target.newbyteorder("="), copy=False)
        if not allow_nonfinite and _is_floating(array.dtype) and array.size:
            # min and max propagate NaN and reach any Inf, without a temporary array.
            if not (np.isfinite(array.min()) and np.isfinite(array.max())):
                count = int(np.count_nonzero(~np.isfinite(array)))
                _bad(
                    name,
                    f"contains {count} non-finite values (NaN or Inf); "
                    "pass allow_nonfinite=True to accept them",
                )
        tensors[name] = array
    return tensors, metadata


def max_body_bytes(
    specs: Sequence[TensorSpec],
    max_batch: int,
    wire_dtype: str = "float32",
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> int:
    """The most bytes a valid body for ``specs`` can take at ``max_batch`` samples.

    A server refuses a larger ``Content-Length`` before reading the body.
    Floating tensors count at ``wire_dtype``'s size, others at their own.

    Example:
        >>> max_body_bytes([TensorSpec("act", (None, 4), "float32")], 8, "float16")
        65608
    """
    wire_itemsize = _wire_dtype(wire_dtype).itemsize
    total = 8 + max_header_bytes
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if any(dim is None for dim in spec.shape[1:]):
            shape = _format_shape(spec.shape)
            _bad(spec.name, f"shape {shape} has an unknown non-batch dimension: no size limit")
        size = math.prod(max_batch if dim is None else dim for dim in spec.shape)
        total += size * (wire_itemsize if _is_floating(dtype) else dtype.itemsize)
    return total
