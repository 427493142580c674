"""Server throughput: training steps per second with 1, 8 and 32 concurrent devices.

A CNN is cut U-shaped (head and tail on the device, a compute-heavy middle of
convolutions on the server), saved, and served by a real `splitkeras serve`
subprocess (uvicorn) on 127.0.0.1. Emulated devices (threads, one `httpx.Client`
and one session each) loop forward k / backward k with fixed random activations
and gradients, pre-encoded once, so a device costs only its HTTP I/O. They do not
decode the responses.

The reference is the server segment's own in-process `SegmentRunner`
forward + backward step rate (same segment file, optimizer and `jit_compile`,
same batch) measured in this process while the server is idle. A middle level,
`SegmentService` in-process (wire decode/encode + the step state machine, no
HTTP), splits the overhead into wire+service and HTTP. The levels are
interleaved round by round and each figure is the median of its rounds; a rate
is completed steps in a timed window after a warm-up (for c devices at least
2 and 3 "cycles" of c steps; a shared machine: compare the ratios). On this loopback
set-up the devices' threads share the CPU cores with the server, which a real deployment would not.

Floor: server steps/s with 8 devices >= 0.85 x in-process.

Run: `.venv/bin/python benchmarks/server_throughput.py [--rounds 3] [--window 8]`
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _common import machine, median, process_cpu_seconds, start_server, stop_server, table, verdict, write_results

from splitkeras.protocol import STEP_HEADER, step_path

BATCH = 32
CONCURRENCY = (1, 8, 32)
FLOOR = 0.85
CUTS = ["head_out", "middle_out"]


def build_model() -> Any:
    """32x32x3 -> head (one conv) -> middle (three 3x3 convs, 128 ch at 16x16) -> tail."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_1")(inputs)
    x = layers.MaxPooling2D(name="head_out")(x)  # 16x16x32 crosses to the server
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="conv_2")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="conv_3")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="conv_4")(x)
    x = layers.MaxPooling2D(name="middle_out")(x)  # 8x8x128 comes back
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(10, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs, name="throughput_cnn")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    return model


def make_split(folder: Path) -> Any:
    import splitkeras

    split = splitkeras.split(build_model(), at=CUTS)
    split.save(folder, tfjs=False)
    return split


# ---- level 1: the runner alone --------------------------------------------------------------------
class InProcessRunner:
    def __init__(self, folder: Path, inputs: np.ndarray, grads: np.ndarray) -> None:
        from converters.keras_io import load_model
        from splitkeras.engine import SegmentRunner, new_optimizer
        from splitkeras.manifest import Manifest
        from splitkeras.segments import Segment

        manifest = Manifest.read(folder)
        entry = next(s for s in manifest.segments if s.placement == "server")
        model = load_model(folder / entry.keras_file, compile=False)
        segment = Segment(entry.name, "server", model, entry.inputs, entry.outputs)
        self.runner = SegmentRunner(segment, new_optimizer(manifest.training["optimizer"]),
                                    input_gradients=[True], jit_compile="auto")
        self.inputs, self.grads, self.step = inputs, grads, 0

    def one_step(self) -> None:
        outputs = self.runner.forward(self.step, [self.inputs])
        _ = [np.asarray(o) for o in outputs]
        # the sign alternates so that the weights oscillate instead of drifting away
        sign = 1.0 if self.step % 2 == 0 else -1.0
        input_grads = self.runner.backward(self.step, [sign * self.grads])
        _ = [np.asarray(g) for g in input_grads if g is not None]
        self.step += 1


# ---- level 2: the service in-process (wire + state machine, no HTTP) -----------------------------
class InProcessService:
    def __init__(self, folder: Path, forward_body: bytes, backward_bodies: tuple[bytes, bytes]) -> None:
        from server_app.service import SegmentService
        from server_app.settings import ServerSettings

        self.service = SegmentService(ServerSettings(
            split_dir=folder, key="benchmark", checkpoint_dir=folder / "inprocess_checkpoints",
            checkpoint_every=10**9))
        self.session, _ = self.service.open_session("float32")
        self.forward_body, self.backward_bodies, self.step = forward_body, backward_bodies, 0
        self.phases: dict[str, list[float]] = {"forward": [], "backward": []}

    def one_step(self) -> None:
        started = time.perf_counter()
        self.service.forward(self.session, self.step, self.forward_body)
        middle = time.perf_counter()
        self.service.backward(self.session, self.step, self.backward_bodies[self.step % 2])
        self.phases["forward"].append(middle - started)
        self.phases["backward"].append(time.perf_counter() - middle)
        self.step += 1


