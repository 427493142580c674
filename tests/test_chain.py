"""Splits of four and five segments trained over chains of real servers on 127.0.0.1.

A CNN on the digits data, with a residual block that a cut crosses (two tensors go
over it), is cut three ways:

* `device,server,server,device` (4 segments): the device talks to the first server
  only; the first server hands activations and gradients to the second directly
  (`splitkeras serve --segment middle_1 --next URL`);
* `device,server,device,server,device` (5 segments): two servers, a device segment
  between them, the device drives both (`--server middle_1=URL --server middle_3=URL`).

Each trains 2 epochs over HTTP and must end within 1e-5 of the in-process `Split.fit`
from the same weights and batches (every weight of the joined model). Then the chain's
second server is killed with SIGKILL mid-epoch and restarted: training finishes and
every server applied exactly the steps the device sent. Last, the JavaScript device
(real @tensorflow/tfjs under Node) takes one step on fresh copies of both splits: the
gradients the servers send it and every weight afterwards (device and servers) equal
one in-process step within 1e-5.
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
from js_support import array, max_weight_diff, require_node, run_driver, tensor
from live_server import KEY, Server

import splitkeras
from splitkeras.cli import main as cli_main
from splitkeras.client import DeviceClient
from splitkeras.topology import Topology
from splitkeras.training import SplitTrainer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

EPOCH = dict(batch_size=32, shuffle=False, verbose=0)
SAMPLES = 128  # 4 steps an epoch
CHAIN_CUTS = ["b1_relu", "block_out", "dense_1"]
CHAIN_PLACEMENTS = ["device", "server", "server", "device"]
INTERLEAVED_CUTS = ["b1_relu", "block_out", "flatten", "dense_1"]
INTERLEAVED_PLACEMENTS = ["device", "server", "device", "server", "device"]


def cnn(seed: int = 3) -> keras.Model:
    """8x8 digits -> stem conv -> residual block (b1, b2, + stem) -> conv -> dense -> 10."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    x = keras.Input((8, 8, 1), name="image")
    stem = L.ReLU(name="stem_relu")(L.Conv2D(6, 3, padding="same", name="stem")(x))
    b1 = L.ReLU(name="b1_relu")(L.Conv2D(6, 3, padding="same", name="b1")(stem))
    b2 = L.Conv2D(6, 3, padding="same", name="b2")(b1)
    block = L.ReLU(name="block_out")(L.Add(name="add")([stem, b2]))
    y = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c3")(block)
    y = L.Flatten(name="flatten")(y)
    y = L.Dense(16, activation="relu", name="dense_1")(y)
    logits = L.Dense(10, name="logits")(y)
    model = keras.Model(x, logits, name="chain_cnn")
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images[:SAMPLES] / 16.0).astype(np.float32)[..., None]
    return x, data.target[:SAMPLES].astype(np.int64)


def _weights(model: keras.Model) -> dict[str, np.ndarray]:
    return {w.path: np.asarray(w) for w in model.weights}


