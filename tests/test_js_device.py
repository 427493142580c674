"""The JavaScript device runtime (mobile_export/src/runtime.js) against a REAL server.

A tiny U-shaped model (head: Conv2D + BatchNormalization + ReLU + Flatten; middle: Dense;
tail: Dense(softmax) on [middle, a skip tensor from the head]) is split and saved with its
TF.js bundles; `splitkeras export` assembles the app bundle; `splitkeras serve` runs in a
subprocess (uvicorn on 127.0.0.1, a free port); `mobile_export/tools/device_e2e.mjs`
imports the runtime FROM THE APP BUNDLE and trains in the real @tensorflow/tfjs (pure-JS
CPU backend). Checked:

(a) one training step in JS gives the same gradient from the server (for the head's
    output), the same loss and the same new head and tail weights, BatchNorm moving
    statistics included, as `SplitTrainer.train_batch` in process from the same state;
(b) a few epochs of `fit` in JS lower the loss, and the fine-tuned weights, saved by TF.js
    and read back into Keras with `converters.load_tfjs_weights`, give the outputs TF.js
    gave (the middle from the server's saved `.keras`).

And labels on the server (one cut): one JS step equals the in-process step, and a second
device with float16 on the wire trains too, sending fewer bytes per step; a fresh device per
lossy codec (`compress`) trains as well; and one int8 step of a JS device matches the Python
`DeviceClient(compress="int8")` from the same server state within the codec's rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from js_support import array, max_weight_diff, require_node, run_driver, tensor  # noqa: E402
from keras import layers as L  # noqa: E402

import splitkeras  # noqa: E402
from converters import load_tfjs_weights  # noqa: E402
from splitkeras.cli import main as cli_main  # noqa: E402
from splitkeras.client import free_port  # noqa: E402
from splitkeras.codecs import parse_compress  # noqa: E402
from splitkeras.training import SplitTrainer  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
MOBILE = REPO / "mobile_export"
DRIVER = MOBILE / "tools" / "device_e2e.mjs"
KEY = "js-device-test-key"
TOLERANCE = 1e-5
CODEC_RUNS = ["bfloat16", "int8", "topk:0.5+int8", "forward=int8,backward=topk:0.3"]


# ----------------------------------------------------------------------------- models
def u_model() -> keras.Model:
    keras.utils.set_random_seed(11)
    image = keras.Input((6, 6, 1), name="image")
    # No bias before BatchNormalization: its gradient is zero up to rounding noise, which
    # Adam's first step (g / (|g| + eps)) would blow up to ~1e-5 differently in TF and TF.js.
    x = L.Conv2D(2, 3, use_bias=False, name="conv")(image)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    flat = L.Flatten(name="flat")(x)
    mid = L.Dense(8, activation="tanh", name="mid")(flat)
    out = L.Dense(3, activation="softmax", name="out")(L.Concatenate(name="join")([mid, flat]))
    model = keras.Model(image, out, name="js_u_model")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def label_model() -> keras.Model:
    keras.utils.set_random_seed(12)
    features = keras.Input((5,), name="features")
    h = L.Dense(6, activation="relu", name="h")(features)
    x = L.Dense(6, activation="tanh", name="hidden")(h)
    out = L.Dense(3, name="logits")(x)
    model = keras.Model(features, out, name="js_label_model")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


# ----------------------------------------------------------------------------- helpers
class Server:
    """`splitkeras serve FOLDER` in a subprocess, stopped gracefully (SIGTERM)."""

    def __init__(self, folder: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        executable = Path(sys.executable).with_name("splitkeras")
        command = [str(executable)] if executable.exists() else [sys.executable, "-m", "splitkeras.cli"]
        env = {**os.environ, "SPLITKERAS_SERVER_KEY": KEY, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.handle = log.open("wb")
        self.terminated = False
        self.process = subprocess.Popen(
            [*command, "serve", str(folder), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def wait_ready(self, timeout: float = 90.0) -> None:
        from splitkeras.client import wait_until_ready
        from splitkeras.errors import ProtocolError

        try:
            wait_until_ready(self.url, timeout=timeout, alive=lambda: self.process.poll() is None)
        except ProtocolError as error:
            pytest.fail(f"{error} (exit status {self.process.poll()}):\n"
                        f"{self.log.read_text(errors='replace')[-3000:]}")

    def terminate(self) -> None:
        """Ask for a graceful shutdown (checkpoint, trained segment saved) without waiting."""
        if self.process.poll() is None and not self.terminated:
            self.process.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self) -> None:
        self.terminate()
        if self.process.poll() is None:
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.handle.close()


def _reference_step(folder: Path, x: np.ndarray, y: np.ndarray) -> tuple[Any, dict[str, Any], list[Any]]:
    """One `SplitTrainer.train_batch` in process from the saved state; the gradients the
    server segment returns are captured."""
    split = splitkeras.load_split(folder)
    trainer = SplitTrainer.from_training_config(split, split.training_config)
    trainer.fused = False  # the step protocol, segment by segment, as the server runs it
    server = next(r for r, s in zip(trainer.runners, split.segments) if s.placement == "server")
    captured: list[Any] = []
    if trainer.runners.index(server) == len(trainer.runners) - 1:
        original_train = server.train_step

        def spy_train(*args: Any, **kwargs: Any) -> Any:
            grads, logs = original_train(*args, **kwargs)
            captured.extend(grads)
            return grads, logs

        server.train_step = spy_train  # type: ignore[method-assign]
    else:
        original = server.backward

        def spy(step: Any, grads: Any) -> Any:
            result = original(step, grads)
            captured.extend(result)
            return result

        server.backward = spy  # type: ignore[method-assign]
    logs = trainer.train_batch(x, y)
    return split, {k: float(v) for k, v in logs.items()}, captured


@pytest.fixture(scope="module")
def node() -> str:
    return require_node()


def _prepare(tmp: Path, model: keras.Model, cuts: list[str]) -> tuple[Path, Path, Path]:
    out, ref, app = tmp / "split", tmp / "reference", tmp / "app"
    splitkeras.split(model, at=cuts).save(out, tfjs=True)
    shutil.copytree(out, ref)
    assert cli_main(["export", str(out), "-o", str(app)]) == 0
    return out, ref, app


def _u_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"x": rng.normal(size=(8, 6, 6, 1)).astype("float32"),
            "y": rng.integers(0, 3, 8).astype("int32"),
            "train_x": rng.normal(size=(32, 6, 6, 1)).astype("float32"),
            "train_y": rng.integers(0, 3, 32).astype("int32"),
            "predict_x": rng.normal(size=(5, 6, 6, 1)).astype("float32")}


def _label_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    train_x = rng.normal(size=(48, 5)).astype("float32")
    return {"x": rng.normal(size=(6, 5)).astype("float32"),
            "y": rng.integers(0, 3, 6).astype("int32"),
            "train_x": train_x, "train_y": np.argmax(train_x[:, :3], axis=1).astype("int32")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, node: str) -> Iterator[dict[str, Any]]:
    """Both splits served at once (server start-up dominates), each trained by one node run."""
    cases = {"u_shaped": (u_model(), ["flat", "mid"], _u_data(),
                          {"seed": 3, "batch_size": 8, "epochs": 4}),
             "labels_on_server": (label_model(), ["h"], _label_data(),
                                  {"batch_size": 8, "epochs": 2, "float16_epochs": 2,
                                   "codec_runs": CODEC_RUNS, "codec_epochs": 3}),
             "int8_step": (label_model(), ["h"], {k: v for k, v in _label_data().items() if k in "xy"},
                           {"compress": "int8"})}
    prepared: dict[str, dict[str, Any]] = {}
    servers: list[Server] = []
    try:
        for name, (model, cuts, data, options) in cases.items():
            tmp = tmp_path_factory.mktemp(name)
            out, ref, app = _prepare(tmp, model, cuts)
            server = Server(out, tmp / "server.log")
            servers.append(server)
            prepared[name] = {"tmp": tmp, "out": out, "ref": ref, "app": app, "data": data,
                              "server": server, "options": options}
        for run in prepared.values():
            run["server"].wait_ready()
            job = {"app_dir": str(run["app"]), "server_url": run["server"].url, "key": KEY,
                   "save_dir": str(run["tmp"] / "trained"), **run["options"],
                   **{k: tensor(v) for k, v in run["data"].items()}}
            run["result"] = run_driver(node, job, run["tmp"])
    finally:
        for server in servers:  # graceful: each server writes its trained segment back
            server.terminate()
        for server in servers:
            server.stop()
    yield prepared


@pytest.fixture(scope="module")
def u_shaped_run(runs: dict[str, Any]) -> dict[str, Any]:
    return runs["u_shaped"]


def test_export_writes_a_self_contained_app_bundle(u_shaped_run: dict[str, Any]) -> None:
    app = u_shaped_run["app"]
    manifest = json.loads((app / "split.json").read_text())
    assert [s.get("tfjs") for s in manifest["segments"]] == \
        ["head_tfjs/model.json", None, "tail_tfjs/model.json"]
    runtime = sorted(p.name for p in (app / "splitkeras-device" / "src").iterdir())
    assert "runtime.js" in runtime and "wire.js" in runtime and "runtime.d.ts" in runtime
    assert (app / "splitkeras-device" / "README.md").exists()
    assets = (app / "assets.js").read_text()
    assert "bundleResourceIO(require('./head_tfjs/model.json'), [require('./head_tfjs/group1-shard1of1.bin')])" \
        in assets
    assert not any(p.suffix == ".keras" for p in app.rglob("*")), "no Keras file ships to the app"


def test_one_js_step_equals_the_python_engine(u_shaped_run: dict[str, Any]) -> None:
    data, result = u_shaped_run["data"], u_shaped_run["result"]
    split, logs, captured = _reference_step(u_shaped_run["ref"], data["x"], data["y"])
    js_grad = array(result["first_step"]["server_input_gradients"]["flat"])
    grad_diff = float(np.max(np.abs(js_grad - keras.ops.convert_to_numpy(captured[0]))))
    weight_diff, count = max_weight_diff(split, result["weights_after_first_step"])
    loss_diff = abs(result["first_step"]["loss"] - logs["loss"])
    print(f"\nJS vs Python after one step: input gradient max|diff| {grad_diff:.2e}, "
          f"{count} weights max|diff| {weight_diff:.2e}, loss {result['first_step']['loss']:.6f} "
          f"vs {logs['loss']:.6f}; bytes sent {result['first_step']['bytesSent']}, "
          f"received {result['first_step']['bytesReceived']}")
    assert grad_diff <= TOLERANCE
    assert weight_diff <= TOLERANCE
    assert count == 7  # conv kernel, bn gamma+beta+moving mean+variance, out kernel+bias
    assert loss_diff <= TOLERANCE
    assert abs(result["first_step"]["metrics"]["accuracy"] - logs["accuracy"]) <= 1e-6


def test_js_training_lowers_the_loss_and_keras_reads_the_weights_back(
        u_shaped_run: dict[str, Any]) -> None:
    result, data = u_shaped_run["result"], u_shaped_run["data"]
    history = result["fit"]["history"]["loss"]
    print(f"\nJS fit: epoch losses {[round(v, 4) for v in history]} in {result['fit']['steps']} "
          f"steps, {result['fit']['seconds']:.2f} s, {result['fit']['bytesSent']} bytes sent")
    assert history[-1] < history[0]
    final = splitkeras.load_split(u_shaped_run["out"])  # the middle as the server saved it
    for name in ("head", "tail"):
        load_tfjs_weights(final[name].model, u_shaped_run["tmp"] / "trained" / f"{name}_tfjs")
    weight_diff, _ = max_weight_diff(final, result["weights"])
    assert weight_diff == 0.0, "the saved bundles hold exactly the weights getWeights() returned"
    store = {"image": data["predict_x"]}
    for segment in final.segments:
        inputs = [store[s.name] for s in segment.inputs]
        outputs = segment.model(inputs, training=False)
        store.update(zip([s.name for s in segment.outputs],
                         [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(outputs)]))
    diff = float(np.max(np.abs(store["out"] - array(result["prediction"]))))
    print(f"fine-tuned model in Keras vs TF.js predict: max|diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_labels_on_server_step_equals_the_python_engine(runs: dict[str, Any]) -> None:
    run = runs["labels_on_server"]
    result, data = run["result"], run["data"]
    split, logs, captured = _reference_step(run["ref"], data["x"], data["y"])
    grad_diff = float(np.max(np.abs(array(result["first_step"]["server_input_gradients"]["h"])
                                    - keras.ops.convert_to_numpy(captured[0]))))
    weight_diff, _ = max_weight_diff(split, result["weights_after_first_step"])
    print(f"\nlabels on the server, JS vs Python after one step: input gradient max|diff| "
          f"{grad_diff:.2e}, weights {weight_diff:.2e}, loss {result['first_step']['loss']:.6f} vs "
          f"{logs['loss']:.6f}")
    assert grad_diff <= TOLERANCE
    assert weight_diff <= TOLERANCE
    assert abs(result["first_step"]["loss"] - logs["loss"]) <= TOLERANCE


def test_float16_on_the_wire_trains_with_half_the_tensor_bytes(runs: dict[str, Any]) -> None:
    result = runs["labels_on_server"]["result"]
    full, half = result["fit"], result["float16"]
    per_step = (full["bytesSent"] / full["steps"], half["bytesSent"] / half["steps"])
    print(f"\nlabels on the server, bytes sent per step: float32 {per_step[0]:.0f}, "
          f"float16 {per_step[1]:.0f}; float16 epoch losses {half['history']['loss']}")
    assert half["history"]["loss"][-1] < half["history"]["loss"][0]
    assert per_step[1] < 0.75 * per_step[0]  # activations halve; labels (int32), headers do not


def test_the_js_device_trains_with_each_codec(runs: dict[str, Any]) -> None:
    result = runs["labels_on_server"]["result"]
    assert sorted(result["codecs"]) == sorted(CODEC_RUNS)
    for spec, run in result["codecs"].items():
        losses = run["fit"]["history"]["loss"]
        print(f"\n{spec}: epoch losses {[round(v, 4) for v in losses]}")
        assert losses[-1] < losses[0], spec
        assert np.isfinite(run["first_step"]["loss"])
        gradient = array(run["first_step"]["server_input_gradients"]["h"])
        backward = parse_compress(spec)["backward"]
        if backward.family == "topk":  # the answer was sparsified by the server, decoded by JS
            assert 1 <= np.count_nonzero(gradient) <= backward.kept(gradient.size), spec
    # (bytes: this model's tensors are a few values, where the codecs' scales and indices cost
    # more than they save; benchmarks/codecs.py measures bytes on real models)


def test_one_int8_step_matches_the_python_client_within_its_rounding(runs: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    """Both clients encode the same float32 activations to the same bytes (tests/test_codecs.py);
    they differ only by their float32 arithmetic (<= 1e-5 above), so an int8 code can differ by
    one only where a value sits that close to a rounding boundary. The bound: the decoded
    gradient answer differs by at most one int8 step of its channel, (max - min) / 255, and the
    head's weights by at most lr * batch * max|x| * that step (plus float32's 1e-5)."""
    from server_fixtures import KEY as SERVER_KEY
    from server_fixtures import ThreadedServer, copy_split, settings_for

    from splitkeras.client import DeviceClient

    run = runs["int8_step"]
    js = run["result"]
    folder = copy_split(run["ref"], tmp_path / "split")
    captured: list[np.ndarray] = []
    with ThreadedServer(settings_for(folder)) as server:
        client = DeviceClient(folder, server.url, key=SERVER_KEY, compress="int8")
        client.compile()
        transport = client.transport
        original = transport.train

        def spy(step: int, tensors: Any) -> Any:
            answer = original(step, tensors)
            captured.append(np.array(answer[0]["h"]))
            return answer

        transport.train = spy  # type: ignore[method-assign]
        logs = client.train_on_batch(run["data"]["x"], run["data"]["y"])
        python_split = client.split
        client.close()
    python_grad, js_grad = captured[0], array(js["first_step"]["server_input_gradients"]["h"])
    step = (python_grad.max(axis=0) - python_grad.min(axis=0)) / 255
    grad_diff = np.abs(js_grad - python_grad)
    weight_diff, count = max_weight_diff(python_split, js["weights_after_first_step"])
    x = run["data"]["x"]
    weight_bound = TOLERANCE + 0.05 * len(x) * float(np.abs(x).max()) * float(step.max())
    print(f"\nint8, JS vs Python client after one step: gradient max|diff| {grad_diff.max():.2e} "
          f"(one step: {step.max():.2e}), {count} weights max|diff| {weight_diff:.2e} (bound "
          f"{weight_bound:.2e}), loss {js['first_step']['loss']:.6f} vs {float(logs['loss']):.6f}")
    assert (grad_diff <= step + TOLERANCE).all()
    assert weight_diff <= weight_bound
    assert abs(js["first_step"]["loss"] - float(logs["loss"])) <= 1e-4
