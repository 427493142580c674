"""Body caps: what a request may make the server read, enforced before it reads it.

`BodyLimits` is ASGI middleware. Every route has a cap: a tensor route (forward, backward,
train, predict) the most its segment's tensors take at `max_batch`
(`SegmentService.body_limits`), `POST /v1/sessions` `JSON_LIMIT`, every other route
`NO_BODY_LIMIT`. A larger `Content-Length` is refused with 413 `body_too_large` before a
byte of the body is read; a body without one (chunked) is refused as soon as more than
the cap has streamed in. Routes still check the key or token before they read a body.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server_app.errors import refusal_response
from splitkeras.errors import RequestRefused
from splitkeras.protocol import TENSOR_ROUTES

__all__ = ["BodyLimits", "JSON_LIMIT", "NO_BODY_LIMIT", "body_limit", "too_large"]

JSON_LIMIT = 16 * 1024  # POST /v1/sessions: {"wire_dtype": ..., "client": <= 200 characters}
NO_BODY_LIMIT = 1024  # routes that take no body
# POST /v1/sessions/{id}/forward|backward|train|predict (the step number is a header)
_TENSOR_ROUTE = re.compile(rf"^/v1/sessions/[^/]+/({'|'.join(TENSOR_ROUTES)})/?$")
_FLEET_UPLOAD = re.compile(r"^/v1/sessions/[^/]+/fleet/rounds/[^/]+/weights/?$")  # server_app.fleet_routes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def too_large(limit: int, tensors: bool) -> RequestRefused:
    if tensors:
        message = (f"The body is over {limit} bytes, the most this segment's tensors take at the server's "
                   "max_batch. Send smaller batches.")
    else:
        message = f"The body is over {limit} bytes, the most this route takes."
    return RequestRefused("body_too_large", message, limit=limit)


def body_limit(scope: Scope) -> tuple[int, bool]:
    """(the body cap of the request's route, whether it is a tensor route)."""
    path = scope.get("path", "")
    if scope.get("method") == "POST":
        if path.rstrip("/") == "/v1/sessions":
            return JSON_LIMIT, False
        match = _TENSOR_ROUTE.match(path)
        service = getattr(getattr(scope.get("app"), "state", None), "service", None)
        if match and service is not None:
            return int(service.body_limits[match.group(1)]), True
        if _FLEET_UPLOAD.match(path) and service is not None and "fleet_weights" in service.body_limits:
            return int(service.body_limits["fleet_weights"]), True
    return NO_BODY_LIMIT, False


class BodyLimits:
    """ASGI middleware: refuse a body over its route's cap before reading it."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, tensors = body_limit(scope)
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                refusal = RequestRefused("bad_request", "Content-Length is not a number.")
                await refusal_response(refusal)(scope, receive, send)
                return
            if size > limit:
                await refusal_response(too_large(limit, tensors))(scope, receive, send)
                return
        received = 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit, tensors)  # answered by the app's refusal handler
            return message

        await self.app(scope, capped, send)
