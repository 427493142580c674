"""Server steps/s against the number of devices (1-64), with and without micro-batching.

The digits split of `splitkeras demo` (splitkeras/demo.py: the CNN cut at conv_2 and
dense_1; the server's middle holds BatchNormalization, a conv and a dense layer), batch 32,
served by two real `splitkeras serve` subprocesses (uvicorn on 127.0.0.1) that run side by
side: one sequential (the default), one with `--batch-window-ms W --max-devices-per-batch K`.
Emulated devices are threads of this process (one `httpx.Client` and session each) that
loop forward k / backward k with pre-encoded bodies (`server_throughput.Device`); for each
point, c sessions are opened and closed after it, so no idle session is open. For each
device count 1, 2, 4, ..., 64 both servers are measured in turn, round by round (the order
alternates), and each figure is the median of its rounds.

The reference is the middle segment's own in-process `SegmentRunner` forward + backward
step rate (same file, optimizer, jit_compile, batch), measured in this process while both
servers are idle.

CPU split (two cores here): both server processes are pinned to core 0 (every thread, with
`os.sched_setaffinity`), the device threads (this process) to core 1; the in-process
reference is measured pinned to core 0, as the server is. `--no-pin` measures unpinned.

Floors: sequential server with 8 devices >= 0.9 x in-process; micro-batched / sequential
at 64 devices >= 2.

Run: `.venv/bin/python benchmarks/server_sweep.py [--rounds 3] [--window 3]` (about 4 min)
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from _common import RESULTS, machine, median, start_server, stop_server, table, verdict, write_results  # noqa: E402
from server_throughput import (  # noqa: E402
    Device,
    InProcessRunner,
    InProcessService,
    http_rate,
    middle_traffic,
    rate_of,
)

DEVICES = (1, 2, 4, 8, 16, 32, 64)
BATCH = 32
FLOOR_SEQUENTIAL = 0.9
FLOOR_MICRO = 2.0
MODES = ("sequential", "micro-batched")


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of process `pid` onto `cores` (new threads inherit their creator's)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass


def profile_service(service: Any, runner: Any, steps: int) -> dict[str, float]:
    """Where a sequential step's wall time goes in-process (ms per step): each part timed by a
    wrapper around it on the `SegmentService` (no HTTP), next to the bare `SegmentRunner`."""
    from collections import defaultdict

    totals: dict[str, float] = defaultdict(float)
    inner = service.service

    def wrap(owner: Any, name: str, bucket: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[bucket] += time.perf_counter() - started

        setattr(owner, name, timed)

    wrap(inner.wal, "append", "write-ahead log (write + fsync, forward and backward)")
    wrap(inner.runner, "forward", "segment forward + backward (with the guard's checks)")
    wrap(inner.runner, "backward", "segment forward + backward (with the guard's checks)")
    for name in ("inputs", "output_grads"):
        wrap(inner.bodies, name, "wire decode")
    for name in ("encode_outputs", "encode_input_grads"):
        wrap(inner.bodies, name, "wire encode")
    started = time.perf_counter()
    for _ in range(steps):
        service.one_step()
    total = time.perf_counter() - started
    parts = {name: 1e3 * value / steps for name, value in totals.items()}
    parts["the rest (step machine, cached answers, Python)"] = 1e3 * total / steps - sum(parts.values())
    started = time.perf_counter()
    for _ in range(steps):
        runner.one_step()
    parts["bare SegmentRunner forward + backward (no guard), for comparison"] = \
        1e3 * (time.perf_counter() - started) / steps
    parts["SegmentService step in all"] = 1e3 * total / steps
    return parts


def close_all(devices: list[Any]) -> None:
    """Close the devices' sessions (a step still pending is dropped with them) and clients."""
    for device in devices:
        device.client.delete(f"/v1/sessions/{device.session_id}", headers=device.headers)
        device.client.close()


