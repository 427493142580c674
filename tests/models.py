"""Small, deterministic Keras models for the splitkeras tests.

Every builder seeds Keras (`keras.utils.set_random_seed`) before creating layers, so
two calls give models with identical weights. Layer names are fixed so that tests
can cut at them. Each builder documents the cuts its tests use.

Example:
    >>> model = residual_model()
    >>> s = splitkeras.split(model, at=["block1_add"])       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = [
    "SEED",
    "sample_inputs",
    "run_segments",
    "max_abs_diff",
    "model_outputs",
    "sequential_model",
    "mlp_model",
    "residual_model",
    "inception_model",
    "skip_model",
    "bn_model",
    "multi_io_model",
    "shared_layer_model",
    "lambda_model",
    "SubclassedModel",
    "randomise_batchnorm",
]

SEED = 1234


def sample_inputs(model: keras.Model, batch: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Random float32 inputs for every input of `model` (batch dimension `batch`)."""
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((batch, *[int(d) for d in tensor.shape[1:]])).astype("float32")
        for tensor in model.inputs
    ]


def run_segments(split: Any, inputs: list[np.ndarray], training: bool = False) -> list[np.ndarray]:
    """Recompose a split: run each segment model in order, feeding tensors by the
    boundary names in `segment.inputs` / `segment.outputs`. Returns the model outputs
    in the order of `split.model_outputs`."""
    store: dict[str, Any] = {spec.name: x for spec, x in zip(split.model_inputs, inputs)}
    for segment in split.segments:
        outputs = segment.model([store[spec.name] for spec in segment.inputs], training=training)
        for spec, value in zip(segment.outputs, keras.tree.flatten(outputs)):
            store[spec.name] = keras.ops.convert_to_numpy(value)
    return [store[spec.name] for spec in split.model_outputs]


def max_abs_diff(expected: Any, actual: Any) -> float:
    """max |expected - actual| over every output (nested structures are flattened)."""
    pairs = zip(keras.tree.flatten(expected), keras.tree.flatten(actual), strict=True)
    return max(
        float(np.max(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b))))
        for a, b in pairs
    )


def model_outputs(model: keras.Model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """`model`'s outputs in inference mode, as a flat list."""
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(outputs)]


def randomise_batchnorm(model: keras.Model, seed: int = SEED) -> None:
    """Give every BatchNormalization non-trivial gamma, beta and moving statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = int(layer.moving_mean.shape[0])
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
            layer.moving_mean.assign(rng.normal(0.0, 1.0, channels).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))


def sequential_model(seed: int = SEED) -> keras.Sequential:
    """Input(8) -> dense_1(16, relu) -> dense_2(12, relu) -> dense_3(4).

    Cuts: "dense_1", "dense_2".
    """
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(shape=(8,), name="features"),
            keras.layers.Dense(16, activation="relu", name="dense_1"),
            keras.layers.Dense(12, activation="relu", name="dense_2"),
            keras.layers.Dense(4, name="dense_3"),
        ],
        name="sequential_model",
    )


def mlp_model(seed: int = SEED) -> keras.Model:
    """Functional Input(6) -> hidden_1(5, relu) -> hidden_2(4, tanh) -> logits(3).

    Cuts: "hidden_1", "hidden_2". Small enough to count parameters and FLOPs by hand.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(6,), name="features")
    x = keras.layers.Dense(5, activation="relu", name="hidden_1")(inputs)
    x = keras.layers.Dense(4, activation="tanh", name="hidden_2")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp_model")


def _residual_block(x: Any, filters: int, prefix: str) -> Any:
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{prefix}_conv1")(x)
    y = keras.layers.ReLU(name=f"{prefix}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{prefix}_conv2")(y)
    y = keras.layers.Add(name=f"{prefix}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{prefix}_out")(y)


def residual_model(seed: int = SEED) -> keras.Model:
    """Input(8, 8, 3) -> stem conv(4) -> two residual blocks -> pool -> logits(3).

    Each block: conv1 -> relu1 -> conv2, added to the block input, then relu (`*_out`).
    Cuts between blocks: "block1_out"; inside a block (the block input and
    `block2_conv1`/`block2_relu1` both cross): "block2_relu1", "block2_conv1".
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
    x = _residual_block(x, 4, "block1")
    x = _residual_block(x, 4, "block2")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="residual_model")


def inception_model(seed: int = SEED) -> keras.Model:
    """Input(8, 8, 3) -> stem -> four parallel branches -> concat -> pool -> logits(3).

    Branches: `branch1x1`; `branch3x3_reduce` -> `branch3x3`; `branch5x5_reduce` ->
    `branch5x5`; `branch_pool` (max pool) -> `branch_pool_proj`. A cut at
    "branch3x3_reduce" sends the stem output and the reduce output across; a cut at
    "branch5x5" leaves the pool branch and the concat for the later segment.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(8, 8, 3), name="image")
    stem = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="stem")(inputs)
    b1 = keras.layers.Conv2D(2, 1, activation="relu", name="branch1x1")(stem)
    b3 = keras.layers.Conv2D(3, 1, activation="relu", name="branch3x3_reduce")(stem)
    b3 = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="branch3x3")(b3)
    b5 = keras.layers.Conv2D(2, 1, activation="relu", name="branch5x5_reduce")(stem)
    b5 = keras.layers.Conv2D(3, 5, padding="same", activation="relu", name="branch5x5")(b5)
    bp = keras.layers.MaxPooling2D(3, strides=1, padding="same", name="branch_pool")(stem)
    bp = keras.layers.Conv2D(2, 1, activation="relu", name="branch_pool_proj")(bp)
    x = keras.layers.Concatenate(name="mixed")([b1, b3, b5, bp])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="inception_model")


