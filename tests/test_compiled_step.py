"""The compiled segment step (`splitkeras.compiled_step`): forward and backward as compiled
calls with no eager tape between them, and `backward(..., gradient_scale=...)`.

* The compiled step is bitwise the eager-tape step (`SegmentRunner(compiled=False)`): outputs,
  input gradients, every variable and optimizer slot, over several steps of a segment with
  convolutions, BatchNorm, Dropout and a weight regularizer, guarded and unguarded.
* No eager tape is used: with `tf.GradientTape` and `imperative_grad` made to raise, the
  compiled step runs and the eager-tape step fails (so the check can fail).
* This TensorFlow offers the pair without a warning; where it does not, the runner falls
  back to the eager tape, with a warning, and computes the same bits.
* `gradient_scale`: the weight gradients are multiplied before the update (checked against
  NumPy's float32 arithmetic), the input gradients are not; exactly 1.0 changes nothing;
  a bad value is refused and changes nothing.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import splitkeras
from splitkeras import compiled_step
from splitkeras.engine import SegmentRunner
from splitkeras.errors import TrainingError
from splitkeras.guard import UpdateGuard

BATCH = 8
STEPS = 4


def conv_split(regularized: bool = True) -> Any:
    """Convolutions, BatchNorm, Dropout (and an L2 regularizer) in the middle segment."""
    keras.utils.set_random_seed(11)
    L = keras.layers
    regularizer = keras.regularizers.L2(1e-3) if regularized else None
    inputs = keras.Input((8, 8, 2), name="image")
    x = L.Conv2D(4, 3, padding="same", name="h")(inputs)
    x = L.Conv2D(6, 3, padding="same", use_bias=False, kernel_regularizer=regularizer, name="c1")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="c2")(x)
    x = L.Dropout(0.25)(x)
    x = L.Flatten(name="m")(x)
    outputs = L.Dense(3, name="logits")(x)
    return splitkeras.split(keras.Model(inputs, outputs), at=["h", "m"])


def middle_runner(compiled: bool, guard: UpdateGuard | None = None, optimizer: Any = None,
                  regularized: bool = True) -> SegmentRunner:
    optimizer = optimizer or keras.optimizers.Adam(0.01)
    return SegmentRunner(conv_split(regularized)["middle"], optimizer, guard=guard, compiled=compiled)


def batches(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH, 8, 8, 4)).astype(np.float32),
             (rng.standard_normal((BATCH, 384)) / BATCH).astype(np.float32)) for _ in range(count)]


def state(runner: SegmentRunner) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in runner.model.variables] + \
        [np.array(v.numpy(), copy=True) for v in runner.optimizer.variables]


def run(runner: SegmentRunner, data: list[tuple[np.ndarray, np.ndarray]], **backward: Any
        ) -> list[tuple[np.ndarray, np.ndarray]]:
    answers = []
    for k, (x, g) in enumerate(data):
        outputs = runner.forward(k, [x])
        grads = runner.backward(k, [g], **backward)
        answers.append((np.array(outputs[0]), np.array(grads[0])))
    return answers


def assert_bitwise(left: list[np.ndarray], right: list[np.ndarray], what: str) -> None:
    assert len(left) == len(right)
    for i, (a, b) in enumerate(zip(left, right)):
        assert a.dtype == b.dtype and np.array_equal(a, b), \
            f"{what} {i} differs: max |diff| {np.max(np.abs(a.astype(np.float64) - b)):.3g}"


@pytest.mark.parametrize("guarded", [False, True], ids=["unguarded", "guarded"])
def test_the_compiled_step_is_bitwise_the_eager_tape_step(guarded: bool) -> None:
    data = batches(STEPS)
    runs = {}
    for compiled in (False, True):
        runner = middle_runner(compiled, UpdateGuard() if guarded else None)
        runs[compiled] = (run(runner, data), state(runner))
        assert runner.compiled is compiled
        assert runner.segment.model.losses, "the segment has a regularization loss to differentiate"
    for (out_a, grad_a), (out_b, grad_b) in zip(runs[False][0], runs[True][0]):
        assert_bitwise([out_a, grad_a], [out_b, grad_b], "output / input gradient")
    assert_bitwise(runs[False][1], runs[True][1], "variable")
    assert not np.array_equal(runs[True][1][0], middle_runner(False).model.variables[0].numpy()), \
        "the steps changed the weights"


class _TapeUsed(AssertionError):
    pass


@pytest.mark.parametrize("guarded", [False, True], ids=["unguarded", "guarded"])
def test_no_eager_tape_is_used(guarded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager path enters a `GradientTape` in every forward and walks it with
    `imperative_grad` in every backward; the compiled path does neither (once traced)."""
    from tensorflow.python.eager import backprop, imperative_grad

    data = batches(2)
    runners = {c: middle_runner(c, UpdateGuard() if guarded else None) for c in (False, True)}
    for runner in runners.values():
        run(runner, data[:1])  # traces (tracing uses graph-mode tapes)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _TapeUsed("an eager GradientTape was used")

    monkeypatch.setattr(backprop.GradientTape, "__enter__", refuse)
    monkeypatch.setattr(imperative_grad, "imperative_grad", refuse)
    monkeypatch.setattr(backprop.imperative_grad, "imperative_grad", refuse)
    run(runners[True], data[1:])
    with pytest.raises(_TapeUsed):
        runners[False].forward(1, [data[1][0]])


