"""The paper's Table 1 at a small scale: seconds per image of training for six
`keras.applications` models, no split vs single split vs double split, the split
ones over loopback HTTP through a real `splitkeras serve` (uvicorn) server.

Models (`weights=None`, `classes=10`, compiled with SGD(0.01) and sparse
categorical cross-entropy): ResNet50, DenseNet121, InceptionV3,
InceptionResNetV2, ResNet152, DenseNet201, in that order (the two largest last,
so a time budget drops them first). Input 64x64x3 for the ResNets and DenseNets,
75x75x3 (the smallest they accept) for the Inception ones; batch 8; random data.

Cuts, as the paper (early: after the stem; late: before the classifier head):

* early: after the stem's last pooling: `pool1_pool` (ResNet), `pool1` (DenseNet),
  the second `MaxPooling2D` (InceptionV3, InceptionResNetV2: their stems' layers
  have generated names, so the layer is found by position);
* late: after `avg_pool` (the global average pooling): the device keeps only the
  `predictions` Dense layer.

Levels, each the median of interleaved rounds of one `fit` epoch after a 1-step
warm-up of each (the server traces in it too):

* no split: the central `model.fit`;
* single split: head (the stem) on the device (`DeviceClient`), the rest and the
  labels on the server, one `train` request per step;
* double split (U-shaped): stem and classifier on the device, the middle on the
  server, `forward` and `backward` requests per step.

What is reported per image (medians of rounds):

* total wall seconds, and its ratio to no split (median of the per-round ratios);
* device compute: `ClientStats.device_seconds` (the client's own segments);
* server + communication: `ClientStats.transport_seconds` (wall time inside HTTP
  requests: the server's compute, HTTP, the wire format);
* of that, communication is ESTIMATED from a loopback probe on the same server
  (one-way latency from GET /healthz, bandwidth from a retried, cached forward
  that moves bytes and computes nothing): requests x 2 x latency + bytes /
  bandwidth; server compute = transport - that estimate;
* server CPU seconds (all its threads, from /proc) per image, for reference;
* bytes per image each way (HTTP bodies, float32 safetensors).

Device and server are the same 2-core machine (they take turns: the step is
sequential). The figures compare the split itself (software, HTTP, wire), not a
phone against a GPU server as the paper does.

Run: `.venv/bin/python benchmarks/table1.py [--rounds 2] [--steps 3] [--budget-min 11]`
"""

from __future__ import annotations

import argparse
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

import numpy as np
from _common import ROOT, free_port, machine, median, process_cpu_seconds, stop_server, table, write_results

BATCH = 8
CLASSES = 10
# (name, keras.applications attribute, input side, early cut or None to find by position)
MODELS = [
    ("ResNet50", "ResNet50", 64, "pool1_pool"),
    ("DenseNet121", "DenseNet121", 64, "pool1"),
    ("InceptionV3", "InceptionV3", 75, None),
    ("InceptionResNetV2", "InceptionResNetV2", 75, None),
    ("ResNet152", "ResNet152", 64, "pool1_pool"),
    ("DenseNet201", "DenseNet201", 64, "pool1"),
]
LATE_CUT = "avg_pool"
LEVELS = ["no split", "single split", "double split"]


def build(attribute: str, side: int, seed: int = 0) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, attribute)(
        weights=None, input_shape=(side, side, 3), classes=CLASSES)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    return model


