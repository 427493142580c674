"""CORS preflights and time inside fetch per step, for a browser page of another origin.

A page on 127.0.0.1:P (real headless Chromium, the browser's own fetch,
`mobile_export/tools/cors_steps.mjs`) trains a real `splitkeras serve --cors-origin
http://127.0.0.1:P` on another port for `--steps` steps (forward + backward of a dense
server segment, batch 32). Counted from the server's access log: the OPTIONS (preflight)
requests; measured in the page: the milliseconds each step's two requests spent inside
fetch (a preflight, when one is sent, is inside that time).

Before/after in one table: run this file in a checkout of the old routes (the step number
in the URL) with `--label before --json before.json`, then here with `--before
before.json`. The old tree needs this file, `mobile_export/tools/cors_steps.mjs` and
`mobile_export/test/browser/steps_page.js` copied in (they use only `SplitSession`).

    python benchmarks/cors_preflight.py [--steps 40] [--label after] [--before before.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _common import ROOT, free_port, machine, median, table, write_results  # noqa: E402

KEY = "cors-benchmark-key"
BATCH, WIDTH, HIDDEN = 32, 64, 256
_ACCESS = re.compile(r'"(OPTIONS|GET|POST|DELETE) (\S+) HTTP/1\.1" (\d{3})')


def build_split(folder: Path) -> None:
    import keras

    import splitkeras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((WIDTH,), name="x")
    h = keras.layers.Dense(WIDTH, activation="relu", name="h")(inputs)
    m = keras.layers.Dense(HIDDEN, activation="relu", name="m1")(h)
    m = keras.layers.Dense(WIDTH, activation="relu", name="m")(m)
    out = keras.layers.Dense(10, name="logits")(m)
    model = keras.Model(inputs, out)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    splitkeras.split(model, at=["h", "m"]).save(folder)


def run(steps: int) -> dict[str, Any]:
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "split"
        build_split(folder)
        page_port, port = free_port(), free_port()
        origin, url = f"http://127.0.0.1:{page_port}", f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        env = dict(os.environ, SPLITKERAS_SERVER_KEY=KEY)
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "splitkeras.cli", "serve", str(folder), "--port", str(port),
                 "--checkpoint-every", "1000000", "--cors-origin", origin, "--log-level", "info"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
            job = {"pagePort": page_port, "serverUrl": url, "key": KEY, "steps": steps, "batch": BATCH}
            completed = subprocess.run(["node", "tools/cors_steps.mjs", json.dumps(job)], cwd=ROOT / "mobile_export",
                                       capture_output=True, text=True, timeout=600)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
            if not lines:
                raise RuntimeError(f"cors_steps.mjs printed nothing: {completed.stderr[-2000:]}")
            page = json.loads(lines[-1])
            if "error" in page:
                raise RuntimeError(f"the page failed: {page['error']}")
        finally:
            server.terminate()
            server.wait(60)
        access = _ACCESS.findall(log_path.read_text(errors="replace"))
    preflights = Counter(path for method, path, _ in access if method == "OPTIONS")
    requests = [(method, path) for method, path, _ in access if method != "OPTIONS" and path.startswith("/v1/")]
    step_ms = page["stepMs"]
    warm = step_ms[1:]  # step 0 pays the first preflights either way
    return {"steps": steps, "requests": len(requests), "distinct_urls": len(set(p for _, p in requests)),
            "preflights": sum(preflights.values()), "step_ms": step_ms,
            "median_step_ms": median(warm), "median_step_ms_first": step_ms[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--label", default="after")
    parser.add_argument("--json", type=Path, help="also write this run's figures here")
    parser.add_argument("--before", type=Path, help="a --json file of a run of the old routes")
    args = parser.parse_args()
    result = {"label": args.label, **run(args.steps)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "step_ms"}))
    if args.label != "after":
        return
    runs = [json.loads(args.before.read_text())] if args.before else []
    runs.append(result)
    rows = [[r["label"], r["steps"], r["requests"], r["distinct_urls"], r["preflights"],
             f"{r['median_step_ms']:.1f}", f"{r['median_step_ms_first']:.1f}"] for r in runs]
    markdown = "\n".join([
        "# CORS preflights per step (benchmarks/cors_preflight.py)", "",
        f"Real headless Chromium, a page of another origin, a real `splitkeras serve --cors-origin`; "
        f"dense server segment {WIDTH}->{HIDDEN}->{WIDTH}, batch {BATCH}, float32 on the wire. "
        "`before`: the step number in the URL (`/v1/sessions/{id}/steps/{k}/forward`); `after`: in "
        "the `Splitkeras-Step` header (`/v1/sessions/{id}/forward`). Preflights counted in the "
        "server's access log; ms inside fetch measured in the page (forward + backward of one step; "
        "median over steps 1.., step 0 apart).", "",
        table(["routes", "steps", "requests", "distinct URLs", "OPTIONS preflights",
               "ms in fetch per step (median)", "step 0 ms"], rows), "",
        f"Machine: shared, {machine().get('cores', '?')} cores (other jobs ran on it: absolute ms are "
        "noisy, the preflight counts are exact).",
    ])
    write_results("cors_preflight", {"runs": runs, "machine": machine()}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
