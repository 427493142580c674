"""Keras 3 -> TF.js export, checked in the real @tensorflow/tfjs 4.22 under Node.

Every supported layer type is exported with non-default settings, run by
`mobile_export/tools/tfjs_predict.mjs` (pure-JS CPU backend) and compared with
Keras: `model.predict`, and for deterministic models also the training forward
pass, the VJP (weight and input gradients of sum(output * g)) and the moving
statistics after that pass. All bundles of this module run in ONE node process
(node + tfjs start costs ~1 s). `pytest -s` prints the measured differences.

The layers TF.js lacks or trains wrongly are written as classes of the device runtime
(mobile_export/src/layers/, listed in its table.json); they are checked the same way, one case
per new setting (conv_dilated_grouped, pooling_settings, batchnorm_settings, normalization,
operations, nested_models, ...), and the table is checked against what the runtime registers.

Measured (TF 2.21, Keras 3.15.1, tfjs 4.22.0, outputs of order 1-30):
- predict max|TF.js - Keras| <= 1.9e-6 (merges; most layers 1e-7..1e-6);
  training outputs <= 1.9e-6; gradients <= 2.3e-6 relative to max(1, max|grad|).
- quantized bundles, max|TF.js - Keras float32| relative to max|output|:
  float16 2.1e-3 (abs 6.2e-3), uint16 1.4e-4 (abs 4.0e-4), uint8 1.8e-2 (abs 0.10
  on outputs up to 17.7). See converters/README.md.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers as L  # noqa: E402

from converters import SUPPORTED_LAYERS, check_tfjs_supported, export_tfjs, load_tfjs_weights  # noqa: E402
from converters.tfjs_bundle import read_bundle_weights  # noqa: E402
from converters.tfjs_config import _RULES, flatten_model, tfjs_model_topology, tfjs_named_weights  # noqa: E402
from converters.tfjs_table import TABLE  # noqa: E402
from splitkeras.errors import ExportError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MOBILE = REPO / "mobile_export"
TOOL = MOBILE / "tools" / "tfjs_predict.mjs"
TOLERANCE = 1e-5  # max |TF.js - Keras| on outputs of order 1
GRAD_TOLERANCE = 2e-5  # relative to max(1, max |gradient|)
LEARNING_RATE = 0.1


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    build: Callable[[], keras.Model]
    deterministic: bool = True  # training pass comparable (no random layers)
    int_high: int = 0  # > 0: integer inputs in [0, int_high)
    sgd_round_trip: bool = False  # node applies an SGD step, saves; Python reads it back
    tolerance: float = TOLERANCE
    requires: str | None = None  # a TensorFlow op probe (see PROBES) that must pass on this CPU


def _model(inputs: Any, outputs: Any, name: str) -> keras.Model:
    return keras.Model(inputs, outputs, name=name)


def _dense_activations() -> keras.Model:
    x = keras.Input((6,), name="x")
    names = ["linear", "relu", "relu6", "elu", "selu", "sigmoid", "tanh", "softmax", "log_softmax",
             "softplus", "softsign", "silu", "swish", "mish", "gelu"]
    return _model(x, [L.Dense(5, activation=a, name=f"dense_{a}")(x) for a in names], "activations")


def _conv2d() -> keras.Model:
    x = keras.Input((9, 8, 3))
    y = L.Conv2D(4, (3, 2), strides=(2, 1), padding="same", activation="relu")(x)
    y = L.Conv2D(3, (2, 3), strides=(1, 2), use_bias=False, kernel_regularizer=keras.regularizers.L2(0.01))(y)
    z = L.Conv2D(2, 1, padding="valid", activation="tanh")(x)
    return _model(x, [y, z], "conv2d")


def _conv1d() -> keras.Model:
    x = keras.Input((11, 3))
    a = L.Conv1D(4, 3, strides=2, padding="same", activation="relu")(x)
    b = L.Conv1D(3, 5, strides=3, padding="valid", activation="sigmoid")(x)
    c = L.Conv1D(2, 4, padding="valid", use_bias=False)(x)
    return _model(x, [a, b, c], "conv1d")


def _conv_transpose() -> keras.Model:
    x = keras.Input((5, 4, 3))
    y = L.Conv2DTranspose(3, 3, strides=2, padding="same", activation="relu")(x)
    y = L.Conv2DTranspose(2, (2, 3), strides=(1, 2), padding="valid", use_bias=False)(y)
    return _model(x, y, "conv_transpose")


def _depthwise_separable() -> keras.Model:
    """Runs on every CPU: equal strides (non-square kernels included)."""
    x = keras.Input((9, 9, 3))
    a = L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same", activation="relu")(x)
    b = L.DepthwiseConv2D((2, 3), use_bias=False)(x)
    c = L.SeparableConv2D(5, 3, depth_multiplier=2, strides=2, padding="same", activation="elu")(x)
    d = L.SeparableConv2D(3, (3, 2), use_bias=False)(x)
    return _model(x, [a, b, c, d], "depthwise_separable")


def _depthwise_unequal_strides() -> keras.Model:
    """Row and column strides differ: TensorFlow's own depthwise kernel without oneDNN
    refuses these ("only supports equal length strides"), so Keras cannot give a reference
    there; TF.js runs them."""
    x = keras.Input((9, 9, 3))
    b = L.DepthwiseConv2D((2, 3), strides=(1, 2), use_bias=False)(x)
    d = L.SeparableConv2D(3, (3, 2), strides=(2, 1), use_bias=False)(x)
    return _model(x, [b, d], "depthwise_unequal_strides")


def _batchnorm() -> keras.Model:
    x = keras.Input((6, 5, 4))
    y = L.BatchNormalization(momentum=0.8, epsilon=1e-2)(x)
    y = L.Conv2D(3, 2)(y)
    y = L.BatchNormalization(axis=3, momentum=0.5, center=True)(y)  # axis given as a number
    v = L.BatchNormalization(epsilon=0.1, gamma_regularizer=keras.regularizers.L1(0.02))(L.Flatten()(y))
    return _model(x, [y, v], "batchnorm")


def _layernorm() -> keras.Model:
    x = keras.Input((4, 6))
    a = L.LayerNormalization(epsilon=1e-4)(x)
    b = L.LayerNormalization(axis=[1, 2])(x)
    c = L.LayerNormalization(axis=1, epsilon=0.3)(x)
    return _model(x, [a, b, c], "layernorm")


def _activation_layers() -> keras.Model:
    x = keras.Input((3, 5))
    outs = [L.ReLU(max_value=0.6)(x), L.ReLU()(x), L.LeakyReLU(negative_slope=0.17)(x),
            L.PReLU(shared_axes=[1])(x), L.ELU()(x), L.Softmax(axis=2)(x),
            L.Activation("gelu")(x), L.Activation("silu")(x), L.Activation("softmax")(x)]
    return _model(x, outs, "activation_layers")


def _pooling() -> keras.Model:
    x = keras.Input((7, 9, 3))
    s = keras.Input((9, 4))
    outs = [L.MaxPooling2D((3, 2), strides=(2, 1), padding="same")(x),
            L.AveragePooling2D(2)(x), L.AveragePooling2D((3, 2), strides=(1, 2))(x),
            L.GlobalAveragePooling2D()(x), L.GlobalMaxPooling2D()(x),
            L.MaxPooling1D(3, strides=2, padding="same")(s), L.AveragePooling1D(2)(s),
            L.AveragePooling1D(3, strides=1)(s), L.GlobalAveragePooling1D()(s), L.GlobalMaxPooling1D()(s)]
    return _model([x, s], outs, "pooling")


def _shapes() -> keras.Model:
    x = keras.Input((4, 6))
    v = keras.Input((5,))
    outs = [L.Flatten()(x), L.Reshape((-1, 3))(x), L.Reshape((2, 2, 6))(x), L.Permute((2, 1))(x),
            L.RepeatVector(3)(v)]
    return _model([x, v], outs, "shapes")


def _padding_cropping() -> keras.Model:
    x = keras.Input((5, 6, 2))
    outs = [L.ZeroPadding2D(((1, 2), (0, 3)))(x), L.Cropping2D(((1, 0), (2, 1)))(x),
            L.Cropping2D(1)(x)]
    return _model(x, outs, "padding_cropping")


def _merges() -> keras.Model:
    a, b, c = keras.Input((4,), name="a"), keras.Input((4,), name="b"), keras.Input((3, 4), name="c")
    outs = [L.Add()([a, b]), L.Multiply()([a, b]), L.Average()([a, b]), L.Maximum()([a, b]),
            L.Minimum()([a, b]), L.Concatenate(axis=1)([c, c]), L.Concatenate()([a, b]),
            L.Dot(axes=1, normalize=True)([a, b]), L.Dot(axes=(2, 2))([c, c])]
    return _model([a, b, c], outs, "merges")


def _embedding() -> keras.Model:
    ids = keras.Input((5,), dtype="int32", name="ids")
    y = L.Embedding(20, 4, embeddings_regularizer=keras.regularizers.L2(0.001))(ids)
    return _model(ids, L.Dense(2)(L.Flatten()(y)), "embedding")


def _lstm() -> keras.Model:
    x = keras.Input((6, 3))
    y = L.LSTM(5, return_sequences=True, activation="relu", kernel_regularizer=keras.regularizers.L2(0.01))(x)
    y = L.LSTM(3, go_backwards=True, unit_forget_bias=False, recurrent_dropout=0.0)(y)
    seq, h, c = L.LSTM(2, return_sequences=True, return_state=True)(x)
    return _model(x, [y, seq, h, c], "lstm")


def _gru_rnn() -> keras.Model:
    x = keras.Input((6, 3))
    g = L.GRU(4, reset_after=False, return_sequences=True)(x)
    g = L.GRU(3, reset_after=False, activation="relu", go_backwards=True,
              kernel_regularizer=keras.regularizers.L2(0.02), bias_regularizer="l1")(g)  # the runtime's class
    r = L.SimpleRNN(4, activation="tanh", return_sequences=True, go_backwards=True,
                    recurrent_regularizer=keras.regularizers.L1L2(0.01, 0.02))(x)
    return _model(x, [g, L.SimpleRNN(2, use_bias=False)(r)], "gru_rnn")


def _rescaling() -> keras.Model:
    x = keras.Input((4, 4, 3))
    return _model(x, L.Rescaling(1 / 127.5, offset=-1.0)(L.Rescaling(255.0)(x)), "rescaling")


def _random_layers() -> keras.Model:
    x = keras.Input((6, 4))
    y = L.Dropout(0.3, seed=1)(x)
    y = L.SpatialDropout1D(0.2)(y)
    y = L.GaussianNoise(0.5)(y)
    y = L.GaussianDropout(0.2)(y)
    return _model(x, L.AlphaDropout(0.1)(L.Dense(3)(y)), "random_layers")


def _dropout_shapes() -> keras.Model:
    """Dropout with noise_shape (EfficientNet's stochastic depth) and ConvNeXt's StochasticDepth;
    run in training mode by TF.js, see test_dropout_noise_shapes_in_training."""
    from keras.src.applications.convnext import StochasticDepth

    x = keras.Input((4, 5, 3))
    outs = [L.Dropout(0.5, noise_shape=(None, 1, 1, 3))(x), L.Dropout(0.5, noise_shape=(None, 4, 1, 1))(x),
            L.Dropout(0.5, noise_shape=(None, 1, 1, 1), seed=3)(x), StochasticDepth(0.5)(x)]
    return _model(x, outs, "dropout_shapes")


def _segment() -> keras.Model:
    """A head-like segment: named inputs, a shared layer, merges, BN, two outputs."""
    image = keras.Input((8, 8, 2), name="image")
    extra = keras.Input((4,), name="extra")
    y = L.Conv2D(4, 3, padding="same", name="conv")(image)
    y = L.BatchNormalization(name="bn")(y)
    y = L.ReLU(name="relu")(y)
    y = L.MaxPooling2D(name="pool")(y)
    y = L.Flatten(name="flat")(y)
    shared = L.Dense(4, activation="tanh", name="shared")
    merged = L.Concatenate(name="concat")([shared(L.Dense(4, name="proj")(y)), shared(extra)])
    frozen = L.Dense(3, name="frozen", trainable=False)
    return _model([image, extra], [L.Dense(3, name="out")(merged), frozen(extra)], "segment")


def _sequential() -> keras.Model:
    return keras.Sequential([keras.Input((5,)), L.Dense(4, activation="relu"), L.Dense(2)], name="seq")


def _no_weights() -> keras.Model:
    x = keras.Input((4, 4, 2))
    return _model(x, L.Activation("tanh")(L.GlobalAveragePooling2D()(x)), "no_weights")


# ----------------------------------------------------------------------------- the runtime's layers
# Layers and settings TF.js 4.22 lacks or trains wrongly, written as the classes of
# mobile_export/src/layers/ (table.json says which): each checked like the built-in ones.
def _conv_dilated_grouped() -> keras.Model:
    x = keras.Input((9, 8, 4))
    s = keras.Input((12, 4))
    outs = [L.Conv2D(3, 3, dilation_rate=2, activation="relu")(x),
            L.Conv2D(2, (2, 3), dilation_rate=(2, 1), padding="same", use_bias=False)(x),
            L.Conv2D(6, 3, groups=2, padding="same", kernel_regularizer=keras.regularizers.L2(0.01))(x),
            L.Conv2D(8, 3, groups=4, strides=2, padding="same", activation="tanh")(x),  # one channel per group
            L.Conv2D(4, 2, groups=4, dilation_rate=2)(x),
            L.Conv1D(3, 3, dilation_rate=2, padding="same")(s),
            L.Conv1D(2, 3, padding="causal", activation="sigmoid")(s),
            L.Conv1D(2, 2, padding="causal", dilation_rate=3)(s),
            L.Conv1D(4, 3, groups=2, strides=2)(s)]
    return _model([x, s], outs, "conv_dilated_grouped")


def _depthwise_separable_dilated() -> keras.Model:
    x = keras.Input((9, 9, 3))
    outs = [L.DepthwiseConv2D(3, dilation_rate=2, depth_multiplier=2, activation="relu")(x),
            L.DepthwiseConv2D((2, 3), dilation_rate=(2, 2), padding="same", use_bias=False)(x),
            L.SeparableConv2D(4, 3, dilation_rate=2, padding="same", depth_multiplier=2)(x),
            L.SeparableConv2D(2, (3, 2), dilation_rate=(1, 2), use_bias=False, activation="elu")(x)]
    return _model(x, outs, "depthwise_separable_dilated")


def _pooling_settings() -> keras.Model:
    x = keras.Input((7, 9, 3))
    s = keras.Input((9, 4))
    outs = [L.AveragePooling2D(3, strides=2, padding="same")(x),
            L.AveragePooling2D((2, 3), strides=1, padding="same")(x),
            L.AveragePooling1D(3, strides=2, padding="same")(s), L.AveragePooling1D(2, padding="same")(s),
            L.GlobalAveragePooling2D(keepdims=True)(x), L.GlobalMaxPooling2D(keepdims=True)(x),
            L.GlobalAveragePooling1D(keepdims=True)(s), L.GlobalMaxPooling1D(keepdims=True)(s)]
    return _model([x, s], outs, "pooling_settings")


def _batchnorm_settings() -> keras.Model:
    x = keras.Input((6, 5, 4))
    frozen = L.BatchNormalization(momentum=0.7, name="frozen_bn")
    frozen.trainable = False
    outs = [L.BatchNormalization(axis=1, momentum=0.8)(x), L.BatchNormalization(axis=-2, epsilon=0.01)(x),
            L.BatchNormalization(scale=False)(x), L.BatchNormalization(center=False, momentum=0.5)(x),
            L.BatchNormalization(center=False, scale=False, axis=2)(x), frozen(x),
            L.BatchNormalization(axis=1, gamma_regularizer=keras.regularizers.L1(0.01))(L.Flatten()(x))]
    return _model(x, outs, "batchnorm_settings")


def _normalization() -> keras.Model:
    x = keras.Input((4, 5, 3))
    adapted = L.Normalization()
    adapted.adapt(np.random.default_rng(3).normal(2.0, 3.0, (20, 4, 5, 3)).astype(np.float32))
    outs = [adapted(x), L.Normalization(mean=[0.5, -1.0, 2.0], variance=[4.0, 0.25, 1.0])(x),
            L.Normalization(axis=(1, 3), mean=1.5, variance=2.0)(x),
            L.Normalization(axis=None, mean=0.2, variance=0.5, invert=True)(x),
            L.Normalization(axis=(2,), mean=[1.0, 2.0, 3.0, 4.0, 5.0], variance=[1.0, 2.0, 3.0, 4.0, 1e-20])(x)]
    return _model(x, outs, "normalization")


def _activations_new() -> keras.Model:
    x = keras.Input((6,), name="x")
    names = ["hard_sigmoid", "hard_silu", "hard_swish", "leaky_relu", "exponential"]
    outs = [L.Dense(4, activation=a, name=f"dense_{a}")(x) for a in names]
    outs += [L.Activation("hard_silu")(x), L.ELU(alpha=0.7)(x), L.ELU(alpha=2.5)(L.Dense(3)(x))]
    return _model(x, outs, "activations_new")


def _upsampling() -> keras.Model:
    x = keras.Input((3, 4, 2))
    outs = [L.UpSampling2D()(x), L.UpSampling2D((2, 3))(x), L.UpSampling2D(2, interpolation="bilinear")(x),
            L.UpSampling2D((3, 2), interpolation="bilinear")(x)]
    return _model(x, [L.Conv2D(2, 2)(o) for o in outs], "upsampling")


def _gru_reset_after() -> keras.Model:
    x = keras.Input((6, 3))
    g = L.GRU(4, return_sequences=True, kernel_regularizer=keras.regularizers.L2(0.01))(x)
    g = L.GRU(3, activation="relu", go_backwards=True)(g)
    seq, state = L.GRU(2, return_sequences=True, return_state=True, use_bias=False)(x)
    return _model(x, [g, seq, state], "gru_reset_after")


def _operations() -> keras.Model:
    from keras import ops

    x, y = keras.Input((4, 5), name="x"), keras.Input((4, 5), name="y")
    positive = ops.abs(x) + 0.5
    outs = [x + 3.0, 2.0 * x, x - y, x / 2.0, 1.0 - x, y / positive, ops.maximum(x, 0.5), ops.minimum(y, x),
            ops.power(x, 2), ops.power(positive, 0.5), -x, ops.square(x), ops.sqrt(positive), ops.exp(x),
            ops.log(positive), ops.tanh(x), ops.sigmoid(x), ops.relu(x), ops.relu6(3.0 * x), ops.silu(x),
            ops.hard_sigmoid(x), ops.hard_silu(x), ops.softplus(x), ops.gelu(x), ops.gelu(x, approximate=True),
            ops.softmax(x, axis=1), ops.softmax(y), ops.mean(x, axis=1, keepdims=True), ops.sum(x, axis=-1),
            ops.max(x, axis=(1, 2)), ops.min(y, axis=1), ops.mean(x), ops.transpose(x, (0, 2, 1)),
            ops.matmul(x, ops.transpose(y, (0, 2, 1))), ops.multiply(x, y), ops.add(x, y),
            x * np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32), ops.add(np.ones((4, 1), np.float32), y),
            L.Subtract()([x, y])]
    return _model([x, y], outs, "operations")


def _application_layers() -> keras.Model:
    from keras.src.applications.convnext import LayerScale
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    x = keras.Input((3, 4, 5))
    outs = [LayerScale(0.3, 5)(x), CustomScaleLayer(0.17)([x, L.Conv2D(5, 1)(x)]),
            L.Rescaling([0.5, 1.0, 2.0, -1.0, 3.0], offset=[0.1, 0.2, 0.3, 0.4, 0.5])(x),
            L.Rescaling([1.0, 2.0, 3.0, 4.0, 5.0], offset=-1.0)(x), L.Identity()(x)]
    return _model(x, outs, "application_layers")


def _nested_models() -> keras.Model:
    """A transfer-learning model: a functional base (partly frozen) with a nested Sequential,
    called once; a second small model called twice (shared weights); a frozen base."""
    image = keras.Input((8, 8, 3), name="image")
    stem = keras.Sequential([L.Conv2D(4, 3, padding="same", name="conv"), L.BatchNormalization(name="bn"),
                             L.ReLU(name="relu")], name="stem")
    inner_in = keras.Input((8, 8, 3))
    t = stem(inner_in)
    t = L.Conv2D(4, 3, strides=2, name="conv")(t)
    t = L.BatchNormalization(name="bn")(t)
    base = keras.Model(inner_in, [L.GlobalAveragePooling2D(name="pool")(t), t], name="base")
    base.get_layer("conv").trainable = False
    frozen_in = keras.Input((8, 8, 3))
    frozen = keras.Model(frozen_in, L.BatchNormalization(name="bn")(L.Conv2D(2, 3, name="conv")(frozen_in)),
                         name="frozen_base")
    frozen.trainable = False
    head_in = keras.Input((4,))
    shared = keras.Model(head_in, L.Dense(3, activation="tanh", name="dense")(head_in), name="shared")
    pooled, features = base(image)
    out = L.Concatenate(name="concat")([shared(pooled), shared(L.Dense(4, name="proj")(pooled))])
    return _model(image, [out, L.Flatten(name="flat")(features), frozen(image)], "nested_models")


CASES = [
    Case("dense_activations", _dense_activations), Case("conv2d", _conv2d), Case("conv1d", _conv1d),
    Case("conv_transpose", _conv_transpose), Case("depthwise_separable", _depthwise_separable),
    Case("depthwise_unequal_strides", _depthwise_unequal_strides,
         requires="depthwise_unequal_strides"),
    Case("batchnorm", _batchnorm, sgd_round_trip=True), Case("layernorm", _layernorm),
    Case("activation_layers", _activation_layers), Case("pooling", _pooling), Case("shapes", _shapes),
    Case("padding_cropping", _padding_cropping), Case("merges", _merges),
    Case("embedding", _embedding, int_high=20), Case("lstm", _lstm, sgd_round_trip=True),
    Case("gru_rnn", _gru_rnn), Case("rescaling", _rescaling),
    Case("random_layers", _random_layers, deterministic=False), Case("segment", _segment, sgd_round_trip=True),
    Case("sequential", _sequential), Case("no_weights", _no_weights),
    Case("conv_dilated_grouped", _conv_dilated_grouped),
    Case("depthwise_separable_dilated", _depthwise_separable_dilated),
    Case("pooling_settings", _pooling_settings), Case("batchnorm_settings", _batchnorm_settings, sgd_round_trip=True),
    Case("normalization", _normalization), Case("activations_new", _activations_new),
    Case("upsampling", _upsampling), Case("gru_reset_after", _gru_reset_after, sgd_round_trip=True),
    Case("operations", _operations), Case("application_layers", _application_layers),
    Case("nested_models", _nested_models, sgd_round_trip=True),
    Case("dropout_shapes", _dropout_shapes, deterministic=False),
]
QUANTIZED = ["segment", "conv2d", "lstm"]  # exported again with each quantization


# ----------------------------------------------------------------------------- op probes
def _probe_depthwise_unequal_strides() -> str | None:
    """None if TensorFlow runs a depthwise conv with strides (1, 2) on this CPU, else why not.

    TensorFlow's depthwise kernel without oneDNN (AMD CPUs without AVX-512, or
    TF_ENABLE_ONEDNN_OPTS=0) supports only equal row and column strides."""
    x = np.zeros((1, 5, 5, 2), np.float32)
    try:
        for layer in (L.DepthwiseConv2D(2, strides=(1, 2)), L.SeparableConv2D(2, 2, strides=(2, 1))):
            np.asarray(layer(x))
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
        text = str(error)  # TensorFlow's own words sit inside Keras' wrapper: "}} ... [Op:"
        found = re.search(r"\}\}\s*(.*?)\s*\[Op:", text, re.S)
        message = found.group(1) if found else text.strip().splitlines()[0]
        return (f"TensorFlow on this CPU cannot run a depthwise convolution with unequal strides "
                f"('{message[:160]}'); the equal-stride case 'depthwise_separable' covers the layer "
                "types here")
    return None


PROBES: dict[str, Callable[[], str | None]] = {"depthwise_unequal_strides": _probe_depthwise_unequal_strides}
_PROBED: dict[str, str | None] = {}


def probe(name: str) -> str | None:
    """Run the named op probe once per process; None if the op runs, else the skip reason."""
    if name not in _PROBED:
        _PROBED[name] = PROBES[name]()
    return _PROBED[name]


# ----------------------------------------------------------------------------- helpers
def _randomize(model: keras.Model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "int" in str(variable.dtype):
            continue  # Normalization's count
        if variable.name in ("moving_variance", "variance"):
            value = rng.uniform(0.3, 2.0, shape)
        elif variable.name == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.5, shape)
        variable.assign(value.astype(variable.dtype))
    for item in flatten_model(model).layers:  # Normalization computes its constants from its weights
        if isinstance(item.op, L.Normalization):
            item.op.finalize_state()


def _inputs(model: keras.Model, case: Case, rng: np.random.Generator, batch: int = 3) -> list[np.ndarray]:
    arrays = []
    for tensor in model.inputs:
        shape = (batch, *tensor.shape[1:])
        if "int" in str(tensor.dtype):
            arrays.append(rng.integers(0, case.int_high, shape).astype(np.int32))
        else:
            arrays.append(rng.normal(0.0, 1.5, shape).astype(np.float32))
    return arrays


def _encode(array: np.ndarray) -> dict[str, Any]:
    dtype = "int32" if array.dtype.kind in "iu" else "float32"
    data = np.ascontiguousarray(array, dtype="<i4" if dtype == "int32" else "<f4").tobytes()
    return {"shape": list(array.shape), "dtype": dtype, "data": base64.b64encode(data).decode()}


def _decode(tensor: dict[str, Any]) -> np.ndarray:
    dtype = "<i4" if tensor["dtype"] == "int32" else "<f4"
    return np.frombuffer(base64.b64decode(tensor["data"]), dtype).reshape(tensor["shape"])


def _as_list(value: Any) -> list[np.ndarray]:
    return [np.asarray(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _max_diff(left: list[np.ndarray], right: list[np.ndarray]) -> float:
    assert [a.shape for a in left] == [tuple(b.shape) for b in right]
    return max((float(np.max(np.abs(a - b))) for a, b in zip(left, right) if a.size), default=0.0)


def _require_node() -> None:
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH; install Node.js 20 to run the TF.js tests")
    if not (MOBILE / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        pytest.fail("mobile_export/node_modules is missing @tensorflow/tfjs: "
                    "run `npm ci --prefix mobile_export`")


def run_tfjs(jobs: list[dict[str, Any]], work: Path) -> dict[str, dict[str, Any]]:
    """Run all `jobs` in one node process; results by job id."""
    _require_node()
    job_file, out_file = work / "jobs.json", work / "results.json"
    job_file.write_text(json.dumps({"jobs": jobs}))
    done = subprocess.run(["node", str(TOOL), str(job_file), str(out_file)], cwd=MOBILE,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"tfjs_predict.mjs failed:\n{done.stderr[-3000:]}"
    output = json.loads(out_file.read_text())
    return {"registered": output["registered"], **{r["id"]: r for r in output["results"]}}


# ----------------------------------------------------------------------------- one node run
@dataclass
class Built:
    case: Case
    model: keras.Model
    inputs: list[np.ndarray]
    predict: list[np.ndarray]
    regularization_loss: float
    bundle: Path
    training: list[np.ndarray] | None = None
    gradients: dict[str, np.ndarray] | None = None
    input_gradients: list[np.ndarray | None] | None = None
    weights_after: dict[str, np.ndarray] | None = None  # after one training pass (+ SGD step)
    save_dir: Path | None = None
    training_inputs: list[np.ndarray] | None = None  # dropout_shapes: the inputs of its training job


def _names(model: keras.Model) -> dict[int, str]:
    return {id(variable): name for name, variable in tfjs_named_weights(model)}


def _training_reference(built: Built, rng: np.random.Generator) -> dict[str, Any]:
    """Keras training pass, VJP of sum(out * g), and the weights after (an SGD step if asked)."""
    model, case = built.model, built.case
    upstream = [rng.normal(size=p.shape).astype(np.float32) for p in built.predict]
    names = _names(model)
    feeds = [tf.Variable(a) if a.dtype == np.float32 else tf.constant(a) for a in built.inputs]
    with tf.GradientTape() as tape:
        outputs = model(feeds if len(feeds) > 1 else feeds[0], training=True)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        loss = tf.add_n([tf.reduce_sum(o * g) for o, g in zip(outputs, upstream)])
    sources = list(model.trainable_weights)
    float_feeds = [f for f in feeds if isinstance(f, tf.Variable)]
    grads = tape.gradient(loss, sources + float_feeds)
    built.training = [np.asarray(o) for o in outputs]
    built.gradients = {names[id(v)]: np.asarray(tf.convert_to_tensor(g))
                       for v, g in zip(model.trainable_weights, grads)}
    it = iter(grads[len(sources):])
    built.input_gradients = [np.asarray(next(it)) if isinstance(f, tf.Variable) else None for f in feeds]
    built.weights_after = {names[id(v)]: np.asarray(v) for v in model.weights}
    job: dict[str, Any] = {"upstream": [_encode(g) for g in upstream], "return_weights": True}
    if case.sgd_round_trip:
        for name, grad in built.gradients.items():
            built.weights_after[name] = built.weights_after[name] - LEARNING_RATE * grad
        built.save_dir = built.bundle.parent / f"{case.id}_trained"
        job.update(sgd_learning_rate=LEARNING_RATE, save_dir=str(built.save_dir))
    return job


@dataclass
class World:
    built: dict[str, Built]
    results: dict[str, dict[str, Any]]
    work: Path
    failures: dict[str, str]  # case id -> why its Keras side could not be built
    skipped: dict[str, str]  # case id -> why this CPU cannot run it (an op probe)

    def case(self, case_id: str) -> Built:
        """The built case, or this one test fails (or skips) naming the case; the others run."""
        if case_id in self.skipped:
            pytest.skip(self.skipped[case_id])
        if case_id in self.failures:
            pytest.fail(f"case '{case_id}' could not be built on the Keras side:\n{self.failures[case_id]}")
        return self.built[case_id]


def _build_case(index: int, case: Case, work: Path) -> tuple[Built, list[dict[str, Any]]]:
    """Export one case, compute its Keras reference; the node jobs that check it."""
    model = case.build()
    _randomize(model, seed=index)
    rng = np.random.default_rng(1000 + index)
    inputs = _inputs(model, case, rng)
    encoded = [_encode(a) for a in inputs]
    bundle = work / case.id
    export_tfjs(model, bundle)  # before any training pass changes the moving statistics
    jobs: list[dict[str, Any]] = []
    for quantization in ("float16", "uint8", "uint16") if case.id in QUANTIZED else ():
        quantized = work / f"{case.id}_{quantization}"
        export_tfjs(model, quantized, quantization=quantization)
        jobs.append({"id": quantized.name, "bundle_dir": str(quantized), "inputs": encoded})
    if case.id == "segment":
        export_tfjs(model, work / "segment_sharded", shard_size_bytes=300)
        jobs.append({"id": "segment_sharded", "bundle_dir": str(work / "segment_sharded"),
                     "inputs": encoded})
    predict = _as_list(model.predict(inputs if len(inputs) > 1 else inputs[0], verbose=0))
    losses = [float(keras.ops.convert_to_numpy(loss)) for loss in model.losses]
    item = Built(case, model, inputs, predict, sum(losses), bundle)
    job = {"id": case.id, "bundle_dir": str(bundle), "inputs": encoded}
    if case.deterministic:
        job.update(_training_reference(item, rng))
    jobs.append(job)
    if case.id == "dropout_shapes":  # the masks of a training pass (see test_dropout_noise_shapes_in_training)
        item.training_inputs = [np.abs(a) + 1.0 for a in _inputs(model, case, rng, batch=16)]
        jobs.append({**job, "id": "dropout_shapes_training", "training": True,
                     "inputs": [_encode(a) for a in item.training_inputs]})
    return item, jobs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Every case built on the Keras side, then all bundles in ONE node process. A case that
    fails to build is recorded, so only that case's tests fail; the others still run."""
    import traceback

    _require_node()
    work = tmp_path_factory.mktemp("tfjs")
    built: dict[str, Built] = {}
    failures: dict[str, str] = {}
    skipped: dict[str, str] = {}
    jobs: list[dict[str, Any]] = []
    for index, case in enumerate(CASES):
        reason = probe(case.requires) if case.requires else None
        if reason is not None:
            skipped[case.id] = reason
            continue
        try:
            built[case.id], case_jobs = _build_case(index, case, work)
        except Exception:  # noqa: BLE001 - reported by this case's own tests
            failures[case.id] = traceback.format_exc(limit=-6)
            continue
        jobs.extend(case_jobs)
    jobs.append({"id": "missing", "bundle_dir": str(work / "does_not_exist"), "inputs": []})
    return World(built, run_tfjs(jobs, work), work, failures, skipped)


