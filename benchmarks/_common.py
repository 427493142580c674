"""Shared helpers of the benchmarks: machine description, timing, result files.

The benchmarks run on shared machines (other jobs use the same cores), so every
figure that matters is a RATIO of variants measured in the same run, interleaved
round by round, each the median of its rounds. Absolute numbers are reported too,
but only the ratios are meant to be compared across machines.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from splitkeras.client import free_port  # noqa: F401  (the benchmarks import it from here)

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, load, library versions."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in ("numpy", "tensorflow", "keras", "fastapi", "uvicorn", "httpx"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(), "versions": versions,
        "note": "shared machine: compare the ratios (same run, interleaved, medians), "
                "not the absolute figures",
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `results/NAME.json` and `results/NAME.md`; return their paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"


# ---- a real server on loopback ------------------------------------------------------------------


def start_server(split_dir: Path, key: str, *args: str, extra_env: dict[str, str] | None = None,
                 timeout: float = 180.0, log_path: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """`splitkeras serve SPLIT_DIR [ARGS]` in a subprocess on a free loopback port (this checkout's
    code first on the path); waits for /readyz. The server's output goes to `log_path`
    (default SPLIT_DIR/server.log)."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SPLITKERAS_SERVER_KEY=key, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT),
               **(extra_env or {}))
    log_path = log_path or split_dir / "server.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "splitkeras.cli", "serve", str(split_dir), "--port", str(port),
         "--checkpoint-every", "1000000", *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    import signal

    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
