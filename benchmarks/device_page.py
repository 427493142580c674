"""The device page of `splitkeras serve --device-page` in headless Chromium, on the split of
`splitkeras demo`: steps/s, loss and test accuracy on the wasm and the cpu backend, next to the
Python `DeviceClient` on the same split, data and epochs (what `splitkeras demo` runs).

Each run gets a fresh copy of the split (the server saves its trained segment on shutdown) and
its own real `splitkeras serve --device-page` on 127.0.0.1; the page is built now from
mobile_export/page (`tools/build_page.mjs`) and driven by `tools/run_device_page.mjs` (Debian's
/usr/bin/chromium through playwright-core). Runs alternate (wasm, cpu, Python) round by round;
medians over rounds. The page and the Python client shuffle with different generators, so
their curves are alike, not equal.

Usage:
    .venv/bin/python benchmarks/device_page.py [--rounds 2] [--epochs 3] [--batch 32] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine, median, start_server, stop_server, table, write_results  # noqa: E402

MOBILE = ROOT / "mobile_export"
VARIANTS = ["Chromium wasm", "Chromium cpu", "Python DeviceClient"]


def make_split(folder: Path) -> Path:
    import splitkeras
    from splitkeras.demo import CUTS, DEMO_MODEL_FILE, digits_model

    splitkeras.split(digits_model(), at=CUTS, source={"file": DEMO_MODEL_FILE, "sha256": None}).save(
        folder, tfjs=True)
    return folder


def run_page(split: Path, page_dir: Path, backend: str, epochs: int, batch: int) -> dict[str, Any]:
    key = secrets.token_hex(16)
    process, url = start_server(split, key, "--device-page", extra_env={"SPLITKERAS_DEVICE_PAGE_DIR": str(page_dir)})
    try:
        address = f"{url}/device/?epochs={epochs}&batch={batch}&backend={backend}&autostart=1#key={key}"
        started = time.perf_counter()
        completed = subprocess.run(["node", "tools/run_device_page.mjs", address, "900000"], cwd=MOBILE,
                                   capture_output=True, text=True, timeout=960, check=True)
        wall = time.perf_counter() - started
        page = json.loads(completed.stdout.strip().splitlines()[-1])
        applied = httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {key}"}).json()["applied_steps"]
    finally:
        stop_server(process)
    if page["status"] != "done":
        raise RuntimeError(f"the page did not finish: {page.get('error')} {page.get('errors')}")
    losses = [loss for _, loss in page["losses"]]
    return {"backend": page["backend"], "steps": page["steps"], "applied_steps": applied,
            "steps_per_second": page["stepsPerSecond"], "page_seconds": wall, "losses": losses,
            "epoch_loss": page["history"]["loss"], "test_accuracy": page["testAccuracy"],
            "bytes_sent_per_step": page["bytesSent"] / page["steps"],
            "bytes_received_per_step": page["bytesReceived"] / page["steps"]}


def run_python(split: Path, epochs: int, batch: int) -> dict[str, Any]:
    import keras

    from splitkeras.client import DeviceClient
    from splitkeras.demo import digits_data

    (x_train, y_train), (x_test, y_test) = digits_data()
    key = secrets.token_hex(16)
    process, url = start_server(split, key)
    try:
        device = DeviceClient(split, url, key=key)
        device.compile()
        keras.utils.set_random_seed(7)
        started = time.perf_counter()
        history = device.fit(x_train, y_train, batch_size=batch, epochs=epochs, verbose=0,
                             validation_data=(x_test, y_test))
        seconds = time.perf_counter() - started
        stats = device.stats
        device.close()
    finally:
        stop_server(process)
    steps = epochs * -(-len(x_train) // batch)
    return {"backend": "python", "steps": steps, "steps_per_second": steps / seconds,
            "epoch_loss": [float(v) for v in history.history["loss"]],
            "test_accuracy": float(history.history["val_accuracy"][-1]),
            "bytes_sent_per_step": stats["bytes_sent"] / steps,
            "bytes_received_per_step": stats["bytes_received"] / steps}


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.2))
    for name in ("Chromium wasm", "Chromium cpu"):
        losses = runs[name]["losses"]
        axis.plot(np.arange(1, len(losses) + 1), losses, label=f"{name}: loss per step", linewidth=0.9)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("device page, digits split (last round)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="1 round, 1 epoch (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs = 1, 1
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="splitkeras-device-page-"))
    try:
        page_dir = work / "device-page"
        subprocess.run(["node", "tools/build_page.mjs", str(page_dir)], cwd=MOBILE, check=True, capture_output=True)
        template = make_split(work / "template")
        rounds: list[dict[str, dict[str, Any]]] = []
        for number in range(args.rounds):
            runs: dict[str, dict[str, Any]] = {}
            order = VARIANTS[number % 3:] + VARIANTS[:number % 3]
            for name in order:
                split = shutil.copytree(template, work / f"r{number}-{name.replace(' ', '-')}")
                if name == "Python DeviceClient":
                    runs[name] = run_python(split, args.epochs, args.batch)
                else:
                    runs[name] = run_page(split, page_dir, name.split()[1], args.epochs, args.batch)
                    assert runs[name]["applied_steps"] == runs[name]["steps"], runs[name]
                print(f"round {number + 1} {name}: {runs[name]['steps_per_second']:.1f} steps/s, test accuracy "
                      f"{runs[name]['test_accuracy']:.4f}", flush=True)
            rounds.append(runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name in VARIANTS:
        per = [r[name] for r in rounds]
        first = [float(np.mean(p["losses"][:10])) for p in per if "losses" in p]
        last = [float(np.mean(p["losses"][-10:])) for p in per if "losses" in p]
        rows.append([name, per[0]["steps"], f"{median([p['steps_per_second'] for p in per]):.1f}",
                     f"{median(first):.3f} -> {median(last):.3f}" if first else "-",
                     " / ".join(f"{v:.3f}" for v in per[-1]["epoch_loss"]),
                     f"{median([p['test_accuracy'] for p in per]):.4f}",
                     f"{median([p['bytes_sent_per_step'] for p in per]):,.0f} / "
                     f"{median([p['bytes_received_per_step'] for p in per]):,.0f}"])
    markdown = (f"# The device page (`benchmarks/device_page.py`)\n\n{args.rounds} round(s), {args.epochs} epochs of "
                f"the digits split each, batch {args.batch}; medians over rounds. Machine: {info['cpu']}, "
                f"{info['cores']} cores (shared), load at start {info['load_average_at_start']}.\n\n"
                + table(["run", "steps", "steps/s", "mean loss, first 10 -> last 10 steps",
                         "epoch loss (last round)", "test accuracy", "bytes sent / received per step"], rows)
                + "\n\nEvery page run: the server's applied steps equal the steps the page ran. Bytes per "
                "step include the per-epoch test evaluation (and, for the page, its small session-state "
                "requests). The Python client's steps/s includes its first steps' tracing.\n\n![](device_page.png)\n")
    for runs in rounds:
        for run in runs.values():
            run["losses"] = [round(v, 6) for v in run.get("losses", [])]
    write_results("device_page", {"machine": info, "args": vars(args), "rounds": rounds}, markdown)
    plot(rounds[-1], RESULTS / "device_page.png")
    print(markdown)


if __name__ == "__main__":
    main()
