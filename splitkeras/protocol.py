"""The names the protocol's two sides share (`docs/protocol.md`): the step routes, the
header that carries a step's number, and the refusal codes a client recovers from.

The server (`server_app`) and the Python client (`splitkeras.client`) both import them
from here, so that neither keeps its own copy; the core imports no web framework.

A step's URL does not change from step to step (`POST /v1/sessions/{id}/forward`): its
number travels in the `Splitkeras-Step` header, so that a browser caches one CORS
preflight per route of a session instead of paying one before every request.

Example:
    >>> step_path("s1", "forward")
    '/v1/sessions/s1/forward'
    >>> parse_step("7")
    7
"""

from __future__ import annotations

import re

from splitkeras.errors import REFUSAL_CODES, RequestRefused

__all__ = ["STEP_HEADER", "MAX_STEP", "STEP_ROUTES", "TENSOR_ROUTES", "step_path", "parse_step",
           "UNKNOWN_SESSION", "STEP_OUT_OF_ORDER", "PIPELINE_FULL", "LOST_FORWARD_CODES"]

STEP_HEADER = "Splitkeras-Step"  # the step number of a forward, backward or train
MAX_STEP = 2**53  # the largest step number (a JavaScript number is exact up to it)
STEP_ROUTES = ("forward", "backward", "train")
TENSOR_ROUTES = (*STEP_ROUTES, "predict")
_DIGITS = re.compile(r"[0-9]{1,16}")  # ASCII digits only: int() also takes " +1_0", "١٢"


def _code(name: str) -> str:
    """`name`, which must be a code of the one table `splitkeras.errors.REFUSAL_CODES`."""
    if name not in REFUSAL_CODES:
        raise KeyError(f"{name!r} is not in splitkeras.errors.REFUSAL_CODES")
    return name


UNKNOWN_SESSION = _code("unknown_session")
STEP_OUT_OF_ORDER = _code("step_out_of_order")
PIPELINE_FULL = _code("pipeline_full")  # as many steps pending as the server's max_pending_steps
# The refusals of a backward whose forward the server no longer holds: resend the forward.
LOST_FORWARD_CODES = frozenset(_code(c) for c in ("forward_lost", "step_expired", "step_out_of_order"))


def step_path(session_id: str, route: str) -> str:
    """The path of a session's tensor route (`forward`, `backward`, `train`, `predict`)."""
    if route not in TENSOR_ROUTES:
        raise ValueError(f"route must be one of {TENSOR_ROUTES}, got {route!r}.")
    return f"/v1/sessions/{session_id}/{route}"


def parse_step(values: str | list[str] | None) -> int:
    """The step number of a `Splitkeras-Step` header (its values, if it came several times).

    Raises:
        RequestRefused: `bad_request` when it is missing, repeated, or not a whole number
            in 0..2**53.
    """
    if isinstance(values, list):
        if len(values) > 1:
            raise RequestRefused("bad_request", f"The {STEP_HEADER} header came {len(values)} times "
                                 f"({', '.join(map(repr, values))}); send it once per request.")
        values = values[0] if values else None
    how = (f"send the step number as `{STEP_HEADER}: <k>` (a whole number in 0..2**53) with each "
           "forward, backward and train request")
    if values is None:
        raise RequestRefused("bad_request", f"The {STEP_HEADER} header is missing: {how}.")
    text = values.strip()
    if not _DIGITS.fullmatch(text) or int(text) > MAX_STEP:
        raise RequestRefused("bad_request", f"The {STEP_HEADER} header is {values[:40]!r}, not a step "
                             f"number: {how}.")
    return int(text)