def stem_cut(model: Any) -> str:
    """The second MaxPooling2D of the model (the end of the Inception stems)."""
    import keras

    pools = [layer.name for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    return pools[1]


def launch(folder: Path, key: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ, SPLITKERAS_SERVER_KEY=key, TF_CPP_MIN_LOG_LEVEL="3")
    log = open(folder / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "splitkeras.cli", "serve", str(folder), "--port", str(port),
         "--checkpoint-every", "1000000"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(servers: list[tuple[subprocess.Popen[bytes], str, Path]], timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending and time.monotonic() < deadline:
        for item in list(pending):
            process, url, folder = item
            if process.poll() is not None:
                raise RuntimeError(f"server exited ({process.returncode}); see "
                                   f"{(folder / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    pending.remove(item)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    if pending:
        raise RuntimeError("servers not ready in time")


def per_step(fit: Any, x: np.ndarray, y: np.ndarray) -> float:
    started = time.perf_counter()
    fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return (time.perf_counter() - started) / (len(x) // BATCH)


def measure_model(label: str, attribute: str, side: int, early: str | None, args: Any,
                  loopback_probe: Any) -> dict[str, Any]:
    import keras

    import splitkeras
    from splitkeras.client import DeviceClient

    keras.backend.clear_session()
    t0 = time.perf_counter()
    model = build(attribute, side)
    early = early or stem_cut(model)
    early_shape = list(model.get_layer(early).output.shape[1:])
    late_shape = list(model.get_layer(LATE_CUT).output.shape[1:])
    rng = np.random.default_rng(0)
    x = rng.random((args.steps * BATCH, side, side, 3), dtype=np.float32)
    y = rng.integers(0, CLASSES, len(x)).astype("int64")
    folders = {name: Path(tempfile.mkdtemp(prefix=f"splitkeras-table1-{name[:6]}-"))
               for name in ("single split", "double split")}
    servers: dict[str, tuple[Any, str]] = {}
    clients: dict[str, Any] = {}
    try:
        splitkeras.split(model, at=[early]).save(folders["single split"], tfjs=False)
        splitkeras.split(model, at=[early, LATE_CUT]).save(folders["double split"], tfjs=False)
        key = secrets.token_hex(16)
        for name, folder in folders.items():
            servers[name] = launch(folder, key)
        wait_ready([(p, u, folders[n]) for n, (p, u) in servers.items()])
        setup_s = time.perf_counter() - t0
        for name, (_, url) in servers.items():
            client = DeviceClient(folders[name], url, key=key, wire_dtype="float32")
            client.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
            clients[name] = client
        fits = {"no split": model.fit, **{n: c.fit for n, c in clients.items()}}
        t1 = time.perf_counter()
        for fit in fits.values():  # warm-up: traces device, central and server steps
            per_step(fit, x[:BATCH], y[:BATCH])
        warmup_s = time.perf_counter() - t1
        times: dict[str, list[float]] = {n: [] for n in fits}
        parts: dict[str, dict[str, list[float]]] = {
            n: {"device_s": [], "transport_s": [], "server_cpu_s": [], "sent_B": [],
                "received_B": []} for n in clients}
        for _ in range(args.rounds):
            for name, fit in fits.items():
                client = clients.get(name)
                before = client.stats if client else None
                cpu_before = process_cpu_seconds(servers[name][0].pid) if client else 0.0
                times[name].append(per_step(fit, x, y) / BATCH)
                if client:
                    after = client.stats
                    samples = after.samples - before.samples
                    p = parts[name]
                    p["device_s"].append((after.device_seconds - before.device_seconds) / samples)
                    p["transport_s"].append(
                        (after.transport_seconds - before.transport_seconds) / samples)
                    p["server_cpu_s"].append(
                        (process_cpu_seconds(servers[name][0].pid) - cpu_before) / samples)
                    p["sent_B"].append((after.bytes_sent - before.bytes_sent) / samples)
                    p["received_B"].append((after.bytes_received - before.bytes_received) / samples)
        for client in clients.values():
            client.close()
        clients.clear()
        loopback = loopback_probe(servers["double split"][1], key, folders["double split"])
    finally:
        for client in clients.values():
            client.close()
        for process, _ in servers.values():
            stop_server(process)
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    ratios = {n: median([t / c for t, c in zip(times[n], times["no split"])]) for n in times}
    levels: dict[str, Any] = {}
    for name in fits:
        row: dict[str, Any] = {"s_per_image": median(times[name]), "rounds": times[name],
                               "ratio_to_no_split": ratios[name]}
        if name in parts:
            row.update({k: median(v) for k, v in parts[name].items()})
            requests = 1 if name == "single split" else 2
            comm = (requests * 2 * loopback["latency_s"]
                    + (row["sent_B"] + row["received_B"]) * BATCH * 8 / loopback["bandwidth_bps"]
                    ) / BATCH
            row["communication_s_estimated"] = comm
            row["server_compute_s_estimated"] = row["transport_s"] - comm
        levels[name] = row
    result = {"model": label, "input": [side, side, 3], "parameters": model.count_params(),
              "cuts": {"single split": [early], "double split": [early, LATE_CUT]},
              "cut_shapes": {early: early_shape, LATE_CUT: late_shape},
              "levels": levels, "loopback": loopback, "setup_s": setup_s, "warmup_s": warmup_s,
              "wall_s": time.perf_counter() - t0}
    print(f"{label}: " + ", ".join(f"{n} {1e3 * levels[n]['s_per_image']:.1f} ms/img "
                                   f"({levels[n]['ratio_to_no_split']:.2f}x)" for n in levels)
          + f"; setup {setup_s:.0f} s, warm-up {warmup_s:.0f} s, total {result['wall_s']:.0f} s",
          flush=True)
    del model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed fit epoch")
    parser.add_argument("--budget-min", type=float, default=11.0,
                        help="skip the remaining models when the next one would likely pass this")
    parser.add_argument("--only", nargs="*", help="model names to run")
    args = parser.parse_args()

    from http_overhead import measure_loopback

    started = time.perf_counter()
    results, skipped = [], []
    longest = 0.0
    for label, attribute, side, early in MODELS:
        if args.only and label not in args.only:
            continue
        elapsed = time.perf_counter() - started
        # the large models take ~1.5-2x a small one: skip when it would likely overrun
        if elapsed + 1.8 * longest > args.budget_min * 60:
            skipped.append(label)
            print(f"{label}: skipped (budget: {elapsed:.0f} s used)", flush=True)
            continue
        results.append(measure_model(label, attribute, side, early, args, measure_loopback))
        longest = max(longest, results[-1]["wall_s"])
    total = time.perf_counter() - started
    command = ".venv/bin/python benchmarks/table1.py " + " ".join(sys.argv[1:])
    data = {"benchmark": "table1", "command": command.strip(), "batch": BATCH, "classes": CLASSES,
            "rounds": args.rounds, "steps_per_round": args.steps, "wire_dtype": "float32",
            "machine": machine(), "results": results, "skipped_for_time": skipped,
            "total_wall_s": total}

    def ms(v: float) -> str:
        return f"{1e3 * v:.1f}"

    main_rows, part_rows = [], []
    for r in results:
        lv = r["levels"]
        main_rows.append([
            r["model"], "x".join(map(str, r["input"][:2])), f"{r['parameters'] / 1e6:.1f}M",
            ms(lv["no split"]["s_per_image"]),
            ms(lv["single split"]["s_per_image"]), f"{lv['single split']['ratio_to_no_split']:.2f}",
            ms(lv["double split"]["s_per_image"]), f"{lv['double split']['ratio_to_no_split']:.2f}"])
        for name in ("single split", "double split"):
            p = lv[name]
            part_rows.append([
                r["model"], name, ", ".join(f"`{c}`" for c in r["cuts"][name]),
                ms(p["s_per_image"]), ms(p["device_s"]), ms(p["transport_s"]),
                ms(p["server_compute_s_estimated"]), ms(p["communication_s_estimated"]),
                ms(p["s_per_image"] - p["device_s"] - p["transport_s"]),
                ms(p["server_cpu_s"]), f"{p['sent_B'] / 1e3:.1f}", f"{p['received_B'] / 1e3:.1f}"])
    markdown = "\n".join([
        "# Table 1 at a small scale: seconds per image, no split vs single vs double split", "",
        f"`{command.strip()}` ({total / 60:.1f} min). `keras.applications` models, `weights=None`, "
        f"{CLASSES} classes, batch {BATCH}, random data, SGD; split levels over loopback HTTP "
        "through a real `splitkeras serve` server (float32 wire), device segments in "
        "`DeviceClient`. Medians of "
        f"{args.rounds} interleaved rounds of one {args.steps}-step `fit` epoch each, after a "
        "1-step warm-up; ratios are medians of the per-round ratios to no split. Device and "
        "server share this 2-core machine (see the machine block in the JSON).", "",
        table(["model", "input", "params", "no split ms/img", "single ms/img", "single / no split",
               "double ms/img", "double / no split"], main_rows), "",
        "## Where a split step's time goes (ms per image; KB per image)", "",
        "device = `ClientStats.device_seconds`; transport = `ClientStats.transport_seconds` "
        "(server compute + HTTP + wire); comm. (est.) = requests x 2 x loopback latency + "
        "bytes / loopback bandwidth, from a probe of the same server; server (est.) = "
        "transport - comm. (est.); fit loop, rest = total - device - transport (the per-epoch "
        "iterator and callbacks of `DeviceClient.fit`, the Python between segments); server "
        "CPU = the server process's CPU seconds (all threads).",
        "",
        table(["model", "level", "cuts", "total", "device", "transport", "server (est.)",
               "comm. (est.)", "fit loop, rest", "server CPU", "KB sent", "KB received"],
              part_rows), "",
        ("Skipped for time: " + ", ".join(skipped)) if skipped else "No model skipped.",
    ])
    paths = write_results("table1", data, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