def counters(url: str, key: str) -> tuple[int, int]:
    state = httpx.get(f"{url}/readyz?detail=1", headers={"Authorization": f"Bearer {key}"}).json()
    return int(state["applied_steps"]), int(state["updates"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=3.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--max-devices-per-batch", type=int, default=64)
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and devices to cores")
    args = parser.parse_args()
    pinned = not args.no_pin and (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")

    import splitkeras
    from splitkeras.demo import CUTS, digits_model

    folder = Path(tempfile.mkdtemp(prefix="splitkeras-sweep-"))
    processes: list[Any] = []
    try:
        split = splitkeras.split(digits_model(), at=CUTS)
        split.save(folder / "split", tfjs=False)
        for mode in MODES:
            shutil.copytree(folder / "split", folder / mode)
        middle = split["middle"]
        inputs, grads, forward_body, backward_bodies = middle_traffic(middle)
        runner = InProcessRunner(folder / "split", inputs, grads)
        service = InProcessService(folder / "split", forward_body, backward_bodies)
        key = secrets.token_hex(16)
        urls: dict[str, str] = {}
        flags = {"sequential": [], "micro-batched": ["--batch-window-ms", f"{args.batch_window_ms:g}",
                                                     "--max-devices-per-batch", str(args.max_devices_per_batch)]}
        for mode in MODES:
            process, urls[mode] = start_server(folder / mode, key, *flags[mode])
            processes.append(process)
            if pinned:
                pin(process.pid, {0})
        rates: dict[str, dict[int, list[float]]] = {mode: {c: [] for c in DEVICES} for mode in MODES}
        server_cpu: dict[str, dict[int, list[float]]] = {mode: {c: [] for c in DEVICES} for mode in MODES}
        device_cpu: dict[str, dict[int, list[float]]] = {mode: {c: [] for c in DEVICES} for mode in MODES}
        service_rate: list[float] = []
        service_cpu: list[float] = []
        group_sizes: dict[int, list[float]] = {c: [] for c in DEVICES}
        reference: list[float] = []
        reference_cpu: list[float] = []
        started = time.perf_counter()
        for mode in MODES:  # the first steps trace the TensorFlow functions (a union's shapes too)
            for c in (1, max(DEVICES)):
                devices = [Device(urls[mode], key) for _ in range(c)]
                http_rate(devices, forward_body, backward_bodies, 0.5, 1.5, processes[MODES.index(mode)].pid)
                close_all(devices)
        for round_index in range(args.rounds):
            if pinned:
                pin(os.getpid(), {0})
            rate, cpu = rate_of(runner.one_step, args.warmup, args.window)
            reference.append(rate)
            reference_cpu.append(cpu)
            rate, cpu = rate_of(service.one_step, args.warmup, args.window)  # + wire and step machine
            service_rate.append(rate)
            service_cpu.append(cpu)
            if pinned:
                pin(os.getpid(), {1})
            cycle = 1.0 / max(reference[-1], 1e-3)
            for c in DEVICES:
                order = MODES if (round_index + c.bit_length()) % 2 == 0 else MODES[::-1]
                for mode, process in ((m, processes[MODES.index(m)]) for m in order):
                    devices = [Device(urls[mode], key) for _ in range(c)]  # c sessions open, no idle one
                    before = counters(urls[mode], key)
                    rate, cpu, devices_cpu = http_rate(devices, forward_body, backward_bodies,
                                                       max(args.warmup, 2 * c * cycle),
                                                       max(args.window, 3 * c * cycle), process.pid)
                    after = counters(urls[mode], key)
                    close_all(devices)
                    rates[mode][c].append(rate)
                    server_cpu[mode][c].append(cpu)
                    device_cpu[mode][c].append(devices_cpu)
                    if mode == "micro-batched":
                        group_sizes[c].append((after[0] - before[0]) / max(after[1] - before[1], 1))
            print(f"round {round_index + 1} ({time.perf_counter() - started:.0f} s): in-process {reference[-1]:.1f}; "
                  + "; ".join(f"{c}: {rates['sequential'][c][-1]:.1f} / {rates['micro-batched'][c][-1]:.1f}"
                              for c in DEVICES), flush=True)
        if pinned:
            pin(os.getpid(), {0})
        profile = profile_service(service, runner, 200)
    finally:
        for process in processes:
            stop_server(process)
        shutil.rmtree(folder, ignore_errors=True)
    data, markdown = report(args, pinned, middle, len(forward_body), (reference, reference_cpu),
                            (service_rate, service_cpu), rates, server_cpu, device_cpu, group_sizes, profile)
    paths = write_results("server_sweep", data, markdown)
    plot(data, RESULTS / "server_throughput.png")
    print(markdown)
    print("wrote", *paths, RESULTS / "server_throughput.png")


Series = dict[str, dict[int, list[float]]]


def report(args: argparse.Namespace, pinned: bool, middle: Any, body_bytes: int,
           runner: tuple[list[float], list[float]], service: tuple[list[float], list[float]], rates: Series,
           server_cpu: Series, device_cpu: Series, group_sizes: dict[int, list[float]],
           profile: dict[str, float]) -> tuple[dict[str, Any], str]:
    reference, reference_cpu = runner
    # a shared machine drifts between rounds: ratios within each round, then their median
    seq_ratio = [s / r for s, r in zip(rates["sequential"][8], reference)]
    micro_ratio = [m / s for m, s in zip(rates["micro-batched"][64], rates["sequential"][64])]
    floors = {
        "sequential_8_over_in_process": {"what": "median over rounds of (sequential server steps/s with 8 devices "
                                                 "/ in-process SegmentRunner steps/s in the same round)",
                                         "value": median(seq_ratio), "floor": FLOOR_SEQUENTIAL,
                                         "met": median(seq_ratio) >= FLOOR_SEQUENTIAL, "rounds": seq_ratio},
        "micro_over_sequential_64": {"what": "median over rounds of (micro-batched / sequential server steps/s "
                                             "with 64 devices)",
                                     "value": median(micro_ratio), "floor": FLOOR_MICRO,
                                     "met": median(micro_ratio) >= FLOOR_MICRO, "rounds": micro_ratio},
    }
    split_text = ("both servers pinned to core 0 (all threads), the device threads to core 1, the in-process "
                  "reference to core 0" if pinned else "not pinned: servers and devices share every core")
    data = {
        "benchmark": "server_sweep", "batch": BATCH, "rounds": args.rounds, "window_s": args.window,
        "warmup_s": args.warmup, "batch_window_ms": args.batch_window_ms,
        "max_devices_per_batch": args.max_devices_per_batch, "cpu_split": split_text, "machine": machine(),
        "middle_segment": {"parameters": middle.model.count_params(), "forward_body_bytes": body_bytes},
        "in_process_steps_per_s": {"median": median(reference), "rounds": reference,
                                   "cpu_ms_per_step": 1e3 * median(reference_cpu)},
        "in_process_service_steps_per_s": {"median": median(service[0]), "rounds": service[0],
                                           "cpu_ms_per_step": 1e3 * median(service[1])},
        "steps_per_s": {mode: {str(c): {"median": median(v), "rounds": v} for c, v in by.items()}
                        for mode, by in rates.items()},
        "server_cpu_ms_per_step": {mode: {str(c): 1e3 * median(v) for c, v in by.items()}
                                   for mode, by in server_cpu.items()},
        "devices_cpu_ms_per_step": {mode: {str(c): 1e3 * median(v) for c, v in by.items()}
                                    for mode, by in device_cpu.items()},
        "mean_group_size": {str(c): median(v) for c, v in group_sizes.items()},
        "floors": floors,
        "sequential_step_profile_ms": profile,
    }
    ref = median(reference)
    rows = []
    for c in DEVICES:
        s, m = median(rates["sequential"][c]), median(rates["micro-batched"][c])
        rows.append([c, f"{s:.1f}", f"{s / ref:.2f}", f"{1e3 * median(server_cpu['sequential'][c]):.1f}",
                     f"{1e3 * median(device_cpu['sequential'][c]):.1f}",
                     f"{m:.1f}", f"{m / ref:.2f}", f"{1e3 * median(server_cpu['micro-batched'][c]):.1f}",
                     f"{1e3 * median(device_cpu['micro-batched'][c]):.1f}",
                     f"{median(group_sizes[c]):.1f}", f"{m / s:.2f}"])
    lines = [
        "# Server steps/s against devices, with and without micro-batching", "",
        f"The digits split of `splitkeras demo`; the server's middle segment: {middle.model.count_params():,} "
        f"parameters, batch {BATCH}, {body_bytes:,} bytes per forward body. Two real uvicorn servers on "
        f"127.0.0.1 side by side: sequential, and `--batch-window-ms {args.batch_window_ms:g} "
        f"--max-devices-per-batch {args.max_devices_per_batch}`. Devices: threads of the benchmark process "
        f"(pre-encoded bodies). CPU split: {split_text}. Medians of {args.rounds} interleaved rounds, "
        f"{args.window:g} s windows after a warm-up.", "",
        f"In-process SegmentRunner: {ref:.1f} steps/s ({1e3 * median(reference_cpu):.1f} CPU ms per step); "
        f"in-process SegmentService (+ wire decode/encode and the step machine, no HTTP): "
        f"{median(service[0]):.1f} steps/s ({1e3 * median(service[1]):.1f} CPU ms per step).", "",
        table(["devices", "sequential steps/s", "/ in-process", "server CPU ms/step", "devices' CPU ms/step",
               "micro-batched steps/s", "/ in-process", "server CPU ms/step", "devices' CPU ms/step",
               "mean group", "micro / sequential"], rows), "",
        "CPU ms per step: the server process (all its threads) and the device threads (this process), "
        "per completed device step. With the devices on one core, they cap the rate at "
        "1000 / (devices' CPU ms per step) steps/s; the server's core caps it at 1000 / (server CPU ms/step).", "",
        "![steps/s against devices](server_throughput.png)", "",
        f"Floor: sequential, 8 devices >= {FLOOR_SEQUENTIAL} x in-process (median of round ratios): "
        f"{floors['sequential_8_over_in_process']['value']:.3f} -> "
        f"{verdict(floors['sequential_8_over_in_process']['met'])}",
        f"Floor: micro-batched / sequential at 64 devices >= {FLOOR_MICRO:g} (median of round ratios): "
        f"{floors['micro_over_sequential_64']['value']:.2f} -> {verdict(floors['micro_over_sequential_64']['met'])}",
        "", "## Where a sequential step's time goes (in-process SegmentService, wall ms per step, pinned like "
        "the server)", "",
        table(["part", "ms per step"], [[name, f"{value:.2f}"] for name, value in profile.items()]), "",
        "Over HTTP, the server adds uvicorn/h11/Starlette (reading and writing the bodies) and the hop to "
        "the writer thread: the difference between 1000 / (sequential steps/s) and the in-process step above.",
    ]
    return data, "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for mode, marker in zip(MODES, "os"):
        values = [data["steps_per_s"][mode][str(c)]["median"] for c in DEVICES]
        axis.plot(DEVICES, values, marker=marker, label=f"server, {mode}")
    axis.axhline(data["in_process_steps_per_s"]["median"], color="gray", linestyle="--",
                 label="in-process SegmentRunner (sequential)")
    axis.set_xscale("log", base=2)
    axis.set_xticks(DEVICES, [str(c) for c in DEVICES])
    axis.set_xlabel("devices (concurrent sessions)")
    axis.set_ylabel("device steps per second")
    axis.set_title(f"digits middle segment, batch {BATCH}; {data['cpu_split'].split(',')[0]}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
