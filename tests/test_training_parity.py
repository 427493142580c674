"""`Split.fit` trains exactly like `keras.Model.fit`.

Every case builds the same model twice from the same seed, cuts one copy with
`splitkeras.split`, compiles both alike, seeds Keras (`set_random_seed(7)`)
right before each `fit` (same shuffles, same Dropout masks), and compares
every weight of `split.join()` -- BatchNormalization moving statistics
included -- with the reference model's, by name.

Determinism: `tests/conftest.py` enables TF op determinism (re-enabled here so
this module also runs alone). Keras then resolves `jit_compile="auto"` to False,
and so does the split engine, so both sides run the same kernels.

Measured on this project's CPU machine (2 cores, TF 2.21, Keras 3.15), max|diff|
over all weights after 2 epochs of 4 steps, U-shaped and single split alike: the
fused in-process step (the default, one tf.function per step) is bitwise identical
to model.fit (0) for SGD(momentum=0.9), Adam and RMSprop; the per-segment step
protocol (`fused=False`, what the server runs) gives SGD 6e-8, Adam 2.2e-7, RMSprop
5.7e-7 on `kitchen_sink_model` (its L2 term and BatchNorm reductions are computed in
separate graphs) and reported losses within 1.2e-7. `TOLERANCE` is 2e-6: 3.5x the
worst observation, 5x tighter than the 1e-5 promised in docs/training.md.

The conv-bias-before-BatchNorm trap: a convolution WITH a bias directly followed
by BatchNormalization has a bias whose true gradient is exactly 0 (BatchNorm
subtracts the batch mean). Its computed gradient is float noise (~1e-9), and the
noise differs when a cut separates the conv from its BatchNorm (oneDNN fuses
conv+BN in one graph and not in the other). SGD moves that bias by lr * 1e-9,
invisible; Adam and RMSprop normalise the gradient by its own running magnitude,
so they move it by ~lr in an arbitrary direction on both sides: a 3e-3 difference
on a weight that has no effect on any output. The models here therefore use
`use_bias=False` before BatchNorm, as real architectures (ResNet, MobileNet) do.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from models import multi_io_model, skip_model  # noqa: E402

import splitkeras  # noqa: E402
from splitkeras.errors import TrainingError  # noqa: E402

tf.config.experimental.enable_op_determinism()

TOLERANCE = 2e-6  # weights and reported metrics; see the module docstring
FIT_SEED = 7
BATCH = 16
EPOCHS = 2

L = keras.layers


# ---- models ------------------------------------------------------------------------------------
def kitchen_sink_model(seed: int = 1234) -> keras.Model:
    """Every boundary shape the parity matrix needs, in one small CNN.

    image(8, 8, 3) -> `stem_conv` (L2 kernel regularizer, no bias) -> `stem_bn` -> `stem_relu`;
    a residual block on it: `block_conv1` -> `block_bn1` -> `block_relu1` -> `block_conv2` ->
    `block_bn2`, added to `stem_relu` (`block_add`) -> `block_out` -> `pool` -> `mid_dense`(6);
    `embed` (global pool of `stem_relu`) is concatenated with it (`merge`) -> `logits`(3).

    Cuts:
    * U-shaped `["block_relu1", "mid_dense"]`: the head sends `stem_relu` and `block_relu1`
      (a cut inside the residual block: two tensors cross); the middle returns `mid_dense`;
      `stem_relu` also goes straight from the head to the tail (head-to-tail skip), so the
      head sums the gradients the middle and the tail send for it.
    * single `["block_relu1"]`: the same two tensors cross to the label segment.
    The head holds the L2 regularizer and two BatchNorms; the middle one BatchNorm.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(8, 8, 3), name="image")
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name="stem_conv",
                 kernel_regularizer=keras.regularizers.L2(1e-2))(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    stem = L.ReLU(name="stem_relu")(x)
    embed = L.GlobalAveragePooling2D(name="embed")(stem)
    y = L.Conv2D(4, 3, padding="same", use_bias=False, name="block_conv1")(stem)
    y = L.BatchNormalization(name="block_bn1")(y)
    y = L.ReLU(name="block_relu1")(y)
    y = L.Conv2D(4, 3, padding="same", use_bias=False, name="block_conv2")(y)
    y = L.BatchNormalization(name="block_bn2")(y)
    y = L.Add(name="block_add")([stem, y])
    y = L.ReLU(name="block_out")(y)
    y = L.GlobalAveragePooling2D(name="pool")(y)
    y = L.Dense(6, activation="relu", name="mid_dense")(y)
    z = L.Concatenate(name="merge")([y, embed])
    outputs = L.Dense(3, name="logits")(z)
    return keras.Model(inputs, outputs, name="kitchen_sink")


def dropout_model(seed: int = 1234) -> keras.Model:
    """features(6) -> `h1`(16) -> `head_drop`(0.5) | `h2`(16) -> `mid_drop`(0.5) -> `mid_dense`(8)
    | `logits`(3). U-shaped cut `["head_drop", "mid_dense"]`: Dropout in head and middle."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(6,), name="features")
    x = L.Dense(16, activation="relu", name="h1")(inputs)
    x = L.Dropout(0.5, name="head_drop")(x)
    x = L.Dense(16, activation="relu", name="h2")(x)
    x = L.Dropout(0.5, name="mid_drop")(x)
    x = L.Dense(8, activation="relu", name="mid_dense")(x)
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="dropout_model")


U_SHAPED = ["block_relu1", "mid_dense"]
SINGLE = ["block_relu1"]
SKIP_CUTS = ["encode", "middle_2"]  # skip_model: `embed` goes from the head to the tail

OPTIMIZERS: dict[str, Callable[[], keras.optimizers.Optimizer]] = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
}


def logits_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype("float32"), rng.integers(0, 3, n)


IMAGES, LABELS = data((8, 8, 3))
VAL_IMAGES, VAL_LABELS = data((8, 8, 3), n=24, seed=1)
FEATURES, FEATURE_LABELS = data((6,))


# ---- helpers -----------------------------------------------------------------------------------
def weights_by_name(model: keras.Model) -> dict[str, np.ndarray]:
    return {w.path: w.numpy() for w in model.weights}


def weight_diffs(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float]:
    """max|diff| per weight; the two models must have exactly the same weight names."""
    assert sorted(reference) == sorted(other), "the joined model's weights are not the model's"
    return {name: float(np.max(np.abs(reference[name] - other[name]))) for name in reference}


def assert_same_weights(reference: dict[str, np.ndarray], other: dict[str, np.ndarray],
                        tolerance: float = TOLERANCE) -> float:
    diffs = weight_diffs(reference, other)
    worst = max(diffs, key=diffs.__getitem__)
    print(f" max|weight diff| {diffs[worst]:.3g} ({worst})", end="")  # `pytest -s -v` shows it
    assert diffs[worst] <= tolerance, (
        f"'{worst}' differs by {diffs[worst]:.3g} (> {tolerance}); all over tolerance: "
        f"{ {k: v for k, v in diffs.items() if v > tolerance} }")
    return diffs[worst]


def assert_same_history(reference: keras.callbacks.History, other: keras.callbacks.History) -> None:
    assert sorted(other.history) == sorted(reference.history)
    assert other.epoch == reference.epoch
    assert other.params == reference.params
    for key, values in reference.history.items():
        np.testing.assert_allclose(other.history[key], values, rtol=0, atol=TOLERANCE, err_msg=key)


def fit_both(reference: keras.Model, split: splitkeras.Split, x: Any, y: Any = None,
             **fit_kwargs: Any) -> tuple[keras.callbacks.History, keras.callbacks.History]:
    kwargs = dict(batch_size=BATCH, epochs=EPOCHS, verbose=0) | fit_kwargs
    if isinstance(x, tf.data.Dataset):
        kwargs.pop("batch_size")
    keras.utils.set_random_seed(FIT_SEED)
    reference_history = reference.fit(x, y, **kwargs)
    keras.utils.set_random_seed(FIT_SEED)
    split_history = split.fit(x, y, **kwargs)
    return reference_history, split_history


@dataclass
class Trained:
    reference: keras.Model
    split: splitkeras.Split
    reference_history: keras.callbacks.History
    split_history: keras.callbacks.History
    reference_weights: dict[str, np.ndarray]
    split_weights: dict[str, np.ndarray]  # right after fit, before any other call


KITCHEN_SINK_FIT = dict(batch_size=BATCH, epochs=EPOCHS, verbose=0,
                        validation_data=(VAL_IMAGES, VAL_LABELS))


@functools.cache
def kitchen_sink_reference(optimizer: str) -> tuple[keras.Model, keras.callbacks.History, dict]:
    """model.fit of the uncut model (cached: one per optimizer serves both cuts)."""
    reference = kitchen_sink_model()
    reference.compile(optimizer=OPTIMIZERS[optimizer](), loss=logits_loss(), metrics=["accuracy"])
    keras.utils.set_random_seed(FIT_SEED)
    history = reference.fit(IMAGES, LABELS, **KITCHEN_SINK_FIT)
    return reference, history, weights_by_name(reference)


@functools.cache
def trained_kitchen_sink(optimizer: str, cuts: tuple[str, ...]) -> Trained:
    """The parity matrix's runs (cached: several tests look at the same run)."""
    split = splitkeras.split(kitchen_sink_model(), at=list(cuts))
    split.compile(optimizer=OPTIMIZERS[optimizer](), loss=logits_loss(), metrics=["accuracy"])
    reference, reference_history, reference_weights = kitchen_sink_reference(optimizer)
    keras.utils.set_random_seed(FIT_SEED)
    split_history = split.fit(IMAGES, LABELS, **KITCHEN_SINK_FIT)
    return Trained(reference, split, reference_history, split_history, reference_weights,
                   weights_by_name(split.join()))


# ---- the parity matrix -------------------------------------------------------------------------
@pytest.mark.parametrize("cuts", [tuple(U_SHAPED), tuple(SINGLE)], ids=["u_shaped", "single"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fit_matches_model_fit(optimizer: str, cuts: tuple[str, ...]) -> None:
    """Residual-block cut, head-to-tail skip, BatchNorm, L2 in the head: every weight (moving
    statistics included) and every reported value (loss with the head's L2 term, accuracy,
    val_loss, val_accuracy) equals model.fit's."""
    run = trained_kitchen_sink(optimizer, cuts)
    segments = run.split.segments
    assert [s.name for s in segments[0].outputs] == ["stem_relu", "block_relu1"]
    if len(segments) == 3:  # the tail reads the head's tensor directly
        assert "stem_relu" in [s.name for s in segments[2].inputs]
    assert_same_weights(run.reference_weights, run.split_weights)
    assert_same_history(run.reference_history, run.split_history)
    # training moved the weights (so equality is not trivially true)
    assert weight_diffs(weights_by_name(kitchen_sink_model()), run.split_weights)["stem_conv/kernel"] > 1e-2
    # The head's L2 term is large enough that a reported loss without it would fail above.
    assert float(sum(run.split.segments[0].model.losses)) > 1e3 * TOLERANCE


def test_the_step_protocol_matches_model_fit_and_the_fused_step() -> None:
    """`fused=False` runs `SegmentRunner.forward` / `train_step` / `backward` per segment, the
    path the HTTP server and the device client run; it ends where model.fit and the fused
    in-process step (the default, a single tf.function per step) end."""
    run = trained_kitchen_sink("adam", tuple(U_SHAPED))
    assert run.split._trainer.fused
    split = splitkeras.split(kitchen_sink_model(), at=U_SHAPED)
    split.compile(optimizer=OPTIMIZERS["adam"](), loss=logits_loss(), metrics=["accuracy"])
    split._trainer.fused = False
    calls: list[str] = []
    for runner in split._trainer.runners[:-1]:
        def counted(step: Any, grads: Any, backward: Any = runner.backward,
                    name: str = runner.segment.name) -> Any:
            calls.append(name)
            return backward(step, grads)

        runner.backward = counted  # type: ignore[method-assign]
    keras.utils.set_random_seed(FIT_SEED)
    history = split.fit(IMAGES, LABELS, **KITCHEN_SINK_FIT)
    assert calls == ["middle", "head"] * (EPOCHS * 4)
    protocol_weights = weights_by_name(split.join())
    assert_same_weights(run.reference_weights, protocol_weights)
    assert_same_history(run.reference_history, history)
    assert_same_weights(run.split_weights, protocol_weights)


@pytest.mark.parametrize("cuts", [["merge", "trunk"], ["merge"]], ids=["u_shaped", "single"])
def test_multi_output_two_losses_with_loss_weights(cuts: list[str]) -> None:
    """Two inputs, two outputs, a loss and metrics per output (dict), loss_weights."""
    compile_kwargs = dict(
        loss={"class_out": "sparse_categorical_crossentropy", "value_out": "mse"},
        loss_weights={"class_out": 1.0, "value_out": 0.5},
        metrics={"class_out": ["accuracy"], "value_out": ["mae"]},
    )
    rng = np.random.default_rng(3)
    x = [rng.standard_normal((64, 6, 6, 2)).astype("float32"),
         rng.standard_normal((64, 3)).astype("float32")]
    y = {"class_out": rng.integers(0, 3, 64), "value_out": rng.standard_normal((64, 1)).astype("float32")}
    split = splitkeras.split(multi_io_model(), at=cuts)
    split.compile(optimizer=keras.optimizers.Adam(0.01), **compile_kwargs)
    reference = multi_io_model()
    reference.compile(optimizer=keras.optimizers.Adam(0.01), **compile_kwargs)
    reference_history, split_history = fit_both(reference, split, x, y)
    assert_same_weights(weights_by_name(reference), weights_by_name(split.join()))
    assert_same_history(reference_history, split_history)
    assert {"class_out_loss", "value_out_loss", "class_out_accuracy", "value_out_mae"} <= set(
        split_history.history)
    np.testing.assert_allclose(split.evaluate(x, y, verbose=0), reference.evaluate(x, y, verbose=0),
                               rtol=0, atol=TOLERANCE)
    for ours, theirs in zip(split.predict(x, verbose=0), reference.predict(x, verbose=0)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


# ---- the checks can fail -----------------------------------------------------------------------
@pytest.mark.parametrize("factor, fused", [(-1.0, True), (2.0, True), (2.0, False)],
                         ids=["sign_flipped", "scaled_x2", "scaled_x2_step_protocol"])
def test_a_wrong_server_gradient_breaks_parity(factor: float, fused: bool) -> None:
    """The parity assertion catches the published mistakes: the paper's sign slip (the
    auxiliary-label target c + dL/dc instead of c - dL/dc, i.e. the server differentiates -g)
    and the published code's x2 scaling (sum-MSE against that target gives 2g).

    Measured max|diff| vs model.fit: x2 -> 0.19, sign -> 0.42 (SGD+momentum); with Adam
    0.049 and 0.15. SGD is used because it sees a pure scale: Adam and RMSprop normalise
    each gradient by its running magnitude, so a constant factor on ALL of a segment's
    gradients is invisible to them up to epsilon. Here x2 still shows under Adam only
    because the head also gets unscaled gradients (its L2 term, the tail's share of
    `stem_relu`); a model without those would hide the x2 from an Adam-only parity test.
    """
    run = trained_kitchen_sink("sgd_momentum", tuple(U_SHAPED))
    split = splitkeras.split(kitchen_sink_model(), at=U_SHAPED)
    split.compile(optimizer=OPTIMIZERS["sgd_momentum"](), loss=logits_loss(), metrics=["accuracy"])
    split._trainer.fused = fused
    server = split._trainer.runners[1]
    assert server.segment.placement == "server"
    if fused:  # the fused step differentiates with the runner's taped VJP
        exact_vjp = server.vjp
        server.vjp = lambda taped, grads: exact_vjp(taped, [factor * g for g in grads])
    else:  # the step protocol's compiled backward (no tape, no vjp call) gets the scaled gradient
        exact_backward = server.backward
        server.backward = lambda step, grads, **options: exact_backward(step, [factor * g for g in grads],
                                                                        **options)
    keras.utils.set_random_seed(FIT_SEED)
    split.fit(IMAGES, LABELS, **KITCHEN_SINK_FIT)
    diffs = weight_diffs(run.reference_weights, weights_by_name(split.join()))
    assert max(diffs.values()) > 1e3 * TOLERANCE
    with pytest.raises(AssertionError, match="differs by"):
        assert_same_weights(run.reference_weights, weights_by_name(split.join()))


# ---- stochastic layers -------------------------------------------------------------------------
def test_dropout_in_head_and_middle_draws_model_fit_masks() -> None:
    """Dropout(0.5) in the head and in the middle: the segments start from the source layers'
    seed-generator state, and the update differentiates the pass that was sent, so the split
    draws the masks model.fit draws and ends on the same weights. Giving the middle's Dropout
    another seed state changes the result: the masks matter."""
    compile_kwargs = dict(loss=logits_loss(), metrics=["accuracy"])
    split = splitkeras.split(dropout_model(), at=["head_drop", "mid_dense"])
    split.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), **compile_kwargs)
    reference = dropout_model()
    reference.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), **compile_kwargs)
    reference_history, split_history = fit_both(reference, split, FEATURES, FEATURE_LABELS)
    assert_same_weights(weights_by_name(reference), weights_by_name(split.join()))
    assert_same_history(reference_history, split_history)
    assert split["middle"].model.get_layer("mid_drop").seed_generator.state.numpy().tolist() == \
        reference.get_layer("mid_drop").seed_generator.state.numpy().tolist()

    other = splitkeras.split(dropout_model(), at=["head_drop", "mid_dense"])
    other.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), **compile_kwargs)
    state = other["middle"].model.get_layer("mid_drop").seed_generator.state
    state.assign(state.numpy() + np.array([1, 0], dtype=state.numpy().dtype))
    keras.utils.set_random_seed(FIT_SEED)
    other.fit(FEATURES, FEATURE_LABELS, batch_size=BATCH, epochs=EPOCHS, verbose=0)
    assert max(weight_diffs(weights_by_name(reference), weights_by_name(other.join())).values()) > 1e-3


