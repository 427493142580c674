"""A keras.applications model trained by the JavaScript device runtime against a REAL server,
step for step like the Python device client.

`keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), classes=10)` is
split U-shaped with `splitkeras split` (TF.js export on): the head (~20 % of the layers: the
in-graph Rescaling, hard_swish, squeeze-and-excite blocks with their keras.ops hard sigmoid,
training-mode BatchNorm on 16x16 to 4x4 maps) and the tail (global pooling, the 1x1 conv
classifier with hard_swish, softmax) on the device, the rest on a server. The folder is copied
before anything trains, so two `splitkeras serve` processes (uvicorn on 127.0.0.1) start from
identical weights; the Python `DeviceClient` takes one step against the first and the JS runtime
(`mobile_export/tools/device_e2e.mjs`, real @tensorflow/tfjs under Node, the app bundle that
`splitkeras export` writes) one step with the same batch against the second. Every weight after
the step, head, tail (BatchNorm moving statistics included) and the server's middle (saved by a
graceful stop), must agree within 1e-5 relative (max |JS - Python| / max |Python| per weight).

SGD with momentum, as a phone would fine-tune: Adam's first step is lr * g / (|g| + eps), about
lr * sign(g), so any weight whose gradient is within float noise of zero would differ by up to
2 lr between any two float32 implementations, whatever their agreement on the gradient itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from js_support import array, require_node, run_driver, tensor  # noqa: E402
from live_server import KEY, Server  # noqa: E402

import splitkeras  # noqa: E402
from converters.tfjs_config import tfjs_named_weights  # noqa: E402
from splitkeras.cli import main as cli_main  # noqa: E402
from splitkeras.client import DeviceClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tfjs_coverage_reference import float64_twin  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CUTS = ["expanded_conv_2_add", "activation_17"]  # 35 of 163 layers; the tail: the last 6
BATCH = 8
FLOOR = 1e-5


def mobilenet_v3_small() -> keras.Model:
    keras.utils.set_random_seed(21)
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), classes=10,
                                                dropout_rate=0.0)  # no Dropout layer at all
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _relative(expected: np.ndarray, actual: np.ndarray) -> float:
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def _server_weights(folder: Path) -> dict[str, np.ndarray]:
    split = splitkeras.load_split(folder)
    return {w.path: np.asarray(w) for s in split.segments if s.placement == "server"
            for w in s.model.weights}


def _device_weights(split: Any) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v) for s in split.segments if s.placement == "device"
            for _, v in tfjs_named_weights(s.model)}


def _keras_names(split: Any) -> dict[str, str]:
    """TF.js weight name -> Keras path (they differ for DepthwiseConv2D: depthwise_kernel)."""
    return {name: v.path for s in split.segments if s.placement == "device"
            for name, v in tfjs_named_weights(s.model)}


def _float64_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Every weight after the same step computed in float64 (the split's step is model.fit's)."""
    twin = float64_twin(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="sparse_categorical_crossentropy")
    twin.train_on_batch(x.astype(np.float64), y)
    return {v.path: np.asarray(v) for v in twin.weights}


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    node = require_node()
    root = tmp_path_factory.mktemp("mobilenet_v3_small")
    model = mobilenet_v3_small()
    model.save(root / "model.keras")
    python_dir, js_dir, app = root / "python", root / "js", root / "app"
    assert cli_main(["split", str(root / "model.keras"), *[a for c in CUTS for a in ("--at", c)],
                     "-o", str(python_dir)]) == 0
    shutil.copytree(python_dir, js_dir)  # both servers start from the same middle
    before = {**_device_weights(splitkeras.load_split(python_dir)), **_server_weights(python_dir)}
    assert cli_main(["export", str(js_dir), "-o", str(app)]) == 0
    rng = np.random.default_rng(8)
    x = rng.uniform(0.0, 255.0, (BATCH, 32, 32, 3)).astype("float32")  # Rescaling is in the graph
    y = rng.integers(0, 10, BATCH).astype("int32")
    truth = _float64_step(model, x, y)
    servers = [Server(python_dir, 1, name="python"), Server(js_dir, 1, name="js")]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        client = DeviceClient(python_dir, servers[0].url, key=KEY)
        client.compile()
        logs = client.train_on_batch(x, y)
        python_device, names = _device_weights(client.split), _keras_names(client.split)
        client.close()
        job = {"app_dir": str(app), "server_url": servers[1].url, "key": KEY,
               "x": tensor(x), "y": tensor(y)}
        result = run_driver(node, job, root)
    finally:
        for server in servers:  # a graceful stop writes the trained middle back
            server.stop(signal.SIGTERM)
    out = {"before": before, "truth": truth, "python_logs": logs, "python_device": python_device,
           "js_device": {names[k]: array(v) for k, v in result["weights_after_first_step"].items()},
           "js_first_step": result["first_step"],
           "python_server": _server_weights(python_dir), "js_server": _server_weights(js_dir)}
    yield out


