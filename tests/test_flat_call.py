"""`splitkeras.flat_call.FlatCall`: a `tf.function` called without its per-call dispatch.

* After the first call of a signature, the tf.function's dispatch (`tracing_compilation.
  trace_function`) is not reached; a new signature (a last, smaller batch) goes through it
  and traces as the plain tf.function does (the same tracing count under `reduce_retracing`).
* Bitwise: a SegmentRunner whose compiled functions are called through FlatCall ends with
  the variables, optimizer slots, input gradients and logs of one calling the tf.functions,
  over steps with a smaller last batch, guarded and unguarded.
* Fallbacks: NumPy arguments, a call inside a caller's tf.function and a TensorFlow whose
  private APIs do not answer as TF 2.21's go through the tf.function, with the same results.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager.polymorphic_function import tracing_compilation

from splitkeras.engine import SegmentRunner
from splitkeras.flat_call import FlatCall
from splitkeras.guard import UpdateGuard
from tests.test_compiled_step import conv_split


@pytest.fixture
def dispatches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the tf.function dispatches (each eager call of a tf.function makes one)."""
    calls: list[int] = []
    original = tracing_compilation.trace_function

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tracing_compilation, "trace_function", counted)
    return calls


def body(xs: list[tf.Tensor], scale: tf.Tensor, offset: float) -> tuple[list[tf.Tensor], tf.Tensor]:
    return [x * scale + offset for x in xs], tf.reduce_sum(xs[0])


def test_the_dispatch_is_skipped_once_a_signature_is_known(dispatches: list[int]) -> None:
    plain = tf.function(body, reduce_retracing=True)
    flat = FlatCall(tf.function(body, reduce_retracing=True))
    scale = tf.constant(3.0)
    rng = np.random.default_rng(0)
    for rows in (4, 4, 4, 2, 4, 2):
        xs = [tf.constant(rng.normal(size=(rows, n)).astype("float32")) for n in (3, 5)]
        expected, found = plain(xs, scale, 0.5), flat(xs, scale, 0.5)
        for a, b in zip(tf.nest.flatten(expected), tf.nest.flatten(found)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert type(found) is type(expected) and type(found[0]) is type(expected[0])
    # plain: 6 dispatches (+ the lookups FlatCall makes after a first call); FlatCall: one per
    # signature (4 rows, 2 rows), each followed by its lookup
    assert len(dispatches) == 6 + 2 * 2
    assert flat.function.experimental_get_tracing_count() == plain.experimental_get_tracing_count()
    # another value of a Python argument is another signature, traced as the plain one traces
    flat([tf.ones([4, 3]), tf.ones([4, 5])], scale, 1.5)
    assert len(dispatches) == 10 + 2
    assert len(flat._concrete) == 3


def test_numpy_arguments_and_graph_calls_go_through_the_tf_function(dispatches: list[int]) -> None:
    flat = FlatCall(tf.function(body))
    xs = [np.ones([2, 3], np.float32)]
    for _ in range(3):
        np.testing.assert_array_equal(flat(xs, tf.constant(2.0), 0.0)[0][0].numpy(), 2 * xs[0])
    assert len(dispatches) == 3 and flat._concrete == {}

    @tf.function
    def caller(x: tf.Tensor) -> tf.Tensor:
        return flat([x], tf.constant(2.0), 0.0)[0][0]

    np.testing.assert_array_equal(caller(tf.ones([2, 3])).numpy(), np.full([2, 3], 2.0))
    assert flat._concrete == {}


def test_without_the_private_apis_every_call_dispatches(dispatches: list[int]) -> None:
    """A callable without TF 2.21's tf.function attributes (as another TF's might lack them)."""
    function = tf.function(lambda x: x + 1.0)
    flat = FlatCall(lambda x: function(x))
    for _ in range(3):
        np.testing.assert_array_equal(flat(tf.ones([2])).numpy(), [2.0, 2.0])
    assert list(flat._concrete.values()) == [None] and len(dispatches) == 3


def unwrapped(runner: SegmentRunner) -> SegmentRunner:
    """The runner calling its tf.functions directly (no FlatCall), as before FlatCall."""
    for name in ("_apply_fn", "_predict_fn", "_train_fn", "_guarded_apply_fn", "_guarded_train_fn",
                 "_test_fn"):
        setattr(runner, name, getattr(runner, name).function)
    assert runner._compiled is not None
    entry = runner._compiled._entry

    def plain_entry(xs: Any) -> Any:
        found = entry(xs)
        return None if found is None else (found[0], *(f.function for f in found[1:]))

    runner._compiled._entry = plain_entry  # type: ignore[method-assign]
    return runner


def runners(guarded: bool, wrapped: bool) -> tuple[SegmentRunner, SegmentRunner]:
    split = conv_split()
    made = []
    for name, loss in (("middle", None), ("tail", "sparse_categorical_crossentropy")):
        guard = UpdateGuard() if guarded else None
        runner = SegmentRunner(split[name], keras.optimizers.Adam(0.01), guard=guard, loss=loss,
                               metrics=["accuracy"] if loss else None)
        made.append(runner if wrapped else unwrapped(runner))
    return made[0], made[1]


def run_steps(guarded: bool, wrapped: bool) -> list[np.ndarray]:
    middle, tail = runners(guarded, wrapped)
    head = conv_split()["head"].model
    rng = np.random.default_rng(3)
    found: list[np.ndarray] = []
    for step, rows in enumerate((8, 8, 3, 8)):
        x = head([rng.normal(size=(rows, 8, 8, 2)).astype("float32")])
        y = tf.constant(rng.integers(0, 3, size=rows))
        tail.build_labels(y)
        activations = middle.forward(step, [x])
        gradients, logs = tail.train_step(step, activations, y)
        found += [g.numpy() for g in middle.backward(step, gradients) if g is not None]
        found += [np.asarray(v) for v in logs.values()]
        found += [np.asarray(v) for v in middle.predict([x])]
    for runner in (middle, tail):
        found += [np.asarray(v) for v in runner.model.weights + runner.optimizer.variables]
    if wrapped:  # the flat calls were made: a concrete function kept for each batch size
        assert middle._compiled is not None
        entries = middle._compiled._by_signature.values()  # one backward per batch size
        backwards = [(entry[2 if guarded else 1], 1) for entry in entries]
        train = tail._guarded_train_fn if guarded else tail._train_fn
        for function, count in (*backwards, (train, 2), (middle._predict_fn, 2)):
            assert len(function._concrete) == count and None not in function._concrete.values()
    return found


@pytest.mark.parametrize("guarded", [False, True], ids=["unguarded", "guarded"])
def test_a_runner_through_flat_calls_is_bitwise_the_tf_functions(guarded: bool) -> None:
    expected, found = run_steps(guarded, wrapped=False), run_steps(guarded, wrapped=True)
    assert len(found) == len(expected)
    for a, b in zip(expected, found):
        np.testing.assert_array_equal(a, b)
