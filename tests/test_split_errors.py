"""Every mistake `split()` and `load_model()` refuse, with the message pinned.

Messages say what happened, what was expected and how to fix it; these tests
pin the part a user reads first.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest
from models import (
    SubclassedModel,
    lambda_model,
    max_abs_diff,
    mlp_model,
    model_outputs,
    multi_io_model,
    residual_model,
    run_segments,
    sample_inputs,
    sequential_model,
    shared_layer_model,
)

import splitkeras
from splitkeras.cli import main
from splitkeras.errors import CutError, ModelLoadError, SplitKerasError, UnsupportedModelError


# ---- cut points ------------------------------------------------------------------------------------
def test_unknown_layer_suggests_close_names() -> None:
    with pytest.raises(
        CutError,
        match=re.escape(
            "Model 'sequential_model' has no layer named 'dense_4'. "
            "Did you mean 'dense_3' or 'dense_2' or 'dense_1'?"
        ),
    ):
        splitkeras.split(sequential_model(), at=["dense_4"])


def test_unknown_layer_without_close_names_points_to_inspect() -> None:
    with pytest.raises(
        CutError,
        match=re.escape(
            "Model 'residual_model' has no layer named 'xyz'. Run `splitkeras inspect MODEL` "
            "to list the layers you can cut at."
        ),
    ):
        splitkeras.split(residual_model(), at=["xyz"])


def test_cuts_out_of_order() -> None:
    with pytest.raises(
        CutError,
        match=re.escape(
            "Cuts are out of order: 'block1_conv1' comes before 'block1_out' in the model, but was "
            "given after it. Give cuts in the order data flows through the model "
            "(--at block1_conv1 --at block1_out)."
        ),
    ):
        splitkeras.split(residual_model(), at=["block1_out", "block1_conv1"])


def test_repeated_cut() -> None:
    with pytest.raises(CutError, match=re.escape("Layer 'dense_1' is given twice as a cut. Give each cut once.")):
        splitkeras.split(sequential_model(), at=["dense_1", "dense_2", "dense_1"])


def test_cut_at_an_input_layer() -> None:
    with pytest.raises(
        CutError,
        match=re.escape(
            "Cannot cut at input layer 'meta': the segment before it would be empty. "
            "Cut at a layer after it."
        ),
    ):
        splitkeras.split(multi_io_model(), at=["meta"])


def test_no_cut() -> None:
    with pytest.raises(CutError, match=r"^No cut given\. Name at least one layer to cut at"):
        splitkeras.split(mlp_model(), at=[])


def test_cut_at_the_last_layer_leaves_the_last_segment_empty() -> None:
    with pytest.raises(
        CutError,
        match=re.escape(
            "The cut at 'dense_3' leaves the last segment empty: every layer of model "
            "'sequential_model' is at or before it. Cut at a layer before the model outputs."
        ),
    ):
        splitkeras.split(sequential_model(), at=["dense_1", "dense_3"])


@pytest.mark.parametrize(
    "cuts",
    [
        ["value_out"],  # one output is the cut; the other is computed after it
        ["merge", "value_out"],  # one output computed in the middle, before the last cut
    ],
)
def test_cut_at_or_after_an_output_of_a_multi_output_model(cuts: list[str]) -> None:
    with pytest.raises(
        CutError,
        match=re.escape(
            "The cut at 'value_out' is at or after model output 'value_out': every model output "
            "must be computed in the last segment"
        ),
    ):
        splitkeras.split(multi_io_model(), at=cuts)


def test_cut_after_an_output_computed_early() -> None:
    # An early exit: `aux` is a model output computed before the cut at `deep`.
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(4,), name="features")
    shallow = keras.layers.Dense(4, name="shallow")(inputs)
    aux = keras.layers.Dense(2, name="aux")(shallow)
    deep = keras.layers.Dense(4, name="deep")(keras.layers.Concatenate(name="concat")([shallow, aux]))
    main_out = keras.layers.Dense(2, name="main")(deep)
    model = keras.Model(inputs, [main_out, aux], name="early_exit")
    with pytest.raises(CutError, match=re.escape("The cut at 'deep' is at or after model output 'aux'")):
        splitkeras.split(model, at=["deep"])


# ---- models that cannot be cut ----------------------------------------------------------------------
def test_subclassed_model_is_refused() -> None:
    model = SubclassedModel()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(
        UnsupportedModelError,
        match=re.escape(
            "Model 'subclassed_model' (SubclassedModel) is a subclassed model: its layers are "
            "connected by Python code, not by a graph splitkeras can cut. Rebuild it with the "
            "functional API"
        ),
    ):
        splitkeras.split(model, at=["hidden"])


def test_unbuilt_sequential_is_refused() -> None:
    model = keras.Sequential([keras.layers.Dense(3, name="dense")], name="unbuilt")
    with pytest.raises(
        UnsupportedModelError,
        match=re.escape(
            "Sequential model 'unbuilt' has no input shape yet, so it has no graph to cut. "
            "Start it with keras.Input(shape=...) or call model.build(input_shape) first."
        ),
    ):
        splitkeras.split(model, at=["dense"])


def test_a_sequential_built_with_build_can_be_split() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.layers.Dense(3, name="first"), keras.layers.Dense(2, name="second")], name="built"
    )
    model.build((None, 4))
    result = splitkeras.split(model, at=["first"])
    inputs = sample_inputs(model)
    assert max_abs_diff(model_outputs(model, inputs), run_segments(result, inputs)) <= 1e-6


def test_not_a_model_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"^Expected a keras\.Model, received str\."):
        splitkeras.split("model.keras", at=["dense"])  # type: ignore[arg-type]


def test_layer_shared_across_a_cut_is_refused() -> None:
    with pytest.raises(
        UnsupportedModelError,
        match=re.escape(
            "Layer 'shared' is shared: it is called in segments [0, 1], but its weights can live "
            "in one place only. Move the cuts so that every call of a shared layer falls in the "
            "same segment."
        ),
    ):
        splitkeras.split(shared_layer_model(), at=["left_post"])


def test_cut_at_a_shared_layer_is_refused() -> None:
    with pytest.raises(
        CutError,
        match=re.escape(
            "Layer 'shared' is called 2 times in model 'shared_layer_model' (a shared layer), so a "
            "cut there is ambiguous. Cut at a layer that is called once."
        ),
    ):
        splitkeras.split(shared_layer_model(), at=["shared"])


@pytest.mark.parametrize("cut", ["add", "hidden"])
def test_shared_layer_with_every_call_in_one_segment_works(cut: str) -> None:
    model = shared_layer_model()
    result = splitkeras.split(model, at=[cut])
    head_layers = [layer.name for layer in result["head"].model.layers]
    assert head_layers.count("shared") == 1  # one layer, called twice, with one set of weights
    inputs = sample_inputs(model)
    assert max_abs_diff(model_outputs(model, inputs), run_segments(result, inputs)) <= 1e-6


# ---- names and placements ----------------------------------------------------------------------------
def test_wrong_placement_count() -> None:
    with pytest.raises(
        CutError,
        match=re.escape(
            "2 cut(s) make 3 segments, but 3 names and 2 placements were given. Give one per segment."
        ),
    ):
        splitkeras.split(mlp_model(), at=["hidden_1", "hidden_2"], placements=["device", "server"])


def test_wrong_name_count() -> None:
    with pytest.raises(CutError, match=re.escape("1 cut(s) make 2 segments, but 3 names and 2 placements")):
        splitkeras.split(mlp_model(), at=["hidden_1"], names=["a", "b", "c"])


def test_unknown_placement() -> None:
    with pytest.raises(
        CutError, match=re.escape("Unknown placement 'cloud'; expected one of ('device', 'server').")
    ):
        splitkeras.split(mlp_model(), at=["hidden_1"], placements=["device", "cloud"])


def test_errors_are_splitkeras_errors() -> None:
    assert issubclass(CutError, SplitKerasError) and issubclass(CutError, ValueError)
    assert issubclass(UnsupportedModelError, SplitKerasError)
    assert issubclass(ModelLoadError, SplitKerasError)


# ---- Lambda layers: refused when loading unless opted in -----------------------------------------------
LAMBDA_REFUSED = r"has Lambda layer\(s\) \['double'\], which run arbitrary Python code when loaded"


@pytest.fixture(scope="module")
def lambda_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lambda")
    model = lambda_model()
    files = {"keras": folder / "lambda.keras", "h5": folder / "lambda.h5"}
    model.save(files["keras"])
    model.save(files["h5"])
    return files


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_load_model_refuses_a_lambda_layer(lambda_files: dict[str, Path], kind: str) -> None:
    path = lambda_files[kind]
    with pytest.raises(ModelLoadError, match=f"^'{re.escape(path.name)}' {LAMBDA_REFUSED}"):
        splitkeras.load_model(path)


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_load_model_accepts_a_lambda_layer_when_unsafe(lambda_files: dict[str, Path], kind: str) -> None:
    model = splitkeras.load_model(lambda_files[kind], unsafe_deserialization=True)
    assert model.get_layer("double") is not None


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_cli_split_refuses_a_lambda_layer(
    lambda_files: dict[str, Path], kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = lambda_files[kind]
    code = main(["split", str(path), "--at", "dense", "-o", str(tmp_path / "out"), "--no-tfjs"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == [
        f"error: '{path.name}' has Lambda layer(s) ['double'], which run arbitrary Python code when "
        "loaded, so they are refused in safe mode. If you trust this file, pass "
        "--unsafe-deserialization (Python: unsafe_deserialization=True)."
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_cli_split_accepts_a_lambda_layer_with_the_flag(
    lambda_files: dict[str, Path], kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["split", str(lambda_files[kind]), "--at", "dense", "-o", str(out), "--no-tfjs",
                 "--unsafe-deserialization"])
    assert code == 0, capsys.readouterr().err
    # The segments keep the Lambda, so loading the split is refused in safe mode too.
    with pytest.raises(ModelLoadError, match=f"^'tail.keras' {LAMBDA_REFUSED}"):
        splitkeras.load_split(out)
    result = splitkeras.load_split(out, unsafe_deserialization=True)
    model = lambda_model()
    inputs = sample_inputs(model)
    assert max_abs_diff(model_outputs(model, inputs), run_segments(result, inputs)) <= 1e-6


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^Model file '.*missing\.keras' does not exist\.$"):
        splitkeras.load_model(tmp_path / "missing.keras")
    (tmp_path / "model.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"^'model\.txt' is not a Keras model file: expected a name ending in"):
        splitkeras.load_model(tmp_path / "model.txt")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match=r"^Cannot read '.*broken\.keras' as a Keras model file"):
        splitkeras.load_model(tmp_path / "broken.keras")


def test_save_with_tfjs_refuses_an_unexportable_device_segment_before_writing(tmp_path):
    """Device segments TF.js cannot run (a dilated Conv2DTranspose, whose gradient TF.js 4.22
    lacks; a Lambda) are refused at save time, naming every segment and layer and, in one
    line, the way out; nothing is written."""
    import keras
    from keras import layers

    import splitkeras

    inputs = keras.Input((4, 4, 2), name="image")
    x = layers.Conv2DTranspose(2, 3, dilation_rate=2, name="up")(inputs)
    x = layers.Conv2D(2, 3, name="conv")(x)
    x = layers.Flatten(name="flat")(x)
    x = layers.Dense(3, name="out")(x)
    outputs = layers.Lambda(lambda t: t * 2.0, name="twice")(x)
    s = splitkeras.split(keras.Model(inputs, outputs), at=["up", "flat"])
    folder = tmp_path / "out"
    with pytest.raises(splitkeras.ExportError) as refused:
        s.save(folder, tfjs=True)
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("Device segment 'head' cannot run in TF.js: layer 'up' (Conv2DTranspose): "
                               "dilation_rate=[2, 2]")
    assert lines[1].startswith("Device segment 'tail' cannot run in TF.js: layer 'twice' (Lambda)")
    assert lines[-1] == ("Nothing was written. To get the Keras segments without TF.js bundles, run again "
                         "with --no-tfjs (Python: save(folder, tfjs=False)).")
    assert not folder.exists()
    s.save(folder, tfjs=False)
    assert (folder / "split.json").exists()


def test_cut_inside_a_nested_model_is_refused_with_the_way_out() -> None:
    from models import nested_model

    with pytest.raises(splitkeras.CutError, match=r"Layer 'inner_d1' is inside the nested model "
                       r"'inner', which splitkeras cuts as one layer\. Cut at 'inner' or at a layer "
                       r"before it"):
        splitkeras.split(nested_model(), at=["inner_d1"])
