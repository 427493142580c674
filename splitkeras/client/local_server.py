"""Helpers for a server on this machine: a free port to start it on, and waiting until it
is ready (`GET /readyz`). Used by `splitkeras demo`, the tests and the benchmarks.

Example:
    >>> port = free_port()                                        # doctest: +SKIP
    >>> wait_until_ready(f"http://127.0.0.1:{port}", timeout=60)  # doctest: +SKIP
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx

from splitkeras.errors import ProtocolError

__all__ = ["free_port", "wait_until_ready"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (for a local server)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_ready(base_url: str, *, timeout: float = 120.0,
                     alive: Callable[[], bool] | None = None) -> None:
    """Poll `GET /readyz` until the server answers 200.

    Args:
        base_url: e.g. `"http://127.0.0.1:8000"`.
        timeout: seconds to wait in all.
        alive: optional check (e.g. that the server process still runs); when it returns
            False, waiting stops at once.

    Raises:
        ProtocolError: the server was not ready in time, or `alive()` turned False.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ProtocolError(f"The server at {base_url} stopped while starting.")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ProtocolError(f"The server at {base_url} was not ready after {timeout:g} s.")