def _result(world: World, job_id: str) -> dict[str, Any]:
    result = world.results[job_id]
    assert "error" not in result, f"TF.js failed on {job_id}: {result['error']}"
    return result


# ----------------------------------------------------------------------------- numeric matrix
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_predict_matches_keras(world: World, case: Case) -> None:
    built, result = world.case(case.id), _result(world, case.id)
    outputs = [_decode(t) for t in result["outputs"]]
    diff = _max_diff(outputs, built.predict)
    scale = max((float(np.abs(p).max()) for p in built.predict if p.size), default=0.0)
    print(f"predict {case.id}: max|TF.js - Keras| = {diff:.3g} (outputs up to {scale:.3g})")
    assert diff <= case.tolerance, f"{case.id}: max|TF.js - Keras| = {diff:.3g}"
    reference = built.regularization_loss
    assert abs(result["regularization_loss"] - reference) <= 1e-5 * max(1.0, abs(reference))


@pytest.mark.parametrize("case", [c for c in CASES if c.deterministic], ids=lambda c: c.id)
def test_training_pass_matches_keras(world: World, case: Case) -> None:
    """model.apply(x, {training: true}), the VJP and the updated moving statistics."""
    built, result = world.case(case.id), _result(world, case.id)
    assert "training_error" not in result, f"TF.js training failed: {result['training_error']}"
    output_diff = _max_diff([_decode(t) for t in result["training_outputs"]], built.training)
    assert output_diff <= case.tolerance
    assert set(result["gradients"]) == set(built.gradients), "trainable weights differ"
    worst = 0.0  # max |TF.js - Keras| / max(1, max |Keras|), over weight and input gradients
    pairs = [(name, _decode(result["gradients"][name]), ref) for name, ref in built.gradients.items()]
    for index, (got, reference) in enumerate(zip(result["input_gradients"], built.input_gradients)):
        assert (got is None) == (reference is None)
        if reference is not None:
            pairs.append((f"input {index}", _decode(got), reference))
    for name, got, reference in pairs:
        scale = max(1.0, float(np.max(np.abs(reference), initial=0.0)))
        relative = float(np.max(np.abs(got - reference), initial=0.0)) / scale
        worst = max(worst, relative)
        assert relative <= GRAD_TOLERANCE, f"gradient of {name}: {relative:.3g}"
    print(f"training {case.id}: outputs {output_diff:.3g}, gradients (relative) {worst:.3g}")
    assert set(result["weights"]) == set(built.weights_after)
    for name, reference in built.weights_after.items():
        assert _max_diff([_decode(result["weights"][name])], [reference]) <= 1e-5, name


