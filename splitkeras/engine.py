"""The step semantics of one segment, independent of any transport.

For a step *k*:

* `forward(k, inputs)` runs the segment in training mode and returns its outputs.
  What the gradient of *that* pass needs is kept until `backward(k, ...)`, so the
  activation that is sent is the one the update differentiates, and
  BatchNormalization statistics move once per step, as in `model.fit`.
* `backward(k, output_gradients)` computes the exact vector-Jacobian product
  `d(sum(outputs * g) + regularization) / d(weights, inputs)`, applies the
  segment's optimizer, and returns the gradients of the inputs.

Both are compiled calls with no eager tape between them (`splitkeras.compiled_step`):
the forward is TensorFlow's forward function of the segment (its outputs and the
intermediates the gradient needs), the backward its backward function and the update
in ONE `tf.function`; the arithmetic is the eager tape's to the last bit. Where
TensorFlow does not offer that pair (or with `compiled=False`), the forward runs under
an eager `GradientTape` and `backward` calls `tape.gradient`, then the update.
* The segment that holds the labels (the last one) runs `train_step(k, inputs,
  y, sample_weight)` instead: loss, metrics, update and input gradients in one
  compiled function, exactly as Keras' `train_step` computes them.

With a `guard` (`splitkeras.guard.UpdateGuard`, what a shared server runs), every step is
computed, checked and only then committed: the tensors that come in are checked before
anything runs; the outputs, input gradients and loss after; the new variables after the
update, which is rolled back from a snapshot taken just before it when they break a rule
(TensorFlow copies a variable's buffer before it updates one that is still read, so the
snapshot costs one copy of what the update writes). The arithmetic of the step itself is
the very same, so a guarded step that is accepted ends bitwise where an unguarded one does.

The in-process `SplitTrainer`, the HTTP server and the JavaScript device all
implement these semantics, so their results can be compared one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from splitkeras.compiled_step import CompiledSteps
from splitkeras.errors import TrainingError
from splitkeras.flat_call import FlatCall
from splitkeras.guard import Measured, UpdateGuard
from splitkeras.guarded_steps import GuardedSteps
from splitkeras.guarded_variables import GuardedVariables

if TYPE_CHECKING:  # a type only: segments -> training -> engine at run time
    from splitkeras.segments import Segment

__all__ = ["SegmentRunner", "resolve_jit_compile", "new_optimizer"]


def resolve_jit_compile(model: keras.Model, jit_compile: bool | str) -> bool:
    """Resolve `"auto"` exactly as `keras.Model.compile` does on the TF backend.

    Keras turns XLA off on CPU-only machines, under a distribution strategy, with op
    determinism, and for layers that do not support it (`Trainer._resolve_auto_jit_compile`);
    an explicit True stays off with op determinism or such layers (`Trainer.jit_compile`).
    """
    from keras.src.trainers.trainer import model_supports_jit

    if jit_compile == "auto":
        resolve = getattr(model, "_resolve_auto_jit_compile", None)
        if resolve is not None:
            return bool(resolve())
        if not [d for d in tf.config.list_physical_devices() if d.device_type != "CPU"]:
            return False
    elif not jit_compile:
        return False
    return bool(model_supports_jit(model))


def new_optimizer(config: dict[str, Any]) -> keras.optimizers.Optimizer:
    """A fresh optimizer from a serialized config (each segment owns its state)."""
    optimizer = keras.optimizers.deserialize(config)
    if getattr(optimizer, "global_clipnorm", None):
        raise TrainingError(
            "global_clipnorm clips by the norm of ALL gradients of the model, which no single "
            "segment sees, so a split cannot apply it exactly. Use clipnorm (per variable) or "
            "clipvalue instead."
        )
    return optimizer


@dataclass
class _Pending:
    tape: tf.GradientTape | None  # None: a compiled forward, whose residuals are in `compiled`
    inputs: list[tf.Tensor]
    outputs: list[tf.Tensor]
    regularization: tf.Tensor
    compiled: Any = None


def _gradient_scale(value: Any) -> float | None:
    """A valid `gradient_scale` as a float, None for exactly 1.0 (nothing to multiply)."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = math.nan
    if isinstance(value, bool) or not math.isfinite(scale) or scale <= 0:
        raise TrainingError(f"gradient_scale must be a finite number > 0 (e.g. 1/K to average K "
                            f"micro-batches), got {value!r}. Nothing was changed.")
    return None if scale == 1.0 else scale


