"""The TF.js exporter's layer rules and the translation of one Keras 3 layer, operation or
input config into what TF.js 4.22 (or the device runtime's class) reads.

Every config key of every supported layer is translated, checked against the only value TF.js
honours, or dropped because it cannot change a result; what becomes what is read from
`mobile_export/src/layers/table.json` (`converters.tfjs_table`). Used by `converters.tfjs_config`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from splitkeras.errors import ExportError

from .tfjs_table import TABLE

# Keras 3 activation name -> the name written for TF.js 4.22 (both compute the same function).
_ACTIVATIONS: dict[str, str] = {name: entry["tfjs"] for name, entry in TABLE["activations"].items()}
_REFUSED: dict[str, str] = dict(TABLE["refused_layers"])
_OPERATIONS: dict[str, dict[str, Any]] = dict(TABLE["operations"])
_LAYERS: dict[str, dict[str, Any]] = dict(TABLE["layers"])


@dataclass(frozen=True)
class _Need:
    """The only value(s) of a setting TF.js honours; `why` explains, `fix` replaces the advice.

    With `custom=True` another value is no refusal: the layer is written as the runtime's own
    class (`table.json` "custom"), which takes the setting as it is."""

    value: Any
    why: str = ""
    fix: str = ""
    any_of: bool = False  # value is a tuple of accepted values
    custom: bool = False


# check(where, layer, config) -> True when the runtime's own class is needed (raises to refuse)
_Check = Callable[[str, Any, dict[str, Any]], bool]
# extra(layer, config, out, custom) -> the config written (out, changed or completed)
_Extra = Callable[[Any, dict[str, Any], dict[str, Any], bool], dict[str, Any]]


@dataclass(frozen=True)
class _Rule:
    """How one Keras layer class maps onto its TF.js twin (or the runtime's class)."""

    keep: tuple[str, ...] = ()  # passed through unchanged (TF.js camel-cases the key)
    rename: dict[str, str] = field(default_factory=dict)  # Keras key -> TF.js key
    require: dict[str, Any] = field(default_factory=dict)  # key -> needed value or _Need
    activations: tuple[str, ...] = ()
    regularizers: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()  # keys that cannot change a result in TF.js
    weights: dict[str, str] = field(default_factory=dict)  # Keras weight name -> TF.js name
    check: _Check | None = None
    extra: _Extra | None = None


def _w(*names: str, **renamed: str) -> dict[str, str]:
    return {**{name: name for name in names}, **renamed}


_LAST = {"data_format": "channels_last"}
_NO_QUANTIZED = {"quantization_config": _Need(None, fix="export the float model, use quantization=")}


def _conv(*keep: str, rank: int = 2, regs: tuple[str, ...] = ("kernel_regularizer", "bias_regularizer"),
          weights: dict[str, str] | None = None, causal: bool = False, **require: Any) -> _Rule:
    padding = ("valid", "same", "causal") if causal else ("valid", "same")
    return _Rule(keep=("filters", "kernel_size", "strides", "use_bias", *keep), activations=("activation",),
                 require={**_LAST, "groups": _Need(1, custom=True),
                          "dilation_rate": _Need([1] * rank, custom=True),
                          "padding": _Need(("valid", "same"), any_of=True, custom=causal,
                                           fix=f"use padding={' or '.join(map(repr, padding))}"),
                          **require},
                 regularizers=regs, weights=weights or _w("kernel", "bias"))


def _check_rnn(where: str, layer: Any, config: dict[str, Any]) -> bool:
    # TF.js' RNN layers leave their cell's regularizers out of calculateLosses(); the runtime's count them
    return any(config.get(key) is not None for key in ("kernel_regularizer", "recurrent_regularizer",
                                                       "bias_regularizer"))


def _rnn(*keep: str, **require: Any) -> _Rule:
    return _Rule(keep=("units", "use_bias", "return_sequences", "return_state", "go_backwards", "unroll",
                       "dropout", "recurrent_dropout", *keep), check=_check_rnn,
                 require={"stateful": False, **require}, activations=("activation", "recurrent_activation"),
                 regularizers=("kernel_regularizer", "recurrent_regularizer", "bias_regularizer"),
                 drop=("seed", "zero_output_for_mask", "use_cudnn"),  # no masks: see Embedding
                 weights=_w("kernel", "recurrent_kernel", "bias"))


def _pool(*padding: str) -> _Rule:
    # average pooling 'same': TF.js counts the padding in the gradient; the runtime's class does not
    padding_need = _Need(padding, any_of=True, custom=True, fix="use padding='valid' or 'same'")
    return _Rule(keep=("pool_size", "strides"), require={**_LAST, "padding": padding_need})


def _input_rank(layer: Any) -> int | None:
    try:  # every call of a shared layer has the same rank
        return len(layer.input.shape)
    except (AttributeError, ValueError):
        return None


def _is_last_axis(layer: Any, axis: Any) -> bool:
    rank = _input_rank(layer)
    return axis == -1 or (rank is not None and axis == rank - 1)


def _check_last_axis(where: str, layer: Any, config: dict[str, Any]) -> bool:
    if not _is_last_axis(layer, config.get("axis")):
        raise ExportError(f"{where}: axis={config.get('axis')!r} is not supported: TF.js 4.22 only "
                          "handles the last axis here; use axis=-1")
    return False


def _check_batchnorm(where: str, layer: Any, config: dict[str, Any]) -> bool:
    # Keras 3 runs a frozen BatchNormalization in inference mode; TF.js' own layer uses batch
    # statistics whenever the device trains, and computes a wrong result on another axis.
    return not config.get("trainable", True) or not _is_last_axis(layer, config.get("axis"))


def _check_rescaling(where: str, layer: Any, config: dict[str, Any]) -> bool:
    custom = False
    for key in ("scale", "offset"):
        value = config[key]
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in value):
            custom = True  # one value per channel (the last axis)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ExportError(f"{where}: {key}={value!r} is not supported: the device takes one number or "
                              f"a flat list with one number per channel; rebuild the layer with such a {key}")
    return custom


