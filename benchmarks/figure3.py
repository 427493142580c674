"""The paper's Figure 3 on real data: split vs central training, accuracy per epoch.

A small CNN on scikit-learn's bundled handwritten digits (`load_digits`: 1,797
8x8 grey images, 10 classes; no download), 80/20 stratified train/test split.
The same CNN is trained twice from the same initial weights, with the same
optimizer, seeds and batches: centrally with `model.fit`, and cut U-shaped with
`splitkeras` (head: the first convolution, on the device; middle: the second
convolution and the dense layer, on the server; tail: the classifier and the
labels, on the device), in process. TF op determinism is on, so both runs use
the same kernels and the curves coincide (the paper's Figure 3 shows them close;
exact gradients make them equal up to float rounding).

Writes `figure3.png` (test accuracy per epoch, both curves; train loss beside it)
and `figure3.md` (per-epoch table and the max weight difference at the end).

Usage (from the repository root, ~30 s on 2 CPU cores):
    python benchmarks/figure3.py [--epochs 15] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import splitkeras  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CUTS = ["conv1", "dense"]
MODEL_SEED = 0
FIT_SEED = 7


def build_cnn() -> keras.Model:
    keras.utils.set_random_seed(MODEL_SEED)
    L = keras.layers
    inputs = keras.Input(shape=(8, 8, 1), name="digit")
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = L.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(64, activation="relu", name="dense")(x)
    outputs = L.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def compile_kwargs() -> dict:
    return dict(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]  # pixel values 0..16
    return train_test_split(images, digits.target, test_size=0.2, random_state=0,
                            stratify=digits.target)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    tf.config.experimental.enable_op_determinism()
    started = time.perf_counter()

    x_train, x_test, y_train, y_test = load_data()
    fit = dict(batch_size=args.batch_size, epochs=args.epochs, verbose=0,
               validation_data=(x_test, y_test))

    central = build_cnn()
    central.compile(**compile_kwargs())
    split = splitkeras.split(build_cnn(), at=CUTS)
    split.compile(**compile_kwargs())

    keras.utils.set_random_seed(FIT_SEED)
    central_history = central.fit(x_train, y_train, **fit).history
    keras.utils.set_random_seed(FIT_SEED)
    split_history = split.fit(x_train, y_train, **fit).history

    joined = split.join()
    weight_diff = max(float(np.max(np.abs(a - b)))
                      for a, b in zip(central.get_weights(), joined.get_weights()))
    accuracy_diff = max(abs(a - b) for a, b in zip(central_history["val_accuracy"],
                                                   split_history["val_accuracy"]))
    loss_diff = max(abs(a - b) for a, b in zip(central_history["loss"], split_history["loss"]))
    seconds = time.perf_counter() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(central_history, split_history, out / "figure3.png")
    command = "python benchmarks/figure3.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = "\n".join(
        f"| {epoch + 1} | {central_history['loss'][epoch]:.6f} | {split_history['loss'][epoch]:.6f} | "
        f"{central_history['val_accuracy'][epoch]:.4f} | {split_history['val_accuracy'][epoch]:.4f} |"
        for epoch in range(len(central_history["loss"])))
    (out / "figure3.md").write_text(f"""# Figure 3 on real data: split vs central training

Command (from the repository root): `{command.strip()}`

Data: scikit-learn `load_digits` (1,797 8x8 images, 10 classes), stratified 80/20
split: {len(x_train)} train, {len(x_test)} test images. Model: a CNN of
{central.count_params():,} parameters (conv 16 -> conv 32 -> max-pool -> dense 64 ->
10 logits), SGD(0.05, momentum=0.9), batch {args.batch_size}, {args.epochs} epochs,
shuffled with the same seed for both runs. Split U-shaped at {CUTS}: head
`conv1` (device), middle `conv2`..`dense` (server), tail `logits` + labels (device).
TF op determinism on. Run time {seconds:.0f} s (both trainings).

![test accuracy per epoch](figure3.png)

| epoch | train loss, central | train loss, split | test accuracy, central | test accuracy, split |
|---|---|---|---|---|
{table}

Final test accuracy: central {central_history['val_accuracy'][-1]:.4f}, split
{split_history['val_accuracy'][-1]:.4f}. Largest difference over the epochs: test accuracy
{accuracy_diff:.2g}, train loss {loss_diff:.2g}. Max |weight difference| at the end (all
weights): {weight_diff:.3g}.
""")
    summary = {"final_accuracy_central": central_history["val_accuracy"][-1],
               "final_accuracy_split": split_history["val_accuracy"][-1],
               "max_weight_diff": weight_diff, "max_accuracy_diff": accuracy_diff,
               "max_loss_diff": loss_diff, "seconds": round(seconds, 1)}
    print(summary)
    return summary


def plot(central: dict, split: dict, path: Path) -> None:
    epochs = np.arange(1, len(central["loss"]) + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, central["val_accuracy"], "-", color="tab:blue", linewidth=3, alpha=0.6,
              label="central (model.fit)")
    left.plot(epochs, split["val_accuracy"], "o--", color="tab:orange", markersize=4,
              label="split U-shaped (splitkeras)")
    left.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy per epoch (digits)")
    left.grid(alpha=0.3)
    left.legend(loc="lower right")
    right.plot(epochs, central["loss"], "-", color="tab:blue", linewidth=3, alpha=0.6,
               label="central (model.fit)")
    right.plot(epochs, split["loss"], "o--", color="tab:orange", markersize=4,
               label="split U-shaped (splitkeras)")
    right.set(xlabel="epoch", ylabel="train loss", title="Train loss per epoch", yscale="log")
    right.grid(alpha=0.3)
    right.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