def _scaled(gradient: Any, scale: tf.Tensor) -> Any:
    """`gradient * scale` exactly as written: MulNoNan (x * y, the scale is never 0) is no
    link of a chain of Mul that Grappler's arithmetic optimizer may reassociate with the
    optimizer's own `* learning_rate` (which would round differently)."""
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(tf.math.multiply_no_nan(gradient.values, tf.cast(scale, gradient.dtype)),
                                gradient.indices, gradient.dense_shape)
    return tf.math.multiply_no_nan(gradient, tf.cast(scale, gradient.dtype))


def as_list(value: Any) -> list[Any]:
    """A model's outputs (or labels) as a list: a list or tuple as is, a dict's values, else [value]."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return list(value.values())
    return [value]


class SegmentRunner(GuardedSteps):
    """Runs the training steps of one segment with its own optimizer.

    Args:
        segment: the segment (its `keras.Model` and boundary specs).
        optimizer: an optimizer instance owned by this segment.
        input_gradients: per input, whether its gradient is needed (model inputs
            such as images need none). Default: all.
        jit_compile: `"auto"` (as Keras), True or False.
        loss, metrics, loss_weights: for the segment that holds the labels; the
            segment model is compiled with them and Keras computes loss and metrics.
        guard: check every step and refuse (`UpdateRefused`, nothing changed) what breaks
            its rules (`splitkeras.guard`); None (in process): no checks.
        compiled: run `forward` / `backward` as compiled calls with no eager tape
            (`splitkeras.compiled_step`; bitwise the same results). False: the eager tape.

    Example:
        >>> runner = SegmentRunner(split["middle"], keras.optimizers.SGD(0.1))  # doctest: +SKIP
        >>> outputs = runner.forward(0, [activation])                           # doctest: +SKIP
        >>> input_grads = runner.backward(0, [grad_of_outputs])                 # doctest: +SKIP
    """

    def __init__(
        self,
        segment: Segment,
        optimizer: keras.optimizers.Optimizer,
        *,
        input_gradients: Sequence[bool] | None = None,
        jit_compile: bool | str = "auto",
        loss: Any = None,
        metrics: Any = None,
        loss_weights: Any = None,
        guard: UpdateGuard | None = None,
        compiled: bool = True,
    ) -> None:
        self.segment = segment
        self.guard = guard
        self._guarded: dict[str, GuardedVariables] = {}
        self.model = segment.model
        self.optimizer = optimizer
        self.input_names = [s.name for s in segment.inputs]
        self.output_names = [s.name for s in segment.outputs]
        self.input_dtypes = [s.dtype for s in segment.inputs]
        if input_gradients is None:
            input_gradients = [True] * len(self.input_names)
        self.input_gradients = [
            bool(need) and np.dtype(dtype).kind == "f"
            for need, dtype in zip(input_gradients, self.input_dtypes)
        ]
        self.holds_labels = loss is not None
        self._labels_built = False
        if self.holds_labels:
            self.model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                               loss_weights=loss_weights, jit_compile=False)
        self.trainable = list(self.model.trainable_variables)
        self._tf_variables = [v.value for v in self.trainable]  # the tf.Variables a tape watches
        self.optimizer.build(self.trainable)
        self.jit_compile = resolve_jit_compile(self.model, jit_compile)
        self._pending: dict[Any, _Pending] = {}
        options = dict(jit_compile=self.jit_compile, reduce_retracing=True)
        self._forward_fn = tf.function(self._forward_impl, **options)
        self._apply_fn = FlatCall(tf.function(self._apply_impl, **options))
        self._predict_fn = FlatCall(tf.function(self._predict_impl, **options))
        self._train_fn = FlatCall(tf.function(self._train_impl, **options))
        # with a guard: the same bodies between a snapshot and a check, in one call
        self._guarded_apply_fn = FlatCall(tf.function(self._guarded_apply_impl, **options))
        self._guarded_train_fn = FlatCall(tf.function(self._guarded_train_impl, **options))
        self._test_fn = FlatCall(tf.function(self._test_impl, **options))
        # nothing to differentiate: the eager path, whose tape then records nothing
        self._compiled = CompiledSteps(self) if compiled and (self.trainable or any(self.input_gradients)) \
            else None

    @property
    def compiled(self) -> bool:
        """Whether `forward` / `backward` run compiled, without an eager tape."""
        return self._compiled is not None and self._compiled.available

    @classmethod
    def for_segment(cls, segment: Segment, optimizer_config: dict[str, Any], model_inputs: Any, *,
                    jit_compile: bool | str = "auto", loss: Any = None, metrics: Any = None,
                    loss_weights: Any = None) -> SegmentRunner:
        """The runner of one segment of a split, as every side builds it: a fresh optimizer
        from `optimizer_config` (each segment owns its state), and input gradients for every
        input that is not a model input (`model_inputs`: their names). `loss` (with `metrics`,
        `loss_weights`) only for the segment that holds the labels."""
        names = set(model_inputs)
        return cls(segment, new_optimizer(optimizer_config),
                   input_gradients=[s.name not in names for s in segment.inputs],
                   jit_compile=jit_compile, loss=loss, metrics=metrics if loss is not None else None,
                   loss_weights=loss_weights if loss is not None else None)

    def build_labels(self, y: Any) -> None:
        """Build the label segment's compiled loss and metrics for labels like `y` (once, on a
        one-sample batch of zeros), as `model.fit` does before its first step."""
        if self._labels_built:
            return
        x = [np.zeros((1, *(d or 1 for d in s.sample_shape)), dtype=s.dtype) for s in self.segment.inputs]
        y1 = tf.nest.map_structure(lambda t: t[:1], y)
        self.model._symbolic_build(data_batch=(x[0] if len(x) == 1 else x, y1, None))
        self._labels_built = True

    # ---- conversions -------------------------------------------------------------------------
    def _inputs(self, values: Sequence[Any]) -> list[tf.Tensor]:
        if len(values) != len(self.input_names):
            raise TrainingError(
                f"Segment '{self.segment.name}' takes {len(self.input_names)} inputs "
                f"{self.input_names}, received {len(values)}."
            )
        return [tf.convert_to_tensor(v, dtype=d) for v, d in zip(values, self.input_dtypes)]

    def _call_inputs(self, xs: list[tf.Tensor]) -> Any:
        return xs[0] if len(xs) == 1 else xs

    # ---- compiled bodies ---------------------------------------------------------------------
    def _regularization(self) -> tf.Tensor:
        losses = [tf.reduce_sum(tf.cast(loss, tf.float32)) for loss in self.model.losses]
        return tf.add_n(losses) if losses else tf.zeros((), tf.float32)

    def _forward_impl(self, xs: list[tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor]:
        outputs = as_list(self.model(self._call_inputs(xs), training=True))
        return outputs, self._regularization()

    def _apply_impl(self, grads: list[Any], scale: tf.Tensor | None = None) -> None:
        if scale is not None:  # None: the gradients as they are, not multiplied by 1
            grads = [_scaled(g, scale) for g in grads]
        self.optimizer.apply(grads, self.trainable)

    def _predict_impl(self, xs: list[tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor]:
        outputs = as_list(self.model(self._call_inputs(xs), training=False))
        return outputs, self._regularization()

    def _train_impl(self, xs: list[tf.Tensor], y: Any, sample_weight: Any,
                    other_losses: tf.Tensor) -> Any:
        model = self.model
        watched = [x for x, need in zip(xs, self.input_gradients) if need]
        with tf.GradientTape() as tape:
            tape.watch(watched)
            y_pred = model(self._call_inputs(xs), training=True)
            loss = model._compute_loss(x=xs, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                       training=True)
            # The reported loss includes the other segments' regularization, as model.fit's
            # does; it is a constant here, so it changes no gradient.
            model._loss_tracker.update_state(loss + other_losses, sample_weight=tf.shape(xs[0])[0])
            loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(loss, self.trainable + watched)
        if self.trainable:
            self.optimizer.apply(grads[: len(self.trainable)], self.trainable)
        logs = model.compute_metrics(xs, y, y_pred, sample_weight=sample_weight)
        return grads[len(self.trainable):], logs, y_pred

    def _test_impl(self, xs: list[tf.Tensor], y: Any, sample_weight: Any,
                   other_losses: tf.Tensor) -> Any:
        model = self.model
        y_pred = model(self._call_inputs(xs), training=False)
        loss = model._compute_loss(x=xs, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                   training=False)
        # As model.evaluate's loss, it includes the other segments' regularization.
        model._loss_tracker.update_state(loss + other_losses, sample_weight=tf.shape(xs[0])[0])
        return model.compute_metrics(xs, y, y_pred, sample_weight=sample_weight)

    # ---- the step protocol -------------------------------------------------------------------
    def forward(self, step: Any, inputs: Sequence[Any]) -> list[tf.Tensor]:
        """Training-mode forward for `step`; keeps the tape until `backward(step)`."""
        if self.guard is not None:
            return self._guarded_forward(self.guard, step, inputs)
        pending = self._run_forward(self._inputs(inputs))
        self._pending[step] = pending
        return list(pending.outputs)

    def _run_forward(self, xs: list[tf.Tensor]) -> _Pending:
        """The compiled forward, or the taped one where there is none (or in a graph)."""
        if self._compiled is not None and self._compiled.available and tf.executing_eagerly():
            found = self._compiled.forward(xs)
            if found is not None:
                outputs, regularization, kept = found
                return _Pending(None, xs, outputs, regularization, kept)
        return self.taped_forward(xs, self._forward_fn)

    def taped_forward(self, xs: list[tf.Tensor], forward: Any = None) -> _Pending:
        """The training-mode pass under a tape that watches the weights and the inputs
        whose gradients are needed. `forward` defaults to the traceable body, for use
        inside a caller's `tf.function` (see `SplitTrainer`'s fused step)."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._tf_variables)
            tape.watch([x for x, need in zip(xs, self.input_gradients) if need])
            outputs, regularization = (forward or self._forward_impl)(xs)
        return _Pending(tape, xs, list(outputs), regularization)

    def vjp(self, pending: _Pending, output_gradients: Sequence[Any]
            ) -> tuple[list[tf.Tensor], list[tf.Tensor | None]]:
        """The exact vector-Jacobian product of a taped pass: the gradients of
        `sum(outputs * g) + regularization` for (weights, inputs). `None` seeds count as 0."""
        targets = pending.outputs + [pending.regularization]
        seeds = self._seeds(pending, output_gradients)
        assert pending.tape is not None, "a compiled forward is differentiated by backward()"
        watched = [x for x, need in zip(pending.inputs, self.input_gradients) if need]
        grads = pending.tape.gradient(targets, self._tf_variables + watched, output_gradients=seeds)
        return list(grads[: len(self.trainable)]), self._per_input(grads[len(self.trainable):])

    @staticmethod
    def _seeds(pending: _Pending, output_gradients: Sequence[Any]) -> list[tf.Tensor]:
        """One seed per output (`None`: 0), and 1 for the regularization."""
        return [
            tf.zeros_like(out) if g is None else tf.convert_to_tensor(g, dtype=out.dtype)
            for out, g in zip(pending.outputs, output_gradients)
        ] + [tf.ones_like(pending.regularization)]

    def pending_regularization(self, step: Any) -> tf.Tensor:
        """The regularization loss of the forward pass of `step` (0 if the segment has none)."""
        return self._pending[step].regularization

    def has_pending(self, step: Any) -> bool:
        return step in self._pending

    def drop(self, step: Any) -> None:
        """Forget a forward whose backward will never come (frees its activations)."""
        self._pending.pop(step, None)

    def backward(self, step: Any, output_gradients: Sequence[Any],
                 gradient_scale: float = 1.0) -> list[tf.Tensor | None]:
        """Apply the update of `step` from the gradients of its outputs.

        Returns one gradient per input (`None` where none is needed). `gradient_scale`
        multiplies the weight gradients (all of them, the regularization's share included)
        before the update; the input gradients are returned as computed. At exactly 1.0
        nothing is multiplied. A micro-batched server (`server_app.micro_batch`) passes
        1/K: the mean over K device steps.
        """
        pending = self._pending.get(step)
        if pending is None:
            raise TrainingError(
                f"Segment '{self.segment.name}' has no forward pass for step {step!r} to "
                "differentiate. Run forward(step, ...) first."
            )
        if len(output_gradients) != len(pending.outputs):
            raise TrainingError(
                f"Segment '{self.segment.name}' has {len(pending.outputs)} outputs "
                f"{self.output_names}, received {len(output_gradients)} gradients."
            )
        scale = _gradient_scale(gradient_scale)
        guard = self.guard
        measured: list[Measured] = []
        if guard is not None:  # before the tape is used: a refusal keeps the step pending
            measured = guard.measure_all("output_grad", self.output_names, output_gradients, step_kept=True)
            output_gradients = guard.clip(output_gradients)
        del self._pending[step]
        scale_tensor = None if scale is None else tf.constant(scale, tf.float64)
        if pending.compiled is not None:
            assert self._compiled is not None
            return self._compiled.backward(pending.compiled, self._seeds(pending, output_gradients),
                                           scale_tensor, measured)
        weight_gradients, input_gradients = self.vjp(pending, output_gradients)
        if guard is None:
            if self.trainable:
                self._apply_fn(weight_gradients, scale_tensor)
            return input_gradients
        measured += guard.measure_all("input_grad", self.input_names, input_gradients)
        if self.trainable:
            saved, finite, biggest = self._guarded_apply_fn(weight_gradients, scale_tensor)
            self._commit_or_roll_back(guard, "update", saved, finite, biggest)
        guard.accept(measured)
        return input_gradients

    def train_step(self, step: Any, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[tf.Tensor | None], dict[str, Any]]:
        """The label segment's step: loss, metrics, update; returns (input grads, logs).

        `other_losses` (the regularization losses of the other segments for this
        step) is added to the reported loss only.
        """
        if not self.holds_labels:
            raise TrainingError(f"Segment '{self.segment.name}' does not hold the labels.")
        xs = self._inputs(inputs)
        other = tf.convert_to_tensor(other_losses, tf.float32)
        guard = self.guard
        if guard is None:
            grads, logs, _ = self._train_fn(xs, y, sample_weight, other)
            return self._per_input(grads), logs
        measured = guard.measure_all("input", self.input_names, xs)
        measured += guard.measure_all("label", self.output_names, as_list(y))
        if sample_weight is not None:
            measured += guard.measure_all("sample_weight", ["sample_weight"], [sample_weight])

        grads, logs, _, saved, finite, biggest = self._guarded_train_fn(xs, y, sample_weight, other)

        def computed() -> list[Measured]:
            found = guard.measure_all("input_grad", self.input_names, self._per_input(grads))
            if "loss" in logs:
                found += guard.measure_all("loss", ["loss"], [logs["loss"]])
            return found

        measured += self._commit_or_roll_back(guard, "train", saved, finite, biggest, computed)
        guard.accept(measured)
        return self._per_input(grads), logs

    def test_step(self, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                  other_losses: Any = 0.0) -> dict[str, Any]:
        """Loss and metrics in inference mode (label segment).

        `other_losses` (the other segments' regularization, see `predict_with_regularization`)
        is added to the reported loss, as `model.evaluate` reports it.
        """
        return self._test_fn(self._inputs(inputs), y, sample_weight,
                             tf.convert_to_tensor(other_losses, tf.float32))

    def predict(self, inputs: Sequence[Any]) -> list[tf.Tensor]:
        """Inference-mode forward: no training state is touched."""
        return self.predict_with_regularization(inputs)[0]

    def predict_with_regularization(
            self, inputs: Sequence[Any]) -> tuple[list[tf.Tensor], tf.Tensor]:
        """Inference-mode forward, and the segment's regularization loss (0 if none)."""
        outputs, regularization = self._predict_fn(self._inputs(inputs))
        return list(outputs), regularization

    def _per_input(self, watched_grads: Sequence[Any]) -> list[tf.Tensor | None]:
        grads = iter(watched_grads)
        return [next(grads) if need else None for need in self.input_gradients]
