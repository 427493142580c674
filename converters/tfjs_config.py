"""Keras 3 model config -> TensorFlow.js 4.22 layers-model topology.

TF.js reads Keras 2 style configs and silently ignores keys it does not know, so a renamed
argument is a wrong number on the device, not a load error. Hence an allow-list: every config
key of every supported layer is translated, checked against the only value TF.js honours, or
dropped because it cannot change a result (initializers: the bundle carries the weights).

Where TF.js 4.22 lacks a layer or a setting, or computes or trains it differently from Keras
(each found by a numeric test in real TF.js), the layer is written as a class of the device
runtime (`mobile_export/src/layers/`, registered with `tf.serialization.registerClass`), with
its settings as they are. What becomes what is listed in `mobile_export/src/layers/table.json`,
shared with the runtime (`converters.tfjs_table`). Anything else stops the export with an
`ExportError` naming every blocking layer, its setting and a fix.

Nested models (a `keras.applications` base inside a transfer-learning model, ConvNeXt's
Sequential stem) are flattened into the exported graph: their layers are named
`<nested model>/<layer>` (weights `<nested model>/<layer>/<weight>`).

Keras 3 records `keras.ops` calls (`x + 3.0`, `ops.multiply(a, b)`) in functional models as
operations; they are written as `SplitkerasOperation` layers, constants in their config.

Example::

    >>> from converters.tfjs_config import check_tfjs_supported
    >>> check_tfjs_supported(model)  # raises ExportError for what TF.js would misread

The rules and per-layer translation are in `converters.tfjs_rules`, the inlining of nested
models in `converters.tfjs_flatten`; this module puts them together.
"""

from __future__ import annotations

import re
from typing import Any

import keras

from splitkeras.errors import ExportError

from .tfjs_flatten import FlatLayer, FlatModel, flatten_model
from .tfjs_rules import (
    _RULES,
    SUPPORTED_LAYERS,
    _is_operation,
    _rule_for,
    _translate_input,
    _translate_layer,
    _translate_operation,
    _where,
)

__all__ = ["SUPPORTED_LAYERS", "check_tfjs_supported", "tfjs_model_topology", "tfjs_named_weights",
           "flatten_model", "FlatLayer", "FlatModel", "_RULES"]

_TFJS_NAME = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9._/]*$")  # tfjs-layers common.ts isValidTensorName


def _raise_all(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ExportError(problems[0])
    if problems:
        raise ExportError(f"{len(problems)} layers cannot be exported to TensorFlow.js:\n"
                          + "\n".join(f"  - {problem}" for problem in problems))


def tfjs_model_topology(model: keras.Model) -> dict[str, Any]:
    """The TF.js `modelTopology.model_config` of `model` (`{"class_name": "Model", ...}`), or an
    ExportError listing every layer that blocks the export."""
    flat = flatten_model(model)
    layers: list[dict[str, Any]] = []
    problems: list[str] = []
    for item in flat.layers:
        where = _where(item.name, item.op)
        try:
            if not _TFJS_NAME.match(item.name):
                raise ExportError(f"{where}: TF.js refuses the name {item.name!r} (it takes letters, digits "
                                  "and - _ . / only, starting with a letter or digit); rename the layer")
            if item.problem:
                raise ExportError(item.problem)
            if isinstance(item.op, keras.layers.InputLayer):
                layers.append({"class_name": "InputLayer", "name": item.name, "inbound_nodes": [],
                               "config": _translate_input(where, item.config, item.name)})
                continue
            if _is_operation(item.op):
                class_name = "SplitkerasOperation"
                translated = _translate_operation(item.op, where, item.config, item.operands)
            else:
                class_name, translated = _translate_layer(item.op, where, item.config, item.trainable)
            translated["name"] = item.name
            nodes = [[[*ref, {}] for ref in node] for node in item.nodes]
            layers.append({"class_name": class_name, "name": item.name, "config": translated,
                           "inbound_nodes": nodes})
        except ExportError as error:
            problems.append(str(error))
    _raise_all(problems)
    return {
        "class_name": "Model",
        "config": {"name": flat.name, "layers": layers, "input_layers": [list(ref) for ref in flat.inputs],
                   "output_layers": [list(ref) for ref in flat.outputs]},
    }


def tfjs_named_weights(model: keras.Model) -> list[tuple[str, Any]]:
    """`(TF.js weight name, Keras variable)` per weight, in `layer.weights` order: `("dense/kernel", v)`;
    inside a nested model `("base/conv1/kernel", v)`."""
    named: list[tuple[str, Any]] = []
    problems = []
    for item in flatten_model(model).layers:
        if _is_operation(item.op) or isinstance(item.op, keras.layers.InputLayer):
            continue
        where = _where(item.name, item.op)
        try:
            rule = _rule_for(item.op, where)
        except ExportError as error:
            problems.append(str(error))
            continue
        for variable in item.op.weights:
            # Keras names an unnamed weight 'variable', 'variable_1', ... (ConvNeXt's LayerScale)
            key = re.sub(r"^variable_\d+$", "variable", variable.name)
            if key not in rule.weights:
                problems.append(f"{where}: weight '{variable.name}' is unknown to the TF.js exporter "
                                f"(expected {sorted(rule.weights)}); please report it")
                continue
            named.append((f"{item.name}/{rule.weights[key]}", variable))
    _raise_all(problems)
    return named


def check_tfjs_supported(model: keras.Model) -> None:
    """Raise ExportError if the device runtime cannot run `model` exactly as Keras does.

    Checks every layer type, setting and weight, and lists every layer that blocks the
    export in one message; writes nothing.

    Example::

        >>> check_tfjs_supported(model)  # None, or
        ExportError: layer 'masking' (Masking): masks are not exported; ...
    """
    tfjs_model_topology(model)
    tfjs_named_weights(model)
