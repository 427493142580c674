"""`splitkeras demo`: the whole path on an embedded default, in one command.

A small CNN for scikit-learn's bundled handwritten digits (8x8 images, 10 classes,
no download) is cut U-shaped (head and tail on the "device", the middle on the
server), a real server is started on a free loopback port, the Python device
client trains over HTTP, and the result is printed next to central training of
the same model from the same weights and batches, with bytes and time per sample.
The split folder (segments, manifest, TF.js bundles) is left for inspection.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoResult", "digits_data", "digits_model", "run_demo"]

CUTS = ["conv_2", "dense_1"]
DEMO_MODEL_FILE = "digits_cnn.keras"  # the split's source file: marks the demo's split (the device page's data)


def digits_data(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as (x_train, y_train), (x_test, y_test); x in [0, 1], NHWC."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def digits_model(seed: int = 0) -> Any:
    """The embedded default: a small CNN with BatchNormalization, compiled with Adam."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_1")(inputs)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv_2")(x)
    x = layers.BatchNormalization(name="bn_2")(x)
    x = layers.Activation("relu", name="relu_2")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv_3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="dense_1")(x)
    outputs = layers.Dense(10, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs, name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


@dataclass
class DemoResult:
    split_accuracy: float
    central_accuracy: float
    max_weight_diff: float
    bytes_sent_per_sample: float
    bytes_received_per_sample: float
    split_seconds_per_sample: float
    central_seconds_per_sample: float
    folder: Path



def run_demo(folder: str | Path = "splitkeras-demo", *, epochs: int = 5, batch_size: int = 32,
             wire_dtype: str = "float32", verbose: int = 1) -> DemoResult:
    """Run the demo; returns the figures it prints."""
    import keras

    import splitkeras
    from splitkeras.client import DeviceClient, free_port, wait_until_ready

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (x_train, y_train), (x_test, y_test) = digits_data()
    model = digits_model()
    model.save(folder / DEMO_MODEL_FILE)
    central = keras.models.clone_model(model)
    central.set_weights(model.get_weights())
    central.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"])

    split = splitkeras.split(model, at=CUTS, source={"file": DEMO_MODEL_FILE, "sha256": None})
    try:
        split.save(folder, tfjs=True)
    except splitkeras.SplitKerasError:
        split.save(folder, tfjs=False)
    say = print if verbose else (lambda *a, **k: None)
    say(f"Split '{model.name}' at {CUTS}: " + ", ".join(
        f"{s.name} ({s.placement}, {s.model.count_params():,} params)" for s in split.segments))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key = os.urandom(16).hex()
    env = dict(os.environ, SPLITKERAS_SERVER_KEY=key, TF_CPP_MIN_LOG_LEVEL="3")
    server = subprocess.Popen([sys.executable, "-m", "splitkeras.cli", "serve", str(folder),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_until_ready(url, alive=lambda: server.poll() is None)
        say(f"Server ready at {url}; training {epochs} epochs over HTTP (batch {batch_size})")
        device = DeviceClient(folder, url, key=key, wire_dtype=wire_dtype)
        device.compile()
        keras.utils.set_random_seed(7)
        started = time.perf_counter()
        device.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=verbose)
        split_seconds = time.perf_counter() - started
        split_accuracy = float(device.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])
        stats = device.stats
        device.save(folder)
        device.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    keras.utils.set_random_seed(7)
    started = time.perf_counter()
    central.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=0)
    central_seconds = time.perf_counter() - started
    central_accuracy = float(central.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])

    joined = splitkeras.load_split(folder).join()
    diff = max(float(np.abs(a - b).max()) for a, b in zip(central.get_weights(), joined.get_weights()))
    samples = epochs * len(x_train)
    result = DemoResult(
        split_accuracy=split_accuracy, central_accuracy=central_accuracy, max_weight_diff=diff,
        bytes_sent_per_sample=stats["bytes_sent"] / samples,
        bytes_received_per_sample=stats["bytes_received"] / samples,
        split_seconds_per_sample=split_seconds / samples,
        central_seconds_per_sample=central_seconds / samples, folder=folder)
    say("")
    say(f"{'':<28}{'split over HTTP':>18}{'central':>12}")
    say(f"{'test accuracy':<28}{result.split_accuracy:>18.4f}{result.central_accuracy:>12.4f}")
    say(f"{'time per sample (ms)':<28}{1e3 * result.split_seconds_per_sample:>18.3f}"
        f"{1e3 * result.central_seconds_per_sample:>12.3f}")
    say(f"{'bytes sent per sample':<28}{result.bytes_sent_per_sample:>18,.0f}{'-':>12}")
    say(f"{'bytes received per sample':<28}{result.bytes_received_per_sample:>18,.0f}{'-':>12}")
    say(f"max |weight difference| split vs central: {result.max_weight_diff:.2e}")
    say(f"The split (segments, split.json, TF.js bundles) is in {folder}/; "
        f"`splitkeras join {folder}` rebuilds the trained model.")
    return result
