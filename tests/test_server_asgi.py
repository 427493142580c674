"""The server in process, through ASGI (no network): every refusal of the protocol, retries,
many devices at once, the step TTL, restarts and checkpoints, parity with the in-process
trainer, the OpenAPI document and a fuzz. See docs/protocol.md.

Two apps are shared by most tests (a U-shaped split with a BatchNorm in the server segment,
and a one-cut split with the labels on the server); tests that restart or need fresh weights
make their own. Every refusal must be a 4xx that says what was expected and must leave every
variable, the optimizer step, the sessions' counters and the pending tapes as they were.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server_fixtures import (
    KEY,
    MAX_BATCH,
    LiveApp,
    assert_same_state,
    bearer,
    copy_split,
    make_split,
    settings_for,
    snapshot,
    step_header,
    tensor_headers,
)

from server_app import checkpoint as checkpoint_module
from splitkeras import protocol, wire

RNG = np.random.default_rng(0)


def act(batch: int = 2, width: int = 3) -> np.ndarray:
    return RNG.standard_normal((batch, width)).astype(np.float32)


def step_path(sid: str, route: str) -> str:
    return protocol.step_path(sid, route)


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("splits")
    return {"u_shaped": make_split(root / "u", "u_shaped"),
            "labels_on_server": make_split(root / "l", "labels_on_server")}


@pytest.fixture
def fresh_split(splits: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of a split folder (for tests that restart or need untrained weights)."""
    return lambda mode: copy_split(splits[mode], tmp_path / mode)


