"""Keras-like `compile` / `fit` / `evaluate` / `predict` for a `Split`, in process.

Each segment trains from the gradient the next segment sends back, by the exact
vector-Jacobian product (see `splitkeras.engine`). From the same weights and the
same batches, `split.fit` ends where `model.fit` ends, to float rounding.

Batching, shuffling, progress bars and callbacks are Keras' own: the data goes
through Keras' `EpochIterator` (NumPy arrays, tensors, `tf.data.Dataset`), and
`callbacks` receive the `Split` as their `model`.

Stochastic layers: every segment layer starts from the source layer's seed
generator state (see `split.copy_layer_state`), and the forward pass whose tape
the update differentiates is the one that was sent, so Dropout masks are the
ones `model.fit` would draw from the same state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src import callbacks as callbacks_module
from keras.src.backend.tensorflow.trainer import TFEpochIterator as _KerasTFEpochIterator
from keras.src.trainers.data_adapters import data_adapter_utils
from keras.src.utils.python_utils import pythonify_logs

from splitkeras.engine import SegmentRunner
from splitkeras.errors import TrainingError
from splitkeras.steps import StepLoop, accumulate_gradients

__all__ = ["SplitTrainer", "predict", "model_inputs_by_name", "restore_compile_value", "accumulate_gradients"]


def TFEpochIterator(**kwargs: Any) -> Any:
    """Keras' TF epoch iterator under the default distribution strategy, as `fit` uses it."""
    return _KerasTFEpochIterator(distribute_strategy=tf.distribute.get_strategy(), **kwargs)


def model_inputs_by_name(split: Any, x: Any) -> dict[str, Any]:
    """Map `x` (an array, a list in model-input order, or a dict by input name) to names."""
    names = [spec.name for spec in split.model_inputs]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise TrainingError(f"Input dict lacks {missing}; the model takes {names}.")
        return {n: x[n] for n in names}
    values = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(values) != len(names):
        raise TrainingError(f"The model takes {len(names)} inputs {names}, received {len(values)}.")
    return dict(zip(names, values))


def callback_list(callbacks: Any, *, model: Any, verbose: Any, epochs: int, steps: int | None,
                  add_history: bool = False) -> callbacks_module.CallbackList:
    """Keras' `CallbackList` as `fit` / `evaluate` build it (progress bar unless verbose=0)."""
    if isinstance(callbacks, callbacks_module.CallbackList):
        return callbacks
    return callbacks_module.CallbackList(callbacks, add_history=add_history,
                                         add_progbar=verbose != 0, verbose=verbose,
                                         epochs=epochs, steps=steps, model=model)


def epoch_batches(iterator: Any) -> Iterator[tuple[int, int, Any, Any, Any]]:
    """One epoch of a Keras epoch iterator: `(begin_step, end_step, x, y, sample_weight)`."""
    with iterator.catch_stop_iteration():
        for begin_step, end_step, batches in iterator:
            x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(next(batches))
            yield begin_step, end_step, x, y, sample_weight


def finish_evaluation(label_model: keras.Model, logs: dict[str, Any], callbacks: Any,
                      return_dict: bool) -> Any:
    """The end of `evaluate`, as Keras does it: the metrics' results, `on_test_end`, then a
    dict or a list in Keras' order (loss first)."""
    logs = pythonify_logs(label_model._get_metrics_result_or_logs(logs))
    callbacks.on_test_end(logs)
    if return_dict:
        return logs
    return label_model._flatten_metrics_in_order(logs)


def restore_compile_value(value: Any) -> Any:
    """Deserialize one entry of a saved compile config (optimizer, loss or metrics)."""
    from keras.src.saving import serialization_lib

    if isinstance(value, dict) and "class_name" in value:
        return serialization_lib.deserialize_keras_object(value)
    if isinstance(value, (list, tuple)):
        return [restore_compile_value(v) for v in value]
    return value


