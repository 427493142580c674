"""The guards of a shared segment (`splitkeras.guard`, `SegmentRunner(guard=...)`): compute,
check, commit.

* An accepted guarded step is bitwise the unguarded step (forward outputs, input gradients,
  every variable, every optimizer slot), U-shaped (BatchNorm, Dropout, Adam) and with the
  labels (sample weights, SGD with momentum). The HTTP parity tests check it end to end.
* Each poison refused, with everything as it was: moving statistics and seed states after
  a refused forward, weights and optimizer slots and iterations after a refused update; a
  refusal before the tape is used keeps the step pending, one after drops it (and says so).
* The rules on their own: max_abs, the warm-up, the factor over the running scale, the
  per-sample scale of gradients, negative sample weights, the clip.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import pytest

import splitkeras
from splitkeras.engine import SegmentRunner
from splitkeras.errors import UpdateRefused
from splitkeras.guard import GuardConfig, RunningScale, UpdateGuard
from splitkeras.steps import StepLoop

RNG = np.random.default_rng(0)
BATCH = 16


def u_split() -> Any:
    keras.utils.set_random_seed(7)
    inputs = keras.Input((8,), name="features")
    x = keras.layers.Dense(12, name="h")(inputs)
    x = keras.layers.Dense(16, name="mid")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dropout(0.3, name="drop")(x)
    x = keras.layers.ReLU(name="m")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    return splitkeras.split(keras.Model(inputs, outputs), at=["h", "m"])


def conv_split() -> Any:
    """Convolutions, BatchNorm and Dropout in the middle: oneDNN fuses ops there."""
    keras.utils.set_random_seed(5)
    L = keras.layers
    inputs = keras.Input((8, 8, 2), name="image")
    x = L.Conv2D(4, 3, padding="same", name="h")(inputs)
    x = L.Conv2D(6, 3, padding="same", use_bias=False, name="c1")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="c2")(x)
    x = L.Dropout(0.2)(x)
    x = L.Flatten(name="m")(x)
    outputs = L.Dense(3, name="logits")(x)
    return splitkeras.split(keras.Model(inputs, outputs), at=["h", "m"])


def u_runner(guard: UpdateGuard | None, kind: str = "dense") -> SegmentRunner:
    split = u_split() if kind == "dense" else conv_split()
    return SegmentRunner(split["middle"], keras.optimizers.Adam(0.01), guard=guard)


def label_runner(guard: UpdateGuard | None) -> SegmentRunner:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8,), name="features")
    x = keras.layers.Dense(12, name="h")(inputs)
    x = keras.layers.Dense(12, activation="tanh", name="mid")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    tail = splitkeras.split(keras.Model(inputs, outputs), at=["h"])["tail"]
    runner = SegmentRunner(tail, keras.optimizers.SGD(0.05, momentum=0.5), guard=guard,
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           metrics=["accuracy"])
    runner.build_labels(np.zeros((BATCH,), np.int32))
    return runner


def u_batches(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(RNG.standard_normal((BATCH, 12)).astype(np.float32),
             (RNG.standard_normal((BATCH, 16)) / BATCH).astype(np.float32)) for _ in range(count)]


def state(runner: SegmentRunner) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in runner.model.variables] + \
        [np.array(v.numpy(), copy=True) for v in runner.optimizer.variables]


def assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after)
    for i, (a, b) in enumerate(zip(before, after)):
        assert np.array_equal(a, b), f"variable {i} changed"


def warmed_u(steps: int = 12, config: GuardConfig | None = None) -> SegmentRunner:
    runner = u_runner(UpdateGuard(config))
    for k, (x, g) in enumerate(u_batches(steps)):
        runner.forward(k, [x])
        runner.backward(k, [g])
    return runner


# ------------------------------------------------------------------- an accepted step is the step


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_a_guarded_u_shaped_step_is_bitwise_the_unguarded_step(kind: str) -> None:
    if kind == "dense":
        batches = u_batches(20)
    else:
        batches = [(RNG.standard_normal((BATCH, 8, 8, 4)).astype(np.float32),
                    (RNG.standard_normal((BATCH, 384)) / BATCH).astype(np.float32)) for _ in range(12)]
    runs = {}
    for name, guard in (("plain", None), ("guarded", UpdateGuard())):
        runner = u_runner(guard, kind)
        answers = []
        for k, (x, g) in enumerate(batches):
            outputs = runner.forward(k, [x])
            grads = runner.backward(k, [g])
            answers.append((np.array(outputs[0]), np.array(grads[0])))
        runs[name] = (answers, state(runner))
    for (out_a, grad_a), (out_b, grad_b) in zip(runs["plain"][0], runs["guarded"][0]):
        assert np.array_equal(out_a, out_b) and np.array_equal(grad_a, grad_b)
    assert_same(runs["plain"][1], runs["guarded"][1])


def test_a_guarded_label_step_is_bitwise_the_unguarded_step() -> None:
    runs = {}
    for name, guard in (("plain", None), ("guarded", UpdateGuard())):
        rng = np.random.default_rng(4)
        runner = label_runner(guard)
        answers = []
        for k in range(12):
            x = rng.standard_normal((BATCH, 12)).astype(np.float32)
            y = rng.integers(0, 3, BATCH).astype(np.int32)
            weights = rng.uniform(0, 2, BATCH).astype(np.float32)
            runner.model.reset_metrics()
            grads, logs = runner.train_step(k, [x], y, weights)
            answers.append((np.array(grads[0]), float(logs["loss"]), float(logs["accuracy"])))
        runs[name] = (answers, state(runner))
    for a, b in zip(runs["plain"][0], runs["guarded"][0]):
        assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert_same(runs["plain"][1], runs["guarded"][1])


# --------------------------------------------------------------------------- poison is refused

POISON_FORWARD = {
    "activations_x1e30": lambda x: x * 1e30,
    "activations_x1e5": lambda x: x * 1e5,  # finite, under max_abs, over 1000 x the running scale
}
POISON_BACKWARD = {
    "gradients_x1e30": lambda g: g * 1e30,
    "gradients_finite_huge": lambda g: np.full_like(g, -2e19),
    "gradients_x1e5": lambda g: g * 1e5,
}


@pytest.mark.parametrize("case", sorted(POISON_FORWARD))
def test_poisoned_activations_are_refused_and_change_nothing(case: str) -> None:
    runner = warmed_u()
    before = state(runner)
    x, _ = u_batches(1)[0]
    with pytest.raises(UpdateRefused) as info:
        runner.forward(100, [POISON_FORWARD[case](x)])
    assert info.value.code == "out_of_bounds" and "input tensor 'h'" in info.value.message
    assert_same(before, state(runner))  # the BatchNorm statistics and the Dropout seed too
    assert not runner.has_pending(100)


@pytest.mark.parametrize("case", sorted(POISON_BACKWARD))
def test_poisoned_gradients_are_refused_the_step_stays_pending(case: str) -> None:
    runner = warmed_u()
    x, g = u_batches(1)[0]
    runner.forward(100, [x])
    before = state(runner)
    with pytest.raises(UpdateRefused) as info:
        runner.backward(100, [POISON_BACKWARD[case](g)])
    assert info.value.code == "out_of_bounds" and info.value.step_kept
    assert "the gradient of output 'm'" in info.value.message
    assert_same(before, state(runner))
    assert runner.has_pending(100)
    runner.backward(100, [g])  # the honest gradients of the same step are still taken
    assert int(runner.optimizer.iterations.numpy()) == 13


def test_an_adam_overflow_is_rolled_back_even_without_input_bounds() -> None:
    """-2e19 is finite; squared (Adam's second moment) it is Inf in float32. With the input
    bounds out of the way, the check of the new state refuses it and rolls it back."""
    runner = warmed_u(config=GuardConfig(max_abs=1e38, factor=1e30))
    x, g = u_batches(1)[0]
    runner.forward(100, [x])
    before = state(runner)
    with pytest.raises(UpdateRefused) as info:
        runner.backward(100, [np.full_like(g, -2e19)])
    assert info.value.code == "update_refused" and not info.value.step_kept
    assert "NaN or Inf" in info.value.message and "Nothing was applied" in info.value.message
    assert_same(before, state(runner))  # weights, slots, iterations
    assert not runner.has_pending(100)  # its tape was used: the forward must come again


@pytest.mark.parametrize("route", ["backward", "train"])
def test_an_answer_beyond_the_wire_dtype_refuses_the_step_before_its_update(route: str) -> None:
    """A float16 session's answer cannot carry |x| > 65504: a step whose input gradients go past
    it is refused before its update (it would otherwise be applied with no answer to send)."""
    if route == "backward":
        runner = warmed_u(config=GuardConfig(factor=1e30))  # no relative bound in the way
        x, g = u_batches(1)[0]
        runner.forward(100, [x])
        grads = [np.full_like(g, 3e5)]  # within max_abs (1e10); input gradients ~7e5
        def run() -> Any:
            return runner.backward(100, grads)
    else:
        runner = label_runner(UpdateGuard(GuardConfig(factor=1e30)))
        x = RNG.standard_normal((BATCH, 12)).astype(np.float32)
        y = np.zeros((BATCH,), np.int32)
        def run() -> Any:  # input gradients ~5e5
            return runner.train_step(1, [x], y, np.full((BATCH,), 1e7, np.float32))
    before = state(runner)
    runner.guard.answer_limit = float(np.finfo(np.float16).max)
    with pytest.raises(UpdateRefused) as info:
        run()
    assert info.value.code == "update_refused"
    assert "wire dtype" in info.value.message and "float32" in info.value.message, info.value.message
    assert_same(before, state(runner))
    runner.guard.answer_limit = None  # a float32 session: the same step is taken
    if route == "backward":
        runner.forward(101, [x])
        runner.backward(101, grads)
    else:
        run()
    assert not all(np.array_equal(a, b) for a, b in zip(before, state(runner)))


def test_a_weight_over_max_weight_is_rolled_back() -> None:
    runner = u_runner(UpdateGuard(GuardConfig(max_weight=1e-3)))
    x, g = u_batches(1)[0]
    runner.forward(0, [x])
    before = state(runner)
    with pytest.raises(UpdateRefused, match=r"weight \|w\| = .* over the server's limit of 0.001"):
        runner.backward(0, [g])
    assert_same(before, state(runner))


def test_a_forward_that_would_poison_the_moving_statistics_is_rolled_back() -> None:
    runner = u_runner(UpdateGuard(GuardConfig(max_abs=1e38)))
    x, _ = u_batches(1)[0]
    before = state(runner)
    with pytest.raises(UpdateRefused) as info:  # BatchNorm's variance of 1e30-sized values overflows
        runner.forward(0, [x * 1e30])
    assert info.value.code == "update_refused"
    assert_same(before, state(runner))
    assert not runner.has_pending(0)


@pytest.mark.parametrize("weights, code", [(-1e30, "out_of_bounds"), (-1.0, "out_of_bounds"),
                                           (1e30, "out_of_bounds")])
def test_bad_sample_weights_are_refused(weights: float, code: str) -> None:
    runner = label_runner(UpdateGuard())
    x = RNG.standard_normal((BATCH, 12)).astype(np.float32)
    y = RNG.integers(0, 3, BATCH).astype(np.int32)
    before = state(runner)
    sample_weight = np.ones(BATCH, np.float32)
    sample_weight[3] = weights
    with pytest.raises(UpdateRefused) as info:
        runner.train_step(0, [x], y, sample_weight)
    assert info.value.code == code and "sample_weight" in info.value.message
    assert_same(before, state(runner))


def test_a_huge_loss_is_refused_and_the_label_step_rolled_back() -> None:
    """Sample weights of 1e9 pass the sample-weight rules (under max_abs) but make the loss
    ~1e9 times larger: with max_abs 1e8 the loss is refused, after the step ran, and every
    variable (weights, momentum, iterations) is restored."""
    runner = label_runner(UpdateGuard(GuardConfig(max_abs=1e8)))
    x = RNG.standard_normal((BATCH, 12)).astype(np.float32)
    y = RNG.integers(0, 3, BATCH).astype(np.int32)
    before = state(runner)
    with pytest.raises(UpdateRefused) as info:
        runner.train_step(0, [x], y, np.full(BATCH, 9e7, np.float32))
    assert info.value.code == "update_refused"
    assert_same(before, state(runner))


def test_a_refused_backward_keeps_the_step_in_a_step_loop() -> None:
    runner = warmed_u()
    loop = StepLoop([runner])
    x, g = u_batches(1)[0]
    loop.forward("k", {"h": x})
    with pytest.raises(UpdateRefused):
        loop.backward("k", {"m": g * 1e30})
    assert loop.has_pending("k") and runner.has_pending("k")
    loop.backward("k", {"m": g})
    assert not loop.has_pending("k")


# ---------------------------------------------------------------------------------- the rules


def test_max_abs_applies_from_the_first_request() -> None:
    guard = UpdateGuard(GuardConfig(max_abs=100.0))
    assert guard.measure("input", "h", np.full((2, 3), 99.0, np.float32)) == ("input:h", 99.0)
    with pytest.raises(UpdateRefused, match=r"\|x\| = 101, over the server's limit of 100"):
        guard.measure("input", "h", np.full((2, 3), -101.0, np.float32))


def test_the_relative_bound_starts_after_the_warmup() -> None:
    guard = UpdateGuard(GuardConfig(factor=10.0, warmup=3))
    for _ in range(2):
        guard.accept([guard.measure("input", "h", np.ones((4, 2), np.float32))])
    guard.measure("input", "h", np.full((4, 2), 50.0, np.float32))  # still in the warm-up: accepted
    guard.accept([guard.measure("input", "h", np.ones((4, 2), np.float32))])
    assert guard.scales["input:h"].count == 3 and math.isclose(guard.scales["input:h"].scale, 1.0)
    guard.measure("input", "h", np.full((4, 2), 9.9, np.float32))
    with pytest.raises(UpdateRefused) as info:
        guard.measure("input", "h", np.full((4, 2), 10.1, np.float32))
    assert info.value.code == "out_of_bounds" and info.value.details["bound"] == pytest.approx(10.0)


def test_gradients_are_compared_per_sample() -> None:
    """A mean loss gives each sample 1/batch of the gradient: a device with batch 1 sends
    gradients 64 times those of one with batch 64, and both are within the bound."""
    guard = UpdateGuard(GuardConfig(factor=10.0, warmup=1))
    guard.accept([guard.measure("output_grad", "m", np.full((64, 3), 1 / 64, np.float32))])
    assert guard.measure("output_grad", "m", np.full((1, 3), 1.0, np.float32)) == ("output_grad:m", 1.0)


def test_the_running_scale_is_a_geometric_moving_average() -> None:
    scale = RunningScale()
    for value in (1.0, 100.0):
        scale.add(value, decay=0.99)
    assert scale.scale == pytest.approx(10.0)  # the warm-up: the plain mean of the logs
    scale.add(0.0, decay=0.99)  # a zero tensor says nothing
    assert scale.count == 2
    for _ in range(200):
        scale.add(1e3, decay=0.5)
    assert scale.scale == pytest.approx(1e3)


def test_one_accepted_request_moves_the_scale_by_at_most_factor_to_the_weight() -> None:
    guard = UpdateGuard(GuardConfig(factor=1000.0, warmup=10))
    for _ in range(200):
        guard.accept([guard.measure("input", "h", np.ones((2, 2), np.float32))])
    guard.accept([guard.measure("input", "h", np.full((2, 2), 999.0, np.float32))])
    assert guard.scales["input:h"].scale < 1000 ** 0.01 * 1.0001


def test_computed_tensors_are_checked_for_finiteness_and_max_abs_only() -> None:
    guard = UpdateGuard(GuardConfig(factor=2.0, warmup=0))
    assert guard.measure("input_grad", "h", np.full((2, 2), 1e9, np.float32)) is None
    with pytest.raises(UpdateRefused) as info:
        guard.measure("output", "m", np.array([[np.inf]], np.float32))
    assert info.value.code == "update_refused" and "Nothing was applied" in info.value.message


def test_the_clip_scales_to_the_global_norm_only_when_over_it() -> None:
    guard = UpdateGuard(GuardConfig(max_grad_norm=5.0))
    small = [np.full((2, 2), 1.0, np.float32)]  # norm 2
    assert guard.clip(small)[0] is small[0]
    big = [np.full((2, 2), 3.0, np.float32), np.full((1, 4), 4.0, np.float32)]  # norm 10
    clipped = guard.clip(big)
    norm = math.sqrt(sum(float(np.sum(np.square(c, dtype=np.float64))) for c in clipped))
    assert norm == pytest.approx(5.0, rel=1e-6) and clipped[0].dtype == np.float32
    assert UpdateGuard().clip(big)[0] is big[0]  # no clip set


def test_the_clip_reaches_the_update() -> None:
    """With max_grad_norm, a backward applies the clipped gradients: the same weights as an
    unguarded step given the clipped gradients by hand."""
    x, g = u_batches(1)[0]
    g = g * 50
    clipped = UpdateGuard(GuardConfig(max_grad_norm=0.5)).clip([g])[0]
    assert not np.array_equal(clipped, g)
    guarded, plain = u_runner(UpdateGuard(GuardConfig(max_grad_norm=0.5))), u_runner(None)
    for runner, grads in ((guarded, g), (plain, clipped)):
        runner.forward(0, [x])
        runner.backward(0, [grads])
    assert_same(state(plain), state(guarded))


@pytest.mark.parametrize("bad", [dict(factor=1.0), dict(max_abs=0.0), dict(warmup=-1), dict(decay=1.0),
                                 dict(max_grad_norm=float("nan")), dict(max_grad_norm=0.0)])
def test_bad_guard_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GuardConfig(**bad)
