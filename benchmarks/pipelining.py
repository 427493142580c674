"""Pipelining on the device (`DeviceClient.fit(pipeline_depth=N)`): epoch time and test
accuracy, sequential vs depth 2 vs depth 4, on an emulated 4G link and on loopback.

The digits split of `splitkeras demo` (`splitkeras/demo.py`: conv_2 / dense_1 cuts, Adam
1e-3, batch 32, 1,437 training and 360 test images) is saved once; each mode trains its
own copy from the same weights against its own `splitkeras serve` subprocess on 127.0.0.1
(`--max-pending-steps 4`), epoch by epoch INTERLEAVED (epoch e of every mode, then epoch
e+1), each epoch with the same shuffle seed in every mode, so that a load spike on the
shared machine hits all modes alike. Test accuracy is measured after the last epoch
without the emulated link (it changes no weight).

The emulated 4G link (`NetworkConditions`, shared: concurrent transfers in one direction
are serialised, only the latency overlaps): 40 ms one way, 15 Mbit/s each way -- a
typical LTE phone's round trip (60-100 ms) and a modest LTE rate, below the median so the
bandwidth part is not negligible (a forward body is 128 KiB here: 70 ms at 15 Mbit/s).
The loopback rows time one more epoch of each mode with no emulation.

The server processes and the device (this process) share the machine's CPU cores.

Run: `.venv/bin/python benchmarks/pipelining.py [--epochs 5]` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _common import RESULTS, machine, median, start_server, stop_server, table, verdict, write_results

MODES = {"sequential": 1, "depth 2": 2, "depth 4": 4}
LATENCY_S, BANDWIDTH_BPS = 0.040, 15e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import keras

    import splitkeras
    from splitkeras.client import DeviceClient, NetworkConditions
    from splitkeras.demo import CUTS, digits_data, digits_model

    (x_train, y_train), (x_test, y_test) = digits_data()
    root = Path(tempfile.mkdtemp(prefix="splitkeras-pipelining-"))
    template = root / "split"
    splitkeras.split(digits_model(), at=CUTS).save(template, tfjs=False)
    link = NetworkConditions(latency_s=LATENCY_S, bandwidth_bps=BANDWIDTH_BPS)
    servers: dict[str, Any] = {}
    clients: dict[str, Any] = {}
    epoch_seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for mode in MODES:
            folder = Path(shutil.copytree(template, root / mode.replace(" ", "_")))
            key = secrets.token_hex(16)
            servers[mode] = start_server(folder, key, "--max-pending-steps", "4")
            clients[mode] = DeviceClient(folder, servers[mode][1], key=key, network=link)
            clients[mode].compile()
        for epoch in range(args.epochs):
            for mode, depth in MODES.items():
                keras.utils.set_random_seed(100 + epoch)  # the same batches in every mode
                started = time.perf_counter()
                clients[mode].fit(x_train, y_train, batch_size=args.batch_size, epochs=1, verbose=0,
                                  pipeline_depth=depth)
                epoch_seconds[mode].append(time.perf_counter() - started)
                print(f"epoch {epoch + 1} {mode}: {epoch_seconds[mode][-1]:.2f} s", flush=True)
        accuracy, applied = {}, {}
        for mode, client in clients.items():
            client.transport.network = None
            accuracy[mode] = float(client.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])
            applied[mode] = int(client.transport.session_state()["applied_steps"])
        loopback = {}
        for mode, depth in MODES.items():
            keras.utils.set_random_seed(100 + args.epochs)
            started = time.perf_counter()
            clients[mode].fit(x_train, y_train, batch_size=args.batch_size, epochs=1, verbose=0,
                              pipeline_depth=depth)
            loopback[mode] = time.perf_counter() - started
    finally:
        for client in clients.values():
            client.close()
        for process, _ in servers.values():
            stop_server(process)
        shutil.rmtree(root, ignore_errors=True)

    steps_per_epoch = -(-len(x_train) // args.batch_size)
    first = epoch_seconds["sequential"]
    rows, data_rows = [], []
    for mode in MODES:
        # the first epoch includes tracing and warm-up: the median of the later ones is the figure
        seconds = median(epoch_seconds[mode][1:] or epoch_seconds[mode])
        ratio = seconds / median(first[1:] or first)
        data_rows.append({"mode": mode, "pipeline_depth": MODES[mode], "epoch_seconds": epoch_seconds[mode],
                          "median_epoch_seconds": seconds, "ratio_to_sequential": ratio,
                          "loopback_epoch_seconds": loopback[mode],
                          "loopback_ratio": loopback[mode] / loopback["sequential"],
                          "test_accuracy": accuracy[mode], "applied_steps": applied[mode]})
        rows.append([mode, f"{seconds:.2f}", f"{ratio:.2f}", f"{1e3 * seconds / steps_per_epoch:.0f}",
                     f"{100 * accuracy[mode]:.2f}", f"{100 * (accuracy[mode] - accuracy['sequential']):+.2f}",
                     f"{loopback[mode]:.2f}", f"{loopback[mode] / loopback['sequential']:.2f}", applied[mode]])
    depth2 = data_rows[1]
    time_met = depth2["ratio_to_sequential"] <= 0.75
    accuracy_met = abs(depth2["test_accuracy"] - accuracy["sequential"]) <= 0.005
    data = {"machine": machine(), "epochs": args.epochs, "batch_size": args.batch_size,
            "steps_per_epoch": steps_per_epoch, "link": {"latency_s": LATENCY_S, "bandwidth_bps": BANDWIDTH_BPS},
            "rows": data_rows, "floors": {
                "depth2_time_ratio": {"what": "depth-2 epoch time / sequential on emulated 4G (at most)",
                                      "value": depth2["ratio_to_sequential"], "floor": 0.75, "met": time_met},
                "depth2_accuracy_points": {
                    "what": "|depth-2 - sequential test accuracy| in points (at most)",
                    "value": 100 * abs(depth2["test_accuracy"] - accuracy["sequential"]), "floor": 0.5,
                    "met": accuracy_met}}}
    markdown = "\n\n".join([
        "# Pipelining on the device: epoch time and test accuracy",
        f"Digits split (`splitkeras demo`'s, cuts {CUTS}), batch {args.batch_size} ({steps_per_epoch} steps "
        f"an epoch), {args.epochs} epochs per mode, interleaved epoch by epoch, same weights and batches. "
        f"Emulated 4G: {LATENCY_S * 1e3:.0f} ms one way, {BANDWIDTH_BPS / 1e6:.0f} Mbit/s each way, a shared "
        "link (concurrent transfers in one direction serialised, latency overlapping). Epoch time: the median "
        "of epochs 2.. (the first includes warm-up). Loopback: one more epoch each, no emulation. Server "
        "processes and the device share the machine's CPU cores "
        f"({data['machine'].get('cores', '?')} cores: {data['machine'].get('cpu', '')}).",
        table(["mode", "4G epoch s", "vs sequential", "ms/step", "test acc %", "vs seq (points)",
               "loopback epoch s", "loopback vs seq", "applied steps"], rows),
        f"Floors (issue 17): depth 2 epoch time <= 0.75 of sequential: {verdict(time_met)} "
        f"({depth2['ratio_to_sequential']:.2f}); test accuracy within 0.5 points: {verdict(accuracy_met)} "
        f"({100 * (depth2['test_accuracy'] - accuracy['sequential']):+.2f} points; one test image is "
        f"{100 / len(x_test):.2f} points).",
        "Staleness: at depth d the head's and the server's forward of step k miss the updates of up to "
        "d-1 earlier steps (docs/training.md, Pipelining).",
        "Reproduce: `.venv/bin/python benchmarks/pipelining.py`. Plot: `pipelining.png`.",
    ])
    write_results("pipelining", data, markdown)
    plot(data_rows, RESULTS / "pipelining.png")
    print(markdown)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, accuracies) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [r["mode"] for r in rows]
    positions = range(len(rows))
    times.bar([p - 0.2 for p in positions], [r["median_epoch_seconds"] for r in rows], 0.4, label="emulated 4G")
    times.bar([p + 0.2 for p in positions], [r["loopback_epoch_seconds"] for r in rows], 0.4, label="loopback")
    times.set_xticks(list(positions), names)
    times.set_ylabel("epoch time (s)")
    times.legend()
    accuracies.bar(names, [100 * r["test_accuracy"] for r in rows], color="tab:green")
    low = min(100 * r["test_accuracy"] for r in rows)
    accuracies.set_ylim(max(0.0, low - 3), 100)
    accuracies.set_ylabel("test accuracy (%)")
    figure.suptitle("Pipelining on the device (digits split)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
