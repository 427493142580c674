"""Codecs: test accuracy and bytes per sample of every codec against float32, on real data.

Two tasks, both shipped with scikit-learn (no download):

* digits: the demo's CNN (`splitkeras.demo.digits_model`), U-shaped at the demo's cuts
  (conv_2 8x8x32 activations up, dense_1 64 down, their gradients back), 15 epochs;
* breast cancer: a 30-feature MLP (Dense 64 | Dense 32 | Dense 2), U-shaped, standardised
  features, 15 epochs.

Each codec trains the same model from the same weights on the same batches (same seeds)
through a real server (`splitkeras serve`, a fresh copy of the split per run) with the
Python `DeviceClient(compress=...)`; after every epoch the test accuracy is measured.
Bytes per sample are the HTTP bodies of the training steps only (sent + received, the
evaluation's predict bodies excluded) over the training samples.

Floors (digits, same seeds and epochs as float32): int8 both ways <= 0.27x the bytes of
float32 with test accuracy within 0.5 points; forward=int8,backward=topk:0.05+int8 <= 0.2x
within 1 point. The second task is reported in the same table.

Run: `.venv/bin/python benchmarks/codecs.py [--epochs 15] [--tasks digits,cancer]`
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, machine, start_server, stop_server, table, verdict, write_results

sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CODECS = ["float32", "float16", "bfloat16", "int8", "topk:0.05+int8", "forward=int8,backward=topk:0.05+int8",
          "forward=int8,backward=topk:0.05"]
KEY = "codecs-benchmark-key"
NOTE = ("Reading it: top-k on the forward direction sparsifies the activations themselves (the "
        "server sees 5% of each sample), which costs accuracy; top-k is meant for gradients. The "
        "cancer MLP's tensors are 64 and 32 values a sample, where int8's per-channel scale and "
        "offset (8 bytes a channel per body) and the headers weigh more than on the CNN's 2,048.")


def digits_task() -> tuple[Any, list[str], tuple[Any, ...]]:
    from splitkeras.demo import CUTS, digits_data, digits_model

    (x_train, y_train), (x_test, y_test) = digits_data()
    return digits_model(), CUTS, (x_train, y_train, x_test, y_test)


def cancer_task() -> tuple[Any, list[str], tuple[Any, ...]]:
    import keras
    from keras import layers
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, y = data.data.astype("float32"), data.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    mean, std = x[:cut].mean(axis=0), x[:cut].std(axis=0) + 1e-6
    x = ((x - mean) / std).astype("float32")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((30,), name="features")
    h = layers.Dense(64, activation="relu", name="dense_a")(inputs)
    h = layers.Dense(32, activation="relu", name="dense_b")(h)
    outputs = layers.Dense(2, activation="softmax", name="classes")(h)
    model = keras.Model(inputs, outputs, name="cancer_mlp")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model, ["dense_a", "dense_b"], (x[:cut], y[:cut], x[cut:], y[cut:])


TASKS = {"digits": digits_task, "cancer": cancer_task}


def run_codec(folder: Path, split_source: Path, codec: str, data: tuple[Any, ...], epochs: int,
              batch_size: int) -> dict[str, Any]:
    import keras

    from splitkeras.client import DeviceClient

    shutil.copytree(split_source, folder)
    x_train, y_train, x_test, y_test = data
    server, url = start_server(folder, KEY)
    curve, sent, received = [], 0, 0
    try:
        device = DeviceClient(folder, url, key=KEY, compress=codec)
        device.compile()
        keras.utils.set_random_seed(7)
        started = time.perf_counter()
        for _ in range(epochs):
            before = device.stats
            device.fit(x_train, y_train, batch_size=batch_size, epochs=1, verbose=0)
            after = device.stats
            sent += after["bytes_sent"] - before["bytes_sent"]
            received += after["bytes_received"] - before["bytes_received"]
            curve.append(float(device.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]))
        seconds = time.perf_counter() - started
        device.close()
    finally:
        stop_server(server)
    samples = epochs * len(x_train)
    return {"codec": codec, "accuracy": curve, "final_accuracy": curve[-1],
            "bytes_sent_per_sample": sent / samples, "bytes_received_per_sample": received / samples,
            "bytes_per_sample": (sent + received) / samples, "seconds": seconds}


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for axis, (task, runs) in zip(axes[0], results.items()):
        base = runs[0]["bytes_per_sample"]
        for run in runs:
            ratio = run["bytes_per_sample"] / base
            axis.plot(range(1, len(run["accuracy"]) + 1), run["accuracy"], marker=".",
                      label=f"{run['codec']} ({ratio:.3f}x bytes)")
        axis.set_title(f"{task}: test accuracy per epoch")
        axis.set_xlabel("epoch")
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tasks", default="digits,cancer")
    parser.add_argument("--codecs", default=";".join(CODECS), help="';'-separated specs, float32 first")
    args = parser.parse_args()
    import splitkeras

    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            model, cuts, data = TASKS[task]()
            source = Path(tmp) / task / "split"
            splitkeras.split(model, at=cuts).save(source, tfjs=False)
            results[task] = []
            for index, codec in enumerate(args.codecs.split(";")):
                run = run_codec(Path(tmp) / task / f"run{index}", source, codec, data, args.epochs,
                                args.batch_size)
                print(f"{task:7s} {codec:40s} acc {run['final_accuracy']:.4f} bytes/sample "
                      f"{run['bytes_per_sample']:9.1f} ({run['seconds']:.0f} s)", flush=True)
                results[task].append(run)
    markdown = [f"# Codecs: accuracy and bytes per sample ({args.epochs} epochs, same seeds)", "",
                *[part + "\n" for part in __doc__.split("\n\n")[1:4]], NOTE, ""]
    floors: dict[str, bool] = {}
    for task, runs in results.items():
        base = runs[0]
        rows = []
        for run in runs:
            ratio = run["bytes_per_sample"] / base["bytes_per_sample"]
            delta = 100 * (run["final_accuracy"] - base["final_accuracy"])
            run.update(bytes_ratio=ratio, accuracy_delta_points=delta)
            rows.append([f"`{run['codec']}`", f"{run['final_accuracy']:.4f}", f"{delta:+.2f}",
                         f"{run['bytes_sent_per_sample']:,.0f}", f"{run['bytes_received_per_sample']:,.0f}",
                         f"{ratio:.3f}x", f"{max(run['accuracy']):.4f}"])
            if task == "digits" and run["codec"] == "int8":
                floors["int8 <= 0.27x bytes, within 0.5 points"] = ratio <= 0.27 and delta >= -0.5
            if task == "digits" and run["codec"] == "forward=int8,backward=topk:0.05+int8":
                floors["forward=int8,backward=topk:0.05+int8 <= 0.2x, within 1 point"] = \
                    ratio <= 0.2 and delta >= -1.0
        markdown += [f"## {task}", "", table(["codec", "test accuracy", "vs float32 (points)",
                                              "bytes sent/sample", "bytes received/sample",
                                              "bytes vs float32", "best epoch"], rows), ""]
    markdown += ["## Floors (digits)", ""]
    markdown += [f"- {name}: {verdict(met)}" for name, met in floors.items()]
    markdown += ["", "![curves](codecs.png)", ""]
    plot(results, Path(__file__).resolve().parent / "results" / "codecs.png")
    paths = write_results("codecs", {"machine": machine(), "epochs": args.epochs, "results": results,
                                     "floors": floors}, "\n".join(markdown))
    print("\n".join(markdown))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
