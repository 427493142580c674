"""The all-reduce of a global step (`splitkeras serve --strategy`) against the segment's size,
next to the bytes a device moves per step for the same segment.

Segments: a middle of two Dense(d) layers cut at width d (P = 2 d^2 + 2 d parameters, ~10k to
~10M). Per segment, the SUM all-reduce of its weight gradients as `DistributedRunner` runs it
(eager `strategy.run` + `ReplicaContext.all_reduce`) and compiled (`tf.function`), median of
`--repeats` after one warm-up:

* mirrored: 2 logical CPU devices of this process (`MirroredStrategy`);
* multi-worker: 2 worker processes on 127.0.0.1 (`MultiWorkerMirroredStrategy`, gRPC ring), the
  all-reduce count first as the runner does (a scalar), then the gradients.

Device bytes per step (float32, batch 32): activation up, outputs down, output gradients up,
input gradients down = 4 x 32 x d x 4 bytes; a ring all-reduce moves 2 (W-1)/W x 4P bytes per
worker. These are CPU / loopback figures on a shared 2-core machine; the accelerator scaling
is a model (docs/scaling.md), not measured here.

    .venv/bin/python benchmarks/allreduce.py            # ~2 min; writes results/allreduce.{json,md,png}
    .venv/bin/python benchmarks/allreduce.py --render   # the table and plot again from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import RESULTS, ROOT, machine  # noqa: E402

WIDTHS = [64, 224, 707, 2236]  # P ~ 8.3k, 101k, 1.0M, 10.0M
BATCH = 32


def parameters(width: int) -> int:
    return 2 * width * width + 2 * width


def device_bytes(width: int) -> int:
    return 4 * BATCH * width * 4


def ring_bytes(width: int, workers: int = 2) -> int:
    return int(2 * (workers - 1) / workers * 4 * parameters(width))


def _measure(strategy: Any, repeats: int, count_first: bool) -> list[dict[str, Any]]:
    return [_measure_width(strategy, width, repeats, count_first) for width in WIDTHS]


def _measure_width(strategy: Any, width: int, repeats: int, count_first: bool) -> dict[str, Any]:
    import tensorflow as tf

    shapes = [(width, width), (width,), (width, width), (width,)]
    grads = strategy.run(lambda: [tf.ones(s, tf.float32) for s in shapes])
    count = strategy.run(lambda: tf.ones((), tf.float32))

    def reduce(values: Any, count: Any) -> Any:
        context = tf.distribute.get_replica_context()
        values = [tf.identity(v) for v in values]  # placed on the replica's device (in a tf.function too)
        count = tf.identity(count)
        if count_first:
            context.all_reduce("sum", count)
        return context.all_reduce("sum", values)

    compiled = tf.function(lambda values, count: strategy.run(reduce, args=(values, count)))
    row: dict[str, Any] = {"width": width, "parameters": parameters(width), "device_bytes": device_bytes(width),
                           "allreduce_bytes": ring_bytes(width)}
    for name, call in (("eager_ms", lambda: strategy.run(reduce, args=(grads, count))),
                       ("compiled_ms", lambda: compiled(grads, count))):
        times = []
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            result = call()
            float(tf.reduce_sum(strategy.experimental_local_results(result)[0][0]))  # wait for it
            if attempt:
                times.append((time.perf_counter() - start) * 1000)
        row[name] = statistics.median(times)
    return row


def run_mirrored(repeats: int) -> list[dict[str, Any]]:
    from splitkeras import distributed

    return _measure(distributed.start("mirrored", replicas=2), repeats, count_first=False)


def run_worker(index: int, ports: str, repeats: int) -> list[dict[str, Any]]:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
                                          "task": {"type": "worker", "index": index}})
    from splitkeras import distributed

    return _measure(distributed.start("multi-worker", timeout_seconds=120), repeats, count_first=True)


def _child(args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def measure(repeats: int) -> dict[str, Any]:
    from splitkeras.client import free_port

    mirrored = _child(["--child", "mirrored", "--repeats", str(repeats)])
    mirrored_rows = json.loads(mirrored.communicate()[0].strip().splitlines()[-1])
    ports = f"{free_port()},{free_port()}"
    workers = [_child(["--child", "worker", "--index", str(i), "--ports", ports, "--repeats", str(repeats)])
               for i in range(2)]
    outputs = [json.loads(w.communicate()[0].strip().splitlines()[-1]) for w in workers]
    return {"machine": machine(), "batch": BATCH, "repeats": repeats, "mirrored_2_logical_cpus": mirrored_rows,
            "multi_worker_2_processes_loopback": outputs[0], "multi_worker_worker1": outputs[1],
            "note": "CPU and loopback only (no accelerator lent to this task): the all-reduce of 2 logical CPU "
                    "devices of one process and of 2 worker processes over gRPC on 127.0.0.1, on a shared "
                    "2-core machine. Steps/s scaling over accelerators is not measured here; docs/scaling.md "
                    "gives it as a model."}


def render(data: dict[str, Any]) -> None:
    lines = ["# All-reduce per global step against segment size (`benchmarks/allreduce.py`)", "",
             data["note"], "",
             f"Median of {data['repeats']} after a warm-up; a segment is two Dense(d) layers cut at width d; "
             f"device bytes per step at batch {data['batch']} (float32 activations up and down, gradients up "
             "and down); all-reduce bytes: a ring of 2 workers moves 2(W-1)/W x 4P per worker.", "",
             "| d | parameters | device bytes/step | all-reduce bytes/step | ratio | mirrored 2 CPUs eager ms | "
             "compiled ms | 2 workers loopback eager ms | compiled ms |", "|---|---|---|---|---|---|---|---|---|"]
    for m, w in zip(data["mirrored_2_logical_cpus"], data["multi_worker_2_processes_loopback"]):
        lines.append(f"| {m['width']} | {m['parameters']:,} | {m['device_bytes']:,} | {m['allreduce_bytes']:,} | "
                     f"{m['allreduce_bytes'] / m['device_bytes']:.1f} | {m['eager_ms']:.2f} | {m['compiled_ms']:.2f} | "
                     f"{w['eager_ms']:.2f} | {w['compiled_ms']:.2f} |")
    lines += ["", "Multi-worker rows include the count's scalar all-reduce the runner does first (one round trip)."]
    (RESULTS / "allreduce.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    sizes = [r["parameters"] for r in data["mirrored_2_logical_cpus"]]
    for key, label in (("mirrored_2_logical_cpus", "mirrored, 2 logical CPUs"),
                       ("multi_worker_2_processes_loopback", "2 workers, loopback")):
        for field, style in (("eager_ms", "-o"), ("compiled_ms", "--s")):
            axis.plot(sizes, [r[field] for r in data[key]], style, label=f"{label} ({field[:-3]})")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("segment parameters")
    axis.set_ylabel("all-reduce per global step (ms)")
    axis.set_title("All-reduce cost, CPU/loopback (not accelerators)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "allreduce.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--render", action="store_true", help="redraw the table and plot from the JSON")
    parser.add_argument("--child", choices=["mirrored", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "mirrored":
        print(json.dumps(run_mirrored(args.repeats)))
        return
    if args.child == "worker":
        print(json.dumps(run_worker(args.index, args.ports, args.repeats)))
        return
    path = RESULTS / "allreduce.json"
    data = json.loads(path.read_text()) if args.render else measure(args.repeats)
    if not args.render:
        path.write_text(json.dumps(data, indent=1) + "\n")
    render(data)
    print((RESULTS / "allreduce.md").read_text())


if __name__ == "__main__":
    main()