class SplitTrainer:
    """Trains the segments of a `Split` in process. Made by `Split.compile`.

    `fused=True` (the default) runs each step as ONE `tf.function`: every segment's
    taped forward, the label segment's step, then every segment's vector-Jacobian
    product and optimizer update, in reverse -- the same computation as the step
    protocol (`SegmentRunner.forward` / `backward`, what the server runs), without an
    eager tape and a function call per segment. `fused=False` runs the protocol,
    segment by segment.
    """

    def __init__(self, split: Any, *, optimizer: Any = None, loss: Any = None, metrics: Any = None,
                 loss_weights: Any = None, jit_compile: bool | str = "auto",
                 fused: bool = True) -> None:
        if loss is None:
            raise TrainingError("compile() needs a loss, e.g. loss='sparse_categorical_crossentropy'.")
        if any(s.model is None for s in split.segments):
            raise TrainingError("Every segment must be loaded to train in process.")
        optimizer = keras.optimizers.get(optimizer or "rmsprop")
        self.optimizer_config = keras.optimizers.serialize(optimizer)
        self.split = split
        model_input_names = [s.name for s in split.model_inputs]
        last = split.segments[-1]
        self.runners: list[SegmentRunner] = [
            SegmentRunner.for_segment(segment, self.optimizer_config, model_input_names,
                                      jit_compile=jit_compile,
                                      loss=loss if segment is last else None,
                                      metrics=metrics, loss_weights=loss_weights)
            for segment in split.segments]
        self.label_model = self.runners[-1].model
        self.loop = StepLoop(self.runners)  # the step protocol, segment by segment (fused=False)
        self.step_counter = 0
        self.fused = fused
        self._fused_fn = tf.function(self._fused_step_impl, reduce_retracing=True,
                                     jit_compile=all(r.jit_compile for r in self.runners))

    @classmethod
    def from_training_config(cls, split: Any, config: dict[str, Any]) -> SplitTrainer:
        """Compile from a saved Keras compile config (`model.get_compile_config()`)."""
        optimizer = config.get("optimizer")
        return cls(split, optimizer=restore_compile_value(optimizer) if optimizer else None,
                   loss=restore_compile_value(config.get("loss")),
                   metrics=restore_compile_value(config.get("metrics")),
                   loss_weights=config.get("loss_weights"))

    # ---- one step ----------------------------------------------------------------------------
    def _ensure_built(self, y: Any) -> None:
        self.runners[-1].build_labels(y)

    def train_batch(self, x: Any, y: Any, sample_weight: Any = None) -> dict[str, Any]:
        """One training step over all segments: forwards in order, backwards in reverse."""
        self._ensure_built(y)
        step = self.step_counter
        self.step_counter += 1
        store = model_inputs_by_name(self.split, x)
        if self.fused:
            return self._fused_fn(store, y, sample_weight)
        return self.loop.train(step, store, y, sample_weight)[1]

    def _fused_step_impl(self, store: dict[str, Any], y: Any, sample_weight: Any) -> Any:
        """`train_batch`'s protocol, traced as one function (see the class docstring)."""
        store = dict(store)
        taped = []
        for runner in self.runners[:-1]:
            xs = runner._inputs([store[n] for n in runner.input_names])
            taped.append(runner.taped_forward(xs))
            store.update(zip(runner.output_names, taped[-1].outputs))
        last = self.runners[-1]
        other_losses = tf.add_n([t.regularization for t in taped]) if taped else tf.zeros(())
        input_grads, logs, _ = last._train_impl(
            last._inputs([store[n] for n in last.input_names]), y, sample_weight, other_losses)
        grads: dict[str, Any] = {}
        accumulate_gradients(grads, last, last._per_input(input_grads))
        for runner, pass_ in reversed(list(zip(self.runners[:-1], taped))):
            weight_grads, runner_input_grads = runner.vjp(
                pass_, [grads.pop(n, None) for n in runner.output_names])
            if runner.trainable:
                runner._apply_impl(weight_grads)
            accumulate_gradients(grads, runner, runner_input_grads)
        return logs

    def test_batch(self, x: Any, y: Any, sample_weight: Any = None) -> dict[str, Any]:
        self._ensure_built(y)
        store, other_losses = self.loop.infer(model_inputs_by_name(self.split, x), self.runners[:-1])
        last = self.runners[-1]
        return last.test_step([store[n] for n in last.input_names], y, sample_weight, other_losses)

    # ---- the Keras loops ---------------------------------------------------------------------
    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = None, epochs: int = 1,
            verbose: Any = "auto", callbacks: Any = None, validation_split: float = 0.0,
            validation_data: Any = None, shuffle: bool = True, class_weight: Any = None,
            sample_weight: Any = None, initial_epoch: int = 0, steps_per_epoch: int | None = None,
            validation_steps: int | None = None, validation_batch_size: int | None = None,
            validation_freq: int = 1) -> keras.callbacks.History:
        """Train like `keras.Model.fit`; returns a `History`."""
        from keras.src.trainers.data_adapters import array_slicing

        if validation_split and validation_data is None:
            (x, y, sample_weight), validation_data = array_slicing.train_validation_split(
                (x, y, sample_weight), validation_split=validation_split)
        iterator = TFEpochIterator(x=x, y=y, sample_weight=sample_weight, batch_size=batch_size,
                                   steps_per_epoch=steps_per_epoch, shuffle=shuffle,
                                   class_weight=class_weight)
        split = self.split
        callbacks = callback_list(callbacks, model=split, verbose=verbose, epochs=epochs,
                                  steps=iterator.num_batches, add_history=True)
        split.stop_training = False
        callbacks.on_train_begin()
        training_logs: dict[str, Any] | None = None
        logs: dict[str, Any] = {}
        for epoch in range(initial_epoch, epochs):
            self.label_model.reset_metrics()
            callbacks.on_epoch_begin(epoch)
            for begin_step, end_step, bx, by, bsw in epoch_batches(iterator):
                callbacks.on_train_batch_begin(begin_step)
                logs = self.train_batch(bx, by, bsw)
                callbacks.on_train_batch_end(end_step, logs)
                if split.stop_training:
                    break
            epoch_logs = dict(self.label_model._get_metrics_result_or_logs(logs))
            if validation_data is not None and (epoch + 1) % validation_freq == 0:
                vx, vy, vsw = data_adapter_utils.unpack_x_y_sample_weight(validation_data)
                val_logs = self.evaluate(vx, vy, sample_weight=vsw,
                                         batch_size=validation_batch_size or batch_size,
                                         steps=validation_steps, verbose=0, return_dict=True)
                epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
            callbacks.on_epoch_end(epoch, epoch_logs)
            training_logs = epoch_logs
            if split.stop_training:
                break
        for runner in self.runners:
            runner.optimizer.finalize_variable_values(runner.trainable)
        callbacks.on_train_end(logs=training_logs)
        return split.history

    def evaluate(self, x: Any = None, y: Any = None, batch_size: int | None = None,
                 verbose: Any = "auto", sample_weight: Any = None, steps: int | None = None,
                 callbacks: Any = None, return_dict: bool = False) -> Any:
        """Evaluate like `keras.Model.evaluate` (inference mode, no state touched)."""
        iterator = TFEpochIterator(x=x, y=y, sample_weight=sample_weight, batch_size=batch_size,
                                   steps_per_epoch=steps, shuffle=False)
        callbacks = callback_list(callbacks, model=self.split, verbose=verbose, epochs=1,
                                  steps=iterator.num_batches)
        callbacks.on_test_begin()
        self.label_model.reset_metrics()
        logs: dict[str, Any] = {}
        for begin_step, end_step, bx, by, bsw in epoch_batches(iterator):
            callbacks.on_test_batch_begin(begin_step)
            logs = self.test_batch(bx, by, bsw)
            callbacks.on_test_batch_end(end_step, logs)
        return finish_evaluation(self.label_model, logs, callbacks, return_dict)


