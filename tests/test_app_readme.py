"""The examples of the app bundle's README (mobile_export/app_template/README.md, the README.md
`splitkeras export` writes) run as written against a real `splitkeras serve`: the Node example
trains the digits split, saves the trained device segments and starts from them on a second run;
the web example, built with esbuild as the README says, trains in headless Chromium on the wasm
backend and keeps its weights in IndexedDB across a reload.

What differs from the README's commands, because nothing may be downloaded here: the runtime is
installed offline from the app folder (`--install-links`, as written) and @tensorflow/tfjs(-backend-
wasm) is linked from mobile_export/node_modules instead of fetched; the web page is served from
127.0.0.1 with /v1 reverse-proxied to the server (mobile_export/tools/page_server.mjs), since
the server's CORS (`--cors-origin`) is not there yet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.live_server import KEY, Server

REPO = Path(__file__).resolve().parents[1]
MOBILE = REPO / "mobile_export"
README = MOBILE / "app_template" / "README.md"
pytestmark = pytest.mark.e2e


def examples() -> dict[str, str]:
    """The README's files: each code block after an `<!-- example: PATH -->` line."""
    text = README.read_text(encoding="utf-8")
    found = re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S)
    return {path: code for path, code in found}


def test_the_readme_has_the_examples_it_promises() -> None:
    assert set(examples()) == {"trainer/train.mjs", "web/index.html", "web/app.js"}


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm or not (MOBILE / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        pytest.skip("node/npm or mobile_export/node_modules missing: run scripts/setup")
    return node, npm


def _install(folder: Path, npm: str) -> None:
    """`npm install --install-links ../split/splitkeras-device` offline, TF.js linked."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "init", "-y"], cwd=folder, check=True, capture_output=True)
    subprocess.run([npm, "pkg", "set", "type=module"], cwd=folder, check=True, capture_output=True)
    subprocess.run([npm, "install", "--offline", "--install-links", "--no-audit", "--no-fund", "--legacy-peer-deps",
                    "--loglevel=error", "../split/splitkeras-device"], cwd=folder, check=True, capture_output=True)
    (folder / "node_modules" / "@tensorflow").symlink_to(MOBILE / "node_modules" / "@tensorflow",
                                                         target_is_directory=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    import splitkeras
    from splitkeras.cli.export import export_app
    from splitkeras.demo import CUTS, digits_model

    _tools()
    work = tmp_path_factory.mktemp("readme")
    folder = work / "out"
    splitkeras.split(digits_model(), at=CUTS).save(folder, tfjs=True)
    export_app(folder, work / "split")
    server = Server(folder, checkpoint_every=1000).start()
    try:
        server.wait_ready()
        yield {"work": work, "url": server.url}
    finally:
        server.stop()


def test_the_node_example_trains_saves_and_resumes(served: dict[str, object]) -> None:
    node, npm = _tools()
    work = Path(str(served["work"]))
    trainer = work / "trainer"
    _install(trainer, npm)
    (trainer / "train.mjs").write_text(examples()["trainer/train.mjs"], encoding="utf-8")
    env = dict(os.environ, SPLIT_SERVER=str(served["url"]), SPLITKERAS_SERVER_KEY=KEY)
    runs = []
    for _ in range(2):
        done = subprocess.run([node, "train.mjs"], cwd=trainer, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        assert "epoch 1: loss" in done.stdout
    for logs in runs:
        assert len(logs["loss"]) == 2 and len(logs["val_loss"]) == 2
        assert all(v == v and v > 0 for v in logs["loss"] + logs["val_loss"])
    assert (trainer / "trained" / "head_tfjs" / "model.json").exists()
    assert (trainer / "trained" / "tail_tfjs" / "group1-shard1of1.bin").exists()
    # the second run starts from the first one's weights: its first epoch is not the first's
    assert runs[1]["loss"][0] != runs[0]["loss"][0]


def test_the_web_example_trains_on_wasm_in_chromium_and_keeps_its_weights(served: dict[str, object]) -> None:
    node, npm = _tools()
    if not shutil.which("chromium") and not os.environ.get("CHROMIUM_PATH") and not Path("/usr/bin/chromium").exists():
        pytest.skip("no Chromium: install Debian's package (apt-get install -y chromium; scripts/setup does)")
    work = Path(str(served["work"]))
    web = work / "web"
    _install(web, npm)
    for path, code in examples().items():
        if path.startswith("web/"):
            (work / path).write_text(code, encoding="utf-8")
    esbuild = MOBILE / "node_modules" / ".bin" / "esbuild"
    subprocess.run([str(esbuild), "app.js", "--bundle", "--format=esm", "--outfile=dist/app.js", "--log-level=error"],
                   cwd=web, check=True, capture_output=True)
    for wasm in (web / "node_modules" / "@tensorflow" / "tfjs-backend-wasm" / "dist").glob("*.wasm"):
        shutil.copy(wasm, web / "dist" / wasm.name)
    shutil.copytree(work / "split", web / "split")
    done = subprocess.run([node, str(MOBILE / "tools" / "run_page.mjs"), "--root", str(web), "--proxy",
                           str(served["url"]), "--path", f"index.html?key={KEY}", "--wait", "splitResult",
                           "--reload", "--timeout", "300"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = json.loads(done.stdout.strip().splitlines()[-1])["results"]
    assert first["backend"] == "wasm" and second["backend"] == "wasm"
    assert len(first["loss"]) == 2 and all(v == v and v > 0 for v in first["loss"] + first["val_loss"])
    assert first["restored"] == 0 and second["restored"] == 2, (first, second)
