"""Helpers for the in-process (ASGI) server tests: tiny splits, a live app on a background
event loop, and snapshots of everything a refused request must leave alone.

A `LiveApp` enters the app's lifespan (so the segment loads and the TTL sweeper runs) on
an event loop in a daemon thread; tests call it synchronously, so one app (and its traced
`tf.function`s) serves many tests.

Example:
    >>> folder = make_split(tmp_path / "u", "u_shaped")                      # doctest: +SKIP
    >>> with LiveApp(settings_for(folder)) as live:                            # doctest: +SKIP
    ...     sid, token = live.open_session()
    ...     r = live.post(f"/v1/sessions/{sid}/forward", tensors={"h": x}, token=token, step=0)
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import keras
import numpy as np

import splitkeras
from server_app import ServerSettings, create_app
from splitkeras import wire
from splitkeras.protocol import STEP_HEADER

__all__ = ["KEY", "MAX_BATCH", "make_split", "copy_split", "settings_for", "LiveApp", "ThreadedServer",
           "snapshot", "assert_same_state", "bearer", "tensor_headers", "step_header", "wide_model", "rss_bytes"]

T = TypeVar("T")
KEY = "test-key"
MAX_BATCH = 8


def u_model(seed: int = 7) -> keras.Model:
    """features(4) -> h(3) | mid(3) -> bn -> m (ReLU) | logits(2): the middle holds a BatchNorm."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="features")
    x = keras.layers.Dense(3, name="h")(inputs)
    x = keras.layers.Dense(3, name="mid")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="m")(x)
    outputs = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inputs, outputs, name="u_model")
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def label_model(seed: int = 7) -> keras.Model:
    """features(4) -> h(3) | mid(3, tanh) -> logits(2): one cut, the labels go to the server."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="features")
    x = keras.layers.Dense(3, name="h")(inputs)
    x = keras.layers.Dense(3, activation="tanh", name="mid")(x)
    outputs = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inputs, outputs, name="label_model")
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def wide_model(width: int, seed: int = 7) -> keras.Model:
    """features(8) -> h(width) | bn -> m (ReLU) | logits(2): a server segment whose pending
    forwards are large (the tape keeps several [batch, width] tensors) and cheap to run."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,), name="features")
    x = keras.layers.Dense(width, name="h")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="m")(x)
    outputs = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inputs, outputs, name="wide_model")
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def make_split(folder: Path, mode: str, width: int | None = None) -> Path:
    """Save a tiny split: `u_shaped` (cuts h, m) or `labels_on_server` (cut h); with `width`,
    the U-shaped `wide_model`."""
    if width is not None:
        splitkeras.split(wide_model(width), at=["h", "m"]).save(folder)
    elif mode == "u_shaped":
        splitkeras.split(u_model(), at=["h", "m"]).save(folder)
    else:
        splitkeras.split(label_model(), at=["h"]).save(folder)
    return folder


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc/self/statm)."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def copy_split(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "ck", ".splitkeras"))
    return target


