"""The `/v1` routes: decode nothing here, only authenticate, bound the body and hand
the bytes to `SegmentService` on its single writer thread. The key or token is checked
before a body is read, and no body is read past its cap (`server_app.limits`)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect

from server_app.limits import JSON_LIMIT, too_large
from server_app.service import SegmentService, Session
from splitkeras import protocol, wire
from splitkeras.errors import RequestRefused

__all__ = ["router", "get_service"]

TENSOR_BODY = {
    "requestBody": {
        "required": True,
        "content": {wire.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "description": "A safetensors body: the tensors named as in split.json (docs/protocol.md).",
    }
}
TENSOR_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {wire.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
          "description": "A safetensors body."},
    400: {"description": "Malformed tensor body (bad_tensor)."},
    401: {"description": "Missing or wrong token."},
    404: {"description": "Unknown session."},
    409: {"description": "Step out of order, expired or lost; or wrong mode."},
    413: {"description": "Body over the limit derived from the manifest."},
    415: {"description": "Not a safetensors body."},
}


def get_service(request: Request) -> SegmentService:
    return request.app.state.service


ServiceDep = Annotated[SegmentService, Depends(get_service)]


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def session_dep(service: ServiceDep, session_id: Annotated[str, Path(max_length=64)],
                authorization: Annotated[str | None, Header()] = None) -> Session:
    return service.session(session_id, _bearer(authorization))


SessionDep = Annotated[Session, Depends(session_dep)]


async def read_tensor_body(request: Request, limit: int) -> bytes:
    """The body, refused with 415 for another media type and 413 past `limit` bytes,
    from Content-Length or while streaming: never read whole when it is too large."""
    content_type = request.headers.get("content-type")
    if not wire.is_wire_media_type(content_type):
        raise RequestRefused("unsupported_media_type",
                             f"Expected Content-Type '{wire.MEDIA_TYPE}' (or application/octet-stream), "
                             f"got '{content_type}'.")
    return await read_body(request, limit, tensors=True)


async def read_body(request: Request, limit: int, tensors: bool = False) -> bytes:
    """The body, refused with 413 past `limit` bytes (from Content-Length, or while it
    streams in: never read whole when it is too large)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large(limit, tensors)
        except ValueError:
            raise RequestRefused("bad_request", "Content-Length is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit, tensors)
            chunks.append(chunk)
    except ClientDisconnect:  # e.g. closed by the read timeout: nobody is left to answer
        raise RequestRefused("bad_request", "The client went away before its body arrived.") from None
    return b"".join(chunks)


def _tensors(data: bytes) -> Response:
    return Response(content=data, media_type=wire.MEDIA_TYPE)


class OpenSession(BaseModel):
    wire_dtype: Literal["float32", "float16"] = Field(default="float32",
                                                      description="dtype of float tensors on the wire, both "
                                                      "directions (the older form of `compress`)")
    compress: str | dict[str, str] | None = Field(
        default=None, max_length=200,
        description="the codec of each direction: one SPEC for both, 'forward=SPEC,backward=SPEC', or "
                    "{\"forward\": SPEC, \"backward\": SPEC} (docs/protocol.md, Codecs); default: wire_dtype")
    client: str | None = Field(default=None, max_length=200, description="free text, for logs")


class SessionOpened(BaseModel):
    session_id: str
    token: str
    wire_dtype: str
    codecs: dict[str, str]
    segment: str
    mode: Literal["u_shaped", "labels_on_server"]
    max_batch: int
    max_pending_steps: int = 1  # forwards that may wait for their backwards at once (pipelining)
    next_step: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    aggregation: dict[str, Any] | None = None  # rounds of device aggregation (server_app.fleet_routes)


class SessionState(BaseModel):
    session_id: str
    wire_dtype: str
    codecs: dict[str, str]
    next_step: int
    pending_step: int | None  # the oldest pending step
    pending_steps: list[int]  # every pending step, oldest first
    applied_steps: int
    refused_steps: int


OPEN_BODY = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": OpenSession.model_json_schema()}}}}


def _open_body(raw: bytes) -> OpenSession:
    """The JSON body of POST /v1/sessions (empty or `null`: the defaults); a bad one is the
    422 `bad_request` FastAPI gives for a body it validates."""
    if not raw.strip():
        return OpenSession()
    try:
        data = json.loads(raw)
    except ValueError as error:  # not JSON, or not UTF-8
        position = getattr(error, "pos", 0)
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", position),
                                       "msg": "JSON decode error", "input": {}}]) from None
    if data is None:
        return OpenSession()
    try:
        return OpenSession.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None