def test_this_tensorflow_offers_the_forward_backward_pair() -> None:
    """Fails loudly when a TensorFlow upgrade changes the private API `compiled_step` uses."""
    runner = middle_runner(True)
    xs = runner._inputs([batches(1)[0][0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pair = compiled_step.forward_backward_pair(runner._forward_fn, xs)
    assert pair is not None
    assert all(pair.position_of(v) is not None for v in runner._tf_variables)
    (outputs, regularization), residuals = pair.forward(xs)
    assert len(residuals) > pair.n_outputs == len(outputs) + 1  # the intermediates are kept


def test_without_the_pair_the_runner_falls_back_to_the_eager_tape(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TensorFlow whose tape functions lack what `ForwardBackward` reads (the eager tape
    itself still works)."""

    class Renamed(compiled_step.ForwardBackward):
        def __init__(self, concrete: Any, call: Any, n_inputs: int) -> None:
            raise AttributeError("'_ForwardBackwardCall' object has no attribute '_functions'")

    data = batches(STEPS)
    expected = run(middle_runner(False), data)
    monkeypatch.setattr(compiled_step, "ForwardBackward", Renamed)
    runner = middle_runner(True)
    with pytest.warns(RuntimeWarning, match="fall back to an eager GradientTape"):
        answers = run(runner, data)
    assert not runner.compiled
    for (out_a, grad_a), (out_b, grad_b) in zip(expected, answers):
        assert_bitwise([out_a, grad_a], [out_b, grad_b], "output / input gradient")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager_tape", "compiled"])
@pytest.mark.parametrize("guarded", [False, True], ids=["unguarded", "guarded"])
def test_gradient_scale_multiplies_the_weight_gradients_only(compiled: bool, guarded: bool) -> None:
    """Plain SGD: w' = w - (g_w * s) * lr, in float32 as NumPy computes it; the input
    gradients are those of the unscaled step."""
    learning_rate, scale = 0.05, 1 / 3
    x, g = batches(1, seed=4)[0]
    plain = middle_runner(compiled, optimizer=keras.optimizers.SGD(learning_rate))
    plain.forward(0, [x])
    pending = plain._pending[0]
    weight_grads, expected_input = plain.vjp(pending, [g]) if pending.tape is not None else \
        _compiled_grads(plain, 0, g)
    before = [v.numpy() for v in plain.trainable]
    expected = [w - (gw.numpy() * np.float32(scale)) * np.float32(learning_rate)
                for w, gw in zip(before, weight_grads)]
    runner = middle_runner(compiled, UpdateGuard() if guarded else None,
                           optimizer=keras.optimizers.SGD(learning_rate))
    runner.forward(0, [x])
    input_grads = runner.backward(0, [g], gradient_scale=scale)
    assert_bitwise([np.array(input_grads[0])], [np.array(expected_input[0])], "input gradient")
    assert_bitwise([v.numpy() for v in runner.trainable], expected, "weight")


def _compiled_grads(runner: SegmentRunner, step: int, g: np.ndarray) -> tuple[list[Any], list[Any]]:
    """The weight and input gradients a compiled forward's backward function gives."""
    (pair, _, _), residuals = runner._pending[step].compiled
    seeds = runner._seeds(runner._pending[step], [g])
    grads = pair.backward_ops(seeds, residuals)
    return [grads[pair.position_of(v)] for v in runner._tf_variables], [grads[0]]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager_tape", "compiled"])
def test_gradient_scale_of_exactly_one_changes_nothing(compiled: bool) -> None:
    data = batches(STEPS)
    default = middle_runner(compiled)
    one = middle_runner(compiled)
    answers = run(default, data), run(one, data, gradient_scale=1.0)
    for (out_a, grad_a), (out_b, grad_b) in zip(*answers):
        assert_bitwise([out_a, grad_a], [out_b, grad_b], "output / input gradient")
    assert_bitwise(state(default), state(one), "variable")
    # and a power of two is exact: scaling the output gradients instead (no regularizer,
    # whose seed is 1) gives the same weights
    half, seeds_halved = middle_runner(compiled, regularized=False), middle_runner(compiled, regularized=False)
    run(half, data, gradient_scale=0.5)
    run(seeds_halved, [(x, g * np.float32(0.5)) for x, g in data])
    assert_bitwise(state(half), state(seeds_halved), "variable")
    assert not np.array_equal(state(half)[0], state(middle_runner(compiled, regularized=False))[0])


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan, math.inf, "a half", True, None])
def test_a_bad_gradient_scale_is_refused_and_changes_nothing(bad: Any) -> None:
    runner = middle_runner(True)
    x, g = batches(1)[0]
    runner.forward(0, [x])
    before = state(runner)
    with pytest.raises(TrainingError, match=r"gradient_scale must be a finite number > 0.*Nothing was changed"):
        runner.backward(0, [g], gradient_scale=bad)
    assert runner.has_pending(0)
    assert_bitwise(before, state(runner), "variable")
    runner.backward(0, [g])  # the step is still there to finish
    assert not runner.has_pending(0)


def test_a_compiled_step_inside_a_graph_uses_the_tape() -> None:
    """In a caller's tf.function (as `SplitTrainer`'s fused step) there is no eager call to
    make: the forward is the traceable, taped one."""
    runner = middle_runner(True)
    x = tf.constant(batches(1)[0][0])

    @tf.function
    def forward(x: tf.Tensor) -> Any:
        return runner._run_forward([x]).tape is not None

    assert bool(forward(x))
