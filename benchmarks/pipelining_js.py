"""Pipelining in the JS device runtime (`SplitDevice.fit({pipelineDepth: 2})`): epoch time and
test accuracy, depth 1 (sequential) vs depth 2, against a real server over an emulated slow link.

The digits split of `splitkeras demo` (`splitkeras/demo.py`: conv_2 / dense_1 cuts, Adam 1e-3,
batch 32, 1,437 training and 360 test images) is split and exported once (`splitkeras export`);
each run trains a fresh copy under Node (`mobile_export/tools/pipeline_fit.mjs`, the real
@tensorflow/tfjs, cpu backend) against its own `splitkeras serve --max-pending-steps 4`
subprocess on 127.0.0.1, the same weights, the same seeded shuffle (the same batches) in every
run. Runs alternate depth 1, depth 2, depth 1, depth 2, ... so that a load spike on the shared
machine hits both. Test accuracy: `device.evaluate` after the last epoch, over the same link.

The emulated link (`mobile_export/tools/slow_link.mjs`, around the device's fetch): 40 ms one
way, 15 Mbit/s each way, shared (concurrent transfers in one direction are serialised, only
the latency overlaps) -- the figures of the Python client's benchmark (`benchmarks/pipelining.py`):
an LTE phone's round trip (60-100 ms) and a modest LTE rate, so that the bandwidth part is not
negligible (a forward body is 128 KiB here: 70 ms at 15 Mbit/s).

The server and the device (Node) share the machine's CPU cores.

Run: `.venv/bin/python benchmarks/pipelining_js.py [--epochs 2 --repeats 2]` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _common import ROOT, machine, median, start_server, stop_server, table, verdict, write_results

DEPTHS = (1, 2)
LINK = {"latency_ms": 40, "up_mbit": 15, "down_mbit": 15}
MOBILE = ROOT / "mobile_export"
DRIVER = MOBILE / "tools" / "pipeline_fit.mjs"


def tensor(array: np.ndarray) -> dict[str, Any]:
    """The driver's tensor: shape, dtype and base64 little-endian bytes."""
    import base64

    dtype = "int32" if array.dtype.kind in "iu" else "float32"
    data = np.ascontiguousarray(array, dtype="<i4" if dtype == "int32" else "<f4")
    return {"shape": list(array.shape), "dtype": dtype, "data": base64.b64encode(data.tobytes()).decode()}


