"""The exceptions splitkeras raises.

Every error a user can cause is a `SplitKerasError`, so one `except` clause
(or the CLI) can catch them all. The tree::

    SplitKerasError
    ├── ModelLoadError          a model file cannot be read or is refused (safe mode)
    ├── UnsupportedModelError   the model cannot be cut (subclassed, shared across a cut, ...)
    ├── CutError                a cut point is wrong (unknown layer, order, empty segment, ...)
    ├── ManifestError           a split folder or `split.json` is missing or malformed
    ├── TrainingError           compile/fit misuse or a non-finite value during a step
    ├── WireFormatError         a tensor payload is malformed (shape, dtype, bytes, NaN, ...)
    ├── ExportError             a segment cannot be exported to TF.js (layer, setting, ...)
    └── ProtocolError           the server refused a request (session, step, token, ...)

Each message says what happened, what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "SplitKerasError",
    "ModelLoadError",
    "UnsupportedModelError",
    "CutError",
    "ManifestError",
    "TrainingError",
    "WireFormatError",
    "ExportError",
    "ProtocolError",
]


class SplitKerasError(Exception):
    """Base class of every error splitkeras raises for a user's mistake."""


class ModelLoadError(SplitKerasError):
    """A model file cannot be read, or loading it was refused."""


class UnsupportedModelError(SplitKerasError):
    """The model has a structure splitkeras cannot cut."""


class CutError(SplitKerasError, ValueError):
    """A cut point is unknown, out of order, repeated, or leaves a segment empty."""


class ManifestError(SplitKerasError):
    """A split folder or its `split.json` is missing, malformed or inconsistent."""


class TrainingError(SplitKerasError):
    """Training was misused (not compiled, bad data) or produced a non-finite value."""


class WireFormatError(SplitKerasError, ValueError):
    """A tensor payload does not match what was expected."""


class ExportError(SplitKerasError):
    """A segment cannot be exported to a TF.js bundle."""


class ProtocolError(SplitKerasError):
    """The split-learning server refused a request.

    Attributes:
        status_code: the HTTP status the server answered with (0 if none).
    """

    def __init__(self, message: str, status_code: int = 0) -> None:
        super().__init__(message)
        self.status_code = status_code
