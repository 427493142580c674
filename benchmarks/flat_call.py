"""The tf.function dispatch per call, with and without `splitkeras.flat_call.FlatCall`.

The demo's digits CNN, split as `splitkeras demo` splits it (head | middle | tail, batch 32):
per call, the CPU time of the middle segment's compiled backward (`SegmentRunner.backward`:
VJP and Adam update, one call) and of the tail's `train_step` (loss, metrics, update), for a
runner whose tf.functions are called through `FlatCall` (as `SegmentRunner` now does) and
one calling the tf.functions themselves (their dispatch: argument binding, trace-type
lookup, flattening). Rounds interleave the two runners; medians of the rounds.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/flat_call.py --rounds 7 --calls 60
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import keras
import tensorflow as tf
from _common import machine, median, table, write_results

import splitkeras
from splitkeras.demo import CUTS, digits_data, digits_model
from splitkeras.engine import SegmentRunner

BATCH = 32


def plain(runner: SegmentRunner) -> SegmentRunner:
    """The runner calling its tf.functions directly (their dispatch on every call)."""
    for name in ("_apply_fn", "_predict_fn", "_train_fn", "_guarded_apply_fn", "_guarded_train_fn",
                 "_test_fn"):
        setattr(runner, name, getattr(runner, name).function)
    compiled = runner._compiled
    assert compiled is not None
    entry = compiled._entry
    compiled._entry = lambda xs: (lambda e: None if e is None else (e[0], *(f.function for f in e[1:])))(
        entry(xs))
    return runner


def runners(flat: bool) -> tuple[Any, SegmentRunner, SegmentRunner]:
    split = splitkeras.split(digits_model(), at=CUTS)
    middle = SegmentRunner(split["middle"], keras.optimizers.Adam(1e-3))
    tail = SegmentRunner(split["tail"], keras.optimizers.Adam(1e-3),
                         loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if not flat:
        plain(middle), plain(tail)
    return split["head"].model, middle, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (+1 warm-up)")
    parser.add_argument("--calls", type=int, default=60, help="calls of each function per round")
    args = parser.parse_args()
    (x, y), _ = digits_data()
    xb, yb = x[:BATCH], tf.constant(y[:BATCH])
    variants = {"tf.function (dispatch)": runners(False), "FlatCall": runners(True)}
    times: dict[str, dict[str, list[float]]] = {name: {"backward": [], "train_step": []} for name in variants}
    for round_index in range(args.rounds + 1):
        for name, (head, middle, tail) in variants.items():
            activation = head([xb])
            tail.build_labels(yb)
            outputs = middle.forward(0, [activation])
            gradients, _ = tail.train_step(0, outputs, yb)
            middle.backward(0, gradients)
            seconds = {"backward": 0.0, "train_step": 0.0}
            for step in range(args.calls):
                outputs = middle.forward(step, [activation])
                start = time.process_time()
                gradients, _ = tail.train_step(step, outputs, yb)
                middle_start = time.process_time()
                middle.backward(step, gradients)
                end = time.process_time()
                seconds["train_step"] += middle_start - start
                seconds["backward"] += end - middle_start
            if round_index:  # the first round warms up
                for part, value in seconds.items():
                    times[name][part].append(1e3 * value / args.calls)
    rows, data = [], {}
    base = {part: median(times["tf.function (dispatch)"][part]) for part in ("backward", "train_step")}
    for name, parts in times.items():
        row: list[Any] = [name]
        for part in ("backward", "train_step"):
            row += [f"{median(parts[part]):.2f}", f"{base[part] - median(parts[part]):+.2f}"]
        rows.append(row)
        data[name] = {part: {"median_cpu_ms": median(v), "rounds_cpu_ms": v} for part, v in parts.items()}
    info = machine()
    markdown = (
        "# The tf.function dispatch per call (`FlatCall`)\n\n"
        f"The demo's digits CNN split at {CUTS}, batch {BATCH}: CPU ms per call (this process), medians "
        f"of {args.rounds} interleaved rounds of {args.calls} calls (after a warm-up round). "
        f"Load average (1, 5, 15 min) at the start: {info.get('load_average_at_start')}, at the end: "
        f"{[round(v, 2) for v in os.getloadavg()]}.\n\n"
        + table(["calls through", "middle backward (VJP + Adam) ms", "saved ms",
                 "tail train_step ms", "saved ms"], rows)
        + "\n\nSaved: the tf.function row minus this row (negative: slower). Reproduce: "
        f"`PYTHONPATH=$PWD .venv/bin/python benchmarks/flat_call.py --rounds {args.rounds} "
        f"--calls {args.calls}`.\n")
    write_results("flat_call", {"machine": info, "rounds": args.rounds, "calls": args.calls,
                                "variants": data}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
