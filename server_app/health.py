"""Liveness and readiness."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready"}})
async def readyz(request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
    """The segment is loaded and the checkpoint folder is writable: `{"status": "ready"}`.
    With the server key (`Authorization: Bearer <key>`) also the segment, the counters and
    the guards' running scales."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    given = authorization[7:].strip() if authorization and authorization[:7].lower() == "bearer " else None
    ready, body = service.status(detailed=service.server_key.matches(given))
    return JSONResponse(body, status_code=200 if ready else 503)
