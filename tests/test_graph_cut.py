"""Cut semantics: recomposing the segments gives the model's outputs.

Each case runs the segment models in order, feeding tensors by the boundary
names in `segment.inputs` / `segment.outputs` (`models.run_segments`), and
compares with the whole model in inference mode: max|diff| <= 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest
from models import (
    bn_model,
    inception_model,
    max_abs_diff,
    mlp_model,
    model_outputs,
    multi_io_model,
    randomise_batchnorm,
    residual_model,
    run_segments,
    sample_inputs,
    sequential_model,
    shared_layer_model,
    skip_model,
)

import splitkeras

TOLERANCE = 1e-6


def names(specs: list[Any]) -> list[str]:
    return [spec.name for spec in specs]


def boundaries(result: splitkeras.Split) -> list[tuple[list[str], list[str]]]:
    return [(names(s.inputs), names(s.outputs)) for s in result.segments]


# (id, builder, cuts, expected (inputs, outputs) names per segment)
CASES: list[tuple[str, Callable[[], keras.Model], list[str], list[tuple[list[str], list[str]]]]] = [
    (
        "sequential",
        sequential_model,
        ["dense_1", "dense_2"],
        [(["features"], ["dense_1"]), (["dense_1"], ["dense_2"]), (["dense_2"], ["dense_3"])],
    ),
    (
        "functional-mlp",
        mlp_model,
        ["hidden_1"],
        [(["features"], ["hidden_1"]), (["hidden_1"], ["logits"])],
    ),
    (
        "residual-between-blocks",
        residual_model,
        ["block1_out"],
        [(["image"], ["block1_out"]), (["block1_out"], ["logits"])],
    ),
    (
        # Inside block 2: the block input (the shortcut) and the branch both cross.
        "residual-inside-block",
        residual_model,
        ["block2_relu1"],
        [(["image"], ["block1_out", "block2_relu1"]), (["block1_out", "block2_relu1"], ["logits"])],
    ),
    (
        "residual-two-cuts-inside-blocks",
        residual_model,
        ["block1_conv1", "block2_conv2"],
        [
            (["image"], ["stem", "block1_conv1"]),
            (["stem", "block1_conv1"], ["block1_out", "block2_conv2"]),
            (["block1_out", "block2_conv2"], ["logits"]),
        ],
    ),
    (
        # Cut through the branches: the stem output goes to the middle AND straight to the tail.
        "inception",
        inception_model,
        ["branch3x3_reduce", "branch5x5"],
        [
            (["image"], ["stem", "branch3x3_reduce"]),
            (["stem"], ["branch5x5"]),
            (["stem", "branch3x3_reduce", "branch5x5"], ["logits"]),
        ],
    ),
    (
        "skip-head-to-tail",
        skip_model,
        ["encode", "middle_2"],
        [
            (["features"], ["embed", "encode"]),
            (["encode"], ["middle_2"]),
            (["embed", "middle_2"], ["logits"]),
        ],
    ),
    (
        "batchnorm",
        bn_model,
        ["bn1", "bn2"],
        [(["image"], ["bn1"]), (["bn1"], ["bn2"]), (["bn2"], ["logits"])],
    ),
    (
        "multi-io",
        multi_io_model,
        ["merge", "trunk"],
        [
            (["image", "meta"], ["merge"]),
            (["merge"], ["trunk"]),
            (["trunk"], ["class_out", "value_out"]),
        ],
    ),
    (
        # The head reads only `meta`; the raw `image` goes straight to the tail.
        "multi-io-input-to-tail",
        multi_io_model,
        ["meta_dense"],
        [(["meta"], ["meta_dense"]), (["image", "meta_dense"], ["class_out", "value_out"])],
    ),
    (
        # Both calls of the shared layer in the head; the second call's output crosses.
        "shared-layer-one-segment",
        shared_layer_model,
        ["hidden"],
        [(["left", "right"], ["shared.1.0", "hidden"]), (["shared.1.0", "hidden"], ["logits"])],
    ),
    (
        "three-cuts",
        mlp_model,
        ["hidden_1", "hidden_2"],
        [(["features"], ["hidden_1"]), (["hidden_1"], ["hidden_2"]), (["hidden_2"], ["logits"])],
    ),
]


@pytest.mark.parametrize(
    "builder, cuts, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_recomposed_segments_give_the_model_outputs(
    builder: Callable[[], keras.Model], cuts: list[str], expected: list[Any]
) -> None:
    model = builder()
    result = splitkeras.split(model, at=cuts)
    assert boundaries(result) == expected
    inputs = sample_inputs(model)
    assert max_abs_diff(model_outputs(model, inputs), run_segments(result, inputs)) <= TOLERANCE


def test_skip_connection_bypasses_the_middle() -> None:
    result = splitkeras.split(skip_model(), at=["encode", "middle_2"])
    head, middle, tail = result.segments
    assert "embed" in names(head.outputs)
    assert "embed" in names(tail.inputs)
    assert "embed" not in names(middle.inputs)
    assert "embed" not in names(middle.outputs)
    assert [layer.name for layer in middle.model.layers if not isinstance(layer, keras.layers.InputLayer)] == [
        "middle_1",
        "middle_2",
    ]


def test_segments_hold_each_layer_once_with_the_cut_in_the_earlier_segment() -> None:
    model = inception_model()
    result = splitkeras.split(model, at=["branch3x3_reduce", "branch5x5"])
    held = [
        {layer.name for layer in s.model.layers if not isinstance(layer, keras.layers.InputLayer)}
        for s in result.segments
    ]
    assert held == [
        {"stem", "branch3x3_reduce"},
        {"branch5x5_reduce", "branch5x5"},
        {"branch1x1", "branch3x3", "branch_pool", "branch_pool_proj", "mixed", "pool", "logits"},
    ]
    source = {layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)}
    assert set().union(*held) == source


def test_four_segments_get_default_names_and_u_shaped_placements() -> None:
    result = splitkeras.split(residual_model(), at=["stem", "block1_out", "block2_out"])
    assert [(s.name, s.placement) for s in result.segments] == [
        ("head", "device"),
        ("middle_1", "server"),
        ("middle_2", "server"),
        ("tail", "device"),
    ]
    inputs = sample_inputs(result.segments[0].model)
    model = residual_model()
    assert max_abs_diff(model_outputs(model, inputs), run_segments(result, inputs)) <= TOLERANCE


def test_batchnorm_moving_statistics_are_copied_into_the_segments() -> None:
    model = bn_model()
    result = splitkeras.split(model, at=["bn1", "bn2"])
    for layer_name, segment in (("bn1", result["head"]), ("bn2", result["middle"])):
        source = model.get_layer(layer_name)
        copy = segment.model.get_layer(layer_name)
        assert np.abs(keras.ops.convert_to_numpy(source.moving_mean)).max() > 0.1  # non-trivial
        for a, b in zip(source.variables, copy.variables, strict=True):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_raw_model_input_sent_to_a_server_segment_is_warned_about() -> None:
    result = splitkeras.split(multi_io_model(), at=["meta_dense"])
    assert len(result.warnings) == 1
    assert "Segment 'tail' (server) takes the raw model input(s) ['image']" in result.warnings[0]


def test_builders_are_deterministic() -> None:
    for builder in (residual_model, bn_model, multi_io_model):
        first, second = builder(), builder()
        for a, b in zip(first.weights, second.weights, strict=True):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


# ---- each segment owns its weights ---------------------------------------------------------------
def _snapshot(model: keras.Model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v).copy() for v in model.variables]


def test_segment_variables_are_not_the_source_variables() -> None:
    model = residual_model()
    result = splitkeras.split(model, at=["block2_relu1"])
    source_ids = {id(v) for v in model.variables}
    for segment in result.segments:
        assert not source_ids & {id(v) for v in segment.model.variables}


def test_training_a_segment_leaves_the_source_model_untouched() -> None:
    model = bn_model()
    before = _snapshot(model)
    result = splitkeras.split(model, at=["relu1"])
    head = result["head"].model
    head_before = _snapshot(head)

    # fit (training mode: updates BatchNorm moving statistics as well as the weights)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 8, 8, 3)).astype("float32")
    y = rng.standard_normal((8, 8, 8, 4)).astype("float32")
    head.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    head.fit([x], y, epochs=1, batch_size=4, verbose=0)

    # and a hand-applied gradient step on the tail
    tail = result["tail"].model
    tail_x = keras.ops.convert_to_numpy(head([x], training=False))
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tail([tail_x], training=True))
    grads = tape.gradient(loss, tail.trainable_variables)
    for variable, grad in zip(tail.trainable_variables, grads):
        variable.assign_sub(0.1 * grad)

    assert any(not np.array_equal(a, b) for a, b in zip(head_before, _snapshot(head)))
    bn1 = head.get_layer("bn1")
    assert not np.array_equal(
        keras.ops.convert_to_numpy(bn1.moving_mean),
        keras.ops.convert_to_numpy(model.get_layer("bn1").moving_mean),
    )
    after = _snapshot(model)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)  # bitwise


def test_changing_the_source_model_leaves_the_segments_untouched() -> None:
    model = mlp_model()
    result = splitkeras.split(model, at=["hidden_1"])
    head_before = _snapshot(result["head"].model)
    for variable in model.variables:
        variable.assign(variable + 1.0)
    for a, b in zip(head_before, _snapshot(result["head"].model)):
        np.testing.assert_array_equal(a, b)


def test_split_does_not_rewire_the_source_graph() -> None:
    # A segment fed by a model input AND an intermediate tensor used to make Keras re-wire
    # the model input (clone_graph_nodes), after which the source could not be saved.
    model = multi_io_model()
    config_before = model.get_config()
    splitkeras.split(model, at=["meta_dense"])
    splitkeras.split(model, at=["merge", "trunk"])
    assert model.get_config() == config_before
    assert all(len(layer._inbound_nodes) == 1 for layer in model.layers)


def test_a_model_with_a_lambda_layer_in_memory_can_be_split() -> None:
    from models import lambda_model

    model = lambda_model()
    result = splitkeras.split(model, at=["double"])
    inputs = sample_inputs(model)
    assert max_abs_diff(model_outputs(model, inputs), run_segments(result, inputs)) <= TOLERANCE


# ---- keras.applications ----------------------------------------------------------------------------
APPLICATIONS = [
    # (constructor, cuts, expected crossing tensors of the first cut)
    # MobileNetV2: inside inverted-residual block 2 (its shortcut block_1_project_BN crosses).
    ("MobileNetV2", ["block_2_expand_relu", "block_14_add"], ["block_1_project_BN", "block_2_expand_relu"]),
    # ResNet50: inside conv2_block1 (pool1_pool feeds the projection shortcut in the next segment).
    ("ResNet50", ["conv2_block1_2_relu", "conv4_block1_out"], ["pool1_pool", "conv2_block1_2_relu"]),
    # DenseNet121: inside dense block 1 (the block input is concatenated later).
    ("DenseNet121", ["conv2_block1_1_relu", "pool3_pool"], ["pool1", "conv2_block1_1_relu"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, cuts, crossing", APPLICATIONS, ids=[a[0] for a in APPLICATIONS])
def test_keras_applications_recompose(name: str, cuts: list[str], crossing: list[str]) -> None:
    keras.utils.set_random_seed(7)
    constructor = getattr(keras.applications, name)
    model = constructor(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    randomise_batchnorm(model)
    result = splitkeras.split(model, at=cuts)
    assert names(result["head"].outputs) == crossing
    assert names(result["middle"].inputs) == crossing
    inputs = sample_inputs(model, batch=2)
    expected = model_outputs(model, inputs)
    assert np.isfinite(expected[0]).all() and np.abs(expected[0]).max() > 0.1
    assert max_abs_diff(expected, run_segments(result, inputs)) <= TOLERANCE


@pytest.mark.parametrize("cuts", [["h", "inner"], ["inner"], ["h"]])
def test_a_nested_model_is_cut_as_one_layer_and_trains_like_model_fit(cuts: list[str]) -> None:
    """A Model used as a layer goes whole into one segment; recomposition, join and
    training (the nested model's weights included) match the unsplit model."""
    from models import nested_model

    model = nested_model()
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 32)
    result = splitkeras.split(model, at=cuts)
    assert sum(isinstance(l, keras.Model) for s in result.segments for l in s.model.layers) == 1
    assert max_abs_diff(model_outputs(model, [x]), run_segments(result, [x])) <= 1e-6
    reference = nested_model()
    for target in (reference, result):
        target.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras.utils.set_random_seed(7)
    reference.fit(x, y, batch_size=8, epochs=2, verbose=0)
    keras.utils.set_random_seed(7)
    result.fit(x, y, batch_size=8, epochs=2, verbose=0)
    joined = result.join()
    assert [l.name for l in joined.layers] == [l.name for l in reference.layers]
    for expected, actual in zip(reference.get_weights(), joined.get_weights()):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
