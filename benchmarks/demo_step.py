"""The fixed cost per step of `splitkeras demo`'s split: DeviceClient.fit over HTTP vs central.

The demo's digits CNN (small: fixed costs dominate), split at the demo's cuts, batch 32:
a real `splitkeras serve` on 127.0.0.1 and a `DeviceClient` in a child process; after a
warm-up epoch (tracing), `--epochs` epochs are timed: wall ms per step, the client's and
the server's CPU ms per step; and central `model.fit` on the same data in the same child.
`--tree PATH` (repeatable) runs the children with another checkout's `splitkeras`
(e.g. `git archive <commit> splitkeras server_app converters | tar -x -C /tmp/before`),
so that before and after are measured in interleaved rounds on the same machine.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/demo_step.py --rounds 3 --tree /tmp/before --tree $PWD
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, machine, median, table, write_results

BATCH = 32


def child(epochs: int) -> dict[str, float]:
    """One round in this process (its `splitkeras` is the tree on PYTHONPATH)."""
    import keras
    import numpy as np

    import splitkeras
    from splitkeras.client import DeviceClient, free_port, wait_until_ready
    from splitkeras.demo import CUTS, DEMO_MODEL_FILE, digits_data, digits_model

    (x, y), _ = digits_data()
    steps = epochs * int(np.ceil(len(x) / BATCH))
    central = digits_model()
    central.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    central.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    start, cpu = time.perf_counter(), time.process_time()
    central.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    found = {"central_ms": 1e3 * (time.perf_counter() - start) / steps,
             "central_cpu_ms": 1e3 * (time.process_time() - cpu) / steps}
    folder = Path(tempfile.mkdtemp(prefix="splitkeras-demo-step-"))
    model = digits_model()
    model.save(folder / DEMO_MODEL_FILE)
    splitkeras.split(model, at=CUTS).save(folder, tfjs=False)
    port, key = free_port(), "k" * 32
    server = subprocess.Popen(
        [sys.executable, "-m", "splitkeras.cli", "serve", str(folder), "--port", str(port)],
        env=dict(os.environ, SPLITKERAS_SERVER_KEY=key, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clock = os.sysconf("SC_CLK_TCK")

    def server_cpu() -> float:
        fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (float(fields[11]) + float(fields[12])) / clock  # utime + stime

    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, alive=lambda: server.poll() is None)
        device = DeviceClient(str(folder), url, key=key)
        device.compile()
        device.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        start, cpu, server_start = time.perf_counter(), time.process_time(), server_cpu()
        device.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
        found.update(http_ms=1e3 * (time.perf_counter() - start) / steps,
                     client_cpu_ms=1e3 * (time.process_time() - cpu) / steps,
                     server_cpu_ms=1e3 * (server_cpu() - server_start) / steps)
        device.close()
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
    del keras
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per tree")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per round (45 steps each)")
    parser.add_argument("--tree", action="append", help="a checkout whose splitkeras to run (repeatable; "
                        "default: this one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.epochs)))
        return
    info = machine()  # the load average at the start
    trees = [str(Path(t).resolve()) for t in (args.tree or [str(ROOT)])]
    rounds: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    for _ in range(args.rounds):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL="3")
            done = subprocess.run([sys.executable, __file__, "--child", "--epochs", str(args.epochs)],
                                  env=env, cwd=tree, capture_output=True, text=True, check=True)
            rounds[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(tree, rounds[tree][-1], flush=True)
    keys = ["central_ms", "http_ms", "central_cpu_ms", "client_cpu_ms", "server_cpu_ms"]
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    for tree, found in rounds.items():
        medians = {k: median([r[k] for r in found]) for k in keys}
        ratio = median([r["http_ms"] / r["central_ms"] for r in found])
        cpu_ratio = median([(r["client_cpu_ms"] + r["server_cpu_ms"]) / r["central_cpu_ms"] for r in found])
        summary[tree] = {"medians": medians, "http_over_central": ratio,
                         "cpu_over_central": cpu_ratio, "rounds": found}
        rows.append([tree, *(f"{medians[k]:.1f}" for k in keys), f"{ratio:.2f}", f"{cpu_ratio:.2f}"])
    load_end = [round(v, 2) for v in os.getloadavg()]
    markdown = (
        "# The fixed cost per step: `splitkeras demo`'s split over HTTP vs central\n\n"
        f"Digits CNN, batch {BATCH}, {args.epochs} timed epochs (45 steps each) after a warm-up epoch, "
        f"{args.rounds} rounds interleaving the trees; medians. Load average (1, 5, 15 min) at the "
        f"start {info.get('load_average_at_start')}, at the end {load_end}.\n\n"
        + table(["splitkeras from", "central ms/step", "HTTP ms/step", "central CPU ms",
                 "client CPU ms", "server CPU ms", "HTTP / central", "CPU (both) / central"], rows)
        + "\n\nReproduce: `PYTHONPATH=$PWD .venv/bin/python benchmarks/demo_step.py --rounds "
        f"{args.rounds} --epochs {args.epochs}" + "".join(f" --tree {t}" for t in trees) + "`.\n")
    write_results("demo_step", {"machine": info, "load_average_at_end": load_end, "epochs": args.epochs,
                                "trees": summary}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