def _normalization_extra(layer: Any, config: dict[str, Any], out: dict[str, Any], custom: bool) -> dict[str, Any]:
    """Axes kept (positive), the broadcast shape, and Keras' constants already broadcast."""
    rank = _input_rank(layer)
    if rank is None or getattr(layer, "mean", None) is None:
        raise ExportError(f"layer '{layer.name}' (Normalization) is not built; call it on an input or adapt() it")
    axis = config["axis"] if isinstance(config["axis"], list) else [config["axis"]]
    keep = sorted(a % rank for a in axis)
    shape = [int(s) for s in np.shape(keras.ops.convert_to_numpy(layer.mean))]
    out.update(axis=keep, invert=bool(config["invert"]), broadcast_shape=shape)
    if config.get("mean") is None:  # adapted: the weights mean/variance, reshaped on the device
        stale = [name for name, constant, weight in (("mean", layer.mean, layer.adapt_mean),
                                                     ("variance", layer.variance, layer.adapt_variance))
                 if not np.array_equal(np.ravel(keras.ops.convert_to_numpy(constant)),
                                       np.ravel(keras.ops.convert_to_numpy(weight)))]
        if stale:
            raise ExportError(f"layer '{layer.name}' (Normalization): its {' and '.join(stale)} weights were "
                              "changed after the layer computed its constants, so Keras still normalizes with "
                              "the old values; call layer.finalize_state() (Keras does it after adapt() and "
                              "when loading a model)")
        out.update(mean=None, variance=None)
    else:
        out.update(mean=keras.ops.convert_to_numpy(layer.mean).astype(float).tolist(),
                   variance=keras.ops.convert_to_numpy(layer.variance).astype(float).tolist())
    return out


def _stochastic_depth_extra(layer: Any, config: dict[str, Any], out: dict[str, Any],
                            custom: bool) -> dict[str, Any]:
    rank = _input_rank(layer)
    if rank is None:
        raise ExportError(f"layer '{layer.name}' (StochasticDepth) is not built")
    return {**out, "rate": float(config["drop_path_rate"]), "noise_shape": [None] + [1] * (rank - 1)}


def _set(**values: Any) -> _Extra:
    return lambda layer, config, out, custom: {**out, **values}


