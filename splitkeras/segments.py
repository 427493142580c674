"""`split()`: cut a Keras functional model into segments, and `Split`, what it returns.

Example:
    >>> import keras, splitkeras
    >>> model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    >>> s = splitkeras.split(model, at=["block_2_add", "block_14_add"])    # doctest: +SKIP
    >>> [(seg.name, seg.placement) for seg in s.segments]                   # doctest: +SKIP
    [('head', 'device'), ('middle', 'server'), ('tail', 'device')]
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from splitkeras.errors import CutError, ManifestError
from splitkeras.graph import as_functional, plan_segments
from splitkeras.manifest import PLACEMENTS, Manifest
from splitkeras.segment import (
    Segment,
    clone_layer,
    copy_layer_state,
    default_names,
    default_placements,
    segment_model,
)
from splitkeras.tensor_spec import TensorSpec
from splitkeras.topology import check_placements

__all__ = ["Segment", "Split", "split", "load_split", "copy_layer_state"]


class Split:
    """The segments of a cut model, in order, with the manifest that describes them.

    Build one with `splitkeras.split(model, at=[...])` or load one with
    `splitkeras.load_split(folder)`. Train it like a Keras model with
    `compile` / `fit` / `evaluate` / `predict`, and get the whole model back
    with `join()`.
    """

    def __init__(
        self,
        segments: list[Segment],
        *,
        cuts: list[str],
        model_inputs: list[TensorSpec],
        model_outputs: list[TensorSpec],
        source: dict[str, Any],
        model_name: str,
        training: dict[str, Any] | None = None,
        warnings_: list[str] | None = None,
    ) -> None:
        self.segments = segments
        self.cuts = cuts
        self.model_inputs = model_inputs
        self.model_outputs = model_outputs
        self.source = source
        self.model_name = model_name
        self.training_config = training
        self.warnings = list(warnings_ or [])
        self._trainer: Any = None

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}@{s.placement}" for s in self.segments)
        return f"<Split of '{self.model_name}' at {self.cuts}: {parts}>"

    @property
    def topology(self) -> Any:
        """The split's shape (`splitkeras.topology.Topology`): stages, hosts, label segment."""
        from splitkeras.topology import Topology

        return Topology.from_split(self)

    def __getitem__(self, name: str) -> Segment:
        for segment in self.segments:
            if segment.name == name:
                return segment
        raise KeyError(f"No segment named '{name}'; segments: {[s.name for s in self.segments]}")

    @property
    def manifest(self) -> Manifest:
        return Manifest(
            source=self.source,
            cuts=self.cuts,
            model_inputs=self.model_inputs,
            model_outputs=self.model_outputs,
            segments=[s.entry(f"{s.name}.keras") for s in self.segments],
            training=self.training_config,
            extra={"model_name": self.model_name},
        )

    # ---- persistence -------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str], *, tfjs: bool = False) -> Path:
        """Write `split.json` and one `.keras` file per segment into `folder`.

        With `tfjs=True`, device segments are also exported as TF.js bundles
        (`<name>_tfjs/model.json`), named in the manifest.
        """
        folder = Path(folder)
        if tfjs:  # refuse before writing anything, naming every layer of every device segment
            from converters import check_tfjs_supported
            from splitkeras.errors import ExportError

            problems = []
            for segment in self.segments:
                if segment.placement == "device":
                    try:
                        check_tfjs_supported(segment.model)
                    except ExportError as error:
                        problems.append(f"Device segment '{segment.name}' cannot run in TF.js: {error}")
            if problems:
                raise ExportError(
                    "\n".join(problems) + "\nNothing was written. To get the Keras segments without TF.js "
                    "bundles, run again with --no-tfjs (Python: save(folder, tfjs=False))."
                )
        folder.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest
        for segment, entry in zip(self.segments, manifest.segments):
            segment.model.save(folder / entry.keras_file)
            if tfjs and segment.placement == "device":
                from converters import export_tfjs

                export_tfjs(segment.model, folder / f"{segment.name}_tfjs",
                            metadata={"splitkeras_segment": segment.name})
                entry.tfjs = f"{segment.name}_tfjs/model.json"
        return manifest.write(folder)

    # ---- joining -----------------------------------------------------------------------------
    def get_weights(self) -> list[np.ndarray]:
        """The weights of every segment in order, like `keras.Model.get_weights`."""
        return [w for segment in self.segments for w in segment.model.get_weights()]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Set the weights of every segment from a `get_weights()` list."""
        weights = list(weights)
        expected = sum(len(s.model.weights) for s in self.segments)
        if len(weights) != expected:
            raise ValueError(f"set_weights() needs {expected} arrays for this split, got {len(weights)}.")
        start = 0
        for segment in self.segments:
            count = len(segment.model.weights)
            segment.model.set_weights(weights[start:start + count])
            start += count

    def join(self) -> keras.Model:
        """The whole model again, with the original layer names and the segments' current
        weights (an independent copy: training it does not change the segments)."""
        missing = [s.name for s in self.segments if s.model is None]
        if missing:
            raise ManifestError(
                f"Cannot join: segment(s) {missing} were not loaded. Load every segment "
                "(load_split(folder) without placements=...) to join them."
            )
        store: dict[str, Any] = {}
        inputs = []
        for spec in self.model_inputs:
            tensor = keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=spec.name)
            store[spec.name] = tensor
            inputs.append(tensor)
        for segment in self.segments:
            args = [store[spec.name] for spec in segment.inputs]
            outs = segment.model._run_through_graph(args, operation_fn=lambda op: op)
            for spec, tensor in zip(segment.outputs, keras.tree.flatten(outs)):
                store[spec.name] = tensor
        shared = keras.Model(inputs, [store[s.name] for s in self.model_outputs], name=self.model_name)
        joined = keras.models.clone_model(shared, clone_function=clone_layer)
        for layer, copy in zip(shared.layers, joined.layers):
            copy_layer_state(layer, copy)
        if len(self.model_inputs) == 1 or len(self.model_outputs) == 1:
            # One input or output is a tensor, not a list of one, as in most source models.
            joined = keras.Model(
                joined.inputs[0] if len(joined.inputs) == 1 else joined.inputs,
                joined.outputs[0] if len(joined.outputs) == 1 else joined.outputs,
                name=self.model_name,
            )
        if self.training_config:
            _compile_from_training_config(joined, self.training_config)
        return joined

    # ---- training (see splitkeras.training) --------------------------------------------------
    def compile(self, optimizer: Any = None, loss: Any = None, metrics: Any = None,
                loss_weights: Any = None) -> None:
        """Configure training like `keras.Model.compile`; each segment gets its own
        optimizer built from the same configuration."""
        from splitkeras.training import SplitTrainer

        self._trainer = SplitTrainer(self, optimizer=optimizer, loss=loss, metrics=metrics,
                                     loss_weights=loss_weights)

    def _require_trainer(self) -> Any:
        if self._trainer is None:
            if self.training_config:
                from splitkeras.training import SplitTrainer

                self._trainer = SplitTrainer.from_training_config(self, self.training_config)
            else:
                from splitkeras.errors import TrainingError

                raise TrainingError(
                    "This split is not compiled and its source model had no compile config. "
                    "Call split.compile(optimizer=..., loss=...) first."
                )
        return self._trainer

    def fit(self, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        """Train all segments, like `keras.Model.fit`. See `SplitTrainer.fit`."""
        return self._require_trainer().fit(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluate like `keras.Model.evaluate`."""
        return self._require_trainer().evaluate(*args, **kwargs)

    def predict(self, x: Any, batch_size: int | None = None, verbose: Any = "auto") -> Any:
        """Run the segments in inference mode, like `keras.Model.predict`."""
        from splitkeras.training import predict

        return predict(self, x, batch_size=batch_size, verbose=verbose)