def rate_of(one_step: Any, warmup: float, window: float) -> tuple[float, float]:
    """Steps per second of a sequential step function over a timed window, and CPU
    seconds per step of this process (all its threads, TensorFlow's pools included)."""
    deadline = time.perf_counter() + warmup
    while time.perf_counter() < deadline:
        one_step()
    count, started, cpu = 0, time.perf_counter(), process_cpu_seconds(os.getpid())
    while True:
        one_step()
        count += 1
        elapsed = time.perf_counter() - started
        if elapsed >= window:
            return count / elapsed, (process_cpu_seconds(os.getpid()) - cpu) / count


# ---- level 3: devices over HTTP -------------------------------------------------------------------
class Device:
    def __init__(self, url: str, key: str) -> None:
        import httpx

        self.client = httpx.Client(base_url=url, timeout=600.0)
        response = self.client.post("/v1/sessions", json={"wire_dtype": "float32"},
                                    headers={"Authorization": f"Bearer {key}"})
        response.raise_for_status()
        session = response.json()
        self.session_id = str(session["session_id"])
        self.headers = {"Authorization": f"Bearer {session['token']}",
                        "Content-Type": "application/vnd.splitkeras.safetensors"}
        self.step = int(session["next_step"])

    def one_step(self, forward_body: bytes, backward_bodies: tuple[bytes, bytes]) -> None:
        """forward, then backward with g or -g in turn (the weights oscillate, not drift)."""
        backward_body = backward_bodies[self.step % 2]
        for route, body in (("forward", forward_body), ("backward", backward_body)):
            response = self.client.post(step_path(self.session_id, route), content=body,
                                        headers={**self.headers, STEP_HEADER: str(self.step)})
            if response.status_code != 200:
                raise RuntimeError(f"{route} {self.step}: HTTP {response.status_code} {response.text[:300]}")
        self.step += 1


def http_rate(devices: list[Device], forward_body: bytes, backward_bodies: tuple[bytes, bytes],
              warmup: float, window: float, server_pid: int) -> tuple[float, float, float]:
    """Completed steps per second of all devices together in a window after a warm-up,
    and CPU seconds per step of the server process and of the devices (this process)."""
    stop = threading.Event()
    done = [0]
    lock = threading.Lock()
    failures: list[BaseException] = []

    def loop(device: Device) -> None:
        try:
            while not stop.is_set():
                device.one_step(forward_body, backward_bodies)
                with lock:
                    done[0] += 1
        except BaseException as error:  # reported below
            failures.append(error)
            stop.set()

    threads = [threading.Thread(target=loop, args=(d,), daemon=True) for d in devices]
    for thread in threads:
        thread.start()
    time.sleep(warmup)
    with lock:
        first, started = done[0], time.perf_counter()
        server_cpu, client_cpu = process_cpu_seconds(server_pid), process_cpu_seconds(os.getpid())
    time.sleep(window)
    with lock:
        last, ended = done[0], time.perf_counter()
        server_cpu = process_cpu_seconds(server_pid) - server_cpu
        client_cpu = process_cpu_seconds(os.getpid()) - client_cpu
    stop.set()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    steps = max(last - first, 1)
    return (last - first) / (ended - started), server_cpu / steps, client_cpu / steps


