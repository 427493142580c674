"""Refusals over HTTP: every one is a 4xx with `{"error": {"code", "message", ...}}`.

The parts of the server raise `splitkeras.errors.RequestRefused` with a code and know no
HTTP; `STATUS` here is the one table from a code to its status. A `WireFormatError` is a
`bad_tensor`, any other `SplitKerasError` a `bad_request`. The framework's own refusals
keep the status the framework gives them: request validation is 422 `bad_request`, an
unknown route 404 `not_found`, a wrong method 405 `method_not_allowed`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitkeras.errors import RequestRefused, SplitKerasError, WireFormatError

__all__ = ["STATUS", "status_of", "refusal_response", "install_error_handlers", "RETRY_AFTER_SECONDS"]

RETRY_AFTER_SECONDS = 2

STATUS: dict[str, int] = {
    "bad_tensor": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "unknown_session": 404,
    "step_out_of_order": 409,
    "pipeline_full": 409,
    "step_expired": 409,
    "forward_lost": 409,
    "wrong_mode": 409,
    "round_closed": 409,
    "already_uploaded": 409,
    "aggregation_off": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "too_many_sessions": 429,
    "out_of_bounds": 422,
    "update_refused": 422,
    "not_durable": 503,
    "worker_lost": 503,
}


def status_of(code: str) -> int:
    """The HTTP status of a refusal code (`KeyError` for a code without one)."""
    return STATUS[code]


def _response(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:  # the server cannot make steps durable now: ask the device to come back
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return JSONResponse({"error": {"code": code, "message": message, **(details or {})}},
                        status_code=status, headers=headers)


def refusal_response(error: RequestRefused) -> JSONResponse:
    return _response(status_of(error.code), error.code, error.message, error.details)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestRefused)
    async def _refused(_: Request, error: RequestRefused) -> JSONResponse:
        return refusal_response(error)

    @app.exception_handler(WireFormatError)
    async def _wire_error(_: Request, error: WireFormatError) -> JSONResponse:
        return refusal_response(RequestRefused("bad_tensor", str(error)))

    @app.exception_handler(SplitKerasError)
    async def _split_error(_: Request, error: SplitKerasError) -> JSONResponse:
        return refusal_response(RequestRefused("bad_request", str(error)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        )
        return _response(422, "bad_request", f"Invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return _response(error.status_code, code, str(error.detail))
