"""The paper's Figure 4b at a small scale: InceptionResNetV2, time per image and
communication time against the split location among the stem's first layers
(the paper's Table 2), under emulated networks, measured and as
`splitkeras.planning` predicts it.

InceptionResNetV2 (`keras.applications`, `weights=None`, 10 classes) at 75x75x3
(the smallest input it accepts), batch 8, random data, SGD. Double split
(U-shaped, as all of the paper's Figure 4): the first cut after stem layer L
(L = 1..7 of the paper's Table 2: conv, conv, conv, maxpool, conv, conv, maxpool;
a conv's cut is after its BatchNormalization + ReLU, which Keras builds with each
conv), the second cut after `avg_pool` (the device keeps the classifier).

For each measured location the split is saved and served by a real `splitkeras
serve` subprocess on 127.0.0.1 (all servers are started at once, then measured
one after the other); `DeviceClient.train_on_batch` steps are timed with no
emulation (loopback) and through `NetworkConditions` (the transport sleeps
latency + bytes / bandwidth each way of each request):

* Wi-Fi: 50 Mbit/s, 5 ms one way; 4G: 10 Mbit/s, 50 ms; 3G: 1 Mbit/s, 150 ms.

A (location, network) pair whose predicted step passes `--max-step-s` is only
predicted, not measured (the 3G rows of the big early cuts would take ~25-40 s
per step).

Measured communication per image = transport seconds under the emulated link -
transport seconds on loopback (the latter is the server's compute plus ~1 ms of
loopback HTTP). Predicted: `plan_pair(first, avg_pool)` with device and server at
the FLOP/s this machine trains the model at (3 x forward FLOPs / the no-split
time per image: from `results/table1.json` when it has InceptionResNetV2 at this
size, else measured here), the link at the emulated figures plus the loopback
probe's latency. Device and server are the same machine, so the locations differ
in what crosses the link (and the small device/server compute shift), not in a
slow phone's compute.

Run: `.venv/bin/python benchmarks/figure4b.py [--locations 1 3 4 7] [--steps 2]`
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _common import RESULTS, machine, median, stop_server, table, write_results
from table1 import BATCH, CLASSES, LATE_CUT, build, launch, wait_ready

SIDE = 75
NETWORKS = [("Wi-Fi", 50e6, 0.005), ("4G", 10e6, 0.050), ("3G", 1e6, 0.150)]
PAPER_LAYERS = ["1) conv", "2) conv", "3) conv", "4) maxpool", "5) conv", "6) conv", "7) maxpool"]


def stem_layers(model: Any) -> list[str]:
    """The layer to cut after for each of the paper's 7 stem layers."""
    import keras

    acts = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Activation)][:5]
    pools = [layer.name for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)][:2]
    return [acts[0], acts[1], acts[2], pools[0], acts[3], acts[4], pools[1]]


def candidates_for(model: Any, names: list[str]) -> dict[str, Any]:
    """`splitkeras.profile.cut_candidates` restricted to `names` (the full list is one
    plan per layer: slow for InceptionResNetV2's ~780 layers); same arithmetic."""
    from splitkeras.graph import ModelGraph, as_functional, plan_segments
    from splitkeras.profile import CutCandidate, node_flops

    functional = as_functional(model)
    graph = ModelGraph.of(functional)
    flops = {id(n): node_flops(n) for n in graph.layer_nodes}
    params = {id(layer): int(layer.count_params()) for layer in functional.layers}
    total_params, total_flops = sum(params.values()), sum(flops.values())
    out = {}
    for name in names:
        layer = functional.get_layer(name)
        _, plans = plan_segments(functional, [name])
        head = plans[0]
        head_layers = {id(n.operation) for n in head.nodes}
        head_params = sum(params[k] for k in head_layers)
        head_flops = sum(flops[id(n)] for n in head.nodes)
        specs = [graph.spec(t) for t in plans[1].inputs]
        out[name] = CutCandidate(
            layer=name, class_name=type(layer).__name__,
            output_shapes=[list(layer.output.shape)], crossing=[s.name for s in specs],
            bytes_per_sample=4 * sum(s.sample_size or 0 for s in specs),
            head_parameters=head_params, tail_parameters=total_params - head_params,
            head_flops=head_flops, tail_flops=total_flops - head_flops)
    return out