def middle_traffic(middle: Any) -> tuple[np.ndarray, np.ndarray, bytes, tuple[bytes, bytes]]:
    """A server segment's emulated device traffic (seed 0, batch BATCH): random activations and
    small output gradients, their wire bodies, and a second backward body with the gradients
    negated (devices alternate the two so that the weights stay bounded)."""
    from splitkeras import wire

    rng = np.random.default_rng(0)
    in_spec, out_spec = middle.inputs[0], middle.outputs[0]
    inputs = rng.random((BATCH, *in_spec.sample_shape), dtype=np.float32)
    grads = (rng.standard_normal((BATCH, *out_spec.sample_shape)) * 1e-3).astype(np.float32)
    forward_body = wire.encode({in_spec.name: inputs})
    backward_bodies = (wire.encode({out_spec.name: grads}), wire.encode({out_spec.name: -grads}))
    return inputs, grads, forward_body, backward_bodies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=8.0, help="seconds measured per level")
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()


    folder = Path(tempfile.mkdtemp(prefix="splitkeras-throughput-"))
    try:
        split = make_split(folder)
        middle = split["middle"]
        inputs, grads, forward_body, backward_bodies = middle_traffic(middle)
        backward_body = backward_bodies[0]
        flops = sum(_forward_flops(middle.model))
        print(f"middle segment: {middle.model.count_params():,} params, "
              f"{flops / 1e6:.0f} MFLOP forward per sample; bodies {len(forward_body):,} B in, "
              f"{len(backward_body):,} B back", flush=True)

        runner = InProcessRunner(folder, inputs, grads)
        service = InProcessService(folder, forward_body, backward_bodies)
        key = secrets.token_hex(16)
        process, url = start_server(folder, key)
        try:
            devices = [Device(url, key) for _ in range(max(CONCURRENCY))]
            rates: dict[str, list[float]] = {"in-process SegmentRunner": [],
                                             "in-process SegmentService": []}
            rates.update({f"HTTP, {c} device{'s' * (c > 1)}": [] for c in CONCURRENCY})
            cpu: dict[str, list[float]] = {name: [] for name in rates}
            client_cpu: dict[str, list[float]] = {}
            for round_index in range(args.rounds):
                rate, cpu_per_step = rate_of(runner.one_step, args.warmup, args.window)
                rates["in-process SegmentRunner"].append(rate)
                cpu["in-process SegmentRunner"].append(cpu_per_step)
                rate, cpu_per_step = rate_of(service.one_step, args.warmup, args.window)
                rates["in-process SegmentService"].append(rate)
                cpu["in-process SegmentService"].append(cpu_per_step)
                cycle = 1.0 / max(rates["in-process SegmentRunner"][-1], 1e-3)  # s per step
                for c in CONCURRENCY:
                    # c devices need c steps of the single writer before each completes one:
                    # warm up past two such cycles, measure at least three.
                    name = f"HTTP, {c} device{'s' * (c > 1)}"
                    rate, server_cpu, devices_cpu = http_rate(
                        devices[:c], forward_body, backward_bodies, max(args.warmup, 2 * c * cycle),
                        max(args.window, 3 * c * cycle), process.pid)
                    rates[name].append(rate)
                    cpu[name].append(server_cpu)
                    client_cpu.setdefault(name, []).append(devices_cpu)
                print(f"round {round_index + 1}: " + ", ".join(
                    f"{name} {values[-1]:.2f}" for name, values in rates.items()), flush=True)
            for device in devices:
                device.client.close()
        finally:
            stop_server(process)
        data, markdown = report(rates, service, args, middle, flops, len(forward_body),
                                len(backward_body), cpu, client_cpu)
        paths = write_results("server_throughput", data, markdown)
        print(markdown)
        print("wrote", *paths)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _forward_flops(model: Any) -> list[int]:
    from splitkeras.graph import ModelGraph
    from splitkeras.profile import node_flops

    return [node_flops(n) for n in ModelGraph.of(model).layer_nodes]