_NORM_REGS = ("beta_regularizer", "gamma_regularizer")
_NO_NOISE_SHAPE = {"noise_shape": None}
_MERGE = _Rule()
_RULES: dict[str, _Rule] = {
    "Dense": _Rule(keep=("units", "use_bias"), activations=("activation",), require=_NO_QUANTIZED,
                   regularizers=("kernel_regularizer", "bias_regularizer"), weights=_w("kernel", "bias")),
    "Conv1D": _conv(rank=1, causal=True), "Conv2D": _conv(),
    "Conv2DTranspose": _Rule(keep=("filters", "kernel_size", "strides", "use_bias"), activations=("activation",),
                             require={**_LAST, "output_padding": None, "padding": _Need(
                                 ("valid", "same"), any_of=True, fix="use padding='valid' or 'same'"),
                                      "dilation_rate": _Need([1, 1], "TF.js 4.22 cannot compute gradients "
                                                                     "through dilated transposed convolutions")},
                             regularizers=("kernel_regularizer", "bias_regularizer"), weights=_w("kernel", "bias")),
    "SeparableConv2D": _conv("depth_multiplier", regs=("depthwise_regularizer", "pointwise_regularizer",
                                                       "bias_regularizer"),
                             weights=_w("depthwise_kernel", "pointwise_kernel", "bias")),
    "DepthwiseConv2D": _Rule(keep=("kernel_size", "strides", "padding", "use_bias", "depth_multiplier"),
                             require={**_LAST, "dilation_rate": _Need([1, 1], custom=True)},
                             activations=("activation",), weights=_w("bias", kernel="depthwise_kernel"),
                             regularizers=("depthwise_regularizer", "bias_regularizer")),
    "Cropping2D": _Rule(keep=("cropping",), require=_LAST),
    "ZeroPadding2D": _Rule(keep=("padding",), require=_LAST),
    "MaxPooling1D": _pool("valid", "same"), "MaxPooling2D": _pool("valid", "same"),
    "AveragePooling1D": _pool("valid"), "AveragePooling2D": _pool("valid"),
    **{name: _Rule(require={**_LAST, "keepdims": _Need(False, custom=True)})
       for name in ("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D",
                    "GlobalMaxPooling2D")},
    "BatchNormalization": _Rule(
        keep=("axis", "momentum", "epsilon"), regularizers=_NORM_REGS, check=_check_batchnorm,
        require={"center": _Need(True, custom=True), "scale": _Need(True, custom=True), "synchronized": False,
                 "renorm": False},
        drop=("renorm_clipping", "renorm_momentum"),  # unused while renorm=False
        weights=_w("gamma", "beta", "moving_mean", "moving_variance")),
    "LayerNormalization": _Rule(
        keep=("axis", "epsilon"), regularizers=_NORM_REGS, weights=_w("gamma", "beta"),
        require={"rms_scaling": False, "center": _Need(True, "TF.js 4.22 fails to train it without beta"),
                 "scale": _Need(True, "TF.js 4.22 fails to train it without gamma")}),
    "Normalization": _Rule(keep=("axis", "invert", "mean", "variance"), extra=_normalization_extra,
                           weights=_w("mean", "variance", "count")),
    "ReLU": _Rule(keep=("max_value",), require={
        "negative_slope": _Need(0.0, fix="use LeakyReLU, or ReLU with negative_slope=0"), "threshold": 0.0}),
    "LeakyReLU": _Rule(rename={"negative_slope": "alpha"}),
    "PReLU": _Rule(keep=("shared_axes",), regularizers=("alpha_regularizer",), weights=_w("alpha")),
    "ELU": _Rule(require={"alpha": _Need(1.0, custom=True)}),
    "Softmax": _Rule(keep=("axis",), check=_check_last_axis),
    "Activation": _Rule(activations=("activation",)),
    "Identity": _Rule(extra=_set(activation="linear")),
    "Dropout": _Rule(keep=("rate", "noise_shape"), drop=("seed",)),
    "SpatialDropout1D": _Rule(keep=("rate",), drop=("seed",)),
    "GaussianNoise": _Rule(keep=("stddev",), drop=("seed",)),
    "GaussianDropout": _Rule(keep=("rate",), drop=("seed",)),
    "AlphaDropout": _Rule(keep=("rate",), drop=("seed",), require=_NO_NOISE_SHAPE),
    "StochasticDepth": _Rule(drop=("drop_path_rate",), extra=_stochastic_depth_extra),
    "Flatten": _Rule(require=_LAST),
    "Reshape": _Rule(keep=("target_shape",)),
    "Permute": _Rule(keep=("dims",)),
    "RepeatVector": _Rule(keep=("n",)),
    "UpSampling2D": _Rule(keep=("size",), require={**_LAST, "interpolation": _Need(
        ("nearest", "bilinear"), any_of=True, fix="use interpolation='nearest' or 'bilinear'")}),
    "Add": _MERGE, "Multiply": _MERGE, "Average": _MERGE, "Maximum": _MERGE, "Minimum": _MERGE,
    "Subtract": _Rule(extra=_set(op="subtract", operands=[None, None])),
    "Concatenate": _Rule(keep=("axis",)),  # Keras takes one integer axis
    "Dot": _Rule(keep=("axes", "normalize")),
    "Embedding": _Rule(keep=("input_dim", "output_dim"), regularizers=("embeddings_regularizer",),
                       require={"mask_zero": _Need(False, "masks are not exported"), **_NO_QUANTIZED},
                       weights=_w("embeddings")),
    "LSTM": _rnn("unit_forget_bias"), "SimpleRNN": _rnn(),
    "GRU": _rnn(reset_after=_Need(False, custom=True)),  # the runtime's class takes reset_after as it is
    "Rescaling": _Rule(keep=("scale", "offset"), check=_check_rescaling),
    "LayerScale": _Rule(keep=("init_values", "projection_dim"), weights=_w("gamma", variable="gamma")),
    "CustomScaleLayer": _Rule(keep=("scale",)),
}
SUPPORTED_LAYERS: frozenset[str] = frozenset(_LAYERS) | {"InputLayer"}
"""Keras layer class names the TF.js exporter accepts (each has a numeric test in real TF.js),
read from `mobile_export/src/layers/table.json`."""


