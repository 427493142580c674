"""`--strategy`: the server segment on tf.distribute (splitkeras.distributed, docs/scaling.md).

* mirrored, in a fresh process (its 2 logical CPUs must be made before TensorFlow starts): a
  `DistributedRunner` equals a one-device `SegmentRunner` on the same steps, within bounds drawn
  from float32's eps and the sizes (tests/distributed_support.py);
* mirrored, a real `splitkeras serve --strategy mirrored --replicas 2`, against an in-process runner;
* multi-worker, two real workers on 127.0.0.1 (TF_CONFIG): the weights' digests agree on both after
  every global step, training over both equals one runner on the same steps, and a worker killed
  with SIGKILL is reported (`/readyz` 503 `worker_lost`, a step refused 503 `worker_lost`) within
  the collective timeout, not a hang;
* what is refused, in one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import keras
import numpy as np
import pytest

import splitkeras
from splitkeras import distributed, wire
from splitkeras.client import free_port
from splitkeras.client.transport import Transport
from splitkeras.protocol import STEP_HEADER
from tests.live_server import KEY, Server

ROOT = Path(__file__).resolve().parents[1]
EPS32 = float(np.finfo(np.float32).eps)
BATCH, HIDDEN, STEPS, LEARNING_RATE = 7, 16, 3, 0.01
TIMEOUT = 3.0  # --collective-timeout of the multi-worker test


def dist_model() -> keras.Model:
    """features(8) -> h(8) | mid(16, relu, L2) -> m(4) | logits(2): a middle segment without
    BatchNormalization, with a weight regularizer (its loss must count once per step)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8,), name="features")
    x = keras.layers.Dense(8, name="h")(inputs)
    x = keras.layers.Dense(HIDDEN, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3), name="mid")(x)
    x = keras.layers.Dense(4, name="m")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE, clipnorm=0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dist") / "split"
    splitkeras.split(dist_model(), at=["h", "m"]).save(folder)
    return folder


def copy_folder(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def reference(folder: Path) -> Any:
    """One device: the middle segment's `SegmentRunner`, as a server without --strategy builds it."""
    from converters.keras_io import load_model
    from splitkeras.engine import SegmentRunner
    from splitkeras.manifest import Manifest
    from splitkeras.segments import Segment

    manifest = Manifest.read(folder)
    entry = manifest.segment("middle")
    segment = Segment("middle", "server", load_model(folder / entry.keras_file, compile=False), entry.inputs,
                      entry.outputs)
    return SegmentRunner.for_segment(segment, manifest.training["optimizer"],
                                     [s.name for s in manifest.model_inputs], jit_compile=False)


def steps(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH, 8)).astype("float32"), rng.standard_normal((BATCH, 4)).astype("float32"))
            for _ in range(count)]


def trained_weights(folder: Path) -> list[np.ndarray]:
    from converters.keras_io import load_model

    return [np.asarray(v) for v in load_model(folder / "middle.keras", compile=False).trainable_weights]


def weight_bound(updates: int, weights: list[np.ndarray]) -> float:
    """Per update: the weight gradient summed over BATCH samples in another order (relative
    BATCH * eps, which Adam passes on at most LEARNING_RATE times), and the weight's rounding."""
    biggest = max(float(np.abs(w).max()) for w in weights)
    return 2 * updates * (LEARNING_RATE * BATCH * EPS32 + EPS32 * biggest)


def close(actual: np.ndarray, expected: np.ndarray, fan_in: int) -> None:
    """A sum over `fan_in` terms in another order: within fan_in * eps of its scale."""
    bound = fan_in * EPS32 * float(np.abs(expected).max())
    assert float(np.abs(actual - expected).max()) <= bound


def readyz(server: Server) -> httpx.Response:
    return httpx.get(f"{server.url}/readyz", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)


