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
    """The segment is loaded, the checkpoint folder is writable and the last log write worked."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    writable = service.checkpoint_dir_writable()
    status = "ready" if writable and service.durable else \
        "checkpoint_dir_not_writable" if not writable else "not_durable"
    writable = status == "ready"
    body = {"status": status,
            "segment": service.entry.name, "mode": service.mode,
            "applied_steps": service.applied_steps, "sessions": len(service.sessions),
            "resumed_from": service.resumed_from, "replayed": service.replayed}
    return JSONResponse(body, status_code=200 if writable else 503)
