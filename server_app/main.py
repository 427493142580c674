"""`create_app`: the FastAPI app. The segment is loaded in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from server_app import fleet_routes, health, routes
from server_app.errors import install_error_handlers
from server_app.limits import BodyLimits
from server_app.settings import ServerSettings
from splitkeras.protocol import STEP_HEADER

if TYPE_CHECKING:
    from server_app.service import SegmentService

__all__ = ["create_app"]


CORS_MAX_AGE = 7200  # seconds a browser may cache a preflight answer (Chromium's cap)


def create_app(settings: ServerSettings | None = None, service: SegmentService | None = None) -> FastAPI:
    """Build the app for `settings` (default: from `SPLITKERAS_*` environment variables).

    The segment loads in the app's lifespan, unless `service` is given (`splitkeras serve`
    loads it before the server starts, so that a bad file or flag is one line, not a
    traceback from the lifespan); the lifespan closes it at shutdown either way.

    Example:
        >>> app = create_app(ServerSettings(split_dir="out", key="k"))   # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)               # doctest: +SKIP
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from server_app.service import SegmentService

        if service is not None:
            loaded = service
        else:
            resolved = settings or ServerSettings()  # type: ignore[call-arg]
            loaded = await asyncio.to_thread(SegmentService, resolved)
        app.state.service = loaded
        sweeper = asyncio.create_task(_sweep(loaded))
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.to_thread(loaded.close)

    app = FastAPI(
        title="splitkeras server",
        version="1",
        summary="Trains the middle segment of a split Keras model for many devices.",
        description="Protocol: docs/protocol.md. Tensor bodies are safetensors.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimits)
    configured = settings or (service.settings if service is not None else None)
    origins = list(configured.cors_origins) if configured is not None else []
    if origins:  # pages of these origins may call the server (off by default)
        from starlette.middleware.cors import CORSMiddleware

        # A step's URL is the same at every step (its number is the Splitkeras-Step header), so
        # a page pays one preflight per route of a session, cached max_age seconds.
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type", STEP_HEADER.lower()],
                           expose_headers=["retry-after"], max_age=CORS_MAX_AGE)
    app.include_router(health.router)
    app.include_router(routes.router)
    app.include_router(fleet_routes.router)
    if configured is not None and configured.device_page:  # the browser page (off by default)
        app.include_router(_device_page(configured))
    return app


def _device_page(settings: ServerSettings) -> Any:
    """The `/device` routes (server_app/device_page.py); `PageNotBuilt` without a built page."""
    from fastapi import Request

    from server_app.device_page import device_page_router
    from splitkeras.manifest import Manifest

    def key_matches(request: Request, given: str | None) -> bool:
        service = getattr(request.app.state, "service", None)
        return service is not None and bool(service.server_key.matches(given))

    return device_page_router(settings.resolved_device_page_dir, settings.split_dir,
                              Manifest.read(settings.split_dir), key_matches)


async def _sweep(service: object) -> None:
    from server_app.service import SegmentService

    assert isinstance(service, SegmentService)
    settings = service.settings
    interval = max(0.05, min(30.0, settings.step_ttl_seconds / 4, settings.session_ttl_seconds / 4))
    while True:
        await asyncio.sleep(interval)
        await service.run(service.sweep_expired)
        await service.run(service.sweep_idle)
