"""The JS device's privacy defences against a REAL server (`splitkeras serve` subprocess,
the runtime in real @tensorflow/tfjs under Node, `mobile_export/tools/device_e2e.mjs`).

* Activation clipping (deterministic: sigma 0) through the JS runtime gives the step the
  Python side gives with `ActivationNoise(clip, 0)`: the same new head and tail weights and
  the head's update going through the clip's Jacobian, to 1e-5 -- and a different one from the step
  without the defence, so the comparison can fail.
* With noise on (max-norm and activation noise, seeded), a JS device trains through the
  server (the statistics of the noise: mobile_export/test/privacy.test.js).
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from js_support import max_weight_diff, require_node, run_driver, tensor
from live_server import KEY, Server

import splitkeras
from splitkeras.cli import main as cli_main
from splitkeras.privacy import ActivationNoise
from splitkeras.privacy.harness import train_in_process
from splitkeras.training import restore_compile_value

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]
CLIP = 0.3


def _model() -> keras.Model:
    keras.utils.set_random_seed(21)
    inputs = keras.Input((5,), name="features")
    h = keras.layers.Dense(6, activation="relu", name="h")(inputs)
    mid = keras.layers.Dense(6, activation="tanh", name="mid")(h)
    out = keras.layers.Dense(3, activation="softmax", name="out")(mid)
    model = keras.Model(inputs, out, name="js_privacy")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return model


DATA = np.random.default_rng(8).normal(size=(8, 5)).astype("float32") * 3
LABELS = np.random.default_rng(9).integers(0, 3, 8).astype("int32")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    node = require_node()
    tmp = tmp_path_factory.mktemp("privacy-js")
    out, ref, app = tmp / "split", tmp / "reference", tmp / "app"
    splitkeras.split(_model(), at=["h", "mid"]).save(out, tfjs=True)
    shutil.copytree(out, ref)
    assert cli_main(["export", str(out), "-o", str(app)]) == 0
    server = Server(out, checkpoint_every=100).start()
    try:
        server.wait_ready()
        base = {"app_dir": str(app), "server_url": server.url, "key": KEY, "seed": 1,
                "x": tensor(DATA), "y": tensor(LABELS)}
        clipped = run_driver(node, {**base, "defences": [{"name": "activation-noise", "clip": CLIP,
                                                          "sigma": 0}]}, tmp)
        noisy = run_driver(node, {**base, "train_x": tensor(np.tile(DATA, (4, 1))),
                                  "train_y": tensor(np.tile(LABELS, 4)), "batch_size": 8, "epochs": 2,
                                  "defences": [{"name": "max-norm", "seed": 3},
                                               {"name": "activation-noise", "clip": 1.0, "sigma": 0.5,
                                                "seed": 4}]}, tmp)
        yield {"ref": ref, "clipped": clipped, "noisy": noisy}
    finally:
        server.stop(signal.SIGTERM, timeout=20)


def _python_step(folder: Path, defences: list[Any]) -> Any:
    split = splitkeras.load_split(folder)
    training = split.training_config
    run = train_in_process(split, DATA, LABELS, defences=defences, epochs=1, batch_size=len(DATA),
                           optimizer=restore_compile_value(training["optimizer"]),
                           loss=restore_compile_value(training["loss"]))
    return split, run


def test_js_activation_clipping_is_the_python_clients_step(served: dict[str, Any]) -> None:
    split, run = _python_step(served["ref"], [ActivationNoise(clip=CLIP, sigma=0.0)])
    assert np.all(np.linalg.norm(run.view.activations[0]["h"], axis=1) <= CLIP * (1 + 1e-6))
    weight_diff, count = max_weight_diff(split, served["clipped"]["weights_after_first_step"])
    assert count == 4 and weight_diff <= 1e-5, weight_diff
    plain, _ = _python_step(served["ref"], [])
    unclipped_diff, _ = max_weight_diff(plain, served["clipped"]["weights_after_first_step"])
    assert unclipped_diff > 1e-3  # the clip changed the step: this comparison can fail


def test_a_js_device_with_noise_on_trains_through_the_server(served: dict[str, Any]) -> None:
    history = served["noisy"]["fit"]["history"]
    assert len(history["loss"]) == 2 and np.all(np.isfinite(history["loss"]))
