"""Fleet rounds end to end: `splitkeras serve --aggregate ...` in a subprocess on 127.0.0.1,
Python `DeviceClient`s in this process (threads), the claims of docs/training.md "Fleets":

(a) one device with aggregation on trains bitwise as it does without (the average of one
    upload is that upload, and taking it back changes no bit), over HTTP, against a server
    without aggregation and against in-process `Split.fit`;
(b) SplitFed, 8 devices in lockstep (every device's forward of a step before any backward),
    one SGD step per round, full participation: the global device weights and the server's
    middle equal the central update this implies, computed here with the joined model:
    device weights W - lr * sum_k n_k g_k(W, M) / sum_k n_k, the middle
    M - lr * sum_k h_k(W, M), with g_k, h_k the gradients of device k's mean batch loss.
    Checked for identical data on every device and for different data and batch sizes;
(c) an acknowledged upload survives kill -9 of the server and a restart (the write-ahead log).
"""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from client_support import DATA, assert_same_training, make_split_folder
from live_server import KEY, Server
from models import skip_model

import splitkeras

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

DEVICES = 8
LEARNING_RATE = 0.1
ROUNDING = 1e-6  # float32 rounding of sums of 8 terms, grown over three rounds


def _sgd_split(folder: Path) -> Path:
    model = skip_model()
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    splitkeras.split(model, at=["encode", "middle_2"]).save(folder)
    return folder


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three servers start at once: one device with and without aggregation, and the fleet."""
    root = tmp_path_factory.mktemp("fleet-e2e")
    started: dict[str, Any] = {}
    try:
        template = make_split_folder(root / "u-template", "u_shaped")
        for name, args in (("plain", []), ("one", ["--aggregate", "fedavg", "--round-steps", "2",
                                                    "--round-quorum", "1"])):
            folder = Path(shutil.copytree(template, root / name))
            started[name] = Server(folder, checkpoint_every=100, args=args).start()
        fleet_template = _sgd_split(root / "sgd-template")
        folder = Path(shutil.copytree(fleet_template, root / "fleet"))
        started["fleet"] = Server(folder, checkpoint_every=1000, args=[
            "--aggregate", "fedavg", "--round-steps", "1", "--round-quorum", str(DEVICES),
            "--round-deadline", "600"]).start()
        yield {"servers": started, "template": template, "fleet_template": fleet_template}
    finally:
        for server in started.values():
            server.stop(signal.SIGTERM, timeout=30)


def _device(server: Server) -> Any:
    from splitkeras.client import DeviceClient, Transport

    transport = Transport(server.url, key=KEY, retries=20, backoff=0.05, max_backoff=1.0)
    client = DeviceClient(server.folder, server.url, transport=transport)
    client.compile()
    return client


def _device_weights(client: Any) -> dict[str, np.ndarray]:
    return {f"{s.name}/{v.path}": v.numpy() for s in client.split.segments if s.placement == "device"
            for v in s.model.weights}


def test_a_one_device_with_aggregation_trains_bitwise_as_without(servers: dict[str, Any]) -> None:
    plain, one = servers["servers"]["plain"], servers["servers"]["one"]
    plain.wait_ready(), one.wait_ready()
    epoch = dict(batch_size=16, shuffle=False, verbose=0, epochs=2)
    with _device(plain) as without, _device(one) as with_rounds:
        expected = without.fit(*DATA, **epoch)
        history = with_rounds.fit(*DATA, **epoch)
        assert with_rounds.rounds is not None and with_rounds.rounds.stats.rounds == 4  # 8 steps, 2 per round
        assert history.history["loss"] == expected.history["loss"]
        a, b = _device_weights(without), _device_weights(with_rounds)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        x = DATA[0]
        assert np.array_equal(without.predict(x, verbose=0), with_rounds.predict(x, verbose=0))  # the middle too
        reference = splitkeras.load_split(servers["template"])
        in_process = reference.fit(*DATA, **epoch)
        diffs = assert_same_training(with_rounds, history, reference, in_process)
        print("one device with aggregation vs in-process Split.fit:", diffs)


def _lockstep(clients: list[Any]) -> None:
    """Hold every backward until all devices have sent their forward of that step."""
    barrier = threading.Barrier(len(clients), timeout=300)
    for client in clients:
        original = client.transport.backward

        def backward(step: int, grads: Any, original: Any = original) -> Any:
            barrier.wait()
            return original(step, grads)

        client.transport.backward = backward


def _fit_all(clients: list[Any], shares: list[tuple[np.ndarray, np.ndarray]], steps: int) -> None:
    errors: list[BaseException] = []

    def run(client: Any, x: np.ndarray, y: np.ndarray) -> None:
        try:
            client.fit(x, y, batch_size=len(x) // steps, shuffle=False, verbose=0, epochs=1)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(c, *share)) for c, share in zip(clients, shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors


class Central:
    """The joined model, trained by the update SplitFed implies (see the module docstring)."""

    def __init__(self, template: Path) -> None:
        split = splitkeras.load_split(template)
        self.model = split.join()
        by_path = {v.path: v for v in self.model.trainable_variables}
        self.device = [by_path[v.path] for s in split.segments if s.placement == "device"
                       for v in s.model.trainable_variables]
        self.middle = [by_path[v.path] for s in split.segments if s.placement == "server"
                       for v in s.model.trainable_variables]
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def _grads(self, x: np.ndarray, y: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        with tf.GradientTape() as tape:
            loss = self.loss(y, self.model(x, training=True))
        grads = tape.gradient(loss, self.device + self.middle)
        return [g.numpy() for g in grads[:len(self.device)]], [g.numpy() for g in grads[len(self.device):]]

    def round(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        grads = [self._grads(x, y) for x, y in batches]
        total = float(sum(len(x) for x, _ in batches))
        lr = np.float32(LEARNING_RATE)
        for i, variable in enumerate(self.device):
            w = variable.numpy()
            mean = sum(np.float64(len(x)) * (w - lr * g[0][i]).astype(np.float64) for (x, _), g in zip(batches, grads))
            variable.assign((mean / total).astype(np.float32))
        for i, variable in enumerate(self.middle):
            m = variable.numpy()
            for _, h in grads:
                m = m - lr * h[i]
            variable.assign(m)


def test_b_splitfed_eight_devices_in_lockstep_equal_the_central_update(servers: dict[str, Any]) -> None:
    server = servers["servers"]["fleet"]
    server.wait_ready()
    rng = np.random.default_rng(5)
    clients = [_device(server) for _ in range(DEVICES)]
    central = Central(servers["fleet_template"])
    try:
        _lockstep(clients)
        x, y = rng.standard_normal((8, 6)).astype("float32"), rng.integers(0, 3, 8).astype("int64")
        _fit_all(clients, [(x, y)] * DEVICES, steps=1)  # identical data: one round
        central.round([(x, y)] * DEVICES)
        shares = [(rng.standard_normal((2 * (4 + k), 6)).astype("float32"),
                   rng.integers(0, 3, 2 * (4 + k)).astype("int64")) for k in range(DEVICES)]
        _fit_all(clients, shares, steps=2)  # different data and batch sizes: two rounds
        for step in range(2):
            central.round([(sx[step * len(sx) // 2:(step + 1) * len(sx) // 2],
                            sy[step * len(sy) // 2:(step + 1) * len(sy) // 2]) for sx, sy in shares])
        weights = [_device_weights(c) for c in clients]
        assert all(np.array_equal(weights[0][k], w[k]) for w in weights for k in w)  # one global model
        assert clients[0].rounds is not None and clients[0].rounds.round == 3
        device_diff = max(float(np.max(np.abs(weights[0][f"{s}/{v.path}"] - v.numpy())))
                          for s in ("head", "tail") for v in central.device if f"{s}/{v.path}" in weights[0])
    finally:
        for client in clients:
            client.close()
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # writes the middle and the global device segments
    joined = splitkeras.load_split(server.folder).join()  # what `splitkeras join` gives
    joined_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(joined.get_weights(), central.model.get_weights()))
    print(f"SplitFed 8 devices vs the central update: device weights {device_diff:.2e}, joined model "
          f"{joined_diff:.2e}")
    assert device_diff <= ROUNDING and joined_diff <= ROUNDING


def test_c_an_acknowledged_upload_survives_kill_9(tmp_path: Path) -> None:
    """A real server killed -9 right after it acknowledged an upload: after the restart the
    round still holds it, and the next upload closes the round with the exact average of both."""
    from splitkeras import fleet, wire
    from splitkeras.client import Transport

    folder = _sgd_split(tmp_path / "kill")
    server = Server(folder, checkpoint_every=1000, args=["--aggregate", "fedavg", "--round-quorum", "2"]).start()
    rng = np.random.default_rng(8)

    def fleet_path(transport: Transport, route: str) -> str:
        assert transport.session is not None
        return f"/v1/sessions/{transport.session['session_id']}/fleet{route}"

    def call(transport: Transport, method: str, route: str, body: bytes | None = None) -> Any:
        return transport._http.send(method, fleet_path(transport, route), body, wire.MEDIA_TYPE if body else None,
                               transport._token(), route)

    try:
        server.wait_ready()
        with Transport(server.url, key=KEY, retries=150, backoff=0.05, max_backoff=1.0) as first:
            first.open_session()
            start, _ = wire.decode(call(first, "GET", "/weights").content)
            mine = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in start.items()}
            answer = call(first, "POST", "/rounds/0/weights", wire.encode(mine, metadata={"samples": "3"}))
            assert answer.json()["uploads"] == 1
            server.stop(signal.SIGKILL)
            server.start().wait_ready()
            state = call(first, "GET", "").json()  # the session came back from the log too
            assert state["round"] == 0 and state["uploads"] == 1 and state["samples"] == 3
            with Transport(server.url, key=KEY) as second:
                second.open_session()
                theirs = {k: (v - 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in start.items()}
                assert call(second, "POST", "/rounds/0/weights",
                            wire.encode(theirs, metadata={"samples": "5"})).json()["closed"] is True
                averaged, metadata = wire.decode(call(second, "GET", "/weights").content)
        assert metadata["round"] == "1"
        expected = fleet.fedavg([(mine, 3), (theirs, 5)])
        assert all(np.array_equal(averaged[k], expected[k]) for k in expected)
    finally:
        server.stop(signal.SIGTERM, timeout=30)