# ---- data, validation, evaluate, predict, history ---------------------------------------------
def test_dataset_input_equals_numpy_input() -> None:
    compile_kwargs = dict(loss=logits_loss(), metrics=["accuracy"])
    dataset = tf.data.Dataset.from_tensor_slices((FEATURES, FEATURE_LABELS)).batch(BATCH)
    from_dataset = splitkeras.split(skip_model(), at=SKIP_CUTS)
    from_dataset.compile(optimizer=keras.optimizers.Adam(0.01), **compile_kwargs)
    reference = skip_model()
    reference.compile(optimizer=keras.optimizers.Adam(0.01), **compile_kwargs)
    reference_history, dataset_history = fit_both(reference, from_dataset, dataset)
    from_numpy = splitkeras.split(skip_model(), at=SKIP_CUTS)
    from_numpy.compile(optimizer=keras.optimizers.Adam(0.01), **compile_kwargs)
    numpy_history = from_numpy.fit(FEATURES, FEATURE_LABELS, batch_size=BATCH, epochs=EPOCHS,
                                   shuffle=False, verbose=0)
    assert_same_weights(weights_by_name(from_numpy.join()), weights_by_name(from_dataset.join()),
                        tolerance=0.0)
    assert numpy_history.history == dataset_history.history
    assert_same_weights(weights_by_name(reference), weights_by_name(from_dataset.join()))
    assert_same_history(reference_history, dataset_history)