def skip_model(seed: int = SEED) -> keras.Model:
    """A skip connection from the head straight to the tail.

    Input(6) -> `embed`(8) -> `encode`(5) -> `middle_1`(5) -> `middle_2`(4) ->
    `merge` = concat(`middle_2`, `embed`) -> `logits`(3). With cuts at "encode" and
    "middle_2" the head sends `embed` to the tail; the middle never sees it.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(6,), name="features")
    embed = keras.layers.Dense(8, activation="relu", name="embed")(inputs)
    x = keras.layers.Dense(5, activation="relu", name="encode")(embed)
    x = keras.layers.Dense(5, activation="relu", name="middle_1")(x)
    x = keras.layers.Dense(4, activation="relu", name="middle_2")(x)
    x = keras.layers.Concatenate(name="merge")([x, embed])
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="skip_model")


def bn_model(seed: int = SEED) -> keras.Model:
    """Conv -> BatchNorm -> ReLU twice, with randomised BatchNorm statistics.

    Input(8, 8, 3) -> `conv1`(4) -> `bn1` -> `relu1` -> `conv2`(4) -> `bn2` -> `relu2` ->
    `pool` -> `dropout` -> `logits`(3). Cuts: "bn1", "relu1", "bn2".
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.25, name="dropout")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs, name="bn_model")
    randomise_batchnorm(model, seed)
    return model


def multi_io_model(seed: int = SEED) -> keras.Model:
    """Two inputs, two outputs.

    `image` Input(6, 6, 2) -> `conv` -> `flatten`; `meta` Input(3) -> `meta_dense`;
    `merge` = concat -> `trunk`(8) -> `class_out`(3) and `value_out`(1).
    Cuts: "merge", "trunk"; "meta_dense" alone leaves the image branch to the tail.
    """
    keras.utils.set_random_seed(seed)
    image = keras.Input(shape=(6, 6, 2), name="image")
    meta = keras.Input(shape=(3,), name="meta")
    x = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(image)
    x = keras.layers.Flatten(name="flatten")(x)
    m = keras.layers.Dense(4, activation="relu", name="meta_dense")(meta)
    x = keras.layers.Concatenate(name="merge")([x, m])
    x = keras.layers.Dense(8, activation="relu", name="trunk")(x)
    class_out = keras.layers.Dense(3, activation="softmax", name="class_out")(x)
    value_out = keras.layers.Dense(1, name="value_out")(x)
    return keras.Model([image, meta], [class_out, value_out], name="multi_io_model")


def shared_layer_model(seed: int = SEED) -> keras.Model:
    """One Dense layer (`shared`) called twice, on two inputs of the same shape.

    `left`, `right` Input(4); `a` = `left_post`(`shared`(left)); `b` = `shared`(right);
    `add`(a, b) -> `hidden`(4) -> `concat`(hidden, b) -> `logits`(2).
    A cut at "add" or "hidden" keeps both calls in the head (works; with "hidden" the
    second call's output `shared.1.0` crosses); a cut at "left_post" puts one call on
    each side (refused), and a cut at "shared" itself is ambiguous (refused).
    """
    keras.utils.set_random_seed(seed)
    left = keras.Input(shape=(4,), name="left")
    right = keras.Input(shape=(4,), name="right")
    shared = keras.layers.Dense(4, activation="relu", name="shared")
    a = keras.layers.Dense(4, name="left_post")(shared(left))
    b = shared(right)
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.Dense(4, activation="relu", name="hidden")(x)
    x = keras.layers.Concatenate(name="concat")([x, b])
    outputs = keras.layers.Dense(2, name="logits")(x)
    return keras.Model([left, right], outputs, name="shared_layer_model")


def lambda_model(seed: int = SEED) -> keras.Model:
    """Input(4) -> `dense`(4) -> `double` (Lambda x * 2) -> `logits`(2)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(4,), name="features")
    x = keras.layers.Dense(4, name="dense")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    outputs = keras.layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, outputs, name="lambda_model")


class SubclassedModel(keras.Model):
    """A subclassed model: layers wired by Python code, so there is no graph to cut."""

    def __init__(self) -> None:
        super().__init__(name="subclassed_model")
        self.hidden = keras.layers.Dense(4, name="hidden")
        self.logits = keras.layers.Dense(2, name="logits")

    def call(self, inputs: Any) -> Any:
        return self.logits(self.hidden(inputs))


def nested_model(seed: int = SEED) -> keras.Model:
    """A Sequential (`inner`: `inner_d1`, `inner_d2`) used as one layer of a functional model.

    `features` Input(6) -> `h` Dense(8) -> `inner` -> `act` -> `logits`(3). splitkeras cuts
    a nested model as one layer: a cut at `h` or `inner` works, a cut at `inner_d1` is refused.
    """
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu", name="inner_d1"),
                              keras.layers.Dense(8, name="inner_d2")], name="inner")
    inputs = keras.Input(shape=(6,), name="features")
    x = keras.layers.Dense(8, name="h")(inputs)
    x = keras.layers.Activation("relu", name="act")(inner(x))
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="nested_model")