def report(rates: dict[str, list[float]], service: InProcessService, args: argparse.Namespace,
           middle: Any, flops: int, in_bytes: int, out_bytes: int,
           cpu: dict[str, list[float]] | None = None,
           client_cpu: dict[str, list[float]] | None = None) -> tuple[dict[str, Any], str]:
    reference = median(rates["in-process SegmentRunner"])
    medians = {name: median(values) for name, values in rates.items()}
    ratio8 = medians["HTTP, 8 devices"] / reference
    phase_ms = {k: 1e3 * median(v) for k, v in service.phases.items()}
    data = {
        "benchmark": "server_throughput", "batch": BATCH, "rounds": args.rounds,
        "window_s": args.window, "warmup_s": args.warmup, "machine": machine(),
        "middle_segment": {"parameters": middle.model.count_params(),
                           "forward_flops_per_sample": flops,
                           "forward_body_bytes": in_bytes, "backward_body_bytes": out_bytes},
        "steps_per_s": {name: {"median": medians[name], "rounds": values,
                               "ratio_to_in_process": medians[name] / reference}
                        for name, values in rates.items()},
        "service_phase_ms": phase_ms,
        "floor": {"what": "HTTP steps/s with 8 devices / in-process SegmentRunner steps/s",
                  "value": ratio8, "floor": FLOOR, "met": ratio8 >= FLOOR},
    }
    # The load of a shared machine drifts between rounds: the ratio within each round, then
    # the median of those, is the steadier figure; the floor uses it.
    per_round = {name: [v / r for v, r in zip(values, rates["in-process SegmentRunner"])]
                 for name, values in rates.items()}
    ratio8 = median(per_round["HTTP, 8 devices"])
    for name in rates:
        data["steps_per_s"][name]["median_of_round_ratios"] = median(per_round[name])
    data["floor"].update(value=ratio8, met=ratio8 >= FLOOR,
                         what="median over rounds of (HTTP steps/s with 8 devices / in-process "
                              "SegmentRunner steps/s in the same round)")
    rows = [[name, f"{medians[name]:.2f}", f"{medians[name] * BATCH:.0f}",
             f"{medians[name] / reference:.3f}", f"{median(per_round[name]):.3f}",
             " ".join(f"{v:.2f}" for v in values)]
            for name, values in rates.items()]
    lines = [
        "# Server throughput", "",
        f"U-shaped split of a CNN; the server's middle segment: {middle.model.count_params():,} "
        f"parameters, {flops / 1e6:.0f} MFLOP forward per sample, batch {BATCH}; "
        f"{in_bytes:,} bytes in per forward, {out_bytes:,} bytes in per backward (float32). "
        f"Real uvicorn server on 127.0.0.1; devices are threads of the benchmark process "
        f"(pre-encoded bodies, responses not decoded). Medians of {args.rounds} interleaved "
        f"rounds, {args.window:g} s windows after {args.warmup:g} s warm-up.", "",
        table(["level", "steps/s", "samples/s", "/ in-process (medians)",
               "/ in-process (median of round ratios)", "rounds (steps/s)"], rows), "",
        f"SegmentService in-process phases (median ms): forward {phase_ms['forward']:.1f} "
        f"(decode + run + encode), backward {phase_ms['backward']:.1f}.", "",
        f"Floor: 8 devices over HTTP >= {FLOOR} x in-process: {ratio8:.3f} -> {verdict(ratio8 >= FLOOR)}",
    ]
    if cpu:
        # CPU seconds per step depend much less on how much of the machine others take
        # than steps/s do: the server's cost per step against the runner's.
        base = median(cpu["in-process SegmentRunner"])
        data["cpu_seconds_per_step"] = {
            name: {"median": median(values), "rounds": values,
                   "ratio_to_in_process": median(values) / base,
                   "devices_process_median": median(client_cpu[name])
                   if client_cpu and name in client_cpu else None}
            for name, values in cpu.items()}
        cpu_rows = [[name, f"{1e3 * median(values):.0f}", f"{median(values) / base:.3f}",
                     f"{1e3 * median(client_cpu[name]):.0f}"
                     if client_cpu and name in client_cpu else "-"]
                    for name, values in cpu.items()]
        lines += ["", "## CPU seconds per step (less sensitive to the machine's load)", "",
                  "In-process: the benchmark process; HTTP: the server process (all threads), and "
                  "separately the emulated devices' HTTP work in the benchmark process.", "",
                  table(["level", "CPU ms per step", "/ in-process", "devices' CPU ms per step"],
                        cpu_rows)]
    return data, "\n".join(lines)


if __name__ == "__main__":
    main()