def test_validation_metrics_equal_model_evaluate() -> None:
    run = trained_kitchen_sink("adam", tuple(U_SHAPED))
    assert {"val_loss", "val_accuracy"} <= set(run.split_history.history)
    last = {k[len("val_"):]: v[-1] for k, v in run.split_history.history.items() if k.startswith("val_")}
    expected = run.reference.evaluate(VAL_IMAGES, VAL_LABELS, batch_size=BATCH, verbose=0,
                                      return_dict=True)
    assert sorted(last) == sorted(expected)
    for key in expected:
        assert last[key] == pytest.approx(expected[key], abs=TOLERANCE), key


def test_evaluate_and_predict_equal_the_reference_model() -> None:
    """Inference mode (BatchNorm moving statistics) and Keras' result order ([loss, metric])."""
    run = trained_kitchen_sink("rmsprop", tuple(U_SHAPED))
    ours = run.split.evaluate(IMAGES, LABELS, batch_size=BATCH, verbose=0)
    theirs = run.reference.evaluate(IMAGES, LABELS, batch_size=BATCH, verbose=0)
    assert len(ours) == len(theirs) == 2
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)
    assert run.split.evaluate(IMAGES, LABELS, verbose=0, return_dict=True) == pytest.approx(
        run.reference.evaluate(IMAGES, LABELS, verbose=0, return_dict=True), abs=TOLERANCE)
    np.testing.assert_allclose(run.split.predict(IMAGES, batch_size=BATCH, verbose=0),
                               run.reference.predict(IMAGES, batch_size=BATCH, verbose=0),
                               rtol=0, atol=TOLERANCE)
    # inference touched no training state
    assert_same_weights(run.split_weights, weights_by_name(run.split.join()), tolerance=0.0)


