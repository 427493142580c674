"""The `/v1/sessions/{id}/fleet` routes: rounds of device aggregation (`--aggregate`).

Like every session route: the token first, the body capped before it is read (the upload's
cap is the most the device segments' weights take, `server_app.limits`), the work on the
service's single writer thread (`server_app.aggregation.DeviceAggregator`). Without
`--aggregate` each route answers 409 `aggregation_off`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel

from server_app.aggregation import DeviceAggregator
from server_app.routes import TENSOR_BODY, TENSOR_RESPONSE, ServiceDep, SessionDep, read_tensor_body
from server_app.service import SegmentService, Session
from splitkeras import wire
from splitkeras.errors import RequestRefused

__all__ = ["router", "MAX_WAIT_SECONDS"]

MAX_WAIT_SECONDS = 60.0
_POLL_SECONDS = 0.02
_SWEEP_SECONDS = 0.25

router = APIRouter(prefix="/v1/sessions/{session_id}/fleet", tags=["fleet rounds"])


class FleetState(BaseModel):
    mode: str
    round: int
    round_steps: int | None
    quorum: int
    deadline_seconds: float
    uploads: int
    samples: int
    last_round: dict[str, Any] | None


class UploadAnswer(BaseModel):
    round: int
    accepted: bool
    uploads: int
    closed: bool
    next_round: int


def _aggregator(service: SegmentService) -> DeviceAggregator:
    if service.fleet is None:
        raise RequestRefused("aggregation_off",
                             "This server does not aggregate device segments: start it with "
                             "`splitkeras serve OUT --aggregate fedavg` (or relay) to train in rounds.")
    return service.fleet.aggregator


def _sweep_and_state(service: SegmentService) -> dict[str, Any]:
    aggregator = _aggregator(service)
    service.ensure_durable()
    aggregator.sweep()
    return aggregator.state()


@router.get("", response_model=FleetState, responses={409: {"description": "aggregation_off"}})
async def fleet_state(service: ServiceDep, session: SessionDep) -> dict[str, Any]:
    """The round state: the open round, its uploads so far, how the last one closed."""
    return await service.run(_sweep_and_state, service)


@router.get("/weights", response_class=Response, responses=TENSOR_RESPONSE)
async def download(service: ServiceDep, session: SessionDep,
                   after: Annotated[int | None, Query(ge=-1, le=2**53)] = None,
                   wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0.0) -> Response:
    """The global device weights (safetensors, metadata `round`). With `after=R`, waits up to
    `wait` seconds for round R to close first (long poll); the answer says which round it is."""
    aggregator = _aggregator(service)
    now = time.monotonic()
    deadline, next_sweep = now + wait, now
    while True:
        if time.monotonic() >= next_sweep:  # the writer closes a round past its deadline
            await service.run(_sweep_and_state, service)
            next_sweep = time.monotonic() + _SWEEP_SECONDS
        # reading the round here, off the writer, is safe (one int) and keeps waiting devices
        # from queueing work in front of the steps of those still training
        if after is None or aggregator.round > after or time.monotonic() >= deadline:
            break
        await asyncio.sleep(_POLL_SECONDS)
    body = await service.run(lambda: _aggregator(service).download(session.wire_dtype))
    return Response(content=body, media_type=wire.MEDIA_TYPE)


def _upload(service: SegmentService, session: Session, round_number: int, body: bytes) -> dict[str, Any]:
    aggregator = _aggregator(service)
    if service.sessions.get(session.session_id) is not session:
        raise RequestRefused("unknown_session", f"Session '{session.session_id}' was closed. Open a new one "
                             "with POST /v1/sessions.")
    service.ensure_durable()
    aggregator.sweep()
    return aggregator.upload(session.session_id, round_number, body)


@router.post("/rounds/{round_number}/weights", response_model=UploadAnswer, openapi_extra=TENSOR_BODY,
             responses={**TENSOR_RESPONSE,
                        409: {"description": "round_closed, already_uploaded or aggregation_off"},
                        422: {"description": "out_of_bounds: a weight over the bound, or an absurd update norm"},
                        503: {"description": "not_durable"}})
async def upload(request: Request, service: ServiceDep, session: SessionDep,
                 round_number: Annotated[int, Path(ge=0, le=2**53)]) -> dict[str, Any]:
    """Upload this device's segment weights for round `round_number` (every device weight, named
    as the download names them; metadata `samples`: how many samples it trained on)."""
    _aggregator(service)
    body = await read_tensor_body(request, service.body_limits["fleet_weights"])
    return await service.run(_upload, service, session, round_number, body)
