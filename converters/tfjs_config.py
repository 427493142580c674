"""Keras 3 model config -> TensorFlow.js 4.22 layers-model topology.

TF.js reads Keras 2 style configs and silently ignores keys it does not know, so a renamed
argument is a wrong number on the device, not a load error. Hence an allow-list: every config
key of every supported layer is translated, checked against the only value TF.js honours, or
dropped because it cannot change a result (initializers: the bundle carries the weights).
Anything else, and anything TF.js computes or trains differently (each found by a numeric
test in real TF.js), stops the export with an `ExportError` naming layer, setting and fix.

Example::

    >>> from converters.tfjs_config import check_tfjs_supported
    >>> check_tfjs_supported(model)  # raises ExportError for what TF.js would misread
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras

from splitkeras.errors import ExportError

__all__ = ["SUPPORTED_LAYERS", "check_tfjs_supported", "tfjs_model_topology", "tfjs_named_weights"]

_TFJS_NAME = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9._/]*$")  # tfjs-layers common.ts isValidTensorName
# Keras 3 activation name -> TF.js 4.22 activation name (both compute the same function).
_ACTIVATIONS = {name: name for name in ("linear", "relu", "relu6", "elu", "selu", "sigmoid", "tanh",
                                        "softmax", "log_softmax", "softplus", "softsign", "swish",
                                        "mish", "gelu")} | {"silu": "swish"}
_ACTIVATION_TRAPS = {"hard_sigmoid": "TF.js computes 0.2*x+0.5 where Keras 3 computes relu6(x+3)/6"}


@dataclass(frozen=True)
class _Need:
    """The only value(s) of a setting TF.js honours; `why` explains, `fix` replaces the advice."""

    value: Any
    why: str = ""
    fix: str = ""
    any_of: bool = False  # value is a tuple of accepted values


@dataclass(frozen=True)
class _Rule:
    """How one Keras layer class maps onto its TF.js twin."""

    keep: tuple[str, ...] = ()  # passed through unchanged (TF.js camel-cases the key)
    rename: dict[str, str] = field(default_factory=dict)  # Keras key -> TF.js key
    require: dict[str, Any] = field(default_factory=dict)  # key -> needed value or _Need
    activations: tuple[str, ...] = ()
    regularizers: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()  # keys that cannot change a result in TF.js
    weights: dict[str, str] = field(default_factory=dict)  # Keras weight name -> TF.js name
    check: Callable[[str, keras.layers.Layer, dict[str, Any]], None] | None = None


def _w(*names: str, **renamed: str) -> dict[str, str]:
    return {**{name: name for name in names}, **renamed}


_LAST = {"data_format": "channels_last"}
_NO_DILATION = "TF.js 4.22 cannot compute gradients through dilated convolutions"
_NO_QUANTIZED = {"quantization_config": _Need(None, fix="export the float model, use quantization=")}


def _conv(*keep: str, rank: int = 2, regs: tuple[str, ...] = ("kernel_regularizer", "bias_regularizer"),
          weights: dict[str, str] | None = None, **require: Any) -> _Rule:
    return _Rule(keep=("filters", "kernel_size", "strides", "use_bias", *keep), activations=("activation",),
                 require={**_LAST, "groups": _Need(1, "TF.js has no grouped convolution"),
                          "dilation_rate": _Need([1] * rank, _NO_DILATION),
                          "padding": _Need(("valid", "same"), any_of=True,
                                           fix="use padding='valid' or 'same'"),
                          **require},
                 regularizers=regs, weights=weights or _w("kernel", "bias"))


def _rnn(*keep: str, **require: Any) -> _Rule:
    return _Rule(keep=("units", "use_bias", "return_sequences", "return_state", "go_backwards", "unroll",
                       "dropout", "recurrent_dropout", *keep),
                 require={"stateful": False, **require}, activations=("activation", "recurrent_activation"),
                 regularizers=("kernel_regularizer", "recurrent_regularizer", "bias_regularizer"),
                 drop=("seed", "zero_output_for_mask", "use_cudnn"),  # no masks: see Embedding
                 weights=_w("kernel", "recurrent_kernel", "bias"))


def _pool(*padding: str) -> _Rule:
    why = "" if "same" in padding else "TF.js 4.22 counts the padding in the gradient of average pooling"
    padding_need = _Need(padding, why, "use padding='valid'", any_of=True)
    return _Rule(keep=("pool_size", "strides"), require={**_LAST, "padding": padding_need})


def _check_last_axis(where: str, layer: keras.layers.Layer, config: dict[str, Any]) -> None:
    try:  # every call of a shared layer has the same rank
        last = len(layer.input.shape) - 1
    except (AttributeError, ValueError):
        last = -1
    if config.get("axis") not in (-1, last):
        raise ExportError(f"{where}: axis={config.get('axis')!r} is not supported: TF.js 4.22 only "
                          "handles the last axis here; use axis=-1")


def _check_batchnorm(where: str, layer: keras.layers.Layer, config: dict[str, Any]) -> None:
    if not layer.trainable:
        raise ExportError(
            f"{where}: trainable=False is not supported: Keras 3 runs a frozen BatchNormalization in "
            "inference mode, TF.js runs it with batch statistics and updates its moving statistics "
            "whenever the device trains (model.apply(x, {training: true})); keep the layer trainable, "
            "or keep it out of the segments that train on the device")
    _check_last_axis(where, layer, config)


def _check_rescaling(where: str, layer: keras.layers.Layer, config: dict[str, Any]) -> None:
    for key in ("scale", "offset"):
        if isinstance(config[key], bool) or not isinstance(config[key], (int, float)):
            raise ExportError(f"{where}: {key}={config[key]!r} is not supported by TensorFlow.js, which "
                              f"takes one number; rebuild the layer with a scalar {key}")


# Layers TF.js 4.22 lacks or gets wrong, with the reason and a way out.
_REFUSED = {
    "Lambda": "Lambda layers run Python code that TensorFlow.js cannot run; replace it with built-in layers",
    "Subtract": "TensorFlow.js 4.22 has no Subtract layer; compute a - b as Add()([a, Rescaling(-1.0)(b)])",
    "UpSampling2D": "TF.js 4.22 computes its gradient wrongly for batches of more than one sample "
                    "(ResizeNearestNeighborGrad mixes the samples), so device training would be wrong; "
                    "use Conv2DTranspose(strides=size)",
    "Masking": "masks are not exported; remove the Masking layer (pad with values the model can ignore)",
}
_NORM_REGS = ("beta_regularizer", "gamma_regularizer")
_NO_NOISE_SHAPE = {"noise_shape": None}
_MERGE = _Rule()
_RULES: dict[str, _Rule] = {
    "Dense": _Rule(keep=("units", "use_bias"), activations=("activation",), require=_NO_QUANTIZED,
                   regularizers=("kernel_regularizer", "bias_regularizer"), weights=_w("kernel", "bias")),
    "Conv1D": _conv(rank=1), "Conv2D": _conv(), "Conv2DTranspose": _conv(output_padding=None),
    "SeparableConv2D": _conv("depth_multiplier", regs=("depthwise_regularizer", "pointwise_regularizer",
                                                       "bias_regularizer"),
                             weights=_w("depthwise_kernel", "pointwise_kernel", "bias")),
    "DepthwiseConv2D": _Rule(keep=("kernel_size", "strides", "padding", "use_bias", "depth_multiplier"),
                             require={**_LAST, "dilation_rate": _Need([1, 1], _NO_DILATION)},
                             activations=("activation",), weights=_w("bias", kernel="depthwise_kernel"),
                             regularizers=("depthwise_regularizer", "bias_regularizer")),
    "Cropping2D": _Rule(keep=("cropping",), require=_LAST),
    "ZeroPadding2D": _Rule(keep=("padding",), require=_LAST),
    "MaxPooling1D": _pool("valid", "same"), "MaxPooling2D": _pool("valid", "same"),
    "AveragePooling1D": _pool("valid"), "AveragePooling2D": _pool("valid"),
    **{name: _Rule(require={**_LAST, "keepdims": _Need(False, fix="rebuild the layer with keepdims=False "
                                                                  "and add a Reshape after it")})
       for name in ("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D",
                    "GlobalMaxPooling2D")},
    "BatchNormalization": _Rule(
        keep=("axis", "momentum", "epsilon"), regularizers=_NORM_REGS, check=_check_batchnorm,
        require={"center": _Need(True, "TF.js cannot train without beta"),
                 "scale": _Need(True, "TF.js cannot train without gamma"), "synchronized": False,
                 "renorm": False},
        drop=("renorm_clipping", "renorm_momentum"),  # unused while renorm=False
        weights=_w("gamma", "beta", "moving_mean", "moving_variance")),
    "LayerNormalization": _Rule(
        keep=("axis", "epsilon"), regularizers=_NORM_REGS, weights=_w("gamma", "beta"),
        require={"rms_scaling": False, "center": _Need(True, "TF.js 4.22 fails to train it without beta"),
                 "scale": _Need(True, "TF.js 4.22 fails to train it without gamma")}),
    "ReLU": _Rule(keep=("max_value",), require={
        "negative_slope": _Need(0.0, fix="use LeakyReLU, or ReLU with negative_slope=0"), "threshold": 0.0}),
    "LeakyReLU": _Rule(rename={"negative_slope": "alpha"}),
    "PReLU": _Rule(keep=("shared_axes",), regularizers=("alpha_regularizer",), weights=_w("alpha")),
    "ELU": _Rule(require={"alpha": _Need(1.0, "TF.js 4.22 throws 'Non-default alpha value is not "
                                              "supported by the ELU layer yet'")}),
    "Softmax": _Rule(keep=("axis",), check=_check_last_axis),
    "Activation": _Rule(activations=("activation",)),
    "Dropout": _Rule(keep=("rate",), drop=("seed",), require=_NO_NOISE_SHAPE),
    "SpatialDropout1D": _Rule(keep=("rate",), drop=("seed",)),
    "GaussianNoise": _Rule(keep=("stddev",), drop=("seed",)),
    "GaussianDropout": _Rule(keep=("rate",), drop=("seed",)),
    "AlphaDropout": _Rule(keep=("rate",), drop=("seed",), require=_NO_NOISE_SHAPE),
    "Flatten": _Rule(require=_LAST),
    "Reshape": _Rule(keep=("target_shape",)),
    "Permute": _Rule(keep=("dims",)),
    "RepeatVector": _Rule(keep=("n",)),
    "Add": _MERGE, "Multiply": _MERGE, "Average": _MERGE, "Maximum": _MERGE, "Minimum": _MERGE,
    "Concatenate": _Rule(keep=("axis",)),  # Keras takes one integer axis
    "Dot": _Rule(keep=("axes", "normalize")),
    "Embedding": _Rule(keep=("input_dim", "output_dim"), regularizers=("embeddings_regularizer",),
                       require={"mask_zero": _Need(False, "masks are not exported"), **_NO_QUANTIZED},
                       weights=_w("embeddings")),
    "LSTM": _rnn("unit_forget_bias"), "GRU": _rnn(reset_after=False), "SimpleRNN": _rnn(),
    "Rescaling": _Rule(keep=("scale", "offset"), check=_check_rescaling),
}
SUPPORTED_LAYERS: frozenset[str] = frozenset(_RULES) | {"InputLayer"}
"""Keras layer class names the TF.js exporter accepts (each has a numeric test in real TF.js)."""


def _where(layer: keras.layers.Layer) -> str:
    return f"layer '{layer.name}' ({type(layer).__name__})"


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so configs compare and serialize alike."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def _rule_for(layer: keras.layers.Layer) -> _Rule:
    name, where = type(layer).__name__, _where(layer)
    if isinstance(layer, keras.Model):
        raise ExportError(f"{where}: nested models are not supported by the TF.js exporter; "
                          "build the segment from the nested model's layers instead")
    if name in _REFUSED:
        raise ExportError(f"{where}: {_REFUSED[name]}")
    if name not in _RULES or getattr(keras.layers, name, None) is not type(layer):
        raise ExportError(f"{where}: this layer type is not supported by the TF.js exporter "
                          "(custom layers and layers TF.js 4.22 lacks are refused); use layers from "
                          "converters.SUPPORTED_LAYERS")
    return _RULES[name]


def _activation(where: str, key: str, value: Any) -> str:
    if isinstance(value, str) and value in _ACTIVATIONS:
        return _ACTIVATIONS[value]
    if not isinstance(value, str):
        setting, reason = f"{key}=<custom function>", "TF.js cannot run Python functions"
    else:
        setting = f"{key}={value!r}"
        reason = _ACTIVATION_TRAPS.get(value, "TensorFlow.js 4.22 has no such activation")
    raise ExportError(f"{where}: {setting} is not supported: {reason}; use one of "
                      f"{sorted(_ACTIVATIONS)}")


def _regularizer(where: str, key: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    name = value.get("class_name") if isinstance(value, dict) else None
    settings = value.get("config") or {} if isinstance(value, dict) else {}
    if name in ("L1", "L2", "L1L2") and value.get("module") == "keras.regularizers":
        l1, l2 = float(settings.get("l1", 0.0)), float(settings.get("l2", 0.0))
        return {"class_name": "L1L2", "config": {"l1": l1, "l2": l2}}
    raise ExportError(f"{where}: {key}={name or value!r} is not supported by TensorFlow.js; "
                      "use keras.regularizers.L1, L2 or L1L2, or no regularizer")


def _translate_config(layer: keras.layers.Layer, config: dict[str, Any]) -> dict[str, Any]:
    rule, where = _rule_for(layer), _where(layer)
    config = _plain(config)
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in ("name", "trainable"):
            out[key] = value
        elif key == "dtype":
            policy = value.get("config", {}).get("name") if isinstance(value, dict) else value
            if policy != "float32":
                raise ExportError(f"{where}: dtype policy {policy!r} is not supported: TF.js layers "
                                  "compute in float32; rebuild the layer with dtype='float32'")
        elif key.endswith("_initializer"):
            pass  # only used to create weights; the bundle carries the weights
        elif key.endswith("_constraint") or key == "activity_regularizer":
            if value is not None:
                raise ExportError(f"{where}: {key} is set; TF.js 4.22 skips weight constraints in "
                                  "optimizer updates and throws on activity regularizers, so device "
                                  f"training would differ; rebuild the layer with {key}=None")
        elif key in rule.keep:
            out[key] = value
        elif key in rule.rename:
            out[rule.rename[key]] = value
        elif key in rule.activations:
            out[key] = _activation(where, key, value)
        elif key in rule.regularizers:
            out[key] = _regularizer(where, key, value)
        elif key in rule.require:
            need = rule.require[key] if isinstance(rule.require[key], _Need) else _Need(rule.require[key])
            if not (value in need.value if need.any_of else value == need.value):
                fix = need.fix or f"rebuild the layer with {key}={need.value!r}"
                raise ExportError(f"{where}: {key}={value!r} is not supported by TensorFlow.js; {fix}"
                                  + (f" ({need.why})" if need.why else ""))
            out[key] = value
        elif key not in rule.drop:
            raise ExportError(f"{where}: setting {key}={value!r} is unknown to the TF.js exporter "
                              "(new in this Keras version?); TF.js would ignore it silently, so the "
                              "export stops; please report it")
    if rule.check is not None:
        rule.check(where, layer, config)
    return out


def _translate_input(layer: keras.layers.Layer, config: dict[str, Any]) -> dict[str, Any]:
    where = _where(layer)
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
    return {"batch_input_shape": _plain(config["batch_shape"]), "sparse": False, "name": config["name"],
            "dtype": "int32" if dtype.startswith(("int", "uint")) else "float32"}


def _translate_node(where: str, node: dict[str, Any]) -> list[list[Any]]:
    # Keras 3 records mask=None and training=<bool>; Keras overrides a recorded training flag with
    # the model-level one (fit/predict/model(x, training=...)), as TF.js does: both are dropped.
    kwargs = {key: value for key, value in (node.get("kwargs") or {}).items()
              if value is not None and key != "training"}
    if kwargs:
        raise ExportError(f"{where}: the layer is called with {', '.join(sorted(kwargs))}=...; TF.js "
                          "cannot replay call arguments other than the input tensors; call the layer "
                          "on tensors only")
    args = node["args"]
    tensors = args[0] if len(args) == 1 and isinstance(args[0], list) else args
    if len(args) != 1 or not all(isinstance(t, dict) and t.get("class_name") == "__keras_tensor__"
                                 for t in tensors):
        raise ExportError(f"{where}: the layer is called with arguments other than input tensors; "
                          "TF.js cannot replay them; call the layer on tensors only")
    return [[*t["config"]["keras_history"], {}] for t in tensors]


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


def tfjs_model_topology(model: keras.Model) -> dict[str, Any]:
    """The TF.js `modelTopology.model_config` of `model` (`{"class_name": "Model", ...}`), or ExportError."""
    model, config = _functional(model), None
    with contextlib.suppress(Exception):  # a subclassed model has no layer graph config
        config = _plain(model.get_config())
    if not isinstance(config, dict) or "layers" not in config:
        raise ExportError(f"model '{model.name}' is not a functional model; build it with "
                          "keras.Model(inputs, outputs)")
    by_name = {layer.name: layer for layer in model.layers}
    layers = []
    for entry in config["layers"]:
        layer = by_name[entry["name"]]
        if not _TFJS_NAME.match(layer.name):
            raise ExportError(f"{_where(layer)}: TF.js refuses the name {layer.name!r} (it takes letters, "
                              "digits and - _ . / only, starting with a letter or digit); rename the layer")
        if isinstance(layer, keras.layers.InputLayer):
            layers.append({"class_name": "InputLayer", "name": layer.name, "inbound_nodes": [],
                           "config": _translate_input(layer, entry["config"])})
            continue
        translated = _translate_config(layer, entry["config"])
        nodes = [_translate_node(_where(layer), node) for node in entry.get("inbound_nodes", [])]
        layers.append({"class_name": type(layer).__name__, "name": layer.name,
                       "config": translated, "inbound_nodes": nodes})
    return {
        "class_name": "Model",
        "config": {"name": config.get("name", model.name), "layers": layers,
                   "input_layers": _endpoints(config["input_layers"]),
                   "output_layers": _endpoints(config["output_layers"])},
    }


def tfjs_named_weights(model: keras.Model) -> list[tuple[str, Any]]:
    """`(TF.js weight name, Keras variable)` per weight, in `layer.weights` order: `("dense/kernel", v)`."""
    named: list[tuple[str, Any]] = []
    for layer in _functional(model).layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        rule = _rule_for(layer)
        for variable in layer.weights:
            if variable.name not in rule.weights:
                raise ExportError(f"{_where(layer)}: weight '{variable.name}' is unknown to the TF.js "
                                  f"exporter (expected {sorted(rule.weights)}); please report it")
            named.append((f"{layer.name}/{rule.weights[variable.name]}", variable))
    return named


def check_tfjs_supported(model: keras.Model) -> None:
    """Raise ExportError if TF.js 4.22 cannot run `model` exactly as Keras does.

    Checks every layer type, setting and weight; writes nothing.

    Example::

        >>> check_tfjs_supported(model)  # None, or
        ExportError: layer 'gru_1' (GRU): reset_after=True is not supported by TensorFlow.js; ...
    """
    tfjs_model_topology(model)
    tfjs_named_weights(model)
