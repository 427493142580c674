"""The device page (`splitkeras serve --device-page`, server_app/device_page.py): the routes
in process (flag off, the key, traversal, content types, a split without page data), the CLI's
one line without a built page, and a real headless Chromium training the demo's digits split
against a real `splitkeras serve` (skipped, with the reason, only without Chromium)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import splitkeras
from server_app.device_page import CONTENT_TYPES, PageNotBuilt, bundle_files, check_page_dir, missing_bundles, page_data
from splitkeras import wire
from splitkeras.manifest import Manifest
from tests.js_support import MOBILE, require_node
from tests.live_server import KEY as LIVE_KEY
from tests.live_server import Server
from tests.server_fixtures import KEY, LiveApp, settings_for, u_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def u_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-shaped split with TF.js bundles (not the demo's: no page data)."""
    folder = tmp_path_factory.mktemp("page") / "u"
    splitkeras.split(u_model(), at=["h", "m"]).save(folder, tfjs=True)
    return folder


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The split `splitkeras demo` writes (its model, cuts, source), with TF.js bundles."""
    from splitkeras.demo import CUTS, DEMO_MODEL_FILE, digits_model

    folder = tmp_path_factory.mktemp("page") / "digits"
    splitkeras.split(digits_model(), at=CUTS, source={"file": DEMO_MODEL_FILE, "sha256": None}).save(
        folder, tfjs=True)
    return folder


@pytest.fixture(scope="module")
def fake_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the built page: the files the routes serve, with known bytes."""
    folder = tmp_path_factory.mktemp("built-page")
    (folder / "index.html").write_text("<!doctype html><title>page</title>")
    (folder / "device_page.js").write_text("window.devicePage = {};")
    (folder / "tfjs-backend-wasm.wasm").write_bytes(b"\0asm\1\0\0\0")
    (folder / "notes.txt").write_text("not a page file type")
    return folder


@pytest.fixture(scope="module")
def live(u_split: Path, fake_page: Path) -> Any:
    with LiveApp(settings_for(u_split, device_page=True, device_page_dir=fake_page)) as app:
        yield app


def test_flag_off_no_page_routes(u_split: Path, fake_page: Path) -> None:
    with LiveApp(settings_for(u_split, device_page_dir=fake_page)) as app:
        for path in ["/device/", "/device/device_page.js", "/device/split/split.json", "/device/data"]:
            response = app.get(path, token=KEY)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"


def test_page_files_public_with_content_types(live: LiveApp, fake_page: Path) -> None:
    for name, media in [("", "text/html; charset=utf-8"), ("device_page.js", "text/javascript; charset=utf-8"),
                        ("tfjs-backend-wasm.wasm", "application/wasm")]:
        response = live.get(f"/device/{name}")  # no key: the page holds no secret
        assert response.status_code == 200, name
        assert response.headers["content-type"] == media
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == (fake_page / (name or "index.html")).read_bytes()
    assert "script-src 'self' 'wasm-unsafe-eval'" in live.get("/device/").headers["content-security-policy"]
    redirect = live.get("/device")
    assert redirect.status_code == 308 and redirect.headers["location"] == "/device/"
    assert live.get("/device/notes.txt").status_code == 404  # a file of no page type is not served


def test_bundles_need_the_key(live: LiveApp, u_split: Path) -> None:
    for token in [None, "wrong"]:
        for path in ["/device/split/split.json", "/device/split/head_tfjs/model.json", "/device/data"]:
            response = live.get(path, token=token)
            assert response.status_code == 401, (path, token)
            assert response.json()["error"]["code"] == "unauthorized"
            assert "#key=" in response.json()["error"]["message"]
    response = live.get("/device/split/split.json", token=KEY)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == json.loads((u_split / "split.json").read_text())


def test_bundle_files_are_the_ones_the_manifest_names(live: LiveApp, u_split: Path) -> None:
    files = bundle_files(u_split, Manifest.read(u_split))
    assert sorted(files) == ["head_tfjs/group1-shard1of1.bin", "head_tfjs/model.json", "split.json",
                             "tail_tfjs/group1-shard1of1.bin", "tail_tfjs/model.json"]
    for name, path in files.items():
        response = live.get(f"/device/split/{name}", token=KEY)
        assert response.status_code == 200, name
        assert response.headers["content-type"] == CONTENT_TYPES[path.suffix]
        assert response.content == path.read_bytes()


