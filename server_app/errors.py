"""HTTP-facing errors: every refusal is a 4xx with `{"error": {"code", "message", ...}}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitkeras.errors import SplitKerasError, WireFormatError

__all__ = ["ServiceError", "install_error_handlers"]


class ServiceError(Exception):
    """A refused request: HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": {"code": self.code, "message": self.message, **self.extra}},
                            status_code=self.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, error: ServiceError) -> JSONResponse:
        return error.response()

    @app.exception_handler(WireFormatError)
    async def _wire_error(_: Request, error: WireFormatError) -> JSONResponse:
        return ServiceError(400, "bad_tensor", str(error)).response()

    @app.exception_handler(SplitKerasError)
    async def _split_error(_: Request, error: SplitKerasError) -> JSONResponse:
        return ServiceError(400, "bad_request", str(error)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        )
        return ServiceError(422, "bad_request", f"Invalid request: {problems}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return ServiceError(error.status_code, code, str(error.detail)).response()