def _compile_from_training_config(model: keras.Model, training: dict[str, Any]) -> None:
    try:
        model.compile_from_config(training)
    except Exception as error:  # a config that cannot compile here still joins, uncompiled
        warnings.warn(f"The joined model is not compiled: its saved compile config could not be "
                      f"restored ({type(error).__name__}: {error}). Call model.compile(...) yourself.",
                      stacklevel=3)


def _model_hash(model: keras.Model) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def split(
    model: keras.Model,
    at: Sequence[str] | str,
    *,
    placements: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    source: dict[str, Any] | None = None,
) -> Split:
    """Cut `model` at the named layers into `len(at) + 1` segments.

    A cut at layer L puts L and everything L depends on in the earlier segment.
    Every tensor that crosses a cut is carried to the segment that uses it (a
    skip connection from the head to the tail stays on the device). Each
    segment is a new `keras.Model` with its own copy of the weights.

    Args:
        model: a functional or Sequential Keras model.
        at: layer names to cut after, in the order data flows.
        placements: `"device"` or `"server"` per segment. Default: one cut puts
            the head on the device and the rest on the server (labels go to the
            server); two cuts put head and tail on the device (U-shaped).
        names: segment names; default head, middle, tail.
        source: file name and hash of the model file (set by the CLI).

    Example:
        >>> s = splitkeras.split(model, at=["conv2d_3", "dense_1"])   # doctest: +SKIP
    """
    functional = as_functional(model)
    graph, plans = plan_segments(model, [at] if isinstance(at, str) else list(at))
    count = len(plans)
    names = list(names) if names is not None else default_names(count)
    placements = list(placements) if placements is not None else default_placements(count)
    if len(names) != count or len(placements) != count:
        raise CutError(
            f"{count - 1} cut(s) make {count} segments, but {len(names)} names and "
            f"{len(placements)} placements were given. Give one per segment."
        )
    for placement in placements:
        if placement not in PLACEMENTS:
            raise CutError(f"Unknown placement '{placement}'; expected one of {PLACEMENTS}.")
    try:
        check_placements(names, placements)
    except ManifestError as error:
        raise CutError(str(error)) from None

    notes: list[str] = []
    segments = []
    for plan, name, placement in zip(plans, names, placements):
        input_specs = [graph.spec(t) for t in plan.inputs]
        output_specs = [graph.spec(t) for t in plan.outputs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = segment_model(plan, input_specs, name)
        for layer in built.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            copy_layer_state(functional.get_layer(layer.name), layer)
        model_input_names = {graph.tensor_name(t) for t in functional.inputs}
        if placement == "server":
            leaked = [s.name for s in input_specs if s.name in model_input_names]
            if leaked:
                notes.append(
                    f"Segment '{name}' (server) takes the raw model input(s) {leaked}: "
                    "that data leaves the device. Cut after the layers that read them."
                )
        segments.append(Segment(name, placement, built, input_specs, output_specs))

    training = None
    if getattr(model, "compiled", False):
        try:
            training = model.get_compile_config()
        except Exception:
            training = None
    return Split(
        segments,
        cuts=[at] if isinstance(at, str) else list(at),
        model_inputs=[graph.spec(t) for t in functional.inputs],
        model_outputs=[graph.spec(t) for t in functional.outputs],
        source=source or {"file": None, "sha256": _model_hash(functional)},
        model_name=model.name,
        training=training,
        warnings_=notes,
    )


def load_split(
    folder: str | os.PathLike[str],
    *,
    placements: Sequence[str] | None = None,
    unsafe_deserialization: bool = False,
) -> Split:
    """Load a split written by `Split.save` or `splitkeras split`.

    Args:
        folder: the folder holding `split.json`.
        placements: load only the segments with these placements (e.g. `["device"]`
            on a device, `["server"]` on the server); the others are left as `None`.
        unsafe_deserialization: allow segments with Lambda layers (Keras safe mode off).
            Only for splits you made yourself: a Lambda runs arbitrary code.
    """
    folder = Path(folder)
    manifest = Manifest.read(folder)
    segments = []
    for entry in manifest.segments:
        model = None
        if placements is None or entry.placement in placements:
            path = folder / entry.keras_file
            if not path.exists():
                raise ManifestError(
                    f"Segment '{entry.name}' names '{entry.keras_file}', which is missing from '{folder}'."
                )
            from converters.keras_io import load_model

            model = load_model(path, unsafe_deserialization=unsafe_deserialization, compile=False)
        segments.append(Segment(entry.name, entry.placement, model, entry.inputs, entry.outputs))
    return Split(
        segments,
        cuts=manifest.cuts,
        model_inputs=manifest.model_inputs,
        model_outputs=manifest.model_outputs,
        source=manifest.source,
        model_name=str(manifest.extra.get("model_name", "model")),
        training=manifest.training,
    )
