"""The JS device's privacy defences against a REAL server (`splitkeras serve` subprocess,
the runtime in real @tensorflow/tfjs under Node, `mobile_export/tools/device_e2e.mjs`).

* Activation clipping (deterministic: sigma 0) through the JS runtime gives the step the
  Python side gives with `ActivationNoise(clip, 0)`: the same new head and tail weights and
  the head's update going through the clip's Jacobian, to 1e-5 -- and a different one from the step
  without the defence, so the comparison can fail.
* NoPeek (deterministic): one step (U-shaped, with activation clipping too, and labels on
  the server) of the JS runtime with `{name: 'nopeek', alpha}`
  and one of the Python `DeviceClient` with `NoPeek(alpha)`, each against its own real
  uvicorn server from the same weights, leave the same head, tail and server weights to
  1e-5 relative -- and the step without NoPeek leaves other ones, so the comparison can fail
  (the distance correlation itself: mobile_export/test/nopeek.test.js).
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
from js_support import array, max_weight_diff, require_node, run_driver, tensor
from live_server import KEY, Server

import splitkeras
from converters.tfjs_config import tfjs_named_weights
from splitkeras.cli import main as cli_main
from splitkeras.privacy import ActivationNoise, NoPeek
from splitkeras.privacy.harness import train_in_process
from splitkeras.training import restore_compile_value

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]
CLIP = 0.3
ALPHA = 0.5


def _model(optimizer: Any = None) -> keras.Model:
    keras.utils.set_random_seed(21)
    inputs = keras.Input((5,), name="features")
    h = keras.layers.Dense(6, activation="relu", name="h")(inputs)
    mid = keras.layers.Dense(6, activation="tanh", name="mid")(h)
    out = keras.layers.Dense(3, activation="softmax", name="out")(mid)
    model = keras.Model(inputs, out, name="js_privacy")
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
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


def _server_weights(server: Any) -> list[np.ndarray]:
    return server.on_writer(lambda: [np.array(v.numpy()) for v in server.service.segment.model.weights])


def _python_client_step(source: Path, folder: Path, defences: list[Any]) -> dict[str, Any]:
    """One step of the Python DeviceClient against a real uvicorn server of `source`'s copy."""
    from server_fixtures import KEY as SERVER_KEY
    from server_fixtures import ThreadedServer, copy_split, settings_for

    from splitkeras.client import DeviceClient

    copy_split(source, folder)
    with ThreadedServer(settings_for(folder)) as server:
        client = DeviceClient(folder, server.url, key=SERVER_KEY, defences=defences)
        client.compile()
        client.train_on_batch(DATA, LABELS)
        result = {"split": client.split, "server": _server_weights(server)}
        client.close()
    return result


# name: (cut, the JS defences besides NoPeek, the Python ones)
NOPEEK_CASES: dict[str, tuple[list[str], list[dict[str, Any]], Any]] = {
    "u_shaped": (["h", "mid"], [], list),
    "labels_on_server": (["h"], [], list),
    # NoPeek sees the activations before the clip, its gradient joins after the clip's Jacobian
    "u_shaped with clipping": (["h", "mid"], [{"name": "activation-noise", "clip": CLIP, "sigma": 0}],
                               lambda: [ActivationNoise(clip=CLIP, sigma=0.0)]),
}


@pytest.fixture(scope="module", params=list(NOPEEK_CASES))
def nopeek_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from server_fixtures import KEY as SERVER_KEY
    from server_fixtures import ThreadedServer, copy_split, settings_for

    node = require_node()
    cut, js_others, python_others = NOPEEK_CASES[request.param]
    tmp = tmp_path_factory.mktemp("nopeek-js")
    out, app = tmp / "split", tmp / "app"
    # SGD: the weights move by the gradient itself (Adam's first step is lr * sign(gradient))
    split = splitkeras.split(_model(keras.optimizers.SGD(0.1)), at=cut)
    assert split.segments[-1].placement == ("server" if request.param == "labels_on_server" else "device")
    split.save(out, tfjs=True)
    assert cli_main(["export", str(out), "-o", str(app)]) == 0
    with ThreadedServer(settings_for(copy_split(out, tmp / "js"))) as server:
        js = run_driver(node, {"app_dir": str(app), "server_url": server.url, "key": SERVER_KEY, "seed": 1,
                               "x": tensor(DATA), "y": tensor(LABELS),
                               "defences": [*js_others, {"name": "nopeek", "alpha": ALPHA}]}, tmp)
        js_server = _server_weights(server)
    return {"mode": request.param, "js": js["weights_after_first_step"], "js_server": js_server,
            "nopeek": _python_client_step(out, tmp / "nopeek", [NoPeek(alpha=ALPHA), *python_others()]),
            "plain": _python_client_step(out, tmp / "plain", python_others())}


def _relative_diffs(python: dict[str, Any], js_device: dict[str, Any], js_server: list[np.ndarray]) -> list[float]:
    """max|js - python| / max|python| of every head, tail and server weight."""
    pairs = [(array(js_device[name]), keras.ops.convert_to_numpy(variable))
             for segment in python["split"].segments if segment.placement == "device"
             for name, variable in tfjs_named_weights(segment.model)]
    pairs += list(zip(js_server, python["server"]))
    for actual, expected in pairs:
        assert actual.shape == expected.shape
    return [float(np.max(np.abs(a - e)) / np.max(np.abs(e))) for a, e in pairs]


def test_js_nopeek_step_is_the_python_clients_step(nopeek_runs: dict[str, Any]) -> None:
    diffs = _relative_diffs(nopeek_runs["nopeek"], nopeek_runs["js"], nopeek_runs["js_server"])
    without = _relative_diffs(nopeek_runs["plain"], nopeek_runs["js"], nopeek_runs["js_server"])
    print(f"\n{nopeek_runs['mode']}, NoPeek(alpha={ALPHA}), JS vs Python client after one step: "
          f"{len(diffs)} weights, max relative |diff| {max(diffs):.2e}; vs the step without NoPeek "
          f"{max(without):.2e}")
    assert len(diffs) == 6 and max(diffs) <= 1e-5, diffs
    assert max(without) > 1e-3  # NoPeek changed the step: this comparison can fail
