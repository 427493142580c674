"""Starting a server: what `splitkeras serve` checks before it listens, and how uvicorn runs.

* `check_bind`: plain HTTP only on a loopback address, unless `insecure` (a device's
  activations, gradients and session tokens would cross the network in the clear);
  `check_tls`: a certificate and its key, both readable, as a pair.
* `ServerLock`: one server per (split folder, segment): an exclusive `flock` on
  `SPLIT_DIR/.splitkeras/serve-SEGMENT.lock` (released by the kernel when the process
  dies, even by kill -9). Servers of different segments of one folder (a chain) each take
  their own.
* `load_service`: the segment, its optimizer and checkpoint loaded BEFORE uvicorn starts,
  so that a missing, truncated or foreign file is one line (`ServerStartError`), not a
  traceback from uvicorn's lifespan.
* `run`: uvicorn with TLS (`ssl_certfile`/`ssl_keyfile`) and `ReadTimeoutH11`, which
  closes a connection whose request head has not arrived within `read_timeout` seconds, or
  whose body pauses longer than that (a slow client cannot hold a connection open); idle
  keep-alive connections close after `KEEP_ALIVE` seconds, and a request head is at most
  `MAX_HEAD` bytes.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from splitkeras.errors import SplitKerasError

if TYPE_CHECKING:
    from server_app.service import SegmentService
    from server_app.settings import ServerSettings

__all__ = ["ServerStartError", "is_loopback", "check_bind", "check_port", "check_tls", "ServerLock", "load_service",
           "read_timeout_protocol", "uvicorn_config", "KEEP_ALIVE", "MAX_HEAD"]

KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
MAX_HEAD = 16 * 1024  # bytes of request line and headers
log = logging.getLogger("splitkeras.server")


class ServerStartError(SplitKerasError):
    """The server cannot start: a flag, a file, or another server holds the segment."""


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, tls: bool, insecure: bool) -> None:
    """Refuse plain HTTP on a non-loopback `host` unless `insecure`."""
    if not tls and not insecure and not is_loopback(host):
        raise ServerStartError(
            f"--host {host} would serve plain HTTP beyond this machine (activations, gradients and "
            "tokens in the clear): give --tls-cert CERT --tls-key KEY, or --insecure if a proxy in front "
            "terminates TLS.")


def check_port(host: str, port: int) -> None:
    """The address can be listened on now (else one line, before the segment loads)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ServerStartError(f"--host {host}: {error.strerror or error}.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise ServerStartError(f"Cannot listen on {host}:{port}: {error.strerror or error}.") from None


def check_tls(cert: str | None, key: str | None) -> None:
    """Both or neither; readable; a key that belongs to the certificate."""
    if (cert is None) != (key is None):
        raise ServerStartError("TLS needs both --tls-cert and --tls-key (the certificate and its private key).")
    if cert is None or key is None:
        return
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ServerStartError(f"{flag} '{path}' does not exist or is not a file.")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ServerStartError(f"Cannot use --tls-cert '{cert}' with --tls-key '{key}': {error}.") from None


class ServerLock:
    """An exclusive lock on (split folder, segment), held while this object is open."""

    def __init__(self, split_dir: Path, segment: str) -> None:
        self.path = Path(split_dir) / ".splitkeras" / f"serve-{segment}.lock"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise ServerStartError(f"Cannot create the server lock '{self.path}': {error.strerror}.") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise ServerStartError(
                f"Another splitkeras server (pid {holder}) already serves segment '{segment}' of "
                f"{split_dir} (lock {self.path}). Stop it first; one server per segment.") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> ServerLock:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def load_service(settings: ServerSettings) -> SegmentService:
    """The service, loaded now; any failure is one `ServerStartError` line (the traceback
    goes to the debug log)."""
    from server_app.service import SegmentService

    try:
        return SegmentService(settings)
    except SplitKerasError:
        raise
    except Exception as error:  # a file Keras, NumPy or TensorFlow could not take
        log.debug("Loading the server segment failed", exc_info=True)
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ServerStartError(f"Could not load the server segment of '{settings.split_dir}': "
                               f"{type(error).__name__}{': ' + text if text else ''} (--log-level debug "
                               "shows the traceback).") from None


def read_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that is slow to send its request."""

    class ReadTimeoutH11(H11Protocol):
        read_timeout = seconds

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._read_deadline: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._arm()  # the first request head must come in time

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY:  # each pause in the body is bounded
                self._cancel()
                self._arm()
            elif state is h11.IDLE and self.conn.trailing_data[0]:  # a head, in part
                if self._read_deadline is None:
                    self._arm()  # from its first byte; more bytes do not extend it
            else:  # the request is in: the server is working on it
                self._cancel()

        def on_response_complete(self) -> None:
            self._cancel()  # uvicorn's keep-alive timeout takes over
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._read_deadline = self.loop.call_later(self.read_timeout, self._too_slow)

        def _cancel(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _too_slow(self) -> None:
            self._read_deadline = None
            if self.flow is not None and self.flow.read_paused:  # the app is behind, not the client
                self._arm()
                return
            if not self.transport.is_closing():
                log.info("Closed a connection from %s: its request was slower than %g s", self.client,
                         self.read_timeout)
                self.transport.close()

    return ReadTimeoutH11


def uvicorn_config(app: Any, host: str, port: int, *, read_timeout: float, tls_cert: str | None = None,
                   tls_key: str | None = None, log_level: str = "warning") -> Any:
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ssl_certfile=tls_cert,
                          ssl_keyfile=tls_key, http=read_timeout_protocol(read_timeout), lifespan="on",
                          timeout_keep_alive=KEEP_ALIVE, h11_max_incomplete_event_size=MAX_HEAD)