def test_history_keys_match_model_fit() -> None:
    run = trained_kitchen_sink("sgd_momentum", tuple(SINGLE))
    assert sorted(run.split_history.history) == sorted(run.reference_history.history) == [
        "accuracy", "loss", "val_accuracy", "val_loss"]
    assert run.split.history is run.split_history


# ---- callbacks ---------------------------------------------------------------------------------
class Recorder(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int | None, dict[str, Any]]] = []
        self.models: list[Any] = []

    def _record(self, event: str, index: int | None, logs: dict[str, Any] | None) -> None:
        self.events.append((event, index, dict(logs or {})))
        self.models.append(self.model)

    def on_train_begin(self, logs=None):  # type: ignore[no-untyped-def]
        self._record("train_begin", None, logs)

    def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
        self._record("batch_end", batch, logs)

    def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        self._record("epoch_end", epoch, logs)

    def on_train_end(self, logs=None):  # type: ignore[no-untyped-def]
        self._record("train_end", None, logs)


def test_callbacks_see_model_fit_logs_and_early_stopping_stops() -> None:
    compile_kwargs = dict(loss=logits_loss(), metrics=["accuracy"])
    split = splitkeras.split(skip_model(), at=SKIP_CUTS)
    split.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), **compile_kwargs)
    reference = skip_model()
    reference.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), **compile_kwargs)
    recorders = Recorder(), Recorder()

    def callbacks(recorder: Recorder) -> list[keras.callbacks.Callback]:
        # no loss improves by 10: stops at the end of the second epoch
        return [keras.callbacks.EarlyStopping(monitor="loss", min_delta=10.0, patience=0), recorder]

    keras.utils.set_random_seed(FIT_SEED)
    reference_history = reference.fit(FEATURES, FEATURE_LABELS, batch_size=BATCH, epochs=10,
                                      verbose=0, callbacks=callbacks(recorders[0]))
    keras.utils.set_random_seed(FIT_SEED)
    split_history = split.fit(FEATURES, FEATURE_LABELS, batch_size=BATCH, epochs=10, verbose=0,
                              callbacks=callbacks(recorders[1]))
    assert split_history.epoch == reference_history.epoch == [0, 1]
    assert split.stop_training is True
    theirs, ours = recorders
    assert all(model is split for model in ours.models)
    assert [(e, i, sorted(logs)) for e, i, logs in ours.events] == \
        [(e, i, sorted(logs)) for e, i, logs in theirs.events]
    assert [e for e, _, _ in ours.events].count("batch_end") == 2 * 4
    for (_, _, our_logs), (_, _, their_logs) in zip(ours.events, theirs.events):
        for key, value in their_logs.items():
            assert isinstance(our_logs[key], float)
            assert our_logs[key] == pytest.approx(value, abs=TOLERANCE), key
    assert_same_weights(weights_by_name(reference), weights_by_name(split.join()))


