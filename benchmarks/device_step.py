"""The device step per client, side by side in ONE run: the Python `DeviceClient`, the
JavaScript runtime in Node (cpu backend), and in headless Chromium (cpu and wasm backends).

Two U-shaped splits, batch 32, each served by one real `splitkeras serve` on 127.0.0.1 that
every client of that split talks to (one session each):

* `digits`: the CNN of `splitkeras demo` (8x8x1 digits; cuts `conv_2`, `dense_1`: the head is
  two 3x3 convolutions, 1->16->32 channels);
* `mobilenet`: a MobileNetV2-style head at 32x32x3 (a 3x3 stem conv + BN + ReLU6 and three
  inverted-residual blocks: 1x1 expand, 3x3 depthwise, 1x1 project, BN, the last with its
  residual add), the middle a strided conv, global pooling and a dense layer, the tail the
  classifier.

A step is `trainStep` (JS) / `train_on_batch` (Python) on one batch: head forward, server
forward, tail step, server backward, head backward (the JS head recomputes its forward under
the gradient tape). Also recorded: the time inside `fetch` / the transport (network + server).

Method: each client opens its session and makes warm-up steps, then `--rounds` rounds; in
each round every client makes `--steps` steps, in an order that rotates every round; the
ratio to the Python client is taken per round (median over its steps) and the median over
rounds is reported. Then one step of each JS client under `tf.profile` (kernel time by kernel).

Chromium: Debian's `/usr/bin/chromium` (headless, --no-sandbox, --disable-gpu, a fresh
--user-data-dir) driven by playwright-core. The page (esbuild bundle of TF.js 4.22, the wasm
backend and the runtime) is served from 127.0.0.1 by `mobile_export/tools/page_server.mjs`,
which also reverse-proxies `/v1` to the split's server: one origin (as a same-origin deployment), so page
and protocol share one origin. The page is cross-origin isolated (COOP/COEP headers), so the
wasm backend may use threads.

Floors: Chromium wasm <= 3x and Node cpu <= 10x the Python client's step time.

To see what the same-origin proxy costs, "Chromium, wasm, no proxy" runs the same page in a
second Chromium started with --disable-web-security (CORS checks off: for this measurement
only), whose runtime calls the server directly.

Usage:
    .venv/bin/python benchmarks/device_step.py [--rounds 5] [--steps 4] [--batch 32] [--quick]
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

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine, median, start_server, stop_server, write_results  # noqa: E402

WORKER = ROOT / "mobile_export" / "tools" / "step_bench_worker.mjs"
JS_CLIENTS = ["node-cpu", "chromium-cpu", "chromium-wasm", "chromium-wasm-direct"]
FLOORS = {"chromium-wasm": 3.0, "node-cpu": 10.0}
LABELS = {"python": "Python DeviceClient (TF CPU)", "node-cpu": "Node, cpu backend",
          "chromium-cpu": "Chromium, cpu backend", "chromium-wasm": "Chromium, wasm backend",
          "chromium-wasm-direct": "Chromium, wasm, no proxy (CORS off)"}


def mobilenet_model(seed: int = 0) -> Any:
    """A MobileNetV2-style head at 32x32x3; cut after `block3_add` (head), `dense` (middle)."""
    import keras
    from keras import layers as L

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)

    def block(x: Any, name: str, expand: int, out: int, stride: int, residual: bool) -> Any:
        y = x
        if expand != 1:
            y = L.Conv2D(int(x.shape[-1]) * expand, 1, use_bias=False, name=f"{name}_expand")(y)
            y = L.BatchNormalization(name=f"{name}_expand_bn")(y)
            y = L.ReLU(6.0, name=f"{name}_expand_relu")(y)
        y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(y)
        y = L.BatchNormalization(name=f"{name}_dw_bn")(y)
        y = L.ReLU(6.0, name=f"{name}_dw_relu")(y)
        y = L.Conv2D(out, 1, use_bias=False, name=f"{name}_project")(y)
        y = L.BatchNormalization(name=f"{name}_project_bn")(y)
        return L.Add(name=f"{name}_add")([x, y]) if residual else y

    x = block(x, "block1", 1, 16, 1, residual=True)
    x = block(x, "block2", 4, 24, 2, residual=False)
    x = block(x, "block3", 4, 24, 1, residual=True)
    x = L.Conv2D(48, 3, strides=2, padding="same", activation="relu", name="mid_conv")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dense(64, activation="relu", name="dense")(x)
    outputs = L.Dense(10, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs, name="mobilenet_style")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def models() -> dict[str, tuple[Any, list[str]]]:
    from splitkeras.demo import CUTS, digits_model

    return {"digits": (digits_model(), list(CUTS)), "mobilenet": (mobilenet_model(), ["block3_add", "dense"])}


class Worker:
    """The JS clients: tools/step_bench_worker.mjs, JSON lines over its stdin/stdout."""

    def __init__(self, log: Path) -> None:
        self.log = open(log, "wb")
        self.process = subprocess.Popen(["node", str(WORKER)], cwd=ROOT / "mobile_export",
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the JS worker exited; see {self.log.name}")
            if line.startswith(b"{"):
                answer = json.loads(line)
                if "error" in answer:
                    raise RuntimeError(f"{command['cmd']} {command.get('client')}: {answer['error']}")
                return answer

    def quit(self) -> None:
        try:
            self.call(cmd="quit")
        finally:
            self.process.wait(timeout=60)
            self.log.close()


class PythonClient:
    def __init__(self, folder: Path, url: str, key: str, x: np.ndarray, y: np.ndarray) -> None:
        import keras

        from splitkeras.client import DeviceClient

        self.device = DeviceClient(folder, url, key=key, wire_dtype="float32")
        self.device.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                            metrics=["accuracy"])
        self.batches = [(x[i], y[i]) for i in range(len(x))]
        self.k = 0

    def steps(self, n: int) -> list[dict[str, float]]:
        out = []
        for _ in range(n):
            bx, by = self.batches[self.k % len(self.batches)]
            self.k += 1
            transport = self.device._transport_seconds()
            started = time.perf_counter()
            logs = self.device.train_on_batch(bx, by)
            ms = (time.perf_counter() - started) * 1000
            out.append({"ms": ms, "transportMs": (self.device._transport_seconds() - transport) * 1000,
                        "loss": float(logs["loss"])})
        return out

    def close(self) -> None:
        self.device.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import splitkeras
    from splitkeras.cli.export import export_app

    work = Path(tempfile.mkdtemp(prefix="splitkeras-device-step-"))
    key = secrets.token_hex(16)
    results: dict[str, Any] = {"machine": machine(), "batch": args.batch, "rounds": args.rounds,
                               "steps_per_round": args.steps, "models": {}}
    servers: list[Any] = []
    worker = Worker(work / "worker.log")
    try:
        for name, (model, cuts) in models().items():
            folder, app = work / name, work / f"{name}_app"
            splitkeras.split(model, at=cuts).save(folder, tfjs=True)
            export_app(folder, app)
            process, url = start_server(folder, key)
            servers.append(process)
            shape = [int(d) for d in model.input_shape[1:]]
            rng = np.random.default_rng(0)
            x = rng.random((2, args.batch, *shape), dtype=np.float32)
            y = rng.integers(0, 10, (2, args.batch)).astype("int64")
            python = PythonClient(folder, url, key, x, y)
            clients: dict[str, Any] = {"python": python}
            info: dict[str, Any] = {}
            for client in args.clients:
                info[client] = worker.call(cmd="open", client=client, model=name, app=str(app), server=url,
                                           key=key, batch=args.batch)["info"]

                def js_steps(n: int, client: str = client, name: str = name) -> list[dict[str, float]]:
                    return worker.call(cmd="steps", client=client, model=name, n=n)["steps"]

                clients[client] = js_steps
            names = list(clients)
            run_steps = {c: (python.steps if c == "python" else clients[c]) for c in names}
            for c in names:  # warm-up (tracing, kernel compilation, first-use allocations)
                run_steps[c](args.warmup)
            per_round: dict[str, list[list[dict[str, float]]]] = {c: [] for c in names}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for c in order:
                    per_round[c].append(run_steps[c](args.steps))
                print(f"  {name} round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{c} {median([s['ms'] for s in per_round[c][-1]]):.0f} ms" for c in names), flush=True)
            profiles = {c: worker.call(cmd="profile", client=c, model=name)["kernels"] for c in args.clients}
            python.close()
            summary: dict[str, Any] = {}
            for c in names:
                steps = [s for round_steps in per_round[c] for s in round_steps]
                step_ms = median([s["ms"] for s in steps])
                transport = median([s["transportMs"] for s in steps])
                ratios = [median([s["ms"] for s in per_round[c][i]])
                          / median([s["ms"] for s in per_round["python"][i]]) for i in range(args.rounds)]
                summary[c] = {"label": LABELS[c], "step_ms": step_ms, "transport_ms": transport,
                              "device_ms": median([s["ms"] - s["transportMs"] for s in steps]),
                              "ratio_to_python": median(ratios), "round_ratios": ratios,
                              "floor": FLOORS.get(c), "info": info.get(c), "profile": profiles.get(c),
                              "steps": steps}
            params = int(model.count_params())
            head = splitkeras.split(model, at=cuts)["head"].model
            results["models"][name] = {"cuts": cuts, "params": params,
                                       "head_layers": [layer.name for layer in head.layers],
                                       "head_output": list(head.output_shape), "clients": summary}
    finally:
        worker.quit()
        for process in servers:
            stop_server(process)
        shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"# Device step time per client (batch {results['batch']})", "",
             f"One run, {results['rounds']} rounds x {results['steps_per_round']} steps per client, the "
             "order rotating every round; median step time, median over rounds of the per-round ratio "
             f"to the Python client. Machine: {m['cpu']}, {m['cores']} cores (shared: compare ratios). "
             "Each split is served by one real `splitkeras serve` on 127.0.0.1 that all its clients use. "
             "The Chromium pages are served from 127.0.0.1 by `mobile_export/tools/page_server.mjs`, "
             "which reverse-proxies `/v1` to that server (one origin, as a same-origin deployment; "
             "`--cors-origin` is measured in cors_preflight.md), "
             "so the browser's requests take one more local hop than Node's and Python's.", ""]
    for name, model in results["models"].items():
        lines += [f"## {name} (head: {', '.join(model['head_layers'][1:])} -> {model['head_output']})", "",
                  "| client | step (ms) | of it in fetch: network + server (ms) | device compute (ms) "
                  "| x Python | floor | met? |", "|---|---|---|---|---|---|---|"]
        for s in model["clients"].values():
            floor = s["floor"]
            met = "" if floor is None else ("**met**" if s["ratio_to_python"] <= floor else "**not met**")
            lines.append(f"| {s['label']} | {s['step_ms']:.0f} | {s['transport_ms']:.0f} | {s['device_ms']:.0f} "
                         f"| {s['ratio_to_python']:.2f} | {'' if floor is None else f'<= {floor:g}x'} | {met} |")
        lines.append("")
        for s in model["clients"].values():
            if s.get("info"):
                info = {k: v for k, v in s["info"].items() if k != "userAgent"}
                lines.append(f"* {s['label']}: `{json.dumps(info)}`")
        lines.append("")
        for s in model["clients"].values():
            if s.get("profile"):
                lines += [f"Kernels of one step, {s['label']} (tf.profile, top by time):", "",
                          "| kernel (input shapes) | ms |", "|---|---|"]
                lines += [f"| `{k['kernel']}` | {k['ms']:.1f} |" for k in s["profile"][:8]]
                lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2))
    for ax, name in zip(np.atleast_1d(axes), names):
        clients = results["models"][name]["clients"]
        labels = [LABELS[c].replace(", ", "\n") for c in clients]
        device = [clients[c]["device_ms"] for c in clients]
        transport = [clients[c]["transport_ms"] for c in clients]
        xs = np.arange(len(labels))
        ax.bar(xs, device, label="device compute")
        ax.bar(xs, transport, bottom=device, label="fetch: network + server")
        for i, c in enumerate(clients):
            ax.text(i, device[i] + transport[i], f"{clients[c]['ratio_to_python']:.1f}x", ha="center",
                    va="bottom", fontsize=9)
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"{name}, batch {results['batch']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per client per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clients", nargs="*", default=JS_CLIENTS, choices=JS_CLIENTS)
    parser.add_argument("--quick", action="store_true", help="2 rounds x 2 steps (smoke test)")
    parser.add_argument("--name", default="device_step", help="results file name")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 2, 1
    if shutil.which("node") is None:
        sys.exit("device_step: node is needed (scripts/setup)")
    results = run(args)
    write_results(args.name, results, markdown(results))
    plot(results, RESULTS / f"{args.name}.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
