"""`join` gives the model back: identical weights and layer names, the same outputs.

Checked for `Split.join()`, for split -> save -> `load_split` -> join, and for the
`splitkeras join` command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
    residual_model,
    sample_inputs,
    sequential_model,
    shared_layer_model,
    skip_model,
)

import splitkeras
from splitkeras.cli import main
from splitkeras.errors import ManifestError

TOLERANCE = 1e-6

CASES: list[tuple[str, Callable[[], keras.Model], list[str]]] = [
    ("sequential", sequential_model, ["dense_1", "dense_2"]),
    ("residual-inside-block", residual_model, ["block2_relu1"]),
    ("inception", inception_model, ["branch3x3_reduce", "branch5x5"]),
    ("skip", skip_model, ["encode", "middle_2"]),
    ("batchnorm", bn_model, ["bn1", "bn2"]),
    ("multi-io", multi_io_model, ["meta_dense"]),
    ("shared-layer", shared_layer_model, ["hidden"]),
]
IDS = [case[0] for case in CASES]


def layers_by_name(model: keras.Model) -> dict[str, keras.layers.Layer]:
    return {layer.name: layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)}


def assert_same_model(original: keras.Model, joined: keras.Model, *, all_variables: bool = False) -> None:
    """Same name, inputs, layer names (in order), bitwise-equal weights and the same outputs.

    `all_variables` also compares the state of seed generators (Dropout), which a join
    in memory copies but a `.keras` file does not keep (Keras saves weights only).
    """
    assert joined.name == original.name
    assert [t.name for t in joined.inputs] == [t.name for t in original.inputs]
    assert list(layers_by_name(joined)) == list(layers_by_name(original))
    joined_layers = layers_by_name(joined)
    for name, layer in layers_by_name(original).items():
        if all_variables:
            ours, theirs = layer.variables, joined_layers[name].variables
        else:
            ours, theirs = layer.weights, joined_layers[name].weights
        assert len(ours) == len(theirs), name
        for a, b in zip(ours, theirs):
            assert a.path.split("/")[-1] == b.path.split("/")[-1]
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=f"{name}/{a.path}"
            )
    assert joined.count_params() == original.count_params()
    inputs = sample_inputs(original)
    assert max_abs_diff(model_outputs(original, inputs), model_outputs(joined, inputs)) <= TOLERANCE


@pytest.mark.parametrize("builder, cuts", [c[1:] for c in CASES], ids=IDS)
def test_join_equals_the_model(builder: Callable[[], keras.Model], cuts: list[str]) -> None:
    model = builder()
    assert_same_model(model, splitkeras.split(model, at=cuts).join(), all_variables=True)


@pytest.mark.parametrize("builder, cuts", [c[1:] for c in CASES], ids=IDS)
def test_save_load_join_equals_the_model(
    builder: Callable[[], keras.Model], cuts: list[str], tmp_path: Path
) -> None:
    model = builder()
    manifest_path = splitkeras.split(model, at=cuts).save(tmp_path, tfjs=False)
    assert manifest_path == tmp_path / "split.json"
    loaded = splitkeras.load_split(tmp_path)
    assert_same_model(model, loaded.join())


def test_cli_join_equals_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = residual_model()
    model.save(tmp_path / "residual.keras")
    out = tmp_path / "out"
    assert main(["split", str(tmp_path / "residual.keras"), "--at", "block1_conv1", "--at",
                 "block2_relu1", "-o", str(out), "--no-tfjs"]) == 0
    assert main(["join", str(out), "-o", str(tmp_path / "joined.keras")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"Joined 3 segments of 'residual_model' into {tmp_path / 'joined.keras'}"
    )
    assert_same_model(model, keras.models.load_model(tmp_path / "joined.keras"))


def test_cli_join_default_output_and_h5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = multi_io_model()
    model.save(tmp_path / "multi.h5")
    out = tmp_path / "out"
    assert main(["split", str(tmp_path / "multi.h5"), "--at", "merge", "-o", str(out), "--no-tfjs"]) == 0
    assert main(["join", str(out)]) == 0
    assert_same_model(model, keras.models.load_model(out / "joined.keras"))
    assert main(["join", str(out), "-o", str(tmp_path / "joined.h5")]) == 0
    assert_same_model(model, keras.models.load_model(tmp_path / "joined.h5", compile=False))


def test_join_takes_the_segments_current_weights_and_is_independent() -> None:
    model = mlp_model()
    result = splitkeras.split(model, at=["hidden_1"])
    head = result["head"].model.get_layer("hidden_1")
    head.kernel.assign(head.kernel + 1.0)
    joined = result.join()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(joined.get_layer("hidden_1").kernel),
        keras.ops.convert_to_numpy(model.get_layer("hidden_1").kernel) + 1.0,
    )
    joined.get_layer("hidden_1").kernel.assign(np.zeros((6, 5), "float32"))
    assert np.abs(keras.ops.convert_to_numpy(head.kernel)).max() > 0  # the segment is unchanged


def test_join_keeps_the_compile_config() -> None:
    model = mlp_model()
    model.compile(optimizer="sgd", loss="mse")
    joined = splitkeras.split(model, at=["hidden_1"]).join()
    assert joined.compiled
    assert joined.loss == "mse"


def test_join_of_a_partly_loaded_split_is_refused(tmp_path: Path) -> None:
    splitkeras.split(mlp_model(), at=["hidden_1"]).save(tmp_path)
    device_only = splitkeras.load_split(tmp_path, placements=["device"])
    assert device_only["tail"].model is None
    with pytest.raises(ManifestError, match=r"^Cannot join: segment\(s\) \['tail'\] were not loaded\."):
        device_only.join()
