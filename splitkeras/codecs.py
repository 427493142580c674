"""The codec registry: how floating tensors are written on the wire, per direction.

A codec is named by a SPEC string, one registry for Python and JavaScript
(``mobile_export/src/codecs.js`` parses the same grammar and writes the same bytes):

==================  =====================================================  =============
spec                what crosses the wire for one floating tensor            bytes/value
==================  =====================================================  =============
``float32``         the values (exact)                                       4
``float16``         IEEE half precision (``F16``)                             2
``bfloat16``        the top 16 bits of float32, rounded to nearest even       2
``int8``            8-bit affine codes per channel of the last axis:          1
                    ``x = code * scale + offset`` (``U8`` codes, ``F32``
                    ``<name>/scale`` and ``<name>/offset`` of the channels)
``topk:F``          the ``ceil(F * n)`` values of largest magnitude (F32),    8F
                    their flat ``<name>/indices`` (I32, strictly
                    increasing) and the ``<name>/shape`` (I32)
``topk:F+int8``     the same, the kept values as int8 (one channel)           5F
==================  =====================================================  =============

``F`` is a decimal in (0, 1] written without trailing zeros (``0.05``, ``1``).
Top-k keeps error feedback: the sender adds the residual it dropped at the
previous step (same tensor name, same shape) before selecting, and keeps what
it drops now (including the int8 rounding of the kept values), so nothing is
lost over time. Ties in magnitude go to the lower index.

A session picks one codec per **direction** (``docs/protocol.md``): ``forward``
covers the activations a device sends (``forward`` and ``train`` bodies) and
the outputs a server answers to ``forward``; ``backward`` covers the output
gradients a device sends (``backward``) and the input gradients a server
answers (``backward``, ``train``). Integer and boolean tensors (class-id labels)
are never compressed; floating labels go as float32 unless the forward codec
is a plain float one (then as that).

Example:
    >>> parse_compress("forward=int8,backward=topk:0.05+int8")["backward"].spec
    'topk:0.05+int8'
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "FAMILIES", "PLAIN", "DIRECTIONS", "Codec", "parse_codec", "parse_compress", "format_compress",
    "check_accepted", "parse_accepted", "wire_factor",
]  # fmt: skip

PLAIN = ("float32", "float16", "bfloat16")
FAMILIES = (*PLAIN, "int8", "topk")
DIRECTIONS = ("forward", "backward")

_FRACTION = re.compile(r"^(?:1|0\.[0-9]*[1-9])$")
_FLOAT32_MAX = 3.4028234663852886e38
_LARGEST = {"float32": _FLOAT32_MAX, "float16": 65504.0, "bfloat16": 3.3895313892515355e38,
            # int8: the span max - min of a channel must stay finite in float32
            "int8": _FLOAT32_MAX / 2}
_SYNTAX = ("float32, float16, bfloat16, int8, topk:F or topk:F+int8 (F a fraction in (0, 1] "
           "without trailing zeros, like 0.05)")


@dataclass(frozen=True)
class Codec:
    """One parsed codec SPEC.

    Attributes:
        spec: the canonical text (``"topk:0.05+int8"``).
        family: ``float32``, ``float16``, ``bfloat16``, ``int8`` or ``topk``.
        fraction: for top-k, the share of values kept (else ``None``).
        values: for top-k, how the kept values travel: ``float32`` or ``int8``.
    """

    spec: str
    family: str
    fraction: float | None = None
    values: str | None = None

    @property
    def plain(self) -> bool:
        """Whether a floating tensor travels as one safetensors entry (no parts, no metadata)."""
        return self.family in PLAIN

    @property
    def families(self) -> tuple[str, ...]:
        """The families the codec uses (a server's accepted list must hold them all)."""
        if self.family == "topk" and self.values == "int8":
            return ("topk", "int8")
        return (self.family,)

    @property
    def largest_value(self) -> float:
        """The largest |x| the codec can carry (a guard refuses an answer beyond it)."""
        return _LARGEST[self.values if self.family == "topk" else self.family]  # type: ignore[index]

    @property
    def label_dtype(self) -> str:
        """How floating labels travel in a `train` body under this forward codec, and how
        `predict` bodies and answers travel: the codec itself when plain, else float32."""
        return self.family if self.plain else "float32"

    @property
    def bytes_ratio(self) -> float:
        """Bytes per value over float32's 4 (per-channel scales and headers left out)."""
        if self.family == "topk":
            assert self.fraction is not None
            return self.fraction * (1.25 if self.values == "int8" else 2.0)
        return {"float32": 1.0, "float16": 0.5, "bfloat16": 0.5, "int8": 0.25}[self.family]

    def kept(self, count: int) -> int:
        """How many of `count` values top-k keeps: ``min(count, max(1, ceil(F * count)))``."""
        assert self.fraction is not None
        return min(count, max(1, math.ceil(self.fraction * count)))

    def max_bytes(self, count: int, channels: int) -> int:
        """The most data bytes one floating tensor of `count` values takes (entries only)."""
        if self.family in ("float16", "bfloat16"):
            return 2 * count
        if self.family == "int8":
            return count + 8 * channels
        if self.family == "topk":
            kept = self.kept(count) if count else 0
            value_bytes = kept + 8 if self.values == "int8" else 4 * kept
            return value_bytes + 4 * kept + 4 * 8  # values, indices, a shape of rank <= 8
        return 4 * count

    def __str__(self) -> str:
        return self.spec


def parse_codec(text: object) -> Codec:
    """Parse one codec SPEC; `ValueError` saying the syntax when it is not one.

    Example:
        >>> parse_codec("topk:0.05+int8")
        Codec(spec='topk:0.05+int8', family='topk', fraction=0.05, values='int8')
    """
    if isinstance(text, Codec):
        return text
    if not isinstance(text, str):
        raise ValueError(f"A codec must be a string, got {type(text).__name__}; use {_SYNTAX}.")
    if text in PLAIN or text == "int8":
        return Codec(text, text)
    if text.startswith("topk:"):
        fraction_text, _, values = text[len("topk:"):].partition("+")
        if _FRACTION.match(fraction_text) and values in ("", "int8"):
            return Codec(text, "topk", float(fraction_text), values or "float32")
        if not _FRACTION.match(fraction_text):
            raise ValueError(f"Codec {text!r}: the top-k fraction {fraction_text!r} is not a decimal "
                             "in (0, 1] without trailing zeros; write it like topk:0.05.")
        raise ValueError(f"Codec {text!r}: top-k values travel as float32 (topk:F) or int8 "
                         f"(topk:F+int8), not {values!r}.")
    raise ValueError(f"Unknown codec {text!r}; use {_SYNTAX}.")


def parse_compress(text: object) -> dict[str, Codec]:
    """Parse a ``--compress`` SPEC: one codec for both directions, or
    ``forward=CODEC,backward=CODEC`` (a direction left out is float32).

    Example:
        >>> {d: c.spec for d, c in parse_compress("int8").items()}
        {'forward': 'int8', 'backward': 'int8'}
    """
    if isinstance(text, Mapping):
        unknown = [key for key in text if key not in DIRECTIONS]
        if unknown:
            raise ValueError(f"Unknown direction(s) {unknown} in compress; use 'forward' and 'backward'.")
        return {d: parse_codec(text.get(d, "float32")) for d in DIRECTIONS}
    if not isinstance(text, str) or not text:
        raise ValueError(f"compress must be a codec or 'forward=CODEC,backward=CODEC', got {text!r}.")
    if "=" not in text:
        codec = parse_codec(text)
        return {d: codec for d in DIRECTIONS}
    chosen: dict[str, Codec] = {}
    for item in text.split(","):
        direction, equals, spec = item.partition("=")
        if not equals or direction not in DIRECTIONS:
            raise ValueError(f"compress {text!r}: {item!r} is not forward=CODEC or backward=CODEC.")
        if direction in chosen:
            raise ValueError(f"compress {text!r} names {direction} twice.")
        chosen[direction] = parse_codec(spec)
    return {d: chosen.get(d, parse_codec("float32")) for d in DIRECTIONS}


def format_compress(codecs: Mapping[str, Codec]) -> str:
    """The SPEC text of per-direction codecs: one name when both are the same."""
    forward, backward = codecs["forward"].spec, codecs["backward"].spec
    return forward if forward == backward else f"forward={forward},backward={backward}"


def wire_factor(text: str) -> float:
    """The bytes a cut costs under a compress SPEC over float32's, averaged over the two
    directions (each carries the cut's bytes once per step): what `splitkeras plan` charges.

    Example:
        >>> wire_factor("forward=int8,backward=topk:0.05+int8")
        0.15625
    """
    chosen = parse_compress(text)
    return sum(chosen[d].bytes_ratio for d in DIRECTIONS) / len(DIRECTIONS)


def parse_accepted(text: str | Iterable[str]) -> tuple[str, ...]:
    """A server's accepted families (``--codecs float32,int8,topk``); `ValueError` if unknown."""
    items = [item.strip() for item in (text.split(",") if isinstance(text, str) else text)]
    unknown = [item for item in items if item not in FAMILIES]
    if unknown or not items:
        raise ValueError(f"Unknown codec families {unknown or items}; choose from {', '.join(FAMILIES)}.")
    return tuple(dict.fromkeys(items))


def check_accepted(codecs: Mapping[str, Codec], accepted: Iterable[str]) -> None:
    """`ValueError` when a direction's codec uses a family the server does not accept."""
    allowed = tuple(accepted)
    for direction in DIRECTIONS:
        refused = [family for family in codecs[direction].families if family not in allowed]
        if refused:
            raise ValueError(f"This server does not accept the codec '{codecs[direction].spec}' "
                             f"({direction}); it accepts {', '.join(allowed)}. Open the session "
                             "with one of those.")