def test_the_split_puts_the_applications_layers_on_the_device(steps: dict[str, Any]) -> None:
    names = set(steps["python_device"])
    assert "conv/kernel" in names and "expanded_conv_squeeze_excite_conv/bias" in names
    assert "conv_bn/moving_mean" in names and "logits/kernel" in names and "conv_2/kernel" in names


def test_one_js_step_equals_the_python_device_clients_step(steps: dict[str, Any]) -> None:
    """Within 1e-5 relative per weight, head, tail and middle. 22 of the 210 weights have a true
    update of zero: the beta of a BatchNorm whose output only reaches training-mode BatchNorms
    (through 1x1 convs and residual adds, which the next normalization subtracts), and the moving
    mean of such a BatchNorm whose input has a batch mean of zero (float64: |update| <= 1e-16 of
    the step's largest, against >= 3e-5 for every other weight). Their float32 values are rounding
    noise on both sides, held to 1e-6 of the step's largest update, as the coverage sweep holds its
    zero gradients."""
    python = {**steps["python_device"], **steps["python_server"]}
    js = {**steps["js_device"], **steps["js_server"]}
    truth, before = steps["truth"], steps["before"]
    assert sorted(python) == sorted(js) and set(python) <= set(truth) and len(python) == 210
    update = {name: float(np.max(np.abs(truth[name] - before[name]))) for name in python}
    largest = max(update.values())
    zero = sorted(name for name in python if update[name] <= 1e-7 * largest)
    relative = {name: _relative(python[name], js[name]) for name in python if name not in zero}
    worst = max(relative, key=relative.__getitem__)
    versus64 = max(_relative(truth[name], js[name]) for name in relative)
    python64 = max(_relative(truth[name], python[name]) for name in relative)
    noise = max(float(np.max(np.abs(js[name] - python[name]))) for name in zero) / largest
    loss_js, loss_py = steps["js_first_step"]["loss"], float(steps["python_logs"]["loss"])
    print(f"\nMobileNetV3Small 32x32, one SGD step, JS vs Python device client: {len(relative)} "
          f"weights ({len(steps['js_device'])} on the device) worst relative {relative[worst]:.2e} "
          f"({worst}); against float64: JS {versus64:.2e}, Python {python64:.2e}; {len(zero)} "
          f"true-zero updates within {noise:.1e} of the largest update; loss {loss_js:.7f} vs "
          f"{loss_py:.7f}")
    assert relative[worst] <= FLOOR
    assert len(zero) == 22 and all(n.endswith(("_project_bn/beta", "_expand_bn/moving_mean",
                                               "conv_1_bn/moving_mean")) for n in zero), zero
    assert noise <= 1e-6
    assert abs(loss_js - loss_py) <= FLOOR * abs(loss_py)


def test_the_step_moved_every_segment(steps: dict[str, Any]) -> None:
    """So that the comparison above is not trivially true: the step changed weights on the
    device (head and tail) and on the server well beyond the floor."""
    before = steps["before"]
    for part in ("python_device", "python_server"):
        moved = max(_relative(before[name], value) for name, value in steps[part].items())
        assert moved > 1e-3, part
    for name in ("conv/kernel", "logits/kernel", "conv_2/kernel", "expanded_conv_3_expand/kernel"):
        assert _relative(before[name], steps["python_device"].get(name, steps["python_server"].get(name))) > 1e-4