@pytest.mark.parametrize("raw", [
    "/device/split/middle.keras",                       # in the folder, not a device bundle
    "/device/split/..%2Fsplit.json",
    "/device/split/head_tfjs%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/device/split/%2Fetc%2Fpasswd",
    "/device/split/head_tfjs/../middle.keras",
    "/device/split/.splitkeras/server.key",
    "/device/..%2Fsplit.json",
    "/device/%2E%2E%2Fsplit.json",
])
def test_traversal_refused(live: LiveApp, u_split: Path, raw: str) -> None:
    (u_split / ".splitkeras").mkdir(exist_ok=True)
    (u_split / ".splitkeras" / "server.key").write_text("secret")
    response = live.call(live.client.send(httpx.Request("GET", httpx.URL(f"http://test{raw}"),
                                                        headers={"Authorization": f"Bearer {KEY}"})))
    assert response.status_code == 404, raw
    assert b"secret" not in response.content and b"keras_file" not in response.content


def test_weights_outside_the_bundle_folder_are_not_named(tmp_path: Path, u_split: Path) -> None:
    folder = tmp_path / "tampered"
    shutil.copytree(u_split, folder)
    model_json = folder / "head_tfjs" / "model.json"
    bundle = json.loads(model_json.read_text())
    bundle["weightsManifest"][0]["paths"].append("../middle.keras")
    model_json.write_text(json.dumps(bundle))
    assert "middle.keras" not in bundle_files(folder, Manifest.read(folder))


def test_split_without_page_data(live: LiveApp, u_split: Path) -> None:
    assert page_data(Manifest.read(u_split)) is None
    response = live.get("/device/data", token=KEY)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "no_page_data"
    assert "x_train" in error["message"] and "splitkeras demo" in error["message"]


def test_digits_data_is_the_demos(digits_split: Path) -> None:
    from splitkeras.demo import digits_data

    body = page_data(Manifest.read(digits_split))
    assert body is not None
    tensors, _ = wire.decode(body)
    (x_train, y_train), (x_test, y_test) = digits_data()
    np.testing.assert_array_equal(tensors["x_train"], x_train)
    np.testing.assert_array_equal(tensors["y_train"], y_train)
    np.testing.assert_array_equal(tensors["x_test"], x_test)
    np.testing.assert_array_equal(tensors["y_test"], y_test)
    assert tensors["y_train"].dtype == np.int32 and tensors["x_train"].shape == (1437, 8, 8, 1)


def test_page_not_built(tmp_path: Path) -> None:
    with pytest.raises(PageNotBuilt, match=r"npm --prefix mobile_export run build:page"):
        check_page_dir(tmp_path)


