"""A page of one origin trains a REAL `splitkeras serve --cors-origin <page origin>` on another
port in real headless Chromium (`mobile_export/tools/cors_steps.mjs`, the browser's own
fetch), and the server's access log shows that the browser sent a CORS preflight per route,
not per request: a step's URL is the same at every step (its number is the
`Splitkeras-Step` header), so the preflight answer (max-age 7200 s) is reused.

Without Chromium the test is skipped with the reason (scripts/setup installs it)."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from js_support import MOBILE, require_node
from live_server import KEY, Server
from server_fixtures import make_split

from splitkeras.client import free_port

STEPS = 8
_ACCESS = re.compile(r'"(OPTIONS|GET|POST|DELETE) (\S+) HTTP/1\.1" (\d{3})')


def chromium_missing() -> str | None:
    completed = subprocess.run([require_node(), "--input-type=module", "-e",
                                "import { chromiumMissing } from './tools/chromium.mjs';"
                                "console.log(JSON.stringify(chromiumMissing()));"],
                               cwd=MOBILE, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(completed.stdout)  # type: ignore[no-any-return]


def access_log(log: Path) -> list[tuple[str, str, int]]:
    """(method, path, status) of each request in the server's log (uvicorn's access log)."""
    return [(m, p, int(s)) for m, p, s in _ACCESS.findall(log.read_text(errors="replace"))]


def train_from_another_origin(folder: Path, steps: int, batch: int = 2) -> dict[str, Any]:
    """Serve `folder` for a page origin, train `steps` steps from the page; returns the page's
    result, the server's access log and its applied steps."""
    page_port = free_port()
    origin = f"http://127.0.0.1:{page_port}"
    server = Server(folder, checkpoint_every=1000, args=["--cors-origin", origin, "--log-level", "info"])
    server.start()
    try:
        server.wait_ready()
        job = {"pagePort": page_port, "serverUrl": server.url, "key": KEY, "steps": steps, "batch": batch}
        completed = subprocess.run([require_node(), "tools/cors_steps.mjs", json.dumps(job)], cwd=MOBILE,
                                   capture_output=True, text=True, timeout=300)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
        assert lines, f"cors_steps.mjs printed nothing (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
        result = json.loads(lines[-1])
        ready = httpx.get(f"{server.url}/readyz", headers={"Authorization": f"Bearer {KEY}"}).json()
    finally:
        server.stop()
    return {"page": result, "log": access_log(server.log), "applied_steps": ready["applied_steps"],
            "origin": origin}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = chromium_missing()
    if missing:
        pytest.skip(missing)
    folder = make_split(tmp_path_factory.mktemp("cors") / "split", "u_shaped")
    return train_from_another_origin(folder, STEPS)


def test_a_cross_origin_page_pays_one_preflight_per_route_not_per_step(run: dict[str, Any]) -> None:
    page = run["page"]
    assert "error" not in page, page
    assert run["applied_steps"] == STEPS  # every step trained the server once
    posts = [(m, p) for m, p, s in run["log"] if m != "OPTIONS" and p.startswith("/v1/") and s < 300]
    assert len(posts) == 2 + 2 * STEPS, posts  # open, N forwards, N backwards, close
    preflights = Counter(p for m, p, s in run["log"] if m == "OPTIONS")
    assert all(s == 200 for m, p, s in run["log"] if m == "OPTIONS"), run["log"]
    # bounded by the routes (open, forward, backward, close), not by the number of steps
    assert 1 <= sum(preflights.values()) <= 4 < STEPS, preflights
    routes = {p for _, p in posts}  # /v1/sessions, .../forward, .../backward, /v1/sessions/{id}
    assert len(routes) == 4, routes
    assert set(preflights) <= routes and max(preflights.values()) == 1, preflights
    print(f"\n{STEPS} steps from {run['origin']}: {sum(preflights.values())} preflights for "
          f"{len(posts)} requests; ms in fetch per step {[round(ms, 1) for ms in page['stepMs']]}")