def test_dropout_noise_shapes_in_training(world: World) -> None:
    """TF.js draws one mask value per noise_shape cell (batch-wise for StochasticDepth) and scales
    the kept values by 1 / (1 - rate), as Keras; which values it keeps is its own draw."""
    built, result = world.case("dropout_shapes"), _result(world, "dropout_shapes_training")
    [x] = built.training_inputs
    outputs = [_decode(t) for t in result["outputs"]]
    for output, shared in zip(outputs, [(1, 2), (2, 3), (1, 2, 3), (1, 2, 3)]):
        ratio = output / x
        assert np.all(np.isclose(ratio, 0.0) | np.isclose(ratio, 2.0)), "kept values are scaled by 1/(1 - 0.5)"
        kept = np.isclose(ratio, 2.0)
        assert kept.any() and (~kept).any(), "a mask of rate 0.5 keeps some values and drops others"
        for axis in shared:  # one decision along each broadcast axis of noise_shape
            assert np.array_equal(kept, np.repeat(np.take(kept, [0], axis=axis), kept.shape[axis], axis=axis))


def test_every_supported_layer_is_in_the_numeric_matrix() -> None:
    """Counted over the cases that run on every CPU (no op probe), so a CPU that skips a
    probed case still checks every layer type."""
    everywhere = [case.build() for case in CASES if case.requires is None]
    tested = {type(layer).__name__ for model in everywhere for layer in model.layers}
    assert SUPPORTED_LAYERS <= tested, f"supported but never checked in TF.js: {SUPPORTED_LAYERS - tested}"


