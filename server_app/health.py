"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready"}})
async def readyz(request: Request) -> Any:
    """The segment is loaded and the checkpoint folder is writable."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    writable = service.checkpoint_dir_writable()
    body = {"status": "ready" if writable else "checkpoint_dir_not_writable",
            "segment": service.entry.name, "mode": service.mode,
            "applied_steps": service.applied_steps, "sessions": len(service.sessions),
            "resumed_from": service.resumed_from}
    return JSONResponse(body, status_code=200 if writable else 503)
