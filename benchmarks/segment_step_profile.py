"""Where a segment step's time goes: the server's segment of the HTTP-overhead CNN, part by part.

The segment is the middle of `http_overhead.py`'s 1.3M-parameter CNN (what the server
trains), batch 32, SGD with momentum 0.9, random activations and output gradients (the
sign alternates each step, so the weights oscillate instead of drifting). Each step is
timed part by part with `time.perf_counter` between the parts (medians over all steps of
every round; the contenders take turns within each round):

* eager tape (the runner before the compiled step): inputs to tensors; the forward
  under an eager `GradientTape` (TF runs its forward function with the intermediates as
  extra outputs, and records it); `tape.gradient` (imperative_grad, the backward
  function); the optimizer's apply (a second `tf.function` call); outputs and input
  gradients to NumPy;
* compiled step (`SegmentRunner.forward` / `backward` now, when the runner has it):
  inputs, the forward function called directly, VJP + apply in one call, NumPy;
* references: the forward alone without a tape (the inference function: no
  intermediates kept), TF's forward function and backward function called directly
  without a tape, and the whole step (forward + VJP + apply) as ONE `tf.function`.

Run: `.venv/bin/python benchmarks/segment_step_profile.py --label before|after
[--rounds 5] [--steps 10]`; writes `results/segment_step_profile_<label>.json` and
`results/segment_step_profile.md` (every label found).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _common import RESULTS, machine, median, table

BATCH = 32


def build_runner(compiled: bool | None) -> Any:
    import keras
    from http_overhead import CUTS, build_model

    import splitkeras
    from splitkeras.engine import SegmentRunner

    split = splitkeras.split(build_model(), at=CUTS)
    options = {} if compiled is None else {"compiled": compiled}
    return SegmentRunner(split["middle"], keras.optimizers.SGD(0.01, momentum=0.9),
                         input_gradients=[True], **options)


def contenders(x: np.ndarray, g: np.ndarray) -> dict[str, tuple[list[str], Callable[[int], list[float]]]]:
    """name -> (part names, one step returning the seconds of each part)."""
    import inspect

    import tensorflow as tf

    from splitkeras.compiled_step import forward_backward_pair
    from splitkeras.engine import SegmentRunner

    has_compiled = "compiled" in inspect.signature(SegmentRunner).parameters
    taped = build_runner(False if has_compiled else None)
    found: dict[str, tuple[list[str], Callable[[int], list[float]]]] = {}

    def seed(k: int) -> np.ndarray:
        return g if k % 2 == 0 else -g

    def eager_tape(k: int) -> list[float]:
        t0 = time.perf_counter()
        xs = taped._inputs([x])
        t1 = time.perf_counter()
        pending = taped.taped_forward(xs, taped._forward_fn)
        t2 = time.perf_counter()
        weight_grads, input_grads = taped.vjp(pending, [seed(k)])
        t3 = time.perf_counter()
        taped._apply_fn(weight_grads)
        t4 = time.perf_counter()
        _ = [np.asarray(o) for o in pending.outputs], np.asarray(input_grads[0])
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, time.perf_counter() - t4]

    found["eager tape"] = (["inputs to tensors", "forward under a tape", "tape.gradient",
                            "optimizer apply", "to NumPy"], eager_tape)
    if has_compiled:
        compiled = build_runner(True)

        def compiled_step(k: int) -> list[float]:
            t0 = time.perf_counter()
            outputs = compiled.forward(k, [x])
            t1 = time.perf_counter()
            _ = [np.asarray(o) for o in outputs]
            t2 = time.perf_counter()
            input_grads = compiled.backward(k, [seed(k)])
            t3 = time.perf_counter()
            _ = np.asarray(input_grads[0])
            return [t1 - t0, t3 - t2, (t2 - t1) + (time.perf_counter() - t3)]

        found["compiled step"] = (["forward (inputs + forward function)", "backward (VJP + apply, one call)",
                                   "to NumPy"], compiled_step)

    reference = build_runner(False if has_compiled else None)
    xs = reference._inputs([x])
    pair = forward_backward_pair(reference._forward_fn, xs)
    assert pair is not None, "this TensorFlow offers no forward/backward pair"
    backward_eager = pair.backward_ops

    def references(k: int) -> list[float]:
        t0 = time.perf_counter()
        reference._forward_fn(xs)
        t1 = time.perf_counter()
        (outputs, regularization), residuals = pair.forward(xs)
        t2 = time.perf_counter()
        backward_eager([tf.constant(seed(k)), tf.ones_like(regularization)], residuals)
        return [t1 - t0, t2 - t1, time.perf_counter() - t2]

    found["references"] = (["forward alone, no tape (inference function)",
                            "TF's forward function, called directly",
                            "TF's backward function, called directly (eager)"], references)

    one = build_runner(False if has_compiled else None)

    def whole_step(xs_: list[Any], grads: Any) -> Any:
        pending = one.taped_forward(xs_)
        weight_grads, input_grads = one.vjp(pending, [grads])
        one._apply_impl(weight_grads)
        return pending.outputs, input_grads

    whole = tf.function(whole_step, reduce_retracing=True)

    def one_call(k: int) -> list[float]:
        t0 = time.perf_counter()
        outputs, input_grads = whole(one._inputs([x]), tf.constant(seed(k)))
        _ = [np.asarray(o) for o in outputs], np.asarray(input_grads[0])
        return [time.perf_counter() - t0]

    found["one tf.function"] = (["forward + VJP + apply as one call (incl. NumPy)"], one_call)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="before or after (the file it writes)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 16, 16, 32), dtype=np.float32)
    g = (rng.standard_normal((BATCH, 512)) * 1e-3).astype(np.float32)
    found = contenders(x, g)
    parts: dict[str, list[list[float]]] = {name: [] for name in found}
    step = 0
    for round_index in range(args.rounds + 1):  # round 0: warm-up (tracing)
        for name, (_, one_step) in found.items():
            for _ in range(args.steps if round_index else 2):
                seconds = one_step(step)
                step += 1
                if round_index:
                    parts[name].append(seconds)
        print(f"round {round_index} done", flush=True)
    result = {"label": args.label, "batch": BATCH, "rounds": args.rounds, "steps_per_round": args.steps,
              "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"), "machine": machine(),
              "contenders": {name: {"parts": dict(zip(names, [median(column) for column in zip(*parts[name])])),
                                    "total": median([sum(s) for s in parts[name]])}
                             for name, (names, _) in found.items()}}
    (RESULTS / f"segment_step_profile_{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    sections = []
    for label in ("before", "after"):
        path = RESULTS / f"segment_step_profile_{label}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        reference = data["contenders"]["one tf.function"]["total"]
        rows = []
        for name, entry in data["contenders"].items():
            for part, seconds in entry["parts"].items():
                rows.append([name, part, f"{1e3 * seconds:.2f}", f"{seconds / reference:.3f}"])
            if name == "references":  # separate calls, not one step
                continue
            rows.append([f"**{name}**", "**total (median of step sums)**", f"**{1e3 * entry['total']:.2f}**",
                         f"**{entry['total'] / reference:.3f}**"])
        load = data["machine"].get("load_average_at_start")
        sections += [f"## {label}", "",
                     f"{data['rounds']} rounds x {data['steps_per_round']} steps per contender, "
                     f"oneDNN {data['onednn']}, load average at start {load}.", "",
                     table(["contender", "part", "ms per step (median)", "/ one tf.function step"], rows), ""]
    markdown = "\n".join([
        "# Where a segment step's time goes",
        "",
        "The server's segment of `http_overhead.py`'s CNN (conv_2 .. dense_1, 1.3M parameters), "
        "batch 32, SGD(0.01, momentum 0.9), 2 shared CPU cores. "
        "Command: `.venv/bin/python benchmarks/segment_step_profile.py --label before|after`. "
        "Parts are medians over steps, so they need not add up to the total.",
        "",
        "How to read it: `forward under a tape` - `TF's forward function, called directly` is the "
        "tape's bookkeeping around the forward; `tape.gradient` - `TF's backward function, called "
        "directly` is imperative_grad's; `forward alone` against `TF's forward function` is what "
        "returning the intermediates costs (Grappler keeps its fusions or not); `optimizer apply` is "
        "a second function call with its own dispatch. The compiled step (`after`) calls the forward "
        "function directly and runs the backward function and the update as one call.",
        "", *sections])
    (RESULTS / "segment_step_profile.md").write_text(markdown.rstrip() + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
