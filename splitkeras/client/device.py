"""`DeviceClient`: train a split over HTTP, with the device's segments here and the
server's segment on a `splitkeras serve` server.

Each step runs the same semantics as the in-process `SplitTrainer`
(`splitkeras.engine`), so from the same weights and batches both end at the same
numbers. U-shaped (head and tail on the device, step *k*)::

    head.forward(k, x) -> server forward k -> tail.train_step(k, server outputs +
    head skip tensors, y, other_losses = head + server regularization)
    -> server backward k (gradients of its outputs) -> head.backward(k, gradients
    from the server + gradients from the tail for skip tensors, summed)

The labels, the loss and the metrics stay on the device. With one cut (the server
holds the last segment) the labels go to the server: head forward -> server
train k -> head backward, and the epoch's loss and metrics are the batch-size
weighted means of the values the server reports per step.

Example:
    >>> client = DeviceClient("out", "http://127.0.0.1:8000", key="s3cret")   # doctest: +SKIP
    >>> client.compile()                 # the manifest's optimizer, loss, metrics  # doctest: +SKIP
    >>> history = client.fit(x, y, batch_size=32, epochs=2)                    # doctest: +SKIP
    >>> client.save()                    # head.keras, tail.keras back into out/  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.trainers.data_adapters import data_adapter_utils

from splitkeras.client.network import NetworkConditions
from splitkeras.client.remote import RemoteSegment
from splitkeras.client.stats import BatchMeans, ClientStats, EpochMeter
from splitkeras.client.transport import Transport
from splitkeras.engine import SegmentRunner, new_optimizer
from splitkeras.errors import ProtocolError, TrainingError
from splitkeras.manifest import Manifest
from splitkeras.segments import Segment, Split, load_split
from splitkeras.training import (
    TFEpochIterator,
    accumulate_gradients,
    callback_list,
    epoch_batches,
    finish_evaluation,
    model_inputs_by_name,
    predict_batches,
    restore_compile_value,
)

__all__ = ["DeviceClient", "ClientStats", "resolve_key", "KEY_ENV"]

KEY_ENV = "SPLITKERAS_SERVER_KEY"


def resolve_key(key: str | None, split_dir: str | os.PathLike[str] | None) -> str | None:
    """The server key: `key`, else `$SPLITKERAS_SERVER_KEY`, else `SPLIT_DIR/.splitkeras/server.key`
    (written by `splitkeras serve` on the same machine), else None."""
    if key:
        return key
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    if split_dir is not None:
        path = Path(split_dir) / ".splitkeras" / "server.key"
        if path.is_file():
            return path.read_text(encoding="utf-8").strip() or None
    return None


class DeviceClient:
    """The device side of split learning: trains the device segments of a split here
    and the server segment through a `splitkeras serve` server.

    Args:
        split: a split folder (only its device segments are loaded) or a `Split`.
        server_url: e.g. `"http://127.0.0.1:8000"`.
        key: the server key; default `$SPLITKERAS_SERVER_KEY`, then
            `SPLIT_DIR/.splitkeras/server.key`.
        wire_dtype: `"float32"` (exact) or `"float16"` (half the bytes) on the wire.
        network: emulate a slower link (`NetworkConditions`), for experiments.
        jit_compile: for the device segments' steps: `"auto"` (as Keras), True or False.
        transport: a ready `Transport` (then `server_url`, `key` and `network` are unused).
        unsafe_deserialization: allow Lambda layers in the device segments.

    Example:
        >>> with DeviceClient("out", "http://127.0.0.1:8000") as client:   # doctest: +SKIP
        ...     client.compile(optimizer="adam")
        ...     client.fit(x, y, epochs=2)
    """

    def __init__(self, split: str | os.PathLike[str] | Split, server_url: str, *,
                 key: str | None = None, wire_dtype: str = "float32",
                 network: NetworkConditions | None = None, jit_compile: bool | str = "auto",
                 transport: Transport | None = None, unsafe_deserialization: bool = False) -> None:
        if isinstance(split, Split):
            self.split, self.folder = split, None
        else:
            self.folder = Path(split)
            self.split = load_split(self.folder, placements=["device"],
                                    unsafe_deserialization=unsafe_deserialization)
        server = [s for s in self.split.segments if s.placement == "server"]
        if len(server) != 1:
            raise TrainingError(
                f"A device trains with exactly one server segment; this split has {len(server)} "
                f"({[s.name for s in server]}). Re-split with placements that put one segment "
                "on the server.")
        missing = [s.name for s in self.split.segments if s.placement == "device" and s.model is None]
        if missing:
            raise TrainingError(f"The device segments {missing} are not loaded.")
        self.server_segment = server[0]
        self.labels_on_server = self.split.segments[-1] is self.server_segment
        self.mode = "labels_on_server" if self.labels_on_server else "u_shaped"
        if wire_dtype not in ("float32", "float16"):
            raise ValueError(f"wire_dtype must be 'float32' or 'float16', got {wire_dtype!r}.")
        self.wire_dtype = wire_dtype
        self.jit_compile = jit_compile
        self.transport = transport or Transport(server_url, key=resolve_key(key, self.folder),
                                                network=network)
        self.remote = RemoteSegment(self.server_segment, self.transport,
                                    self.split.model_outputs if self.labels_on_server else None)
        self.runners: list[Any] = []
        self.label_runner: SegmentRunner | None = None  # computes loss and metrics on the device
        self.history: keras.callbacks.History | None = None
        self.stop_training = False
        self._step = 0
        self._samples = 0
        self._device_seconds = 0.0
        self._built = False

    def __repr__(self) -> str:
        return (f"<DeviceClient {self.mode} split of '{self.split.model_name}' -> "
                f"{self.transport.base_url}>")

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the server session and the connection."""
        self.transport.close()

    @property
    def stats(self) -> ClientStats:
        t = self.transport.stats
        return ClientStats(t.bytes_sent, t.bytes_received, t.seconds, self._device_seconds,
                           self._step, self._samples)

    # ---- compile ---------------------------------------------------------------------------------
    def compile(self, optimizer: Any = None, loss: Any = None, metrics: Any = None,
                loss_weights: Any = None) -> None:
        """Configure the device segments' training like `keras.Model.compile`.

        Each argument left as None comes from the split's training config (the source
        model's compile). The server segment trains with the server's optimizer.
        """
        training = self.split.training_config or {}
        optimizer = optimizer if optimizer is not None else \
            restore_compile_value(training.get("optimizer")) or "rmsprop"
        loss = loss if loss is not None else restore_compile_value(training.get("loss"))
        metrics = metrics if metrics is not None else restore_compile_value(training.get("metrics"))
        loss_weights = loss_weights if loss_weights is not None else training.get("loss_weights")
        if loss is None:
            raise TrainingError("compile() needs a loss, e.g. loss='sparse_categorical_crossentropy' "
                                "(the split's source model was not compiled).")
        config = keras.optimizers.serialize(keras.optimizers.get(optimizer))
        model_inputs = {s.name for s in self.split.model_inputs}
        last = len(self.split.segments) - 1
        self.runners = []
        for index, segment in enumerate(self.split.segments):
            if segment is self.server_segment:
                self.runners.append(self.remote)
                continue
            holds_labels = index == last
            self.runners.append(SegmentRunner(
                segment, new_optimizer(config),
                input_gradients=[s.name not in model_inputs for s in segment.inputs],
                jit_compile=self.jit_compile,
                loss=loss if holds_labels else None,
                metrics=metrics if holds_labels else None,
                loss_weights=loss_weights if holds_labels else None))
        if self.labels_on_server:
            self.label_runner = SegmentRunner(_prediction_segment(self.split), new_optimizer(config),
                                              jit_compile=False, loss=loss, metrics=metrics,
                                              loss_weights=loss_weights)
        else:
            self.label_runner = self.runners[-1]
        self._built = False

    def _require_compiled(self) -> SegmentRunner:
        if self.label_runner is None:
            if not (self.split.training_config or {}).get("loss"):
                raise TrainingError("Call compile(optimizer=..., loss=...) first: the split's source "
                                    "model was not compiled.")
            self.compile()
        assert self.label_runner is not None
        return self.label_runner

    def _ensure_built(self, y: Any) -> None:
        if self._built:
            return
        label = self._require_compiled()
        x = [np.zeros((1, *(d or 1 for d in s.sample_shape)), dtype=s.dtype) for s in label.segment.inputs]
        y1 = tf.nest.map_structure(lambda t: t[:1], y)
        label.model._symbolic_build(data_batch=(x[0] if len(x) == 1 else x, y1, None))
        self._built = True

    def open_session(self) -> dict[str, Any]:
        """Open the server session now (fit does it when needed) and check that the server
        serves this split's server segment."""
        session = self.transport.open_session(self.wire_dtype)
        segment = self.server_segment
        expected = ([s.to_json() for s in segment.inputs], [s.to_json() for s in segment.outputs])
        served = (session.get("inputs"), session.get("outputs"))
        if session.get("mode") != self.mode or session.get("segment") != segment.name or \
                _spec_key(served) != _spec_key(expected):
            self.transport.close_session()
            raise ProtocolError(
                f"The server serves segment '{session.get('segment')}' ({session.get('mode')}), "
                f"inputs {_names(served[0])} -> outputs {_names(served[1])}; this device's split "
                f"expects '{segment.name}' ({self.mode}), {_names(expected[0])} -> "
                f"{_names(expected[1])}. Serve and train the same split folder.")
        return session

    # ---- one step --------------------------------------------------------------------------------
    def train_on_batch(self, x: Any, y: Any, sample_weight: Any = None) -> dict[str, Any]:
        """One training step over all segments (the server's included); returns this step's logs."""
        self._ensure_built(y)
        if self.transport.session is None:
            self.open_session()
        step = self._step
        started, transport_before = time.perf_counter(), self.transport.stats.seconds
        store = model_inputs_by_name(self.split, x)
        try:
            for runner in self.runners[:-1]:
                outputs = runner.forward(step, [store[n] for n in runner.input_names])
                store.update(zip(runner.output_names, outputs))
            last = self.runners[-1]
            other_losses = tf.add_n([r.pending_regularization(step) for r in self.runners[:-1]])
            input_grads, logs = last.train_step(step, [store[n] for n in last.input_names], y,
                                                sample_weight, other_losses)
            grads: dict[str, Any] = {}
            accumulate_gradients(grads, last, input_grads)
            for runner in reversed(self.runners[:-1]):
                output_grads = [grads.pop(n, None) for n in runner.output_names]
                accumulate_gradients(grads, runner, runner.backward(step, output_grads))
        except BaseException:
            for runner in self.runners:
                runner.drop(step)  # free the tapes of a step that will not finish
            raise
        finally:
            elapsed = time.perf_counter() - started
            self._device_seconds += elapsed - (self.transport.stats.seconds - transport_before)
        self._step += 1
        self._samples += int(tf.shape(store[self.split.model_inputs[0].name])[0])
        return logs

    # ---- the Keras loops -------------------------------------------------------------------------
    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = 32, epochs: int = 1,
            verbose: Any = "auto", validation_data: Any = None, shuffle: bool = True,
            callbacks: Any = None, sample_weight: Any = None, initial_epoch: int = 0,
            steps_per_epoch: int | None = None) -> keras.callbacks.History:
        """Train like `keras.Model.fit`; returns a `History`.

        Besides the loss and metrics, the logs (progress bar and History) carry this
        epoch's `sent_MB`, `received_MB` and wall-clock `ms_per_sample`.
        """
        label = self._require_compiled()
        iterator = TFEpochIterator(x=x, y=y, sample_weight=sample_weight, batch_size=batch_size,
                                   steps_per_epoch=steps_per_epoch, shuffle=shuffle)
        callbacks = callback_list(callbacks, model=self, verbose=verbose, epochs=epochs,
                                  steps=iterator.num_batches, add_history=True)
        self.stop_training = False
        callbacks.on_train_begin()
        epoch_logs: dict[str, Any] = {}
        for epoch in range(initial_epoch, epochs):
            label.model.reset_metrics()
            meter, means = EpochMeter(self), BatchMeans()
            callbacks.on_epoch_begin(epoch)
            logs: dict[str, Any] = {}
            for begin_step, end_step, bx, by, bsw in epoch_batches(iterator):
                callbacks.on_train_batch_begin(begin_step)
                samples_before = self._samples
                logs = self.train_on_batch(bx, by, bsw)
                if self.labels_on_server:  # per-step values from the server
                    logs = means.add(logs, self._samples - samples_before)
                callbacks.on_train_batch_end(end_step, {**logs, **meter.logs()})
                if self.stop_training:
                    break
            if not self.labels_on_server:
                logs = dict(label.model._get_metrics_result_or_logs(logs))
            epoch_logs = {**logs, **meter.logs()}
            if validation_data is not None:
                vx, vy, vsw = data_adapter_utils.unpack_x_y_sample_weight(validation_data)
                val_logs = self.evaluate(vx, vy, sample_weight=vsw, batch_size=batch_size,
                                         verbose=0, return_dict=True)
                epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
            callbacks.on_epoch_end(epoch, epoch_logs)
            if self.stop_training:
                break
        for runner in self.runners:
            if isinstance(runner, SegmentRunner):
                runner.optimizer.finalize_variable_values(runner.trainable)
        callbacks.on_train_end(logs=epoch_logs)
        assert self.history is not None
        return self.history

    def evaluate(self, x: Any = None, y: Any = None, batch_size: int | None = 32,
                 verbose: Any = "auto", sample_weight: Any = None, steps: int | None = None,
                 callbacks: Any = None, return_dict: bool = False) -> Any:
        """Evaluate like `keras.Model.evaluate`: the server's predict, loss and metrics here."""
        label = self._require_compiled()
        iterator = TFEpochIterator(x=x, y=y, sample_weight=sample_weight, batch_size=batch_size,
                                   steps_per_epoch=steps, shuffle=False)
        callbacks = callback_list(callbacks, model=self, verbose=verbose, epochs=1,
                                  steps=iterator.num_batches)
        callbacks.on_test_begin()
        label.model.reset_metrics()
        logs: dict[str, Any] = {}
        feeders = self.runners if self.labels_on_server else self.runners[:-1]
        for begin_step, end_step, bx, by, bsw in epoch_batches(iterator):
            callbacks.on_test_batch_begin(begin_step)
            self._ensure_built(by)
            store, regularization = self._infer(feeders, bx)
            logs = label.test_step([store[n] for n in label.input_names], by, bsw, regularization)
            callbacks.on_test_batch_end(end_step, logs)
        return finish_evaluation(label.model, logs, callbacks, return_dict)

    def predict(self, x: Any, batch_size: int | None = 32, verbose: Any = "auto") -> Any:
        """The model's outputs in inference mode, batch by batch, like `keras.Model.predict`."""
        if not self.runners:
            self._require_compiled()
        return predict_batches(x, batch_size, verbose, lambda bx: self._infer(self.runners, bx)[0],
                               [s.name for s in self.split.model_outputs])

    def _infer(self, runners: Sequence[Any], x: Any) -> tuple[dict[str, Any], Any]:
        """Inference through `runners`: the tensors by name and the sum of their
        regularization losses (added to the reported loss, as `model.evaluate` does)."""
        if self.transport.session is None:
            self.open_session()
        started, transport_before = time.perf_counter(), self.transport.stats.seconds
        store = model_inputs_by_name(self.split, x)
        regularization = []
        for runner in runners:
            outputs, loss = runner.predict_with_regularization([store[n] for n in runner.input_names])
            store.update(zip(runner.output_names, outputs))
            regularization.append(loss)
        self._device_seconds += time.perf_counter() - started - \
            (self.transport.stats.seconds - transport_before)
        return store, tf.add_n(regularization) if regularization else 0.0

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str] | None = None) -> list[Path]:
        """Write the device segments' `.keras` files into the split folder (default: the one
        this client was made from), each atomically, and re-export the TF.js bundles the
        manifest names, so that an app never ships stale weights. Returns the paths written."""
        target = Path(folder) if folder is not None else self.folder
        if target is None:
            raise TrainingError("This client was made from a Split, not a folder: pass save(folder).")
        manifest = Manifest.read(target)
        written = []
        for segment in self.split.segments:
            if segment.placement != "device":
                continue
            path = target / manifest.segment(segment.name).keras_file
            temporary = path.with_name(f".{path.stem}.saving.keras")
            segment.model.save(temporary)
            os.replace(temporary, path)
            written.append(path)
            bundle = manifest.segment(segment.name).tfjs
            if bundle:
                written.append(_replace_tfjs_bundle(segment.model, target / bundle))
        return written


