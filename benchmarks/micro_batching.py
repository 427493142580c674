"""Accuracy of micro-batching across devices against the sequential server: digits, 8 and 64 devices.

Micro-batching (`splitkeras serve --batch-window-ms N --max-devices-per-batch K`) changes
the training algorithm: the server segment takes ONE update, the mean of the group's
device steps, where the sequential server takes one per step; its BatchNormalization
normalizes over the union of the group's batches. This measures what that costs in
accuracy on the same data, model and epochs.

Task: `splitkeras demo`'s digits (scikit-learn `load_digits`, no download; its 80/20 split)
and its CNN cut at conv_2 and dense_1 (splitkeras/demo.py): head and tail on each device,
the middle (BatchNormalization, a conv, a dense layer; Adam 1e-3) on a real `splitkeras
serve` on 127.0.0.1. Devices: `DeviceClient`s in threads of this process, each a session with
its own head and tail (from the same initial weights), each with an equal IID share of the
training images (a seeded permutation cut in N), batch 16, the same epochs. Runs: N = 8 and
64 devices, each against the sequential server and micro-batched ones (windows
`--window-ms`, default 20 and 200 ms: the longer one makes larger groups; K = N). Figure:
the test accuracy (the whole test set) of each device's model
(its head and tail, the server's middle, `DeviceClient.evaluate`), mean and range over the
devices; and the server's updates, applied steps and mean group size.

Run: `.venv/bin/python benchmarks/micro_batching.py [--epochs 15]` (about 10 min on 2 shared cores)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from _common import machine, start_server, stop_server, table, write_results  # noqa: E402

KEY = "micro-batching-benchmark"
BATCH = 16
SEED = 0
DEVICE_COUNTS = (8, 64)


def train(template: Path, root: Path, name: str, devices: int, flags: list[str], data: Any,
          epochs: int) -> dict[str, Any]:
    from splitkeras.client import DeviceClient, Transport

    (x_train, y_train), (x_test, y_test) = data
    folder = Path(shutil.copytree(template, root / name))
    shares = np.array_split(np.random.default_rng(SEED).permutation(len(x_train)), devices)
    process, url = start_server(folder, KEY, *flags, extra_env={"TF_DETERMINISTIC_OPS": "1"})
    clients: list[Any] = []
    try:
        for _ in range(devices):
            client = DeviceClient(folder, url, transport=Transport(url, key=KEY))
            client.compile()
            client.open_session()
            clients.append(client)
        errors: list[BaseException] = []

        def run(client: Any, share: np.ndarray) -> None:
            try:
                client.fit(x_train[share], y_train[share], batch_size=BATCH, epochs=epochs, verbose=0,
                           shuffle=True)
            except BaseException as error:  # noqa: BLE001 - raised below
                errors.append(error)

        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=pair) for pair in zip(clients, shares)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        if errors:
            raise errors[0]
        state = httpx.get(f"{url}/readyz?detail=1", headers={"Authorization": f"Bearer {KEY}"}).json()
        accuracies = [float(c.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]) for c in clients]
    finally:
        for client in clients:
            client.close()
        stop_server(process)
    return {"devices": devices, "flags": flags, "seconds": seconds, "applied_steps": state["applied_steps"],
            "updates": state["updates"], "mean_group_size": state["applied_steps"] / max(state["updates"], 1),
            "accuracy_mean": float(np.mean(accuracies)), "accuracy_min": float(np.min(accuracies)),
            "accuracy_max": float(np.max(accuracies)), "device_accuracies": accuracies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--window-ms", type=float, nargs="+", default=[20.0, 200.0],
                        help="the micro-batched runs' windows (a longer one: larger groups)")
    args = parser.parse_args()

    import splitkeras
    from splitkeras.demo import CUTS, digits_data, digits_model

    data = digits_data(SEED)
    root = Path(tempfile.mkdtemp(prefix="splitkeras-micro-"))
    runs: list[dict[str, Any]] = []
    try:
        splitkeras.split(digits_model(SEED), at=CUTS).save(root / "template", tfjs=False)
        for devices in DEVICE_COUNTS:
            variants = [("sequential", [])] + [
                (f"micro-batched, {window:g} ms", ["--batch-window-ms", f"{window:g}", "--max-devices-per-batch",
                                                   str(devices)]) for window in args.window_ms]
            for index, (mode, flags) in enumerate(variants):
                result = train(root / "template", root, f"run{index}-{devices}", devices, flags, data, args.epochs)
                result["mode"] = mode
                runs.append(result)
                print(f"{devices} devices, {mode}: accuracy {result['accuracy_mean']:.4f} "
                      f"({result['accuracy_min']:.4f}-{result['accuracy_max']:.4f}), {result['updates']} updates "
                      f"for {result['applied_steps']} steps, {result['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    data_out = {"benchmark": "micro_batching", "epochs": args.epochs, "batch": BATCH, "windows_ms": args.window_ms,
                "seed": SEED, "machine": machine(), "runs": runs}
    rows = [[r["devices"], r["mode"], f"{r['accuracy_mean']:.4f}", f"{r['accuracy_min']:.4f} - {r['accuracy_max']:.4f}",
             r["applied_steps"], r["updates"], f"{r['mean_group_size']:.1f}", f"{r['seconds']:.0f}"] for r in runs]
    markdown = "\n".join([
        "# Micro-batching across devices: accuracy against the sequential server", "",
        f"Digits (`splitkeras demo`'s data and CNN, cut at conv_2 and dense_1), each device its own head and tail "
        f"and an equal IID share, batch {BATCH}, {args.epochs} epochs; micro-batched: `--batch-window-ms W "
        f"--max-devices-per-batch N`, W = {', '.join(f'{w:g}' for w in args.window_ms)} ms. "
        "Accuracy: each device's model (its head and tail, the "
        "server's middle) on the whole test set (360 images): mean, and min - max over the devices.", "",
        table(["devices", "server", "test accuracy (mean)", "min - max", "device steps", "server updates",
               "mean group", "seconds"], rows), "",
        "The micro-batched server takes one update per group (the mean of its members' steps): "
        "with groups of G, about G times fewer updates of the middle for the same epochs. The devices "
        "train in threads of one process, so the order of their steps (and the groups) differs from run to "
        "run, and so do the accuracies (benchmarks/README.md gives their spread over runs).",
    ])
    paths = write_results("micro_batching", data_out, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
