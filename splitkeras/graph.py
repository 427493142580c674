"""Where each layer of a functional model goes when it is cut, and what crosses.

The rule: a cut at layer L puts L and everything L depends on in the earlier
segment. Cuts are applied in order, so segment *i* holds the ancestors of cut
*i* (and the cut itself) that no earlier segment took; the last segment holds
everything left. A tensor crosses from segment *i* to segment *j > i* when a
layer of *j* consumes it; it is carried straight there, so a skip connection
from the head to the tail never passes through the middle.

This module only analyses Keras' own graph (`Functional._nodes_by_depth`); the
segment models themselves are built by Keras (see `splitkeras.segments`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from splitkeras.errors import CutError, UnsupportedModelError
from splitkeras.tensor_spec import TensorSpec

__all__ = ["ModelGraph", "SegmentPlan", "as_functional", "plan_segments"]


def as_functional(model: Any) -> keras.Model:
    """Return a functional view of `model` (a Sequential becomes a Functional).

    Raises:
        UnsupportedModelError: for a subclassed model or anything that is not a Keras model.
    """
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"Expected a keras.Model, received {type(model).__name__}. "
            "Load your model with keras.models.load_model() or splitkeras.load_model() first."
        )
    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "_functional", None):
            raise UnsupportedModelError(
                f"Sequential model '{model.name}' has no input shape yet, so it has no graph to cut. "
                "Start it with keras.Input(shape=...) or call model.build(input_shape) first."
            )
        return model._functional
    if not hasattr(model, "_nodes_by_depth"):
        raise UnsupportedModelError(
            f"Model '{model.name}' ({type(model).__name__}) is a subclassed model: its layers are "
            "connected by Python code, not by a graph splitkeras can cut. Rebuild it with the "
            "functional API (keras.Model(inputs, outputs)) or as a keras.Sequential."
        )
    return model


def _tensor_key(tensor: Any) -> int:
    return id(tensor)


@dataclass
class ModelGraph:
    """The nodes of a functional model in topological order, with their tensors."""

    model: keras.Model
    nodes: list[Any] = field(default_factory=list)  # topological: inputs first
    producer: dict[int, Any] = field(default_factory=dict)  # tensor id -> node
    consumers: dict[int, list[Any]] = field(default_factory=dict)  # tensor id -> nodes
    tensors: dict[int, Any] = field(default_factory=dict)  # tensor id -> KerasTensor

    @classmethod
    def of(cls, model: keras.Model) -> ModelGraph:
        graph = cls(model=model)
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                graph.nodes.append(node)
        for node in graph.nodes:
            for tensor in node.outputs:
                graph.producer[_tensor_key(tensor)] = node
                graph.tensors[_tensor_key(tensor)] = tensor
        for node in graph.nodes:
            for tensor in node.input_tensors:
                graph.consumers.setdefault(_tensor_key(tensor), []).append(node)
        return graph

    @property
    def layer_nodes(self) -> list[Any]:
        return [node for node in self.nodes if not node.is_input]

    def nodes_of(self, layer: Any) -> list[Any]:
        return [node for node in self.layer_nodes if node.operation is layer]

    def ancestors(self, node: Any) -> set[int]:
        """ids of `node` and every layer node it depends on (input nodes excluded)."""
        seen: set[int] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if id(current) in seen or current.is_input:
                continue
            seen.add(id(current))
            for tensor in current.input_tensors:
                stack.append(self.producer[_tensor_key(tensor)])
        return seen

    def tensor_name(self, tensor: Any) -> str:
        """The boundary name of a tensor: the layer's name, or `layer.node.index`.

        The name is also the segment's input-layer name, so it must be valid in Keras
        (no `/`) and in TF.js (`[A-Za-z0-9][-A-Za-z0-9._/]*`, so no `:`): hence `.`.
        """
        layer, node_index, tensor_index = tensor._keras_history
        producer = self.producer[_tensor_key(tensor)]
        own_nodes = self.nodes_of(layer) if not producer.is_input else [producer]
        if len(own_nodes) == 1 and len(producer.outputs) == 1 and node_index == 0:
            return layer.name
        return f"{layer.name}.{node_index}.{tensor_index}"

    def spec(self, tensor: Any) -> TensorSpec:
        return TensorSpec(
            name=self.tensor_name(tensor),
            shape=tuple(None if d is None else int(d) for d in tensor.shape),
            dtype=str(tensor.dtype),
        )


@dataclass
class SegmentPlan:
    """What one segment holds: its layer nodes and the tensors it receives and sends."""

    index: int
    nodes: list[Any]
    inputs: list[Any]  # KerasTensors, in the order of the segment model's inputs
    outputs: list[Any]  # KerasTensors, in the order of the segment model's outputs


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return "Did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    return "Run `splitkeras inspect MODEL` to list the layers you can cut at."


def _nested_owner(model: keras.Model, name: str) -> str | None:
    """The top-level nested model that holds a layer called `name`, if any."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if any(inner.name == name for inner in layer.layers) or _nested_owner(layer, name):
                return layer.name
    return None


