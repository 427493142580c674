"""One model from a fleet: 8 devices with non-identical shares of the digits, trained
(a) independently (each its own head and tail, one shared middle: splitkeras without
aggregation), (b) relay (`serve --aggregate relay`: the devices one after another, each
starting from the previous one's device segments), (c) SplitFed (`serve --aggregate fedavg`,
per-epoch rounds, quorum 8: the devices at once, their segments averaged after each epoch),
(d) central (`model.fit` on all the training data).

Data: scikit-learn `load_digits` (no download), stratified 80/20 split. Each training image
goes to one of 8 devices at random, a device's two favoured classes ((2k, 2k+1) mod 10)
weighing 4 to the others' 1, so each device sees its two classes about 3x as often as the
others. Model: an MLP (64 -> 64 relu | 64 relu | 10 logits), U-shaped: head and tail on the
device, the middle on a real `splitkeras serve` on loopback. Adam(0.003), batch 16.

Figures: the test accuracy (the whole test set) of the joined model (`splitkeras join`: the
folder's device segments with the server's middle; for (a) each device's own segments with
the shared middle), wall time per global epoch (every device once over its share), bytes
per device per round (all HTTP bodies: steps and, for (b) and (c), the weights' upload and
download; a round is an epoch).

Usage (from the repository root, ~3 min on 2 shared CPU cores):
    python benchmarks/fleet.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from _common import RESULTS, machine, start_server, stop_server, table, verdict, write_results  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import splitkeras  # noqa: E402
from splitkeras.client import DeviceClient, Transport  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEVICES = 8
KEY = "fleet-benchmark"
BATCH = 16
SEED = 0


def build_model() -> keras.Model:
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((64,), name="pixels")
    x = keras.layers.Dense(64, activation="relu", name="embed")(inputs)
    x = keras.layers.Dense(64, activation="relu", name="middle")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    model = keras.Model(inputs, outputs, name="digits_mlp")
    model.compile(optimizer=keras.optimizers.Adam(0.003),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def load_shares() -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target.astype("int64"), test_size=0.2,
                                                        random_state=SEED, stratify=digits.target)
    rng = np.random.default_rng(SEED)
    weights = np.ones((DEVICES, 10))
    for k in range(DEVICES):
        weights[k, [(2 * k) % 10, (2 * k + 1) % 10]] = 4.0
    owner = np.array([rng.choice(DEVICES, p=weights[:, c] / weights[:, c].sum()) for c in y_train])
    shares = [(x_train[owner == k], y_train[owner == k]) for k in range(DEVICES)]
    return shares, x_train, y_train, x_test, y_test


def _clients(folder: Path, url: str) -> list[DeviceClient]:
    clients = []
    for _ in range(DEVICES):
        client = DeviceClient(folder, url, transport=Transport(url, key=KEY))
        client.compile()
        clients.append(client)
    return clients


def _bytes(client: DeviceClient) -> int:
    return client.stats.bytes_sent + client.stats.bytes_received


def _in_threads(clients: list[DeviceClient], shares: list[Any], epochs: int) -> None:
    errors: list[BaseException] = []

    def run(client: DeviceClient, share: Any) -> None:
        try:
            client.fit(*share, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=True)
        except BaseException as error:  # noqa: BLE001 - raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(clients, shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _joined_accuracy(folder: Path, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """`splitkeras join` of the folder (after the server's shutdown wrote its segments)."""
    model = splitkeras.load_split(folder).join()
    return float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))


def run_split(kind: str, template: Path, root: Path, shares: list[Any], epochs: int, x_test: np.ndarray,
              y_test: np.ndarray) -> dict[str, Any]:
    folder = Path(shutil.copytree(template, root / kind))
    args = {"independent": [], "relay": ["--aggregate", "relay"],
            "splitfed": ["--aggregate", "fedavg", "--round-quorum", str(DEVICES), "--round-deadline", "600"]}[kind]
    process, url = start_server(folder, KEY, *args, extra_env={"TF_DETERMINISTIC_OPS": "1"})
    clients: list[DeviceClient] = []
    try:
        clients = _clients(folder, url)
        for client in clients:
            client.open_session()
        before = [_bytes(c) for c in clients]
        started = time.perf_counter()
        if kind == "relay":
            for _ in range(epochs):
                for client, share in zip(clients, shares):
                    client.fit(*share, batch_size=BATCH, epochs=1, verbose=0, shuffle=True)
        else:
            _in_threads(clients, shares, epochs)
        seconds = time.perf_counter() - started
        per_round = [(_bytes(c) - b) / epochs for c, b in zip(clients, before)]
        result: dict[str, Any] = {"seconds_per_epoch": seconds / epochs,
                                  "bytes_per_device_per_round": float(np.mean(per_round))}
        if kind == "independent":
            accuracies = [float(c.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])
                          for c in clients]
            result.update(device_accuracies=accuracies, accuracy=max(accuracies))
        else:
            rounds = [c.rounds for c in clients if c.rounds is not None]
            result["weights_bytes_per_device_per_round"] = float(np.mean(
                [(r.stats.uploaded_bytes + r.stats.downloaded_bytes) / epochs for r in rounds]))
            result["rounds"] = max(r.round for r in rounds)
    finally:
        for client in clients:
            client.close()
        stop_server(process)
    if kind != "independent":
        result["accuracy"] = _joined_accuracy(folder, x_test, y_test)
    return result