router = APIRouter(prefix="/v1", tags=["split learning"])


@router.post("/sessions", status_code=201, response_model=SessionOpened, openapi_extra=OPEN_BODY,
             responses={401: {"description": "Missing or wrong server key."},
                        413: {"description": "Body over 16 KiB."},
                        422: {"description": "Invalid JSON body (bad_request)."},
                        429: {"description": "max_sessions held, each with a step in progress."}})
async def open_session(request: Request, service: ServiceDep,
                       authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    """Open a session (needs the server key); returns the token for its routes. Body
    (optional): `{"compress": SPEC, "wire_dtype": "float32" | "float16", "client": str}`; the
    answer's `codecs` says each direction's codec."""
    service.check_key(_bearer(authorization))  # before a byte of the body is read
    body = _open_body(await read_body(request, JSON_LIMIT))
    session, token = await service.run(service.open_session, body.wire_dtype, body.compress)
    return {"session_id": session.session_id, "token": token, "wire_dtype": session.wire_dtype,
            "codecs": session.codecs,
            "next_step": session.next_step, **service.describe()}


@router.get("/sessions/{session_id}", response_model=SessionState)
async def session_state(session: SessionDep) -> dict[str, Any]:
    """The session's step counters."""
    return session.public()


@router.delete("/sessions/{session_id}", status_code=204)
async def close_session(service: ServiceDep, session: SessionDep) -> Response:
    """Close the session and free its pending step."""
    await service.run(service.close_session, session)
    return Response(status_code=204)


def step_dep(request: Request) -> int:
    """The step number from the `Splitkeras-Step` header (400 `bad_request` when it is
    missing or not a whole number in 0..2**53); checked after the token, before the body."""
    return protocol.parse_step(request.headers.getlist(protocol.STEP_HEADER))


StepDep = Annotated[int, Depends(step_dep)]

STEP_HEADER_PARAMETER = {"parameters": [{
    "name": protocol.STEP_HEADER, "in": "header", "required": True,
    "schema": {"type": "integer", "minimum": 0, "maximum": protocol.MAX_STEP},
    "description": "The step number (the session's steps count from 0). It travels in a header so "
                   "that the route's URL does not change from step to step: a browser caches one CORS "
                   "preflight per route."}]}
STEP_OPENAPI = {**TENSOR_BODY, **STEP_HEADER_PARAMETER}
STEP_RESPONSES: dict[int | str, dict[str, Any]] = {
    **TENSOR_RESPONSE,
    400: {"description": "Malformed tensor body (bad_tensor), or the Splitkeras-Step header missing or "
                         "not a whole number in 0..2**53 (bad_request)."}}


@router.post("/sessions/{session_id}/forward", openapi_extra=STEP_OPENAPI, responses=STEP_RESPONSES,
             response_class=Response)
async def forward(request: Request, service: ServiceDep, session: SessionDep, step: StepDep) -> Response:
    """Training-mode forward of step `Splitkeras-Step` (U-shaped splits); a retry returns the
    same bytes."""
    body = await read_tensor_body(request, service.body_limits["forward"])
    return _tensors(await service.micro.forward(session, step, body))  # alone, or micro-batched


@router.post("/sessions/{session_id}/backward", openapi_extra=STEP_OPENAPI, responses=STEP_RESPONSES,
             response_class=Response)
async def backward(request: Request, service: ServiceDep, session: SessionDep, step: StepDep) -> Response:
    """Apply step `Splitkeras-Step`'s update from the output gradients, once; returns input
    gradients."""
    body = await read_tensor_body(request, service.body_limits["backward"])
    return _tensors(await service.micro.backward(session, step, body))


@router.post("/sessions/{session_id}/train", openapi_extra=STEP_OPENAPI, responses=STEP_RESPONSES,
             response_class=Response)
async def train(request: Request, service: ServiceDep, session: SessionDep, step: StepDep) -> Response:
    """One step (`Splitkeras-Step`) with the labels on the server: loss, update, input gradients;
    metrics in metadata."""
    body = await read_tensor_body(request, service.body_limits["train"])
    return _tensors(await service.run(service.train, session, step, body))


@router.post("/sessions/{session_id}/predict", openapi_extra=TENSOR_BODY,
             responses=TENSOR_RESPONSE, response_class=Response)
async def predict(request: Request, service: ServiceDep, session: SessionDep) -> Response:
    """Inference-mode forward: no weights, statistics or steps change."""
    body = await read_tensor_body(request, service.body_limits["predict"])
    return _tensors(await service.run(service.predict, session, body))
