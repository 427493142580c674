"""The byte-level promise, tested on a real socket: a U-shaped run against a real
`splitkeras serve` with every request and response body recorded (an httpx transport
under the client's `Transport`), and no body holds the inputs or the labels -- as
float32 or float16 bytes, sample by sample (any row order), or in the decoded tensors.

A deliberately leaking device (its head's activation overwritten with the inputs or the
labels, in the ways a bug could) is caught by the same scan: the test can fail.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import keras
import numpy as np
import pytest
from live_server import KEY, Server

import splitkeras
from splitkeras.privacy import scan_bodies

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BATCH = 16
_rng = np.random.default_rng(3)
X = _rng.standard_normal((64, 6)).astype("float32")
Y = _rng.integers(0, 3, 64).astype("int64")
BATCHES = [(X[i:i + BATCH], Y[i:i + BATCH]) for i in range(0, len(X), BATCH)]


class Recorder(httpx.BaseTransport):
    """Sends through a real `httpx.HTTPTransport` and keeps every request and response body."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[bytes] = []
        self.responses: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.read())
        response = self.inner.handle_request(request)
        content = response.read()
        self.responses.append(content)
        headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-encoding"]
        return httpx.Response(response.status_code, headers=headers, content=content, request=request)

    def close(self) -> None:
        self.inner.close()

    @property
    def bodies(self) -> list[bytes]:
        return self.requests + self.responses


def _model() -> keras.Model:
    """features(6) -> encode(8, relu) | middle_1(8) -> middle_2(8, relu) | logits(3)."""
    keras.utils.set_random_seed(11)
    inputs = keras.Input((6,), name="features")
    x = keras.layers.Dense(8, activation="relu", name="encode")(inputs)
    x = keras.layers.Dense(8, name="middle_1")(x)
    x = keras.layers.Dense(8, activation="relu", name="middle_2")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs, name="wire_privacy")
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("privacy-wire")
    folder = root / "split"
    split = splitkeras.split(_model(), at=["encode", "middle_2"])
    assert [s.placement for s in split.segments] == ["device", "server", "device"]
    split.save(folder)
    live = Server(Path(shutil.copytree(folder, root / "served")), checkpoint_every=100).start()
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop(signal.SIGTERM, timeout=20)


def _train(server: Server, wire_dtype: str, leak: Any = None) -> Recorder:
    from splitkeras.client import DeviceClient, Transport

    recorder = Recorder()
    transport = Transport(server.url, key=KEY, http_transport=recorder)
    with DeviceClient(server.folder, server.url, transport=transport, wire_dtype=wire_dtype) as client:
        client.compile()
        if leak is not None:  # the device's own API: what its head hands to the server
            original = client.remote.forward

            def forward(step: int, inputs: Any) -> Any:
                activation = np.array(inputs[0], np.float32)
                leak(activation, *BATCHES[step % len(BATCHES)])
                return original(step, [activation])

            client.remote.forward = forward  # type: ignore[method-assign]
        client.fit(X, Y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
    return recorder


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_no_body_of_a_u_shaped_run_holds_the_inputs_or_the_labels(server: Server, wire_dtype: str) -> None:
    recorder = _train(server, wire_dtype)
    tensor_requests = [b for b in recorder.requests if b and not b.startswith(b"{")]
    assert len(tensor_requests) == 2 * 2 * len(BATCHES)  # forward and backward, every step
    assert scan_bodies(recorder.bodies, X, BATCHES) == []


def _inputs(activation: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    activation[:, :6] = x


def _inputs_permuted(activation: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    activation[:, 1:7] = x[::-1]


def _labels(activation: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    activation[:, 3] = y


def _labels_permuted(activation: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    activation[:, 5] = np.sort(y)


@pytest.mark.parametrize("wire_dtype,leak,expected", [
    ("float32", _inputs, "holds input sample"),
    ("float16", _inputs, "as <f2"),
    ("float32", _inputs_permuted, "as <f4"),
    ("float32", _labels, "column 3 holds the labels"),
    ("float16", _labels_permuted, "column 5 holds the labels of batch 0, permuted"),
])
def test_a_leaking_device_is_caught(server: Server, wire_dtype: str, leak: Any, expected: str) -> None:
    findings = scan_bodies(_train(server, wire_dtype, leak).bodies, X, BATCHES)
    assert any(expected in str(f) for f in findings), findings