def run_central(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                epochs: int) -> dict[str, Any]:
    model = build_model()
    started = time.perf_counter()
    model.fit(x_train, y_train, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=True)
    seconds = time.perf_counter() - started
    accuracy = float(model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])
    return {"seconds_per_epoch": seconds / epochs, "bytes_per_device_per_round": 0.0, "accuracy": accuracy}


def plot(results: dict[str, Any], path: Path) -> None:
    names = ["independent", "relay", "splitfed", "central"]
    labels = ["(a) independent\n(best device)", "(b) relay", "(c) SplitFed", "(d) central"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, key, title in zip(axes, ["accuracy", "seconds_per_epoch", "bytes_per_device_per_round"],
                                ["test accuracy of the joined model", "seconds per global epoch",
                                 "bytes per device per round"]):
        values = [results[n][key] for n in names]
        axis.bar(labels, values, color=["#999", "#c84", "#48c", "#4a4"])
        axis.set_title(title)
        axis.tick_params(axis="x", labelsize=8)
        if key == "accuracy":
            axis.set_ylim(min(values + results["independent"]["device_accuracies"]) - 0.03, 1.0)
            for i, accuracy in enumerate(results["independent"]["device_accuracies"]):
                axis.plot(0, accuracy, "k.", alpha=0.6, label="each device" if i == 0 else None)
            axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--render", action="store_true", help="only write fleet.md and fleet.png again "
                        "from results/fleet.json")
    args = parser.parse_args(argv)
    if args.render:
        import json

        data = json.loads((RESULTS / "fleet.json").read_text())
        render(data)
        return data
    shares, x_train, y_train, x_test, y_test = load_shares()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        template = root / "template"
        splitkeras.split(build_model(), at=["embed", "middle"]).save(template)
        for kind in ("independent", "relay", "splitfed"):
            results[kind] = run_split(kind, template, root, shares, args.epochs, x_test, y_test)
            print(kind, results[kind], flush=True)
    results["central"] = run_central(x_train, y_train, x_test, y_test, args.epochs)
    command = "python benchmarks/fleet.py " + " ".join(sys.argv[1:] if argv is None else argv)
    counts = [len(y) for _, y in shares]
    favoured = [float(np.mean(np.isin(y, [(2 * k) % 10, (2 * k + 1) % 10]))) for k, (_, y) in enumerate(shares)]
    data = {"machine": machine(), "command": command.strip(), "epochs": args.epochs, "shares": counts,
            "favoured_fraction": favoured, "test_images": len(y_test), "results": results}
    render(data)
    return data


def render(data: dict[str, Any]) -> None:
    """Write results/fleet.{json,md,png} from `data`."""
    results, counts, favoured = data["results"], data["shares"], data["favoured_fraction"]
    splitfed, central, best = (results["splitfed"]["accuracy"], results["central"]["accuracy"],
                               results["independent"]["accuracy"])
    met = data["met"] = splitfed >= central - 0.02 and splitfed > best
    rows = [["(a) independent (best / mean / worst device)",
             f"{best:.4f} / {np.mean(results['independent']['device_accuracies']):.4f} / "
             f"{min(results['independent']['device_accuracies']):.4f}",
             f"{results['independent']['seconds_per_epoch']:.2f}",
             f"{results['independent']['bytes_per_device_per_round']:,.0f}", "-"]]
    for kind, label in (("relay", "(b) relay"), ("splitfed", "(c) SplitFed")):
        r = results[kind]
        rows.append([label, f"{r['accuracy']:.4f}", f"{r['seconds_per_epoch']:.2f}",
                     f"{r['bytes_per_device_per_round']:,.0f}", f"{r['weights_bytes_per_device_per_round']:,.0f}"])
    rows.append(["(d) central (`model.fit`, all data)", f"{central:.4f}",
                 f"{results['central']['seconds_per_epoch']:.2f}", "-", "-"])
    markdown = f"""# One model from a fleet: independent, relay, SplitFed, central

Command (from the repository root): `{data["command"]}`

{__doc__.split(chr(10) + chr(10))[1]}

{__doc__.split(chr(10) + chr(10))[2]}

Shares: {counts} training images per device ({sum(counts)} in all); the share of a device's
two favoured classes: {', '.join(f'{f:.2f}' for f in favoured)} (0.2 if the shares were
identical). Test set: {data.get("test_images", 360)} images (one image is 0.28 points). {data["epochs"]}
epochs each; one run of one seed (the shares, the initial weights and the shuffles are seeded;
the threads' interleaving on the shared middle is not), so differences of a point or two
between (b), (c) and (d) are within what another seed moves.

{table(["training", "test accuracy (joined model)", "s per global epoch", "bytes per device per round",
        "of which weights (up + down)"], rows)}

Done means: the joined SplitFed model within 2 points of central ({splitfed:.4f} vs {central:.4f}) and
better than the best independently trained device's joined model ({best:.4f}): {verdict(met)}.

Time per epoch: (a) and (c) run the 8 devices at once (threads of one process against one
server on this 2-core shared machine), (b) one after another, as relay must; (d) is one
process without HTTP. Bytes: (b) downloads the global weights at the start of each device's
turn and again after its upload, (c) once per round; the steps' activations and gradients
dominate either way (the head holds 4,160 weights, the tail 650: 19 KB a way).

![](fleet.png)
"""
    write_results("fleet", data, markdown)
    plot(results, RESULTS / "fleet.png")
    print(markdown)


if __name__ == "__main__":
    main()