def test_the_runtime_registers_what_the_table_lists(world: World) -> None:
    """mobile_export/src/layers/ registers exactly the classes and activations of table.json,
    the table converters reads SUPPORTED_LAYERS, the refusals and the activations from."""
    registered = world.results["registered"]
    assert sorted(registered["classes"]) == sorted(TABLE["classes"])
    assert sorted(registered["activations"]) == sorted({a["registered"] for a in TABLE["activations"].values()
                                                        if "registered" in a})
    assert SUPPORTED_LAYERS == frozenset(TABLE["layers"]) | {"InputLayer"}
    assert set(_RULES) == set(TABLE["layers"]), "a layer of the table without translation rules, or back"
    for name, entry in TABLE["layers"].items():
        assert entry.get("tfjs") or entry.get("custom"), name
        assert entry.get("custom") in (None, *TABLE["classes"]), name
    assert set(TABLE["refused_layers"]).isdisjoint(TABLE["layers"])


def test_every_runtime_class_operation_and_activation_is_in_the_numeric_matrix() -> None:
    """Each class of src/layers/, each keras.ops operation and each activation of the table is
    written by at least one case that runs on every CPU (and so is checked against Keras)."""
    classes, ops, activations = set(), set(), set()
    for case in CASES:
        if case.requires is not None:
            continue
        for layer in tfjs_model_topology(case.build())["config"]["layers"]:
            classes.add(layer["class_name"])
            ops.add(layer["config"].get("op"))
            activations.add(layer["config"].get("activation"))
    assert set(TABLE["classes"]) <= classes, set(TABLE["classes"]) - classes
    assert {entry["op"] for entry in TABLE["operations"].values()} <= ops
    assert {entry["tfjs"] for entry in TABLE["activations"].values()} <= activations