# ---- mirrored ----------------------------------------------------------------------------------------
def test_mirrored_runner_equals_one_device() -> None:
    done = subprocess.run([sys.executable, "-m", "tests.distributed_support", "mirrored"], cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["replicas"] == 2
    assert found["replicas_differ"] == 0.0  # one update, applied on every replica
    assert found["outputs"] <= found["output_bound"]
    assert found["input_grads"] <= found["input_grad_bound"]
    assert found["weights"] <= found["weight_bound"]
    assert found["scaled_weights"] <= found["scaled_bound"]  # backward(..., gradient_scale=1/3), SGD


def test_mirrored_server_equals_one_device(split_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(split_folder, tmp_path / "mirrored")
    expected = reference(folder)
    server = Server(folder, 1000, ["--strategy", "mirrored", "--replicas", "2", "--no-guard"]).start()
    try:
        server.wait_ready()
        transport = Transport(server.url, key=KEY)
        opened = transport.open_session("float32")
        assert opened["max_pending_steps"] == 1  # no pipelined sessions under a strategy (docs/scaling.md)
        for step, (x, g) in enumerate(steps(5, STEPS)):
            outputs, _ = transport.forward(step, {"h": x})
            grads = transport.backward(step, {"m": g})
            close(outputs["m"], np.asarray(expected.forward(step, [x])[0]), HIDDEN)
            close(grads["h"], np.asarray(expected.backward(step, [g])[0]), HIDDEN)
        state = readyz(server).json()["distributed"]
        assert (state["replicas"], state["workers"], state["applied_updates"]) == (2, 1, STEPS)
        assert state["weights_sha256"] != "replicas_differ"
        transport.close()
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log_tail()
    weights = [np.asarray(v.numpy()) for v in expected.trainable]
    found = max(float(np.abs(a - b).max()) for a, b in zip(trained_weights(folder), weights))
    assert found <= weight_bound(STEPS, weights)


# ---- multi-worker --------------------------------------------------------------------------------------
def _workers(split_folder: Path, tmp_path: Path) -> list[Server]:
    ports = [free_port(), free_port()]
    servers = []
    for index in range(2):
        config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
        folder = copy_folder(split_folder, tmp_path / f"worker{index}")
        servers.append(Server(folder, 1000, ["--strategy", "multi-worker", "--no-guard", "--collective-timeout",
                                             str(TIMEOUT), "--global-step-ms", "20"],
                              env={"TF_CONFIG": json.dumps(config)}).start())
    return servers


def _agreed(servers: list[Server], updates: int) -> str:
    """The weights' digest once both workers applied `updates` global updates (they must agree)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = [readyz(s).json()["distributed"] for s in servers]
        if all(s["applied_updates"] == updates for s in states):
            again = [readyz(s).json()["distributed"]["weights_sha256"] for s in servers]
            if again == [s["weights_sha256"] for s in states]:  # not read in the middle of an update
                assert again[0] == again[1] != "replicas_differ"
                return str(again[0])
        time.sleep(0.05)
    pytest.fail(f"the workers did not both reach {updates} updates: {states}")


def test_multi_worker_identical_weights_equal_one_server_and_a_lost_worker(split_folder: Path,
                                                                           tmp_path: Path) -> None:
    servers = _workers(split_folder, tmp_path)
    expected = reference(servers[0].folder)
    try:
        for server in servers:
            server.wait_ready()
        transports = [Transport(s.url, key=KEY) for s in servers]
        for transport in transports:
            transport.open_session("float32")
        digests = []
        for step, (x, g) in enumerate(steps(9, 2 * STEPS)):  # worker 1, worker 0, ..., worker 0 last
            transport = transports[(step + 1) % 2]
            outputs, _ = transport.forward(step // 2, {"h": x})
            grads = transport.backward(step // 2, {"m": g})
            close(outputs["m"], np.asarray(expected.forward(step, [x])[0]), HIDDEN)
            close(grads["h"], np.asarray(expected.backward(step, [g])[0]), HIDDEN)
            digests.append(_agreed(servers, step + 1))
        assert len(set(digests)) == len(digests)  # each global step changed the weights
        for transport in transports:
            transport.close()

        # kill -9 one worker: the other reports it, within the collective timeout, and refuses steps
        servers[1].stop(signal.SIGKILL)
        killed = time.monotonic()
        while readyz(servers[0]).status_code == 200:
            assert time.monotonic() - killed < TIMEOUT + 10, "the lost worker was not reported"
            time.sleep(0.1)
        answer = readyz(servers[0])
        assert (answer.status_code, answer.json()["status"]) == (503, "worker_lost")
        opened = httpx.post(f"{servers[0].url}/v1/sessions", json={"wire_dtype": "float32"},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        body = wire.encode({"h": np.zeros((2, 8), np.float32)})
        refused = httpx.post(f"{servers[0].url}/v1/sessions/{opened['session_id']}/forward", content=body,
                             headers={"Authorization": f"Bearer {opened['token']}",
                                      "content-type": wire.MEDIA_TYPE, STEP_HEADER: "0"}, timeout=10)
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "worker_lost")
        # every update is in every worker's checkpoint before its answer: the killed one's too
        saved = json.loads((servers[1].folder / "checkpoints" / "state.json").read_text())
        assert saved["distributed"] == {"applied_updates": 2 * STEPS}
    finally:
        codes = [s.stop() for s in servers]
    assert codes[0] in (0, -signal.SIGTERM), servers[0].log_tail()
    assert "a worker is lost" in servers[0].log_tail()
    weights = [np.asarray(v.numpy()) for v in expected.trainable]
    found = max(float(np.abs(a - b).max()) for a, b in zip(trained_weights(servers[0].folder), weights))
    assert found <= weight_bound(2 * STEPS, weights)

    # the cluster restarted: both workers resume from their checkpoints, at the same weights as before
    for server in servers:
        server.start()
    try:
        states = [server.wait_ready()["distributed"] for server in servers]
        assert [s["applied_updates"] for s in states] == [2 * STEPS, 2 * STEPS]
        assert [s["weights_sha256"] for s in states] == [digests[-1], digests[-1]]
    finally:
        for server in servers:
            server.stop()


def test_multi_worker_global_step_averages_the_workers_steps(tmp_path: Path) -> None:
    """Two in-process workers (tests/distributed_support.py `worker`): a global step holding a device
    step of each applies the MEAN of their weight gradients; one holding a step of worker 0 only (worker
    1 idle) applies that step's. Same weights on both, bitwise; equal to one device to float rounding."""
    from splitkeras.engine import SegmentRunner, new_optimizer
    from tests import distributed_support as support

    ports = f"{free_port()},{free_port()}"
    workers = [subprocess.Popen([sys.executable, "-m", "tests.distributed_support", "worker", str(index), ports,
                                 str(tmp_path / f"worker{index}.npz")], cwd=ROOT, stderr=subprocess.PIPE,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")) for index in range(2)]
    for process in workers:
        _, errors = process.communicate(timeout=300)
        assert process.returncode == 0, errors.decode(errors="replace")[-3000:]
    found = [dict(np.load(tmp_path / f"worker{index}.npz")) for index in range(2)]
    runner = SegmentRunner(support.as_segment(support.segment_model()),
                           new_optimizer(support.optimizer_config("sgd")), jit_compile=False)
    biggest_grad = 0.0
    data = support.batches(2)
    for step in range(support.STEPS):
        pending = [runner.taped_forward(runner._inputs([data[2 * step + i][0]])) for i in range(2)]
        parts = [runner.vjp(p, [data[2 * step + i][1]]) for i, p in enumerate(pending)]
        for i in range(2):
            close(found[i][f"out{step}"], pending[i].outputs[0].numpy(), support.HIDDEN)
            close(found[i][f"grad{step}"], np.asarray(parts[i][1][0]), support.HIDDEN)
        mean = [(a + b) / 2 for a, b in zip(parts[0][0], parts[1][0])]
        biggest_grad = max([biggest_grad] + [float(np.abs(m).max()) for m in mean])
        runner._apply_fn(mean)
    x, g = data[2 * support.STEPS]
    close(found[0]["out_alone"], np.asarray(runner.forward("alone", [x])[0]), support.HIDDEN)
    close(found[0]["grad_alone"], np.asarray(runner.backward("alone", [g])[0]), support.HIDDEN)
    assert int(found[0]["updates"]) == int(found[1]["updates"]) == support.STEPS + 1
    weights = [np.asarray(v.numpy()) for v in runner.trainable]
    biggest = max(float(np.abs(w).max()) for w in weights)
    # per update (SGD: w - lr * g): the gradient over BATCH samples in another order, and w's rounding
    bound = 2 * (support.STEPS + 1) * (support.LEARNING_RATE * support.BATCH * EPS32 * 2 * biggest_grad
                                       + EPS32 * biggest)
    for number, expected in enumerate(weights):
        np.testing.assert_array_equal(found[0][f"w{number}"], found[1][f"w{number}"])
        assert float(np.abs(found[0][f"w{number}"] - expected).max()) <= bound


# ---- what is refused ---------------------------------------------------------------------------------------
def test_refused_segments() -> None:
    from tests.server_fixtures import u_model

    with pytest.raises(splitkeras.errors.TrainingError, match="'bn' is a BatchNormalization"):
        distributed.check_segment(u_model(), holds_labels=False)
    with pytest.raises(splitkeras.errors.TrainingError, match="does not hold the labels"):
        distributed.check_segment(dist_model(), holds_labels=True)


def test_cli_mistakes_are_one_line(split_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from splitkeras.cli import main

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert main(["serve", str(split_folder), "--replicas", "2"]) == 2
    assert capsys.readouterr().err == "error: serve: --replicas needs --strategy mirrored\n"
    assert main(["serve", str(split_folder), "--strategy", "multi-worker", "--no-guard"]) == 1
    assert capsys.readouterr().err.startswith("error: --strategy multi-worker needs TF_CONFIG")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}')
    assert main(["serve", str(split_folder), "--strategy", "multi-worker", "--no-guard"]) == 1
    assert "TF_CONFIG is not a cluster TensorFlow can use" in capsys.readouterr().err
    folder = copy_folder(split_folder, tmp_path / "guarded")
    done = subprocess.run([sys.executable, "-m", "splitkeras.cli", "serve", str(folder), "--strategy", "mirrored",
                           "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode == 1 and lines == ["error: --strategy runs without the guards for now (their checks do "
                                              "not run under tf.distribute yet): add --no-guard, or serve without "
                                              "--strategy."], done.stderr[-2000:]
