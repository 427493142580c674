"""Nested models inlined: a Keras functional model (with `keras.applications` bases, Sequential
stems, models called twice) as ONE flat graph of layers and operations, named
`<nested model>/<layer>`, each call's inputs resolved to the flattened tensors. Used by
`converters.tfjs_config` and `converters.tfjs_bundle`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import keras
from keras.src.models.functional import Functional

from splitkeras.errors import ExportError

from .tfjs_rules import _is_operation, _plain, _where


def _constant(value: Any) -> bool:
    if isinstance(value, list):
        return all(_constant(item) for item in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensor_ref(arg: Any) -> tuple[str, int, int] | None:
    if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
        name, node, index = arg["config"]["keras_history"]
        return name, int(node), int(index)
    return None


def _node_refs(where: str, node: dict[str, Any], operation: bool) -> tuple[list[tuple[str, int, int]], list[Any]]:
    """The tensors a node reads and, for an operation, its operands (None where a tensor goes)."""
    # Keras 3 records mask=None and training=<bool>; Keras overrides a recorded training flag with
    # the model-level one (fit/predict/model(x, training=...)), as TF.js does: both are dropped.
    kwargs = {key: value for key, value in (node.get("kwargs") or {}).items()
              if value is not None and key != "training"}
    if kwargs:
        raise ExportError(f"{where}: the layer is called with {', '.join(sorted(kwargs))}=...; TF.js "
                          "cannot replay call arguments other than the input tensors; call the layer "
                          "on tensors only")
    args = _plain(node["args"])
    if operation:
        refs: list[tuple[str, int, int]] = []
        operands: list[Any] = []
        for arg in args:
            ref = _tensor_ref(arg)
            if ref is not None:
                refs.append(ref)
                operands.append(None)
            elif _constant(arg):
                operands.append(arg)
            elif (isinstance(arg, dict) and arg.get("class_name") in ("__numpy__", "__tensor__")
                  and str(arg["config"].get("dtype", "")).startswith(("float", "int", "uint"))
                  and _constant(arg["config"].get("value"))):
                operands.append(arg["config"]["value"])  # an array constant (np.array, a tensor)
            else:
                raise ExportError(f"{where}: an argument of this operation is neither a tensor nor a number "
                                  f"({str(arg)[:80]}); the device runtime replays tensors and numbers only")
        if not refs:
            raise ExportError(f"{where}: the operation reads no tensor; compute the constant in Python")
        return refs, operands
    tensors = args[0] if len(args) == 1 and isinstance(args[0], list) else args
    found = [_tensor_ref(t) for t in tensors]
    if len(args) != 1 or any(ref is None for ref in found):
        raise ExportError(f"{where}: the layer is called with arguments other than input tensors; "
                          "TF.js cannot replay them; call the layer on tensors only")
    return [ref for ref in found if ref is not None], []


def _endpoints(value: Any) -> list[list[Any]]:
    if isinstance(value, dict):
        raise ExportError("the model's inputs or outputs are a dict; TF.js needs a list; "
                          "rebuild the model with inputs=[...] and outputs=[...]")
    if value and isinstance(value[0], str):
        value = [value]
    return [list(item) for item in value]


def _functional(model: keras.Model) -> keras.Model:
    if isinstance(model, keras.Sequential):
        try:
            return keras.Model(model.inputs, model.outputs, name=model.name)
        except (AttributeError, ValueError) as error:
            raise ExportError(f"Sequential model '{model.name}' is not built ({error}); "
                              "start it with keras.Input(shape=...)") from error
    return model


def _model_config(model: keras.Model) -> dict[str, Any]:
    config = None
    with contextlib.suppress(Exception):  # a subclassed model has no layer graph config
        config = _plain(model.get_config())
    if not isinstance(config, dict) or "layers" not in config:
        raise ExportError(f"model '{model.name}' is not a functional model; build it with "
                          "keras.Model(inputs, outputs)")
    return config


Ref = tuple[str, int, int]  # (TF.js layer name, node index, tensor index)


@dataclass
class FlatLayer:
    """One layer of the exported (flattened) graph."""

    name: str  # TF.js layer name: `<nested model>/.../<layer>` inside nested models
    op: Any  # the Keras layer or operation (an InputLayer for the model's inputs)
    config: dict[str, Any]  # its Keras 3 config
    nodes: list[list[Ref]]  # the tensors each call reads, in TF.js names
    operands: list[Any]  # operations: the operand template (None where a tensor goes)
    trainable: bool  # effective: the layer's flag and those of the models around it
    problem: str | None = None  # why this layer's node cannot be replayed


@dataclass
class FlatModel:
    name: str
    layers: list[FlatLayer]
    inputs: list[Ref]
    outputs: list[Ref]


def _expand(model: keras.Model, prefix: str, calls: list[list[Ref]] | None, trainable: bool,
            out: list[FlatLayer]) -> list[list[Ref]]:
    """Append `model`'s layers, flattened, to `out`; returns each call's output tensors.

    `calls` holds, per call of a nested model, the tensors bound to its inputs (None at the
    top level, whose inputs stay InputLayers). Node `i` of an inner layer in call `j` of its
    model becomes node `j * n + i` of the flattened layer (`n`: its node count in the model)."""
    model = _functional(model)
    config = _model_config(model)
    ops = {op.name: op for op in model.operations}
    input_names = [item[0] for item in _endpoints(config["input_layers"])]
    count = 1 if calls is None else len(calls)
    kinds: dict[str, tuple[str, Any]] = {}

    def resolve(ref: tuple[str, int, int], call: int) -> Ref:
        name, node, index = ref
        kind, data = kinds[name]
        if kind == "input":
            return (prefix + name, 0, 0) if calls is None else calls[call][data]
        if kind == "model":
            return data[(call, node)][index]
        return prefix + name, call * data + node, index

    for entry in config["layers"]:
        name = entry["name"]
        op = ops[name]
        where = _where(prefix + name, op)
        if isinstance(op, keras.layers.InputLayer):
            kinds[name] = ("input", input_names.index(name))
            if calls is None:
                out.append(FlatLayer(prefix + name, op, entry["config"], [], [], True))
            continue
        problem = None
        try:
            parsed = [_node_refs(where, node, _is_operation(op)) for node in entry.get("inbound_nodes", [])]
        except ExportError as error:
            parsed, problem = [], str(error)
        if isinstance(op, keras.Model) and problem is None:
            inner = [[resolve(ref, call) for ref in refs] for call in range(count) for refs, _ in parsed]
            results = _expand(op, f"{prefix}{name}/", inner, trainable and op.trainable, out)
            kinds[name] = ("model", {(call, node): results[call * len(parsed) + node]
                                     for call in range(count) for node in range(len(parsed))})
            continue
        operands = parsed[0][1] if parsed else []
        if any(other[1] != operands for other in parsed[1:]):
            problem = f"{where}: the operation is called with different constants; the device replays one"
        nodes = [[resolve(ref, call) for ref in refs] for call in range(count) for refs, _ in parsed]
        layer_trainable = trainable and bool(getattr(op, "trainable", True))
        out.append(FlatLayer(prefix + name, op, entry.get("config", {}), nodes, operands, layer_trainable,
                             problem))
        kinds[name] = ("layer", len(parsed))
    # Keras numbers a nested Functional's calls from 1 in input_layers/output_layers (its node 0
    # links its own inputs to its outputs), from 0 in the inbound nodes of the layers it feeds.
    outputs = [(name, node - 1 if isinstance(ops[name], Functional) else node, index)
               for name, node, index in _endpoints(config["output_layers"])]
    return [[resolve(ref, call) for ref in outputs] for call in range(count)]


def flatten_model(model: keras.Model) -> FlatModel:
    """`model` as one graph: nested models' layers inlined, named `<nested model>/<layer>`."""
    model = _functional(model)
    config = _model_config(model)
    layers: list[FlatLayer] = []
    outputs = _expand(model, "", None, bool(model.trainable), layers)[0]
    inputs = [(item[0], 0, 0) for item in _endpoints(config["input_layers"])]
    names: dict[str, int] = {}
    seen: dict[int, str] = {}
    for layer in layers:
        names[layer.name] = names.get(layer.name, 0) + 1
        if isinstance(layer.op, keras.layers.Layer) and not isinstance(layer.op, keras.layers.InputLayer):
            if id(layer.op) in seen and seen[id(layer.op)] != layer.name:
                raise ExportError(f"layer '{layer.op.name}' is used both as '{seen[id(layer.op)]}' and as "
                                  f"'{layer.name}' (inside and outside a nested model); TF.js would train two "
                                  "copies; call it at one nesting level only")
            seen[id(layer.op)] = layer.name
    twice = sorted(name for name, n in names.items() if n > 1)
    if twice:
        raise ExportError(f"the flattened model has several layers named {twice}; rename them")
    return FlatModel(config.get("name", model.name), layers, inputs, outputs)