# ---- compile configuration ---------------------------------------------------------------------
def test_the_source_models_compile_config_is_used_without_compile() -> None:
    def compiled(optimizer: keras.optimizers.Optimizer) -> keras.Model:
        model = skip_model()
        model.compile(optimizer=optimizer, loss=logits_loss(), metrics=["accuracy"])
        return model

    split = splitkeras.split(compiled(keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=0.1)),
                             at=SKIP_CUTS)
    reference = compiled(keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=0.1))
    reference_history, split_history = fit_both(reference, split, FEATURES, FEATURE_LABELS)
    optimizers = [runner.optimizer for runner in split._trainer.runners]
    assert [type(o).__name__ for o in optimizers] == ["SGD"] * 3
    assert all(o.momentum == 0.9 and o.clipnorm == 0.1 for o in optimizers)
    assert_same_weights(weights_by_name(reference), weights_by_name(split.join()))
    assert_same_history(reference_history, split_history)


def test_global_clipnorm_is_refused() -> None:
    message = ("global_clipnorm clips by the norm of ALL gradients of the model, which no single "
               "segment sees, so a split cannot apply it exactly. Use clipnorm")
    split = splitkeras.split(skip_model(), at=SKIP_CUTS)
    with pytest.raises(TrainingError, match=message):
        split.compile(optimizer=keras.optimizers.SGD(0.1, global_clipnorm=1.0), loss="mse")

    model = skip_model()
    model.compile(optimizer=keras.optimizers.Adam(global_clipnorm=1.0), loss=logits_loss())
    with pytest.raises(TrainingError, match=message):
        splitkeras.split(model, at=SKIP_CUTS).fit(FEATURES, FEATURE_LABELS, verbose=0)