def _where(name: str, op: Any) -> str:
    return f"layer '{name}' ({type(op).__name__})"


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so configs compare and serialize alike."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def _is_operation(op: Any) -> bool:
    return not isinstance(op, keras.layers.Layer)


def _table_entry(op: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(Keras class name, table entry) of a layer, or ExportError."""
    name = type(op).__name__
    if name in _REFUSED and getattr(keras.layers, name, None) is type(op):
        raise ExportError(f"{where}: {_REFUSED[name]}")
    entry = _LAYERS.get(name)
    module = entry.get("module", "keras.layers") if entry else None
    known = entry is not None and (getattr(keras.layers, name, None) is type(op) if module == "keras.layers"
                                   else type(op).__module__ == module)
    if entry is None or not known or name not in _RULES:
        raise ExportError(f"{where}: this layer type is not supported by the TF.js exporter "
                          "(custom layers and layers TF.js 4.22 lacks are refused); use layers from "
                          "converters.SUPPORTED_LAYERS")
    return name, entry


def _rule_for(op: Any, where: str) -> _Rule:
    return _RULES[_table_entry(op, where)[0]]


def _activation(key: str, value: Any) -> str:
    if isinstance(value, str) and value in _ACTIVATIONS:
        return _ACTIVATIONS[value]
    if not isinstance(value, str):
        setting, reason = f"{key}=<custom function>", "TF.js cannot run Python functions"
    else:
        setting, reason = f"{key}={value!r}", "the device runtime has no such activation"
    raise ExportError(f"{setting} is not supported: {reason}; use one of {sorted(_ACTIVATIONS)}")


def _regularizer(key: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    name = value.get("class_name") if isinstance(value, dict) else None
    settings = value.get("config") or {} if isinstance(value, dict) else {}
    if name in ("L1", "L2", "L1L2") and value.get("module") == "keras.regularizers":
        l1, l2 = float(settings.get("l1", 0.0)), float(settings.get("l2", 0.0))
        return {"class_name": "L1L2", "config": {"l1": l1, "l2": l2}}
    raise ExportError(f"{key}={name or value!r} is not supported by TensorFlow.js; "
                      "use keras.regularizers.L1, L2 or L1L2, or no regularizer")


def _translate_layer(op: Any, where: str, config: dict[str, Any],
                     trainable: bool) -> tuple[str, dict[str, Any]]:
    """(TF.js class name, TF.js config) of one layer; ExportError naming every setting that blocks it."""
    name, entry = _table_entry(op, where)
    rule = _RULES[name]
    config = _plain(config)
    config["trainable"] = trainable
    out: dict[str, Any] = {}
    problems: list[str] = []
    custom = False
    for key, value in config.items():
        try:
            if key in ("name", "trainable"):
                out[key] = value
            elif key == "dtype":
                policy = value.get("config", {}).get("name") if isinstance(value, dict) else value
                if policy != "float32":
                    raise ExportError(f"dtype policy {policy!r} is not supported: TF.js layers compute in "
                                      "float32; rebuild the layer with dtype='float32'")
            elif key.endswith("_initializer"):
                pass  # only used to create weights; the bundle carries the weights
            elif key.endswith("_constraint") or key == "activity_regularizer":
                if value is not None:
                    raise ExportError(f"{key} is set; TF.js 4.22 skips weight constraints in optimizer updates "
                                      "and throws on activity regularizers, so device training would differ; "
                                      f"rebuild the layer with {key}=None")
            elif key in rule.keep:
                out[key] = value
            elif key in rule.rename:
                out[rule.rename[key]] = value
            elif key in rule.activations:
                out[key] = _activation(key, value)
            elif key in rule.regularizers:
                out[key] = _regularizer(key, value)
            elif key in rule.require:
                need = rule.require[key] if isinstance(rule.require[key], _Need) else _Need(rule.require[key])
                if not (value in need.value if need.any_of else value == need.value):
                    if not (need.custom and entry.get("custom")):
                        fix = need.fix or f"rebuild the layer with {key}={need.value!r}"
                        raise ExportError(f"{key}={value!r} is not supported by TensorFlow.js; {fix}"
                                          + (f" ({need.why})" if need.why else ""))
                    custom = True
                out[key] = value
            elif key not in rule.drop:
                raise ExportError(f"setting {key}={value!r} is unknown to the TF.js exporter (new in this "
                                  "Keras version?); TF.js would ignore it silently, so the export stops; "
                                  "please report it")
        except ExportError as error:
            problems.append(str(error))
    if not problems and rule.check is not None:
        try:
            custom = rule.check(where, op, config) or custom
        except ExportError as error:
            problems.append(str(error).removeprefix(f"{where}: "))
    if problems:
        raise ExportError(f"{where}: " + "; also ".join(problems))
    custom = custom or "tfjs" not in entry
    if rule.extra is not None:
        out = rule.extra(op, config, out, custom)
    return (entry["custom"] if custom else entry["tfjs"]), out


def _translate_operation(op: Any, where: str, config: dict[str, Any], operands: list[Any]) -> dict[str, Any]:
    name = type(op).__name__
    entry = _OPERATIONS.get(name)
    if entry is None or type(op).__module__ != entry["module"]:
        raise ExportError(f"{where}: the operation keras.ops.{_snake(name)} is not supported by the device "
                          f"runtime; supported: {', '.join(sorted(_snake(n) for n in _OPERATIONS))}")
    allowed = ("name", *entry.get("keys", ()))
    unknown = {key: value for key, value in _plain(config).items() if key not in allowed}
    if unknown:
        raise ExportError(f"{where}: setting(s) {unknown} of this operation are unknown to the TF.js exporter")
    if config.get("initial") is not None:
        raise ExportError(f"{where}: initial={config['initial']!r} is not supported; use initial=None")
    if len(operands) != entry["arity"]:
        raise ExportError(f"{where}: the operation takes {len(operands)} arguments, the device runtime "
                          f"replays it with {entry['arity']}")
    out = {"name": config["name"], "trainable": True, "op": entry["op"], "operands": operands}
    out.update({key: _plain(config[key]) for key in entry.get("keys", ()) if key != "initial" and key in config})
    return out


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _translate_input(where: str, config: dict[str, Any], name: str) -> dict[str, Any]:
    for flag in ("sparse", "ragged", "optional"):
        if config.get(flag):
            raise ExportError(f"{where}: {flag}=True inputs are not supported by TensorFlow.js; "
                              f"use a dense input ({flag}=False)")
    dtype = str(config.get("dtype", "float32"))
    if not dtype.startswith(("float", "bfloat", "int", "uint")):
        raise ExportError(f"{where}: input dtype {dtype!r} is not supported by TensorFlow.js; "
                          "use a float or integer input")
    if "batch_shape" not in config:
        raise ExportError(f"{where}: the input has no batch_shape; build the model from keras.Input")
    return {"batch_input_shape": _plain(config["batch_shape"]), "sparse": False, "name": name,
            "dtype": "int32" if dtype.startswith(("int", "uint")) else "float32"}
