"""Time per step against the split location, under an emulated link (a small-scale
version of the paper's Figure 4b), measured and as `splitkeras plan` predicts it.

The CNN of `http_overhead.py` (width 1) is cut U-shaped with the tail fixed after
`dense_1` and the first cut moved along the network. For each location a split is
saved, served by a real `splitkeras serve` subprocess on 127.0.0.1, and trained by
`DeviceClient` through `NetworkConditions` (emulated latency and bandwidth); the
central `model.fit` step is measured in the same run to calibrate the planner's
FLOP/s (device and server are the same machine here, so the locations differ by
what crosses the link and by where the FLOPs run only through that calibration).

Run: `.venv/bin/python benchmarks/split_location.py [--bandwidth-mbit 50] [--latency-ms 10]`
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _common import machine, median, start_server, stop_server, table, write_results
from http_overhead import BATCH, build_model, fresh_copy, seconds_per_step

FIRST_CUTS = ["conv_1", "pool_1", "conv_2", "pool_2", "conv_4", "pool_3"]
SECOND_CUT = "dense_1"


def spearman(a: list[float], b: list[float]) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth-mbit", type=float, default=50.0)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import splitkeras
    from splitkeras.client import DeviceClient, NetworkConditions
    from splitkeras.planning import Conditions, plan_pair
    from splitkeras.profile import cut_candidates

    model = build_model()
    candidates = {c.layer: c for c in cut_candidates(model)}
    total_flops = candidates[SECOND_CUT].head_flops + candidates[SECOND_CUT].tail_flops
    rng = np.random.default_rng(0)
    x = rng.random((args.steps * BATCH, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, len(x)).astype("int64")
    central = fresh_copy(model)
    seconds_per_step(central.fit, x, y)  # warm-up
    central_step = median([seconds_per_step(central.fit, x, y) for _ in range(3)])
    speed = 3 * total_flops * BATCH / central_step
    link = NetworkConditions(latency_s=args.latency_ms / 1e3, bandwidth_bps=args.bandwidth_mbit * 1e6)
    conditions = Conditions(bandwidth_bps=link.bandwidth_bps, latency_s=link.latency_s,
                            device_flops=speed, server_flops=speed, batch_size=BATCH)
    rows: list[dict[str, Any]] = []
    for first in FIRST_CUTS:
        folder = Path(tempfile.mkdtemp(prefix="splitkeras-location-"))
        try:
            splitkeras.split(model, at=[first, SECOND_CUT]).save(folder, tfjs=False)
            key = secrets.token_hex(16)
            process, url = start_server(folder, key)
            try:
                device = DeviceClient(folder, url, key=key, network=link)
                device.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
                seconds_per_step(device.fit, x[: 2 * BATCH], y[: 2 * BATCH])  # warm-up
                measured = seconds_per_step(device.fit, x, y)
                stats = device.stats
                device.close()
            finally:
                stop_server(process)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        plan = plan_pair(candidates[first], candidates[SECOND_CUT], conditions)
        rows.append({"first_cut": first, "second_cut": SECOND_CUT,
                     "bytes_per_sample_predicted": plan.wire_bytes_per_sample,
                     "bytes_per_sample_measured": (stats.bytes_sent + stats.bytes_received)
                     / max(stats.samples, 1),
                     "predicted_s_per_step": plan.total_seconds * BATCH,
                     "measured_s_per_step": measured})
        print(f"{first}: predicted {1e3 * rows[-1]['predicted_s_per_step']:.0f} ms, measured "
              f"{1e3 * measured:.0f} ms per step", flush=True)
    rho = spearman([r["predicted_s_per_step"] for r in rows], [r["measured_s_per_step"] for r in rows])
    best_predicted = min(rows, key=lambda r: r["predicted_s_per_step"])["first_cut"]
    best_measured = min(rows, key=lambda r: r["measured_s_per_step"])["first_cut"]
    data = {"benchmark": "split_location", "batch": BATCH, "steps": args.steps,
            "link": {"bandwidth_mbit": args.bandwidth_mbit, "latency_ms": args.latency_ms},
            "central_s_per_step": central_step, "calibrated_flops_per_s": speed,
            "machine": machine(), "rows": rows, "spearman_rank_correlation": rho,
            "best_predicted": best_predicted, "best_measured": best_measured}
    markdown = "\n".join([
        "# Time per step vs split location (small-scale Figure 4b)", "",
        f"CNN of http_overhead.py (61 MFLOP/sample), U-shaped, second cut after `{SECOND_CUT}`, "
        f"batch {BATCH}, emulated link {args.bandwidth_mbit:g} Mbit/s and {args.latency_ms:g} ms "
        f"one way (`NetworkConditions`) on top of loopback. Device and server: this machine, "
        f"calibrated at {speed / 1e9:.1f} GFLOP/s from the central step ({1e3 * central_step:.0f} ms). "
        f"One {args.steps}-step epoch per location after a 2-step warm-up.", "",
        table(["first cut", "KB/sample predicted", "KB/sample on the wire", "predicted ms/step",
               "measured ms/step", "measured / predicted"],
              [[r["first_cut"], f"{r['bytes_per_sample_predicted'] / 1e3:.1f}",
                f"{r['bytes_per_sample_measured'] / 1e3:.1f}",
                f"{1e3 * r['predicted_s_per_step']:.0f}", f"{1e3 * r['measured_s_per_step']:.0f}",
                f"{r['measured_s_per_step'] / r['predicted_s_per_step']:.2f}"] for r in rows]), "",
        f"Rank correlation (Spearman) predicted vs measured: {rho:.2f}; best location predicted "
        f"`{best_predicted}`, measured `{best_measured}`.",
    ])
    paths = write_results("split_location", data, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
