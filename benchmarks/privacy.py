"""Privacy you can measure: for each defence and strength, the attack's success next to the
test accuracy, on scikit-learn's breast-cancer data (binary) and digits (10 classes).

Every run trains in process (`splitkeras.privacy.train_in_process`: the same step loop and
the same defence wrappers as `DeviceClient(defences=...)`) with a `ServerView` recording
what the server stage receives, then attacks it (`splitkeras.privacy.audit`):

* breast cancer, U-shaped (head Dense(16) | Dense(16), Dense(8) on the server | the
  sigmoid unit on the device): label AUC of the norm and cosine attacks on the gradients
  the server receives, with MaxNorm, GradientNoise, ActivationNoise;
* breast cancer, labels on the server (one cut after the head): how many of the labels
  the server receives are true, with RandomizedResponse;
* digits, U-shaped (head Dense(64) | Dense(64), Dense(32) | softmax(10)): label recovery
  by clustering the gradients (vs chance), and reconstruction of the device's images from
  its activations by a decoder trained on 400 auxiliary images (MSE, SSIM), with NoPeek,
  ActivationNoise, MaxNorm.

Usage: .venv/bin/python benchmarks/privacy.py [--quick] [--seeds N]
Writes results/privacy.{json,md}, results/privacy_labels.png, results/privacy_reconstruction.png,
results/privacy_pictures_*.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _common import RESULTS, machine, table, verdict, write_results  # noqa: E402

import splitkeras  # noqa: E402
from splitkeras.privacy.accounting import dp_epsilon  # noqa: E402
from splitkeras.privacy.defences import (  # noqa: E402
    ActivationNoise,
    GradientNoise,
    MaxNorm,
    NoPeek,
    RandomizedResponse,
)
from splitkeras.privacy.harness import audit, train_in_process  # noqa: E402

tf.get_logger().setLevel("ERROR")
DELTA = 1e-5


def cancer() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.target))
    x, y = data.data[order].astype("float32"), data.target[order].astype("int64")
    x = (x - x[:400].mean(0)) / (x[:400].std(0) + 1e-6)
    return x[:400], y[:400], x[400:], y[400:]


def cancer_split(mode: str, seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((30,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="head")(inputs)
    h = keras.layers.Dense(16, activation="relu", name="mid_1")(h)
    h = keras.layers.Dense(8, activation="relu", name="mid_2")(h)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="out")(h)
    return splitkeras.split(keras.Model(inputs, outputs), at=["head", "mid_2"] if mode == "u_shaped" else ["head"])


def digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    x, y = (data.data[order] / 16).astype("float32"), data.target[order].astype("int64")
    return x[:1000], y[:1000], x[1000:1400], x[1400:], y[1400:]  # device, attacker's aux, test


def digits_split(seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(64, activation="relu", name="head")(inputs)
    h = keras.layers.Dense(64, activation="relu", name="mid_1")(h)
    h = keras.layers.Dense(32, activation="relu", name="mid_2")(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="out")(h)
    return splitkeras.split(keras.Model(inputs, outputs), at=["head", "mid_2"])


def _epsilon(defence: Any, epochs: int) -> float | None:
    if isinstance(defence, ActivationNoise) and defence.clip is not None and defence.sigma > 0:
        return dp_epsilon(defence.sigma, DELTA, epochs=epochs)
    if isinstance(defence, RandomizedResponse):
        return defence.epsilon * epochs  # per-sample label-DP, basic composition over epochs
    return None


def run_cancer(seeds: int, epochs: int) -> list[dict[str, Any]]:
    x, y, xt, yt = cancer()
    configs: list[tuple[str, str, float | None, Any]] = [("u_shaped", "none", None, lambda s: None)]
    configs += [("u_shaped", "MaxNorm", k, lambda s, k=k: MaxNorm(k, seed=s)) for k in (0.25, 0.5, 1.0)]
    configs += [("u_shaped", "GradientNoise", k, lambda s, k=k: GradientNoise(k, seed=s)) for k in (0.5, 1.0, 2.0, 4.0)]
    configs += [("u_shaped", "ActivationNoise", k, lambda s, k=k: ActivationNoise(2.0, k, seed=s))
                for k in (0.25, 1.0)]
    configs += [("labels_on_server", "none", None, lambda s: None)]
    configs += [("labels_on_server", "RandomizedResponse", k, lambda s, k=k: RandomizedResponse(k, seed=s))
                for k in (0.5, 1.0, 2.0, 4.0)]
    rows = []
    for mode, name, strength, make in configs:
        for seed in range(seeds):
            defence = make(seed)
            started = time.perf_counter()
            run = train_in_process(cancer_split(mode, seed + 1), x, y, defences=[defence] if defence else [],
                                   optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                                   epochs=epochs, batch_size=32, seed=seed)
            report = audit(run, xt, yt, y_train=y)
            rows.append({"task": "breast_cancer", "mode": mode, "defence": name, "strength": strength,
                         "seed": seed, "test_accuracy": report["test_accuracy"], **report["labels"],
                         "epsilon": _epsilon(defence, epochs), "seconds": time.perf_counter() - started})
            print(rows[-1], flush=True)
    return rows


def run_digits(seeds: int, epochs: int, decoder_epochs: int) -> list[dict[str, Any]]:
    x, y, x_aux, xt, yt = digits()
    configs: list[tuple[str, float | None, Any]] = [("none", None, lambda s: None)]
    configs += [("NoPeek", k, lambda s, k=k: NoPeek(k)) for k in (1.0, 3.0, 5.0, 10.0, 20.0)]
    configs += [("ActivationNoise", k, lambda s, k=k: ActivationNoise(4.0, k, seed=s)) for k in (0.1, 0.25, 0.5)]
    configs += [("MaxNorm", 1.0, lambda s: MaxNorm(1.0, seed=s))]
    rows = []
    for name, strength, make in configs:
        for seed in range(seeds):
            defence = make(seed)
            started = time.perf_counter()
            run = train_in_process(digits_split(seed + 1), x, y, defences=[defence] if defence else [],
                                   optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                                   epochs=epochs, batch_size=32, seed=seed)
            picture = RESULTS / f"privacy_pictures_{name}_{strength}.png" if seed == 0 and name in (
                "none", "NoPeek", "ActivationNoise") else None
            report = audit(run, xt, yt, y_train=y, x_train=x, x_aux=x_aux, image_shape=(8, 8),
                           pictures=picture, decoder_epochs=decoder_epochs, seed=seed)
            rows.append({"task": "digits", "mode": "u_shaped", "defence": name, "strength": strength, "seed": seed,
                         "test_accuracy": report["test_accuracy"], **report["labels"], **report["reconstruction"],
                         "epsilon": _epsilon(defence, epochs), "seconds": time.perf_counter() - started})
            if picture is not None:
                rows[-1]["pictures"] = picture.name
            print(rows[-1], flush=True)
    return rows


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def _groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    seen: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        seen.setdefault((r["task"], r["mode"], r["defence"], r["strength"]), []).append(r)
    return list(seen.values())


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _curve(plt: Any, groups: list[list[dict[str, Any]]], x: Any, threshold: float, labels: tuple[str, str],
           name: str) -> str:
    """One strength-vs-cost plot: per defence, (x(group), test accuracy) points annotated with the
    strength, a dotted line at the target; saved as RESULTS/name."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for defence in dict.fromkeys(g[0]["defence"] for g in groups):
        points = [(x(g), 100 * _mean(g, "test_accuracy"), g[0]["strength"]) for g in groups
                  if g[0]["defence"] == defence]
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=defence)
        for value, accuracy, strength in points:
            if strength is not None:
                axis.annotate(f"{strength:g}", (value, accuracy), fontsize=7)
    axis.axvline(threshold, color="grey", ls=":")
    axis.set_xlabel(labels[0])
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(labels[1])
    axis.legend(fontsize=8)
    figure.savefig(RESULTS / name, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return name


def plots(cancer_rows: list[dict[str, Any]], digits_rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [g for g in _groups(cancer_rows) if g[0]["mode"] == "u_shaped"]
    digits = _groups(digits_rows)
    base = _mean(next(g for g in digits if g[0]["defence"] == "none"), "mse")
    return [
        _curve(plt, labels, lambda g: _mean(g, "label_auc"), 0.6,
               ("label attack AUC (max of norm, cosine)", "breast cancer, U-shaped: label leakage vs accuracy"),
               "privacy_labels.png"),
        _curve(plt, digits, lambda g: _mean(g, "mse") / base, 3.0,
               ("reconstruction MSE / MSE without defence", "digits, U-shaped: input reconstruction vs accuracy"),
               "privacy_reconstruction.png"),
    ]


def markdown(cancer_rows: list[dict[str, Any]], digits_rows: list[dict[str, Any]], settings: dict[str, Any],
             done: dict[str, Any]) -> str:
    lines = ["# Privacy: attack success next to test accuracy", "",
             f"`{settings['command']}`; {settings['seeds']} seed(s) per row (means), breast cancer "
             f"{settings['cancer_epochs']} epochs, digits {settings['digits_epochs']} epochs, batch 32, Adam(1e-3). "
             "Attacks and mechanisms: docs/privacy.md. Plots: `privacy_labels.png`, "
             "`privacy_reconstruction.png`.", "", "## Done means", ""]
    lines += [f"* {text}: {verdict(met)}" for text, met in done["checks"]]
    lines += ["", "## Breast cancer (binary), U-shaped: label inference from the gradients the server receives",
              ""]
    base = [g for g in _groups(cancer_rows) if g[0]["mode"] == "u_shaped" and g[0]["defence"] == "none"][0]
    rows = []
    for g in _groups(cancer_rows):
        if g[0]["mode"] != "u_shaped":
            continue
        eps = g[0]["epsilon"]
        rows.append([g[0]["defence"], _fmt(g[0]["strength"], 2), _fmt(_mean(g, "norm_auc")),
                     _fmt(_mean(g, "cosine_auc")), _fmt(_mean(g, "label_auc")),
                     _fmt(100 * _mean(g, "test_accuracy"), 1),
                     _fmt(100 * (_mean(g, "test_accuracy") - _mean(base, "test_accuracy")), 1),
                     _fmt(eps, 1) if eps is not None else "-"])
    lines.append(table(["defence", "strength", "norm AUC", "cosine AUC", "label AUC (max)", "test acc %",
                        "acc change (points)", "epsilon (delta 1e-5)"], rows))
    lines += ["", "## Breast cancer, labels on the server: randomized response", ""]
    rows = []
    for g in _groups(cancer_rows):
        if g[0]["mode"] == "labels_on_server":
            rows.append([g[0]["defence"], _fmt(g[0]["strength"], 2), _fmt(_mean(g, "labels_received_correct")),
                         _fmt(_mean(g, "label_auc")), _fmt(100 * _mean(g, "test_accuracy"), 1),
                         _fmt(g[0]["epsilon"], 1)])
    lines.append(table(["defence", "epsilon per release", "labels received true", "label AUC from the tail's input "
                        "gradients", "test acc %", "epsilon over the epochs"], rows))
    lines += ["", "## Digits (10 classes), U-shaped: label recovery and input reconstruction", ""]
    base = [g for g in _groups(digits_rows) if g[0]["defence"] == "none"][0]
    rows = []
    for g in _groups(digits_rows):
        eps = g[0]["epsilon"]
        rows.append([g[0]["defence"], _fmt(g[0]["strength"], 2), _fmt(_mean(g, "recovery_accuracy")),
                     _fmt(_mean(g, "chance")), _fmt(_mean(g, "mse"), 4),
                     _fmt(_mean(g, "mse") / _mean(base, "mse"), 2), _fmt(_mean(g, "ssim")),
                     _fmt(100 * _mean(g, "test_accuracy"), 1),
                     _fmt(100 * (_mean(g, "test_accuracy") - _mean(base, "test_accuracy")), 1),
                     _fmt(eps, 1) if eps is not None else "-", g[0].get("pictures", "")])
    lines.append(table(["defence", "strength", "label recovery", "chance", "recon. MSE", "MSE x", "SSIM",
                        "test acc %", "acc change (points)", "epsilon", "pictures"], rows))
    lines += ["", f"Guessing the auxiliary mean image gives MSE {_fmt(_mean(digits_rows, 'mse_mean_guess'), 4)}.",
              "", f"Machine: {settings['machine'].get('cpu')}, {settings['seconds']:.0f} s in all."]
    return "\n".join(lines)


def done_checks(cancer_rows: list[dict[str, Any]], digits_rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups = _groups(cancer_rows)
    base = next(g for g in groups if g[0]["mode"] == "u_shaped" and g[0]["defence"] == "none")
    base_acc = _mean(base, "test_accuracy")
    gradient = [g for g in groups if g[0]["defence"] in ("MaxNorm", "GradientNoise")]
    best_gradient = [g for g in gradient if _mean(g, "label_auc") <= 0.6
                     and base_acc - _mean(g, "test_accuracy") <= 0.02]
    dgroups = _groups(digits_rows)
    dbase = next(g for g in dgroups if g[0]["defence"] == "none")
    nopeek = [g for g in dgroups if g[0]["defence"] == "NoPeek" and _mean(g, "mse") >= 3 * _mean(dbase, "mse")
              and _mean(dbase, "test_accuracy") - _mean(g, "test_accuracy") <= 0.02]
    names = lambda gs: ", ".join(f"{g[0]['defence']}({g[0]['strength']:g})" for g in gs) or "none"  # noqa: E731
    return {"checks": [
        (f"no defence: label AUC {_mean(base, 'label_auc'):.3f} >= 0.9", _mean(base, "label_auc") >= 0.9),
        (f"gradient defence with label AUC <= 0.6 at <= 2 points accuracy cost: {names(best_gradient)}",
         bool(best_gradient)),
        (f"NoPeek with reconstruction MSE >= 3x at <= 2 points accuracy cost on digits: {names(nopeek)}",
         bool(nopeek)),
    ]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few epochs, one seed (a smoke test)")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    seeds = 1 if args.quick else args.seeds
    cancer_epochs, digits_epochs, decoder_epochs = (3, 2, 5) if args.quick else (20, 15, 60)
    cancer_rows = run_cancer(seeds, cancer_epochs)
    digits_rows = run_digits(seeds, digits_epochs, decoder_epochs)
    made = plots(cancer_rows, digits_rows)
    done = done_checks(cancer_rows, digits_rows)
    settings = {"command": "benchmarks/privacy.py" + (" --quick" if args.quick else f" --seeds {seeds}"),
                "seeds": seeds, "cancer_epochs": cancer_epochs, "digits_epochs": digits_epochs,
                "decoder_epochs": decoder_epochs, "machine": machine(),
                "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
                "seconds": time.perf_counter() - started}
    data = {"settings": settings, "breast_cancer": cancer_rows, "digits": digits_rows,
            "done": [{"check": text, "met": met} for text, met in done["checks"]], "plots": made}
    write_results("privacy", data, markdown(cancer_rows, digits_rows, settings, done))
    print("\n".join(f"{text}: {met}" for text, met in done["checks"]))


if __name__ == "__main__":
    main()