def forward_inference(split: Any, runners: Sequence[SegmentRunner] | None, x: Any) -> dict[str, Any]:
    """Run the segments (all but the last, when given runners) in inference mode."""
    store = model_inputs_by_name(split, x)
    if runners is None:
        segments = split.segments
        for segment in segments:
            outputs = segment.model([store[s.name] for s in segment.inputs]
                                    if len(segment.inputs) > 1 else store[segment.inputs[0].name],
                                    training=False)
            store.update(zip([s.name for s in segment.outputs], keras.tree.flatten(outputs)))
        return store
    for runner in runners:
        store.update(zip(runner.output_names, runner.predict([store[n] for n in runner.input_names])))
    return store


def predict(split: Any, x: Any, batch_size: int | None = None, verbose: Any = "auto") -> Any:
    """Run the whole split in inference mode, batch by batch, like `keras.Model.predict`."""
    runners = split._trainer.runners if split._trainer is not None else None

    def infer(bx: Any) -> dict[str, Any]:
        if runners is None:
            return forward_inference(split, None, bx)
        store = forward_inference(split, runners, bx)
        last = runners[-1]
        store.update(zip(last.output_names, last.predict([store[n] for n in last.input_names])))
        return store

    return predict_batches(x, batch_size, verbose, infer, [s.name for s in split.model_outputs])


def predict_batches(x: Any, batch_size: int | None, verbose: Any,
                    infer: Callable[[Any], dict[str, Any]], output_names: Sequence[str]) -> Any:
    """Keras' predict loop: `infer(batch)` gives the tensors by name; the named outputs are
    concatenated over batches (one array, or a list for several outputs)."""
    iterator = TFEpochIterator(x=x, batch_size=batch_size, shuffle=False)
    progbar = keras.utils.Progbar(iterator.num_batches) if verbose not in (0, "auto") else None
    outputs: list[list[np.ndarray]] = []
    for _, end_step, bx, _, _ in epoch_batches(iterator):
        store = infer(bx)
        outputs.append([np.asarray(store[name]) for name in output_names])
        if progbar is not None:
            progbar.update(end_step + 1)
    if not outputs:
        raise TrainingError("predict() received no data.")
    merged = [np.concatenate(parts, axis=0) for parts in zip(*outputs)]
    return merged[0] if len(merged) == 1 else merged


