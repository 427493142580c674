"""Refusal codes and where HTTP lives: every code the server's parts can raise has a status
in the one table of `server_app.errors` (a new code without one fails here), refusals render
as the protocol's JSON, and only the HTTP modules import FastAPI / the step machine no
TensorFlow.
"""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from server_app.errors import STATUS, install_error_handlers, status_of
from splitkeras.errors import REFUSAL_CODES, ProtocolError, RequestRefused, SplitKerasError, WireFormatError

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "server_app"
HTTP_MODULES = {"routes", "health", "errors", "main", "fleet_routes", "device_page"}


def raised_codes() -> dict[str, set[str]]:
    """Every literal code passed to `RequestRefused(...)` in the server and the core, by file."""
    found: dict[str, set[str]] = {}
    for path in [*SERVER.glob("*.py"), *(ROOT / "splitkeras").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RequestRefused":
                first = node.args[0] if node.args else None
                assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                    f"{path.name}:{node.lineno}: pass the refusal code as a string literal"
                found.setdefault(path.name, set()).add(first.value)
    return found


def test_every_raised_code_is_registered_and_has_a_status() -> None:
    found = raised_codes()
    raised = set().union(*found.values())
    assert {"step_out_of_order", "unknown_session", "unauthorized", "bad_tensor"} <= raised  # the scan works
    assert raised <= set(REFUSAL_CODES), raised - set(REFUSAL_CODES)
    for code in raised:  # a refusal is the client's to fix (4xx), or the server cannot store or apply (503)
        assert 400 <= status_of(code) < 500 or (code, status_of(code)) in {("not_durable", 503),
                                                                            ("worker_lost", 503)}, code


def test_the_status_table_and_the_registry_agree() -> None:
    assert set(STATUS) == set(REFUSAL_CODES)


def test_every_code_is_documented_in_the_protocol() -> None:
    errors = (ROOT / "docs" / "protocol.md").read_text().split("## Errors", 1)[1]
    for code, status in STATUS.items():
        assert re.search(rf"^\| {status} \|.*`{code}`", errors, re.M), f"{code} ({status}) not in docs/protocol.md"


def test_an_unknown_code_cannot_be_raised() -> None:
    with pytest.raises(ValueError, match="Unknown refusal code 'no_such_code'"):
        RequestRefused("no_such_code", "message")


def test_a_refusal_is_a_protocol_error_with_its_details() -> None:
    error = RequestRefused("step_expired", "Send forward again.", expected_step=4)
    assert isinstance(error, ProtocolError) and isinstance(error, SplitKerasError)
    assert (error.code, error.message, error.details, error.expected_step) == \
        ("step_expired", "Send forward again.", {"expected_step": 4}, 4)
    assert str(error) == "Send forward again." and error.status_code == 0  # no HTTP in the core


class Client:
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, path: str) -> httpx.Response:
        async def send() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                         base_url="http://testserver") as client:
                return await client.request(method, path)

        return asyncio.run(send())

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def post(self, path: str) -> httpx.Response:
        return self.request("POST", path)


def _client() -> Client:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/refused/{code}")
    async def refused(code: str) -> None:
        details = {"expected_step": 3} if code.startswith("step") else {}
        raise RequestRefused(code, f"why {code}", **details)

    @app.get("/wire")
    async def wire_error() -> None:
        raise WireFormatError("tensor 'h' is bad")

    @app.get("/split")
    async def split_error() -> None:
        raise SplitKerasError("something else")

    return Client(app)


@pytest.mark.parametrize("code", sorted(REFUSAL_CODES))
def test_every_code_renders_with_its_status(code: str) -> None:
    response = _client().get(f"/refused/{code}")
    assert response.status_code == STATUS[code]
    extra = ',"expected_step":3' if code.startswith("step") else ""
    assert response.content == f'{{"error":{{"code":"{code}","message":"why {code}"{extra}}}}}'.encode()
    assert (response.headers.get("www-authenticate") == "Bearer") == (STATUS[code] == 401)


def test_wire_split_and_framework_errors_render_as_before() -> None:
    client = _client()
    wire = client.get("/wire")
    assert (wire.status_code, wire.json()) == (400, {"error": {"code": "bad_tensor", "message": "tensor 'h' is bad"}})
    split = client.get("/split")
    assert (split.status_code, split.json()) == (400, {"error": {"code": "bad_request", "message": "something else"}})
    missing = client.get("/nothing")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    method = client.post("/wire")
    assert (method.status_code, method.json()["error"]["code"]) == (405, "method_not_allowed")


# ------------------------------------------------------------------------------ boundaries


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_only_the_http_modules_import_fastapi_or_starlette() -> None:
    for path in SERVER.glob("*.py"):
        web = {n for n in imported_modules(path) if n.split(".")[0] in ("fastapi", "starlette")}
        if path.stem not in HTTP_MODULES:
            assert not web, f"{path.name} imports {web}"


def test_the_step_machine_and_its_parts_load_no_tensorflow() -> None:
    for name in ("step_machine", "sessions", "keys", "bodies", "aggregation"):
        heavy = {n for n in imported_modules(SERVER / f"{name}.py")
                 if n.split(".")[0] in ("tensorflow", "keras") or n == "splitkeras.engine"}
        assert not heavy, f"{name}.py imports {heavy}"
    code = ("import sys, server_app.step_machine, server_app.sessions, server_app.keys, server_app.bodies, "
            "server_app.aggregation; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