def _replace_tfjs_bundle(model: keras.Model, model_json: Path) -> Path:
    """Export `model` next to the old bundle, then swap the folders."""
    import shutil

    from converters import export_tfjs

    folder = model_json.parent
    fresh = folder.with_name(f".{folder.name}.saving")
    shutil.rmtree(fresh, ignore_errors=True)
    export_tfjs(model, fresh, metadata={"splitkeras_segment": model.name})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(fresh, folder)
    return model_json


def _prediction_segment(split: Split) -> Segment:
    """An identity model over the model outputs, compiled on the device to compute the loss
    and metrics from the server's predictions (labels-on-server evaluation)."""
    inputs = [keras.Input(batch_shape=s.shape, dtype=s.dtype, name=f"{s.name}_prediction")
              for s in split.model_outputs]
    outputs = [keras.layers.Identity(name=s.name)(t) for s, t in zip(split.model_outputs, inputs)]
    model = keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name="predictions")
    return Segment("predictions", "device", model, list(split.model_outputs), list(split.model_outputs))


def _spec_key(specs: Any) -> Any:
    return [[(s.get("name"), [d for d in s.get("shape", [])], s.get("dtype")) for s in group or []]
            for group in specs]


def _names(specs: Any) -> list[Any]:
    return [s.get("name") for s in specs or []]
