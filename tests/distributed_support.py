"""Helpers of tests/test_distributed.py, run in a fresh process (`python -m tests.distributed_support
mirrored`): the logical CPU devices of a MirroredStrategy must be made before TensorFlow initializes
its devices, which the pytest process has long done.

`mirrored` prints, as JSON, the largest differences between a `DistributedRunner` on 2 logical CPUs
and a `SegmentRunner` on one device, fed the same steps (two sessions, interleaved forwards and
backwards, an uneven batch of 7 = 4 + 3), and the bounds they are held to.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

BATCH, FEATURES, HIDDEN, OUTPUTS, STEPS, LEARNING_RATE = 7, 8, 16, 4, 3, 0.01
EPS32 = float(np.finfo(np.float32).eps)


def segment_model() -> Any:
    """The server segment: Dense-relu-Dense, an L2 kernel regularizer (a loss that must count once)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,), name="cut")
    hidden = keras.layers.Dense(HIDDEN, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3))(inputs)
    return keras.Model(inputs, keras.layers.Dense(OUTPUTS, name="out")(hidden))


def as_segment(model: Any) -> Any:
    from splitkeras.segments import Segment
    from splitkeras.tensor_spec import TensorSpec

    return Segment("middle", "server", model, [TensorSpec("cut", (None, FEATURES), "float32")],
                   [TensorSpec("out", (None, OUTPUTS), "float32")])


def optimizer_config(kind: str = "adam") -> dict[str, Any]:
    """Adam with clipnorm (under a strategy Keras would clip each replica's share; here the whole step's
    gradient), or plain SGD, whose update is proportional to the gradient (Adam's is nearly blind to
    its scale, so a sum taken for a mean would pass unseen)."""
    import keras

    if kind == "sgd":
        return keras.optimizers.serialize(keras.optimizers.SGD(LEARNING_RATE))
    return keras.optimizers.serialize(keras.optimizers.Adam(LEARNING_RATE, clipnorm=0.05))


def batches(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH, FEATURES)).astype("float32"),
             rng.standard_normal((BATCH, OUTPUTS)).astype("float32")) for _ in range(2 * STEPS + 1)]


def drive(runner: Any, data: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two sessions: forward a, forward b, backward a, backward b, STEPS times."""
    outputs, grads = [], []
    for step in range(STEPS):
        (xa, ga), (xb, gb) = data[2 * step], data[2 * step + 1]
        outputs.append(np.asarray(runner.forward(("a", step), [xa])[0]))
        outputs.append(np.asarray(runner.forward(("b", step), [xb])[0]))
        grads.append(np.asarray(runner.backward(("a", step), [ga])[0]))
        grads.append(np.asarray(runner.backward(("b", step), [gb])[0]))
    return outputs, grads


def mirrored() -> dict[str, Any]:
    from splitkeras import distributed

    strategy = distributed.start("mirrored", replicas=2)
    from splitkeras.engine import SegmentRunner, new_optimizer

    data = batches(1)
    reference = SegmentRunner(as_segment(segment_model()), new_optimizer(optimizer_config()), jit_compile=False)
    ref_outputs, ref_grads = drive(reference, data)
    with strategy.scope():
        model = segment_model()
        runner = distributed.DistributedRunner(as_segment(model), new_optimizer(optimizer_config()),
                                               strategy=strategy)
    outputs, grads = drive(runner, data)
    replicas = runner.replica_weights()
    weights = [np.asarray(v.numpy()) for v in reference.trainable]
    biggest = max(float(np.abs(w).max()) for w in weights)
    # a micro-batch of 3 device steps (gradient_scale 1/3), with SGD (Adam would hide a wrong scale)
    scaled_reference = SegmentRunner(as_segment(segment_model()), new_optimizer(optimizer_config("sgd")),
                                     jit_compile=False)
    initial = [np.asarray(v.numpy()) for v in scaled_reference.trainable]
    with strategy.scope():
        scaled = distributed.DistributedRunner(as_segment(segment_model()), new_optimizer(optimizer_config("sgd")),
                                               strategy=strategy)
    for one in (scaled_reference, scaled):
        for step, (x, g) in enumerate(data[:2]):
            one.forward(step, [x])
            one.backward(step, [g], gradient_scale=1 / 3)
    scaled_weights = [np.asarray(v.numpy()) for v in scaled_reference.trainable]
    return {
        "scaled_weights": max(float(np.abs(c - w).max()) for copies, w in zip(scaled.replica_weights(), scaled_weights)
                              for c in copies),
        # per update (w - lr/3 * g): the gradient in another order (BATCH eps of |g| <= |dw| / (lr/3))
        "scaled_bound": 2 * 2 * (BATCH * EPS32 * max(float(np.abs(w - w0).max())
                                                     for w, w0 in zip(scaled_weights, initial))
                                 + EPS32 * max(float(np.abs(w).max()) for w in scaled_weights)),
        "replicas": runner.local_replicas,
        "outputs": max(float(np.abs(a - b).max()) for a, b in zip(outputs, ref_outputs)),
        "input_grads": max(float(np.abs(a - b).max()) for a, b in zip(grads, ref_grads)),
        "weights": max(float(np.abs(c - w).max()) for copies, w in zip(replicas, weights) for c in copies),
        "replicas_differ": max(float(np.abs(copies[0] - c).max()) for copies in replicas for c in copies),
        # bounds from float32's eps and the sizes (docs/scaling.md, "Equality to one device"):
        # a value summed over n terms in another order differs by <= n * eps * (its scale)
        "output_bound": HIDDEN * EPS32 * max(float(np.abs(o).max()) for o in ref_outputs),
        "input_grad_bound": HIDDEN * EPS32 * max(float(np.abs(g).max()) for g in ref_grads),
        # per update: the gradient over BATCH samples in another order (relative BATCH*eps, which Adam
        # passes on at most LEARNING_RATE times), and the weight's own rounding (eps * |w|)
        "weight_bound": 2 * STEPS * (LEARNING_RATE * BATCH * EPS32 + EPS32 * biggest),
    }


def worker(index: int, ports: str, out: str) -> None:
    """One of two MultiWorkerMirroredStrategy workers (TF_CONFIG from `ports`): STEPS steps where BOTH
    workers hold a device step (each global step averages two), then one where only worker 0 does
    (worker 1 joins idle, as the server's ticker does). Writes its outputs, input gradients and
    weights to `out` (.npz)."""
    import os

    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
                                          "task": {"type": "worker", "index": index}})
    from splitkeras import distributed

    strategy = distributed.start("multi-worker", timeout_seconds=60)
    from splitkeras.engine import new_optimizer

    with strategy.scope():
        runner = distributed.DistributedRunner(as_segment(segment_model()), new_optimizer(optimizer_config("sgd")),
                                               strategy=strategy)
    data = batches(2)
    found: dict[str, np.ndarray] = {}
    for step in range(STEPS):
        x, g = data[2 * step + index]
        found[f"out{step}"] = np.asarray(runner.forward(step, [x])[0])
        found[f"grad{step}"] = np.asarray(runner.backward(step, [g])[0])
    if index == 0:
        x, g = data[2 * STEPS]
        found["out_alone"] = np.asarray(runner.forward("alone", [x])[0])
        found["grad_alone"] = np.asarray(runner.backward("alone", [g])[0])
    else:
        runner.global_step(None, 0.0)
    for number, copies in enumerate(runner.replica_weights()):
        found[f"w{number}"] = copies[0]
    found["updates"] = np.asarray(runner.applied_updates)
    np.savez(out, **found)


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        print(json.dumps({"mirrored": mirrored}[sys.argv[1]]()))