def test_a_case_that_fails_to_build_fails_alone(world: World) -> None:
    """The fixture records a broken case; asking for it fails with the case's name."""
    world.failures["broken_for_this_test"] = "ValueError: boom"
    try:
        with pytest.raises(pytest.fail.Exception, match="case 'broken_for_this_test' could not be built"):
            world.case("broken_for_this_test")
    finally:
        del world.failures["broken_for_this_test"]
    assert world.case("conv2d").case.id == "conv2d"


def test_the_depthwise_probe_agrees_with_tensorflow() -> None:
    """The probe's verdict is what TensorFlow does on this CPU with the probed case itself."""
    reason = probe("depthwise_unequal_strides")
    model = _depthwise_unequal_strides()
    x = np.zeros((1, 9, 9, 3), np.float32)
    if reason is None:
        assert [np.asarray(t).shape for t in model(x)] == [(1, 8, 4, 3), (1, 4, 8, 3)]
    else:
        assert "unequal strides" in reason
        with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.UnimplementedError)):
            model(x)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", [c for c in CASES if c.sgd_round_trip], ids=lambda c: c.id)
def test_device_trained_bundle_loads_back_into_keras(world: World, case: Case) -> None:
    """TF.js takes one SGD step and saves; load_tfjs_weights reads exactly those weights back."""
    built = world.case(case.id)
    result = _result(world, case.id)
    assert "training_error" not in result
    model = keras.models.clone_model(built.model)
    load_tfjs_weights(model, built.save_dir)
    loaded = {name: np.asarray(v) for name, v in tfjs_named_weights(model)}
    assert set(loaded) == set(built.weights_after)
    for name, reference in built.weights_after.items():
        assert np.max(np.abs(loaded[name] - reference)) <= 1e-5, name
    before = read_bundle_weights(built.bundle)
    changed = [name for name in before if not np.array_equal(before[name], loaded[name])]
    assert changed, "the SGD step changed nothing: this test could not fail"