def run_once(template: Path, app: Path, root: Path, name: str, job: dict[str, Any]) -> dict[str, Any]:
    folder = Path(shutil.copytree(template, root / name))
    key = secrets.token_hex(16)
    process, url = start_server(folder, key, "--max-pending-steps", "4")
    try:
        job_path, out_path = root / f"{name}.job.json", root / f"{name}.out.json"
        job_path.write_text(json.dumps({**job, "app_dir": str(app), "server_url": url, "key": key}))
        completed = subprocess.run(["node", str(DRIVER), str(job_path), str(out_path)], cwd=MOBILE,
                                   capture_output=True, text=True, timeout=1800)
        result: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {
            "error": completed.stderr[-2000:]}
        if "error" in result:
            raise RuntimeError(f"{name}: {result['error']}")
        return result
    finally:
        stop_server(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import splitkeras
    from splitkeras.cli import main as cli_main
    from splitkeras.demo import CUTS, digits_data, digits_model

    (x_train, y_train), (x_test, y_test) = digits_data()
    root = Path(tempfile.mkdtemp(prefix="splitkeras-pipelining-js-"))
    template, app = root / "split", root / "app"
    splitkeras.split(digits_model(), at=CUTS).save(template, tfjs=True)
    if cli_main(["export", str(template), "-o", str(app)]) != 0:
        raise SystemExit("splitkeras export failed")
    job = {"seed": 1, "shuffle": True, "shuffle_seed": 100, "batch_size": args.batch_size,
           "epochs": args.epochs, "link": LINK, "train_x": tensor(x_train), "train_y": tensor(y_train.astype("int32")),
           "test_x": tensor(x_test), "test_y": tensor(y_test.astype("int32"))}
    runs: list[dict[str, Any]] = []
    try:
        for repeat in range(args.repeats):
            for depth in DEPTHS:
                result = run_once(template, app, root, f"r{repeat}_d{depth}", {**job, "pipeline_depth": depth})
                runs.append({"repeat": repeat, "pipeline_depth": depth, "epoch_seconds": result["epoch_seconds"],
                             "loss": result["history"]["loss"], "test": result["test"], "steps": result["steps"],
                             "applied_steps": result["session_state"]["applied_steps"],
                             "link_busy_ms": result["link"], "bytes_sent": result["stats"]["bytesSent"],
                             "bytes_received": result["stats"]["bytesReceived"]})
                print(f"repeat {repeat} depth {depth}: epochs {result['epoch_seconds']} s, "
                      f"test accuracy {result['test']['accuracy']:.4f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    steps_per_epoch = -(-len(x_train) // args.batch_size)
    by_depth = {d: [r for r in runs if r["pipeline_depth"] == d] for d in DEPTHS}
    # the first epoch of a run includes tracing and warm-up: the median of the later ones is the figure
    seconds = {d: median([s for r in rs for s in (r["epoch_seconds"][1:] or r["epoch_seconds"])])
               for d, rs in by_depth.items()}
    accuracy = {d: float(np.mean([r["test"]["accuracy"] for r in rs])) for d, rs in by_depth.items()}
    rows = []
    for depth in DEPTHS:
        rs = by_depth[depth]
        rows.append([f"depth {depth}" + (" (sequential)" if depth == 1 else ""), f"{seconds[depth]:.2f}",
                     f"{seconds[depth] / seconds[1]:.2f}", f"{1e3 * seconds[depth] / steps_per_epoch:.0f}",
                     ", ".join(f"{100 * r['test']['accuracy']:.2f}" for r in rs),
                     f"{100 * (accuracy[depth] - accuracy[1]):+.2f}",
                     ", ".join(f"{r['loss'][-1]:.3f}" for r in rs),
                     ", ".join(str(r["applied_steps"]) for r in rs)])
    ratio, points = seconds[2] / seconds[1], 100 * (accuracy[2] - accuracy[1])
    floors: dict[str, dict[str, Any]] = {
        "depth2_time_ratio": {"what": "depth-2 epoch time / sequential on the emulated link (at most)",
                              "value": ratio, "floor": 0.75, "met": ratio <= 0.75},
        "depth2_accuracy_points": {"what": "|depth-2 - sequential mean test accuracy| in points (at most)",
                                   "value": abs(points), "floor": 0.5, "met": abs(points) <= 0.5}}
    data = {"machine": machine(), "floors": floors, "epochs": args.epochs, "repeats": args.repeats,
            "batch_size": args.batch_size,
            "steps_per_epoch": steps_per_epoch, "link": LINK, "runs": runs,
            "summary": {str(d): {"median_epoch_seconds": seconds[d], "ratio_to_sequential": seconds[d] / seconds[1],
                                 "mean_test_accuracy": accuracy[d]} for d in DEPTHS}}
    markdown = "\n\n".join([
        "# Pipelining in the JS device runtime: epoch time and test accuracy",
        f"Digits split (`splitkeras demo`'s, cuts {CUTS}) trained by the JS runtime under Node (real "
        f"@tensorflow/tfjs, cpu backend) against a real `splitkeras serve --max-pending-steps 4`, batch "
        f"{args.batch_size} ({steps_per_epoch} steps an epoch), {args.epochs} epochs a run, {args.repeats} runs "
        "per depth, alternating, each from the same weights with the same batches. Emulated link around the "
        f"device's fetch: {LINK['latency_ms']} ms one way, {LINK['up_mbit']} Mbit/s up, {LINK['down_mbit']} "
        "Mbit/s down, shared (concurrent transfers in one direction serialised, latency overlapping). "
        "Epoch time: the median of epochs 2.. of every run (the first includes warm-up). The server and "
        f"the device share the machine's CPU cores ({data['machine'].get('cores', '?')} cores: "
        f"{data['machine'].get('cpu', '')}).",
        table(["mode", "epoch s", "vs sequential", "ms/step", "test acc % (runs)", "mean vs seq (points)",
               "last epoch loss (runs)", "applied steps (runs)"], rows),
        f"Issue 17's floors, the Python client's, applied to the JS runtime: depth 2 epoch time <= 0.75 of "
        f"sequential: {verdict(floors['depth2_time_ratio']['met'])} ({ratio:.2f}); test accuracy within 0.5 "
        f"points: {verdict(floors['depth2_accuracy_points']['met'])} ({points:+.2f} points).",
        "Staleness at depth d: the head's and the server's forward of step k run on weights that lack "
        "the updates of up to d-1 earlier steps; the head's backward recomputes its forward on step k's "
        "inputs with the weights as they are then (docs/training.md, Pipelining in the JS runtime). "
        f"One test image is {100 / len(x_test):.2f} points.",
        "Reproduce: `.venv/bin/python benchmarks/pipelining_js.py`.",
    ])
    write_results("pipelining_js", data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
