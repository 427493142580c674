"""Run every benchmark, one after the other, each in its own process; results go to
`benchmarks/results/` (one `.json` and one `.md` per benchmark, and `summary.md`).

Run: `.venv/bin/python benchmarks/run_all.py [--quick]`
(`--quick`: fewer rounds, for a smoke test; the figures are then rougher.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# result name -> (script, full arguments, --quick arguments)
BENCHMARKS = {
    "wire_formats": ("wire_formats", ["--rounds", "15", "--json-rounds", "1"],
                     ["--rounds", "3", "--json-rounds", "1"]),
    "server_throughput": ("server_throughput", ["--rounds", "3", "--window", "8"],
                          ["--rounds", "1", "--window", "3"]),
    "server_sweep": ("server_sweep", ["--rounds", "3"], ["--rounds", "1", "--window", "1"]),
    "http_overhead": ("http_overhead", ["--rounds", "4", "--steps", "12"],
                      ["--rounds", "1", "--steps", "4", "--link-steps", "2"]),
    "http_overhead_width2": ("http_overhead", ["--width", "2", "--rounds", "3", "--steps", "8"],
                             ["--width", "2", "--rounds", "1", "--steps", "4", "--no-links"]),
    "http_overhead_resnet50": ("http_overhead", ["--model", "resnet50", "--rounds", "3", "--steps", "4",
                                                 "--no-links"],
                               ["--model", "resnet50", "--rounds", "1", "--steps", "2", "--no-links"]),
    "split_location": ("split_location", ["--steps", "4"], ["--steps", "2"]),
    "pipelining": ("pipelining", ["--epochs", "5"], ["--epochs", "2"]),
    "pipelining_js": ("pipelining_js", ["--epochs", "2", "--repeats", "2"], ["--epochs", "2", "--repeats", "1"]),
}


# results summarized from their last run, not run here (too long): name
REPORTED_ONLY = ["micro_batching"]


def floor_lines(name: str) -> list[str]:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return [f"- {name}: no results"]
    data = json.loads(path.read_text())
    if name == "micro_batching":
        return [f"- micro_batching (not run by run_all): {r['devices']} devices, {r['mode']}: test accuracy "
                f"{r['accuracy_mean']:.4f}, {r['updates']} updates for {r['applied_steps']} steps (mean group "
                f"{r['mean_group_size']:.1f})" for r in data["runs"]]
    if name == "split_location":
        return [f"- split_location: planner vs measured rank correlation "
                f"{data['spearman_rank_correlation']:.2f}; best cut predicted "
                f"{data['best_predicted']}, measured {data['best_measured']}"]
    floors = data.get("floors") or {"floor": data["floor"]}
    lines = []
    for key, floor in floors.items():
        what = floor.get("what", key)
        cpu = data.get("cpu_ratio_http_to_central")  # the steadier figure on a shared machine
        lines.append(f"- {name} / {what}: {floor['value']:.4g} (floor {floor['floor']:.4g}) -> "
                     f"{'met' if floor['met'] else 'NOT met'}"
                     + (f" (CPU time of both processes: {cpu:.2f}x central)" if cpu is not None else ""))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing; rewrite results/summary.md from the results there")
    args = parser.parse_args()
    failed = []
    summary = ["# Benchmark summary", ""]
    for name, (script, full, quick) in BENCHMARKS.items():
        if args.summary_only or (args.only and name not in args.only):
            continue
        command = [sys.executable, str(HERE / f"{script}.py"), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        status = subprocess.call(command, cwd=HERE.parent)
        print(f"== {name}: exit {status} after {time.perf_counter() - started:.0f} s", flush=True)
        if status:
            failed.append(name)
    for name in [*BENCHMARKS, *REPORTED_ONLY]:
        summary += floor_lines(name)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