# max |TF.js on the quantized bundle - Keras float32| / max |output|; measured at most
# float16 2.1e-3, uint16 1.4e-4, uint8 1.8e-2 (see the module docstring)
QUANTIZATION_BOUNDS = {"float16": 5e-3, "uint16": 5e-4, "uint8": 5e-2}


@pytest.mark.parametrize("quantization", ["float16", "uint16", "uint8"])
def test_quantized_bundles(world: World, quantization: str) -> None:
    """TF.js dequantizes like read_bundle_weights; the error against float32 stays bounded."""
    for case_id in QUANTIZED:
        built, bundle = world.case(case_id), world.work / f"{case_id}_{quantization}"
        result = _result(world, bundle.name)
        outputs = [_decode(t) for t in result["outputs"]]
        dequantized = keras.models.clone_model(built.model)
        load_tfjs_weights(dequantized, bundle)
        inputs = built.inputs if len(built.inputs) > 1 else built.inputs[0]
        same_weights = _as_list(dequantized(inputs, training=False))
        assert _max_diff(outputs, same_weights) <= TOLERANCE, f"{case_id}: TF.js dequantizes differently"
        error = _max_diff(outputs, built.predict)
        scale = max(float(np.abs(p).max()) for p in built.predict)
        print(f"quantization {quantization} {case_id}: max|TF.js - Keras float32| = {error:.3g} "
              f"(outputs up to {scale:.3g}, relative {error / scale:.3g})")
        assert 0.0 < error <= QUANTIZATION_BOUNDS[quantization] * scale, f"{case_id} {quantization}"
        float_bytes = sum(p.stat().st_size for p in built.bundle.glob("*.bin"))
        quantized_bytes = sum(p.stat().st_size for p in bundle.glob("*.bin"))
        ratio = {"float16": 2, "uint16": 2, "uint8": 4}[quantization]
        assert quantized_bytes == float_bytes // ratio


def test_sharded_bundle_loads_in_tfjs(world: World) -> None:
    shards = sorted(p.name for p in (world.work / "segment_sharded").glob("*.bin"))
    assert len(shards) > 3 and shards[0].startswith("group1-shard1of")
    outputs = [_decode(t) for t in _result(world, "segment_sharded")["outputs"]]
    assert _max_diff(outputs, world.case("segment").predict) <= TOLERANCE


def test_tool_reports_a_missing_bundle(world: World) -> None:
    assert "cannot read the TF.js bundle" in world.results["missing"]["error"]


# ----------------------------------------------------------------------------- refusals
class _Custom(L.Layer):
    def call(self, x):
        return x * 2.0


class _MyDense(L.Dense):
    pass


def _single(layer_factory: Callable[[], L.Layer], shape: tuple[int, ...] = (6, 6, 3),
            dtype: str = "float32") -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        x = keras.Input(shape, dtype=dtype)
        return keras.Model(x, layer_factory()(x))
    return build


def _frozen_batchnorm() -> keras.Model:
    x = keras.Input((4,))
    layer = L.BatchNormalization(name="frozen_bn")
    layer.trainable = False
    return keras.Model(x, layer(x))


def _subtract() -> keras.Model:
    a, b = keras.Input((3,)), keras.Input((3,))
    return keras.Model([a, b], L.Subtract(name="sub")([a, b]))


def _nested() -> keras.Model:
    inner = keras.Sequential([keras.Input((3,)), L.Dense(2)], name="inner")
    x = keras.Input((3,))
    return keras.Model(x, inner(x))


def _dict_inputs() -> keras.Model:
    a = keras.Input((3,), name="a")
    return keras.Model({"a": a}, L.Dense(2)(a))


def _initial_state() -> keras.Model:
    x, h, c = keras.Input((4, 3)), keras.Input((2,)), keras.Input((2,))
    return keras.Model([x, h, c], L.LSTM(2, name="lstm_state")(x, initial_state=[h, c]))


def _stale_normalization() -> keras.Model:
    x = keras.Input((3,))
    norm = L.Normalization(name="norm")
    norm.adapt(np.arange(12, dtype=np.float32).reshape(4, 3))
    norm.adapt_mean.assign(np.ones(3, np.float32))  # without finalize_state(): Keras keeps the old mean
    norm.adapt_variance.assign(np.ones(3, np.float32))
    return keras.Model(x, norm(x))


def _several_blockers() -> keras.Model:
    x = keras.Input((4, 3))
    y = L.Dense(3, activation="hard_tanh", kernel_constraint=keras.constraints.NonNeg(), name="d")(x)
    y = L.Softmax(axis=1, name="s")(L.Dense(3, name="fine")(y))
    return keras.Model(x, L.Lambda(lambda t: t * 2.0, name="twice")(y))


def _shared_across_nesting() -> keras.Model:
    dense = L.Dense(3, name="dense")
    inner_in = keras.Input((3,))
    inner = keras.Model(inner_in, dense(inner_in), name="inner")
    x = keras.Input((3,))
    return keras.Model(x, dense(inner(x)))


