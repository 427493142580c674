"""The chaos battery, long form, against real `splitkeras serve` processes on 127.0.0.1;
writes benchmarks/results/chaos_guards.{json,md}. The short form runs in the default test
suite (tests/test_chaos.py); both use the cases of tests/chaos_support.py.

1. Poison: after 12 honest steps, every poison of the server's mode (U-shaped: activations
   x1e30 and x1e5, NaN, Inf; gradients x1e30, -2e19, x1e5, NaN. Labels on the server:
   sample weights -1e30, -1 and 1e30; activations x1e30 and x1e5; NaN) from an attacker
   session of its own. Each must be refused, the server's predictions for a probe batch and
   its applied-step counter unchanged, the attacker's pending step kept (a backward), and
   the honest device must train on with finite results.
2. Abandoned sessions: `--sessions` sessions each leave a pending batch-64 forward of a
   1024-wide segment and go silent; with `--session-ttl 10` the server must close them all
   and its RSS (/proc/PID/statm) come back within 10 % of before.
3. Many devices: `--devices` threads x `--steps` steps through `Transport`, a quarter of the
   answers lost on the way back (retried): applied steps == steps sent, no 5xx.
4. The guard's cost: a guarded `SegmentRunner` step (forward + backward, Adam) over an
   unguarded one, in process, interleaved rounds, median of the per-round ratios: a tiny
   segment (overhead-bound) and the 1.1M-parameter middle of benchmarks/step_time.py.

Usage:
    python benchmarks/chaos.py [--devices 64] [--steps 50] [--sessions 1000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from splitkeras.cli.serve import server_environment  # noqa: E402

server_environment()  # the allocator settings `splitkeras serve` runs with (before TensorFlow loads)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from _common import machine, median, start_server, stop_server, table, write_results  # noqa: E402
from chaos_support import abandoned_sessions, many_devices, poison_battery, predictions, process_rss  # noqa: E402

KEY = "chaos-key"


def serve(folder: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    return start_server(folder, KEY, *args, timeout=300, log_path=folder.parent / f"{folder.name}-server.log")


def counters(client: httpx.Client) -> dict[str, Any]:
    return dict(client.get("/readyz", headers={"Authorization": f"Bearer {KEY}"}).json())


# --------------------------------------------------------------------------------------- parts


def run_poison(root: Path) -> dict[str, Any]:
    from server_fixtures import make_split

    rows: list[dict[str, Any]] = []
    carried: dict[str, bool] = {}
    counted: dict[str, int] = {}
    for mode in ("u_shaped", "labels_on_server"):
        folder = make_split(root / f"poison-{mode}", mode)
        process, url = serve(folder)
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                probe = predictions(client, KEY)

                def state(client: httpx.Client = client, probe: Any = probe) -> Any:
                    return probe(), counters(client)["applied_steps"]

                results, carried[mode] = poison_battery(client, KEY, state, lambda a, b: a == b)
                refused = counters(client)["refused_steps"]
        finally:
            stop_server(process)
        for r in results:
            rows.append({"mode": mode, "case": r.case, "route": r.route, "status": r.status, "code": r.code,
                         "unchanged": r.unchanged, "step_kept": r.step_kept, "ok": r.ok})
        counted[mode] = refused
    return {"rows": rows, "honest_device_carried_on": carried, "refused_counters": counted}


def run_memory(root: Path, sessions: int) -> dict[str, Any]:
    from server_fixtures import make_split

    folder = make_split(root / "memory", "u_shaped", width=1024)
    process, url = serve(folder, "--max-batch", "64", "--session-ttl", "10", "--max-sessions", str(sessions + 64))
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            return abandoned_sessions(client, KEY, process_rss(process.pid), sessions=sessions, batch=64)
    finally:
        stop_server(process)


def run_devices(root: Path, devices: int, steps: int) -> dict[str, Any]:
    from server_fixtures import make_split

    folder = make_split(root / "devices", "u_shaped")
    process, url = serve(folder, "--max-sessions", str(4 * devices))
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            result = many_devices(url, KEY, lambda: int(counters(client)["applied_steps"]), devices=devices,
                                  steps=steps, retry_rate=0.25)
            refused = counters(client)["refused_steps"]
    finally:
        stop_server(process)
    return {**result.__dict__, "refused": refused}


def run_cost(rounds: int, steps: int) -> list[dict[str, Any]]:
    import keras
    from server_fixtures import u_model, wide_model
    from step_time import CUTS, build_cnn

    import splitkeras
    from splitkeras.engine import SegmentRunner
    from splitkeras.guard import UpdateGuard

    cases = {
        "tiny (3-unit Dense + BN + ReLU, batch 8)": (lambda: splitkeras.split(u_model(), at=["h", "m"])["middle"],
                                                     8),
        "wide (BN + ReLU on 1024, batch 64)": (lambda: splitkeras.split(wide_model(1024), at=["h", "m"])["middle"],
                                               64),
        "step_time.py's middle (2 conv + 1M dense, 1.1M params, batch 32)": (
            lambda: splitkeras.split(build_cnn(), at=CUTS)["middle"], 32),
    }
    out = []
    for name, (make, batch) in cases.items():
        runners = {kind: SegmentRunner(make(), keras.optimizers.Adam(1e-3), guard=UpdateGuard() if kind else None)
                   for kind in (False, True)}
        segment = runners[False].segment
        rng = np.random.default_rng(0)
        xs = [[rng.standard_normal((batch, *(d or 1 for d in s.shape[1:]))).astype(np.float32)
               for s in segment.inputs] for _ in range(steps)]
        gs = [[(rng.standard_normal((batch, *(d or 1 for d in s.shape[1:]))) / batch).astype(np.float32)
               for s in segment.outputs] for _ in range(steps)]

        def run(runner: SegmentRunner, count: int, xs: list[Any] = xs, gs: list[Any] = gs) -> float:
            started = time.perf_counter()
            for k in range(count):
                runner.forward(k, xs[k % len(xs)])
                runner.backward(k, gs[k % len(gs)])
            return (time.perf_counter() - started) / count

        for runner in runners.values():
            run(runner, 3)  # tracing
        per_round = max(steps, int(0.4 / run(runners[False], steps)))  # ~0.4 s a variant a round
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for kind in ((False, True) if r % 2 == 0 else (True, False)):
                times[kind].append(run(runners[kind], per_round))
        ratios = [g / p for g, p in zip(times[True], times[False])]
        params = sum(int(np.prod(v.shape)) for v in segment.model.trainable_variables)
        out.append({"segment": name, "params": params, "steps_per_round": per_round,
                    "plain_ms": 1e3 * median(times[False]),
                    "guarded_ms": 1e3 * median(times[True]), "ratio": median(ratios)})
    return out


# ----------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cost-steps", type=int, default=10)
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        root = Path(tmp)
        poison = run_poison(root)
        memory = run_memory(root, args.sessions)
        devices = run_devices(root, args.devices, args.steps)
    cost = run_cost(args.rounds, args.cost_steps)
    data: dict[str, Any] = {"machine": machine(), "poison": poison, "memory": memory, "devices": devices, "cost": cost,
            "seconds": time.time() - started, "args": vars(args)}
    refused = sum(r["ok"] for r in poison["rows"])
    memory_ok = memory["sessions_left"] == 0 and memory["rss_after_mib"] <= 1.1 * memory["rss_before_mib"]
    devices_ok = (devices["sent"] == devices["applied_by_server"] == devices["applied_by_sessions"] ==
                  args.devices * args.steps and devices["server_errors"] == 0 and not devices["failures"])
    md = [
        "# Chaos battery: guards, bounded resources, retries (`benchmarks/chaos.py`)",
        "",
        f"Real `splitkeras serve` processes on 127.0.0.1, one machine ({data['machine']['cores']} cores, "
        f"load {data['machine']['load_average_at_start']}); {data['seconds']:.0f} s in all. Short form in the "
        "default suite: `tests/test_chaos.py`.",
        "",
        f"## 1. Poison: {refused} of {len(poison['rows'])} refused with the model unchanged",
        "",
        "Each from an attacker session of its own after 12 honest steps; *unchanged*: the server's predictions "
        "for a probe batch (weights and moving statistics) and its applied-step counter, before and after; "
        "*kept*: a refused backward leaves the attacker's step pending.",
        "",
        table(["mode", "poison", "route", "answer", "unchanged", "kept"],
              [[r["mode"], r["case"], r["route"], f"{r['status']} `{r['code']}`", r["unchanged"],
                "" if r["step_kept"] is None else r["step_kept"]] for r in poison["rows"]]),
        "",
        "The honest device trained on afterwards (3 steps, all 200, finite results): "
        + ", ".join(f"{mode} {poison['honest_device_carried_on'][mode]}" for mode in ("u_shaped", "labels_on_server"))
        + "; the servers' `refused_steps` counters (with the key, `/readyz`): "
        + ", ".join(f"{mode} {poison['refused_counters'][mode]}" for mode in ("u_shaped", "labels_on_server")) + ".",
        "",
        f"## 2. Abandoned sessions: {memory['sessions']} pending batch-64 forwards (1024 wide)",
        "",
        table(["RSS before", "with the sessions", "after the idle sweep (--session-ttl 10)", "sessions left",
               "within 10 %"],
              [[f"{memory['rss_before_mib']:.0f} MiB", f"{memory['rss_with_sessions_mib']:.0f} MiB",
                f"{memory['rss_after_mib']:.0f} MiB", memory["sessions_left"], memory_ok]]),
        "",
        f"## 3. {args.devices} devices x {args.steps} steps, 25 % of the answers lost",
        "",
        table(["steps sent", "applied (server)", "applied (sessions)", "requests", "answers lost (retried)", "5xx",
               "refused", "failures", "seconds", "applied == sent"],
              [[devices["sent"], devices["applied_by_server"], devices["applied_by_sessions"], devices["requests"],
                devices["lost"], devices["server_errors"], devices["refused"], len(devices["failures"]),
                f"{devices['seconds']:.1f}", devices_ok]]),
        "",
        "## 4. The guard's cost per step (forward + backward, Adam; in process)",
        "",
        f"{args.rounds} interleaved rounds of about 0.4 s per variant; medians of the step times, and the median "
        "of the per-round ratios. Shared machine: the ratio is the figure to read. The guarded step is bitwise the "
        "unguarded one (tests/test_guard.py). A step over HTTP costs milliseconds more on top of these (decode, "
        "encode, the request), so the guard's share of a served step is smaller.",
        "",
        table(["segment", "params", "steps a round", "unguarded ms/step", "guarded ms/step",
               "guarded / unguarded (median of rounds)"],
              [[c["segment"], c["params"], c["steps_per_round"], f"{c['plain_ms']:.2f}", f"{c['guarded_ms']:.2f}",
                f"{c['ratio']:.3f}"] for c in cost]),
    ]
    json_path, md_path = write_results("chaos_guards", data, "\n".join(md))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