def test_cli_without_built_page_is_one_line(u_split: Path, tmp_path: Path, monkeypatch: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from splitkeras.cli import main

    monkeypatch.setenv("SPLITKERAS_SERVER_KEY", "k")
    monkeypatch.setenv("SPLITKERAS_DEVICE_PAGE_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "0"))
    assert main(["serve", str(u_split), "--port", "0", "--device-page"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == [f"error: serve: --device-page: the device page is not built ({tmp_path / 'none' / 'index.html'} "
                     "is missing); build it with `npm --prefix mobile_export run build:page` (scripts/setup does), "
                     "or set SPLITKERAS_DEVICE_PAGE_DIR to a folder holding a built page"], captured.err
    assert captured.out == ""
    assert not (u_split / ".splitkeras" / "serve-middle.lock").exists()  # refused before the lock


def test_cli_split_without_bundles_is_one_line(tmp_path: Path, fake_page: Path, monkeypatch: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from splitkeras.cli import main

    folder = tmp_path / "no-tfjs"
    splitkeras.split(u_model(), at=["h", "m"]).save(folder)  # Keras segments only
    assert missing_bundles(folder, Manifest.read(folder)) == ["head", "tail"]
    monkeypatch.setenv("SPLITKERAS_SERVER_KEY", "k")
    monkeypatch.setenv("SPLITKERAS_DEVICE_PAGE_DIR", str(fake_page))
    monkeypatch.setenv("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "0"))
    assert main(["serve", str(folder), "--port", "0", "--device-page"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"error: serve: --device-page: device segment 'head' has no TF.js bundle in {folder} for "
                     "the page to train; split again without --no-tfjs (`splitkeras split` writes the bundles "
                     "by default)"]


def test_help_names_the_flag() -> None:
    completed = subprocess.run([sys.executable, "-m", "splitkeras.cli", "serve", "--help"], capture_output=True,
                               text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "--device-page" in completed.stdout


def _drive(node: str, url: str, data_file: Path | None = None) -> dict[str, Any]:
    """tools/run_device_page.mjs on `url`: what the page reports (skips without Chromium)."""
    completed = subprocess.run([node, "tools/run_device_page.mjs", url, "240000"]
                               + ([str(data_file)] if data_file else []), cwd=MOBILE, capture_output=True,
                               text=True, timeout=300)
    if completed.returncode == 2:
        pytest.skip(f"no browser: {completed.stderr.strip()}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def _run_page(folder: Path, built: Path, query: str, monkeypatch: Any, data_file: Path | None = None,
              first: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Serve `folder` with `--device-page` (the page built in `built`), open the page in headless
    Chromium with `query`; the page's report, the server's /readyz (with the key) after, and
    the reports of the pages opened before it at `/device/` + each of `first`."""
    node = require_node()
    monkeypatch.setenv("SPLITKERAS_DEVICE_PAGE_DIR", str(built))
    server = Server(folder, checkpoint_every=1000, args=["--device-page"]).start()
    try:
        assert server.wait_ready()["applied_steps"] == 0
        assert f"device page: {server.url}/device/#key={LIVE_KEY}" in server.log.read_text()
        before = [_drive(node, f"{server.url}/device/{address}") for address in first]
        page = _drive(node, f"{server.url}/device/?{query}#key={LIVE_KEY}", data_file)
        after = httpx.get(f"{server.url}/readyz", headers={"Authorization": f"Bearer {LIVE_KEY}"}).json()
    finally:
        server.stop()
    assert page["status"] == "done", (page.get("error"), page.get("errors"), server.log_tail())
    assert "#key" not in page["address"]  # the key is taken off the address bar
    return page, after, before


@pytest.fixture(scope="module")
def built_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real page, built now from mobile_export/page (not a stale dist/)."""
    node = require_node()
    built = tmp_path_factory.mktemp("built") / "device-page"
    subprocess.run([node, "tools/build_page.mjs", str(built)], cwd=MOBILE, check=True, capture_output=True,
                   timeout=120)
    return built


@pytest.mark.e2e
@pytest.mark.slow
def test_chromium_trains_the_digits_split(digits_split: Path, built_page: Path, monkeypatch: Any) -> None:
    """The real page in headless Chromium against a real `splitkeras serve --device-page` on the
    demo's split: the loss falls, the accuracy is shown, and the server applied exactly the
    steps the page ran."""
    page, after, _ = _run_page(digits_split, built_page, "epochs=2&batch=32&autostart=1", monkeypatch)
    assert page["errors"] == [], page["errors"]
    steps = 2 * -(-1437 // 32)
    assert page["steps"] == steps
    assert page["appliedSteps"] == steps and after["applied_steps"] == steps
    assert page["backend"] == "wasm"  # Chromium runs wasm, under the page's Content-Security-Policy
    losses = [loss for _, loss in page["losses"]]
    assert len(losses) == steps and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert page["history"]["loss"][1] < page["history"]["loss"][0]
    assert 0.5 < page["testAccuracy"] <= 1.0
    assert page["shown"]["test-accuracy"] == f"{page['testAccuracy']:.4f}"
    assert page["shown"]["applied"] == str(steps) and page["shown"]["steps"] == str(steps)
    assert page["bytesSent"] > 0 and page["bytesReceived"] > 0
    assert {p["series"]: p["points"] for p in page["chartPolylines"]} == {
        "loss": steps, "accuracy": steps, "val_accuracy": 2}
    print(f"\nChromium {page['backend']}: {steps} steps at {page['stepsPerSecond']:.1f} steps/s, loss "
          f"{first:.3f} -> {last:.3f}, test accuracy {page['testAccuracy']:.4f}, {page['bytesSent']:,} bytes sent, "
          f"{page['bytesReceived']:,} received")


@pytest.mark.e2e
@pytest.mark.slow
def test_chromium_split_without_data_takes_a_file(u_split: Path, built_page: Path, tmp_path: Path,
                                                  monkeypatch: Any) -> None:
    """Another split: the page says it needs data and how to give it, then trains on the
    file chosen in its file chooser; the server applied every step."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    data_file = tmp_path / "data.safetensors"
    data_file.write_bytes(wire.encode({"x_train": x, "y_train": y}))
    page, after, (keyless, wrong_key) = _run_page(
        u_split, built_page, "epochs=3&batch=16&backend=cpu&autostart=1", monkeypatch, data_file=data_file,
        first=("", "?autostart=1#key=wrong"))
    assert keyless["keyPanelShown"] and keyless["status"] == "idle"
    assert "Paste the server key" in keyless["message"] and keyless["errors"] == []
    assert wrong_key["status"] == "error" and wrong_key["keyPanelShown"]  # asks for the key again
    assert "need the server key" in wrong_key["error"]["message"] and "#key" not in wrong_key["address"]
    assert "no data of its own" in page["askedForData"] and "x_train" in page["askedForData"]
    assert [e for e in page["errors"] if "404" not in e] == [], page["errors"]  # the data route's 404
    assert page["backend"] == "cpu"
    assert page["steps"] == 12 and page["appliedSteps"] == 12 and after["applied_steps"] == 12
    assert page["history"]["loss"][-1] < page["history"]["loss"][0]
    assert page["testAccuracy"] is None and page["shown"]["test-accuracy"] == "–"