@pytest.fixture(scope="module")
def u_app(splits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = LiveApp(settings_for(copy_split(splits["u_shaped"], tmp_path_factory.mktemp("u_app") / "s")))
    yield live
    live.close()


@pytest.fixture(scope="module")
def l_app(splits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = LiveApp(settings_for(copy_split(splits["labels_on_server"],
                                           tmp_path_factory.mktemp("l_app") / "s")))
    yield live
    live.close()


def state(live: LiveApp) -> dict[str, Any]:
    """A snapshot taken on the writer thread, between requests."""
    return live.on_writer(snapshot, live.service)


# ------------------------------------------------------------------ 1. every bad input: 4xx


def body_of(tensors: dict[str, Any]) -> bytes:
    return wire.encode(tensors)


def replace(tensors: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    return {**tensors, name: value}


def first(tensors: dict[str, Any]) -> str:
    return next(iter(tensors))


def with_nonfinite(value: float, name: str | None = None) -> Callable[[dict[str, Any]], bytes]:
    def build(t: dict[str, Any]) -> bytes:
        key = name or first(t)
        array = np.array(t[key], dtype=np.float32, copy=True)
        array.flat[0] = value
        return body_of(replace(t, key, array))
    return build


def batched(rows: int) -> Callable[[dict[str, Any]], bytes]:
    def build(t: dict[str, Any]) -> bytes:
        return body_of({k: np.resize(v, (rows, *np.shape(v)[1:])).astype(v.dtype) for k, v in t.items()})
    return build


async def stream(total: int, counter: list[int], chunk: int = 16 * 1024) -> Any:
    sent = 0
    while sent < total:
        piece = min(chunk, total - sent)
        sent += piece
        counter[0] = sent
        yield b"\0" * piece


def with_label(value: np.ndarray) -> Callable[[dict[str, Any]], bytes]:
    return lambda t: body_of(replace(t, "label:logits", value))


@dataclass
class Bad:
    id: str
    routes: tuple[str, ...]  # forward / backward / train
    build: Callable[[dict[str, Any]], Any]  # valid tensors -> body bytes (or a dict of request kwargs)
    status: int
    code: str
    pattern: str  # what the message must say (what was expected)


# Names of the tensors: forward takes "h", backward "m" (the gradient of the output), train "h" and
# "label:logits". For train the first tensor is "h".
ALL = ("forward", "backward", "train")
BAD_INPUTS = [
    Bad("wrong_shape", ALL, lambda t: body_of(replace(t, first(t), np.zeros((2, 4), np.float32))),
        400, "bad_tensor", r"expected.*3|3.*expected"),
    Bad("wrong_dtype_i32", ALL, lambda t: body_of(replace(t, first(t), np.zeros((2, 3), np.int32))),
        400, "bad_tensor", r"(I32|int32).*(F32|float32)|expected F32"),
    Bad("wrong_rank", ALL, lambda t: body_of(replace(t, first(t), np.zeros((2, 3, 1), np.float32))),
        400, "bad_tensor", r"expected (rank 2|\['batch', 3\])"),
    Bad("batch_zero", ALL, batched(0), 400, "bad_tensor", r"batch size (is )?0.*(at least one|expected 1)"),
    Bad("batch_over_max", ALL, batched(MAX_BATCH + 1), 400, "bad_tensor",
        rf"batch size {MAX_BATCH + 1} is over the limit of {MAX_BATCH}"),
    Bad("truncated", ALL, lambda t: body_of(t)[:-5], 400, "bad_tensor", r"out of range|truncated|runs past"),
    Bad("truncated_header", ALL, lambda t: body_of(t)[:12], 400, "bad_tensor", r"runs past|truncated"),
    Bad("trailing_bytes", ALL, lambda t: body_of(t) + b"\0\0\0\0", 400, "bad_tensor", r"trailing bytes"),
    Bad("nan", ALL, with_nonfinite(float("nan")), 400, "bad_tensor", r"non-finite"),
    Bad("inf", ALL, with_nonfinite(float("inf")), 400, "bad_tensor", r"non-finite"),
    Bad("neg_inf", ALL, with_nonfinite(float("-inf")), 400, "bad_tensor", r"non-finite"),
    Bad("nan_label", ("train",), with_nonfinite(float("nan"), "label:logits"), 400, "bad_tensor",
        r"non-finite"),
    Bad("inf_label", ("train",), with_nonfinite(float("inf"), "label:logits"), 400, "bad_tensor",
        r"non-finite"),
    Bad("wrong_name", ("forward", "backward"),
        lambda t: body_of({"nope": t[first(t)]}), 400, "bad_tensor", r"expected \['(h|m)'\]"),
    Bad("wrong_name_train", ("train",), lambda t: body_of({**t, "nope": t["h"]}), 400, "bad_tensor",
        r"Unexpected tensor.*'nope'.*expected"),
    Bad("missing_tensor", ("forward", "backward"), lambda t: body_of({}), 400, "bad_tensor",
        r"expected \['(h|m)'\].*missing"),
    Bad("missing_input_train", ("train",), lambda t: body_of({"label:logits": t["label:logits"]}), 400,
        "bad_tensor", r"lacks the input tensor 'h'"),
    Bad("missing_label", ("train",), lambda t: body_of({"h": t["h"]}), 400, "bad_tensor",
        r"send them as tensors named \['label:logits'\]"),
    Bad("extra_tensor", ALL, lambda t: body_of({**t, "zzz": np.zeros((2, 3), np.float32)}), 400,
        "bad_tensor", r"(unexpected|Unexpected).*'zzz'"),
    Bad("label_out_of_range", ("train",), with_label(np.array([0, 5], np.int32)),
        400, "bad_tensor", r"class ids from 0 to 5; expected whole numbers from 0 to 1"),
    Bad("label_negative", ("train",), with_label(np.array([-1, 0], np.int64)),
        400, "bad_tensor", r"expected whole numbers from 0 to 1"),
    Bad("label_fractional", ("train",),
        with_label(np.array([0.5, 1.0], np.float32)),
        400, "bad_tensor", r"expected whole numbers"),
    Bad("label_wrong_shape", ("train",), with_label(np.zeros((2, 7), np.int32)),
        400, "bad_tensor", r"expected \['batch'\] or \['batch', 1\]"),
    Bad("label_rank3", ("train",), with_label(np.zeros((2, 2, 2), np.float32)),
        400, "bad_tensor", r"expected \['batch'\]"),
    Bad("label_other_batch", ("train",), with_label(np.zeros((3,), np.int32)),
        400, "bad_tensor", r"batch \[3\], the inputs have 2"),
    Bad("sample_weight_shape", ("train",), lambda t: body_of({**t, "sample_weight": np.ones((3,), np.float32)}),
        400, "bad_tensor", r"sample_weight.*expected numbers shaped \[2\]"),
    Bad("sample_weight_column", ("train",),
        lambda t: body_of({**t, "sample_weight": np.ones((2, 1), np.float32)}),
        400, "bad_tensor", r"sample_weight has shape \[2, 1\].*expected numbers shaped \[2\]"),
    Bad("gradient_batch_not_forward_batch", ("backward",), lambda t: body_of({"m": act(3)}), 400,
        "bad_tensor", r"batch size 3, but the forward pass of step 0 had 2"),
    Bad("content_type_text", ALL, lambda t: {"content": body_of(t), "headers": {"content-type": "text/plain"}},
        415, "unsupported_media_type", r"Expected Content-Type 'application/vnd\.splitkeras\.safetensors'"),
    Bad("content_type_json", ALL, lambda t: {"json": {"h": [[1.0, 2.0, 3.0]]}}, 415, "unsupported_media_type",
        r"Expected Content-Type"),
    Bad("too_large_content_length", ALL, lambda t: {"over_limit": 1}, 413, "body_too_large",
        r"over \d+ bytes.*Send smaller batches"),
    Bad("too_large_streamed", ALL, lambda t: {"stream_over_limit": 3}, 413, "body_too_large",
        r"over \d+ bytes.*Send smaller batches"),
]


def valid_tensors(route: str, batch: int = 2) -> dict[str, Any]:
    if route == "forward":
        return {"h": act(batch)}
    if route == "backward":
        return {"m": act(batch)}
    return {"h": act(batch), "label:logits": RNG.integers(0, 2, batch).astype(np.int32)}


def send(live: LiveApp, route: str, path: str, token: str | None, built: Any,
         step: int) -> tuple[Any, list[int] | None]:
    """Post a case's body; returns the response and, for a streamed body, how much streamed."""
    if isinstance(built, (bytes, bytearray)):
        built = {"content": bytes(built)}
    kwargs = dict(built)
    headers = {**tensor_headers(token), **step_header(step), **kwargs.pop("headers", {})}
    limit = live.service.body_limits[route]
    counter = None
    if "json" in kwargs:
        headers.pop("content-type")
    if "over_limit" in kwargs:  # one byte too many, announced by Content-Length
        kwargs["content"] = b"\0" * (limit + kwargs.pop("over_limit"))
    if "stream_over_limit" in kwargs:  # chunked, no Content-Length: refused once past the limit
        counter = [0]
        kwargs["content"] = stream(limit * kwargs.pop("stream_over_limit"), counter)
    return live.request("POST", path, headers=headers, **kwargs), counter


@pytest.mark.parametrize("route,case", [(r, c) for c in BAD_INPUTS for r in c.routes],
                         ids=[f"{r}-{c.id}" for c in BAD_INPUTS for r in c.routes])
def test_bad_input_is_a_4xx_that_changes_nothing(route: str, case: Bad, u_app: LiveApp,
                                                  l_app: LiveApp) -> None:
    live = l_app if route == "train" else u_app
    sid, token = live.open_session()
    if route == "backward":  # step 0 waits for its backward
        assert live.post(step_path(sid, "forward"), step=0, tensors=valid_tensors("forward"),
                         token=token).status_code == 200
    before = state(live)
    response, streamed = send(live, route, step_path(sid, route), token, case.build(valid_tensors(route)), step=0)
    assert response.status_code == case.status, response.text
    error = error_of(response)
    assert error["code"] == case.code
    assert re.search(case.pattern, error["message"]), error["message"]
    if case.status == 413:
        assert error["limit"] == live.service.body_limits[route]
    if streamed is not None:  # refused while streaming: the rest was never read
        assert "content-length" not in response.request.headers
        assert streamed[0] < 2 * live.service.body_limits[route]
    assert_same_state(before, state(live))
    if route == "backward":
        assert live.service.runner.has_pending((sid, 0))
    # The session still works afterwards.
    tensors = valid_tensors(route)
    assert live.post(step_path(sid, route), step=0, tensors=tensors, token=token).status_code == 200


def test_f16_body_is_accepted(u_app: LiveApp) -> None:
    sid, token = u_app.open_session(wire_dtype="float16")
    response = u_app.request("POST", step_path(sid, "forward"), headers={**tensor_headers(token), **step_header(0)},
                             content=wire.encode({"h": act()}, wire_dtype="float16"))
    assert response.status_code == 200
    tensors, metadata = wire.decode(response.content)
    assert response.content[8:].find(b'"F16"') > 0 and tensors["m"].shape == (2, 3)
    assert metadata["step"] == "0"


def test_a_float16_answer_out_of_range_refuses_the_step_and_changes_nothing(splits: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """The input gradients of a float16 session's backward past 65504 cannot be answered: the
    step is refused before its update is applied (not applied without an answer). A fresh
    server: its guards' relative bounds are still warming up."""
    with LiveApp(settings_for(copy_split(splits["u_shaped"], tmp_path / "s"))) as u_app:
        _float16_answer_out_of_range(u_app)


def _float16_answer_out_of_range(u_app: LiveApp) -> None:
    rng = np.random.default_rng(16)
    h = rng.standard_normal((4, 3)).astype(np.float32)
    g = (rng.standard_normal((4, 3)) * 1e6).astype(np.float32)  # within max_abs (1e10)
    sid, token = u_app.open_session(wire_dtype="float16")
    assert u_app.post(step_path(sid, "forward"), step=0, tensors={"h": h}, token=token).status_code == 200
    before = state(u_app)
    response = u_app.post(step_path(sid, "backward"), step=0, tensors={"m": g}, token=token)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "update_refused" and "float16" in error["message"], error
    after = state(u_app)
    assert after["applied_steps"] == before["applied_steps"]
    for a, b in zip(before["model"] + before["optimizer"], after["model"] + after["optimizer"]):
        assert np.array_equal(a, b)
    # the step's forward is spent (its tape was used): it comes again, and a float32 session
    # takes the same gradients
    sid32, token32 = u_app.open_session()
    assert u_app.post(step_path(sid32, "forward"), step=0, tensors={"h": h}, token=token32).status_code == 200
    response = u_app.post(step_path(sid32, "backward"), step=0, tensors={"m": g}, token=token32)
    assert response.status_code == 200, response.text
    assert float(np.max(np.abs(wire.decode(response.content)[0]["h"]))) > 65504


@dataclass
class Refusal:
    id: str
    app: str
    request: Callable[[LiveApp, str, str], Any]
    status: int
    code: str
    pattern: str
    expected_step: int | None = None


def _forward(step: int, token: Callable[[str], str | None] = lambda t: t,
             sid: Callable[[str], str] = lambda s: s, route: str = "forward",
             tensors: Callable[[], dict[str, Any]] = lambda: valid_tensors("forward")) -> Any:
    return lambda live, s, t: live.post(step_path(sid(s), route), step=step, tensors=tensors(), token=token(t))


def _step_header(values: list[str], route: str, token: Callable[[str], str | None] = lambda t: t) -> Any:
    """A valid body for `route` with the `Splitkeras-Step` header given as `values` (none,
    one, several)."""
    tensors = {"forward": lambda: {"h": act()}, "backward": lambda: {"m": act()},
               "train": lambda: valid_tensors("train")}[route]
    return lambda live, s, t: live.request(
        "POST", step_path(s, route), content=wire.encode(tensors()),
        headers=[*tensor_headers(token(t)).items(), *((protocol.STEP_HEADER, v) for v in values)])


REFUSALS = [
    Refusal("unknown_session", "u", _forward(0, sid=lambda s: "0123456789abcdef"), 404, "unknown_session",
            r"No session '0123456789abcdef'.*POST /v1/sessions"),
    Refusal("wrong_token", "u", _forward(0, token=lambda t: t[:-2] + "xx"), 401, "unauthorized",
            r"needs the session's token as 'Authorization: Bearer <token>'"),
    Refusal("no_token", "u", _forward(0, token=lambda t: None), 401, "unauthorized", r"Bearer <token>"),
    Refusal("server_key_as_token", "u", _forward(0, token=lambda t: KEY), 401, "unauthorized",
            r"Bearer <token>"),
    Refusal("state_wrong_token", "u", lambda live, s, t: live.get(f"/v1/sessions/{s}", token="nope"), 401,
            "unauthorized", r"Bearer <token>"),
    Refusal("delete_no_token", "u", lambda live, s, t: live.request("DELETE", f"/v1/sessions/{s}"), 401,
            "unauthorized", r"Bearer <token>"),
    Refusal("open_wrong_key", "u", lambda live, s, t: live.post("/v1/sessions", json={}, headers=bearer("bad")),
            401, "unauthorized", r"needs the server key as 'Authorization: Bearer <key>'"),
    Refusal("open_no_key", "u", lambda live, s, t: live.post("/v1/sessions", json={}), 401, "unauthorized",
            r"server key"),
    Refusal("open_session_token_as_key", "u", lambda live, s, t: live.post("/v1/sessions", json={}, token=t),
            401, "unauthorized", r"server key"),
    Refusal("open_malformed_json", "u", lambda live, s, t: live.post(
        "/v1/sessions", content=b'{"wire_dtype": ',
        headers={**bearer(KEY), "content-type": "application/json"}),
        422, "bad_request", r"JSON"),
    Refusal("open_bad_wire_dtype", "u", lambda live, s, t: live.post(
        "/v1/sessions", json={"wire_dtype": "float64"}, headers=bearer(KEY)), 422, "bad_request",
        r"wire_dtype.*'float32' or 'float16'"),
    Refusal("open_not_an_object", "u", lambda live, s, t: live.post(
        "/v1/sessions", json=[1, 2], headers=bearer(KEY)), 422, "bad_request", r"(valid dictionary|object)"),
    Refusal("open_client_too_long", "u", lambda live, s, t: live.post(
        "/v1/sessions", json={"client": "x" * 201}, headers=bearer(KEY)), 422, "bad_request", r"client.*200"),
    Refusal("backward_without_forward", "u", _forward(0, route="backward", tensors=lambda: {"m": act()}), 409,
            "step_out_of_order", r"Expected forward for step 0", expected_step=0),
    Refusal("forward_skips_pending", "u_pending", _forward(1), 409, "step_out_of_order",
            r"Step 0 is waiting for its backward; got forward for step 1", expected_step=0),
    Refusal("backward_other_step", "u_pending", _forward(1, route="backward", tensors=lambda: {"m": act()}),
            409, "step_out_of_order", r"Step 0 is waiting for its backward", expected_step=0),
    Refusal("forward_finished_step", "u_two_done", _forward(0), 409, "step_out_of_order",
            r"Expected forward for step 2 or later, got forward for step 0", expected_step=2),
    Refusal("backward_finished_step", "u_two_done", _forward(0, route="backward", tensors=lambda: {"m": act()}),
            409, "step_out_of_order", r"Expected forward for step 2", expected_step=2),
    Refusal("train_finished_step", "l_two_done",
            _forward(0, route="train", tensors=lambda: valid_tensors("train")), 409, "step_out_of_order",
            r"Expected train for step 2 or later, got train for step 0", expected_step=2),
    Refusal("negative_step", "u", _forward(-1), 400, "bad_request",
            r"Splitkeras-Step header is '-1', not a step number: send the step number as "
            r"`Splitkeras-Step: <k>` \(a whole number in 0\.\.2\*\*53\)"),
    *[Refusal(f"step_header_{name}", app, _step_header(values, route), 400, "bad_request", pattern)
      for name, app, route, values, pattern in [
          ("missing", "u", "forward", [], r"Splitkeras-Step header is missing: send the step number"),
          ("missing_backward", "u_pending", "backward", [], r"Splitkeras-Step header is missing"),
          ("missing_train", "l", "train", [], r"Splitkeras-Step header is missing"),
          ("empty", "u", "forward", [""], r"Splitkeras-Step header is '', not a step number"),
          ("not_a_number", "u", "forward", ["abc"], r"'abc', not a step number"),
          ("fraction", "u", "forward", ["1.5"], r"'1.5', not a step number"),
          ("plus_sign", "u", "forward", ["+1"], r"'\+1', not a step number"),
          ("underscore", "u", "forward", ["1_0"], r"'1_0', not a step number"),
          ("negative_backward", "u_pending", "backward", ["-1"], r"'-1', not a step number"),
          ("over_2_53", "u", "forward", [str(2**53 + 1)], r"'9007199254740993', not a step number"),
          ("huge", "l", "train", ["9" * 40], r"not a step number"),
          ("repeated", "u", "forward", ["0", "0"], r"came 2 times \('0', '0'\); send it once"),
      ]],
    Refusal("step_header_2_53_is_a_step", "u_pending", _forward(2**53, route="backward",
            tensors=lambda: {"m": act()}), 409, "step_out_of_order", r"Step 0 is waiting for its backward",
            expected_step=0),
    Refusal("token_before_step_header", "u", _step_header([], "forward", token=lambda t: t[:-2] + "xx"),
            401, "unauthorized", r"Bearer <token>"),
    Refusal("old_per_step_url", "u", lambda live, s, t: live.post(f"/v1/sessions/{s}/steps/0/forward",
            tensors={"h": act()}, token=t), 404, "not_found", r"Not Found"),
    Refusal("train_on_u_shaped", "u", _forward(0, route="train", tensors=lambda: valid_tensors("train")), 409,
            "wrong_mode", r"mode 'u_shaped': use forward/backward, not train"),
    Refusal("forward_on_labels_on_server", "l", _forward(0), 409, "wrong_mode",
            r"mode 'labels_on_server': use train, not forward"),
    Refusal("backward_on_labels_on_server", "l", _forward(0, route="backward", tensors=lambda: {"m": act()}),
            409, "wrong_mode", r"use train, not backward"),
    Refusal("predict_wrong_tensor", "u", lambda live, s, t: live.post(
        f"/v1/sessions/{s}/predict", tensors={"m": act()}, token=t), 400, "bad_tensor", r"expected \['h'\]"),
    Refusal("unknown_route", "u", lambda live, s, t: live.get("/v1/nothing"), 404, "not_found", r"Not Found"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_refusal_is_a_4xx_that_changes_nothing(case: Refusal, u_app: LiveApp, l_app: LiveApp) -> None:
    live = l_app if case.app.startswith("l") else u_app
    sid, token = live.open_session()
    if case.app in ("u_pending", "u_two_done"):
        steps = 1 if case.app == "u_pending" else 2
        for k in range(steps):
            assert live.post(step_path(sid, "forward"), step=k, tensors={"h": act()}, token=token).status_code == 200
            if case.app == "u_two_done":
                response = live.post(step_path(sid, "backward"), step=k, tensors={"m": act()}, token=token)
                assert response.status_code == 200
    if case.app == "l_two_done":
        for k in range(2):
            response = live.post(step_path(sid, "train"), step=k, tensors=valid_tensors("train"), token=token)
            assert response.status_code == 200
    before = state(live)
    response = case.request(live, sid, token)
    assert response.status_code == case.status, response.text
    error = error_of(response)
    assert error["code"] == case.code
    assert re.search(case.pattern, error["message"]), error["message"]
    if case.expected_step is not None:
        assert error["expected_step"] == case.expected_step
    if case.status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert_same_state(before, state(live))


def test_closed_session_is_unknown(u_app: LiveApp) -> None:
    sid, token = u_app.open_session()
    assert u_app.post(step_path(sid, "forward"), step=0, tensors={"h": act()}, token=token).status_code == 200
    assert u_app.service.runner.has_pending((sid, 0))
    assert u_app.request("DELETE", f"/v1/sessions/{sid}", headers=bearer(token)).status_code == 204
    assert not u_app.service.runner.has_pending((sid, 0))  # its tape was freed
    response = u_app.post(step_path(sid, "backward"), step=0, tensors={"m": act()}, token=token)
    assert response.status_code == 404 and error_of(response)["code"] == "unknown_session"


def test_session_state_and_predict_change_nothing(u_app: LiveApp) -> None:
    sid, token = u_app.open_session()
    data = u_app.get(f"/v1/sessions/{sid}", token=token).json()
    assert data == {"session_id": sid, "wire_dtype": "float32", "next_step": 0, "pending_step": None,
                    "pending_steps": [], "applied_steps": 0, "refused_steps": 0,
                    "codecs": {"forward": "float32", "backward": "float32"}}
    before = state(u_app)
    first_ = u_app.post(f"/v1/sessions/{sid}/predict", tensors={"h": act(3)}, token=token)
    assert first_.status_code == 200 and wire.decode(first_.content)[0]["m"].shape == (3, 3)
    assert_same_state(before, state(u_app))


def test_label_encodings_are_accepted_in_any_order(l_app: LiveApp) -> None:
    """Class ids as [batch] or [batch, 1], of any integer (or whole float, or bool) dtype, with or
    without sample weights, in any order: the step is traced for one canonical shape, so mixing
    them never fails (a rank change used to relax the trace to an unknown rank: a 500)."""
    sid, token = l_app.open_session()
    ids = np.array([1, 0, 1], np.int64)
    encodings = [ids.astype(np.int32), ids.reshape(3, 1).astype(np.int64), ids.astype(np.uint8),
                 ids.astype(np.float32), ids.astype(bool), ids.reshape(3, 1).astype(np.float64)]
    for k, labels in enumerate(encodings):
        extra = {"sample_weight": np.array([1, 2, 1], np.int32)} if k % 2 else {}
        tensors = {"h": act(3), "label:logits": labels, **extra}
        response = l_app.post(step_path(sid, "train"), step=k, tensors=tensors, token=token)
        assert response.status_code == 200, (k, response.text)
        assert np.isfinite(wire.decode(response.content)[0]["h"]).all()
    assert all(np.isfinite(v).all() for v in state(l_app)["model"])


# ------------------------------------------------------------------------------- 2. retries


def test_forward_and_backward_retries_return_same_bytes_and_run_once(u_app: LiveApp) -> None:
    service = u_app.service
    bn = service.segment.model.get_layer("bn")
    sid, token = u_app.open_session()
    x, g = act(4), act(4)
    mean0 = bn.moving_mean.numpy().copy()
    first_ = u_app.post(step_path(sid, "forward"), step=0, tensors={"h": x}, token=token)
    assert first_.status_code == 200
    after_forward = state(u_app)
    mean1 = bn.moving_mean.numpy().copy()
    assert not np.array_equal(mean0, mean1)  # the forward moved the statistics once...
    retry = u_app.post(step_path(sid, "forward"), step=0, tensors={"h": x}, token=token)
    assert retry.status_code == 200 and retry.content == first_.content
    assert np.array_equal(bn.moving_mean.numpy(), mean1)  # ...and the retry did not
    assert_same_state(after_forward, state(u_app))

    back = u_app.post(step_path(sid, "backward"), step=0, tensors={"m": g}, token=token)
    assert back.status_code == 200
    after_backward = state(u_app)
    assert after_backward["iterations"] == after_forward["iterations"] + 1
    assert after_backward["applied_steps"] == after_forward["applied_steps"] + 1
    for retry_route, body, expected in (("backward", {"m": g}, back), ("forward", {"h": x}, first_)):
        again = u_app.post(step_path(sid, retry_route), step=0, tensors=body, token=token)
        assert again.status_code == 200 and again.content == expected.content
    assert_same_state(after_backward, state(u_app))
    assert u_app.get(f"/v1/sessions/{sid}", token=token).json()["next_step"] == 1


def test_a_retry_with_a_bad_body_is_refused(u_app: LiveApp) -> None:
    """A retry's body is checked too: garbage is a 400, not the cached answer."""
    sid, token = u_app.open_session()
    x = act()
    first_ = u_app.post(step_path(sid, "forward"), step=0, tensors={"h": x}, token=token)
    before = state(u_app)
    bad = u_app.request("POST", step_path(sid, "forward"), content=wire.encode({"h": x})[:-4],
                        headers={**tensor_headers(token), **step_header(0)})
    assert bad.status_code == 400 and error_of(bad)["code"] == "bad_tensor"
    assert_same_state(before, state(u_app))
    assert u_app.post(step_path(sid, "forward"), step=0, tensors={"h": x}, token=token).content == first_.content


def test_a_job_for_a_session_closed_meanwhile_is_refused(u_app: LiveApp) -> None:
    """The route looks the session up before its job reaches the writer; a DELETE queued in
    between must not leave a forward tape that nothing will ever free."""
    from server_app.errors import status_of
    from splitkeras.errors import RequestRefused

    service = u_app.service
    sid, token = u_app.open_session()
    session = service.sessions[sid]
    u_app.on_writer(service.close_session, session)
    with pytest.raises(RequestRefused) as caught:
        u_app.on_writer(service.forward, session, 0, wire.encode({"h": act()}))
    assert caught.value.code == "unknown_session" and status_of(caught.value.code) == 404
    assert not service.runner.has_pending((sid, 0))


def test_concurrent_duplicates_run_once(u_app: LiveApp) -> None:
    sid, token = u_app.open_session()
    x, g = act(), act()
    headers = tensor_headers(token)

    async def twice(route: str, tensors: dict[str, Any]) -> list[Any]:
        body = wire.encode(tensors)
        return await asyncio.gather(*(u_app.client.post(step_path(sid, route), content=body,
                                                        headers={**headers, **step_header(0)})
                                      for _ in range(3)))

    before = state(u_app)
    forwards = u_app.call(twice("forward", {"h": x}))
    assert [r.status_code for r in forwards] == [200] * 3 and len({r.content for r in forwards}) == 1
    backwards = u_app.call(twice("backward", {"m": g}))
    assert [r.status_code for r in backwards] == [200] * 3 and len({r.content for r in backwards}) == 1
    after = state(u_app)
    assert after["iterations"] == before["iterations"] + 1
    assert after["applied_steps"] == before["applied_steps"] + 1


def test_train_retry_returns_same_bytes_and_applies_once(l_app: LiveApp) -> None:
    sid, token = l_app.open_session()
    tensors = valid_tensors("train", 4)
    before = state(l_app)
    first_ = l_app.post(step_path(sid, "train"), step=0, tensors=tensors, token=token)
    assert first_.status_code == 200
    after = state(l_app)
    assert after["iterations"] == before["iterations"] + 1
    _, metadata = wire.decode(first_.content)
    assert {"step", "loss", "accuracy"} <= set(metadata)
    retry = l_app.post(step_path(sid, "train"), step=0, tensors=tensors, token=token)
    assert retry.status_code == 200 and retry.content == first_.content
    assert_same_state(after, state(l_app))


# ----------------------------------------------------------------------- 3. many devices


@pytest.mark.parametrize("retried", [False, True], ids=["plain", "with_retries"])
def test_eight_devices_train_at_once(u_app: LiveApp, retried: bool) -> None:
    devices, steps = 8, 3
    sessions = [u_app.open_session() for _ in range(devices)]
    before = state(u_app)

    async def device(index: int, sid: str, token: str) -> None:
        rng = np.random.default_rng(index)
        headers = tensor_headers(token)
        for k in range(steps):
            x = rng.standard_normal((2, 3)).astype(np.float32)
            g = rng.standard_normal((2, 3)).astype(np.float32)
            for route, body in (("forward", {"h": x}), ("backward", {"m": g})):
                content = wire.encode(body)
                copies = 2 if retried and (index + k) % 2 else 1
                step_headers = {**headers, **step_header(k)}
                responses = await asyncio.gather(*(u_app.client.post(step_path(sid, route), content=content,
                                                                     headers=step_headers) for _ in range(copies)))
                if retried and index % 3 == 0:  # a late retry, after the answer was lost
                    responses.append(await u_app.client.post(step_path(sid, route), content=content,
                                                             headers={**headers, **step_header(k)}))
                assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
                assert len({r.content for r in responses}) == 1

    async def all_devices() -> None:
        await asyncio.gather(*(device(i, sid, token) for i, (sid, token) in enumerate(sessions)))

    u_app.call(all_devices())
    after = state(u_app)
    assert after["applied_steps"] - before["applied_steps"] == devices * steps
    assert after["iterations"] - before["iterations"] == devices * steps
    for sid, token in sessions:
        data = u_app.get(f"/v1/sessions/{sid}", token=token).json()
        assert (data["next_step"], data["pending_step"], data["applied_steps"]) == (steps, None, steps)
    assert not any(key[0] in dict(sessions) for key in u_app.service.runner._pending)


# --------------------------------------------------------------------------------- 4. TTL


def test_pending_step_expires(fresh_split: Callable[[str], Path]) -> None:
    folder = fresh_split("u_shaped")
    with LiveApp(settings_for(folder, step_ttl_seconds=0.3)) as live:
        sid, token = live.open_session()
        x = act()
        first_ = live.post(step_path(sid, "forward"), step=0, tensors={"h": x}, token=token)
        assert first_.status_code == 200 and live.service.runner.has_pending((sid, 0))
        deadline = time.monotonic() + 10
        while live.service.runner.has_pending((sid, 0)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not live.service.runner.has_pending((sid, 0))  # the tape is freed
        assert live.get(f"/v1/sessions/{sid}", token=token).json()["pending_step"] is None
        before = state(live)
        response = live.post(step_path(sid, "backward"), step=0, tensors={"m": act()}, token=token)
        assert response.status_code == 409
        error = error_of(response)
        assert error["code"] == "step_expired" and error["expected_step"] == 0
        assert re.search(r"longer than 0.3 s.*Send forward for step 0 again", error["message"])
        assert_same_state(before, state(live))
        live.service.steps.ttl_seconds = 60.0  # so that a slow machine cannot expire it again
        again = live.post(step_path(sid, "forward"), step=0, tensors={"h": x}, token=token)
        assert again.status_code == 200
        back = live.post(step_path(sid, "backward"), step=0, tensors={"m": act()}, token=token)
        assert back.status_code == 200, back.text
        assert live.service.applied_steps == 1


# ----------------------------------------------------------------------------- 5. restart


def variables(model: Any) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in model.variables]


def test_graceful_restart_resumes(fresh_split: Callable[[str], Path]) -> None:
    from converters.keras_io import load_model

    folder = fresh_split("u_shaped")
    x0, x1 = act(), act()
    live = LiveApp(settings_for(folder))
    try:
        sid, token = live.open_session()
        assert live.post(step_path(sid, "forward"), step=0, tensors={"h": x0}, token=token).status_code == 200
        assert live.post(step_path(sid, "backward"), step=0, tensors={"m": act()}, token=token).status_code == 200
        pending = live.post(step_path(sid, "forward"), step=1, tensors={"h": x1}, token=token)
        assert pending.status_code == 200
        before = state(live)
    finally:
        live.close()  # graceful: checkpoint + the segment's .keras
    saved = load_model(folder / "middle.keras", compile=False)
    assert all(np.array_equal(a, b) for a, b in zip(variables(saved), before["model"]))
    assert len(saved.variables) == len(before["model"])

    with LiveApp(settings_for(folder)) as again:
        after = state(again)
        for key in ("model", "optimizer"):
            assert all(np.array_equal(a, b) for a, b in zip(before[key], after[key]))
        assert after["iterations"] == before["iterations"] == 1
        ready = again.get("/readyz", token=KEY)
        assert ready.status_code == 200 and ready.json()["resumed_from"] == 1
        data = again.get(f"/v1/sessions/{sid}", token=token).json()  # the same token works
        # the pending forward was logged again after the shutdown checkpoint: its tape is back
        assert (data["next_step"], data["pending_step"], data["applied_steps"]) == (1, 1, 1)
        resent = again.post(step_path(sid, "forward"), step=1, tensors={"h": x1}, token=token)
        assert resent.status_code == 200 and resent.content == pending.content  # a retry: same bytes
        assert again.post(step_path(sid, "backward"), step=1, tensors={"m": act()}, token=token).status_code == 200
        assert again.service.applied_steps == 2


def test_crash_resumes_from_the_last_checkpoint(fresh_split: Callable[[str], Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fresh_split("u_shaped")
    live = LiveApp(settings_for(folder, checkpoint_every=1))
    try:
        sid, token = live.open_session()
        for k in range(2):
            assert live.post(step_path(sid, "forward"), step=k, tensors={"h": act()}, token=token).status_code == 200
            response = live.post(step_path(sid, "backward"), step=k, tensors={"m": act()}, token=token)
            assert response.status_code == 200
        state_file = folder / "ck" / checkpoint_module.STATE
        assert json.loads(state_file.read_text())["applied_steps"] == 2
        # The next checkpoint's arrays land but state.json does not (a crash between the renames):
        # the arrays carry their own state, so the pair stays consistent.
        real = checkpoint_module.atomic_write_bytes

        def arrays_only(path: Any, data: bytes) -> None:
            if Path(path).name == checkpoint_module.STATE:
                raise OSError("simulated crash")
            real(path, data)

        monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", arrays_only)
        assert live.post(step_path(sid, "forward"), step=2, tensors={"h": act()}, token=token).status_code == 200
        back = live.post(step_path(sid, "backward"), step=2, tensors={"m": act()}, token=token)
        assert back.status_code == 200  # the step was applied; a failed checkpoint does not hide that
        before = state(live)
    finally:
        live.close(graceful=False)  # a crash: no shutdown checkpoint
        monkeypatch.undo()
    assert json.loads(state_file.read_text())["applied_steps"] == 2  # the stale readable copy
    with LiveApp(settings_for(folder)) as again:
        after = state(again)
        for key in ("model", "optimizer"):
            assert all(np.array_equal(a, b) for a, b in zip(before[key], after[key]))
        assert after["applied_steps"] == 3 and after["iterations"] == 3
        assert again.get("/readyz", token=KEY).json()["resumed_from"] == 3
        assert again.get(f"/v1/sessions/{sid}", token=token).json()["next_step"] == 3


def test_atomic_write_crash_keeps_previous_checkpoint(u_app: LiveApp, monkeypatch: pytest.MonkeyPatch) -> None:
    service = u_app.service
    folder = service.checkpoint_dir
    u_app.on_writer(service.save_checkpoint)
    names = (checkpoint_module.ARRAYS, checkpoint_module.STATE)
    previous = {name: (folder / name).read_bytes() for name in names}
    sid, token = u_app.open_session()
    assert u_app.post(step_path(sid, "forward"), step=0, tensors={"h": act()}, token=token).status_code == 200
    assert u_app.post(step_path(sid, "backward"), step=0, tensors={"m": act()}, token=token).status_code == 200

    def crash(*_: Any) -> None:
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        u_app.on_writer(service.save_checkpoint)
    monkeypatch.undo()
    for name, data in previous.items():
        assert (folder / name).read_bytes() == data
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    u_app.on_writer(service.save_checkpoint)  # and the next one goes through
    assert (folder / checkpoint_module.ARRAYS).read_bytes() != previous[checkpoint_module.ARRAYS]


# ------------------------------------------------------------------------------ 6. parity


@pytest.mark.parametrize("fused", [False, True], ids=["protocol", "fused"])
def test_train_route_matches_split_trainer(fresh_split: Callable[[str], Path], fused: bool) -> None:
    """From the same weights and batches, the train route gives SplitTrainer's loss, metrics,
    head-input gradient (captured from the step protocol when not fused) and tail weights."""
    import splitkeras
    from splitkeras.training import SplitTrainer, restore_compile_value

    folder = fresh_split("labels_on_server")
    split = splitkeras.load_split(folder)
    config = split.training_config
    trainer = SplitTrainer(split, optimizer=restore_compile_value(config["optimizer"]),
                           loss=restore_compile_value(config["loss"]),
                           metrics=restore_compile_value(config.get("metrics")),
                           loss_weights=config.get("loss_weights"), fused=fused)
    head, tail = trainer.runners[0].model, trainer.runners[-1]
    captured: list[Any] = []
    original = tail.train_step

    def recording(*args: Any, **kwargs: Any) -> Any:
        grads, logs = original(*args, **kwargs)
        captured.append([np.array(g) for g in grads])
        return grads, logs

    tail.train_step = recording  # type: ignore[method-assign]
    rng = np.random.default_rng(5)
    with LiveApp(settings_for(folder)) as live:
        sid, token = live.open_session()
        for k in range(3):
            x = rng.standard_normal((4, 4)).astype(np.float32)
            y = rng.integers(0, 2, 4).astype(np.int32)
            h = np.array(head([x], training=True))  # what the device sends: the head's output
            trainer.label_model.reset_metrics()  # the server reports each step's own values
            logs = {key: float(value) for key, value in trainer.train_batch(x, y).items()}
            response = live.post(step_path(sid, "train"), step=k, tensors={"h": h, "label:logits": y}, token=token)
            assert response.status_code == 200, response.text
            tensors, metadata = wire.decode(response.content)
            assert abs(float(metadata["loss"]) - logs["loss"]) < 1e-6
            assert abs(float(metadata["accuracy"]) - logs["accuracy"]) < 1e-6
            if not fused:  # the gradient the trainer's label segment sent back to the head
                assert len(captured) == k + 1
                np.testing.assert_allclose(tensors["h"], captured[-1][0], atol=1e-6, rtol=0)
            assert tensors["h"].shape == h.shape and np.isfinite(tensors["h"]).all()
        for a, b in zip(variables(live.service.segment.model), variables(tail.model), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------- 7. OpenAPI, health, readiness


def test_openapi_documents_every_route(u_app: LiveApp) -> None:
    document = u_app.get("/openapi.json").json()
    paths = document["paths"]
    expected = {
        "/healthz": {"get"}, "/readyz": {"get"}, "/v1/sessions": {"post"},
        "/v1/sessions/{session_id}": {"get", "delete"},
        "/v1/sessions/{session_id}/forward": {"post"},
        "/v1/sessions/{session_id}/backward": {"post"},
        "/v1/sessions/{session_id}/train": {"post"},
        "/v1/sessions/{session_id}/predict": {"post"},
        "/v1/sessions/{session_id}/fleet": {"get"},  # fleet rounds (server_app/fleet_routes.py)
        "/v1/sessions/{session_id}/fleet/weights": {"get"},
        "/v1/sessions/{session_id}/fleet/rounds/{round_number}/weights": {"post"},
    }
    assert set(paths) == set(expected)
    for path, methods in expected.items():
        assert set(paths[path]) == methods, path
    for path in [p for p in expected if p.endswith(("forward", "backward", "train", "predict"))]:
        operation = paths[path]["post"]
        assert wire.MEDIA_TYPE in operation["requestBody"]["content"], path
        assert operation["requestBody"]["content"][wire.MEDIA_TYPE]["schema"]["format"] == "binary"
        assert wire.MEDIA_TYPE in operation["responses"]["200"]["content"], path
        headers = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "header"}
        if path.endswith("predict"):
            assert protocol.STEP_HEADER not in headers
        else:  # the step number: a required integer header, not a part of the URL
            assert headers[protocol.STEP_HEADER]["required"] is True, path
            assert headers[protocol.STEP_HEADER]["schema"] == {"type": "integer", "minimum": 0,
                                                               "maximum": 2**53}, path
        assert {"400", "401", "404", "409", "413", "415"} <= set(operation["responses"]), path
    assert "application/json" in paths["/v1/sessions"]["post"]["requestBody"]["content"]


def test_healthz_and_readyz(u_app: LiveApp) -> None:
    assert u_app.get("/healthz").json() == {"status": "ok"}
    ready = u_app.get("/readyz")  # without the key: ready or not, nothing more
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert u_app.get("/readyz", token="wrong").json() == {"status": "ready"}
    detailed = u_app.get("/readyz", token=KEY).json()
    assert detailed["status"] == "ready" and detailed["mode"] == "u_shaped" and detailed["segment"] == "middle"
    assert {"applied_steps", "sessions", "resumed_from", "refused_steps", "guard"} <= set(detailed)


def test_readyz_503_when_checkpoint_dir_not_writable(fresh_split: Callable[[str], Path]) -> None:
    from converters.keras_io import load_model

    folder = fresh_split("u_shaped")
    (folder / "a_file").write_text("not a folder")
    live = LiveApp(settings_for(folder, checkpoint_dir=folder / "a_file" / "ck"))
    try:
        ready = live.get("/readyz", token=KEY)
        assert ready.status_code == 503 and ready.json()["status"] == "checkpoint_dir_not_writable"
        anonymous = live.get("/readyz")
        assert anonymous.status_code == 503 and anonymous.json() == {"status": "not_ready"}
        assert live.get("/healthz").status_code == 200
        # nothing that cannot be made durable is acknowledged: the session is refused, loudly
        refused = live.request("POST", "/v1/sessions", json={}, headers=bearer(KEY))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_durable"
        assert refused.headers["retry-after"] == "2"
        assert len(live.service.sessions) == 0
        trained = variables(live.service.segment.model)
    finally:
        live.close()  # the checkpoint cannot be written; the .keras still is
    assert all(np.array_equal(a, b) for a, b in zip(variables(load_model(folder / "middle.keras")), trained))


# --------------------------------------------------------------------------------- 8. fuzz

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=20))
JSON = st.recursive(SCALARS,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=12)
SESSION_KEYS = st.fixed_dictionaries({}, optional={
    "wire_dtype": st.sampled_from(["float32", "float16", "f64", 1]),
    "client": st.text(max_size=30) | st.integers()})


@st.composite
def mutated(draw: Any, valid: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "flip", "truncate", "insert", "header", "same"]))
    data = bytearray(valid)
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return bytes(data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:])
    if kind == "header":  # a valid length prefix with a header of random JSON
        header = json.dumps(draw(JSON)).encode()
        return len(header).to_bytes(8, "little") + header + draw(st.binary(max_size=40))
    return valid


@FUZZ
@given(body=JSON | SESSION_KEYS)
def test_fuzz_open_session(u_app: LiveApp, body: Any) -> None:
    response = u_app.post("/v1/sessions", json=body, headers=bearer(KEY))
    assert response.status_code < 500, response.text
    if response.status_code == 201:
        data = response.json()
        assert u_app.request("DELETE", f"/v1/sessions/{data['session_id']}",
                             headers=bearer(data["token"])).status_code == 204
    else:
        assert response.status_code == 422 and error_of(response)["code"] == "bad_request"


def _fuzz_step(live: LiveApp, route: str, data: Any, valid: dict[str, Any],
               prepare: Callable[[str, str], int]) -> None:
    if not hasattr(live, "fuzz_session"):
        live.fuzz_session = live.open_session()  # type: ignore[attr-defined]
    sid, token = live.fuzz_session  # type: ignore[attr-defined]
    step = prepare(sid, token)
    body = data.draw(mutated(wire.encode(valid)), label="body")
    near = st.sampled_from([step, step, step + 1, max(step - 1, 0)])
    step = data.draw(st.one_of(near, near, near, st.integers(-2, 2**62)), label="step")
    ids = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=70)
    target = data.draw(st.one_of(st.just(sid), st.just(sid), st.just(sid), ids), label="session")
    before = state(live)
    response = live.request("POST", step_path(target, route), content=body,
                            headers={**tensor_headers(token), **step_header(step)})
    assert response.status_code < 500, response.text
    event(f"{response.status_code} {response.json()['error']['code'] if response.status_code >= 400 else ''}")
    after = state(live)
    if response.status_code >= 400:
        error_of(response)
        assert_same_state(before, after)
    assert all(np.isfinite(v).all() for v in after["model"] + after["optimizer"])  # nothing poisoned


@FUZZ
@given(data=st.data())
def test_fuzz_forward(u_app: LiveApp, data: Any) -> None:
    def prepare(sid: str, token: str) -> int:
        session = u_app.service.sessions[sid]
        if session.pending_step is not None:  # finish it so that forward has a fresh step to take
            u_app.post(step_path(sid, "backward"), step=session.pending_step, tensors={"m": act()}, token=token)
        return session.next_step

    _fuzz_step(u_app, "forward", data, {"h": act()}, prepare)


@FUZZ
@given(data=st.data())
def test_fuzz_backward(u_app: LiveApp, data: Any) -> None:
    def prepare(sid: str, token: str) -> int:
        session = u_app.service.sessions[sid]
        if session.pending_step is None:
            assert u_app.post(step_path(sid, "forward"), step=session.next_step, tensors={"h": act()},
                              token=token).status_code == 200
        return session.pending_step

    _fuzz_step(u_app, "backward", data, {"m": act()}, prepare)


@FUZZ
@given(data=st.data())
def test_fuzz_train(l_app: LiveApp, data: Any) -> None:
    _fuzz_step(l_app, "train", data, valid_tensors("train"),
               lambda sid, token: l_app.service.sessions[sid].next_step)