def _cut_node(graph: ModelGraph, name: str, model_name: str) -> Any:
    model = graph.model
    names = [layer.name for layer in model.layers]
    if name not in names:
        owner = _nested_owner(model, name)
        if owner is not None:
            raise CutError(
                f"Layer '{name}' is inside the nested model '{owner}', which splitkeras cuts as "
                f"one layer. Cut at '{owner}' or at a layer before it, or rebuild the model "
                "without nesting to cut inside it."
            )
        raise CutError(f"Model '{model_name}' has no layer named '{name}'. {_suggest(name, names)}")
    layer = model.get_layer(name)
    if isinstance(layer, keras.layers.InputLayer):
        raise CutError(
            f"Cannot cut at input layer '{name}': the segment before it would be empty. "
            "Cut at a layer after it."
        )
    nodes = graph.nodes_of(layer)
    if len(nodes) != 1:
        raise CutError(
            f"Layer '{name}' is called {len(nodes)} times in model '{model_name}' (a shared "
            "layer), so a cut there is ambiguous. Cut at a layer that is called once."
        )
    return nodes[0]


def plan_segments(model: keras.Model, at: Sequence[str]) -> tuple[ModelGraph, list[SegmentPlan]]:
    """Assign every node of `model` to a segment for the cuts `at`.

    Returns the graph and one `SegmentPlan` per segment (`len(at) + 1` of them).

    Raises:
        CutError: unknown layer (with suggestions), repeated or out-of-order cuts,
            a cut at an input, at a shared layer, or at or after a model output.
        UnsupportedModelError: a layer shared between two segments.
    """
    if isinstance(at, str):
        at = [at]
    at = list(at)
    if not at:
        raise CutError("No cut given. Name at least one layer to cut at, e.g. at=['conv2d_3'].")
    model_name = model.name  # a Sequential's functional view has another name
    model = as_functional(model)
    graph = ModelGraph.of(model)

    seen_names: set[str] = set()
    for name in at:
        if name in seen_names:
            raise CutError(f"Layer '{name}' is given twice as a cut. Give each cut once.")
        seen_names.add(name)

    cut_nodes = [_cut_node(graph, name, model_name) for name in at]
    segment_of: dict[int, int] = {}
    for index, (name, node) in enumerate(zip(at, cut_nodes)):
        if id(node) in segment_of:
            earlier = at[segment_of[id(node)]]
            raise CutError(
                f"Cuts are out of order: '{name}' comes before '{earlier}' in the model, but was "
                f"given after it. Give cuts in the order data flows through the model "
                f"(--at {name} --at {earlier})."
            )
        for node_id in graph.ancestors(node):
            segment_of.setdefault(node_id, index)
    last = len(at)
    for node in graph.layer_nodes:
        segment_of.setdefault(id(node), last)

    if all(segment_of[id(n)] != last for n in graph.layer_nodes):
        raise CutError(
            f"The cut at '{at[-1]}' leaves the last segment empty: every layer of model "
            f"'{model_name}' is at or before it. Cut at a layer before the model outputs."
        )
    for output in model.outputs:
        node = graph.producer[_tensor_key(output)]
        if segment_of.get(id(node), last) != last:
            cut = at[segment_of[id(node)]]
            raise CutError(
                f"The cut at '{cut}' is at or after model output '{graph.tensor_name(output)}': "
                "every model output must be computed in the last segment, which would be empty "
                "or miss it. Cut at a layer before the outputs."
            )

    layer_segments: dict[int, set[int]] = {}
    for node in graph.layer_nodes:
        layer_segments.setdefault(id(node.operation), set()).add(segment_of[id(node)])
    for node in graph.layer_nodes:
        segments = layer_segments[id(node.operation)]
        if len(segments) > 1:
            raise UnsupportedModelError(
                f"Layer '{node.operation.name}' is shared: it is called in segments "
                f"{sorted(segments)}, but its weights can live in one place only. Move the cuts "
                "so that every call of a shared layer falls in the same segment."
            )

    plans = [SegmentPlan(index=i, nodes=[], inputs=[], outputs=[]) for i in range(last + 1)]
    for node in graph.layer_nodes:
        plans[segment_of[id(node)]].nodes.append(node)

    model_output_ids = {_tensor_key(t) for t in model.outputs}
    for plan in plans:
        own = {id(n) for n in plan.nodes}
        received: dict[int, Any] = {}
        for node in plan.nodes:
            for tensor in node.input_tensors:
                key = _tensor_key(tensor)
                if id(graph.producer[key]) not in own:
                    received.setdefault(key, tensor)
        plan.inputs = _ordered(graph, received.values(), model)
        if plan.index == last:
            plan.outputs = list(model.outputs)
            continue
        sent: dict[int, Any] = {}
        for node in plan.nodes:
            for tensor in node.outputs:
                key = _tensor_key(tensor)
                later = any(
                    segment_of[id(c)] > plan.index for c in graph.consumers.get(key, [])
                )
                if later or key in model_output_ids:
                    sent.setdefault(key, tensor)
        plan.outputs = _ordered(graph, sent.values(), model)
    return graph, plans


def _ordered(graph: ModelGraph, tensors: Any, model: keras.Model) -> list[Any]:
    """Model inputs first (in model order), then tensors in topological order."""
    position = {id(node): i for i, node in enumerate(graph.nodes)}
    model_inputs = [_tensor_key(t) for t in model.inputs]

    def key(tensor: Any) -> tuple[int, int, int]:
        tid = _tensor_key(tensor)
        if tid in model_inputs:
            return (0, model_inputs.index(tid), 0)
        return (1, position[id(graph.producer[tid])], tensor._keras_history.tensor_index)

    return sorted(tensors, key=key)