def steps_per_image(client: Any, x: np.ndarray, y: np.ndarray, steps: int) -> dict[str, float]:
    before = client.stats
    started = time.perf_counter()
    for i in range(steps):
        j = (i % (len(x) // BATCH)) * BATCH
        client.train_on_batch(x[j:j + BATCH], y[j:j + BATCH])
    wall = time.perf_counter() - started
    after = client.stats
    n = after.samples - before.samples
    return {"s_per_image": wall / n,
            "transport_s": (after.transport_seconds - before.transport_seconds) / n,
            "device_s": (after.device_seconds - before.device_seconds) / n,
            "bytes_per_image": (after.bytes_sent - before.bytes_sent
                                + after.bytes_received - before.bytes_received) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locations", type=int, nargs="*", default=[1, 3, 4, 7],
                        help="the paper's stem layers (1-7) to measure at; all 7 are predicted")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per (location, link)")
    parser.add_argument("--max-step-s", type=float, default=15.0,
                        help="measure a (location, link) only if its predicted step is shorter")
    parser.add_argument("--compress", metavar="SPEC", default=None,
                        help="codecs per direction (splitkeras.codecs), measured and predicted; results "
                        "go to figure4b_<SPEC>.{json,md,png}")
    args = parser.parse_args()
    spec = args.compress or "float32"
    suffix = "" if args.compress is None else "_" + "".join(c if c.isalnum() else "_" for c in spec)

    import keras
    from http_overhead import measure_loopback

    import splitkeras
    from splitkeras.client import DeviceClient, NetworkConditions
    from splitkeras.planning import Conditions, plan_pair

    started = time.perf_counter()
    keras.backend.clear_session()
    model = build("InceptionResNetV2", SIDE)
    layers = stem_layers(model)
    candidates = candidates_for(model, [*layers, LATE_CUT])
    late = candidates[LATE_CUT]
    total_flops = late.head_flops + late.tail_flops

    # calibration: the no-split time per image
    calibration: dict[str, Any] = {}
    table1_path = RESULTS / "table1.json"
    if table1_path.exists():
        for r in json.loads(table1_path.read_text()).get("results", []):
            if r["model"] == "InceptionResNetV2" and r["input"][0] == SIDE:
                calibration = {"source": "results/table1.json (no split, same model, input, batch)",
                               "s_per_image": r["levels"]["no split"]["s_per_image"]}
    rng = np.random.default_rng(0)
    x = rng.random((4 * BATCH, SIDE, SIDE, 3), dtype=np.float32)
    y = rng.integers(0, CLASSES, len(x)).astype("int64")
    if not calibration:
        model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)
        t = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False)
        calibration = {"source": "measured here (central model.fit, 4 steps)",
                       "s_per_image": (time.perf_counter() - t) / len(x)}
    speed = 3 * total_flops / calibration["s_per_image"]
    calibration["training_flops_per_s"] = speed
    print(f"calibrated {speed / 1e9:.1f} GFLOP/s ({calibration['source']})", flush=True)

    measured_names = [layers[i - 1] for i in args.locations]
    folders = {name: Path(tempfile.mkdtemp(prefix="splitkeras-fig4b-")) for name in measured_names}
    servers: dict[str, Any] = {}
    key = secrets.token_hex(16)
    measured: dict[tuple[str, str], dict[str, float]] = {}
    loopback: dict[str, Any] = {}
    try:
        for name in measured_names:
            splitkeras.split(model, at=[name, LATE_CUT]).save(folders[name], tfjs=False)
        for name in measured_names:
            servers[name] = launch(folders[name], key)
        wait_ready([(p, u, folders[n]) for n, (p, u) in servers.items()])
        print(f"servers ready after {time.perf_counter() - started:.0f} s", flush=True)
        for name in measured_names:
            url = servers[name][1]
            if not loopback:
                loopback = measure_loopback(url, key, folders[name])
            client = DeviceClient(folders[name], url, key=key, compress=spec)
            client.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
            client.train_on_batch(x[:BATCH], y[:BATCH])  # warm-up: traces device and server
            measured[(name, "loopback")] = steps_per_image(client, x, y, args.steps)
            for label, bandwidth, latency in NETWORKS:
                conditions = Conditions(bandwidth_bps=bandwidth, latency_s=latency,
                                        device_flops=speed, server_flops=speed, batch_size=BATCH,
                                        wire_dtype=spec)
                plan = plan_pair(candidates[name], late, conditions)
                if plan.total_seconds * BATCH > args.max_step_s:
                    continue
                client.transport.network = NetworkConditions(latency_s=latency,
                                                             bandwidth_bps=bandwidth)
                measured[(name, label)] = steps_per_image(client, x, y, args.steps)
                client.transport.network = None
            client.close()
            stop_server(servers.pop(name)[0])
            print(f"{name}: " + ", ".join(f"{n} {1e3 * m['s_per_image']:.0f} ms/img"
                                          for (c, n), m in measured.items() if c == name),
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        for process, _ in servers.values():
            stop_server(process)
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    for index, name in enumerate(layers):
        cut = candidates[name]
        for label, bandwidth, latency in [("loopback", loopback.get("bandwidth_bps", 4e9), 0.0),
                                          *NETWORKS]:
            conditions = Conditions(
                bandwidth_bps=1 / (1 / bandwidth + 1 / loopback.get("bandwidth_bps", 4e9))
                if label != "loopback" else bandwidth,
                latency_s=latency + loopback.get("latency_s", 0.0),
                device_flops=speed, server_flops=speed, batch_size=BATCH, wire_dtype=spec)
            plan = plan_pair(cut, late, conditions)
            m = measured.get((name, label))
            base = measured.get((name, "loopback"))
            rows.append({
                "paper_layer": PAPER_LAYERS[index], "cut": name,
                "shape": list(cut.output_shapes[0][1:]), "network": label,
                "bytes_per_image_predicted": plan.wire_bytes_per_sample,
                "predicted_s_per_image": plan.total_seconds,
                "predicted_comm_s_per_image": plan.transfer_seconds + plan.latency_seconds,
                "predicted_compute_s_per_image": plan.device_seconds + plan.server_seconds,
                "measured": m,
                "measured_comm_s_per_image": (m["transport_s"] - base["transport_s"])
                if m and base and label != "loopback" else None})
    with_both = [r for r in rows if r["measured"] and r["network"] != "loopback"]
    ratios = [r["measured"]["s_per_image"] / r["predicted_s_per_image"] for r in with_both]
    comm_ratios = [r["measured_comm_s_per_image"] / r["predicted_comm_s_per_image"]
                   for r in with_both]
    command = (".venv/bin/python benchmarks/figure4b.py " + " ".join(sys.argv[1:])).strip()
    total = time.perf_counter() - started
    data = {"benchmark": "figure4b", "command": command, "model": "InceptionResNetV2",
            "input": [SIDE, SIDE, 3], "batch": BATCH, "second_cut": LATE_CUT,
            "networks": [{"name": n, "bandwidth_bps": b, "latency_s": lat} for n, b, lat in NETWORKS],
            "calibration": calibration, "loopback": loopback, "forward_flops_per_image": total_flops,
            "machine": machine(), "rows": rows, "total_wall_s": total,
            "measured_over_predicted_total": {"median": median(ratios) if ratios else None,
                                              "min": min(ratios, default=None),
                                              "max": max(ratios, default=None)},
            "measured_over_predicted_comm": {"median": median(comm_ratios) if comm_ratios else None,
                                             "min": min(comm_ratios, default=None),
                                             "max": max(comm_ratios, default=None)}}

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1e3 * v:.0f}"

    table_rows = []
    for r in rows:
        m = r["measured"]
        table_rows.append([
            r["paper_layer"], f"`{r['cut']}`", "x".join(map(str, r["shape"])), r["network"],
            f"{r['bytes_per_image_predicted'] / 1e3:.0f}",
            f"{m['bytes_per_image'] / 1e3:.0f}" if m else "-",
            ms(r["predicted_s_per_image"]), ms(m["s_per_image"] if m else None),
            f"{m['s_per_image'] / r['predicted_s_per_image']:.2f}" if m else "-",
            ms(r["predicted_comm_s_per_image"]), ms(r["measured_comm_s_per_image"])])
    summary = (f"measured / predicted time per image over the {len(with_both)} emulated rows "
               f"measured: median {median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); "
               f"communication: median {median(comm_ratios):.2f} (range {min(comm_ratios):.2f}-"
               f"{max(comm_ratios):.2f})") if ratios else "nothing measured"
    markdown = "\n".join([
        "# Figure 4b at a small scale: InceptionResNetV2, time vs split location"
        + ("" if args.compress is None else f", codecs `{spec}`"), "",
        f"`{command}` ({total / 60:.1f} min). InceptionResNetV2, `weights=None`, {SIDE}x{SIDE}x3, "
        f"batch {BATCH}, U-shaped: first cut after the paper's stem layer, second after "
        f"`{LATE_CUT}`; real server on 127.0.0.1, `DeviceClient.train_on_batch` ({args.steps} "
        "timed steps per row after a warm-up), emulated links via `NetworkConditions`. "
        f"Predicted: `splitkeras.planning.plan_pair`, both sides at {speed / 1e9:.1f} GFLOP/s "
        f"(calibration: {calibration['source']}), link = emulated + loopback probe "
        f"({1e3 * loopback.get('latency_s', 0):.2f} ms, "
        f"{loopback.get('bandwidth_bps', 0) / 1e9:.1f} Gbit/s). '-': predicted only (not a "
        f"measured location, or a predicted step over {args.max_step_s:g} s).", "",
        table(["paper layer", "cut after", "shape", "network", "KB/img predicted",
               "KB/img wire", "predicted ms/img", "measured ms/img", "measured / predicted",
               "predicted comm. ms/img", "measured comm. ms/img"], table_rows), "",
        summary + ".", "",
        "Measured comm. = transport time under the emulated link - transport time on "
        "loopback (same location, same client).", "",
        "![predicted vs measured](figure4b.png)",
    ])
    write_results("figure4b" + suffix, {**data, "compress": spec}, markdown.replace(
        "(figure4b.png)", f"(figure4b{suffix}.png)"))
    plot(rows, RESULTS / f"figure4b{suffix}.png")
    print(markdown)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = [n for n, _, _ in NETWORKS]
    fig, axes = plt.subplots(1, len(networks), figsize=(5 * len(networks), 4), sharey=True)
    for ax, network in zip(axes, networks):
        rs = [r for r in rows if r["network"] == network]
        xs = np.arange(len(rs))
        ax.plot(xs, [r["predicted_s_per_image"] for r in rs], "o-", label="predicted total")
        ax.plot(xs, [r["predicted_comm_s_per_image"] for r in rs], "s--", label="predicted comm.")
        mx = [i for i, r in enumerate(rs) if r["measured"]]
        ax.plot(mx, [rs[i]["measured"]["s_per_image"] for i in mx], "o", ms=10, mfc="none",
                mew=2, label="measured total")
        ax.plot(mx, [rs[i]["measured_comm_s_per_image"] for i in mx], "s", ms=10, mfc="none",
                mew=2, label="measured comm.")
        ax.set_xticks(xs, [r["paper_layer"] for r in rs], rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{network} ({dict((n, (b, lat)) for n, b, lat in NETWORKS)[network][0] / 1e6:g} "
                     f"Mbit/s, {1e3 * dict((n, (b, lat)) for n, b, lat in NETWORKS)[network][1]:g} ms)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("seconds per image")
    axes[0].legend(fontsize=8)
    fig.suptitle("InceptionResNetV2 75x75, batch 8, U-shaped: time vs first cut")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
