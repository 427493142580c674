"""`inspect`'s numbers against values worked out by hand.

Conventions (splitkeras/profile.py): FLOPs are forward FLOPs per sample; a
multiply-add is 2 FLOPs for Dense (2 * in * out), convolutions
(2 * kh * kw * cin * cout * H_out * W_out; the bias is not counted) and
normalisation (2 per output element); any other layer (ReLU, Add, pooling,
Dropout, ...) costs 1 FLOP per output element. Bytes are float32 bytes of
every tensor that crosses the cut: 4 * elements, per sample. Parameters count
trainable and non-trainable weights (BatchNorm moving statistics included).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from models import bn_model, mlp_model, multi_io_model, residual_model, shared_layer_model

from splitkeras.cli import main
from splitkeras.profile import CutCandidate, cut_candidates

# ---- residual_model, by hand -------------------------------------------------------------------
# Input 8x8x3. Every conv: 3x3, "same", 4 filters, bias; every feature map 8x8x4 = 256 elements.
H = W = 8
MAP = H * W * 4  # 256 elements
STEM_PARAMS = 3 * 3 * 3 * 4 + 4  # 112
STEM_FLOPS = 2 * 3 * 3 * 3 * 4 * H * W  # 13,824 (its ReLU activation is fused, not counted)
CONV_PARAMS = 3 * 3 * 4 * 4 + 4  # 148
CONV_FLOPS = 2 * 3 * 3 * 4 * 4 * H * W  # 18,432
ELEMENTWISE = MAP  # ReLU / Add: 1 FLOP per output element = 256
BLOCK_FLOPS = CONV_FLOPS + ELEMENTWISE + CONV_FLOPS + ELEMENTWISE + ELEMENTWISE  # conv, relu, conv, add, relu
POOL_FLOPS = 4  # one per output element (4 channels)
LOGITS_PARAMS = 4 * 3 + 3  # 15
LOGITS_FLOPS = 2 * 4 * 3  # 24
TOTAL_PARAMS = STEM_PARAMS + 4 * CONV_PARAMS + LOGITS_PARAMS  # 719
TOTAL_FLOPS = STEM_FLOPS + 2 * BLOCK_FLOPS + POOL_FLOPS + LOGITS_FLOPS  # 89,116


def rows_by_layer(rows: list[CutCandidate]) -> dict[str, CutCandidate]:
    return {row.layer: row for row in rows}


@pytest.fixture(scope="module")
def residual_rows() -> dict[str, CutCandidate]:
    return rows_by_layer(cut_candidates(residual_model()))


def test_hand_arithmetic_is_what_we_think() -> None:
    assert (STEM_PARAMS, STEM_FLOPS, CONV_PARAMS, CONV_FLOPS) == (112, 13_824, 148, 18_432)
    assert (TOTAL_PARAMS, TOTAL_FLOPS) == (719, 89_116)
    assert TOTAL_PARAMS == residual_model().count_params()


def test_residual_candidates_exclude_inputs_and_outputs(residual_rows: dict[str, CutCandidate]) -> None:
    assert list(residual_rows) == [
        "stem",
        "block1_conv1", "block1_relu1", "block1_conv2", "block1_add", "block1_out",
        "block2_conv1", "block2_relu1", "block2_conv2", "block2_add", "block2_out",
        "pool",
    ]  # not "image" (input) nor "logits" (output)


def test_residual_cut_after_the_stem(residual_rows: dict[str, CutCandidate]) -> None:
    row = residual_rows["stem"]
    assert row.crossing == ["stem"]
    assert row.bytes_per_sample == 4 * MAP == 1024
    assert row.head_parameters == STEM_PARAMS
    assert row.tail_parameters == TOTAL_PARAMS - STEM_PARAMS == 607
    assert row.head_flops == STEM_FLOPS
    assert row.tail_flops == TOTAL_FLOPS - STEM_FLOPS == 75_292
    assert row.class_name == "Conv2D"
    assert row.output_shapes == [[None, 8, 8, 4]]


def test_residual_cut_inside_a_block_sends_two_tensors(residual_rows: dict[str, CutCandidate]) -> None:
    # Head: stem, block 1, block2_conv1, block2_relu1. The block input (shortcut) crosses too.
    row = residual_rows["block2_relu1"]
    assert row.crossing == ["block1_out", "block2_relu1"]
    assert row.bytes_per_sample == 4 * (MAP + MAP) == 2048
    head_params = STEM_PARAMS + 2 * CONV_PARAMS + CONV_PARAMS  # 556
    assert row.head_parameters == head_params == 556
    assert row.tail_parameters == CONV_PARAMS + LOGITS_PARAMS == 163
    head_flops = STEM_FLOPS + BLOCK_FLOPS + CONV_FLOPS + ELEMENTWISE  # 70,144
    assert row.head_flops == head_flops == 70_144
    # tail: block2_conv2, block2_add, block2_out, pool, logits
    assert row.tail_flops == CONV_FLOPS + 2 * ELEMENTWISE + POOL_FLOPS + LOGITS_FLOPS == 18_972


def test_residual_cut_between_blocks(residual_rows: dict[str, CutCandidate]) -> None:
    row = residual_rows["block1_out"]
    assert row.crossing == ["block1_out"]
    assert row.bytes_per_sample == 1024
    assert row.head_parameters == STEM_PARAMS + 2 * CONV_PARAMS == 408
    assert row.head_flops == STEM_FLOPS + BLOCK_FLOPS == 51_456


def test_residual_cut_before_the_classifier(residual_rows: dict[str, CutCandidate]) -> None:
    row = residual_rows["pool"]
    assert row.bytes_per_sample == 4 * 4 == 16
    assert (row.head_parameters, row.tail_parameters) == (TOTAL_PARAMS - LOGITS_PARAMS, LOGITS_PARAMS)
    assert (row.head_flops, row.tail_flops) == (TOTAL_FLOPS - LOGITS_FLOPS, LOGITS_FLOPS)


def test_dense_model_by_hand() -> None:
    # features(6) -> hidden_1 Dense(5) -> hidden_2 Dense(4) -> logits Dense(3)
    rows = rows_by_layer(cut_candidates(mlp_model()))
    assert list(rows) == ["hidden_1", "hidden_2"]
    params = [6 * 5 + 5, 5 * 4 + 4, 4 * 3 + 3]  # 35, 24, 15
    flops = [2 * 6 * 5, 2 * 5 * 4, 2 * 4 * 3]  # 60, 40, 24
    first, second = rows["hidden_1"], rows["hidden_2"]
    assert (first.bytes_per_sample, second.bytes_per_sample) == (4 * 5, 4 * 4)
    assert (first.head_parameters, first.tail_parameters) == (params[0], params[1] + params[2])
    assert (first.head_flops, first.tail_flops) == (flops[0], flops[1] + flops[2])
    assert (second.head_parameters, second.tail_parameters) == (params[0] + params[1], params[2])
    assert (second.head_flops, second.tail_flops) == (flops[0] + flops[1], flops[2])


def test_batchnorm_model_by_hand() -> None:
    # conv1 (3x3, 3->4, no bias) -> bn1 -> relu1 -> conv2 (3x3, 4->4, no bias) -> bn2 -> relu2
    # -> pool -> dropout -> logits Dense(3)
    conv1 = (3 * 3 * 3 * 4, 2 * 3 * 3 * 3 * 4 * 8 * 8)  # (108, 13,824)
    bn = (4 * 4, 2 * MAP)  # gamma, beta, moving mean, moving variance; 2 FLOPs per element
    relu = (0, MAP)
    conv2 = (3 * 3 * 4 * 4, 2 * 3 * 3 * 4 * 4 * 8 * 8)  # (144, 18,432)
    pool = dropout = (0, 4)
    logits = (4 * 3 + 3, 2 * 4 * 3)
    layers = [conv1, bn, relu, conv2, bn, relu, pool, dropout, logits]
    total_params = sum(p for p, _ in layers)
    total_flops = sum(f for _, f in layers)
    assert (total_params, total_flops) == (299, 33_824)
    row = rows_by_layer(cut_candidates(bn_model()))["bn1"]
    assert row.bytes_per_sample == 4 * MAP
    assert (row.head_parameters, row.head_flops) == (conv1[0] + bn[0], conv1[1] + bn[1])
    assert (row.tail_parameters, row.tail_flops) == (
        total_params - conv1[0] - bn[0],
        total_flops - conv1[1] - bn[1],
    )


def test_a_model_input_read_after_the_cut_crosses_too() -> None:
    # Cut at meta_dense: the head reads only `meta`; the raw `image` (6x6x2) goes to the tail.
    row = rows_by_layer(cut_candidates(multi_io_model()))["meta_dense"]
    assert row.crossing == ["image", "meta_dense"]
    assert row.bytes_per_sample == 4 * (6 * 6 * 2 + 4) == 304


def test_shared_layers_are_not_candidates() -> None:
    rows = rows_by_layer(cut_candidates(shared_layer_model()))
    assert "shared" not in rows  # called twice: ambiguous
    assert "left_post" not in rows  # would put the two calls of `shared` in different segments
    assert rows["hidden"].crossing == ["shared.1.0", "hidden"]
    assert rows["hidden"].bytes_per_sample == 4 * (4 + 4)


# ---- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def residual_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "residual.keras"
    residual_model().save(path)
    return path


def test_inspect_json(residual_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(residual_file), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "residual_model"
    assert data["source"]["file"] == "residual.keras" and len(data["source"]["sha256"]) == 64
    rows = {row["layer"]: row for row in data["cuts"]}
    assert rows["block2_relu1"] == {
        "layer": "block2_relu1",
        "class_name": "ReLU",
        "output_shapes": [[None, 8, 8, 4]],
        "crossing": ["block1_out", "block2_relu1"],
        "bytes_per_sample": 2048,
        "head_parameters": 556,
        "tail_parameters": 163,
        "head_flops": 70_144,
        "tail_flops": 18_972,
    }


def test_inspect_table(residual_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(residual_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Model 'residual_model': 12 layers can be a cut")
    row = next(line for line in out if line.startswith("block2_relu1"))
    assert row.split() == [
        "block2_relu1", "(+1)", "ReLU", "(8,", "8,", "4)", "2,048", "556", "163", "70.1K", "19.0K",
    ]