def test_fit_without_compile_or_saved_config_is_refused() -> None:
    split = splitkeras.split(skip_model(), at=SKIP_CUTS)
    message = ("This split is not compiled and its source model had no compile config. "
               r"Call split.compile\(optimizer=..., loss=...\) first.")
    with pytest.raises(TrainingError, match=message):
        split.fit(FEATURES, FEATURE_LABELS, verbose=0)
    with pytest.raises(TrainingError, match=message):
        split.evaluate(FEATURES, FEATURE_LABELS, verbose=0)
    with pytest.raises(TrainingError, match=r"compile\(\) needs a loss"):
        split.compile(optimizer="adam")


@pytest.mark.parametrize("jit_compile", ["auto", True, False])
def test_jit_compile_resolves_as_keras_compile(jit_compile: Any) -> None:
    """Each segment (and so the fused step) resolves jit_compile as `model.compile` does for
    the whole model: "auto" is off on a CPU-only machine and with op determinism, and Keras
    also turns an explicit True off with op determinism."""
    from splitkeras.engine import resolve_jit_compile

    model = skip_model()
    with pytest.warns(UserWarning) if jit_compile is True else contextlib.nullcontext():
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    assert resolve_jit_compile(skip_model(), jit_compile) == model.jit_compile


def test_early_stopping_restores_the_best_weights_as_model_fit_does() -> None:
    """`EarlyStopping(restore_best_weights=True)` reads and writes weights through
    `Split.get_weights` / `set_weights`: it ends on the same (restored) weights as model.fit."""
    x, y = data((12,), n=64)
    reference, split = _early_stopping_pair()

    def callbacks() -> list[keras.callbacks.Callback]:
        # val_loss of a tiny model bounces on 8 samples: a patience of 1 stops early and restores
        return [keras.callbacks.EarlyStopping(monitor="val_loss", patience=1,
                                              restore_best_weights=True)]

    reference_history, split_history = fit_both(
        reference, split, x, y, epochs=12, callbacks=callbacks(), validation_data=(x[:8], y[:8]))
    assert len(split_history.epoch) == len(reference_history.epoch) < 12  # it did stop early
    assert_same_weights(weights_by_name(reference), weights_by_name(split.join()))
    assert len(split.get_weights()) == len(reference.get_weights())
    with pytest.raises(ValueError, match="needs 6 arrays for this split, got 1"):
        split.set_weights(split.get_weights()[:1])


def _early_stopping_pair() -> tuple[keras.Model, splitkeras.Split]:
    def build() -> keras.Model:
        keras.utils.set_random_seed(3)
        inputs = keras.Input((12,), name="features")
        h = L.Dense(16, activation="relu", name="hidden")(inputs)
        m = L.Dense(16, activation="relu", name="middle")(h)
        return keras.Model(inputs, L.Dense(3, name="logits")(m))

    def compile_(target: Any) -> None:
        target.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), loss=logits_loss())

    reference, source = build(), build()
    compile_(reference)
    split = splitkeras.split(source, at=["hidden", "middle"])
    compile_(split)
    return reference, split
