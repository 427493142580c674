"""HTTP overhead: a U-shaped (double-split) training step over loopback HTTP against
the central `model.fit` step of the same model.

A compute-heavy CNN (32x32x3 input, ~1.3M parameters, batch 32) is cut after the
first pooling (head: one conv block on the device) and after the first dense layer
(tail: the classifier on the device); the middle runs on a real `splitkeras serve`
subprocess on 127.0.0.1 and the Python `DeviceClient` trains the device segments.
Three levels train from the same weights on the same batches, interleaved round by
round (round 0 is warm-up), each figure the median over rounds of seconds per step
of one `fit` epoch:

* central: `model.fit` (jit_compile "auto", as Keras);
* in-process split: `Split.fit` (the same step semantics, no HTTP);
* HTTP: `DeviceClient.fit` against the server (float32 on the wire).

The device and the server share the machine's cores, as they take turns (the
step is sequential), so the overhead measured is HTTP + wire + the split itself.

Then `splitkeras.planning` predicts the split's time per sample: both sides at the
FLOP/s the central step shows, the link at the loopback figures measured here; and
again under emulated links (`NetworkConditions`), measured vs predicted.

Floor: HTTP step / central step <= 1.10.

`--model resnet50`: `keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3),
classes=10)` (random weights, nothing downloaded), cut after `pool1_pool` (the device's
head: the stem convolution and its pool) and after `avg_pool` (the tail: the classifier);
floor 1.05; results in `results/http_overhead_resnet50.*`.

Run: `.venv/bin/python benchmarks/http_overhead.py [--rounds 4] [--steps 12]
[--model cnn|resnet50] [--no-links]`
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

import numpy as np
from _common import machine, median, process_cpu_seconds, start_server, stop_server, table, verdict, write_results

BATCH = 32
CUTS = ["pool_1", "dense_1"]
FLOOR = 1.10
RESNET_CUTS = ["pool1_pool", "avg_pool"]
RESNET_FLOOR = 1.05
# (label, one-way latency s, bandwidth bit/s)
LINKS = [("100 Mbit/s, 5 ms", 0.005, 100e6), ("20 Mbit/s, 25 ms", 0.025, 20e6)]


def build_model(seed: int = 0, width: int = 1) -> Any:
    """`width` multiplies the channels of the server's convolutions (FLOPs grow ~width^2)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name="image")
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_1")(inputs)
    x = layers.MaxPooling2D(name="pool_1")(x)  # 16x16x32: 32 KiB per sample to the server
    x = layers.Conv2D(64 * width, 3, padding="same", activation="relu", name="conv_2")(x)
    x = layers.Conv2D(64 * width, 3, padding="same", activation="relu", name="conv_3")(x)
    x = layers.MaxPooling2D(name="pool_2")(x)
    x = layers.Conv2D(128 * width, 3, padding="same", activation="relu", name="conv_4")(x)
    x = layers.Conv2D(128 * width, 3, padding="same", activation="relu", name="conv_5")(x)
    x = layers.MaxPooling2D(name="pool_3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(512, activation="relu", name="dense_1")(x)  # 2 KiB per sample back
    outputs = layers.Dense(10, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs, name="overhead_cnn")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def build_resnet50(seed: int = 0) -> Any:
    """ResNet50 at 64x64x3, 10 classes, random weights."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def fresh_copy(model: Any) -> Any:
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    return copy


def seconds_per_step(fit: Any, x: np.ndarray, y: np.ndarray) -> float:
    started = time.perf_counter()
    fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return (time.perf_counter() - started) / (len(x) // BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds (+1 warm-up)")
    parser.add_argument("--steps", type=int, default=12, help="steps per fit epoch")
    parser.add_argument("--link-steps", type=int, default=8, help="steps per emulated-link epoch")
    parser.add_argument("--no-links", action="store_true", help="skip the emulated links")
    parser.add_argument("--model", choices=["cnn", "resnet50"], default="cnn")
    parser.add_argument("--width", type=int, default=1,
                        help="channel multiplier of the server's convolutions (2: ~4x FLOPs)")
    args = parser.parse_args()

    import splitkeras
    from splitkeras.client import DeviceClient, NetworkConditions
    from splitkeras.planning import Conditions, plan_pair
    from splitkeras.profile import cut_candidates

    folder = Path(tempfile.mkdtemp(prefix="splitkeras-overhead-"))
    try:
        resnet = args.model == "resnet50"
        model = build_resnet50() if resnet else build_model(width=args.width)
        cuts, floor = (RESNET_CUTS, RESNET_FLOOR) if resnet else (CUTS, FLOOR)
        sample_shape = tuple(model.inputs[0].shape[1:])
        central = fresh_copy(model)
        in_process = splitkeras.split(fresh_copy(model), at=cuts)
        in_process.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                           metrics=["accuracy"])
        http_split = splitkeras.split(model, at=cuts)
        http_split.save(folder, tfjs=False)
        rng = np.random.default_rng(0)
        x = rng.random((args.steps * BATCH, *sample_shape), dtype=np.float32)
        y = rng.integers(0, 10, len(x)).astype("int64")
        candidates = {c.layer: c for c in cut_candidates(model)}
        total_flops = candidates[cuts[0]].head_flops + candidates[cuts[0]].tail_flops
        print(f"model: {model.count_params():,} params, {total_flops / 1e6:.0f} MFLOP forward per "
              f"sample; cuts {cuts}", flush=True)

        key = secrets.token_hex(16)
        process, url = start_server(folder, key)
        try:
            device = DeviceClient(folder, url, key=key, wire_dtype="float32")
            device.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                           metrics=["accuracy"])
            levels = {"central model.fit": central.fit, "in-process Split.fit": in_process.fit,
                      "DeviceClient.fit over HTTP": device.fit}
            middle_steps = middle_levels(folder, url, key, http_split["middle"])
            times: dict[str, list[float]] = {name: [] for name in [*levels, *middle_steps]}
            cpu: dict[str, list[float]] = {name: [] for name in [*levels, *middle_steps]}
            parts: dict[str, list[float]] = {"device segments": [], "transport": []}

            def cpu_now() -> float:  # both processes: the device side here and the server
                return process_cpu_seconds(os.getpid()) + process_cpu_seconds(process.pid)

            for round_index in range(args.rounds + 1):
                this_round: dict[str, float] = {}
                for name, fit in list(levels.items()):
                    before, cpu_before = device.stats, cpu_now()
                    try:
                        this_round[name] = seconds_per_step(fit, x, y)
                    except Exception as error:  # the in-process level is optional
                        if name != "in-process Split.fit":
                            raise
                        print(f"{name} failed, dropped: {type(error).__name__}: {error}")
                        del levels[name], times[name], cpu[name]
                        continue
                    if round_index:
                        cpu[name].append((cpu_now() - cpu_before) / args.steps)
                    if name.startswith("DeviceClient") and round_index:
                        after = device.stats
                        steps = after.steps - before.steps
                        parts["device segments"].append(
                            (after.device_seconds - before.device_seconds) / steps)
                        parts["transport"].append(
                            (after.transport_seconds - before.transport_seconds) / steps)
                for name, one_step in middle_steps.items():
                    cpu_before, started = cpu_now(), time.perf_counter()
                    for _ in range(args.steps):
                        one_step()
                    this_round[name] = (time.perf_counter() - started) / args.steps
                    if round_index:
                        cpu[name].append((cpu_now() - cpu_before) / args.steps)
                if round_index:
                    for name, seconds in this_round.items():
                        times[name].append(seconds)
                print(f"round {round_index}{' (warm-up)' if not round_index else ''}: " + ", ".join(
                    f"{n} {1e3 * s:.1f} ms" for n, s in this_round.items()), flush=True)
            stats = device.stats.as_dict()
            bytes_per_step = (stats["bytes_sent"] + stats["bytes_received"]) / max(stats["steps"], 1)
            device.close()

            # loopback link figures: a retried forward moves the same bytes and computes nothing
            loopback = measure_loopback(url, key, folder)
            link_rows = [] if args.no_links else measure_links(
                folder, url, key, x[: args.link_steps * BATCH], y[: args.link_steps * BATCH],
                DeviceClient, NetworkConditions)
        finally:
            stop_server(process)

        medians = {name: median(values) for name, values in times.items()}
        central_step = medians["central model.fit"]
        # The machine's load drifts between rounds: the floor uses the ratio within each round.
        round_ratios = {n: [v / c for v, c in zip(times[n], times["central model.fit"])] for n in times}
        ratio = median(round_ratios["DeviceClient.fit over HTTP"])
        cpu_medians = {n: median(v) for n, v in cpu.items()}
        cpu_ratio = cpu_medians["DeviceClient.fit over HTTP"] / cpu_medians["central model.fit"]
        part = {n: median(v) for n, v in parts.items()}
        server_compute = medians["server segment in-process (fwd+bwd)"]
        http_middle = medians["server segment over raw HTTP (fwd+bwd)"]
        http_step = medians["DeviceClient.fit over HTTP"]
        decomposition = [
            ("device segments (head fwd, tail train step, head bwd; ClientStats.device_seconds)",
             part["device segments"]),
            ("server segment compute (its SegmentRunner in-process)", server_compute),
            ("HTTP + wire + service for the 2 requests (raw HTTP - in-process, server segment)",
             http_middle - server_compute),
            ("rest of transport (client encode/decode, retries logic; transport - raw HTTP)",
             part["transport"] - http_middle),
            ("fit loop and the rest (step - device - transport)",
             http_step - part["device segments"] - part["transport"]),
        ]
        speed = 3 * total_flops * BATCH / central_step  # FLOP/s this machine trains at
        first, second = candidates[cuts[0]], candidates[cuts[1]]

        def predict(latency_s: float, bandwidth_bps: float) -> float:
            conditions = Conditions(bandwidth_bps=bandwidth_bps, latency_s=latency_s,
                                    device_flops=speed, server_flops=speed, batch_size=BATCH)
            return plan_pair(first, second, conditions).total_seconds * BATCH  # per step

        predicted_loopback = predict(loopback["latency_s"], loopback["bandwidth_bps"])
        predictions = [{"link": "loopback (measured)", "predicted_s": predicted_loopback,
                        "measured_s": medians["DeviceClient.fit over HTTP"]}]
        for row in link_rows:
            predictions.append({
                "link": row["link"],
                "predicted_s": predict(loopback["latency_s"] + row["latency_s"],
                                       1 / (1 / loopback["bandwidth_bps"] + 1 / row["bandwidth_bps"])),
                "measured_s": row["seconds_per_step"]})
        data = {
            "benchmark": "http_overhead", "batch": BATCH, "rounds": args.rounds,
            "steps_per_round": args.steps, "cuts": cuts, "width": args.width, "machine": machine(),
            "model": {"parameters": model.count_params(), "forward_flops_per_sample": total_flops,
                      "cut_bytes_per_sample": {c: candidates[c].bytes_per_sample for c in cuts}},
            "seconds_per_step": {n: {"median": medians[n], "rounds": times[n],
                                     "ratio_to_central": medians[n] / central_step,
                                     "median_of_round_ratios": median(round_ratios[n]),
                                     "cpu_seconds_per_step": cpu_medians[n],
                                     "cpu_rounds": cpu[n]} for n in times},
            "http_step_decomposition_s": {what: value for what, value in decomposition},
            "client_stats_per_step_s": part,
            "cpu_ratio_http_to_central": cpu_ratio,
            "http_bytes_per_step": bytes_per_step,
            "loopback": loopback,
            "calibrated_training_flops_per_s": speed,
            "predictions": predictions,
            "floor": {"what": "median over rounds of (DeviceClient step over loopback HTTP / "
                              "central model.fit step in the same round)",
                      "value": ratio, "floor": floor, "met": ratio <= floor},
        }
        rows = [[n, f"{1e3 * medians[n]:.1f}", f"{median(round_ratios[n]):.3f}",
                 f"{1e3 * cpu_medians[n]:.0f}", f"{cpu_medians[n] / cpu_medians['central model.fit']:.2f}",
                 " ".join(f"{1e3 * v:.0f}" for v in times[n])] for n in times]
        decomposition_rows = [[what, f"{1e3 * value:.1f}", f"{value / central_step:.2f}"]
                              for what, value in decomposition]
        prediction_rows = [[p["link"], f"{1e3 * p['predicted_s']:.1f}", f"{1e3 * p['measured_s']:.1f}",
                            f"{p['measured_s'] / p['predicted_s']:.2f}"] for p in predictions]
        title = "ResNet50, 64x64" if resnet else f"width {args.width}"
        description = "keras.applications.ResNet50 (random weights)," if resnet else "CNN"
        markdown = "\n".join([
            f"# HTTP overhead of a double-split training step ({title})", "",
            f"{description} {model.count_params():,} parameters, {total_flops / 1e6:.0f} MFLOP forward "
            f"per sample, {'x'.join(map(str, sample_shape))}, batch {BATCH}, cut U-shaped at {cuts} "
            f"({first.bytes_per_sample:,} and {second.bytes_per_sample:,} float32 bytes per sample "
            f"cross). Real server on 127.0.0.1, `DeviceClient` in this process. Medians of "
            f"{args.rounds} interleaved rounds of {args.steps} steps (after a warm-up round).", "",
            table(["level", "ms per step", "/ central (median of round ratios)",
                   "CPU ms per step (both processes)", "CPU / central", "rounds (ms)"], rows), "",
            "The two `server segment` rows time the middle segment alone (pre-encoded random "
            "activations and gradients, as in server_throughput): in-process, and over HTTP.", "",
            f"HTTP bodies per step: {bytes_per_step / 1e6:.2f} MB (sent + received). Loopback: "
            f"{1e3 * loopback['latency_s']:.2f} ms one way, {loopback['bandwidth_bps'] / 1e9:.2f} "
            f"Gbit/s effective (from repeated, cached requests).", "",
            f"Floor: HTTP / central <= {floor}: {ratio:.3f} -> {verdict(ratio <= floor)} "
            f"(CPU time, both processes: {cpu_ratio:.2f}x central)", "",
            "## Where the HTTP step's time goes (medians, ms per step)", "",
            table(["part", "ms", "/ central step"], decomposition_rows), "",
            f"Central step: {1e3 * central_step:.1f} ms. Medians of different rounds do not add up "
            "exactly; on a loaded machine read them as shares.", "",
            "## The planner's prediction against the measurement", "",
            f"`splitkeras.planning.plan_pair` with device and server at the "
            f"{speed / 1e9:.1f} GFLOP/s the central step shows (3 x forward FLOPs), and the link "
            "at the loopback figures (plus the emulated link where there is one); per step.", "",
            table(["link", "predicted ms/step", "measured ms/step", "measured / predicted"],
                  prediction_rows),
        ])
        paths = write_results("http_overhead" + ("_resnet50" if resnet else "")
                              + (f"_width{args.width}" if args.width != 1 else ""),
                              data, markdown)
        print(markdown)
        print("wrote", *paths)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def middle_levels(folder: Path, url: str, key: str, middle: Any) -> dict[str, Any]:
    """One fwd+bwd step of the server segment alone: in-process, and over raw HTTP."""
    from server_throughput import Device, InProcessRunner

    from splitkeras import wire

    rng = np.random.default_rng(1)
    inputs = rng.random((BATCH, *middle.inputs[0].sample_shape), dtype=np.float32)
    grads = (rng.standard_normal((BATCH, *middle.outputs[0].sample_shape)) * 1e-3).astype(np.float32)
    forward_body = wire.encode({middle.inputs[0].name: inputs})
    backward_bodies = (wire.encode({middle.outputs[0].name: grads}),
                       wire.encode({middle.outputs[0].name: -grads}))
    runner = InProcessRunner(folder, inputs, grads)
    device = Device(url, key)
    return {"server segment in-process (fwd+bwd)": runner.one_step,
            "server segment over raw HTTP (fwd+bwd)":
                lambda: device.one_step(forward_body, backward_bodies)}


def measure_loopback(url: str, key: str, folder: Path) -> dict[str, float]:
    """One-way latency (a GET /healthz round trip / 2) and effective bandwidth (a 1 MiB
    forward, retried: the server returns its cached bytes and computes nothing)."""
    import httpx

    from splitkeras import wire
    from splitkeras.manifest import Manifest
    from splitkeras.protocol import STEP_HEADER, step_path

    manifest = Manifest.read(folder)
    entry = next(s for s in manifest.segments if s.placement == "server")
    spec = entry.inputs[0]
    body = wire.encode({spec.name: np.zeros((BATCH, *spec.sample_shape), np.float32)})
    with httpx.Client(base_url=url, timeout=120) as client:
        session = client.post("/v1/sessions", json={"wire_dtype": "float32"},
                              headers={"Authorization": f"Bearer {key}"}).json()
        headers = {"Authorization": f"Bearer {session['token']}",
                   "Content-Type": wire.MEDIA_TYPE, STEP_HEADER: str(session["next_step"])}
        path = step_path(session["session_id"], "forward")
        response = client.post(path, content=body, headers=headers)  # computes once
        pings, transfers = [], []
        for _ in range(15):
            started = time.perf_counter()
            client.get("/healthz")
            pings.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.post(path, content=body, headers=headers)  # cached: bytes only
            transfers.append(time.perf_counter() - started)
        client.delete(f"/v1/sessions/{session['session_id']}",
                      headers={"Authorization": f"Bearer {session['token']}"})
    round_trip = median(pings)
    moved = len(body) + len(response.content)
    transfer = max(median(transfers) - round_trip, 1e-6)
    return {"latency_s": round_trip / 2, "bandwidth_bps": moved * 8 / transfer,
            "bytes_in_probe": moved}


def measure_links(folder: Path, url: str, key: str, x: np.ndarray, y: np.ndarray,
                  device_client: Any, network_conditions: Any) -> list[dict[str, Any]]:
    rows = []
    for label, latency_s, bandwidth_bps in LINKS:
        link = network_conditions(latency_s=latency_s, bandwidth_bps=bandwidth_bps)
        device = device_client(folder, url, key=key, wire_dtype="float32", network=link)
        device.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        seconds_per_step(device.fit, x[: 2 * BATCH], y[: 2 * BATCH])  # warm-up
        seconds = median([seconds_per_step(device.fit, x, y) for _ in range(2)])
        device.close()
        rows.append({"link": f"emulated {label}", "latency_s": latency_s,
                     "bandwidth_bps": bandwidth_bps, "seconds_per_step": seconds})
        print(f"{label}: {1e3 * seconds:.0f} ms per step", flush=True)
    return rows


if __name__ == "__main__":
    main()
