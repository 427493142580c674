"""In-process split training step time over `model.fit`'s, in ONE run.

A CNN of ~1.1M parameters on 32x32x3 inputs, batch 32, cut U-shaped (head: two
convolutions and a pool; middle: two convolutions, a pool and the 1M-parameter
dense layer; tail: the classifier). Every side uses the default settings
(`jit_compile="auto"`, resolved as Keras resolves it: XLA where a GPU is present
and the model supports it, not on a CPU-only machine; op determinism off).

Contenders, all from the same initial weights on the same batches:
* `model.fit` -- the central model;
* `split.fit` -- the in-process split as `Split.compile` makes it (fused step: one
  `tf.function` per step over all segments);
* `split.fit, step protocol` -- `SplitTrainer(fused=False)`: `SegmentRunner.forward` /
  `train_step` / `backward` per segment, the path the HTTP server runs.

Method: one warm-up `fit` each (tracing and compilation excluded), then `--rounds`
rounds; each round times one `fit` per contender over the same `--steps` batches
(epochs=1, shuffle=False, verbose=0), in an order that rotates every round, so slow
drifts of a shared machine hit every side alike. Wall-clock and process CPU time
(all threads) are recorded; reported are the medians over rounds of the per-round
ratios to `model.fit`. On a machine shared with other jobs the CPU-time ratio is
the steadier figure.

Usage:
    python benchmarks/step_time.py [--steps 30] [--rounds 15] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework.config import is_op_determinism_enabled  # noqa: E402

import splitkeras  # noqa: E402

CUTS = ["pool1", "dense"]
BATCH = 32


def build_cnn(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input(shape=(32, 32, 3), name="image")
    x = L.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = L.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(name="pool1")(x)
    x = L.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = L.Conv2D(64, 3, padding="same", activation="relu", name="conv4")(x)
    x = L.MaxPooling2D(name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(256, activation="relu", name="dense")(x)
    outputs = L.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="cnn")


def compile_kwargs() -> dict:
    return dict(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])


def timed_fit(trainable, x, y) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    trainable.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per timed fit")
    parser.add_argument("--rounds", type=int, default=15, help="rotating rounds")
    parser.add_argument("--out", default="benchmarks/results", help="folder for step_time.json/.md")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.steps * BATCH, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.steps * BATCH)

    model = build_cnn()
    model.compile(**compile_kwargs())
    split = splitkeras.split(build_cnn(), at=CUTS)
    split.compile(**compile_kwargs())
    protocol = splitkeras.split(build_cnn(), at=CUTS)
    protocol.compile(**compile_kwargs())
    protocol._trainer.fused = False
    contenders = {"model.fit": model, "split.fit": split, "split.fit, step protocol": protocol}

    for trainable in contenders.values():  # warm-up: tracing and compilation
        timed_fit(trainable, x, y)

    names = list(contenders)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            w, c = timed_fit(contenders[name], x, y)
            wall[name].append(w / args.steps * 1e3)
            cpu[name].append(c / args.steps * 1e3)
        print(f"round {round_index}: " + ", ".join(
            f"{n} {wall[n][-1]:.1f} ms wall / {cpu[n][-1]:.1f} ms cpu" for n in names), flush=True)

    def ratio(times: dict[str, list[float]], name: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times["model.fit"]))

    runners = split._trainer.runners
    result = {
        "command": "python benchmarks/step_time.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": {"name": "cnn", "params": int(model.count_params()), "input": [32, 32, 3],
                  "batch_size": BATCH, "cuts": CUTS, "optimizer": "SGD(0.01, momentum=0.9)",
                  "segments": {r.segment.name: int(r.model.count_params()) for r in runners}},
        "jit_compile": {"model.fit": bool(model.jit_compile),
                        **{f"split.{r.segment.name}": bool(r.jit_compile) for r in runners}},
        "op_determinism": bool(is_op_determinism_enabled()),
        "steps_per_fit": args.steps,
        "rounds": args.rounds,
        "ms_per_step_wall": {n: [round(t, 3) for t in wall[n]] for n in names},
        "ms_per_step_cpu": {n: [round(t, 3) for t in cpu[n]] for n in names},
        "median_ms_per_step_wall": {n: round(statistics.median(wall[n]), 3) for n in names},
        "median_ms_per_step_cpu": {n: round(statistics.median(cpu[n]), 3) for n in names},
        "ratio_to_model_fit_wall": {n: round(ratio(wall, n), 4) for n in names[1:]},
        "ratio_to_model_fit_cpu": {n: round(ratio(cpu, n), 4) for n in names[1:]},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
                    "gpus": len(tf.config.list_physical_devices("GPU")),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "step_time.md").write_text(markdown(result))
    print(json.dumps({"wall": result["ratio_to_model_fit_wall"], "cpu": result["ratio_to_model_fit_cpu"]}))
    return result


def markdown(result: dict) -> str:
    m, machine = result["model"], result["machine"]
    names = list(result["median_ms_per_step_wall"])
    rows = "\n".join(
        f"| {n} | {result['median_ms_per_step_wall'][n]:.2f} | {result['median_ms_per_step_cpu'][n]:.2f} | "
        + (f"{result['ratio_to_model_fit_wall'][n]:.3f} | {result['ratio_to_model_fit_cpu'][n]:.3f} |"
           if n in result["ratio_to_model_fit_wall"] else "1 | 1 |")
        for n in names)
    return f"""# Step time: in-process `split.fit` vs `model.fit`

Command (from the repository root): `{result['command'].strip()}`

Model: {m['params']:,} parameters, input {tuple(m['input'])}, batch {m['batch_size']},
{m['optimizer']}, cut U-shaped at {m['cuts']} (parameters per segment: {m['segments']}).
jit_compile resolved from "auto": {result['jit_compile']}; op determinism
{'on' if result['op_determinism'] else 'off'}.
Machine: {machine['platform']}, {machine['cpus']} CPUs, {machine['gpus']} GPU(s),
TF {machine['tensorflow']}, Keras {machine['keras']}; load average at the end
{machine['load_average_at_end']} (a machine shared with other jobs).

{result['rounds']} rotating rounds of {result['steps_per_fit']} steps per contender, after one
warm-up fit each. Ratios are medians of the per-round ratios to `model.fit`. On a
machine shared with other jobs, wall times are bimodal (a whole fit is sometimes
descheduled for half its time), so the median wall times of the columns need not
match the per-round ratios; process CPU time (all threads) is the steadier figure.

| contender | median ms/step (wall) | median ms/step (CPU) | ratio (wall) | ratio (CPU) |
|---|---|---|---|---|
{rows}

`split.fit` is what `Split.compile` makes (one `tf.function` per step over all
segments); `split.fit, step protocol` runs `SegmentRunner.forward` / `train_step` /
`backward` segment by segment, as the HTTP server does (an eager tape around each
segment's function and five function calls per step).
Per-round values: `step_time.json`.
"""


if __name__ == "__main__":
    main()
