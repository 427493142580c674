"""The write-ahead log's cost per server step: ResNet50 at 64x64, batch 32, the double split
of the paper's Table 1 (`benchmarks/table1.py`: cuts `pool1_pool` and `avg_pool`), the
server segment driven through its step machine in process (forward + backward per step),
with the log fsynced (the default), written without fsync, and off. Variants interleaved
round by round; each figure is the median over rounds.

    .venv/bin/python benchmarks/wal_cost.py [--rounds 5] [--steps 4]

Writes benchmarks/results/wal_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, machine

BATCH = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import keras
    import tensorflow as tf

    import splitkeras
    from server_app.service import SegmentService
    from server_app.settings import ServerSettings
    from splitkeras import wire

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    late = "avg_pool"  # as benchmarks/table1.py's double split
    root = Path(tempfile.mkdtemp())
    splitkeras.split(model, at=["pool1_pool", late]).save(root / "split")
    service = SegmentService(ServerSettings(split_dir=root / "split", key="k", checkpoint_every=10**9,
                                            max_batch=BATCH))
    session, _ = service.open_session("float32")
    rng = np.random.default_rng(0)
    inputs = {s.name: rng.standard_normal((BATCH, *s.sample_shape)).astype("float32")
              for s in service.served.inputs}
    grads = {s.name: rng.standard_normal((BATCH, *s.sample_shape)).astype("float32") * 1e-3
             for s in service.served.outputs}
    forward_body, backward_body = wire.encode(inputs), wire.encode(grads)
    journal = service.steps.journal
    step = 0

    def run(variant: str) -> float:
        nonlocal step
        service.steps.journal = None if variant == "off" else journal
        service.wal.fsync = variant == "fsync"
        started = time.perf_counter()
        for _ in range(args.steps):
            service.forward(session, step, forward_body)
            service.backward(session, step, backward_body)
            step += 1
        return (time.perf_counter() - started) / args.steps

    variants = ["fsync", "no fsync", "off"]
    run("off")  # warm-up: trace the functions
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            times[variant].append(run(variant))
    median = {v: statistics.median(t) for v, t in times.items()}
    bytes_per_step = len(forward_body) + len(backward_body)
    result = {"machine": machine(), "model": "ResNet50 64x64", "batch": BATCH, "cuts": ["pool1_pool", late],
              "rounds": args.rounds, "steps_per_round": args.steps, "seconds_per_step": median,
              "all_seconds": times, "log_bytes_per_step": bytes_per_step,
              "ratio_fsync_vs_off": median["fsync"] / median["off"],
              "ratio_no_fsync_vs_off": median["no fsync"] / median["off"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "wal_cost.json").write_text(json.dumps(result, indent=1))
    lines = ["# Write-ahead log cost per server step (benchmarks/wal_cost.py)", "",
             f"ResNet50 64x64, batch {BATCH}, double split at `pool1_pool` and `{late}`: the server segment "
             f"(forward + backward) through its step machine, in process. {args.rounds} interleaved rounds "
             f"of {args.steps} steps; medians. Log bytes per step: {bytes_per_step:,} (the forward's "
             "activations and the backward's gradients).", "",
             "| log | seconds per step | vs no log |", "|---|---|---|"]
    for variant in variants:
        lines.append(f"| {variant} | {median[variant]:.4f} | {median[variant] / median['off']:.3f} |")
    (RESULTS / "wal_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
