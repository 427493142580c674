"""Codecs through the in-process app (ASGI): negotiation at POST /v1/sessions, `--codecs`
restricting what a server accepts, compressed steps trained and answered in each
direction's codec, and every malformed compressed body of make_codec_fixtures (one per
defect) answered 400 `bad_tensor` with nothing changed."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_fixtures import (
    KEY,
    LiveApp,
    assert_same_state,
    bearer,
    copy_split,
    make_split,
    settings_for,
    snapshot,
    tensor_headers,
)

from splitkeras import protocol, wire
from splitkeras.errors import WireFormatError
from splitkeras.tensor_spec import TensorSpec

FIXTURES = Path(__file__).resolve().parents[1] / "mobile_export" / "test" / "fixtures"


def _fixture_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_codec_fixtures", FIXTURES / "make_codec_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixtures = _fixture_script()
MALFORMED = list(fixtures.malformed_cases("h"))  # the wide split's server input: h [None, 4]
H = TensorSpec("h", (None, 4), "float32")


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_split(tmp_path_factory.mktemp("codec_split") / "s", "u_shaped", width=4)


@pytest.fixture(scope="module")
def app(split: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    live = LiveApp(settings_for(copy_split(split, tmp_path_factory.mktemp("codec_app") / "s")))
    yield live
    live.close()


def open_session(live: LiveApp, **body: Any) -> Any:
    return live.request("POST", "/v1/sessions", json=body, headers=bearer(KEY))


def post(live: LiveApp, sid: str, token: str, route: str, step: int, body: bytes) -> Any:
    headers = {**tensor_headers(token), protocol.STEP_HEADER: str(step)}
    return live.request("POST", protocol.step_path(sid, route), content=body, headers=headers)


def test_the_session_says_each_directions_codec(app: LiveApp) -> None:
    response = open_session(app, compress="forward=int8,backward=topk:0.05+int8")
    assert response.status_code == 201
    assert response.json()["codecs"] == {"forward": "int8", "backward": "topk:0.05+int8"}
    legacy = open_session(app, wire_dtype="float16").json()
    assert legacy["codecs"] == {"forward": "float16", "backward": "float16"}
    state = app.get(f"/v1/sessions/{legacy['session_id']}", token=legacy["token"]).json()
    assert state["codecs"] == {"forward": "float16", "backward": "float16"}
    both = open_session(app, compress={"forward": "bfloat16"}).json()
    assert both["codecs"] == {"forward": "bfloat16", "backward": "float32"}


@pytest.mark.parametrize("compress", ["float8", "topk:0.050", "sideways=int8", "forward=int8,forward=int8"])
def test_a_bad_spec_is_a_clear_400(app: LiveApp, compress: str) -> None:
    before = len(app.service.sessions)
    response = open_session(app, compress=compress)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    assert any(word in response.json()["error"]["message"].lower() for word in ("codec", "compress"))
    assert len(app.service.sessions) == before


def test_a_server_accepts_only_its_codecs(split: Path, tmp_path: Path) -> None:
    with LiveApp(settings_for(copy_split(split, tmp_path / "s"), codecs="float32,int8")) as live:
        assert open_session(live, compress="int8").status_code == 201
        refused = open_session(live, compress="forward=int8,backward=topk:0.05+int8")
        assert refused.status_code == 400
        assert "does not accept the codec 'topk:0.05+int8' (backward); it accepts float32, int8" in \
            refused.json()["error"]["message"]
        assert open_session(live, wire_dtype="float16").status_code == 400
        assert live.service.body_limits["forward"] < wire.max_body_bytes([H], 8, "float16") + 8 * 4 * 8


def test_a_compressed_step_trains_and_answers_in_its_directions_codec(app: LiveApp) -> None:
    data = open_session(app, compress="forward=int8,backward=topk:0.5+int8").json()
    sid, token = data["session_id"], data["token"]
    h = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    answer = post(app, sid, token, "forward", 0, wire.encode({"h": h}, codec="int8"))
    assert answer.status_code == 200
    outputs, meta = wire.decode(answer.content, codec="int8")
    assert meta["step"] == "0" and outputs["m"].shape == (4, 4)
    before = snapshot(app.service)
    grads = post(app, sid, token, "backward", 0,
                 wire.encode({"m": np.ones((4, 4), np.float32)}, codec="topk:0.5+int8"))
    assert grads.status_code == 200, grads.text
    input_grads, _ = wire.decode(grads.content, codec="topk:0.5+int8")
    assert np.count_nonzero(input_grads["h"]) == 8  # half of 16 kept
    assert snapshot(app.service)["applied_steps"] == before["applied_steps"] + 1
    with pytest.raises(WireFormatError, match="this direction's codec is 'int8'"):
        wire.decode(grads.content, codec="int8")


@pytest.mark.parametrize(("name", "codec", "body"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_each_malformed_compressed_body_is_a_400_and_changes_nothing(
        app: LiveApp, name: str, codec: str, body: bytes) -> None:
    data = open_session(app, compress=codec).json()
    sid, token = data["session_id"], data["token"]
    with pytest.raises(WireFormatError) as expected:
        wire.decode(body, [H], max_batch=8, codec=codec)
    before = snapshot(app.service)
    response = post(app, sid, token, "forward", 0, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_tensor" and error["message"] == str(expected.value)
    assert_same_state(before, snapshot(app.service))
