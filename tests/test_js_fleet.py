"""The JavaScript device runtime in fleet rounds (mobile_export/src/rounds.js) against a REAL
`splitkeras serve --aggregate fedavg` (subprocess on 127.0.0.1), under Node with the real
@tensorflow/tfjs: a Python device trains a round first, then the JS device's `fit` runs its
rounds (downloads the global weights, uploads its segments' weights as safetensors bodies
after every `--round-steps`, takes the new global weights). With quorum 1 the global weights
after each round are the JS device's own upload, so at the end the server's global device
weights and the JS device's weights must be equal bitwise, every weight named alike."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
from js_support import array, require_node, run_driver, tensor
from live_server import KEY, Server
from models import skip_model

import splitkeras
from splitkeras import wire
from splitkeras.cli import main as cli_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def test_js_device_takes_part_in_fedavg_rounds(tmp_path: Path) -> None:
    from splitkeras.client import DeviceClient, Transport

    node = require_node()
    model = skip_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    out, app = tmp_path / "split", tmp_path / "app"
    splitkeras.split(model, at=["encode", "middle_2"]).save(out, tfjs=True)
    assert cli_main(["export", str(out), "-o", str(app)]) == 0
    python_folder = Path(shutil.copytree(out, tmp_path / "python-device"))
    server = Server(out, checkpoint_every=100, args=["--aggregate", "fedavg", "--round-steps", "2",
                                                     "--round-quorum", "1"]).start()
    rng = np.random.default_rng(9)
    try:
        server.wait_ready()
        with DeviceClient(python_folder, server.url, transport=Transport(server.url, key=KEY)) as python:
            python.compile()
            python.fit(rng.standard_normal((16, 6)).astype("float32"), rng.integers(0, 3, 16), batch_size=8,
                       verbose=0)  # two steps: one round, the global weights move off the bundles
            assert python.rounds is not None and python.rounds.round == 1
        job = {"app_dir": str(app), "server_url": server.url, "key": KEY, "seed": 2, "batch_size": 4,
               "epochs": 2, **{k: tensor(v) for k, v in {
                   "x": rng.standard_normal((4, 6)).astype("float32"),
                   "y": rng.integers(0, 3, 4).astype("int32"),
                   "train_x": rng.standard_normal((8, 6)).astype("float32"),
                   "train_y": rng.integers(0, 3, 8).astype("int32")}.items()}}
        result = run_driver(node, job, tmp_path)
        assert result["rounds"]["round"] == 3 and result["rounds"]["rounds"] == 2  # 4 steps, 2 per round
        assert result["rounds"]["uploadedBytes"] > 0 and result["rounds"]["droppedUploads"] == 0
        with Transport(server.url, key=KEY) as transport:
            transport.open_session()
            assert transport.session is not None and transport.session["aggregation"]["round"] == 3
            response = transport._http.send("GET", f"/v1/sessions/{transport.session['session_id']}/fleet/weights",
                                       None, None, transport._token(), "download")
            global_weights, metadata = wire.decode(response.content)
        assert metadata["round"] == "3"
        js = {name: array(t) for name, t in result["weights"].items()}
        assert sorted(name.split("/", 1)[1] for name in global_weights) == sorted(js)
        for name, value in global_weights.items():
            assert np.array_equal(js[name.split("/", 1)[1]], value), name
    finally:
        server.stop(signal.SIGTERM, timeout=30)
