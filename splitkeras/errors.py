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
        └── RequestRefused      raised BY the server: a stable `code` from `REFUSAL_CODES`
            └── UpdateRefused   a guarded step refused (`splitkeras.guard`): nothing was changed

Each message says what happened, what was expected, and how to fix it.

`RequestRefused` is the server's side of `ProtocolError`: its domain code raises it
with a code (`"step_out_of_order"`, `"unknown_session"`, ...) and details such as
`expected_step`, and knows nothing of HTTP; `server_app.errors` maps each code to a
status. A client sees the refusal as a `ProtocolError` with the status it got.
"""

from __future__ import annotations

from typing import Any

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
    "RequestRefused",
    "UpdateRefused",
    "REFUSAL_CODES",
    "GUARD_CODES",
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


# Every code a server refusal may carry (docs/protocol.md, "Errors"). A new code goes here
# AND into the status table of `server_app.errors` (a test checks that both agree).
REFUSAL_CODES: dict[str, str] = {
    "bad_tensor": "a tensor body is malformed or does not fit the segment (names, shape, dtype, NaN)",
    "bad_request": "a request is malformed (a header, a field)",
    "unauthorized": "the server key or the session token is missing or wrong",
    "unknown_session": "no such session (closed, or never opened)",
    "step_out_of_order": "the step is not the one the session expects (see expected_step)",
    "pipeline_full": "max_pending_steps forwards wait for their backwards: send the backward of "
                     "expected_step first",
    "step_expired": "the pending step waited longer than the TTL and was dropped",
    "forward_lost": "the pending step's forward pass was lost when the server restarted",
    "wrong_mode": "forward/backward on a labels-on-server split, or train on a U-shaped one",
    "body_too_large": "the body is over the limit derived from the manifest (see limit)",
    "unsupported_media_type": "the body is not a safetensors body",
    "too_many_sessions": "the server holds as many sessions as it may, none of them idle",
    "out_of_bounds": "a tensor the device sent is beyond the server's bounds (magnitude, sign)",
    "update_refused": "the step's result (outputs, input gradients, loss, new weights) is non-finite "
                      "or out of bounds: nothing was applied",
    "not_durable": "the server cannot make the step durable (its log or checkpoint cannot be written)",
    "round_closed": "a fleet upload names a round that is not open (see current_round)",
    "already_uploaded": "the session already uploaded other weights for this round",
    "aggregation_off": "a fleet route on a server started without --aggregate",
    "worker_lost": "under --strategy multi-worker, a worker of the server's cluster is lost: no step can be "
                   "applied until the cluster is restarted",
}

# The refusals of the guards (`splitkeras.guard`): a session that collects too many is closed.
GUARD_CODES = frozenset({"out_of_bounds", "update_refused"})


class RequestRefused(ProtocolError):
    """The server refuses a request: a stable `code`, a message for people, and details.

    Args:
        code: one of `REFUSAL_CODES`.
        message: what was expected, what came, how to fix it.
        **details: extra fields of the answer, e.g. `expected_step=3` or `limit=1024`.

    Example:
        >>> raise RequestRefused("step_out_of_order", "Expected forward for step 2.",
        ...                      expected_step=2)                              # doctest: +SKIP
    """

    def __init__(self, code: str, message: str, **details: Any) -> None:
        if code not in REFUSAL_CODES:
            raise ValueError(f"Unknown refusal code {code!r}: add it to splitkeras.errors.REFUSAL_CODES "
                             "and give it a status in server_app.errors.")
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    @property
    def expected_step(self) -> int | None:
        """The step the session expects, for the step refusals (else None)."""
        value = self.details.get("expected_step")
        return value if isinstance(value, int) else None


class UpdateRefused(RequestRefused):
    """A guarded step was refused (`splitkeras.guard`); no weight, statistic or optimizer
    state changed.

    Attributes:
        step_kept: whether the step's forward pass is still pending (its backward may be sent
            again with other gradients); False when the refusal consumed it (send the forward
            again).
    """

    def __init__(self, code: str, message: str, *, step_kept: bool = False, **details: Any) -> None:
        super().__init__(code, message, **details)
        self.step_kept = step_kept