def _max_diff(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> float:
    assert sorted(left) == sorted(right)
    return max(float(np.max(np.abs(left[k] - right[k]))) for k in left)


def _device(folder: Path, urls: dict[str, str]) -> DeviceClient:
    client = DeviceClient(folder, urls, key=KEY)
    for transport in client.transports.values():  # a restarted server takes a TF import
        transport.retries, transport.backoff, transport.max_backoff = 150, 0.05, 1.0
    client.compile()
    return client


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both splits and their four servers, started at once; stopped whatever happens."""
    root = tmp_path_factory.mktemp("chains")
    started: list[Server] = []
    try:
        entries: dict[str, Any] = {}
        for name, cuts, placements in (("chain", CHAIN_CUTS, CHAIN_PLACEMENTS),
                                       ("interleaved", INTERLEAVED_CUTS, INTERLEAVED_PLACEMENTS)):
            for prefix in ("", "js_"):  # the JS device trains its own copies
                template = root / f"{prefix}{name}-template"
                splitkeras.split(cnn(), at=cuts, placements=placements).save(template, tfjs=bool(prefix))
                folder = Path(shutil.copytree(template, root / f"{prefix}{name}"))
                entries[prefix + name] = {"template": template, "folder": folder}
        for prefix in ("", "js_"):
            chain = entries[f"{prefix}chain"]["folder"]
            second = Server(chain, 1, ["--segment", "middle_2"], name=f"{prefix}chain-middle_2")
            first = Server(chain, 1, ["--segment", "middle_1", "--next", second.url],
                           name=f"{prefix}chain-middle_1")
            interleaved = entries[f"{prefix}interleaved"]["folder"]
            servers_5 = {segment: Server(interleaved, 1, ["--segment", segment],
                                         name=f"{prefix}interleaved-{segment}")
                         for segment in ("middle_1", "middle_3")}
            for server in (second, first, *servers_5.values()):
                started.append(server.start())
            entries[f"{prefix}chain"]["servers"] = {"middle_1": first, "middle_2": second}
            entries[f"{prefix}interleaved"]["servers"] = servers_5
        yield entries
    finally:
        for server in started:
            server.stop(signal.SIGTERM, timeout=20)


def _train_and_compare(entry: dict[str, Any], device_urls: dict[str, str]) -> dict[str, Any]:
    for server in entry["servers"].values():
        server.wait_ready()
    x, y = digits()
    reference = splitkeras.load_split(entry["template"])
    client = _device(entry["folder"], device_urls)
    history = client.fit(x, y, epochs=2, **EPOCH)
    expected = reference.fit(x, y, epochs=2, **EPOCH)
    client.save()
    client.close()
    for server in entry["servers"].values():  # a graceful stop writes each server segment back
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        server.start()
    joined = splitkeras.load_split(entry["folder"]).join()
    diff = _max_diff(_weights(reference.join()), _weights(joined))
    print(f"\n{','.join(Topology.from_split(reference).placements)}: max|weight diff| vs in process "
          f"{diff:.3g}; loss {history.history['loss']} vs {expected.history['loss']}")
    assert diff <= 1e-5
    np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=0, atol=1e-5)
    moved = _max_diff(_weights(cnn()), _weights(joined))
    assert moved > 1e-2, "training moved the weights (so the comparison is not trivially true)"
    return {"reference": reference, "client": client}


def test_a_chain_of_two_servers_trains_like_in_process(chains: dict[str, Any]) -> None:
    entry = chains["chain"]
    servers = entry["servers"]
    _train_and_compare(entry, {"middle_1": servers["middle_1"].url})
    # the device spoke to the first server only; both applied every step
    for server in servers.values():
        assert server.wait_ready()["applied_steps"] == 8


def test_b_two_servers_with_a_device_segment_between_train_like_in_process(chains: dict[str, Any]) -> None:
    entry = chains["interleaved"]
    servers = entry["servers"]
    _train_and_compare(entry, {name: server.url for name, server in servers.items()})
    for server in servers.values():
        assert server.wait_ready()["applied_steps"] == 8


def test_c_the_chain_survives_a_killed_middle_server(chains: dict[str, Any]) -> None:
    """SIGKILL the chain's second server mid-epoch and restart it: the first server's
    retries wait for it, training finishes, applied steps equal steps sent everywhere."""
    entry = chains["chain"]
    servers = entry["servers"]
    before = {name: server.wait_ready()["applied_steps"] for name, server in servers.items()}
    x, y = digits()
    client = _device(entry["folder"], {"middle_1": servers["middle_1"].url})
    second = servers["middle_2"]
    original = client.transport.forward
    killed = threading.Event()

    def forward(step: int, tensors: Any) -> Any:
        if step == 2 and not killed.is_set():  # mid-epoch: the chain's second server dies
            killed.set()
            second.stop(signal.SIGKILL)
            second.start()  # not waited for: the first server's retries wait
        return original(step, tensors)

    client.transport.forward = forward  # type: ignore[method-assign]
    history = client.fit(x, y, epochs=1, **EPOCH)
    client.close()
    assert killed.is_set() and second.starts >= 2
    assert np.isfinite(history.history["loss"][0])
    for name, server in servers.items():
        state = server.wait_ready()
        assert state["applied_steps"] == before[name] + 4, (name, state)


def _reference_step(template: Path, x: np.ndarray, y: np.ndarray) -> tuple[Any, dict[str, np.ndarray]]:
    """One in-process step, segment by segment from the saved state; the gradients each server
    segment returns for its inputs, by tensor name."""
    split = splitkeras.load_split(template)
    trainer = SplitTrainer.from_training_config(split, split.training_config)
    trainer.fused = False
    captured: dict[str, np.ndarray] = {}
    for runner, segment in zip(trainer.runners, split.segments):
        if segment.placement == "server":
            def spy(step: Any, grads: Any, original: Any = runner.backward, names: Any = runner.input_names) -> Any:
                result = original(step, grads)
                captured.update({n: np.asarray(g) for n, g in zip(names, result) if g is not None})
                return result

            runner.backward = spy  # type: ignore[method-assign]
    trainer.train_batch(x, y)
    return split, captured


@pytest.mark.parametrize("name", ["js_chain", "js_interleaved"])
def test_d_one_js_device_step_equals_the_in_process_step(chains: dict[str, Any], name: str,
                                                         tmp_path: Path) -> None:
    node = require_node()
    entry = chains[name]
    app = tmp_path / "app"
    assert cli_main(["export", str(entry["folder"]), "-o", str(app)]) == 0
    x, y = digits()
    x, y = x[:32], y[:32].astype(np.int32)
    servers = entry["servers"]
    for server in servers.values():
        server.wait_ready()
    stages = [s.name for s in Topology.from_split(splitkeras.load_split(entry["template"])).server_stages]
    job = {"app_dir": str(app), "key": KEY, "x": tensor(x), "y": tensor(y),
           "servers": {stage: servers[stage].url for stage in stages}}
    result = run_driver(node, job, tmp_path)
    reference, captured = _reference_step(entry["template"], x, y)
    js_grads = result["first_step"]["server_input_gradients"]
    assert js_grads and set(js_grads) <= set(captured)
    grad_diff = max(float(np.max(np.abs(array(g) - captured[n]))) for n, g in js_grads.items())
    device_diff, count = max_weight_diff(reference, result["weights_after_first_step"])
    for server in servers.values():  # a graceful stop writes each server segment back
        server.stop(signal.SIGTERM)
    after = splitkeras.load_split(entry["folder"])
    server_diff = max(_max_diff(_weights(after[s.name].model), _weights(reference[s.name].model))
                      for s in reference.segments if s.placement == "server")
    print(f"\n{name}: JS vs in process after one step: server gradients {sorted(js_grads)} "
          f"max|diff| {grad_diff:.2e}; {count} device weights {device_diff:.2e}; server weights "
          f"{server_diff:.2e}")
    assert grad_diff <= 1e-5 and device_diff <= 1e-5 and server_diff <= 1e-5
    assert count >= 6
