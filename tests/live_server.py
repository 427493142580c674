"""A real `splitkeras serve` process on 127.0.0.1 for end-to-end tests: start, wait until
ready, stop with a signal, restart on the same port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from splitkeras.client import free_port

__all__ = ["KEY", "Server"]

KEY = "e2e-test-key"


class Server:
    """`splitkeras serve FOLDER [ARGS]` on a fixed port of 127.0.0.1; restartable.

    Args:
        folder: the split folder.
        checkpoint_every: `--checkpoint-every`.
        args: more `serve` arguments (e.g. `["--segment", "middle_2", "--next", url]`).
        name: names the log file (default: the folder's name).
        env: more environment variables (e.g. `TF_CONFIG`).
    """

    def __init__(self, folder: Path, checkpoint_every: int, args: list[str] | None = None,
                 name: str | None = None, env: dict[str, str] | None = None) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.checkpoint_every = checkpoint_every
        self.args = list(args or [])
        self.log = folder.parent / f"{name or folder.name}-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.env = dict(env or {})

    def start(self) -> Server:
        env = dict(os.environ, SPLITKERAS_SERVER_KEY=KEY, TF_CPP_MIN_LOG_LEVEL="3",
                   TF_DETERMINISTIC_OPS="1", **self.env)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "splitkeras.cli", "serve", str(self.folder), "--port",
                 str(self.port), "--checkpoint-every", str(self.checkpoint_every), *self.args],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2.0,  # the key: the counters too
                                     headers={"Authorization": f"Bearer {KEY}"})
                if response.status_code == 200:
                    return dict(response.json())
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