REFUSED = [
    ("lambda", _single(lambda: L.Lambda(lambda t: t + 1.0, name="plus_one")),
     "layer 'plus_one' (Lambda): Lambda layers run Python code"),
    ("custom_layer", _single(lambda: _Custom(name="twice")), "layer 'twice' (_Custom): this layer type "
     "is not supported"),
    ("subclassed_builtin", _single(lambda: _MyDense(2, name="mine")), "layer 'mine' (_MyDense)"),
    ("relu_negative_slope", _single(lambda: L.ReLU(max_value=6.0, negative_slope=0.1, name="r")),
     "layer 'r' (ReLU): negative_slope=0.1 is not supported by TensorFlow.js"),
    ("relu_threshold", _single(lambda: L.ReLU(threshold=0.5, name="r")), "threshold=0.5"),
    ("custom_activation", _single(lambda: L.Dense(2, activation=lambda t: t * 2.0, name="d"), (3,)),
     "layer 'd' (Dense): activation=<custom function> is not supported: TF.js cannot run Python"),
    ("channels_first", _single(lambda: L.Conv2D(2, 3, data_format="channels_first", name="c")),
     "data_format='channels_first' is not supported by TensorFlow.js; rebuild the layer with "
     "data_format='channels_last'"),
    ("output_padding", _single(lambda: L.Conv2DTranspose(2, 3, strides=2, output_padding=1, name="t")),
     "output_padding=[1, 1]"),
    ("softmax_axis", _single(lambda: L.Softmax(axis=1, name="s"), (3, 4)),
     "layer 's' (Softmax): axis=1 is not supported"),
    ("layernorm_scale", _single(lambda: L.LayerNormalization(scale=False, name="ln")), "scale=False"),
    ("rms_scaling", _single(lambda: L.LayerNormalization(rms_scaling=True, name="ln")), "rms_scaling=True"),
    ("constraint", _single(lambda: L.Dense(2, kernel_constraint=keras.constraints.MaxNorm(1.0),
                                           name="d"), (3,)), "layer 'd' (Dense): kernel_constraint is set"),
    ("activity_regularizer", _single(lambda: L.Conv2D(2, 3, activity_regularizer="l2", name="c")),
     "activity_regularizer is set"),
    ("orthogonal_regularizer", _single(lambda: L.Dense(2, kernel_regularizer=keras.regularizers
                                                       .OrthogonalRegularizer(), name="d"), (3,)),
     "kernel_regularizer='OrthogonalRegularizer' is not supported by TensorFlow.js"),
    ("mixed_precision", _single(lambda: L.Dense(2, dtype="mixed_float16", name="d"), (3,)),
     "dtype policy 'mixed_float16' is not supported"),
    ("mask_zero", _single(lambda: L.Embedding(5, 2, mask_zero=True, name="emb"), (4,), "int32"),
     "mask_zero=True"),
    ("masking", _single(lambda: L.Masking(name="m"), (4, 2)), "layer 'm' (Masking): masks are not exported"),
    ("stateful", lambda: keras.Model(x := keras.Input(batch_shape=(2, 4, 3)),
                                     L.LSTM(2, stateful=True, name="s")(x)), "stateful=True"),
    ("dict_inputs", _dict_inputs, "the model's inputs or outputs are a dict"),
    ("initial_state", _initial_state, "layer 'lstm_state' (LSTM): the layer is called with initial_state"),
    ("bad_name", _single(lambda: L.Dense(2, name="shared:1:0"), (3,)), "layer 'shared:1:0' (Dense): TF.js "
     "refuses the name 'shared:1:0'"),
    ("string_input", _single(lambda: L.Identity(), (2,), "string"), "input dtype 'string'"),
    ("upsampling_bicubic", _single(lambda: L.UpSampling2D(interpolation="bicubic", name="up")),
     "layer 'up' (UpSampling2D): interpolation='bicubic' is not supported by TensorFlow.js; use "
     "interpolation='nearest' or 'bilinear'"),
    ("conv_transpose_dilation", _single(lambda: L.Conv2DTranspose(2, 3, dilation_rate=2, name="t")),
     "layer 't' (Conv2DTranspose): dilation_rate=[2, 2] is not supported"),
    ("alpha_dropout_noise_shape", _single(lambda: L.AlphaDropout(0.2, noise_shape=(None, 1, 1, 3), name="d")),
     "noise_shape=[None, 1, 1, 3]"),
    ("unknown_activation", _single(lambda: L.Activation("hard_tanh", name="a"), (3,)),
     "layer 'a' (Activation): activation='hard_tanh' is not supported: the device runtime has no such activation"),
    ("unsupported_operation", lambda: keras.Model(x := keras.Input((3,)), keras.ops.cos(x)),
     "(Cos): the operation keras.ops.cos is not supported by the device runtime; supported: absolute, add,"),
    ("rescaling_nested", _single(lambda: L.Rescaling([[0.5, 1.0, 2.0]], name="r")),
     "layer 'r' (Rescaling): scale=[[0.5, 1.0, 2.0]] is not supported"),
    ("normalization_stale", _stale_normalization, "layer 'norm' (Normalization): its mean and variance weights "
     "were changed after the layer computed its constants"),
    ("several_layers", _several_blockers, "3 layers cannot be exported to TensorFlow.js:\n"
     "  - layer 'd' (Dense): activation='hard_tanh' is not supported: the device runtime has no such activation; "
     "use one of ['elu', "),
    ("shared_across_nesting", _shared_across_nesting, "layer 'dense' is used both as 'inner/dense' and as 'dense'"),
]