def settings_for(folder: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = dict(split_dir=folder, key=KEY, checkpoint_dir=folder / "ck",
                                  checkpoint_every=1000, max_batch=MAX_BATCH,
                                  max_pending_steps=1)  # the step rules without pipelining; tests of
                                  # pipelining pass max_pending_steps=N (tests/test_pipeline_server.py)
    values.update(overrides)
    return ServerSettings(**values)


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def step_header(step: int) -> dict[str, str]:
    """The header that carries a step's number (`docs/protocol.md`)."""
    return {STEP_HEADER: str(step)}


def tensor_headers(token: str | None) -> dict[str, str]:
    return {**bearer(token), "content-type": wire.MEDIA_TYPE}


class LiveApp:
    """The app with its lifespan entered, on an event loop in a background thread."""

    def __init__(self, settings: ServerSettings, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = create_app(settings)
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.call(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://testserver")
        self.closed = False

    # ---- running coroutines ------------------------------------------------------------------
    def call(self, awaitable: Awaitable[T]) -> T:
        async def wrapper() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(self.timeout)

    def on_writer(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function` on the service's writer thread (between requests, never during one)."""
        return self.call(self.service.run(function, *args))

    @property
    def service(self) -> Any:
        return self.app.state.service

    # ---- requests ----------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.call(self.client.request(method, path, **kwargs))

    def post(self, path: str, *, tensors: dict[str, Any] | None = None, token: str | None = None,
             step: int | None = None, **kwargs: Any) -> httpx.Response:
        """POST `tensors` (a safetensors body) with the session `token`; `step`: its number,
        sent as the `Splitkeras-Step` header."""
        if step is not None:
            kwargs["headers"] = {**step_header(step), **kwargs.get("headers", {})}
        if tensors is not None:
            kwargs["content"] = wire.encode(tensors)
            kwargs["headers"] = {**tensor_headers(token), **kwargs.get("headers", {})}
        elif token is not None:
            kwargs["headers"] = {**bearer(token), **kwargs.get("headers", {})}
        return self.request("POST", path, **kwargs)

    def get(self, path: str, token: str | None = None) -> httpx.Response:
        return self.request("GET", path, headers=bearer(token))

    def open_session(self, **body: Any) -> tuple[str, str]:
        response = self.request("POST", "/v1/sessions", json=body, headers=bearer(KEY))
        assert response.status_code == 201, response.text
        data = response.json()
        return data["session_id"], data["token"]

    # ---- shutting down -----------------------------------------------------------------------
    def close(self, graceful: bool = True) -> None:
        """Graceful: the lifespan exits (checkpoint + .keras). Otherwise a 'crash': nothing saved."""
        if self.closed:
            return
        self.closed = True
        self.call(self.client.aclose())
        if graceful:
            self.call(self._lifespan.__aexit__(None, None, None))
        else:
            self.call(self._cancel_tasks())
            self.service._writer.shutdown(wait=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @staticmethod
    async def _cancel_tasks() -> None:  # the TTL sweeper: a crashed process runs nothing more
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> LiveApp:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class ThreadedServer:
    """The app under a real uvicorn (the configuration `splitkeras serve` uses) on a free port
    of 127.0.0.1, in a thread of this process: real sockets, TLS, read timeouts, and the
    service at hand for snapshots (`on_writer`)."""

    def __init__(self, settings: ServerSettings, *, tls_cert: str | None = None, tls_key: str | None = None,
                 timeout: float = 120.0) -> None:
        import time

        import uvicorn

        from server_app.launch import uvicorn_config
        from splitkeras.client import free_port

        self.port = free_port()
        self.url = f"{'https' if tls_cert else 'http'}://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn_config(self.app, "127.0.0.1", self.port, read_timeout=settings.read_timeout_seconds,
                                tls_cert=tls_cert, tls_key=tls_key, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the threaded server did not start")
            time.sleep(0.02)

    @property
    def service(self) -> Any:
        return self.app.state.service

    def on_writer(self, function: Callable[..., T], *args: Any) -> T:
        return self.service._writer.submit(function, *args).result()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def snapshot(service: Any) -> dict[str, Any]:
    """Everything a refused request must not change: every model variable (weights, BN moving
    statistics, seed states), every optimizer variable, the counters, sessions and pending tapes."""
    return {
        "model": [np.array(v.numpy(), copy=True) for v in service.segment.model.variables],
        "optimizer": [np.array(v.numpy(), copy=True) for v in service.runner.optimizer.variables],
        "iterations": int(service.runner.optimizer.iterations.numpy()),
        "applied_steps": service.applied_steps,
        "sessions": {s.session_id: (s.next_step, s.pending_step, s.applied_steps, s.lost_step,
                                    s.expired_step) for s in service.sessions},
        "pending": sorted(map(str, service.runner._pending)),
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("iterations", "applied_steps", "sessions", "pending"):
        assert before[key] == after[key], f"{key} changed: {before[key]} -> {after[key]}"
    for key in ("model", "optimizer"):
        assert len(before[key]) == len(after[key])
        for i, (a, b) in enumerate(zip(before[key], after[key])):
            assert np.array_equal(a, b), f"{key} variable {i} changed"
