"""One segment of a split: its `keras.Model` (a fresh model replaying the source model's layers
between two sets of boundary tensors), its boundary tensors and where it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras

from splitkeras.errors import CutError
from splitkeras.manifest import SegmentEntry
from splitkeras.tensor_spec import TensorSpec

__all__ = ["Segment", "clone_layer", "copy_layer_state", "default_names", "default_placements", "segment_model"]


@dataclass
class Segment:
    """One segment: a `keras.Model` with its boundary tensors and placement."""

    name: str
    placement: str
    model: keras.Model
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def entry(self, keras_file: str, tfjs: str | None = None) -> SegmentEntry:
        return SegmentEntry(
            name=self.name,
            placement=self.placement,
            keras_file=keras_file,
            inputs=self.inputs,
            outputs=self.outputs,
            parameters=int(self.model.count_params()),
            tfjs=tfjs,
        )


def default_names(count: int) -> list[str]:
    """head, tail; head, middle, tail; head, middle_1, ..., middle_k, tail."""
    if count == 2:
        return ["head", "tail"]
    if count == 3:
        return ["head", "middle", "tail"]
    return ["head"] + [f"middle_{i}" for i in range(1, count - 1)] + ["tail"]


def default_placements(count: int) -> list[str]:
    """One cut: the head on the device, the rest (and the labels) on the server.

    Two or more cuts (U-shaped): head and tail on the device, the middles on the
    server, so that neither raw inputs nor labels leave the device.
    """
    if count == 2:
        return ["device", "server"]
    return ["device"] + ["server"] * (count - 2) + ["device"]


def copy_layer_state(source: keras.layers.Layer, target: keras.layers.Layer) -> None:
    """Copy every variable of `source` into `target`: weights, BatchNorm statistics
    and the state of seed generators (so Dropout draws the same masks)."""
    src, dst = source.variables, target.variables
    if len(src) != len(dst) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(src, dst)):
        raise CutError(
            f"Layer '{source.name}' could not be copied into its segment: its variables differ "
            f"({[tuple(v.shape) for v in src]} vs {[tuple(v.shape) for v in dst]})."
        )
    for a, b in zip(src, dst):
        b.assign(a)
    # Preprocessing layers (Normalization) compute constants from their weights: recompute them,
    # or the copy keeps normalizing with its initial mean and variance.
    for layer in [target, *target._flatten_layers(include_self=False)]:
        if callable(getattr(layer, "finalize_state", None)):
            layer.finalize_state()


def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    if isinstance(layer, keras.layers.Lambda):
        # The function is already in this process (built here, or loaded with
        # unsafe_deserialization=True): cloning it runs nothing new, so Keras' safe
        # mode, which guards files, does not apply. Loading a split stays safe.
        return layer.__class__.from_config(layer.get_config(), safe_mode=False)
    return layer.__class__.from_config(layer.get_config())


def segment_model(plan: Any, input_specs: list[TensorSpec], name: str) -> keras.Model:
    """A new model for one segment: fresh inputs named after the boundary tensors, and a
    clone of each layer called as in the source model (one clone per shared layer).

    This replays the plan's nodes the way `keras.models.clone_model` does, instead of
    slicing with `keras.Model(plan.inputs, plan.outputs)`: given a model input together
    with intermediate tensors, that slice re-wires the model input's history (Keras'
    `clone_graph_nodes`), after which the source model can no longer be saved.
    """
    values: dict[int, Any] = {}
    inputs = []
    for tensor, spec in zip(plan.inputs, input_specs):
        inputs.append(keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=spec.name))
        values[id(tensor)] = inputs[-1]
    clones: dict[int, keras.layers.Layer] = {}
    for node in plan.nodes:  # topological order
        layer = node.operation
        if id(layer) not in clones:
            clones[id(layer)] = clone_layer(layer)
        args, kwargs = node.arguments.fill_in(values)
        outputs = clones[id(layer)](*args, **kwargs)
        for tensor, value in zip(node.outputs, keras.tree.flatten(outputs)):
            values[id(tensor)] = value
    return keras.Model(inputs, [values[id(t)] for t in plan.outputs], name=name)