@pytest.mark.parametrize("build,message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_with_a_clear_message(build: Callable[[], keras.Model], message: str, tmp_path: Path) -> None:
    model = build()
    with pytest.raises(ExportError) as refused:
        check_tfjs_supported(model)
    assert message in str(refused.value)
    with pytest.raises(ExportError):
        export_tfjs(model, tmp_path / "bundle")
    assert not (tmp_path / "bundle" / "model.json").exists()


def test_every_blocking_layer_is_listed_with_its_settings() -> None:
    """One error names every layer that blocks the export, each with every setting that does."""
    with pytest.raises(ExportError) as refused:
        check_tfjs_supported(_several_blockers())
    lines = str(refused.value).splitlines()
    assert lines[0] == "3 layers cannot be exported to TensorFlow.js:"
    assert lines[1].startswith("  - layer 'd' (Dense): activation='hard_tanh' is not supported")
    assert "; also kernel_constraint is set" in lines[1]
    assert lines[2].startswith("  - layer 's' (Softmax): axis=1 is not supported")
    assert lines[3].startswith("  - layer 'twice' (Lambda): Lambda layers run Python code")
    assert len(lines) == 4 and "fine" not in str(refused.value)


# ----------------------------------------------------------------------------- bundle files
def _small_model(name: str = "small") -> keras.Model:
    x = keras.Input((3,), name="x")
    y = L.BatchNormalization(name="bn")(L.Dense(4, name="dense")(x))
    model = keras.Model(x, L.Dense(2, name="out")(y), name=name)
    _randomize(model, seed=7)
    return model


def _weights(model: keras.Model) -> dict[str, np.ndarray]:
    return {name: np.asarray(variable) for name, variable in tfjs_named_weights(model)}


def test_model_json_layout(tmp_path: Path) -> None:
    model = _small_model()
    path = export_tfjs(model, tmp_path, metadata={"segment": "head", "cut": ["dense"]})
    assert path == tmp_path / "model.json"
    model_json = json.loads(path.read_text())
    assert model_json["format"] == "layers-model"
    assert model_json["userDefinedMetadata"] == {"segment": "head", "cut": ["dense"]}
    config = model_json["modelTopology"]["model_config"]
    assert config["config"]["input_layers"] == [["x", 0, 0]]
    assert config["config"]["output_layers"] == [["out", 0, 0]]
    layers = {layer["name"]: layer for layer in config["config"]["layers"]}
    assert layers["x"]["config"]["batch_input_shape"] == [None, 3]
    assert layers["bn"]["inbound_nodes"] == [[["dense", 0, 0, {}]]]
    manifest = model_json["weightsManifest"]
    assert manifest[0]["paths"] == ["group1-shard1of1.bin"]
    names = [w["name"] for w in manifest[0]["weights"]]
    assert names == ["dense/kernel", "dense/bias", "bn/gamma", "bn/beta", "bn/moving_mean",
                     "bn/moving_variance", "out/kernel", "out/bias"]
    assert (tmp_path / "group1-shard1of1.bin").stat().st_size == 4 * sum(
        int(np.prod(w["shape"])) for w in manifest[0]["weights"])


def test_read_back_is_exact_and_stale_shards_go(tmp_path: Path) -> None:
    model = _small_model()
    (tmp_path / "group1-shard3of11.bin").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("kept")
    export_tfjs(model, tmp_path, shard_size_bytes=20)
    assert not (tmp_path / "group1-shard3of11.bin").exists() and (tmp_path / "notes.txt").exists()
    stored = read_bundle_weights(tmp_path)
    for name, value in _weights(model).items():
        assert np.array_equal(stored[name], value), name


def test_load_reads_changed_weights(tmp_path: Path) -> None:
    """Rewrite the shard with other numbers: the loaded model must follow the bundle."""
    model = _small_model()
    export_tfjs(model, tmp_path)
    shard = tmp_path / "group1-shard1of1.bin"
    changed = np.frombuffer(shard.read_bytes(), "<f4") * 2.0 + 0.5
    shard.write_bytes(changed.astype("<f4").tobytes())
    target = keras.models.clone_model(model)
    load_tfjs_weights(target, tmp_path)
    flat = np.concatenate([np.ravel(v) for v in _weights(target).values()])
    assert np.array_equal(flat, changed)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    assert not np.allclose(target.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("quantization", ["float16", "uint8", "uint16"])
def test_quantized_read_back(tmp_path: Path, quantization: str) -> None:
    model = _small_model()
    model.get_layer("dense").bias.assign(np.zeros(4, np.float32))
    export_tfjs(model, tmp_path, quantization=quantization)
    manifest = json.loads((tmp_path / "model.json").read_text())["weightsManifest"][0]["weights"]
    assert all(w["dtype"] == "float32" and w["quantization"]["dtype"] == quantization for w in manifest)
    stored = read_bundle_weights(tmp_path)
    assert not stored["dense/bias"].any(), "zero must stay exactly zero"
    levels = {"float16": None, "uint8": 255, "uint16": 65535}[quantization]
    for name, value in _weights(model).items():
        spread = float(value.max() - value.min())
        bound = spread / levels / 2 + 1e-7 if levels else np.abs(value).max() * 2 ** -11
        assert np.max(np.abs(stored[name] - value)) <= bound + 1e-7, name


def test_load_is_strict_and_names_the_weights(tmp_path: Path) -> None:
    export_tfjs(_small_model(), tmp_path)
    x = keras.Input((3,), name="x")
    other = keras.Model(x, L.Dense(2, name="out")(L.Dense(5, name="dense")(x)))
    before = _weights(other)
    with pytest.raises(ExportError) as refused:
        load_tfjs_weights(other, tmp_path)
    message = str(refused.value)
    assert "in the bundle but not in the model: ['bn/beta', 'bn/gamma', 'bn/moving_mean'," in message
    assert "dense/kernel: bundle [3, 4] vs model [3, 5]" in message
    assert all(np.array_equal(before[n], v) for n, v in _weights(other).items()), "nothing is assigned"
    y = keras.Input((3,), name="x")
    bigger = keras.Model(y, L.Dense(2, name="extra")(_small_model()(y)))
    with pytest.raises(ExportError, match=r"missing from the bundle: \['small/dense/kernel'"):
        load_tfjs_weights(bigger, tmp_path)  # the nested model's weights are named small/<layer>/<weight>
    renamed = _small_model()
    renamed.get_layer("out").name = "head_out"
    with pytest.raises(ExportError, match=r"missing from the bundle: \['head_out/kernel', 'head_out/bias'\]"):
        load_tfjs_weights(renamed, tmp_path)


def test_broken_bundles_are_reported(tmp_path: Path) -> None:
    model = _small_model()
    with pytest.raises(ExportError, match="cannot read a TF.js bundle"):
        load_tfjs_weights(model, tmp_path / "nowhere")
    export_tfjs(model, tmp_path)
    shard = tmp_path / "group1-shard1of1.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ExportError, match="end inside weight 'out/bias'"):
        load_tfjs_weights(model, tmp_path)
    shard.unlink()
    with pytest.raises(ExportError, match="group1-shard1of1.bin is missing"):
        load_tfjs_weights(model, tmp_path)


def test_export_argument_errors(tmp_path: Path) -> None:
    model = _small_model()
    with pytest.raises(ExportError, match=r"quantization='int4' is not supported; expected one of"):
        export_tfjs(model, tmp_path, quantization="int4")
    with pytest.raises(ExportError, match="metadata is not JSON-serializable"):
        export_tfjs(model, tmp_path, metadata={"when": object()})
    with pytest.raises(ExportError, match="finite numbers"):
        export_tfjs(model, tmp_path, metadata={"loss": float("nan")})  # JSON.parse rejects NaN
    with pytest.raises(ExportError, match="shard_size_bytes=0 must be a positive integer"):
        export_tfjs(model, tmp_path, shard_size_bytes=0)
    model.get_layer("out").bias.assign(np.array([np.nan, 1.0], np.float32))
    with pytest.raises(ExportError, match="weight 'out/bias' contains NaN"):
        export_tfjs(model, tmp_path)
    model.get_layer("out").bias.assign(np.array([1e6, 1.0], np.float32))
    with pytest.raises(ExportError, match="weight 'out/bias' has values beyond the float16 range"):
        export_tfjs(model, tmp_path, quantization="float16")
    assert not (tmp_path / "model.json").exists()


def test_missing_node_modules_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys.modules[__name__], "MOBILE", tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"run `npm ci --prefix mobile_export`"):
        _require_node()


def test_split_cli_names_every_blocking_layer_and_writes_nothing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`splitkeras split` (TF.js bundles by default) lists every layer of every device segment
    that cannot be exported, writes nothing, and says in one line how to get the Keras segments."""
    from splitkeras.cli import main

    x = keras.Input((6, 6, 2), name="image")
    y = L.Conv2DTranspose(2, 3, dilation_rate=2, name="up")(x)
    y = L.Softmax(axis=1, name="soft")(y)
    y = L.Flatten(name="flat")(L.Conv2D(2, 3, name="mid")(y))
    y = L.LayerNormalization(rms_scaling=True, name="ln")(y)
    path = tmp_path / "model.keras"
    keras.Model(x, L.Dense(3, name="out")(y)).save(path)
    out = tmp_path / "out"
    assert main(["split", str(path), "--at", "soft", "--at", "flat", "-o", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert not out.exists()
    assert lines[0] == ("error: Device segment 'head' cannot run in TF.js: 2 layers cannot be exported to "
                        "TensorFlow.js:")
    assert lines[1].startswith("  - layer 'up' (Conv2DTranspose): dilation_rate=[2, 2] is not supported")
    assert lines[2].startswith("  - layer 'soft' (Softmax): axis=1 is not supported")
    assert lines[3].startswith("Device segment 'tail' cannot run in TF.js: layer 'ln' (LayerNormalization): "
                               "rms_scaling=True is not supported")
    assert lines[4:] == ["Nothing was written. To get the Keras segments without TF.js bundles, run again "
                         "with --no-tfjs (Python: save(folder, tfjs=False))."]
    assert main(["split", str(path), "--at", "soft", "--at", "flat", "-o", str(out), "--no-tfjs"]) == 0
    assert (out / "split.json").exists() and not list(out.glob("*_tfjs"))
