"""`DeviceClient`: train a split over HTTP, with the device's segments here and the
server segments on `splitkeras serve` servers.

The client walks the split's topology (`splitkeras.topology`) with the one step loop
(`splitkeras.steps.StepLoop`): each device segment is a local runner, each server stage
(one server segment, or a chain of consecutive ones whose servers talk to each other)
a remote runner on its first server. Any placement whose first segment is on the device
trains: device,server; device,server,device; device,server,server,device (a chain);
device,server,device,server,device (two servers, a device segment between them).

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
    >>> DeviceClient("out5", {"middle_1": "http://a:8000", "middle_3": "http://b:8001"})  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from keras.src.trainers.data_adapters import data_adapter_utils

from splitkeras import codecs
from splitkeras.client.network import NetworkConditions
from splitkeras.client.pipeline import check_depth, pipeline_for, pipelined_epoch
from splitkeras.client.remote import RemoteSegment
from splitkeras.client.rounds import FleetRounds
from splitkeras.client.stages import open_stage, stage_segment, stage_urls
from splitkeras.client.stats import BatchMeans, ClientStats, EpochMeter
from splitkeras.client.transport import Transport
from splitkeras.engine import SegmentRunner, new_optimizer
from splitkeras.errors import TrainingError
from splitkeras.manifest import Manifest
from splitkeras.segments import Segment, Split, load_split
from splitkeras.steps import StepLoop
from splitkeras.training import (
    TFEpochIterator,
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
        server_url: e.g. `"http://127.0.0.1:8000"` when the split has one server stage;
            else `{stage: url}` with one URL per server stage, each keyed by the stage's
            first segment name (or its host), e.g. `{"middle_1": ..., "middle_3": ...}`.
            A chain of consecutive server segments is one stage: its first server calls
            the next (`splitkeras serve --next`).
        key: the server key; default `$SPLITKERAS_SERVER_KEY`, then
            `SPLIT_DIR/.splitkeras/server.key`.
        wire_dtype: `"float32"` (exact) or `"float16"` (half the bytes) on the wire; the
            older form of `compress`.
        compress: the codec of each direction (`splitkeras.codecs`): one SPEC for both
            (`"int8"`) or `"forward=int8,backward=topk:0.05+int8"`; default: `wire_dtype`.
        network: emulate a slower link (`NetworkConditions`), for experiments.
        jit_compile: for the device segments' steps: `"auto"` (as Keras), True or False.
        transport: a ready `Transport` (then `server_url`, `key` and `network` are unused;
            one server stage only).
        unsafe_deserialization: allow Lambda layers in the device segments.
        defences: privacy defences applied to what crosses to each server stage during
            training (`splitkeras.privacy`: `MaxNorm`, `GradientNoise`, `ActivationNoise`,
            `NoPeek`, `RandomizedResponse`; see docs/privacy.md). None or empty: off,
            the step is exactly the step without them.

    Example:
        >>> with DeviceClient("out", "http://127.0.0.1:8000") as client:   # doctest: +SKIP
        ...     client.compile(optimizer="adam")
        ...     client.fit(x, y, epochs=2)
    """

    def __init__(self, split: str | os.PathLike[str] | Split, server_url: str | Mapping[str, str], *,
                 key: str | None = None, wire_dtype: str = "float32", compress: str | None = None,
                 network: NetworkConditions | None = None, jit_compile: bool | str = "auto",
                 transport: Transport | None = None, unsafe_deserialization: bool = False,
                 defences: Sequence[Any] | None = None) -> None:
        if isinstance(split, Split):
            self.split, self.folder = split, None
        else:
            self.folder = Path(split)
            self.split = load_split(self.folder, placements=["device"],
                                    unsafe_deserialization=unsafe_deserialization)
        self.topology = self.split.topology
        self.stages = self.topology.server_stages
        if not self.stages:
            raise TrainingError("This split has no server segment: train it in process with "
                                "split.fit(...), or re-split with --placement naming a server.")
        missing = [s.name for s in self.split.segments if s.placement == "device" and s.model is None]
        if missing:
            raise TrainingError(f"The device segments {missing} are not loaded.")
        self.labels_on_server = self.topology.mode == "labels_on_server"
        self.mode = self.topology.mode
        if wire_dtype not in ("float32", "float16"):
            raise ValueError(f"wire_dtype must be 'float32' or 'float16', got {wire_dtype!r}.")
        self.wire_dtype = wire_dtype
        self.compress = None if compress is None else codecs.format_compress(codecs.parse_compress(compress))
        self.jit_compile = jit_compile
        self.defences = list(defences or [])
        if transport is not None and len(self.stages) != 1:
            raise TrainingError(f"transport= serves one server stage; this split has {len(self.stages)}"
                                f" ({[s.name for s in self.stages]}): pass server_url={{stage: url}}.")
        urls = stage_urls(self.stages, server_url) if transport is None else {}
        self.transports: dict[str, Transport] = {
            stage.name: transport or Transport(urls[stage.name], key=resolve_key(key, self.folder),
                                               network=network)
            for stage in self.stages}
        self.transport = self.transports[self.stages[0].name]  # the (first) server's
        self.remotes = {stage.name: RemoteSegment(stage_segment(stage), self.transports[stage.name],
                                                  self.split.model_outputs if stage.holds_labels else None)
                        for stage in self.stages}
        self.remote = self.remotes[self.stages[0].name]
        self.server_segment = self.remote.segment
        self.runners: list[Any] = []
        self.loop: StepLoop | None = None
        self.label_runner: SegmentRunner | None = None  # computes loss and metrics on the device
        self.history: keras.callbacks.History | None = None
        self.stop_training = False
        self._step = 0
        self._samples = 0
        self._device_seconds = 0.0
        self.rounds: FleetRounds | None = None  # splitkeras.client.rounds, when the server aggregates

    def __repr__(self) -> str:
        servers = ", ".join(t.base_url for t in self.transports.values())
        return f"<DeviceClient {self.mode} split of '{self.split.model_name}' -> {servers}>"

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the server sessions and the connections."""
        for transport in self.transports.values():
            transport.close()

    def _transport_seconds(self) -> float:
        return sum(t.stats.seconds for t in self.transports.values())

    @property
    def stats(self) -> ClientStats:
        each = [t.stats for t in self.transports.values()]
        return ClientStats(sum(t.bytes_sent for t in each), sum(t.bytes_received for t in each),
                           sum(t.seconds for t in each), self._device_seconds, self._step, self._samples)

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
        model_inputs = [s.name for s in self.split.model_inputs]
        last = self.topology.label_segment
        self.runners = [
            self.remotes[stage.name] if stage.kind == "server" else SegmentRunner.for_segment(
                self.split[stage.name], config, model_inputs, jit_compile=self.jit_compile,
                loss=loss if stage.name == last else None, metrics=metrics, loss_weights=loss_weights)
            for stage in self.topology.stages]
        if self.defences:
            from splitkeras.privacy.defences.base import apply_defences

            self.runners = apply_defences(self.runners, [s.kind for s in self.topology.stages],
                                          [s.mode for s in self.topology.stages], self.defences, model_inputs)
        if self.labels_on_server:
            self.label_runner = SegmentRunner(_prediction_segment(self.split), new_optimizer(config),
                                              jit_compile=False, loss=loss, metrics=metrics,
                                              loss_weights=loss_weights)
        else:
            self.label_runner = self.runners[-1]
        self.loop = StepLoop(self.runners)

    def fleet_rounds(self) -> FleetRounds | None:
        """The rounds of device aggregation the (first) server announces, or None (kept
        across fits, so that a second fit goes on at the round the first one ended)."""
        announced = self.open_session().get("aggregation")
        if not announced:
            return None
        if self.rounds is None or self.rounds.transport is not self.transport:
            segments = [(s.name, s.model) for s in self.split.segments if s.placement == "device"]
            self.rounds = FleetRounds(self.transport, segments, announced)
        return self.rounds

    def _require_compiled(self) -> SegmentRunner:
        if self.label_runner is None:
            if not (self.split.training_config or {}).get("loss"):
                raise TrainingError("Call compile(optimizer=..., loss=...) first: the split's source "
                                    "model was not compiled.")
            self.compile()
        assert self.label_runner is not None
        return self.label_runner

    def _ensure_built(self, y: Any) -> None:
        self._require_compiled().build_labels(y)

    def open_session(self) -> dict[str, Any]:
        """Open a session on every server stage now (fit does it when needed) and check that
        each server serves this split's stage. Returns the (first) server's description."""
        answers = {}
        for stage in self.stages:
            if self.transports[stage.name].session is None:
                answers[stage.name] = open_stage(self.transports[stage.name], stage, self.wire_dtype,
                                                 self.compress)
        return answers.get(self.stages[0].name) or dict(self.transport.session or {})

    # ---- one step --------------------------------------------------------------------------------
    def train_on_batch(self, x: Any, y: Any, sample_weight: Any = None) -> dict[str, Any]:
        """One training step over all segments (the servers' included); returns this step's logs."""
        self._ensure_built(y)
        self.open_session()
        assert self.loop is not None
        step = self._step
        started, transport_before = time.perf_counter(), self._transport_seconds()
        store = model_inputs_by_name(self.split, x)
        try:
            _, logs = self.loop.train(step, store, y, sample_weight)
        finally:
            elapsed = time.perf_counter() - started
            self._device_seconds += elapsed - (self._transport_seconds() - transport_before)
        self._step += 1
        self._samples += int(tf.shape(store[self.split.model_inputs[0].name])[0])
        return logs

    # ---- the Keras loops -------------------------------------------------------------------------
    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = 32, epochs: int = 1,
            verbose: Any = "auto", validation_data: Any = None, shuffle: bool = True,
            callbacks: Any = None, sample_weight: Any = None, initial_epoch: int = 0,
            steps_per_epoch: int | None = None, rounds: bool | None = None,
            pipeline_depth: int = 1) -> keras.callbacks.History:
        """Train like `keras.Model.fit`; returns a `History`.

        `rounds`: take part in the server's rounds of device aggregation (None: when the
        server announces them, `splitkeras serve --aggregate`; `splitkeras.client.rounds`).

        `pipeline_depth` (1..4): steps in flight at once (`splitkeras.client.pipeline`,
        docs/training.md "Pipelining"): at 2 or more the head's forward of the next batch
        and its server forward go out while the server works on the current one, at the
        price of staleness (the head's and server's forwards miss up to depth-1 updates).
        Capped by the server's `max_pending_steps` (with a warning). 1: the sequential step.

        Besides the loss and metrics, the logs (progress bar and History) carry this
        epoch's `sent_MB`, `received_MB` and wall-clock `ms_per_sample`.
        """
        label = self._require_compiled()
        depth = check_depth(pipeline_depth)
        iterator = TFEpochIterator(x=x, y=y, sample_weight=sample_weight, batch_size=batch_size,
                                   steps_per_epoch=steps_per_epoch, shuffle=shuffle)
        pipelined = pipeline_for(self, depth, rounds) if depth > 1 else None
        callbacks = callback_list(callbacks, model=self, verbose=verbose, epochs=epochs,
                                  steps=iterator.num_batches, add_history=True)
        self.stop_training = False
        callbacks.on_train_begin()
        fleet_rounds = self.fleet_rounds() if rounds is not False else None
        if rounds and fleet_rounds is None:
            raise TrainingError("fit(rounds=True): the server does not aggregate device segments (start it "
                                "with `splitkeras serve OUT --aggregate fedavg`).")
        if fleet_rounds is not None:
            fleet_rounds.begin()
        epoch_logs: dict[str, Any] = {}
        for epoch in range(initial_epoch, epochs):
            label.model.reset_metrics()
            meter, means = EpochMeter(self), BatchMeans()
            callbacks.on_epoch_begin(epoch)
            logs: dict[str, Any] = {}
            batches = epoch_batches(iterator)
            if pipelined is not None:  # splitkeras.client.pipeline
                logs = pipelined_epoch(self, pipelined, batches, callbacks, meter)
                batches = iter(())
            for begin_step, end_step, bx, by, bsw in batches:
                callbacks.on_train_batch_begin(begin_step)
                samples_before = self._samples
                logs = self.train_on_batch(bx, by, bsw)
                if self.labels_on_server:  # per-step values from the server
                    logs = means.add(logs, self._samples - samples_before)
                if fleet_rounds is not None:
                    fleet_rounds.after_step(self._samples - samples_before)
                callbacks.on_train_batch_end(end_step, {**logs, **meter.logs()})
                if self.stop_training:
                    break
            if fleet_rounds is not None:
                fleet_rounds.end_epoch()
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
        if fleet_rounds is not None:
            fleet_rounds.finish()
        if pipelined is not None:
            pipelined.close()
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
        self.open_session()
        assert self.loop is not None
        started, transport_before = time.perf_counter(), self._transport_seconds()
        store, regularization = self.loop.infer(model_inputs_by_name(self.split, x), runners)
        self._device_seconds += time.perf_counter() - started - \
            (self._transport_seconds() - transport_before)
        return store, regularization

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str] | None = None) -> list[Path]:
        """Write the device segments' `.keras` files into the split folder (default: the one
        this client was made from), each atomically, and re-export the TF.js bundles the
        manifest names, so that an app never ships stale weights. Returns the paths written."""
        target = Path(folder) if folder is not None else self.folder
        if target is None:
            raise TrainingError("This client was made from a Split, not a folder: pass save(folder).")
        from converters import replace_tfjs_bundle

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
                written.append(replace_tfjs_bundle(segment.model, target / bundle))
        return written



def _prediction_segment(split: Split) -> Segment:
    """An identity model over the model outputs, compiled on the device to compute the loss
    and metrics from the server's predictions (labels-on-server evaluation)."""
    inputs = [keras.Input(batch_shape=s.shape, dtype=s.dtype, name=f"{s.name}_prediction")
              for s in split.model_outputs]
    outputs = [keras.layers.Identity(name=s.name)(t) for s, t in zip(split.model_outputs, inputs)]
    model = keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name="predictions")
    return Segment("predictions", "device", model, list(split.model_outputs), list(split.model_outputs))
